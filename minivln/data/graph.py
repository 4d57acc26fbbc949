"""Matterport3D navigation graphs: one ``House`` per scan, with all-pairs shortest paths.

A connectivity file is a JSON list, one entry per viewpoint (``image_id``, ``pose``, ``included``,
``visible``, ``unobstructed``, ``height``; ``visible`` and ``height`` may be absent, as DUET's loader
reads neither: visibility is then the navigation edges, height 0).  As in the official evaluators, the graph has the
``included`` viewpoints as nodes and an undirected edge wherever ``unobstructed`` says so (in
either direction) between two included viewpoints, weighted by the straight-line distance between
the camera positions (pose elements 3, 7, 11).  Distances are shortest paths (:func:`shortest_paths`,
Dijkstra from every viewpoint at once in NumPy).

Everything derived is cached on disk per house (``$MINIVLN_CACHE/graphs``), keyed by the file's
path, size and modification time, so that building all 90 houses happens once.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from tqdm import tqdm

from minivln.paths import (
    DataError,
    WriteError,
    atomic_write_bytes,
    cache_dir,
    resolve_data_dir,
)

_CACHE_VERSION = 1


@dataclass
class House:
    """The navigation graph of one scan (only ``included`` viewpoints)."""

    scan: str
    vp_ids: list[str]
    positions: np.ndarray  # (N, 3) float64, metres, z up
    heights: np.ndarray  # (N,) camera height above the floor
    adjacency: np.ndarray  # (N, N) bool, undirected navigation edges
    visible: np.ndarray  # (N, N) bool, the connectivity ``visible`` relation (symmetrised)
    dist: np.ndarray  # (N, N) float64 shortest-path distances (inf when unreachable)
    pred: np.ndarray  # (N, N) int32 predecessor on the shortest path from row to column (-9999 none)
    index: dict[str, int] = field(init=False, repr=False)
    _neighbors: list[list[int]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.index = {vp: i for i, vp in enumerate(self.vp_ids)}
        self._neighbors = [np.flatnonzero(row).tolist() for row in self.adjacency]

    # -- lookups -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.vp_ids)

    def __contains__(self, vp: str) -> bool:
        return vp in self.index

    def idx(self, vp: str) -> int:
        try:
            return self.index[vp]
        except KeyError:
            raise KeyError(f"viewpoint {vp!r} is not an included viewpoint of scan {self.scan}") from None

    def position(self, vp: str) -> np.ndarray:
        return self.positions[self.idx(vp)]

    def neighbors(self, vp: str) -> list[str]:
        """Navigable neighbours of ``vp``, in connectivity-file order."""
        return [self.vp_ids[j] for j in self._neighbors[self.idx(vp)]]

    def is_neighbor(self, a: str, b: str) -> bool:
        return bool(self.adjacency[self.idx(a), self.idx(b)])

    def path_problem(self, path: list[str] | tuple[str, ...]) -> str | None:
        """Why ``path`` is not a walk along this graph's edges (a viewpoint that is not an included
        one, or a step between viewpoints that are not neighbours, a repeat included), else None."""
        for k, vp in enumerate(path):
            if vp not in self.index:
                return f"path[{k}] = {vp!r} is not an included viewpoint of scan {self.scan}"
        for k in range(1, len(path)):
            if not self.is_neighbor(path[k - 1], path[k]):
                return (f"path step {k} ({path[k - 1]!r} -> {path[k]!r}) is not an edge of scan "
                        f"{self.scan}'s navigation graph")
        return None

    def distance(self, a: str, b: str) -> float:
        """Shortest-path distance on the graph (metres)."""
        return float(self.dist[self.idx(a), self.idx(b)])

    def euclidean(self, a: str, b: str) -> float:
        return float(np.linalg.norm(self.position(a) - self.position(b)))

    def shortest_path(self, a: str, b: str) -> list[str]:
        """Viewpoints on a shortest path from ``a`` to ``b``, both ends included."""
        i, j = self.idx(a), self.idx(b)
        if not np.isfinite(self.dist[i, j]):
            raise ValueError(f"{b} is unreachable from {a} in scan {self.scan}")
        path = [j]
        while path[-1] != i:
            path.append(int(self.pred[i, path[-1]]))
        return [self.vp_ids[k] for k in reversed(path)]

    def path_length(self, path: list[str]) -> float:
        """Sum of shortest distances between consecutive viewpoints (0 for repeats)."""
        return float(sum(self.distance(a, b) for a, b in zip(path[:-1], path[1:])))


def _position(entry: dict) -> np.ndarray:
    pose = entry["pose"]
    return np.array([pose[3], pose[7], pose[11]], dtype=np.float64)


def build_house(scan: str, entries: list[dict]) -> House:
    """Build a ``House`` from the parsed connectivity list of ``scan``."""
    try:
        keep = [i for i, e in enumerate(entries) if e["included"]]
        vp_ids = [entries[i]["image_id"] for i in keep]
        pos = np.stack([_position(entries[i]) for i in keep]) if keep else np.zeros((0, 3))
        heights = np.array([float(entries[i].get("height", 0.0)) for i in keep])
        unob = np.array([entries[i]["unobstructed"] for i in keep], dtype=bool)[:, keep]
        # ``visible`` (and ``height``) are not read by DUET's graph loader; a file without them (as
        # generated graphs may be) gets visibility = the navigation edges
        has_vis = all("visible" in entries[i] for i in keep)
        vis = np.array([entries[i]["visible"] for i in keep], dtype=bool)[:, keep] if has_vis else unob.copy()
    except (KeyError, TypeError, IndexError, ValueError) as exc:
        raise DataError(f"connectivity of scan {scan} is malformed: {exc!r}") from exc
    adj = unob | unob.T
    np.fill_diagonal(adj, False)
    vis = vis | vis.T
    np.fill_diagonal(vis, False)
    weights = np.linalg.norm(pos[:, None, :] - pos[None, :, :], axis=-1) * adj
    dist, pred = shortest_paths(weights)
    return House(scan, vp_ids, pos, heights, adj, vis, dist, pred)


def shortest_paths(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All-pairs shortest paths of a symmetric weight matrix (an edge wherever the weight is > 0):
    ``(dist, pred)``, ``dist`` (N, N) float64 (inf when unreachable), ``pred`` (N, N) int32, the
    predecessor of the column on a shortest path from the row (-9999 for none, as scipy's csgraph).

    Dijkstra from every source at once: each round settles, per source, the nearest node not yet
    settled (the lowest index among equal distances) and relaxes its edges; a distance changes only
    when strictly shorter.  Each distance is summed edge by edge from the source, so it is the same
    float as scipy's ``dijkstra`` gives; the predecessors are too wherever shortest paths do not tie
    exactly (every house of the real data and of the toy world; ``tests/test_graph_env.py``)."""
    n = len(weights)
    adj = weights > 0
    width = max(1, int(adj.sum(1).max(initial=0)))
    nbr = np.zeros((n, width), np.int64)  # the neighbours of each node, padded with edges of weight inf
    nbr_w = np.full((n, width), np.inf)
    for i in range(n):
        js = np.flatnonzero(adj[i])
        nbr[i, :len(js)], nbr_w[i, :len(js)] = js, weights[i, js]
    dist = np.full((n, n), np.inf)
    np.fill_diagonal(dist, 0.0)
    pred = np.full((n, n), -9999, np.int32)
    frontier = dist.copy()  # the distances of the nodes not settled yet (inf once settled)
    sources = np.arange(n)
    for _ in range(n):
        u = frontier.argmin(1)
        du = frontier[sources, u]
        live = np.isfinite(du)  # sources with a node left to settle
        if not live.any():
            break
        src, u, du = sources[live], u[live], du[live]
        frontier[src, u] = np.inf
        cols = nbr[u]
        cand = du[:, None] + nbr_w[u]
        rows = np.broadcast_to(src[:, None], cols.shape)
        better = cand < dist[rows, cols]
        rows, cols, cand = rows[better], cols[better], cand[better]
        dist[rows, cols] = frontier[rows, cols] = cand
        pred[rows, cols] = np.broadcast_to(u[:, None], better.shape)[better]
    return dist, pred


def connectivity_file(data_dir: Path, scan: str, extra_dirs: tuple[str, ...] = ()) -> Path:
    """``<scan>_connectivity.json`` in ``data_dir/connectivity``, else in the first of ``extra_dirs``
    (folders of connectivity files in the same format, e.g. ScaleVLN's HM3D/Gibson houses) that has it."""
    dirs = [data_dir / "connectivity"] + [Path(d) for d in extra_dirs]
    for d in dirs:
        path = d / f"{scan}_connectivity.json"
        if path.is_file():
            return path
    where = str(dirs[0] / f"{scan}_connectivity.json") if len(dirs) == 1 else \
        f"{scan}_connectivity.json is in none of {', '.join(str(d) for d in dirs)}"
    raise DataError(f"no connectivity file for scan {scan!r}: {where}" + (" is missing" if len(dirs) == 1 else ""))


def has_connectivity(data_dir: Path, scan: str, extra_dirs: tuple[str, ...] = ()) -> bool:
    dirs = [data_dir / "connectivity"] + [Path(d) for d in extra_dirs]
    return any((d / f"{scan}_connectivity.json").is_file() for d in dirs)


def list_scans(data_dir: str | os.PathLike | None = None) -> list[str]:
    """All scans of the data directory (``scans.txt`` if present, else the connectivity files)."""
    root = resolve_data_dir(data_dir) / "connectivity"
    scans_txt = root / "scans.txt"
    if scans_txt.is_file():
        return [s.strip() for s in scans_txt.read_text().split() if s.strip()]
    scans = sorted(p.name[: -len("_connectivity.json")] for p in root.glob("*_connectivity.json"))
    if not scans:
        raise DataError(f"no connectivity files in {root}")
    return scans


def _cache_key(path: Path) -> str:
    st = path.stat()
    raw = f"{_CACHE_VERSION}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha1(raw.encode()).hexdigest()[:16]


def _save(house: House, path: Path) -> None:
    buf = io.BytesIO()
    np.savez(
        buf,
        vp_ids=np.array(house.vp_ids),
        positions=house.positions,
        heights=house.heights,
        adjacency=house.adjacency,
        visible=house.visible,
        dist=house.dist,
        pred=house.pred,
    )
    atomic_write_bytes(path, buf.getvalue())


def _load(scan: str, path: Path) -> House:
    with np.load(path, allow_pickle=False) as z:
        return House(
            scan,
            [str(v) for v in z["vp_ids"]],
            z["positions"],
            z["heights"],
            z["adjacency"],
            z["visible"],
            z["dist"],
            z["pred"],
        )


def load_house(scan: str, data_dir: str | os.PathLike | None = None, *, use_cache: bool = True,
               extra_dirs: tuple[str | os.PathLike, ...] = ()) -> House:
    """Load (and cache) the graph of ``scan`` (``extra_dirs``: more connectivity folders, searched
    after ``data_dir/connectivity``)."""
    root = resolve_data_dir(data_dir)
    extra = tuple(str(Path(d).resolve()) for d in extra_dirs)
    return _load_house_cached(str(root.resolve()), scan, use_cache, extra)


_cache_warned = False


def _cache_unavailable(exc: WriteError) -> None:
    """The graph cache is an optimisation: a read-only or full cache directory is noted once (one
    line) and the graphs are built from the connectivity files each time."""
    global _cache_warned
    if not _cache_warned:
        _cache_warned = True
        print(f"minivln: note: graph cache disabled: {exc}", file=sys.stderr)


@lru_cache(maxsize=None)
def _load_house_cached(root: str, scan: str, use_cache: bool, extra_dirs: tuple[str, ...] = ()) -> House:
    src = connectivity_file(Path(root), scan, extra_dirs)
    cached = None
    if use_cache:
        try:
            cached = cache_dir("graphs") / f"{scan}-{_cache_key(src)}.npz"
        except WriteError as exc:
            _cache_unavailable(exc)
    if cached is not None and cached.is_file():
        try:
            return _load(scan, cached)
        except (OSError, ValueError, KeyError):
            cached.unlink(missing_ok=True)  # a damaged cache entry is rebuilt
    try:
        entries = json.loads(src.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{src} is not valid JSON: {exc}") from exc
    house = build_house(scan, entries)
    if cached is not None:
        try:
            _save(house, cached)
        except WriteError as exc:
            _cache_unavailable(exc)
    return house


class Graphs:
    """Lazy map scan -> ``House`` for one data directory.

    ``extra_dirs``: more folders of ``<scan>_connectivity.json`` files in the Matterport3D format
    (houses beyond the 90 of ``data_dir/connectivity``, e.g. ScaleVLN's HM3D and Gibson graphs),
    searched in order after it; ``scans()`` lists the data directory's houses only."""

    def __init__(self, data_dir: str | os.PathLike | None = None,
                 extra_dirs: tuple[str | os.PathLike, ...] | list[str] = ()):
        self.data_dir = resolve_data_dir(data_dir)
        self.extra_dirs = tuple(str(Path(d).resolve()) for d in extra_dirs)
        for d in self.extra_dirs:
            if not Path(d).is_dir():
                raise DataError(f"connectivity folder {d} does not exist")
        self._houses: dict[str, House] = {}

    def __getitem__(self, scan: str) -> House:
        house = self._houses.get(scan)
        if house is None:
            house = self._houses[scan] = load_house(scan, self.data_dir, extra_dirs=self.extra_dirs)
        return house

    def has(self, scan: str) -> bool:
        """Whether ``scan`` has a connectivity file (without loading it)."""
        return scan in self._houses or has_connectivity(self.data_dir, scan, self.extra_dirs)

    def where(self) -> str:
        """The connectivity folders searched, for messages."""
        return ", ".join([str(self.data_dir / "connectivity"), *self.extra_dirs])

    def scans(self) -> list[str]:
        return list_scans(self.data_dir)

    def load_all(self, scans: list[str] | None = None, progress: bool = False) -> dict[str, House]:
        scans = scans if scans is not None else self.scans()
        if progress:
            scans = tqdm(scans, desc="graphs", unit="house")
        return {s: self[s] for s in scans}
