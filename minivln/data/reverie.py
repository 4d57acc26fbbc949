"""REVERIE goals: the viewpoints from which the target object is visible.

``METRICS.md`` (REVERIE metrics) defines success by visibility, not by a radius around the annotated
goal: an object counts as visible from a viewpoint when that viewpoint's ``BBox/<scan>_<vp>.json``
lists it with a non-empty ``visible_pos``; success = the target is visible from the final viewpoint.
VLN-DUET's REVERIE environment keeps the same set per episode (``gt_end_vps``, from ``obj2vps``):
its object-grounding loss applies at those viewpoints, and its ``--multi_endpoints`` training option
draws the episode's goal among them.

This module is the one BBox visibility reader of the project: the :class:`Evaluator` scores with
:func:`read_visible_objects`, and fine-tuning builds its goal sets with :class:`ReverieGoals`.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import replace
from pathlib import Path
from typing import Collection, Iterable, Mapping

from minivln.data.datasets import Episode
from minivln.data.graph import Graphs, House
from minivln.data.words import content_words
from minivln.paths import DataError, resolve_data_dir


def bbox_path(data_dir: str | os.PathLike, scan: str, vp: str) -> Path:
    """``DATA/REVERIE/BBox/<scan>_<vp>.json``."""
    return Path(data_dir) / "REVERIE" / "BBox" / f"{scan}_{vp}.json"


def read_visible_objects(data_dir: str | os.PathLike, scan: str, vp: str) -> frozenset[str] | None:
    """Ids (strings) of the objects visible from ``vp``: its BBox entries with a non-empty
    ``visible_pos``.  ``None`` when the viewpoint has no BBox file; a malformed file raises a
    :class:`DataError` naming it."""
    return visible_objects_in_file(bbox_path(data_dir, scan, vp), vp)


def visible_objects_in_file(path: str | os.PathLike, vp: str) -> frozenset[str] | None:
    """:func:`read_visible_objects` for an explicit BBox file ``path`` of viewpoint ``vp``."""
    names = visible_names_in_file(path, vp)
    return None if names is None else frozenset(names)


def visible_names_in_file(path: str | os.PathLike, vp: str) -> dict[str, str] | None:
    """``{object id: name}`` of the objects visible from ``vp`` in BBox file ``path`` (names as
    annotated, e.g. ``picture#frame``); ``None`` when the file does not exist."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        objects = data.get(vp, {})
        return {str(obj): str(info.get("name", "")) for obj, info in objects.items() if info.get("visible_pos")}
    except (json.JSONDecodeError, AttributeError, TypeError) as exc:
        raise DataError(f"BBox file {path} is malformed: {exc!r}") from exc


def name_overlap_pick(instruction: str, names: Mapping[str, str]) -> int | None:
    """The training-free REVERIE object picker: of the visible objects ``names`` (``{id: name}``), the
    one whose name shares the most content words (:func:`~minivln.data.words.content_words`) with the
    instruction; ties, no overlap included, go to the smallest id; ``None`` when nothing is visible."""
    if not names:
        return None
    words = content_words(instruction)
    return min((-len(words & content_words(name)), int(obj)) for obj, name in names.items())[1]


def with_name_overlap_objects(submission: list[dict], episodes: Iterable[Episode],
                              data_dir: str | os.PathLike | None = None) -> list[dict]:
    """A REVERIE submission with each ``predObjId`` replaced by :func:`name_overlap_pick` at the
    trajectory's final viewpoint (-1 where nothing is visible there); trajectories are unchanged.
    The reference row of the REVERIE tables: how far the same trajectories get with a word match
    for grounding instead of the agent's own choice."""
    root = resolve_data_dir(data_dir)
    by_id = {ep.instr_id: ep for ep in episodes}
    out = []
    for item in submission:
        ep = by_id.get(item["instr_id"])
        if ep is None:
            raise DataError(f"submission item {item['instr_id']!r} is no instruction of the episodes given")
        vp = item["trajectory"][-1][0]
        pick = name_overlap_pick(ep.instruction, visible_names_in_file(bbox_path(root, ep.scan, vp), vp) or {})
        out.append({**item, "predObjId": -1 if pick is None else pick})
    return out


class ReverieGoals:
    """Goal viewpoints of REVERIE targets, read lazily from the BBox files and cached per house.

    ``goal_viewpoints(scan, obj_id)`` is every *included* viewpoint of the house from which the object
    is visible (the agent cannot stand anywhere else).  ``episode_goals(ep)`` is that set for the
    episode's target, or ``{ep.goal}`` (the annotated goal) when the episode has no target or the
    target is visible from nowhere (not the case for any val_unseen item of the release).
    """

    def __init__(self, data_dir: str | os.PathLike | None = None, graphs: Graphs | None = None) -> None:
        self.data_dir = resolve_data_dir(data_dir)
        self.graphs = graphs if graphs is not None else Graphs(self.data_dir)
        self._visible: dict[tuple[str, str], frozenset[str]] = {}
        self._by_object: dict[str, dict[str, frozenset[str]]] = {}

    def visible_objects(self, scan: str, vp: str) -> frozenset[str]:
        """Ids (strings) of the objects visible from ``vp`` (nothing without a BBox file)."""
        key = (scan, vp)
        hit = self._visible.get(key)
        if hit is None:
            hit = self._visible[key] = read_visible_objects(self.data_dir, scan, vp) or frozenset()
        return hit

    def goal_viewpoints(self, scan: str, obj_id: int | str) -> frozenset[str]:
        """Included viewpoints of ``scan`` from which object ``obj_id`` is visible (may be empty)."""
        table = self._by_object.get(scan)
        if table is None:
            sets: dict[str, set[str]] = {}
            for vp in self.graphs[scan].vp_ids:
                for obj in self.visible_objects(scan, vp):
                    sets.setdefault(obj, set()).add(vp)
            table = self._by_object[scan] = {obj: frozenset(vps) for obj, vps in sets.items()}
        return table.get(str(obj_id), frozenset())

    def episode_goals(self, ep: Episode) -> frozenset[str]:
        """The goal set of an episode (see the class docstring)."""
        if ep.obj_id is None:
            return frozenset({ep.goal})
        return self.goal_viewpoints(ep.scan, ep.obj_id) or frozenset({ep.goal})

    def is_goal(self, ep: Episode, vp: str) -> bool:
        """Whether the episode's target is visible from ``vp`` (REVERIE success at ``vp``)."""
        return ep.obj_id is not None and str(ep.obj_id) in self.visible_objects(ep.scan, vp)


def nearest_goal(house: House, vp: str, goals: Collection[str]) -> str:
    """The goal viewpoint nearest to ``vp`` by graph distance (ties: smallest viewpoint id)."""
    if not goals:
        raise ValueError("nearest_goal: empty goal set")
    best, best_d = None, math.inf
    for g in sorted(goals):
        d = house.distance(vp, g)
        if d < best_d:
            best, best_d = g, d
    if best is None:
        raise ValueError(f"no goal viewpoint is reachable from {vp} in scan {house.scan}")
    return best


def with_random_endpoint(ep: Episode, goals: Collection[str], house: House, rng: random.Random) -> Episode:
    """VLN-DUET's ``--multi_endpoints``: the episode with its goal replaced by a goal viewpoint drawn
    uniformly from ``goals`` (those reachable from the start, in sorted order) and its path by a
    shortest path from the start to it.  Unchanged when no goal is reachable."""
    reachable = [g for g in sorted(goals) if math.isfinite(house.distance(ep.start, g))]
    if not reachable:
        return ep
    end = reachable[rng.randrange(len(reachable))]
    return replace(ep, path=tuple(house.shortest_path(ep.start, end)))
