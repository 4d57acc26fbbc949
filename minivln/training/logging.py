"""Run logs: one JSON object per line in ``RUN/log.jsonl``.

Training records look like ``{"kind": "train", "step": 100, "loss": 0.71, "loss/task": 0.70, "lr":
1e-4, "grad_norm": 2.1, "it_s": 5.3, "time": 19.2}`` (averages over the steps since the previous record);
validation records like ``{"kind": "val", "step": 100, "val_unseen.sr": 0.41, "val_unseen.spl": 0.36}``.
On resume the records after the checkpoint's step are dropped, so the log reads as one run.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from minivln.paths import write_error


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):  # numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan" / "inf": strict JSON has no such numbers
    return value


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a JSONL file (a torn last line, from a crash, is skipped)."""
    records = []
    p = Path(path)
    if not p.is_file():
        return records
    for line in p.read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class JsonlLogger:
    """Append records to a JSONL file, one flushed line each.

    ``resume_step=None`` starts a fresh log (truncating any old one); an integer keeps the existing
    records up to and including that step and appends after them.  ``enabled=False`` (ranks other
    than 0) makes every call a no-op.
    """

    def __init__(self, path: str | os.PathLike, *, resume_step: int | None = None, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self._file = None
        if not enabled:
            return
        kept = [] if resume_step is None else [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "w") as f:
                for r in kept:
                    f.write(json.dumps(r) + "\n")
            self._file = open(self.path, "a", buffering=1)
        except OSError as exc:  # read-only or full: one line naming the file
            raise write_error(exc, self.path) from exc

    def log(self, record: Mapping[str, Any]) -> None:
        if self._file is None:
            return
        try:
            self._file.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
            self._file.flush()
        except OSError as exc:
            raise write_error(exc, self.path) from exc

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> JsonlLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def format_record(record: Mapping[str, Any], keys: tuple[str, ...] = ("loss", "lr", "grad_norm", "it_s")) -> str:
    """A short one-line summary for the console, e.g. ``step 100 | loss 0.7100 | lr 1.00e-04``."""
    parts = [f"step {record.get('step')}"]
    for k in keys:
        v = record.get(k)
        if isinstance(v, (int, float)):
            parts.append(f"{k} {v:.2e}" if k == "lr" else f"{k} {v:.4f}")
    return " | ".join(parts)
