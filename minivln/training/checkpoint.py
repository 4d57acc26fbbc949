"""Training-state checkpoints: one directory per checkpoint, replaced atomically.

A checkpoint directory (``RUN/latest/`` or ``RUN/best/``) holds::

    model.safetensors       the model's state dict (tensors, CPU)
    loss_terms.safetensors  learnable loss-term parameters as "<term name>.<param>" (when there are any)
    trainer.pt              latest/ only: optimizer, scheduler, grad scaler, step, best metric, and per
                            rank the RNG states (Python, NumPy, torch, CUDA) and the task's position
    meta.json               step, kind, best metric, validation metrics, time; written last

It is written into a hidden staging directory (``RUN/.latest.tmp``) and then swapped in with two
renames (old -> ``RUN/.latest.old``, staging -> ``RUN/latest``), so a crash at any moment leaves
either the previous checkpoint or the new one, never a mixture.  :func:`find_checkpoint` repairs the
one window in between (the old one parked under ``.latest.old``, nothing at ``latest``).

``trainer.pt`` is a pickle (RNG and task states are arbitrary Python objects): load only runs you
trust.  The weights themselves are in safetensors files, which are safe to load from anywhere.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from minivln.model.checkpoint import CheckpointError, read_safetensors, read_torch
from minivln.paths import WriteError, describe_os_error, error_number

MODEL_FILE = "model.safetensors"
LOSS_TERMS_FILE = "loss_terms.safetensors"
TRAINER_FILE = "trainer.pt"
META_FILE = "meta.json"
FORMAT = "minivln-checkpoint/1"


@dataclass
class Checkpoint:
    """The contents of a checkpoint directory, tensors on CPU."""

    path: Path
    meta: dict[str, Any]
    model: dict[str, torch.Tensor]
    loss_terms: dict[str, torch.Tensor] = field(default_factory=dict)
    trainer: dict[str, Any] | None = None  # None for a weights-only checkpoint (best/)

    @property
    def step(self) -> int:
        return int(self.meta["step"])


# ----------------------------------------------------------------------------------------- RNG states


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and every CUDA device) generator states."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Undo :func:`capture_rng_state`: the next random draws repeat those after the capture."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ----------------------------------------------------------------------------------------- writing


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync on Windows
        return
    _fsync_file(path)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors refuses tensors that share memory (tied weights): give each name its own copy."""
    seen: set[tuple[int, int]] = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add((t.untyped_storage().data_ptr(), t.storage_offset()))
        out[name] = t
    save_file(out, str(path))
    _fsync_file(path)


def _rename(src: Path, dst: Path) -> None:
    """One directory rename (a separate function so that tests can interrupt the swap)."""
    os.rename(src, dst)


def _swap_into_place(staging: Path, final: Path) -> None:
    parked = final.with_name(f".{final.name}.old")
    if parked.exists():
        shutil.rmtree(parked)
    if final.exists():
        _rename(final, parked)
    _rename(staging, final)
    _fsync_dir(final.parent)
    if parked.exists():
        shutil.rmtree(parked)


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model_state: dict[str, torch.Tensor],
    meta: dict[str, Any],
    loss_terms_state: dict[str, torch.Tensor] | None = None,
    trainer_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory at ``path`` atomically (replacing any previous one).

    ``meta`` must be JSON-serialisable and should contain ``step``; ``format`` and ``time`` are added.
    A failed write (read-only file system, disk full, ...) is a one-line
    :class:`~minivln.paths.WriteError` naming ``path``, the cause and the previous checkpoint, which is
    kept; the staging directory is removed.
    """
    final = Path(path)
    staging = final.with_name(f".{final.name}.tmp")
    try:
        _write_checkpoint(final, staging, model_state, meta, loss_terms_state, trainer_state)
    except (OSError, RuntimeError, SafetensorError) as exc:  # torch.save reports a failed write as a RuntimeError
        if isinstance(exc, RuntimeError) and not _is_write_failure(exc):
            raise
        shutil.rmtree(staging, ignore_errors=True)
        previous = find_checkpoint(final, repair=False)
        kept = (f"the previous checkpoint (step {read_meta(previous).get('step')}) is kept"
                if previous is not None else "no previous checkpoint")
        raise WriteError(f"cannot write checkpoint {final}: {describe_os_error(exc, final.parent)}; {kept}",
                         error_number(exc)) from exc
    return final


def _is_write_failure(exc: RuntimeError) -> bool:
    """Whether torch's RuntimeError reports a failed write (its stream writer's messages)."""
    text = str(exc)
    return "file write failed" in text or "PytorchStreamWriter" in text or "unexpected pos" in text


def _write_checkpoint(final: Path, staging: Path, model_state: dict[str, torch.Tensor], meta: dict[str, Any],
                      loss_terms_state: dict[str, torch.Tensor] | None,
                      trainer_state: dict[str, Any] | None) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    if staging.exists():
        shutil.rmtree(staging)  # left over from a crash
    staging.mkdir()
    try:
        _save_tensors(model_state, staging / MODEL_FILE)
        if loss_terms_state:
            _save_tensors(loss_terms_state, staging / LOSS_TERMS_FILE)
        if trainer_state is not None:
            torch.save(trainer_state, staging / TRAINER_FILE)
            _fsync_file(staging / TRAINER_FILE)
        full_meta = {"format": FORMAT, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **meta}
        (staging / META_FILE).write_text(json.dumps(full_meta, indent=1, sort_keys=True))
        _fsync_file(staging / META_FILE)
        _fsync_dir(staging)
        _swap_into_place(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------- reading


def _complete(path: Path) -> bool:
    return (path / META_FILE).is_file() and (path / MODEL_FILE).is_file()


def find_checkpoint(path: str | os.PathLike, *, repair: bool = True) -> Path | None:
    """The complete checkpoint at ``path``, or ``None``.

    If a crash hit between the two renames of a swap, the previous checkpoint is still complete under
    ``.<name>.old``; with ``repair`` it is moved back to ``path`` (call it from one process only).
    """
    final = Path(path)
    if _complete(final):
        return final
    parked = final.with_name(f".{final.name}.old")
    if _complete(parked):
        if not repair:
            return parked
        if final.exists():
            shutil.rmtree(final)
        _rename(parked, final)
        return final
    return None


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's ``meta.json``; a truncated or garbage one is a :class:`CheckpointError`."""
    f = Path(path) / META_FILE
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(message=f"{f} is truncated or corrupt (not valid JSON: {exc})") from None
    except OSError as exc:
        raise CheckpointError(message=f"cannot read {f}: {exc.strerror or exc}") from None
    if not isinstance(meta, dict) or "step" not in meta:
        raise CheckpointError(message=f"{f} is not a checkpoint's meta.json (no step)")
    return meta


def load_checkpoint(path: str | os.PathLike, *, with_trainer: bool = True) -> Checkpoint:
    """Read a checkpoint directory written by :func:`save_checkpoint` (tensors on CPU).  An incomplete
    directory or a truncated or garbage file is a one-line :class:`CheckpointError` naming the file."""
    p = Path(path)
    if not _complete(p):
        raise CheckpointError(message=f"{p} is not a complete checkpoint (no {META_FILE} or {MODEL_FILE})")
    meta = read_meta(p)
    loss_terms = read_safetensors(p / LOSS_TERMS_FILE) if (p / LOSS_TERMS_FILE).is_file() else {}
    trainer = None
    if with_trainer and (p / TRAINER_FILE).is_file():
        # our own pickle: it holds NumPy RNG arrays and arbitrary task state, so not weights_only
        trainer = read_torch(p / TRAINER_FILE, weights_only=False)
        if not isinstance(trainer, dict) or "step" not in trainer:
            raise CheckpointError(message=f"{p / TRAINER_FILE} is not a trainer state (no step)")
    return Checkpoint(path=p, meta=meta, model=read_safetensors(p / MODEL_FILE), loss_terms=loss_terms,
                      trainer=trainer)
