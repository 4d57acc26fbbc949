"""Load, validate and score a leaderboard-format submission for R2R or REVERIE.

A submission is a list of ``{"instr_id": str, "trajectory": [[vp, heading, elevation], ...]}``
objects (REVERIE adds ``"predObjId": int``).  :class:`Evaluator` checks it against one split of one
task and computes the metrics of :mod:`minivln.evaluation.metrics`; it works in-process (the
training loop passes its own list of dicts) as well as behind ``minivln eval``.

What is checked, and what happens (details in ``docs/metrics.md``):

* errors (:class:`SubmissionError`, one message naming the item): the file is missing or is not
  JSON, the top level is not a list, an item is not an object, ``instr_id`` is missing, not a string
  or not of the task's form, ``trajectory`` is missing, empty or has an entry that is not
  ``[viewpoint (str), heading (number), elevation (number)]``, REVERIE ``predObjId`` is missing or
  not an integer; for the items that are scored, additionally: a viewpoint that is not an included
  viewpoint of the episode's scan, a first viewpoint other than the episode's start, and (unless
  ``check_edges=False``) a move between two different viewpoints that are not graph neighbours;
* warnings (kept in :class:`SubmissionReport`): ids of the split that are missing (an error with
  ``strict=True``), ids outside the split (ignored), repeated ids (only the first one is scored), and
  for REVERIE, trajectory viewpoints with no ``BBox`` file (nothing counts as visible there).
"""

from __future__ import annotations

import gzip
import json
import math
import numbers
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minivln.data.datasets import TASKS, Episode, load_episodes
from minivln.data.graph import House, load_house
from minivln.data.reverie import bbox_path, visible_objects_in_file
from minivln.evaluation import metrics as M
from minivln.paths import DataError, resolve_data_dir

_ID_PATTERNS = {
    "r2r": re.compile(r"^\d+_\d+$"),  # <path_id>_<k>
    "reverie": re.compile(r"^\d+_\d+_\d+$"),  # <path_id>_<objId>_<k>
}
_ID_FORMS = {"r2r": "<path_id>_<k>", "reverie": "<path_id>_<objId>_<k>"}


class SubmissionError(DataError):
    """A submission is malformed or does not fit the split; the message names the offending item."""


@dataclass
class SubmissionReport:
    """What was scored, and what was missing, ignored or odd about a submission."""

    num_items: int = 0
    scored: list[str] = field(default_factory=list)  # in submission order
    missing: list[str] = field(default_factory=list)  # ids of the split not submitted, split order
    unknown: list[str] = field(default_factory=list)  # submitted ids outside the split (ignored)
    duplicates: list[str] = field(default_factory=list)  # ids submitted again (later ones ignored)
    missing_bbox: list[str] = field(default_factory=list)  # REVERIE "<scan>_<vp>" without BBox file

    def warnings(self, examples: int = 3) -> list[str]:
        """Human-readable warnings, one line each (empty when the submission is complete and clean)."""

        def few(ids: Sequence[str]) -> str:
            shown = ", ".join(repr(i) for i in ids[:examples])
            return shown + (", ..." if len(ids) > examples else "")

        out = []
        if self.missing:
            total = len(self.missing) + len(self.scored)
            out.append(
                f"{len(self.missing)} of {total} instruction ids of the split are missing from the "
                f"submission (e.g. {few(self.missing)}); they are not scored (--strict makes this an error)"
            )
        if self.unknown:
            out.append(
                f"{len(self.unknown)} submitted ids are not in the split and were ignored (e.g. {few(self.unknown)})"
            )
        if self.duplicates:
            out.append(
                f"{len(self.duplicates)} ids were submitted more than once; only the first occurrence "
                f"is scored (e.g. {few(self.duplicates)})"
            )
        if self.missing_bbox:
            out.append(
                f"{len(self.missing_bbox)} trajectory viewpoints have no BBox file; nothing is visible "
                f"from them (e.g. {few(self.missing_bbox)})"
            )
        return out


@dataclass
class EvaluationResult:
    """Mean metrics (flat, exactly the metric names), per-episode metrics and the report."""

    summary: dict[str, float]
    per_episode: dict[str, dict[str, float]]
    report: SubmissionReport


@dataclass(frozen=True)
class _Entry:
    instr_id: str
    viewpoints: list[str]
    pred_obj: int | None


def load_submission(path: str | os.PathLike) -> list[Any]:
    """Read a submission file: a JSON list (items are checked by :meth:`Evaluator.evaluate`); a name
    ending in ``.gz`` is read through gzip."""
    path = Path(path)
    if not path.is_file():
        raise SubmissionError(f"submission file {path} does not exist")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        data = json.loads(raw.decode("utf-8"))
    except (OSError, EOFError) as exc:  # gzip: not a gzip file, truncated
        raise SubmissionError(f"submission {path} is not a readable gzip file: {exc}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SubmissionError(f"submission {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, list):
        raise SubmissionError(
            f"submission {path} must be a JSON list of {{instr_id, trajectory}} objects, "
            f"not a JSON {type(data).__name__}"
        )
    return data


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(float(x))


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


class Evaluator:
    """Scores submissions against one split of R2R or REVERIE.

    ``spl_convention``: ``"release"`` (default; L = shortest distance start -> goal) or ``"duet"``
    (L = annotated path length, denominator floored at 0.01).  ``check_edges=False`` accepts jumps
    between non-adjacent viewpoints (scored with the shortest-path distance, as DUET and the REVERIE
    evaluator do).  ``collapse_repeats=True`` drops consecutive repeated viewpoints before scoring
    (changes only nDTW/SDTW).
    """

    def __init__(
        self,
        task: str,
        split: str,
        data_dir: str | os.PathLike | None = None,
        *,
        spl_convention: str = "release",
        check_edges: bool = True,
        collapse_repeats: bool = False,
    ) -> None:
        if task not in TASKS:
            raise DataError(f"unknown task {task!r}; expected one of {TASKS}")
        if spl_convention not in M.SPL_CONVENTIONS:
            raise DataError(f"unknown SPL convention {spl_convention!r}; expected one of {M.SPL_CONVENTIONS}")
        if split == "test":
            raise DataError("the test split has no goals to score against; submit it to the leaderboard")
        self.task = task
        self.split = split
        self.data_dir = resolve_data_dir(data_dir)
        self.spl_convention = spl_convention
        self.check_edges = check_edges
        self.collapse_repeats = collapse_repeats
        episodes = load_episodes(task, split, self.data_dir)
        if not episodes or all(len(e.path) < 2 for e in episodes):
            raise DataError(f"{task} {split} has no annotated goals to score against")
        self.episodes: dict[str, Episode] = {e.instr_id: e for e in episodes}
        self._houses: dict[str, House] = {}
        self._visible: dict[tuple[str, str], frozenset[str]] = {}
        self._no_bbox: set[tuple[str, str]] = set()  # viewpoints known to have no BBox file
        self._missing_bbox: set[str] = set()  # those met during the current evaluation

    # -- public API ------------------------------------------------------------------------------
    @property
    def metric_names(self) -> tuple[str, ...]:
        """The output names of this task's metrics, in report order."""
        return M.R2R_METRICS if self.task == "r2r" else M.REVERIE_METRICS

    def house(self, scan: str) -> House:
        if scan not in self._houses:
            self._houses[scan] = load_house(scan, self.data_dir)
        return self._houses[scan]

    def score(
        self, preds: Sequence[Any], *, strict: bool = False
    ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        """``(summary, per_episode)``: mean metrics keyed by :attr:`metric_names`, and per instr_id."""
        result = self.evaluate(preds, strict=strict)
        return result.summary, result.per_episode

    def evaluate(self, preds: Sequence[Any], *, strict: bool = False, source: str = "submission") -> EvaluationResult:
        """Validate ``preds`` and score the ids that belong to the split.

        ``strict=True`` requires every instruction id of the split.  ``source`` names the submission
        in error messages (the CLI passes the file name).
        """
        if not isinstance(preds, (list, tuple)):
            raise SubmissionError(
                f"{source} must be a list of {{instr_id, trajectory}} objects, not {type(preds).__name__}"
            )
        report = SubmissionReport(num_items=len(preds))
        chosen: dict[str, tuple[int, _Entry]] = {}
        for n, item in enumerate(preds):
            entry = self._parse_item(n, item, source)
            if entry.instr_id not in self.episodes:
                report.unknown.append(entry.instr_id)
            elif entry.instr_id in chosen:
                report.duplicates.append(entry.instr_id)
            else:
                chosen[entry.instr_id] = (n, entry)
        report.missing = [i for i in self.episodes if i not in chosen]
        if strict and report.missing:
            few = ", ".join(repr(i) for i in report.missing[:3])
            raise SubmissionError(
                f"{source}: {len(report.missing)} of {len(self.episodes)} instruction ids of "
                f"{self.task} {self.split} are missing (e.g. {few}); --strict requires all"
            )
        if not chosen:
            raise SubmissionError(
                f"{source}: none of its {len(preds)} items has an instruction id of {self.task} {self.split}"
            )
        per_episode: dict[str, dict[str, float]] = {}
        self._missing_bbox = set()
        for instr_id, (n, entry) in chosen.items():
            self._check_trajectory(n, entry, source)
            per_episode[instr_id] = self._score_entry(entry)
        report.scored = list(chosen)
        report.missing_bbox = sorted(self._missing_bbox)
        summary = M.mean_metrics(per_episode, self.metric_names)
        return EvaluationResult(summary, per_episode, report)

    def score_episode(self, instr_id: str, viewpoints: Sequence[str], pred_obj: int | None = None) -> dict[str, float]:
        """Metrics of one episode from its viewpoint sequence (validated like a submission item)."""
        entry = _Entry(instr_id, list(viewpoints), pred_obj)
        if instr_id not in self.episodes:
            raise SubmissionError(f"instr_id {instr_id!r} is not in {self.task} {self.split}")
        self._check_trajectory(0, entry, "episode")
        return self._score_entry(entry)

    # -- validation --------------------------------------------------------------------------------
    def _parse_item(self, n: int, item: Any, source: str) -> _Entry:
        where = f"{source}: item {n}"
        if not isinstance(item, dict):
            raise SubmissionError(f"{where} must be an object with instr_id and trajectory, not {type(item).__name__}")
        if "instr_id" not in item:
            raise SubmissionError(f"{where} has no 'instr_id'")
        instr_id = item["instr_id"]
        if not isinstance(instr_id, str):
            raise SubmissionError(f"{where}: instr_id must be a string like '{_ID_FORMS[self.task]}', got {instr_id!r}")
        if not _ID_PATTERNS[self.task].match(instr_id):
            raise SubmissionError(
                f"{where}: instr_id {instr_id!r} is not a {self.task} instruction id "
                f"of the form '{_ID_FORMS[self.task]}'"
            )
        where = f"{source}: item {n} (instr_id {instr_id!r})"
        if "trajectory" not in item:
            raise SubmissionError(f"{where} has no 'trajectory'")
        traj = item["trajectory"]
        if not isinstance(traj, (list, tuple)) or not traj:
            raise SubmissionError(f"{where}: trajectory must be a non-empty list of [viewpoint, heading, elevation]")
        vps: list[str] = []
        for k, step in enumerate(traj):
            if (
                not isinstance(step, (list, tuple))
                or len(step) != 3
                or not isinstance(step[0], str)
                or not _is_number(step[1])
                or not _is_number(step[2])
            ):
                raise SubmissionError(
                    f"{where}: trajectory entry {k} must be [viewpoint (string), heading (number), "
                    f"elevation (number)], got {step!r}"
                )
            vps.append(step[0])
        pred_obj: int | None = None
        if self.task == "reverie":
            if "predObjId" not in item:
                raise SubmissionError(f"{where} has no 'predObjId' (REVERIE needs the id of the object picked)")
            if not _is_int(item["predObjId"]):
                raise SubmissionError(f"{where}: predObjId must be an integer, got {item['predObjId']!r}")
            pred_obj = int(item["predObjId"])
        return _Entry(instr_id, vps, pred_obj)

    def _check_trajectory(self, n: int, entry: _Entry, source: str) -> None:
        ep = self.episodes[entry.instr_id]
        where = f"{source}: item {n} (instr_id {entry.instr_id!r})"
        house = self.house(ep.scan)
        for k, vp in enumerate(entry.viewpoints):
            if vp not in house:
                raise SubmissionError(
                    f"{where}: trajectory entry {k} has viewpoint {vp!r}, which is not in scan {ep.scan}"
                )
        if entry.viewpoints[0] != ep.start:
            raise SubmissionError(
                f"{where}: trajectory starts at {entry.viewpoints[0]!r}, not at the episode's start {ep.start!r}"
            )
        if self.check_edges:
            for k, (a, b) in enumerate(zip(entry.viewpoints[:-1], entry.viewpoints[1:]), start=1):
                if a != b and not house.is_neighbor(a, b):
                    raise SubmissionError(
                        f"{where}: trajectory entry {k} jumps from {a!r} to {b!r}, which are not "
                        f"neighbours in scan {ep.scan} (each step must stay or move along one edge)"
                    )

    # -- scoring -----------------------------------------------------------------------------------
    def _score_entry(self, entry: _Entry) -> dict[str, float]:
        ep = self.episodes[entry.instr_id]
        house = self.house(ep.scan)
        pred = M.collapse_repeats(entry.viewpoints) if self.collapse_repeats else entry.viewpoints
        if self.task == "r2r":
            return M.r2r_episode_metrics(pred, ep.path, house.distance, spl_convention=self.spl_convention)
        return M.reverie_episode_metrics(
            pred,
            ep.path,
            ep.obj_id if ep.obj_id is not None else "",
            entry.pred_obj,
            house.distance,
            lambda vp: self.visible_objects(ep.scan, vp),
            spl_convention=self.spl_convention,
        )

    def visible_objects(self, scan: str, vp: str) -> frozenset[str]:
        """Ids (strings) of the objects visible from ``vp``: its BBox entries with non-empty ``visible_pos``.

        Files are read lazily and cached.  A viewpoint without a BBox file sees nothing (and is
        recorded in the report's ``missing_bbox``).
        """
        key = (scan, vp)
        if key in self._no_bbox:
            self._missing_bbox.add(f"{scan}_{vp}")
        if key in self._visible:
            return self._visible[key]
        seen = visible_objects_in_file(self._bbox_path(scan, vp), vp)
        if seen is None:
            self._no_bbox.add(key)
            self._missing_bbox.add(f"{scan}_{vp}")
            seen = frozenset()
        self._visible[key] = seen
        return seen

    def _bbox_path(self, scan: str, vp: str) -> Path:
        return bbox_path(self.data_dir, scan, vp)
