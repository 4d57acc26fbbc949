"""DUET's (and ScaleVLN's) processed annotation files -> ``Episode`` objects, token ids kept.

Two formats, told apart by the file name:

* ``*.jsonl`` (DUET ``pretrain_src``: ``R2R_{train,val_seen,val_unseen}_enc.jsonl``,
  ``R2R_prevalent_aug_train_enc.jsonl``, ``REVERIE_*_enc.jsonl``, ``REVERIE_speaker_aug_enc.jsonl``;
  ScaleVLN's ``R2R_{hm3d,gibson}_aug_envdrop_generated_enc.jsonl`` and its REVERIE speaker files):
  one JSON object per line and per instruction:

  - ``instr_id`` (string; R2R ``"<path_id>_<k>"``, REVERIE ``"<path_id>_<objId>_<k>"``),
  - ``scan`` (string), ``path`` (viewpoint ids, start first; the steps are graph edges),
  - ``heading`` (start heading, radians; required for R2R, REVERIE reads it with default 0 as
    DUET's ``item.get('heading', 0)``),
  - ``instr_encoding`` (BERT uncased token ids, ``[CLS] ... [SEP]`` = 101 ... 102),
  - REVERIE: ``pos_vps`` (the viewpoints from which the target is visible) and the target object
    from ``objId``/``objid`` if present, else the second field of ``instr_id`` (as DUET reads it);
  - optional ``instruction`` (the text) and ``path_id``; other keys are ignored.

* ``*.json`` (DUET ``map_nav_src``: ``R2R_*_enc.json``, ``REVERIE_*_enc.json``, the fine-tuning
  ``prevalent_aug_train_enc.json``; the official release files too): a JSON list of path items as in
  :mod:`minivln.data.datasets`, plus optional ``instr_encodings`` (one id list per instruction).

Everything is checked while reading and the first problem is one :class:`DataError` naming the file
and line (``.jsonl``) or item (``.json``): malformed JSON, a missing or mistyped field, token ids
outside the vocabulary, a scan without a connectivity file, a path viewpoint that is not in the
house or a step that is not an edge (:meth:`~minivln.data.graph.House.path_problem`), a REVERIE goal
viewpoint that is not in the house.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np

from minivln.data.datasets import Episode, _episodes_from_items
from minivln.data.graph import Graphs
from minivln.data.tokenizer import BERT_VOCAB_SIZE
from minivln.paths import DataError

__all__ = ["load_annotation_file", "load_annotation_files"]


class _Bad(Exception):
    """A problem with one line/item (the caller adds the file and line)."""


def _field(item: dict, key: str) -> Any:
    if key not in item:
        raise _Bad(f"missing field {key!r}")
    return item[key]


def _string(item: dict, key: str) -> str:
    value = _field(item, key)
    if not isinstance(value, str) or not value:
        raise _Bad(f"field {key!r} must be a non-empty string, got {value!r:.60}")
    return value


def _viewpoints(item: dict, key: str) -> tuple[str, ...]:
    value = _field(item, key)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise _Bad(f"field {key!r} must be a non-empty list of viewpoint ids, got {value!r:.80}")
    return tuple(sys.intern(v) for v in value)


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise _Bad(f"field {key!r} must be a number, got {value!r:.60}")
    return float(value)


def _int_id(value: Any, what: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise _Bad(f"{what} must be an integer, got {value!r:.60}")


def encode_ids(value: Any, vocab_size: int, key: str = "instr_encoding") -> bytes:
    """A token id list, checked (integers in ``[0, vocab_size)``, at least one), as int32 bytes."""
    if not isinstance(value, list) or not value:
        raise _Bad(f"field {key!r} must be a non-empty list of token ids, got {value!r:.60}")
    arr = np.asarray(value) if all(type(x) is int for x in value) else None
    if arr is None or arr.dtype.kind not in "iu":
        bad = next((x for x in value if type(x) is not int), value[0])
        raise _Bad(f"field {key!r} must hold integer token ids, found {bad!r:.40}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise _Bad(f"field {key!r} holds token id {bad}, outside the tokenizer's vocabulary "
                   f"(0..{vocab_size - 1}): encoded with another tokenizer?")
    return arr.astype("<i4").tobytes()


def _check_graph(ep: Episode, graphs: Graphs) -> None:
    if not graphs.has(ep.scan):
        raise _Bad(f"scan {ep.scan!r} has no connectivity file ({ep.scan}_connectivity.json in none of "
                   f"{graphs.where()}; add its folder to connectivity_dirs)")
    house = graphs[ep.scan]
    problem = house.path_problem(ep.path)
    if problem:
        raise _Bad(problem)
    for vp in ep.goal_vps or ():
        if vp not in house:
            raise _Bad(f"pos_vps viewpoint {vp!r} is not an included viewpoint of scan {ep.scan}")


def _episode_from_line(item: Any, task: str, vocab_size: int) -> Episode:
    if not isinstance(item, dict):
        raise _Bad(f"expected a JSON object, got {type(item).__name__}")
    instr_id = _string(item, "instr_id")
    scan = sys.intern(_string(item, "scan"))
    path = _viewpoints(item, "path")
    if task == "r2r" or "heading" in item:
        heading = _number(_field(item, "heading"), "heading")
    else:
        heading = 0.0  # DUET's REVERIE reader: item.get('heading', 0)
    encoded = encode_ids(_field(item, "instr_encoding"), vocab_size)
    text = item.get("instruction", "")
    if not isinstance(text, str):
        raise _Bad(f"field 'instruction' must be a string, got {text!r:.60}")
    parts = instr_id.split("_")
    if "path_id" in item:
        path_id = _int_id(item["path_id"], "field 'path_id'")
    else:
        path_id = int(parts[0]) if parts[0].isdigit() else -1
    obj_id, goal_vps = None, None
    if task == "reverie":
        goal_vps = _viewpoints(item, "pos_vps")
        if "objId" in item or "objid" in item:
            obj_id = _int_id(item.get("objId", item.get("objid")), "the target object id (objId)")
        elif len(parts) >= 3:
            obj_id = _int_id(parts[1], f"the object id in instr_id {instr_id!r} (<path_id>_<objId>_<k>)")
        else:
            raise _Bad(f"no target object: no 'objId' field and instr_id {instr_id!r} is not "
                       "<path_id>_<objId>_<k>")
    return Episode(instr_id=instr_id, task=task, scan=scan, path_id=path_id, path=path, heading=heading,
                   instruction=text, obj_id=obj_id, encoded=encoded, goal_vps=goal_vps)


def _read_jsonl(path: Path, task: str, graphs: Graphs, vocab_size: int) -> list[Episode]:
    episodes: list[Episode] = []
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise _Bad(f"not valid JSON ({exc.msg}, column {exc.colno})") from None
                ep = _episode_from_line(item, task, vocab_size)
                _check_graph(ep, graphs)
            except _Bad as exc:
                raise DataError(f"{path}:{lineno}: {exc}") from None
            episodes.append(ep)
    return episodes


def _read_json(path: Path, task: str, graphs: Graphs, vocab_size: int) -> list[Episode]:
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON list of path items, got {type(items).__name__}")
    episodes: list[Episode] = []
    for n, item in enumerate(items):
        where = f"{path}: item {n}"
        try:
            if not isinstance(item, dict):
                raise _Bad(f"expected a JSON object, got {type(item).__name__}")
            eps = _episodes_from_items(task, [item], str(path), first=n)  # DataError names the item
            encs = item.get("instr_encodings")
            if encs is not None:
                if not isinstance(encs, list) or len(encs) != len(eps):
                    raise _Bad(f"'instr_encodings' must be a list with one id list per instruction "
                               f"({len(eps)}), got {encs!r:.60}")
                eps = [replace(ep, encoded=encode_ids(ids, vocab_size, f"instr_encodings[{k}]"))
                       for k, (ep, ids) in enumerate(zip(eps, encs))]
            for ep in eps:
                _check_graph(ep, graphs)
        except _Bad as exc:
            raise DataError(f"{where}: {exc}") from None
        episodes.extend(eps)
    return episodes


def load_annotation_file(path: str | os.PathLike, task: str, graphs: Graphs,
                         vocab_size: int = BERT_VOCAB_SIZE) -> list[Episode]:
    """The episodes of one DUET/ScaleVLN annotation file (``.jsonl`` or ``.json``, see the module
    docstring), in file order, checked against ``graphs`` (DataError naming file and line)."""
    if task not in ("r2r", "reverie"):
        raise DataError(f"unknown task {task!r}; expected 'r2r' or 'reverie'")
    p = Path(path)
    if not p.is_file():
        raise DataError(f"annotation file {p} does not exist")
    if p.name.endswith(".jsonl"):
        return _read_jsonl(p, task, graphs, vocab_size)
    if p.name.endswith(".json"):
        return _read_json(p, task, graphs, vocab_size)
    raise DataError(f"annotation file {p}: expected a .jsonl (DUET pretrain_src) or .json (path items) file")


def load_annotation_files(paths: list[str] | tuple[str, ...], task: str, graphs: Graphs,
                          vocab_size: int = BERT_VOCAB_SIZE) -> list[Episode]:
    """Several files concatenated in order, as DUET's ``train_traj_files`` are (one list of
    instructions; the augmented pairs are simply more of them)."""
    episodes: list[Episode] = []
    for path in paths:
        episodes.extend(load_annotation_file(path, task, graphs, vocab_size))
    return episodes
