"""The toy world: seeded, two-floor houses written in the exact formats of the real releases.

``build_toy_world(DIR)`` writes a complete data directory that the rest of MiniVLN reads like the
real one (``docs/toyworld.md``)::

    DIR/connectivity/<scan>_connectivity.json, scans.txt
    DIR/R2R/R2R_{train,val_seen,val_unseen,test}.json
    DIR/REVERIE/REVERIE_{train,val_seen,val_unseen,test}.json
    DIR/REVERIE/BBox/<scan>_<viewpoint>.json        (every included viewpoint)
    DIR/toyworld.json                               (seed, configuration and counts; not in the releases)

A house is a corridor ("hallway") with rooms on both sides, twice: the ground floor and the floor
above, joined by a U-shaped staircase with viewpoints on the flights and the landing.  Rooms hold a
small grid of viewpoints; every room and hallway viewpoint has an *anchor* object (a piece of
furniture next to it, unique within its room), rooms also have wall, ceiling and small objects.

Instructions are templates filled from the path itself (rooms entered, turns, landmarks passed,
stairs, and the goal's anchor object), so an instruction determines its path: the goal is the only
viewpoint whose room, floor and anchor match what the instruction says.  REVERIE instructions name
the target object's room, floor and name, which together are unique in the house.

Everything is drawn from one ``random.Random(seed)``: the same seed and configuration give
byte-identical files.  The directory is built in a temporary sibling and renamed into place.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from minivln.data.graph import House, build_house
from minivln.geometry import VIEW_ELEVATIONS, VIEW_HEADINGS, direction, wrap_angle
from minivln.paths import check_writable_dir, write_error

TOYWORLD_VERSION = 1
MANIFEST_NAME = "toyworld.json"
SPLITS = ("train", "val_seen", "val_unseen", "test")

# The simulator's camera: 640 x 480 pixels, 60 degrees vertical field of view.
IMAGE_WIDTH, IMAGE_HEIGHT = 640, 480
VFOV = math.radians(60.0)
FOCAL_PX = (IMAGE_HEIGHT / 2) / math.tan(VFOV / 2)

# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToyWorldConfig:
    """Sizes of a toy world.  Path counts are totals per split (paths, not instructions)."""

    n_houses: int = 8
    r2r_train: int = 300
    r2r_val_seen: int = 50
    r2r_val_unseen: int = 50
    r2r_test: int = 30
    reverie_train: int = 300
    reverie_val_seen: int = 50
    reverie_val_unseen: int = 50
    reverie_test: int = 30
    instructions_per_path: int = 3  # R2R; REVERIE paths get 2 or 3 like the release
    min_hops: int = 3
    max_hops: int = 7
    floor_height: float = 3.0  # metres between the two floors
    camera_height: float = 1.5  # camera above the floor
    bbox_radius: float = 3.0  # objects within this distance get a BBox entry
    excluded_per_house: int = 2  # viewpoints with ``included: false``
    max_viewpoints: int = 60  # included viewpoints per house at most (50 or more)

    def validate(self) -> None:
        """Raise ``ValueError`` for sizes the generator cannot honour."""
        self.house_split_sizes()
        if not 1 <= self.min_hops <= self.max_hops:
            raise ValueError(f"need 1 <= min_hops <= max_hops, got {self.min_hops}, {self.max_hops}")
        if self.max_viewpoints < 50:
            raise ValueError("max_viewpoints must be at least 50 (about the smallest house), "
                             f"got {self.max_viewpoints}")
        if self.instructions_per_path < 1:
            raise ValueError("instructions_per_path must be at least 1")

    def n_paths(self, task: str, split: str) -> int:
        """Number of paths asked for ``task`` ("r2r" or "reverie") in ``split``."""
        return int(getattr(self, f"{task}_{split}"))

    def house_split_sizes(self) -> tuple[int, int, int]:
        """(train, val_unseen, test) house counts; val_seen reuses the train houses."""
        n = self.n_houses
        if n < 3:
            raise ValueError(f"a toy world needs at least 3 houses (train, val_unseen, test), got {n}")
        n_test = max(1, round(n / 8))
        n_unseen = max(1, round(n / 4))
        return n - n_test - n_unseen, n_unseen, n_test


# ----------------------------------------------------------------------------------------------
# Vocabulary
# ----------------------------------------------------------------------------------------------

# Per room type: furniture (anchors next to viewpoints), wall objects, small objects (set on a
# surface).  Names are REVERIE-style, words joined with '#'.
CATALOG: dict[str, dict[str, list[str]]] = {
    "kitchen": {
        "furniture": ["oven", "fridge", "sink", "kitchen#counter", "dishwasher", "kitchen#island",
                      "microwave", "trash#can"],
        "wall": ["window", "kitchen#cabinet", "clock"],
        "small": ["cup", "bowl", "kettle", "toaster"],
    },
    "bedroom": {
        "furniture": ["bed", "dresser", "nightstand", "wardrobe", "lamp", "armchair", "bookshelf"],
        "wall": ["window", "picture", "curtain", "mirror"],
        "small": ["pillow", "book", "alarm#clock", "blanket"],
    },
    "bathroom": {
        "furniture": ["toilet", "sink", "shower", "bathtub", "bath#cabinet", "laundry#basket",
                      "towel#rack"],
        "wall": ["mirror", "window"],
        "small": ["towel", "soap", "toothbrush"],
    },
    "living room": {
        "furniture": ["sofa", "coffee#table", "armchair", "tv", "fireplace", "bookshelf", "plant",
                      "piano"],
        "wall": ["picture", "window", "curtain"],
        "small": ["cushion", "vase", "remote", "candle"],
    },
    "dining room": {
        "furniture": ["dining#table", "dining#chair", "cabinet", "plant", "sideboard", "bench",
                      "side#table"],
        "wall": ["picture", "window", "mirror"],
        "small": ["vase", "plate", "candle", "bowl"],
    },
    "office": {
        "furniture": ["desk", "office#chair", "bookshelf", "lamp", "filing#cabinet", "printer",
                      "couch"],
        "wall": ["window", "picture", "clock"],
        "small": ["laptop", "book", "monitor", "phone"],
    },
    "laundry room": {
        "furniture": ["washing#machine", "dryer", "sink", "shelf", "ironing#board",
                      "laundry#basket", "cabinet"],
        "wall": ["window", "cabinet#door"],
        "small": ["towel", "detergent", "bottle"],
    },
    "hallway": {
        "furniture": ["plant", "bench", "side#table", "coat#rack", "statue", "shoe#rack", "chest",
                      "umbrella#stand"],
        "wall": ["picture", "mirror", "window", "clock"],
        "small": ["vase", "basket"],
    },
}
ROOMS_GROUND = ["kitchen", "living room", "dining room", "bathroom", "office", "laundry room"]
ROOMS_UPPER = ["bedroom", "bathroom", "office", "laundry room", "living room"]
SURFACES = {"kitchen#counter", "kitchen#island", "dresser", "nightstand", "coffee#table",
            "dining#table", "desk", "sideboard", "side#table", "shelf", "bath#cabinet", "bookshelf",
            "cabinet", "chest", "dryer", "washing#machine", "bed", "sofa", "armchair", "couch",
            "bench"}

# (width, height, base above the floor) in metres; unknown names get a chair-sized default.
SIZES: dict[str, tuple[float, float, float]] = {
    "oven": (0.7, 0.9, 0.0), "fridge": (0.8, 1.8, 0.0), "sink": (0.6, 0.3, 0.7),
    "kitchen#counter": (2.0, 0.9, 0.0), "dishwasher": (0.6, 0.85, 0.0),
    "kitchen#island": (1.6, 0.9, 0.0), "microwave": (0.5, 0.3, 0.9), "trash#can": (0.4, 0.6, 0.0),
    "bed": (1.6, 0.6, 0.0), "dresser": (1.2, 0.9, 0.0), "nightstand": (0.5, 0.55, 0.0),
    "wardrobe": (1.2, 2.0, 0.0), "lamp": (0.4, 1.5, 0.0), "armchair": (0.8, 0.9, 0.0),
    "bookshelf": (0.9, 1.8, 0.0), "toilet": (0.4, 0.75, 0.0), "shower": (0.9, 2.0, 0.0),
    "bathtub": (1.6, 0.55, 0.0), "bath#cabinet": (0.8, 0.85, 0.0),
    "laundry#basket": (0.5, 0.6, 0.0), "towel#rack": (0.6, 1.0, 0.3), "sofa": (2.0, 0.85, 0.0),
    "coffee#table": (1.0, 0.45, 0.0), "tv": (1.2, 0.7, 0.9), "fireplace": (1.4, 1.1, 0.0),
    "plant": (0.5, 1.2, 0.0), "piano": (1.4, 1.0, 0.0), "dining#table": (1.8, 0.75, 0.0),
    "dining#chair": (0.5, 0.9, 0.0), "cabinet": (1.0, 1.0, 0.0), "sideboard": (1.5, 0.85, 0.0),
    "bench": (1.2, 0.45, 0.0), "side#table": (0.6, 0.65, 0.0), "desk": (1.4, 0.75, 0.0),
    "office#chair": (0.6, 1.0, 0.0), "filing#cabinet": (0.5, 1.1, 0.0), "printer": (0.5, 0.3, 0.7),
    "couch": (1.8, 0.85, 0.0), "washing#machine": (0.6, 0.85, 0.0), "dryer": (0.6, 0.85, 0.0),
    "shelf": (1.0, 1.6, 0.0), "ironing#board": (1.2, 0.9, 0.0), "coat#rack": (0.5, 1.8, 0.0),
    "statue": (0.4, 1.2, 0.0), "shoe#rack": (0.8, 0.5, 0.0), "chest": (1.0, 0.6, 0.0),
    "umbrella#stand": (0.3, 0.6, 0.0), "window": (1.2, 1.3, 0.9), "picture": (0.8, 0.6, 1.3),
    "curtain": (1.4, 2.0, 0.3), "mirror": (0.7, 0.9, 1.1), "clock": (0.35, 0.35, 1.8),
    "kitchen#cabinet": (1.8, 0.8, 1.5), "cabinet#door": (0.8, 0.8, 1.4), "light": (0.5, 0.2, 2.5),
    "staircase#railing": (2.0, 0.9, 0.4), "stair": (1.2, 0.3, 0.0),
}
SMALL_SIZE = (0.25, 0.2)
DEFAULT_SIZE = (0.6, 0.9, 0.0)

WALK_VERBS = ["walk", "go", "head"]
HALL_WORDS = ["hallway", "hall", "corridor"]
STOP_PHRASES = ["stop next to", "wait by", "stop near", "stop beside", "stop in front of"]
UP_PHRASES = ["go up the stairs", "walk up the stairs", "climb the stairs"]
DOWN_PHRASES = ["go down the stairs", "walk down the stairs", "descend the stairs"]
FLOOR_WORDS = [["first floor", "ground floor", "lower level"], ["second floor", "upper floor", "top floor"]]
REVERIE_ACTIONS = {
    "small": ["bring me", "pick up", "grab", "clean"],
    "furniture": ["clean", "dust", "wipe", "check"],
    "wall": ["clean", "dust", "look at"],
    "light": ["turn off", "switch off"],
}

_ALNUM = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def words(name: str) -> str:
    """An object name as plain words: ``coffee#table`` -> ``coffee table``."""
    return name.replace("#", " ")


# ----------------------------------------------------------------------------------------------
# The in-memory world
# ----------------------------------------------------------------------------------------------


@dataclass
class Region:
    """A room, a floor's hallway, or the staircase (axis-aligned rectangle in x, y)."""

    index: int
    kind: str  # "room", "hallway" or "stairs"
    name: str  # room type ("kitchen", ...), "hallway" or "stairs"
    floor: int  # 0 ground, 1 upper (the staircase counts as 0)
    bounds: tuple[float, float, float, float]  # xmin, xmax, ymin, ymax
    floor_z: float


@dataclass
class Door:
    """An opening in the wall between regions ``a`` and ``b``: the wall is the line
    ``x = coord`` (axis "x") or ``y = coord`` (axis "y"); the gap spans ``[lo, hi]`` along it."""

    a: int
    b: int
    axis: str
    coord: float
    lo: float
    hi: float

    def passes(self, p: np.ndarray, q: np.ndarray) -> bool:
        """Whether the segment p -> q (x, y) crosses the wall inside the gap."""
        k = 0 if self.axis == "x" else 1
        dp, dq = p[k] - self.coord, q[k] - self.coord
        if dp * dq > 0 or dp == dq:
            return False
        t = dp / (dp - dq)
        s = p[1 - k] + t * (q[1 - k] - p[1 - k])
        return self.lo <= s <= self.hi


@dataclass
class ToyViewpoint:
    """A panorama location; ``included: false`` ones are written but are not navigable."""

    vp_id: str
    position: np.ndarray  # camera position (x, y, z)
    height: float  # camera height above the floor
    region: int
    yaw: float  # camera heading of the pose
    included: bool = True
    anchor: int | None = None  # object id of the furniture next to it


@dataclass
class ToyObject:
    """An object of a house, as the BBox files list it (plus where it is)."""

    obj_id: int  # unique in the house, 1, 2, ... (the BBox key, as a string)
    name: str
    kind: str  # "furniture", "wall", "small", "light", "fixture"
    region: int
    position: np.ndarray  # centre (x, y, z)
    size: tuple[float, float]  # width, height (metres)
    parent: int | None = None  # the surface a small object stands on


@dataclass
class ToyHouse:
    """One generated house: geometry, semantics, the connectivity entries and the graph."""

    scan: str
    regions: list[Region]
    doors: list[Door]
    viewpoints: list[ToyViewpoint]
    objects: list[ToyObject]
    unobstructed: np.ndarray  # (V, V) bool over all viewpoints, included or not
    visible: np.ndarray  # (V, V) bool
    entries: list[dict] = field(default_factory=list)  # connectivity file contents
    graph: House | None = None
    bboxes: dict[str, dict] = field(default_factory=dict)  # vp_id -> {vp_id: {objId: {...}}}
    vp_index: dict[str, int] = field(default_factory=dict)
    floor_height: float = 3.0

    def vp(self, vp_id: str) -> ToyViewpoint:
        return self.viewpoints[self.vp_index[vp_id]]

    def region_of(self, vp_id: str) -> Region:
        return self.regions[self.vp(vp_id).region]

    def floor_of(self, vp_id: str) -> int:
        """The floor a viewpoint stands on (stair viewpoints: the nearer floor)."""
        v = self.vp(vp_id)
        reg = self.regions[v.region]
        if reg.kind != "stairs":
            return reg.floor
        return int(round((v.position[2] - v.height - reg.floor_z) / self.floor_height))

    def anchor_name(self, vp_id: str) -> str | None:
        a = self.vp(vp_id).anchor
        return None if a is None else self.object(a).name

    def object(self, obj_id: int) -> ToyObject:
        """The object with id ``obj_id`` (ids are 1, 2, ... in ``objects`` order)."""
        return self.objects[obj_id - 1]


@dataclass
class ToyWorld:
    """A generated world: houses, the house split and the annotation items of every split."""

    seed: int
    config: ToyWorldConfig
    houses: dict[str, ToyHouse]
    split_scans: dict[str, list[str]]
    r2r: dict[str, list[dict]]
    reverie: dict[str, list[dict]]

    def manifest(self) -> dict:
        n_vp = sum(len(h.viewpoints) for h in self.houses.values())
        n_inc = sum(len(h.graph) for h in self.houses.values())
        return {
            "generator": "minivln.data.toyworld",
            "version": TOYWORLD_VERSION,
            "seed": self.seed,
            "config": asdict(self.config),
            "houses": {s: scans for s, scans in self.split_scans.items()},
            "viewpoints": n_vp,
            "included_viewpoints": n_inc,
            "objects": sum(len(h.objects) for h in self.houses.values()),
            "r2r": {s: {"paths": len(v), "instructions": sum(len(i["instructions"]) for i in v)}
                    for s, v in self.r2r.items()},
            "reverie": {s: {"paths": len(v), "instructions": sum(len(i["instructions"]) for i in v)}
                        for s, v in self.reverie.items()},
        }


# ----------------------------------------------------------------------------------------------
# Geometry helpers
# ----------------------------------------------------------------------------------------------


def _view_axes() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Forward, right and up unit vectors of the 36 panorama views."""
    h, e = VIEW_HEADINGS, VIEW_ELEVATIONS
    fwd = np.stack([np.sin(h) * np.cos(e), np.cos(h) * np.cos(e), np.sin(e)], axis=1)
    right = np.stack([np.cos(h), -np.sin(h), np.zeros_like(h)], axis=1)
    up = np.stack([-np.sin(h) * np.sin(e), -np.cos(h) * np.sin(e), np.cos(e)], axis=1)
    return fwd, right, up


_FWD, _RIGHT, _UP = _view_axes()
_GRID = np.linspace(-0.5, 0.5, 5)


def project_objects(camera: np.ndarray, centers: np.ndarray, sizes: np.ndarray
                    ) -> list[tuple[list[int], list[list[int]]]]:
    """For each object, the views (0..35) that see it and its [x, y, w, h] box in each view.

    An object is a ``width x height`` billboard (``sizes[m]``) centred at ``centers[m]``, facing
    the camera; 25 points on it go through a pinhole camera (640x480 pixels, 60 degree vertical
    field of view) for each of the 36 views, and the points in front of the camera are boxed and
    clipped to the image.  A view sees the object when the clipped box is at least 2 px each way.
    """
    centers = np.asarray(centers, dtype=np.float64).reshape(-1, 3)
    sizes = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)
    rel = centers - np.asarray(camera, dtype=np.float64)[None, :]
    heading = np.arctan2(rel[:, 0], rel[:, 1])
    perp = np.stack([np.cos(heading), -np.sin(heading), np.zeros_like(heading)], axis=1)
    offs_w = _GRID[None, :, None, None] * sizes[:, 0, None, None, None] * perp[:, None, None, :]
    offs_h = _GRID[None, None, :, None] * sizes[:, 1, None, None, None] * np.array([0.0, 0.0, 1.0])
    pts = (rel[:, None, None, :] + offs_w + offs_h).reshape(len(rel), -1, 3)  # (M, 25, 3)
    zc = pts @ _FWD.T  # (M, 25, 36)
    ok = zc > 0.05
    zs = np.where(ok, zc, 1.0)
    px = IMAGE_WIDTH / 2 + FOCAL_PX * (pts @ _RIGHT.T) / zs
    py = IMAGE_HEIGHT / 2 - FOCAL_PX * (pts @ _UP.T) / zs
    x0 = np.maximum(0.0, np.where(ok, px, np.inf).min(axis=1))  # (M, 36)
    x1 = np.minimum(float(IMAGE_WIDTH), np.where(ok, px, -np.inf).max(axis=1))
    y0 = np.maximum(0.0, np.where(ok, py, np.inf).min(axis=1))
    y1 = np.minimum(float(IMAGE_HEIGHT), np.where(ok, py, -np.inf).max(axis=1))
    seen = (x1 - x0 >= 2.0) & (y1 - y0 >= 2.0)
    xi, yi = np.floor(np.where(seen, x0, 0.0)).astype(int), np.floor(np.where(seen, y0, 0.0)).astype(int)
    wi = np.ceil(np.where(seen, x1, 0.0)).astype(int) - xi
    hi = np.ceil(np.where(seen, y1, 0.0)).astype(int) - yi
    out = []
    for m in range(len(rel)):
        views = np.flatnonzero(seen[m]).tolist()
        out.append((views, [[int(xi[m, k]), int(yi[m, k]), int(wi[m, k]), int(hi[m, k])] for k in views]))
    return out


def project_object(camera: np.ndarray, center: np.ndarray, size: tuple[float, float]
                   ) -> tuple[list[int], list[list[int]]]:
    """``project_objects`` for one object."""
    return project_objects(camera, np.asarray(center)[None, :], np.asarray(size)[None, :])[0]


def _pose(position: np.ndarray, yaw: float) -> list[float]:
    """Camera-to-world 4x4 (row-major) for a level camera looking at heading ``yaw``:
    columns are the camera's right, down and forward axes, the position is at 3, 7, 11."""
    s, c = math.sin(yaw), math.cos(yaw)
    rows = [
        [c, 0.0, s, position[0]],
        [-s, 0.0, c, position[1]],
        [0.0, -1.0, 0.0, position[2]],
    ]
    flat = [round(float(v), 6) + 0.0 for row in rows for v in row]
    return flat + [0, 0, 0, 1]


def _turn(h_in: float, h_out: float) -> str:
    """'straight', 'left', 'right' or 'around' for a change of heading (clockwise = right)."""
    d = math.degrees(float(wrap_angle(h_out - h_in)))
    if abs(d) <= 40.0:
        return "straight"
    if abs(d) >= 140.0:
        return "around"
    return "right" if d > 0 else "left"


def _heading(a: np.ndarray, b: np.ndarray) -> float:
    return direction(a, b)[0]


# ----------------------------------------------------------------------------------------------
# House generation
# ----------------------------------------------------------------------------------------------


def _hex_id(rng: random.Random) -> str:
    return f"{rng.getrandbits(128):032x}"


def _scan_id(rng: random.Random) -> str:
    return "".join(rng.choice(_ALNUM) for _ in range(11))


def _grid_shape(width: float, depth: float) -> tuple[int, int]:
    """Viewpoint grid (columns, rows) of a room: about 1.6-2.2 m apart, 0.8 m from the walls."""
    nx = min(3, max(2, round((width - 1.6) / 1.9) + 1))
    ny = min(3, max(2, round((depth - 1.6) / 1.9) + 1))
    return nx, ny


def _hall_count(length: float) -> int:
    """Viewpoints along a hallway of ``length`` metres (about 2 m apart)."""
    return max(3, round((length - 1.6) / 2.1) + 1)


class _HouseBuilder:
    """Builds one ``ToyHouse`` from a private random stream."""

    def __init__(self, rng: random.Random, cfg: ToyWorldConfig, scan: str):
        self.rng = rng
        self.cfg = cfg
        self.scan = scan
        self.regions: list[Region] = []
        self.doors: list[Door] = []
        self.vps: list[ToyViewpoint] = []
        self.objects: list[ToyObject] = []
        self.edges: set[tuple[int, int]] = set()
        self.region_vps: dict[int, list[int]] = {}

    # -- small helpers -------------------------------------------------------------------------
    def _u(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * self.rng.random()

    def _region(self, kind: str, name: str, floor: int, bounds: tuple[float, float, float, float],
                floor_z: float) -> Region:
        reg = Region(len(self.regions), kind, name, floor, tuple(round(b, 3) for b in bounds), floor_z)
        self.regions.append(reg)
        self.region_vps[reg.index] = []
        return reg

    def _add_vp(self, region: Region, x: float, y: float, cam: float | None = None,
                floor_z: float | None = None, included: bool = True) -> int:
        height = cam if cam is not None else self.cfg.camera_height + self._u(-0.05, 0.05)
        fz = region.floor_z if floor_z is None else floor_z
        pos = np.array([round(x, 4), round(y, 4), round(fz + height, 4)])
        vp = ToyViewpoint(_hex_id(self.rng), pos, round(height, 6), region.index,
                          self._u(0.0, 2 * math.pi), included)
        self.vps.append(vp)
        if included:
            self.region_vps[region.index].append(len(self.vps) - 1)
        return len(self.vps) - 1

    def _edge(self, i: int, j: int) -> None:
        if i != j:
            self.edges.add((min(i, j), max(i, j)))

    def _nearest(self, candidates: list[int], xy: tuple[float, float]) -> int:
        return min(candidates, key=lambda i: (self.vps[i].position[0] - xy[0]) ** 2
                   + (self.vps[i].position[1] - xy[1]) ** 2)

    def _add_object(self, name: str, kind: str, region: Region, x: float, y: float,
                    z: float | None = None, size: tuple[float, float] | None = None,
                    parent: int | None = None) -> int:
        w, h, base = SIZES.get(name, DEFAULT_SIZE)
        if size is not None:
            w, h = size
        if z is None:
            z = region.floor_z + base + h / 2
        obj = ToyObject(len(self.objects) + 1, name, kind, region.index,
                        np.array([round(x, 4), round(y, 4), round(z, 4)]), (w, h), parent)
        self.objects.append(obj)
        return obj.obj_id

    # -- layout ----------------------------------------------------------------------------------
    def build(self) -> ToyHouse:
        rng, cfg = self.rng, self.cfg
        hall_w = 2.0
        stair_w = 2.6
        stair_slot = 1
        for _ in range(10_000):  # draw footprints until the house has at most max_viewpoints viewpoints
            south = [round(self._u(3.2, 5.2), 2), stair_w, round(self._u(3.2, 5.2), 2)]
            length = sum(south)
            n_north = rng.choice([2, 2, 3])
            cuts = sorted(self._u(0.85, 1.15) for _ in range(n_north))
            total = sum(cuts)
            north = [round(length * c / total, 2) for c in cuts]
            north[-1] = round(length - sum(north[:-1]), 2)
            depth_n = round(self._u(3.2, 4.0), 2)
            depth_s = round(self._u(3.2, 4.0), 2)
            rooms_s = [w for k, w in enumerate(south) if k != stair_slot]
            per_floor = (_hall_count(length) + sum(math.prod(_grid_shape(w, depth_n)) for w in north)
                         + sum(math.prod(_grid_shape(w, depth_s)) for w in rooms_s))
            if 2 * per_floor + 3 <= cfg.max_viewpoints:
                break
        else:
            raise ValueError(f"no house layout has at most {cfg.max_viewpoints} viewpoints")

        n_rooms = n_north + len(south) - 1
        ground = ["kitchen", "living room"] + rng.sample(
            [r for r in ROOMS_GROUND if r not in ("kitchen", "living room")], n_rooms - 2)
        upper = ["bedroom", "bathroom"] + rng.sample(
            [r for r in ROOMS_UPPER if r not in ("bedroom", "bathroom")], n_rooms - 2)
        rng.shuffle(ground)
        rng.shuffle(upper)

        hallways: list[Region] = []
        for floor, types in enumerate([ground, upper]):
            fz = floor * cfg.floor_height
            hall = self._region("hallway", "hallway", floor, (0.0, length, 0.0, hall_w), fz)
            hallways.append(hall)
            for x in np.linspace(0.8, length - 0.8, _hall_count(length)):
                self._add_vp(hall, float(x) + self._u(-0.1, 0.1), hall_w / 2 + self._u(-0.12, 0.12))
            hv = self.region_vps[hall.index]
            for a, b in zip(hv[:-1], hv[1:]):
                self._edge(a, b)
            types = list(types)
            rooms_north: list[Region] = []
            x0 = 0.0
            for w in north:
                room = self._region("room", types.pop(), floor, (x0, x0 + w, hall_w, hall_w + depth_n), fz)
                rooms_north.append(room)
                x0 += w
            x0 = 0.0
            for k, w in enumerate(south):
                if k != stair_slot:
                    self._region("room", types.pop(), floor, (x0, x0 + w, -depth_s, 0.0), fz)
                x0 += w
            for room in [r for r in self.regions if r.floor == floor and r.kind == "room"]:
                self._fill_room(room)
                self._door_to_hall(room, hall)
            for left, right in zip(rooms_north[:-1], rooms_north[1:]):
                if rng.random() < 0.4:
                    self._inner_door(left, right)

        # the staircase: a U-shaped flight in the south slot, from the ground hallway to the upper one
        xs = south[0]
        stairs = self._region("stairs", "stairs", 0, (xs, xs + stair_w, -depth_s, 0.0), 0.0)
        fh = cfg.floor_height
        cam = cfg.camera_height
        a = self._add_vp(stairs, xs + 0.65, -1.0, cam, floor_z=fh * 0.25)
        b = self._add_vp(stairs, xs + stair_w / 2, -depth_s + 0.7, cam, floor_z=fh * 0.5)
        c = self._add_vp(stairs, xs + stair_w - 0.65, -1.0, cam, floor_z=fh * 0.75)
        self._edge(a, b)
        self._edge(b, c)
        low = self._nearest(self.region_vps[hallways[0].index], (xs + 0.65, 1.0))
        high = self._nearest(self.region_vps[hallways[1].index], (xs + stair_w - 0.65, 1.0))
        self._edge(low, a)
        self._edge(c, high)
        for hall in hallways:
            self.doors.append(Door(stairs.index, hall.index, "y", 0.0, xs, xs + stair_w))
        self._add_object("staircase#railing", "fixture", stairs, xs + stair_w / 2, -depth_s + 0.3,
                         z=fh * 0.5 + 0.9)
        self._add_object("stair", "fixture", stairs, xs + 0.65, -1.6, z=fh * 0.25 + 0.15)

        for hall in hallways:
            self._furnish(hall)
        for room in [r for r in self.regions if r.kind == "room"]:
            self._furnish(room)
        self._excluded_viewpoints()
        return self._finish()

    def _fill_room(self, room: Region) -> None:
        x0, x1, y0, y1 = room.bounds
        nx, ny = _grid_shape(x1 - x0, y1 - y0)
        grid: dict[tuple[int, int], int] = {}
        for i, x in enumerate(np.linspace(x0 + 0.8, x1 - 0.8, nx)):
            for j, y in enumerate(np.linspace(y0 + 0.8, y1 - 0.8, ny)):
                grid[i, j] = self._add_vp(room, float(x) + self._u(-0.12, 0.12),
                                          float(y) + self._u(-0.12, 0.12))
        for (i, j), v in grid.items():
            if (i + 1, j) in grid:
                self._edge(v, grid[i + 1, j])
            if (i, j + 1) in grid:
                self._edge(v, grid[i, j + 1])
            if (i + 1, j + 1) in grid and self.rng.random() < 0.5:
                self._edge(v, grid[i + 1, j + 1])
            if (i + 1, j - 1) in grid and self.rng.random() < 0.3:
                self._edge(v, grid[i + 1, j - 1])

    def _door_to_hall(self, room: Region, hall: Region) -> None:
        x0, x1, y0, y1 = room.bounds
        wall_y = y0 if y0 >= hall.bounds[3] - 1e-9 else y1
        xd = self._u(x0 + 0.8, x1 - 0.8)
        self.doors.append(Door(room.index, hall.index, "y", wall_y, xd - 0.5, xd + 0.5))
        self._edge(self._nearest(self.region_vps[room.index], (xd, wall_y)),
                   self._nearest(self.region_vps[hall.index], (xd, wall_y)))

    def _inner_door(self, left: Region, right: Region) -> None:
        wall_x = left.bounds[1]
        yd = self._u(left.bounds[2] + 0.8, left.bounds[3] - 0.8)
        self.doors.append(Door(left.index, right.index, "x", wall_x, yd - 0.5, yd + 0.5))
        self._edge(self._nearest(self.region_vps[left.index], (wall_x, yd)),
                   self._nearest(self.region_vps[right.index], (wall_x, yd)))

    def _furnish(self, region: Region) -> None:
        """Anchors next to every viewpoint, then wall, ceiling and small objects."""
        rng = self.rng
        cat = CATALOG[region.name]
        x0, x1, y0, y1 = region.bounds
        vps = self.region_vps[region.index]
        names = rng.sample(cat["furniture"], len(vps))
        used = set(names)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        for v, name in zip(vps, names):
            self.vps[v].anchor = self._place_anchor(region, v, name)
        walls = [w for w in cat["wall"] if w not in used]
        for name in rng.sample(walls, min(len(walls), rng.choice([1, 2, 2]))):
            used.add(name)
            side = rng.randrange(4)
            t = self._u(0.2, 0.8)
            if side < 2:
                x, y = x0 + t * (x1 - x0), (y0 + 0.05 if side == 0 else y1 - 0.05)
            else:
                x, y = (x0 + 0.05 if side == 2 else x1 - 0.05), y0 + t * (y1 - y0)
            self._add_object(name, "wall", region, x, y)
        if region.kind == "room" and rng.random() < 0.7:
            used.add("light")
            self._add_object("light", "light", region, cx, cy)
        hosts = [self.vps[v].anchor for v in vps if self.objects[self.vps[v].anchor - 1].name in SURFACES]
        smalls = [s for s in cat["small"] if s not in used]
        for name in rng.sample(smalls, min(len(smalls), len(hosts), rng.choice([1, 2]))):
            host = self.objects[rng.choice(hosts) - 1]
            top = host.position[2] + host.size[1] / 2
            self._add_object(name, "small", region, host.position[0] + self._u(-0.2, 0.2),
                             host.position[1] + self._u(-0.2, 0.2), z=top + SMALL_SIZE[1] / 2,
                             size=SMALL_SIZE, parent=host.obj_id)

    def _place_anchor(self, region: Region, v: int, name: str) -> int:
        """Put furniture ``name`` next to viewpoint ``v``: nearer to ``v`` than to any other
        viewpoint of the region, inside the room, and in view of ``v`` (not hidden under the
        camera).  Twelve directions are tried from a random one; the first that works wins."""
        x0, x1, y0, y1 = region.bounds
        p = self.vps[v].position
        vps = self.region_vps[region.index]
        others = [float(np.hypot(*(self.vps[o].position[:2] - p[:2]))) for o in vps if o != v]
        r = min(1.0, 0.47 * min(others))
        _, h, base = SIZES.get(name, DEFAULT_SIZE)
        z = region.floor_z + base + h / 2
        first = self._u(0.0, 2 * math.pi)
        best: tuple[float, float] | None = None
        for step in range(12):
            a = first + step * math.pi / 6
            x, y = p[0] + r * math.sin(a), p[1] + r * math.cos(a)
            if not (x0 + 0.25 <= x <= x1 - 0.25 and y0 + 0.25 <= y <= y1 - 0.25):
                continue
            if self._nearest(vps, (x, y)) != v:
                continue
            best = best or (x, y)
            if math.atan2(p[2] - (z + h / 2), r) < math.radians(55):  # its top is in the lowest views
                best = (x, y)
                break
        if best is None:  # cannot happen with the room sizes used; stay right next to the camera
            best = (p[0] + 0.3 * math.sin(first), p[1] + 0.3 * math.cos(first))
        return self._add_object(name, "furniture", region, best[0], best[1])

    def _excluded_viewpoints(self) -> None:
        """Viewpoints with ``included: false`` (low scans inside a room), linked to two room viewpoints."""
        rooms = [r for r in self.regions if r.kind == "room"]
        for _ in range(self.cfg.excluded_per_house):
            room = self.rng.choice(rooms)
            x0, x1, y0, y1 = room.bounds
            v = self._add_vp(room, self._u(x0 + 0.3, x1 - 0.3), self._u(y0 + 0.3, y1 - 0.3),
                             cam=round(self._u(0.6, 0.8), 6), included=False)
            p = self.vps[v].position
            near = sorted(self.region_vps[room.index],
                          key=lambda i: float(np.hypot(*(self.vps[i].position[:2] - p[:2]))))
            for o in near[:2]:
                self._edge(v, o)

    # -- relations, files --------------------------------------------------------------------------
    def _sees_region(self, ra: int, rb: int, p: np.ndarray, q: np.ndarray) -> bool:
        """Line of sight between points in regions ``ra`` and ``rb`` (same region or through a door)."""
        if ra == rb:
            return True
        for d in self.doors:
            if {d.a, d.b} == {ra, rb} and d.passes(p, q):
                return True
        return False

    def _finish(self) -> ToyHouse:
        n = len(self.vps)
        unob = np.zeros((n, n), dtype=bool)
        for i, j in self.edges:
            unob[i, j] = unob[j, i] = True
        vis = unob.copy()
        for i in range(n):
            for j in range(i + 1, n):
                vi, vj = self.vps[i], self.vps[j]
                if abs(vi.position[2] - vj.position[2]) > 2.0:
                    continue
                if self._sees_region(vi.region, vj.region, vi.position, vj.position):
                    vis[i, j] = vis[j, i] = True
        house = ToyHouse(self.scan, self.regions, self.doors, self.vps, self.objects, unob, vis,
                         floor_height=self.cfg.floor_height)
        house.vp_index = {v.vp_id: k for k, v in enumerate(self.vps)}
        order = list(range(n))
        self.rng.shuffle(order)
        house.entries = [
            {
                "image_id": self.vps[i].vp_id,
                "pose": _pose(self.vps[i].position, self.vps[i].yaw),
                "included": self.vps[i].included,
                "visible": [bool(vis[i, j]) for j in order],
                "unobstructed": [bool(unob[i, j]) for j in order],
                "height": self.vps[i].height,
            }
            for i in order
        ]
        house.graph = build_house(self.scan, house.entries)
        if not np.isfinite(house.graph.dist).all():
            raise RuntimeError(f"toy house {self.scan} is not connected")  # a generator bug
        radius = self.cfg.bbox_radius
        centers = np.stack([o.position for o in self.objects])
        sizes = np.array([o.size for o in self.objects])
        for v in self.vps:
            if not v.included:
                continue
            near = np.flatnonzero(np.linalg.norm(centers - v.position, axis=1) <= radius)
            near = [int(k) for k in near
                    if self._sees_region(v.region, self.objects[k].region, v.position, centers[k])]
            found: dict[str, dict] = {}
            if near:
                for k, (views, boxes) in zip(near, project_objects(v.position, centers[near], sizes[near])):
                    if views:
                        found[str(self.objects[k].obj_id)] = {
                            "name": self.objects[k].name, "visible_pos": views, "bbox2d": boxes}
            house.bboxes[v.vp_id] = {v.vp_id: found}
        return house


# ----------------------------------------------------------------------------------------------
# Instructions
# ----------------------------------------------------------------------------------------------


def path_turns(house: ToyHouse, path: list[str], heading: float) -> list[str]:
    """Turn at every vertex but the goal: entry 0 relative to the start heading, entry k (k >= 1)
    between the edges into and out of ``path[k]``."""
    pos = [house.vp(v).position for v in path]
    turns = [_turn(heading, _heading(pos[0], pos[1]))]
    for k in range(1, len(path) - 1):
        turns.append(_turn(_heading(pos[k - 1], pos[k]), _heading(pos[k], pos[k + 1])))
    return turns


def _region_word(region: Region, rng: random.Random) -> str:
    return rng.choice(HALL_WORDS) if region.kind == "hallway" else region.name


def r2r_instruction(house: ToyHouse, path: list[str], heading: float, rng: random.Random) -> str:
    """A templated R2R instruction for ``path``: rooms, turns, stairs, landmarks, goal anchor."""
    n = len(path)
    regs = [house.region_of(v) for v in path]
    turns = path_turns(house, path, heading)
    verb = rng.choice(WALK_VERBS)
    landmark_ks = [k for k in range(1, n - 1) if house.vp(path[k]).anchor is not None]
    chosen = set(rng.sample(landmark_ks, min(len(landmark_ks), rng.choice([0, 1, 1, 2]))))
    # clauses: (text, glue) where glue "merge" appends to the previous clause with a space
    clauses: list[tuple[str, str]] = []
    lead = {"straight": "", "left": "turn left and ", "right": "turn right and ",
            "around": "turn around and "}[turns[0]]
    start = regs[0]
    single = all(r.index == start.index for r in regs)
    if single:
        how = "across" if start.kind == "room" else "along"
        clauses.append((f"{lead}{verb} {how} the {_region_word(start, rng)}", "new"))
    elif start.kind == "room":
        leave = rng.choice([f"{verb} out of the {{r}}", "exit the {r}", "leave the {r}"])
        clauses.append((lead + leave.format(r=start.name), "new"))
    elif regs[1].index == start.index:
        clauses.append((f"{lead}{verb} along the {_region_word(start, rng)}", "new"))
    # else: a hallway start that leaves the hallway at once; the first transition says it all
    for k in range(1, n):
        reg = regs[k]
        if reg.index != regs[k - 1].index:
            t = turns[k - 1] if k >= 2 else None
            prev = regs[k - 1]
            if reg.kind == "stairs":
                m = next((j for j in range(k, n) if regs[j].kind != "stairs"), n - 1)
                up = house.vp(path[m]).position[2] > house.vp(path[k - 1]).position[2]
                phrase = rng.choice(UP_PHRASES if up else DOWN_PHRASES)
                if not clauses:
                    text = lead + phrase
                else:
                    text = phrase if t in (None, "straight") else f"turn {t} and {phrase}"
                clauses.append((text, "new"))
            else:
                word = _region_word(reg, rng)
                if not clauses:
                    text, glue = f"{lead}{verb} into the {word}", "new"
                elif t is None:
                    text, glue = f"into the {word}", "merge"
                elif t == "straight":
                    text = rng.choice([f"go straight into the {word}", f"continue into the {word}"])
                    glue = "new"
                elif t == "around":
                    text, glue = f"turn around and enter the {word}", "new"
                else:
                    text, glue = f"turn {t} into the {word}", "new"
                if prev.kind == "stairs" and glue == "new":
                    top = house.vp(path[k]).position[2] > house.vp(path[k - 2]).position[2]
                    text = f"at the {'top' if top else 'bottom'} of the stairs, {text}"
                clauses.append((text, glue))
        if k in chosen:
            joined = clauses[-1][0].startswith("past the ") and clauses[-1][1] == "merge"
            name = words(house.anchor_name(path[k]))
            clauses.append((f"{'and' if joined else 'past'} the {name}", "merge"))
        if k <= n - 2 and regs[k + 1].index == reg.index and reg.kind != "stairs" and turns[k] != "straight":
            clauses.append(("turn around" if turns[k] == "around" else f"turn {turns[k]}", "new"))
    goal = house.vp(path[-1])
    stop = f"{rng.choice(STOP_PHRASES)} the {words(house.object(goal.anchor).name)}"
    if rng.random() < 0.5:
        stop += f" in the {_region_word(regs[-1], rng)}"
    clauses.append((stop, "stop"))
    return _assemble(clauses, rng)


def _assemble(clauses: list[tuple[str, str]], rng: random.Random) -> str:
    """Join clauses into sentences with varied connectives; capitalise; end with a full stop.

    ``glue`` is "new" (a clause of its own), "merge" (continues the previous clause after a
    space) or "stop" (the final clause)."""
    text = clauses[0][0]
    since_stop = 1
    for clause, glue in clauses[1:]:
        if glue == "merge":
            text += " " + clause
            continue
        if glue == "stop":
            sep = rng.choice([" and ", ", then ", ". "])
        elif since_stop >= 2:
            sep = ". "
        else:
            sep = rng.choice([", then ", " and ", ", ", ". "])
        since_stop = 1 if sep == ". " else since_stop + 1
        text += sep + clause
    sentences = [s.strip() for s in text.split(". ")]
    return ". ".join(s[:1].upper() + s[1:] for s in sentences) + "."


def reverie_instruction(house: ToyHouse, obj: ToyObject, rng: random.Random) -> str:
    """A REVERIE-style instruction: the target's room, floor and name (unique in the house)."""
    region = house.regions[obj.region]
    room = _region_word(region, rng) if region.kind == "hallway" else region.name
    floor = rng.choice(FLOOR_WORDS[region.floor])
    kind = obj.kind if obj.kind in REVERIE_ACTIONS else "furniture"
    action = rng.choice(REVERIE_ACTIONS[kind])
    target = f"the {words(obj.name)}"
    if obj.parent is not None:
        target += f" on the {words(house.object(obj.parent).name)}"
    template = rng.choice([
        "Go to the {room} on the {floor} and {action} {target}.",
        "{Action} {target} in the {room} on the {floor}.",
        "In the {room} on the {floor}, {action} {target}.",
        "Enter the {room} on the {floor} and {action} {target}.",
    ])
    return template.format(room=room, floor=floor, action=action, Action=action.capitalize(), target=target)


# ----------------------------------------------------------------------------------------------
# Paths and splits
# ----------------------------------------------------------------------------------------------


def _hops(house: ToyHouse) -> dict[tuple[str, str], int]:
    """Edges on the shortest path between every ordered pair of room/hallway viewpoints."""
    g = house.graph
    n = len(g)
    pred = np.where(g.pred < 0, np.arange(n)[:, None], g.pred)
    hops = np.where(np.eye(n, dtype=bool), 0, n + 1)
    for _ in range(n):  # relax hops[i, j] = hops[i, pred[i, j]] + 1 until nothing changes
        new = np.where(np.eye(n, dtype=bool), 0, np.take_along_axis(hops, pred, axis=1) + 1)
        new = np.minimum(new, n + 1)
        if np.array_equal(new, hops):
            break
        hops = new
    ends = [g.idx(v) for v in g.vp_ids if house.region_of(v).kind != "stairs"]
    return {(g.vp_ids[a], g.vp_ids[b]): int(hops[a, b]) for a in ends for b in ends if a != b}


def _candidate_pairs(hops: dict[tuple[str, str], int], cfg: ToyWorldConfig) -> list[tuple[str, str]]:
    """Ordered (start, goal) pairs, neither on the stairs, min_hops..max_hops edges apart."""
    return [p for p, h in hops.items() if cfg.min_hops <= h <= cfg.max_hops]


def _reverie_options(house: ToyHouse, hops: dict[tuple[str, str], int], cfg: ToyWorldConfig
                     ) -> list[tuple[str, int, str]]:
    """(start, objId, goal) triples: the target is in a room or hallway and listed in the BBox
    file of the nearest viewpoint of its region (the goal), min_hops..max_hops from the start."""
    targets = []
    for obj in house.objects:
        if house.regions[obj.region].kind == "stairs":
            continue
        vps = [v.vp_id for v in house.viewpoints if v.included and v.region == obj.region]
        goal = min(vps, key=lambda v: float(np.linalg.norm(house.vp(v).position - obj.position)))
        if str(obj.obj_id) in house.bboxes[goal][goal]:
            targets.append((obj.obj_id, goal))
    starts = sorted({a for a, _ in hops}, key=house.graph.idx)
    return [(s, obj, goal) for obj, goal in targets for s in starts
            if s != goal and cfg.min_hops <= hops[s, goal] <= cfg.max_hops]


def _spread(n: int, scans: list[str]) -> list[str]:
    """n house slots spread evenly over ``scans``."""
    return [scans[k % len(scans)] for k in range(n)]


def _distinct(make, n: int, tries: int = 20) -> list[str]:
    """``n`` instructions from ``make()``, avoiding repeats where ``tries`` draws allow."""
    out: list[str] = []
    for _ in range(n):
        text = make()
        for _ in range(tries):
            if text not in out:
                break
            text = make()
        out.append(text)
    return out


def _draw(rng: random.Random, pool: list):
    """Remove and return a random element of ``pool`` (deterministic swap-and-pop)."""
    k = rng.randrange(len(pool))
    item = pool[k]
    pool[k] = pool[-1]
    pool.pop()
    return item


def _r2r_items(rng: random.Random, houses: dict[str, ToyHouse], scans: list[str], n: int,
               split: str, cfg: ToyWorldConfig, pools: dict[str, list[tuple[str, str]]],
               next_id: list[int]) -> list[dict]:
    """R2R items of one split, drawn without replacement from the (start, goal) ``pools``
    (shared by all splits, so train and val_seen never repeat a path)."""
    items = []
    for scan in _spread(n, scans):
        if not pools[scan]:
            continue
        start, goal = _draw(rng, pools[scan])
        house = houses[scan]
        path = house.graph.shortest_path(start, goal)
        heading = round(rng.uniform(0.0, 2 * math.pi), 3)
        instrs = _distinct(lambda: r2r_instruction(house, path, heading, rng), cfg.instructions_per_path)
        path_id = next_id[0]
        next_id[0] += 1
        if split == "test":  # as the release: start only, no distance
            items.append({"scan": scan, "path_id": path_id, "path": [path[0]], "heading": heading,
                          "instructions": instrs})
        else:
            items.append({"distance": round(house.graph.path_length(path), 2), "scan": scan,
                          "path_id": path_id, "path": path, "heading": heading, "instructions": instrs})
    return items


def _reverie_items(rng: random.Random, houses: dict[str, ToyHouse], scans: list[str], n: int,
                   split: str, pools: dict[str, list[tuple[str, int, str]]],
                   next_id: list[int]) -> list[dict]:
    """REVERIE items of one split, drawn without replacement from the (start, objId, goal) pools."""
    items = []
    for scan in _spread(n, scans):
        if not pools[scan]:
            continue
        start, obj_id, goal = _draw(rng, pools[scan])
        house = houses[scan]
        path = house.graph.shortest_path(start, goal)
        heading = round(rng.uniform(0.0, 2 * math.pi), 3)
        obj = house.object(obj_id)
        instrs = _distinct(lambda: reverie_instruction(house, obj, rng), rng.choice([2, 3, 3]))
        path_id = next_id[0]
        next_id[0] += 1
        if split == "test":  # as the release: start only, no objId, no path_id
            items.append({"id": str(path_id), "path": [path[0]], "instructions": instrs,
                          "heading": heading, "scan": scan})
        else:
            items.append({"id": f"{path_id}_{obj_id}", "path": path, "objId": obj_id,
                          "instructions": instrs, "heading": heading, "scan": scan, "path_id": path_id})
    return items


def generate_toy_world(seed: int = 0, config: ToyWorldConfig | None = None) -> ToyWorld:
    """Generate a toy world in memory (deterministic for ``seed`` and ``config``)."""
    cfg = config or ToyWorldConfig()
    cfg.validate()
    n_train, n_unseen, n_test = cfg.house_split_sizes()
    rng = random.Random(f"minivln-toyworld-{TOYWORLD_VERSION}-{seed}")
    houses: dict[str, ToyHouse] = {}
    for _ in range(cfg.n_houses):
        house_rng = random.Random(rng.getrandbits(64))
        scan = _scan_id(house_rng)
        while scan in houses:
            scan = _scan_id(house_rng)
        houses[scan] = _HouseBuilder(house_rng, cfg, scan).build()
    order = list(houses)
    split_scans = {
        "train": sorted(order[:n_train]),
        "val_seen": sorted(order[:n_train]),
        "val_unseen": sorted(order[n_train:n_train + n_unseen]),
        "test": sorted(order[n_train + n_unseen:]),
    }
    hops = {s: _hops(h) for s, h in houses.items()}
    pairs = {s: _candidate_pairs(hops[s], cfg) for s in houses}
    options = {s: _reverie_options(h, hops[s], cfg) for s, h in houses.items()}
    r2r: dict[str, list[dict]] = {}
    reverie: dict[str, list[dict]] = {}
    r2r_id, rev_id = [1], [1]
    for split in SPLITS:
        split_rng = random.Random(rng.getrandbits(64))
        r2r[split] = _r2r_items(split_rng, houses, split_scans[split], cfg.n_paths("r2r", split), split,
                                cfg, pairs, r2r_id)
        split_rng = random.Random(rng.getrandbits(64))
        reverie[split] = _reverie_items(split_rng, houses, split_scans[split],
                                        cfg.n_paths("reverie", split), split, options, rev_id)
    return ToyWorld(seed, cfg, houses, split_scans, r2r, reverie)


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def write_toy_world(world: ToyWorld, root: Path) -> None:
    """Write ``world`` into the (existing, empty) directory ``root`` in the release formats."""
    (root / "connectivity").mkdir(parents=True, exist_ok=True)
    (root / "R2R").mkdir(exist_ok=True)
    (root / "REVERIE" / "BBox").mkdir(parents=True, exist_ok=True)
    for scan, house in world.houses.items():
        (root / "connectivity" / f"{scan}_connectivity.json").write_text(
            json.dumps(house.entries, separators=(",", ":")))
        for vp_id, data in house.bboxes.items():
            (root / "REVERIE" / "BBox" / f"{scan}_{vp_id}.json").write_text(json.dumps(data, indent=2))
    (root / "connectivity" / "scans.txt").write_text("".join(f"{s}\n" for s in sorted(world.houses)))
    for split in SPLITS:
        (root / "R2R" / f"R2R_{split}.json").write_text(
            json.dumps(world.r2r[split], indent=2, separators=(", ", ": ")))
        (root / "REVERIE" / f"REVERIE_{split}.json").write_text(json.dumps(world.reverie[split], indent=1))
    (root / MANIFEST_NAME).write_text(json.dumps(world.manifest(), indent=2, sort_keys=True) + "\n")


def build_toy_world(out_dir: str | os.PathLike, seed: int = 0, n_houses: int | None = None,
                    config: ToyWorldConfig | None = None, *, overwrite: bool = False) -> Path:
    """Generate a toy world and write it as a data directory at ``out_dir``; returns its path.

    The files are written into a temporary sibling directory that is then renamed to
    ``out_dir``, so a reader never sees a half-built directory.  An existing non-empty
    ``out_dir`` is replaced only with ``overwrite=True`` (else ``FileExistsError``).
    """
    cfg = config or ToyWorldConfig()
    if n_houses is not None:
        cfg = replace(cfg, n_houses=int(n_houses))
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --force to replace it)")
    check_writable_dir(out.parent, "output directory")
    world = generate_toy_world(seed, cfg)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise write_error(exc, out) from exc
    try:
        write_toy_world(world, tmp)
        os.chmod(tmp, 0o755)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "data")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as exc:  # a full or read-only disk: one line naming the directory, nothing left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(exc, out) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_manifest(data_dir: str | os.PathLike) -> dict | None:
    """The ``toyworld.json`` of a toy data directory, or None (not a toy world / unreadable)."""
    path = Path(data_dir) / MANIFEST_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def ensure_toy_world(out_dir: str | os.PathLike, seed: int = 0,
                     config: ToyWorldConfig | None = None) -> Path:
    """Return ``out_dir`` if it already holds this exact toy world (same version, seed and
    configuration), else (re)build it there."""
    cfg = config or ToyWorldConfig()
    man = read_manifest(out_dir)
    if (man is not None and man.get("version") == TOYWORLD_VERSION and man.get("seed") == seed
            and man.get("config") == asdict(cfg)):
        return Path(out_dir).expanduser().absolute()
    return build_toy_world(out_dir, seed, config=cfg, overwrite=True)


# Parsing helpers shared with the tests and the docs' "learnability" claim ---------------------

_ROOM_RE = "|".join(sorted(set(CATALOG) | set(HALL_WORDS), key=len, reverse=True))


def parse_r2r_goal(instruction: str) -> tuple[str, str, int]:
    """(goal room word, goal object words, floor change) read off a toy R2R instruction.

    A rule-based reader: the last room after into/across/along/in/enter, the object after the stop
    phrase, and +1 / -1 per flight of stairs up / down.  Hallway synonyms read as "hallway".
    """
    text = instruction.lower()
    rooms = re.findall(rf"\b(?:into|across|along|in|enter) the ({_ROOM_RE})\b", text)
    stops = "|".join(STOP_PHRASES)
    m = re.search(rf"(?:{stops}) the ([a-z ]+?)(?: in the (?:{_ROOM_RE}))?\.$", text)
    if not rooms or not m:
        raise ValueError(f"cannot read the goal of {instruction!r}")
    room = "hallway" if rooms[-1] in HALL_WORDS else rooms[-1]
    up = sum(text.count(p) for p in UP_PHRASES)
    down = sum(text.count(p) for p in DOWN_PHRASES)
    return room, m.group(1), up - down


def parse_reverie_target(instruction: str) -> tuple[str, int, str]:
    """(room word, floor, object words) read off a toy REVERIE instruction."""
    text = instruction.lower()
    floors = {w: f for f, ws in enumerate(FLOOR_WORDS) for w in ws}
    m = re.search(rf"the ({_ROOM_RE}) on the ({'|'.join(floors)})", text)
    actions = "|".join(sorted({a for acts in REVERIE_ACTIONS.values() for a in acts}, key=len, reverse=True))
    t = re.search(rf"\b(?:{actions}) the ([a-z ]+?)(?= on the | in the |[.,]|$)", text)
    if not m or not t:
        raise ValueError(f"cannot read the target of {instruction!r}")
    room = "hallway" if m.group(1) in HALL_WORDS else m.group(1)
    return room, floors[m.group(2)], t.group(1)
