"""R2R and REVERIE annotations -> one ``Episode`` per instruction.

Instruction ids follow the official evaluators (``docs/metrics.md``):
R2R ``"<path_id>_<k>"``; REVERIE ``"<id>_<k>"`` where ``id = "<path_id>_<objId>"``.
The test splits have no goal: their episodes carry the start only (``path`` of length 1 in
the release files is kept as given, and ``has_goal`` is False).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from minivln.paths import DataError, resolve_data_dir

TASKS = ("r2r", "reverie")
SPLITS = ("train", "val_seen", "val_unseen", "test")


@dataclass(frozen=True)
class Episode:
    """One instruction to follow."""

    instr_id: str
    task: str  # "r2r" or "reverie"
    scan: str
    path_id: int
    path: tuple[str, ...]  # annotated path, start first, goal last
    heading: float  # start heading (radians, from +y, clockwise seen from above)
    instruction: str
    obj_id: int | None = None  # REVERIE target object
    distance: float | None = None  # R2R annotated path length, absent in test
    # the instruction's token ids as a file gave them (DUET's ``instr_encoding``: BERT uncased ids
    # with [CLS]/[SEP]), int32 little-endian bytes (compact for millions of augmented pairs); None =
    # tokenise ``instruction``.  Read them with ``token_ids``.
    encoded: bytes | None = field(default=None, repr=False)
    # REVERIE goal viewpoints given by the file (DUET's ``pos_vps``: where the target is visible);
    # None = derive them from the BBox files
    goal_vps: tuple[str, ...] | None = None

    @property
    def token_ids(self) -> list[int] | None:
        """The given token ids (``encoded``), or None when the instruction is to be tokenised."""
        return None if self.encoded is None else np.frombuffer(self.encoded, dtype="<i4").tolist()

    @property
    def text(self) -> str:
        """The instruction's text: ``instruction``, or (a file that gave token ids only) the ids
        decoded with the BERT tokenizer."""
        if self.instruction or self.encoded is None:
            return self.instruction
        # the vocabulary is loaded on first use only
        from minivln.data.tokenizer import get_tokenizer

        return get_tokenizer().decode(self.token_ids or [])

    @property
    def start(self) -> str:
        return self.path[0]

    @property
    def goal(self) -> str:
        return self.path[-1]


def split_file(data_dir: Path, task: str, split: str) -> Path:
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; expected one of {TASKS}")
    name = {"r2r": "R2R", "reverie": "REVERIE"}[task]
    path = data_dir / name / f"{name}_{split}.json"
    if not path.is_file():
        raise DataError(f"no {name} file for split {split!r}: {path} is missing")
    return path


def _episodes_from_items(task: str, items: list[dict], source: str, first: int = 0) -> list[Episode]:
    """Episodes of path ``items`` (``first``: the index of ``items[0]`` in its file, for messages)."""
    episodes: list[Episode] = []
    for n, item in enumerate(items, start=first):
        try:
            instrs = item["instructions"]
            if task == "r2r":
                base = str(item["path_id"])
                path_id = int(item["path_id"])
                obj = None
            else:
                # REVERIE test items carry only ``id`` (no ``objId`` / ``path_id``)
                base = str(item["id"])
                path_id = int(item.get("path_id", base.split("_")[0]))
                obj = int(item["objId"]) if "objId" in item else None
            for k, text in enumerate(instrs):
                episodes.append(
                    Episode(
                        instr_id=f"{base}_{k}",
                        task=task,
                        scan=item["scan"],
                        path_id=path_id,
                        path=tuple(item["path"]),
                        heading=float(item["heading"]),
                        instruction=text,
                        obj_id=obj,
                        distance=float(item["distance"]) if "distance" in item else None,
                    )
                )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{source}: item {n} is malformed ({exc!r})") from exc
    return episodes


def load_episodes(task: str, split: str, data_dir: str | os.PathLike | None = None) -> list[Episode]:
    """All instructions of a split, in file order."""
    root = resolve_data_dir(data_dir)
    path = split_file(root, task, split)
    try:
        items = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from exc
    return _episodes_from_items(task, items, str(path))
