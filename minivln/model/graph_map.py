"""The agent's per-episode topological map, exactly as DUET's navigation agent keeps it.

DUET (``cshizhe/VLN-DUET``, ``map_nav_src``) builds, per episode and per sample, a graph of the
nodes it has seen:

* **visited** nodes (the agent stood there and ran the panorama encoder on them) and
* **ghost** nodes (navigable neighbours of visited nodes that it has not been to yet).

Edges join each visited node to its navigable neighbours, weighted by Euclidean length.
Shortest distances are maintained by an *incremental* Floyd relaxation: every time a node is
visited, all known pairs are relaxed through that node only (pairs never joined keep a huge
default distance).  This module reproduces that bookkeeping number for number, including the
float32 casts of the reference, so that the inputs it builds equal the reference inputs.

Node ids may be any hashable (viewpoint strings in Matterport3D, small ints in the fixture).
``None`` is reserved for the [stop] slot.

Units: positions in metres (x, y, z with z up), angles in radians, simulator heading convention
(measured from +y towards +x).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Hashable, Iterable, Sequence

import numpy as np
import torch

from minivln.geometry import HEADINGS_PER_LEVEL

NodeId = Hashable

#: Distances in the node position features are divided by this (metres).
MAX_DIST = 30.0
#: Hop counts in the node position features are divided by this.
MAX_STEP = 10.0
#: Distance of a pair the agent's graph has never connected (the reference's default).
UNKNOWN_DIST = 95959595.0
#: Image size (height, width) in pixels that object boxes are normalised by.
BOX_IMAGE_SIZE = (480.0, 640.0)


# --------------------------------------------------------------------------------- observations


@dataclass
class Candidate:
    """A navigable neighbour of the current node, as the environment reports it.

    Directions may be given absolute (``heading``/``elevation``, simulator convention) or relative
    to the agent's *discretised* current view (``rel_heading``/``rel_elevation``, what the
    reference stores in its candidate angle feature); when both are given the relative ones win.
    """

    viewpoint: NodeId
    point_id: int  # view index 0..35 in which the neighbour is seen
    position: np.ndarray  # (3,) x, y, z
    heading: float | None = None
    elevation: float | None = None
    rel_heading: float | None = None
    rel_elevation: float | None = None
    distance: float | None = None  # informative only; edge lengths come from the positions

    def relative_angles(self, view_index: int) -> tuple[float, float]:
        """(heading, elevation) of the neighbour minus the discretised heading/elevation of
        ``view_index`` (the agent's current view)."""
        if self.rel_heading is not None and self.rel_elevation is not None:
            return float(self.rel_heading), float(self.rel_elevation)
        if self.heading is None or self.elevation is None:
            raise ValueError(f"candidate {self.viewpoint!r} has neither absolute nor relative angles")
        base_h, base_e = view_direction(view_index)
        return float(self.heading) - base_h, float(self.elevation) - base_e


@dataclass
class NodeObservation:
    """What the agent sees at one node (one sample, one step).

    ``view_features`` holds the image features of the 36 discretised views (no angle part).
    Objects (REVERIE) are optional and come as VLN-DUET's REVERIE observation has them (its
    ``ObjectFeatureDB.get_object_feature``; build them with :func:`object_location_fts`):
    ``obj_img_fts`` (O, D_obj), ``obj_ang_fts`` (O, 4) the angle feature of each object's
    direction relative to the agent, ``obj_box_fts`` (O, 3) = (h/480, w/640, product) and
    ``obj_ids`` (O ids).  ``obj_img_fts`` None = no object tokens at all (R2R).
    """

    viewpoint: NodeId
    view_index: int
    heading: float
    elevation: float
    position: np.ndarray
    view_features: np.ndarray  # (36, D) float32
    candidates: list[Candidate]
    obj_img_fts: np.ndarray | None = None  # (O, D_obj) float32
    obj_ang_fts: np.ndarray | None = None  # (O, 4) float32 [sin h, cos h, sin e, cos e]
    obj_box_fts: np.ndarray | None = None  # (O, 3) float32
    obj_ids: list[Any] = field(default_factory=list)

    @property
    def num_objects(self) -> int:
        return 0 if self.obj_img_fts is None else int(len(self.obj_img_fts))


# ------------------------------------------------------------------------------------ geometry


def view_direction(view_index: int) -> tuple[float, float]:
    """(heading, elevation) of discretised view ``view_index`` (reference formula)."""
    return (view_index % HEADINGS_PER_LEVEL) * math.radians(30), (
        view_index // HEADINGS_PER_LEVEL - 1
    ) * math.radians(30)


def position_distance(a: Sequence[float], b: Sequence[float]) -> float:
    """Euclidean distance between two positions (float64, reference formula)."""
    dx, dy, dz = b[0] - a[0], b[1] - a[1], b[2] - a[2]
    return float(np.sqrt(dx**2 + dy**2 + dz**2))


def relative_direction(
    a: Sequence[float], b: Sequence[float], base_heading: float = 0.0, base_elevation: float = 0.0
) -> tuple[float, float, float]:
    """Heading and elevation of the line a→b minus a base direction, and its length.

    Reference formula: heading = asin(dx / dxy), mirrored to pi - heading when b lies behind a
    on the y axis; elevation = asin(dz / dist); both lengths floored at 1e-8 (so a→a gives
    heading 0, elevation 0, length 1e-8).
    """
    dx, dy, dz = b[0] - a[0], b[1] - a[1], b[2] - a[2]
    xy_dist = max(np.sqrt(dx**2 + dy**2), 1e-8)
    xyz_dist = max(np.sqrt(dx**2 + dy**2 + dz**2), 1e-8)
    heading = np.arcsin(dx / xy_dist)
    if b[1] < a[1]:
        heading = np.pi - heading
    heading -= base_heading
    elevation = np.arcsin(dz / xyz_dist) - base_elevation
    return float(heading), float(elevation), float(xyz_dist)


def relative_directions(
    a: Sequence[float], b: np.ndarray, base_heading: float = 0.0, base_elevation: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`relative_direction` from ``a`` to each row of ``b`` (n, 3) at once: (headings,
    elevations, lengths), float64 arrays equal bit for bit to the one-pair function (the squares
    are taken with ``pow``, as the scalar ``x**2`` of numpy does, not ``x * x``)."""
    b = np.asarray(b, dtype=np.float64).reshape(-1, 3)
    dx, dy, dz = b[:, 0] - a[0], b[:, 1] - a[1], b[:, 2] - a[2]
    sq_x, sq_y, sq_z = np.float_power(dx, 2.0), np.float_power(dy, 2.0), np.float_power(dz, 2.0)
    xy_dist = np.maximum(np.sqrt(sq_x + sq_y), 1e-8)
    xyz_dist = np.maximum(np.sqrt(sq_x + sq_y + sq_z), 1e-8)
    heading = np.arcsin(dx / xy_dist)
    heading = np.where(b[:, 1] < a[1], np.pi - heading, heading)
    heading = heading - base_heading
    elevation = np.arcsin(dz / xyz_dist) - base_elevation
    return heading, elevation, xyz_dist


def angle_features(headings: np.ndarray, elevations: np.ndarray, angle_feat_size: int = 4) -> np.ndarray:
    """(n, angle_feat_size) float32 rows [sin h, cos h, sin e, cos e] tiled; the angles are cast
    to float32 *before* sin/cos, as the reference does for node position features."""
    h = np.asarray(headings, dtype=np.float32)
    e = np.asarray(elevations, dtype=np.float32)
    fts = np.vstack([np.sin(h), np.cos(h), np.sin(e), np.cos(e)]).transpose().astype(np.float32)
    repeats = angle_feat_size // 4
    return np.concatenate([fts] * repeats, 1) if repeats > 1 else fts


def direction_angle_feature(heading: float, elevation: float, angle_feat_size: int = 4) -> np.ndarray:
    """Angle feature of one direction computed in float64 then cast (the environment's formula,
    used for view and candidate tokens)."""
    base = [math.sin(heading), math.cos(heading), math.sin(elevation), math.cos(elevation)]
    return np.array(base * (angle_feat_size // 4), dtype=np.float32)


def object_location_fts(
    directions: np.ndarray, sizes: np.ndarray, base_heading: float, base_elevation: float
) -> tuple[np.ndarray, np.ndarray]:
    """Objects' (angle features (O, 4), box features (O, 3)), float32, as VLN-DUET's
    ``ObjectFeatureDB.get_object_feature`` computes them: the angle feature of each object's
    (heading, elevation) minus the base direction, computed in float64 then cast; the box feature
    (h/480, w/640, their product in float32) from ``sizes`` rows (width, height) in pixels."""
    dirs = np.asarray(directions, dtype=np.float64).reshape(-1, 2)
    sizes = np.asarray(sizes).reshape(-1, 2)
    ang = np.zeros((len(dirs), 4), dtype=np.float32)
    box = np.zeros((len(dirs), 3), dtype=np.float32)
    for k, (heading, elevation) in enumerate(dirs):
        ang[k] = direction_angle_feature(heading - base_heading, elevation - base_elevation)
        width, height = sizes[k]
        box[k, :2] = [height / BOX_IMAGE_SIZE[0], width / BOX_IMAGE_SIZE[1]]
        box[k, 2] = box[k, 0] * box[k, 1]
    return ang, box


# ------------------------------------------------------------------------------ shortest paths


class FloydGraph:
    """Shortest paths maintained by relaxing through each newly visited node only.

    ``distance`` of an unknown pair is :data:`UNKNOWN_DIST`; of a node to itself 0.
    ``path(x, y)`` lists the nodes after ``x`` up to and including ``y``.

    The distances live in a dense float64 matrix over the nodes in order of first appearance (and
    the relay node of each pair in an index matrix, -1 = direct edge or unknown pair), so that a
    relaxation is a few array operations and :meth:`distances` slices the matrix; the numbers are
    those of the reference's pair-by-pair loop (see :meth:`update`).
    """

    def __init__(self) -> None:
        self._index: dict[NodeId, int] = {}  # node -> row, in order of first appearance
        self._names: list[NodeId] = []
        self._dist = np.full((16, 16), UNKNOWN_DIST, dtype=np.float64)  # [i, i] stays unknown, as upstream
        self._via = np.full((16, 16), -1, dtype=np.int64)
        self._visited: set[NodeId] = set()

    def _row(self, x: NodeId) -> int:
        """The row of ``x``, added (with unknown distances) on first sight."""
        i = self._index.get(x)
        if i is None:
            i = len(self._names)
            if i == len(self._dist):
                size = 2 * i
                dist = np.full((size, size), UNKNOWN_DIST, dtype=np.float64)
                via = np.full((size, size), -1, dtype=np.int64)
                dist[:i, :i], via[:i, :i] = self._dist, self._via
                self._dist, self._via = dist, via
            self._index[x] = i
            self._names.append(x)
        return i

    def _get(self, x: NodeId, y: NodeId) -> float:
        i, j = self._index.get(x), self._index.get(y)
        return UNKNOWN_DIST if i is None or j is None else float(self._dist[i, j])

    @property
    def nodes(self) -> list[NodeId]:
        return list(self._names)

    def distance(self, x: NodeId, y: NodeId) -> float:
        return 0.0 if x == y else self._get(x, y)

    def distances(self, xs: Sequence[NodeId], ys: Sequence[NodeId]) -> np.ndarray:
        """(len(xs), len(ys)) float64 :meth:`distance` of every pair (0 where x == y); every node
        must be known."""
        rows = np.fromiter((self._index[x] for x in xs), dtype=np.int64, count=len(xs))
        cols = np.fromiter((self._index[y] for y in ys), dtype=np.int64, count=len(ys))
        out = self._dist[rows[:, None], cols[None, :]]
        out[rows[:, None] == cols[None, :]] = 0.0
        return out

    def add_edge(self, x: NodeId, y: NodeId, dist: float) -> None:
        """Join x and y with an edge of length ``dist`` if shorter than what is known."""
        i, j = self._row(x), self._row(y)
        if dist < self._dist[i, j]:
            self._dist[i, j] = self._dist[j, i] = dist
            self._via[i, j] = self._via[j, i] = -1

    def update(self, k: NodeId) -> None:
        """Relax every known pair through ``k`` and mark ``k`` visited.

        The reference relaxes pair after pair in place, but row and column ``k`` cannot change
        while it does (``d(k, k)`` is the unknown distance, so ``d(x, k) + d(k, k)`` never beats
        ``d(x, k)``), so relaxing every pair at once against the old matrix gives the same numbers;
        the matrix stays symmetric (``a + b == b + a``)."""
        kk = self._row(k)
        n = len(self._names)
        dist, via = self._dist[:n, :n], self._via[:n, :n]
        through = dist[:, kk, None] + dist[None, kk, :]
        better = through < dist
        np.fill_diagonal(better, False)
        dist[better] = through[better]
        via[better] = kk
        self._visited.add(k)

    def visited(self, k: NodeId) -> bool:
        return k in self._visited

    def path(self, x: NodeId, y: NodeId) -> list[NodeId]:
        if x == y:
            return []
        i, j = self._index.get(x), self._index.get(y)
        k = -1 if i is None or j is None else int(self._via[i, j])
        if k < 0:  # direct edge (or an unknown pair: the reference answers [y] too)
            return [y]
        relay = self._names[k]
        return self.path(x, relay) + self.path(relay, y)

    def hops(self, x: NodeId, y: NodeId) -> int:
        """``len(path(x, y))`` without building the path."""
        if x == y:
            return 0
        i, j = self._index.get(x), self._index.get(y)
        k = -1 if i is None or j is None else int(self._via[i, j])
        if k < 0:
            return 1
        relay = self._names[k]
        return self.hops(x, relay) + self.hops(relay, y)


# ------------------------------------------------------------------------------------- the map


@dataclass
class StopRecord:
    """What the agent recorded at a node when it last stood there."""

    stop_prob: float
    object_id: Any = None  # REVERIE: arg-max object of that step


@dataclass
class Move:
    """A teleport along the agent's own graph: ``path`` excludes the node it leaves from."""

    target: NodeId
    path: list[NodeId]
    view_index: int  # the view in which ``target`` was seen from the previous node on the path
    heading: float
    elevation: float


class GraphMap:
    """One sample's map for one episode (the reference's ``GraphMap``)."""

    def __init__(self, start: NodeId) -> None:
        self.start: NodeId = start
        self.positions: dict[NodeId, np.ndarray] = {}  # insertion order = order of first sighting
        self.graph = FloydGraph()
        self.node_embeds: dict[NodeId, tuple[torch.Tensor, int]] = {}  # (sum, count)
        self.stop_records: dict[NodeId, StopRecord] = {}
        self.step_ids: dict[NodeId, int] = {}
        # view index in which each neighbour was seen from a visited node
        self.cand_views: dict[NodeId, dict[NodeId, int]] = {}

    # ---------------------------------------------------------------- building

    def update_graph(self, obs: NodeObservation) -> None:
        """Add the current node, its candidates and their edges; relax through the current node."""
        vp = obs.viewpoint
        self.positions[vp] = np.asarray(obs.position, dtype=np.float64)
        views = self.cand_views.setdefault(vp, {})
        for cand in obs.candidates:
            pos = np.asarray(cand.position, dtype=np.float64)
            self.positions[cand.viewpoint] = pos
            self.graph.add_edge(vp, cand.viewpoint, position_distance(self.positions[vp], pos))
            views[cand.viewpoint] = int(cand.point_id)
        self.graph.update(vp)

    def set_step(self, vp: NodeId, t: int) -> None:
        """The agent occupies ``vp`` at (0-based) step ``t``."""
        self.step_ids[vp] = t + 1

    def update_node_embed(self, vp: NodeId, embed: torch.Tensor, rewrite: bool = False) -> None:
        """Set (``rewrite``) or accumulate a node feature (running sum and count)."""
        if rewrite or vp not in self.node_embeds:
            self.node_embeds[vp] = (embed, 1)
        else:
            total, count = self.node_embeds[vp]
            self.node_embeds[vp] = (total + embed, count + 1)

    def update_from_panorama(
        self,
        vp: NodeId,
        cand_vpids: Sequence[NodeId],
        pano_embeds: torch.Tensor,
        avg_embed: torch.Tensor,
    ) -> None:
        """After the panorama encoder ran at ``vp``: the current node's feature becomes the masked
        mean ``avg_embed``; every candidate not yet visited accumulates its view output
        ``pano_embeds[j]`` (row j = candidate j)."""
        self.update_node_embed(vp, avg_embed, rewrite=True)
        for j, cand in enumerate(cand_vpids):
            if not self.graph.visited(cand):
                self.update_node_embed(cand, pano_embeds[j])

    def record_stop(self, vp: NodeId, stop_prob: float, object_id: Any = None) -> None:
        """Remember softmax(fused)[0] (and REVERIE's arg-max object) at ``vp``; last value kept."""
        self.stop_records[vp] = StopRecord(float(stop_prob), object_id)

    # ---------------------------------------------------------------- queries

    def visited(self, vp: NodeId) -> bool:
        return self.graph.visited(vp)

    def node_embed(self, vp: NodeId) -> torch.Tensor:
        """The node's feature: the mean of what was accumulated (a feature seen once is itself:
        ``x / 1`` is ``x`` exactly, in value and in gradient, so no division is run for it)."""
        total, count = self.node_embeds[vp]
        return total if count == 1 else total / count

    @property
    def visited_nodes(self) -> list[NodeId]:
        return [vp for vp in self.positions if self.graph.visited(vp)]

    @property
    def ghost_nodes(self) -> list[NodeId]:
        return [vp for vp in self.positions if not self.graph.visited(vp)]

    def slots(
        self, current: NodeId, *, enc_full_graph: bool = True, act_visited_nodes: bool = False
    ) -> tuple[list[NodeId | None], list[bool]]:
        """Global slots ``[None] + visited + ghosts`` (each in order of first sighting) and the
        per-slot visited mask.

        With ``act_visited_nodes`` only the current node counts as "visited" (the others may be
        chosen again); without ``enc_full_graph`` only [stop] and the ghosts are encoded.
        """
        if act_visited_nodes:
            visited = [vp for vp in self.positions if vp == current]
            ghosts = [vp for vp in self.positions if vp != current]
        else:
            visited, ghosts = self.visited_nodes, self.ghost_nodes
        if enc_full_graph:
            vpids: list[NodeId | None] = [None] + visited + ghosts
            mask = [False] + [True] * len(visited) + [False] * len(ghosts)
        else:
            vpids = [None] + ghosts
            mask = [False] * len(vpids)
        return vpids, mask

    def num_ghosts(self, current: NodeId, act_visited_nodes: bool = False) -> int:
        if act_visited_nodes:
            return sum(1 for vp in self.positions if vp != current)
        return len(self.ghost_nodes)

    def pos_fts(
        self,
        current: NodeId,
        vpids: Iterable[NodeId | None],
        heading: float,
        elevation: float,
        angle_feat_size: int = 4,
    ) -> np.ndarray:
        """(n, angle_feat_size + 3) float32 position features of ``vpids`` relative to the current
        node and heading/elevation; ``None`` ([stop]) gives angles 0 and distances 0."""
        vpids = list(vpids)
        nodes = [k for k, vp in enumerate(vpids) if vp is not None]
        known = [vpids[k] for k in nodes]
        angles = np.zeros((len(vpids), 2), dtype=np.float64)
        dists = np.zeros((len(vpids), 3), dtype=np.float64)
        if known:
            h, e, d = relative_directions(
                self.positions[current], np.stack([self.positions[vp] for vp in known]), heading, elevation
            )
            angles[nodes, 0], angles[nodes, 1] = h, e
            dists[nodes, 0] = d / MAX_DIST
            dists[nodes, 1] = self.graph.distances([current], known)[0] / MAX_DIST
            dists[nodes, 2] = np.array([self.graph.hops(current, vp) for vp in known], dtype=np.float64) / MAX_STEP
        ang = angles.astype(np.float32)
        dst = dists.astype(np.float32)
        return np.concatenate([angle_features(ang[:, 0], ang[:, 1], angle_feat_size), dst], 1)

    def pair_dists(self, vpids: Sequence[NodeId | None]) -> np.ndarray:
        """(n, n) float32 metric shortest distances on the agent's graph; [stop] rows/cols 0."""
        n = len(vpids)
        out = np.zeros((n, n), dtype=np.float32)
        nodes = [k for k in range(1, n) if vpids[k] is not None]
        if nodes:
            known = [vpids[k] for k in nodes]
            out[np.ix_(nodes, nodes)] = self.graph.distances(known, known)
        return out

    def path(self, x: NodeId, y: NodeId) -> list[NodeId]:
        return self.graph.path(x, y)

    # ---------------------------------------------------------------- acting

    def plan_move(self, current: NodeId, target: NodeId) -> Move:
        """Teleport from ``current`` to ``target`` along the agent's graph; the agent then faces
        the view in which ``target`` was seen from the previous node of that path."""
        path = self.graph.path(current, target)
        if not path:
            raise ValueError(f"cannot move from {current!r} to itself")
        prev = current if len(path) == 1 else path[-2]
        try:
            view = self.cand_views[prev][target]
        except KeyError:
            raise ValueError(f"{target!r} was never seen as a candidate of {prev!r}") from None
        heading, elevation = view_direction(view)
        return Move(target, path, view, heading, elevation)

    def best_stop(self) -> NodeId | None:
        """The node with the highest recorded STOP probability (first recorded wins ties)."""
        best, best_prob = None, -math.inf
        for vp, rec in self.stop_records.items():
            if rec.stop_prob > best_prob:
                best, best_prob = vp, rec.stop_prob
        return best

