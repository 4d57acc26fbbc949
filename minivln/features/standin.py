"""Stand-in panorama features built from real annotations (no images).

The Matterport3D images, and the CLIP/ViT features computed from them, cannot be had here.  This
module derives a *stand-in* from what the data directory does hold, and writes it in the same
HDF5 layout as real features (``minivln.features.hdf5``), marked with the root attribute
``standin=True``.  Everything it carries comes from:

* ``REVERIE/BBox``: per viewpoint, the objects within 3 m, the views they appear in and their 2-D
  boxes (a 640x480 image per view);
* the connectivity graph: camera positions and the ``visible`` relation.

Per viewpoint ``u`` and view ``k`` (36 views, conventions of ``minivln.geometry``), in the
384-d space of all-MiniLM-L6-v2 (object names embedded once each, ``#`` read as a space):

* **near** = sum over the boxes of view ``k`` at ``u`` of ``area^area_power * idf(name) * E(name)``;
* **far** = the objects around other viewpoints that ``u`` sees (``visible``), placed at a 3-D
  position triangulated from all their boxes, put into the views whose frustum contains them
  (a tent kernel, 75 x 60 degree views), weighted like a box area would be at that distance
  (apparent size ``(size / distance)^far_power``) and by ``idf(name)``;
* **room** = the room-type distribution of the viewpoints visible in that direction (weighted by
  1 / distance; ``u``'s own for views that see none), embedded as ``sum_r p(r) E(room word r)``.
  A viewpoint's room distribution comes from its objects: each object name's similarity to 26
  room words ("bedroom", "kitchen", ...), centred so that generic objects say little, averaged
  (area-weighted), smoothed over nearby same-floor viewpoints, through a softmax (``RoomModel``;
  an optional naive-Bayes EM on train co-occurrence exists but did not help); viewpoints on stairs
  (large height changes to their neighbours) move their mass to the room "stairs";
* **stairs** = ``E("stairs")`` times how much the view looks at a viewpoint with a large height change.

Each part is unit-length (or zero), then weighted (``StandinConfig``: near 0.1, far 0.5, room 4,
stairs 1.5, chosen with the probe on R2R *train*).  Layouts by ``dim``: 768 (default) =
``[near | far + room + stairs]``; 1152 = ``[near | far | room + stairs]``; 384 = the sum of all
parts.  Any other width is a fixed orthonormal projection (seed 0) of the 1152 layout (or zero
padding above 1152).

Per view there is also a class distribution over 1000 classes for MRC: class 0 "background"
(nothing annotated), then the object names of the R2R *train* houses by viewpoint frequency (978
names; the remaining slots are named "unusedN" and stay empty), 999 "other" (names unseen in train);
a view's distribution is the area-weighted (near) and apparent-size-weighted (far) share of each class.

Per object (REVERIE) the object file holds ``[E(name) | room embedding of the viewpoint]`` (768)
with the community attributes (ids, directions, sizes, boxes, view ids, names).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from tqdm import tqdm

from minivln.data.graph import House, list_scans, load_house
from minivln.features.embed import EMBED_DIM, MODEL_NAME, TextEmbedder, default_embedder
from minivln.features.hdf5 import (
    NUM_CLASSES,
    FeatureWriter,
    ObjectFeatures,
    ObjectFeatureWriter,
)
from minivln.geometry import NUM_VIEWS, VIEW_ELEVATIONS, VIEW_HEADINGS, wrap_angle
from minivln.paths import (
    DataError,
    WriteError,
    check_free_space,
    check_writable_dir,
    remove_stale_temporaries,
    resolve_data_dir,
    same_file,
)

GENERATOR_VERSION = 1
IMAGE_W, IMAGE_H = 640, 480
VFOV = math.radians(60.0)
FOCAL = (IMAGE_H / 2) / math.tan(VFOV / 2)  # pixels
HALF_HFOV = math.atan((IMAGE_W / 2) / FOCAL)
HALF_VFOV = VFOV / 2

# Region types of Matterport3D, in the words instructions use for them.
ROOM_WORDS = (
    "bathroom", "bedroom", "closet", "dining room", "entryway", "family room", "garage", "hallway",
    "library", "laundry room", "kitchen", "living room", "meeting room", "lounge", "office", "porch",
    "game room", "stairs", "toilet", "utility room", "tv room", "gym", "patio", "balcony", "bar", "spa",
)
STAIRS_ROOM = ROOM_WORDS.index("stairs")
BACKGROUND_CLASS = "background"
OTHER_CLASS = "other"

STANDIN_DESCRIPTION = (
    "STAND-IN features, not computed from images: MiniVLN {version} derived them from the REVERIE "
    "BBox annotations (objects within 3 m of each viewpoint, per view) and the Matterport3D "
    "connectivity graphs, embedded with all-MiniLM-L6-v2. Layout: {layout}."
)


@dataclass(frozen=True)
class StandinConfig:
    """Knobs of the stand-in (defaults chosen on R2R *train* with ``probe``; see docs/features.md)."""

    dim: int = 768
    area_power: float = 0.5  # near boxes weigh area**area_power (area as a fraction of the image)
    use_idf: bool = True  # weigh names by inverse viewpoint frequency in the train houses
    far_power: float = 1.0  # far objects weigh (size / distance) ** far_power
    far_max_dist: float = 20.0  # metres
    prior_range: float = 1.5  # metres: where a single ray puts an object (BBox objects are < 3 m)
    near_weight: float = 0.1
    far_weight: float = 0.5
    room_weight: float = 4.0
    stairs_weight: float = 1.5
    room_temperature: float = 0.03  # of the embedding start of the room model
    room_iterations: int = 0  # naive-Bayes EM rounds on train co-occurrence (0: embedding only)
    room_smoothing: float = 1.0  # weight of nearby same-floor viewpoints in a room estimate
    stairs_rise: float = 0.75  # metres of height change to a neighbour that mean "stairs"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


# -- annotations ---------------------------------------------------------------------------------
@dataclass
class BoxSighting:
    """One box of one object in one view of one viewpoint."""

    vp: int  # index into House.vp_ids
    obj: int  # index into HouseObjects.obj_ids
    view: int
    box: tuple[float, float, float, float]  # x, y, w, h pixels


@dataclass
class HouseObjects:
    """The BBox annotations of one house, flattened."""

    scan: str
    obj_ids: list[int]
    names: list[str]
    observations: list[BoxSighting]
    per_vp: list[dict[int, list[tuple[int, tuple[float, float, float, float]]]]] = field(default_factory=list)

    def vp_names(self, i: int) -> list[str]:
        return [self.names[o] for o in self.per_vp[i]]


def bbox_file(data_dir: Path, scan: str, vp: str) -> Path:
    return data_dir / "REVERIE" / "BBox" / f"{scan}_{vp}.json"


def name_text(name: str) -> str:
    """A BBox object name as words: ``"coffee#table"`` -> ``"coffee table"``."""
    return " ".join(name.replace("#", " ").replace("_", " ").split()).lower()


def load_house_objects(house: House, data_dir: str | os.PathLike | None = None) -> HouseObjects:
    """Read the BBox files of every included viewpoint of ``house``."""
    root = resolve_data_dir(data_dir)
    bdir = root / "REVERIE" / "BBox"
    if not bdir.is_dir():
        raise DataError(f"no BBox annotations: {bdir} is missing (the stand-in is built from them)")
    obj_index: dict[int, int] = {}
    names: list[str] = []
    obs: list[BoxSighting] = []
    per_vp: list[dict] = []
    for i, vp in enumerate(house.vp_ids):
        path = bbox_file(root, house.scan, vp)
        seen: dict[int, list] = {}
        per_vp.append(seen)
        if not path.is_file():
            continue  # an included viewpoint without a file sees no annotated object
        try:
            data = json.loads(path.read_text())
            objs = data.get(vp, {}) if isinstance(data, dict) else {}
            for oid_s, o in objs.items():
                oid = int(oid_s)
                views, boxes = o["visible_pos"], o["bbox2d"]
                if len(views) != len(boxes):
                    raise ValueError(f"object {oid}: {len(views)} views but {len(boxes)} boxes")
                if not views:
                    continue  # listed but in no view: nothing to place
                if oid not in obj_index:
                    obj_index[oid] = len(names)
                    names.append(str(o["name"]))
                j = obj_index[oid]
                lst = seen.setdefault(j, [])
                for v, b in zip(views, boxes):
                    v = int(v)
                    if not 0 <= v < NUM_VIEWS or len(b) != 4:
                        raise ValueError(f"object {oid}: bad view {v} or box {b}")
                    box = (float(b[0]), float(b[1]), float(b[2]), float(b[3]))
                    lst.append((v, box))
                    obs.append(BoxSighting(i, j, v, box))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DataError(f"{path} is malformed: {exc}") from exc
    obj_ids = [0] * len(names)
    for oid, j in obj_index.items():
        obj_ids[j] = oid
    return HouseObjects(house.scan, obj_ids, names, obs, per_vp)


def train_scans(data_dir: Path) -> list[str]:
    """Houses of the R2R train split (used to fit the name statistics: idf, class vocabulary)."""
    path = data_dir / "R2R" / "R2R_train.json"
    if not path.is_file():
        raise DataError(f"{path} is missing (the class vocabulary and idf come from the train houses)")
    return sorted({item["scan"] for item in json.loads(path.read_text())})


def name_viewpoint_counts(data_dir: Path, scans: Iterable[str]) -> tuple[Counter, int, list[frozenset[str]]]:
    """For each object name, at how many viewpoints of ``scans`` it is annotated (BBox files);
    also the number of viewpoints and the set of names at each viewpoint that has any."""
    wanted = set(scans)
    bdir = data_dir / "REVERIE" / "BBox"
    if not bdir.is_dir():
        raise DataError(f"no BBox annotations: {bdir} is missing (the stand-in is built from them)")
    df: Counter = Counter()
    n = 0
    vp_names: list[frozenset[str]] = []
    for entry in sorted(os.scandir(bdir), key=lambda e: e.name):
        scan, _, rest = entry.name.partition("_")
        if scan not in wanted or not rest.endswith(".json"):
            continue
        vp = rest[: -len(".json")]
        n += 1
        try:
            objs = json.loads(Path(entry.path).read_text()).get(vp, {})
            names = frozenset(str(o["name"]) for o in objs.values() if o.get("visible_pos"))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise DataError(f"{entry.path} is malformed: {exc}") from exc
        df.update(names)
        if names:
            vp_names.append(names)
    return df, n, vp_names


# -- shared resources ----------------------------------------------------------------------------
class Resources:
    """What all houses share: name embeddings, idf, class vocabulary, room words."""

    def __init__(self, data_dir: str | os.PathLike | None = None, embedder: TextEmbedder | None = None):
        self.data_dir = resolve_data_dir(data_dir)
        self.embedder = embedder or default_embedder()
        df, n, vp_names = name_viewpoint_counts(self.data_dir, train_scans(self.data_dir))
        self.train_df = df
        self.train_vps = n
        self._train_vp_names = vp_names
        self._room_models: dict[tuple[float, int], RoomModel] = {}
        ranked = sorted(df, key=lambda k: (-df[k], k))[: NUM_CLASSES - 2]
        self.class_names = [BACKGROUND_CLASS, *ranked]
        self.class_names += [f"unused{i}" for i in range(NUM_CLASSES - 1 - len(self.class_names))]
        self.class_names.append(OTHER_CLASS)
        self.class_index = {c: i for i, c in enumerate(self.class_names) if c in df}
        self.room_emb = self.embedder.embed(list(ROOM_WORDS))
        self.stairs_emb = self.embedder.embed_one("stairs")
        self._name_emb: dict[str, np.ndarray] = {}

    def idf(self, name: str) -> float:
        """``log((1 + N) / (1 + df))``, from the train houses (unseen names get the largest value)."""
        return math.log((1 + self.train_vps) / (1 + self.train_df.get(name, 0)))

    def class_of(self, name: str) -> int:
        return self.class_index.get(name, NUM_CLASSES - 1)

    def room_model(self, cfg: StandinConfig) -> RoomModel:
        """The object -> room-type model for ``cfg`` (fitted once on the train houses)."""
        key = (cfg.room_temperature, cfg.room_iterations)
        if key not in self._room_models:
            self._room_models[key] = fit_room_model(self, cfg.room_temperature, cfg.room_iterations)
        return self._room_models[key]

    def name_embeddings(self, names: list[str]) -> np.ndarray:
        """Unit MiniLM embeddings of object names, ``(len(names), 384)`` (each embedded once)."""
        todo = sorted({n for n in names if n not in self._name_emb})
        if todo:
            vecs = self.embedder.embed([name_text(n) for n in todo])
            self._name_emb.update(zip(todo, vecs))
        if not names:
            return np.zeros((0, EMBED_DIM), np.float32)
        return np.stack([self._name_emb[n] for n in names])


# -- rooms ---------------------------------------------------------------------------------------
@dataclass
class RoomModel:
    """Log-evidence each object name gives for each room type, plus a prior over room types.

    Start: a name's MiniLM similarity to each room word, centred over the rooms (so generic names
    such as "picture" say little), divided by a temperature.  Then ``iterations`` rounds of
    naive-Bayes EM on the co-occurrence of names at the viewpoints of the train houses: room
    posteriors per viewpoint -> per name ``log p(name | room) - log p(name)`` -> posteriors.  A name
    inherits the rooms of the names it is found with ("nightstand" next to "bed" -> bedroom), and
    names found everywhere end up with no evidence.  Names unseen in train keep the start values.
    """

    evidence: dict[str, np.ndarray]
    log_prior: np.ndarray  # (R,)
    fallback_scale: float  # applied to the embedding start for names unseen in train
    temperature: float

    def name_evidence(self, names: list[str], res: Resources) -> np.ndarray:
        out = np.zeros((len(names), len(ROOM_WORDS)), np.float32)
        missing = [i for i, n in enumerate(names) if n not in self.evidence]
        for i, n in enumerate(names):
            if n in self.evidence:
                out[i] = self.evidence[n]
        if missing:
            sim = res.name_embeddings([names[i] for i in missing]) @ res.room_emb.T
            out[missing] = (sim - sim.mean(1, keepdims=True)) / self.temperature * self.fallback_scale
        return out


@dataclass
class Sparse:
    """A sparse matrix as its entries in row-major order, duplicates summed (scipy's canonical CSR
    form), with the few operations the builder needs.  :meth:`dot` sums each output row over the row's
    entries in column order, in the matrix's float type, as scipy's CSR product does: the same floats as
    when this module used scipy (``tests/test_features.py`` checks it against scipy)."""

    rows: np.ndarray  # (nnz,) int64, sorted by (row, column)
    cols: np.ndarray  # (nnz,) int64
    vals: np.ndarray  # (nnz,)
    shape: tuple[int, int]

    @classmethod
    def of(cls, vals: np.ndarray, rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int],
           dtype: type = np.float32) -> Sparse:
        """From entries in any order (``vals`` cast to ``dtype``; repeated positions summed)."""
        rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
        order = np.lexsort((cols, rows))
        rows, cols, vals = rows[order], cols[order], np.asarray(vals).astype(dtype)[order]
        first = np.ones(len(rows), bool)
        first[1:] = (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1])
        starts = np.flatnonzero(first)
        if len(starts) < len(rows):
            vals = np.add.reduceat(vals, starts)
        return cls(rows[starts], cols[starts], vals, (int(shape[0]), int(shape[1])))

    def transpose(self) -> Sparse:
        return Sparse.of(self.vals, self.cols, self.rows, (self.shape[1], self.shape[0]), self.vals.dtype)

    def plus(self, other: Sparse) -> Sparse:
        return Sparse.of(np.concatenate([self.vals, other.vals]), np.concatenate([self.rows, other.rows]),
                         np.concatenate([self.cols, other.cols]), self.shape, self.vals.dtype)

    def sum(self, axis: int) -> np.ndarray:
        """Row sums (``axis=1``) or column sums (``axis=0``), in the matrix's float type."""
        m = self if axis == 1 else self.transpose()
        return m.dot(np.ones((m.shape[1], 1), self.vals.dtype))[:, 0]

    def dot(self, x: np.ndarray) -> np.ndarray:
        """``self @ x`` for a dense ``x`` (K, D): round k adds every row's k-th entry times its row of x."""
        y = np.zeros((self.shape[0], x.shape[1]), np.result_type(self.vals, x))
        rank = np.arange(len(self.rows)) - np.searchsorted(self.rows, self.rows)  # place within its row
        order = np.argsort(rank, kind="stable")
        bounds = np.searchsorted(rank[order], np.arange(int(rank.max(initial=-1)) + 2))
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            k = order[lo:hi]  # at most one entry per row
            y[self.rows[k]] += self.vals[k, None] * x[self.cols[k]]
        return y


def _softmax_rows(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def fit_room_model(res: Resources, temperature: float, iterations: int, alpha: float = 1.0) -> RoomModel:
    """Fit the ``RoomModel`` on the viewpoints of the train houses (see its docstring)."""

    uniform = np.log(np.full(len(ROOM_WORDS), 1.0 / len(ROOM_WORDS), np.float32))
    if iterations == 0:  # the embedding start alone, for every name
        return RoomModel({}, uniform, 1.0, temperature)
    names = sorted(res.train_df)
    index = {n: i for i, n in enumerate(names)}
    sim = res.name_embeddings(names) @ res.room_emb.T
    start = (sim - sim.mean(1, keepdims=True)) / temperature  # (V, R)
    rows = [i for i, vs in enumerate(res._train_vp_names) for _ in vs]
    cols = [index[n] for vs in res._train_vp_names for n in vs]
    m = Sparse.of(np.ones(len(rows), np.float32), rows, cols, (len(res._train_vp_names), len(names)))
    m_t = m.transpose()
    counts = m.sum(1)
    post = _softmax_rows(m.dot(start) / np.maximum(counts, 1)[:, None])  # mean start evidence
    evidence = start
    n_u, n_v = m.shape
    df = m.sum(0)
    for _ in range(iterations):
        c = m_t.dot(post)  # (V, R) soft co-occurrence counts
        z = post.sum(0)  # (R,)
        evidence = (np.log((c + alpha) / (z + alpha * n_v))
                    - np.log((df + alpha) / (n_u + alpha * n_v))[:, None])
        # A uniform prior: frequent room types must not swallow the rest as rounds go on.
        post = _softmax_rows(m.dot(evidence))
    scale = 1.0
    if iterations:
        scale = float(np.abs(evidence).mean() / max(np.abs(start).mean(), 1e-8))
    return RoomModel({n: evidence[i].astype(np.float32) for i, n in enumerate(names)}, uniform, scale,
                     temperature)


# -- geometry ------------------------------------------------------------------------------------
def box_directions(views: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Unit world vectors ``(K, 3)`` (x, y, z; z up) through the centres of ``boxes`` (K, 4: x, y, w, h)
    seen in ``views`` (K,) of the 36-view panorama (640x480 images, 60 degree vertical field of view)."""
    views = np.asarray(views, dtype=np.int64)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    u = (boxes[:, 0] + boxes[:, 2] / 2 - IMAGE_W / 2) / FOCAL  # right
    v = (IMAGE_H / 2 - (boxes[:, 1] + boxes[:, 3] / 2)) / FOCAL  # up
    hd, el = VIEW_HEADINGS[views], VIEW_ELEVATIONS[views]
    sh, ch, se, ce = np.sin(hd), np.cos(hd), np.sin(el), np.cos(el)
    fwd = np.stack([sh * ce, ch * ce, se], axis=1)
    right = np.stack([ch, -sh, np.zeros_like(sh)], axis=1)
    up = np.stack([-sh * se, -ch * se, ce], axis=1)
    d = fwd + u[:, None] * right + v[:, None] * up
    return d / np.linalg.norm(d, axis=1, keepdims=True)


def box_direction(view: int, box: tuple[float, float, float, float]) -> np.ndarray:
    """Unit world vector through the centre of one ``box`` (x, y, w, h) in ``view``."""
    return box_directions(np.array([view]), np.array([box]))[0]


def heading_elevation(vec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Heading (from +y, clockwise) and elevation of direction vectors ``(..., 3)``."""
    heading = np.arctan2(vec[..., 0], vec[..., 1]) % (2 * math.pi)
    elevation = np.arctan2(vec[..., 2], np.hypot(vec[..., 0], vec[..., 1]))
    return heading, elevation


def view_kernel(heading: np.ndarray, elevation: np.ndarray) -> np.ndarray:
    """Soft membership ``(..., 36)`` of directions in the 36 view frusta (tent kernels)."""
    dt = np.result_type(heading, np.float32)
    dh = np.abs(wrap_angle(heading[..., None] - VIEW_HEADINGS.astype(dt)))
    de = np.abs(elevation[..., None] - VIEW_ELEVATIONS.astype(dt))
    return np.clip(1 - dh / HALF_HFOV, 0, None) * np.clip(1 - de / HALF_VFOV, 0, None)


def triangulate(house: House, objs: HouseObjects, prior_range: float) -> tuple[np.ndarray, np.ndarray]:
    """Estimated 3-D position ``(O, 3)`` and physical size ``(O,)`` (metres) of every object.

    Least-squares point nearest to all box-centre rays (weighted by box area), regularised towards
    ``prior_range`` metres along each ray so that objects seen from one place land in front of it;
    kept within 3.5 m of the nearest viewpoint that sees it.  Size = sqrt(largest box area fraction)
    times the distance it was seen from (a box of a third of the view at 2 m ~ 1.2 m).
    """
    n_obj, lam = len(objs.names), 0.05
    if not objs.observations:
        return np.zeros((n_obj, 3)), np.zeros(n_obj)
    vp = np.array([ob.vp for ob in objs.observations])
    obj = np.array([ob.obj for ob in objs.observations])
    boxes = np.array([ob.box for ob in objs.observations])
    d = box_directions(np.array([ob.view for ob in objs.observations]), boxes)  # (K, 3)
    p = house.positions[vp]  # (K, 3)
    w = np.maximum(boxes[:, 2] * boxes[:, 3] / (IMAGE_W * IMAGE_H), 1e-4)
    proj = np.eye(3)[None] - d[:, :, None] * d[:, None, :]  # (K, 3, 3)
    a_mat = np.zeros((n_obj, 3, 3))
    b_vec = np.zeros((n_obj, 3))
    np.add.at(a_mat, obj, w[:, None, None] * (proj + lam * np.eye(3)[None]))
    np.add.at(b_vec, obj, w[:, None] * (np.einsum("kij,kj->ki", proj, p) + lam * (p + prior_range * d)))
    has = np.zeros(n_obj, bool)
    has[obj] = True
    a_mat[~has] = np.eye(3)
    pos = np.linalg.solve(a_mat, b_vec[..., None])[..., 0]
    # Keep each object within 3.5 m of the nearest viewpoint that sees it.
    dist = np.linalg.norm(p - pos[obj], axis=1)
    nearest = np.full(n_obj, np.inf)
    np.minimum.at(nearest, obj, dist)
    k_near = np.flatnonzero(dist == nearest[obj])
    anchor = np.zeros((n_obj, 3))
    anchor[obj[k_near]] = p[k_near]
    far = has & (nearest > 3.5)
    pos[far] = anchor[far] + (pos[far] - anchor[far]) * (3.5 / nearest[far])[:, None]
    # Size from the largest box: sqrt(area fraction) x the distance it was seen from.
    best = np.zeros(n_obj)
    np.maximum.at(best, obj, w)
    k_best = np.flatnonzero(w == best[obj])
    size = np.zeros(n_obj)
    size[obj[k_best]] = np.sqrt(w[k_best]) * np.maximum(np.linalg.norm(p[k_best] - pos[obj[k_best]], axis=1), 0.3)
    pos[~has] = 0.0
    return pos, size


def step_score(dz: np.ndarray | float, rise: float) -> np.ndarray:
    """0 below 0.25 m of height change (camera noise, thresholds), 1 from ``rise`` metres up."""
    return np.clip((np.abs(dz) - 0.25) / max(rise - 0.25, 1e-3), 0.0, 1.0)


def stairness(house: House, rise: float) -> np.ndarray:
    """Per viewpoint, how much it looks like a staircase (0..1): height change to its neighbours."""
    n = len(house)
    s = np.zeros(n)
    for i in range(n):
        nb = np.flatnonzero(house.adjacency[i])
        if len(nb) == 0:
            continue
        dz = np.abs(house.positions[nb, 2] - house.positions[i, 2])
        s[i] = float(step_score(dz.max(), rise))
    return s


# -- per house -------------------------------------------------------------------------------------
@dataclass
class HouseFeatures:
    """Stand-in features of one house."""

    scan: str
    vp_ids: list[str]
    fts: np.ndarray  # (N, 36, dim) float32
    class_probs: np.ndarray  # (N, 36, 1000) float32
    rooms: np.ndarray  # (N, len(ROOM_WORDS)) room-type distribution per viewpoint
    objects: list[ObjectFeatures]  # per viewpoint


def _unit(x: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.where(n > eps, x / np.maximum(n, eps), 0.0)


def _projection(dim: int) -> np.ndarray:
    """Fixed orthonormal map from the 1152-d native layout to ``dim`` (zero padding above 1152)."""
    native = 3 * EMBED_DIM
    if dim >= native:
        return np.eye(dim, native, dtype=np.float32)
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((native, dim)))
    return q.T.astype(np.float32)


def layout_name(dim: int) -> str:
    if dim == 768:
        return "768 = [near objects (384) | far objects + room + stairs (384)], MiniLM space"
    if dim == 1152:
        return "1152 = [near objects (384) | far objects (384) | room + stairs (384)], MiniLM space"
    if dim == EMBED_DIM:
        return "384 = near + far + room + stairs (weighted sum), MiniLM space"
    return f"{dim} = fixed orthonormal projection (seed 0) of the 1152 layout"


def compose(near: np.ndarray, far: np.ndarray, ctx: np.ndarray, cfg: StandinConfig) -> np.ndarray:
    """Lay out the parts (each ``(..., 384)``, unit or zero) as ``(..., cfg.dim)``."""
    n, f, c = cfg.near_weight * near, cfg.far_weight * far, ctx
    if cfg.dim == EMBED_DIM:
        return n + f + c
    if cfg.dim == 2 * EMBED_DIM:
        return np.concatenate([n, f + c], axis=-1)
    native = np.concatenate([n, f, c], axis=-1)
    if cfg.dim == 3 * EMBED_DIM:
        return native
    return native @ _projection(cfg.dim).T


def text_query(emb: np.ndarray, dim: int) -> np.ndarray:
    """Map text embeddings ``(..., 384)`` into the stand-in layout of width ``dim``, so that a
    cosine with a view feature adds up the cosines with each part."""
    if dim == EMBED_DIM:
        return emb
    if dim == 2 * EMBED_DIM:
        return np.concatenate([emb, emb], axis=-1)
    native = np.concatenate([emb, emb, emb], axis=-1)
    if dim == 3 * EMBED_DIM:
        return native
    return native @ _projection(dim).T


def room_distributions(house: House, objs: HouseObjects, res: Resources, cfg: StandinConfig,
                       obj_weight: np.ndarray) -> np.ndarray:
    """Room-type distribution ``(N, R)`` per viewpoint, from the objects around it and geometry.

    Evidence of the objects at each viewpoint (``RoomModel``; summed when the model was fitted
    with EM, area-weighted mean otherwise), averaged with that of nearby same-floor viewpoints
    (``room_smoothing``), plus the prior, through a softmax; then staircase viewpoints move
    their mass to "stairs" as far as they look like one.
    """
    model = res.room_model(cfg)
    ev = model.name_evidence(objs.names, res)  # (O, R)
    present = obj_weight > 0
    if cfg.room_iterations:
        logits = present.astype(np.float32) @ ev
    else:
        logits = (obj_weight @ ev) / np.maximum(obj_weight.sum(1), 1e-6)[:, None]
    has = present.any(1).astype(np.float32)
    # Smooth over nearby viewpoints on the same floor (a room is bigger than 3 m).
    pos = house.positions
    dz = np.abs(pos[:, None, 2] - pos[None, :, 2])
    d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    nb = (house.visible | house.adjacency) & (dz < 1.0)
    kern = np.where(nb, np.exp(-d / 3.0), 0.0) * cfg.room_smoothing
    np.fill_diagonal(kern, 1.0)
    smoothed = (kern @ logits) / np.maximum(kern @ has, 1e-6)[:, None]
    p = _softmax_rows(smoothed + model.log_prior)
    s = stairness(house, cfg.stairs_rise)
    p = p * (1 - s[:, None])
    p[:, STAIRS_ROOM] += s
    return p


@dataclass
class HouseParts:
    """The parts a stand-in view feature is made of, before they are weighted and laid out."""

    near: np.ndarray  # (N, 36, 384) unit or zero
    far: np.ndarray  # (N, 36, 384) unit or zero
    room_dir: np.ndarray  # (N, 36, 384) unit
    stairs: np.ndarray  # (N, 36) 0..1
    rooms: np.ndarray  # (N, R)
    room_vec: np.ndarray  # (N, 384) unit
    class_probs: np.ndarray  # (N, 36, 1000)


def house_parts(house: House, objs: HouseObjects, res: Resources,
                cfg: StandinConfig = StandinConfig()) -> HouseParts:
    """Near/far object embeddings, room and stairs cues and class distributions of every view."""

    n, n_obj, nv = len(house), len(objs.names), NUM_VIEWS
    pos = house.positions.astype(np.float32)
    emb = res.name_embeddings(objs.names)  # (O, 384)
    idf = np.array([res.idf(x) if cfg.use_idf else 1.0 for x in objs.names], dtype=np.float32)
    cls = np.array([res.class_of(x) for x in objs.names], dtype=np.int64)
    obj_pos, obj_size = triangulate(house, objs, cfg.prior_range) if n_obj else (np.zeros((0, 3)), np.zeros(0))
    obj_pos, obj_size = obj_pos.astype(np.float32), obj_size.astype(np.float32)

    # Near: the boxes of each view, area-weighted.  Rows are vp * 36 + view.
    ob_vp = np.array([ob.vp for ob in objs.observations], dtype=np.int64)
    ob_obj = np.array([ob.obj for ob in objs.observations], dtype=np.int64)
    ob_view = np.array([ob.view for ob in objs.observations], dtype=np.int64)
    area = np.array([ob.box[2] * ob.box[3] for ob in objs.observations], dtype=np.float32) / (IMAGE_W * IMAGE_H)
    near_val = np.maximum(area, 1e-4) ** cfg.area_power
    near_w = Sparse.of(near_val, ob_vp * nv + ob_view, ob_obj, (n * nv, n_obj))
    obj_weight = np.zeros((n, n_obj), np.float32)  # per viewpoint, summed over views
    np.add.at(obj_weight, (ob_vp, ob_obj), near_val)

    # Far: objects seen from viewpoints visible from u (and not near u), where they would appear.
    far_w = Sparse.of(np.zeros(0, np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64), (n * nv, n_obj))
    if n_obj:
        seen_by = np.zeros((n, n_obj), dtype=np.float32)
        seen_by[ob_vp, ob_obj] = 1.0
        gate = ((house.visible.astype(np.float32) @ seen_by) > 0) & (obj_weight == 0)
        vec = obj_pos[None] - pos[:, None]  # (N, O, 3)
        dist = np.linalg.norm(vec, axis=-1)
        gate &= dist <= cfg.far_max_dist
        pu, po = np.nonzero(gate)
        if len(pu):
            apparent = (obj_size[po] / np.maximum(dist[pu, po], 0.5)) ** 2  # like an area fraction
            scalar = np.minimum(apparent, 1.0) ** (cfg.far_power / 2)
            hd, el = heading_elevation(vec[pu, po])
            kern = view_kernel(hd, el) * scalar[:, None]  # (P, 36)
            pi, vi = np.nonzero(kern)
            far_w = Sparse.of(kern[pi, vi], pu[pi] * nv + vi, po[pi], (n * nv, n_obj))

    weighted_emb = emb * idf[:, None]
    near = _unit(near_w.dot(weighted_emb).reshape(n, nv, EMBED_DIM))
    far = _unit(far_w.dot(weighted_emb).reshape(n, nv, EMBED_DIM))

    # Rooms: of u, and of the viewpoints visible in each direction (nearer ones weigh more).
    rooms = room_distributions(house, objs, res, cfg, obj_weight)
    room_vec = _unit(rooms @ res.room_emb).astype(np.float32)  # (N, 384)
    vp_vec = pos[None] - pos[:, None]  # (N, N, 3)
    vp_dist = np.linalg.norm(vp_vec, axis=-1)
    vhd, vel = heading_elevation(vp_vec)
    vis = house.visible & (vp_dist <= cfg.far_max_dist)
    vkern = (view_kernel(vhd, vel) * vis[..., None]).transpose(0, 2, 1)  # (N, 36, N)
    room_dir = (vkern / np.maximum(vp_dist, 1.0)[:, None, :]) @ room_vec  # (N, 36, 384)
    empty = np.linalg.norm(room_dir, axis=-1) < 1e-8
    room_dir = _unit(np.where(empty[..., None], room_vec[:, None, :], room_dir))

    # Stairs: views that look at a viewpoint with a large height change.
    dz = np.abs(pos[None, :, 2] - pos[:, None, 2])
    steep = step_score(dz, cfg.stairs_rise).astype(np.float32)  # (N, N)
    stairs = (vkern * steep[:, None, :]).max(-1) if n else np.zeros((0, nv), np.float32)

    # Class distribution per view: area shares of classes (background when nothing is annotated).
    views = near_w.plus(far_w)  # (N * 36, O): the weight of each object in each view
    probs = np.zeros((n * nv, NUM_CLASSES), np.float32)
    np.add.at(probs, (views.rows, cls[views.cols]), views.vals)  # in column order, as a sparse product sums
    probs = probs.reshape(n, nv, NUM_CLASSES)
    tot = probs.sum(-1, keepdims=True)
    probs /= np.maximum(tot, 1e-12)
    probs[tot[..., 0] <= 0, 0] = 1.0
    return HouseParts(near, far, room_dir, stairs.astype(np.float32), rooms, room_vec, probs)


def compose_parts(parts: HouseParts, res: Resources, cfg: StandinConfig) -> np.ndarray:
    """Weight and lay out the parts: ``(N, 36, cfg.dim)`` float32."""
    ctx = cfg.room_weight * parts.room_dir + cfg.stairs_weight * parts.stairs[..., None] * res.stairs_emb
    return compose(parts.near, parts.far, ctx, cfg).astype(np.float32)


def build_house_features(house: House, objs: HouseObjects, res: Resources,
                         cfg: StandinConfig = StandinConfig()) -> HouseFeatures:
    """Compute the stand-in view features, class distributions and object features of one house."""
    parts = house_parts(house, objs, res, cfg)
    fts = compose_parts(parts, res, cfg)
    emb = res.name_embeddings(objs.names)
    objects = [_object_features(i, objs, emb, parts.room_vec[i]) for i in range(len(house))]
    return HouseFeatures(house.scan, list(house.vp_ids), fts, parts.class_probs, parts.rooms, objects)


def _object_features(i: int, objs: HouseObjects, emb: np.ndarray, room_vec: np.ndarray) -> ObjectFeatures:
    """REVERIE object features at viewpoint ``i``: ``[E(name) | room]`` + the box of its largest view."""
    seen = objs.per_vp[i]
    k = len(seen)
    fts = np.zeros((k, 2 * EMBED_DIM), np.float32)
    ids = np.zeros(k, np.int64)
    dirs = np.zeros((k, 2), np.float32)
    sizes = np.zeros((k, 2), np.float32)
    boxes = np.zeros((k, 4), np.float32)
    views = np.zeros(k, np.int64)
    names = []
    for r, (o, lst) in enumerate(sorted(seen.items(), key=lambda t: objs.obj_ids[t[0]])):
        # The view where the box is largest; ties -> the box nearest the image centre.
        view, (x, y, w, h) = max(
            lst, key=lambda t: (t[1][2] * t[1][3], -abs(t[1][0] + t[1][2] / 2 - IMAGE_W / 2)))
        hd, el = heading_elevation(box_direction(view, (x, y, w, h)))
        fts[r, :EMBED_DIM] = emb[o]
        fts[r, EMBED_DIM:] = room_vec
        ids[r] = objs.obj_ids[o]
        dirs[r] = (float(hd), float(el))
        sizes[r] = (w, h)
        boxes[r] = (x, y, x + w, y + h)
        views[r] = view
        names.append(objs.names[o])
    return ObjectFeatures(fts, ids, dirs, sizes, boxes, views, names)


# -- whole data set --------------------------------------------------------------------------------
def iter_house_features(data_dir: str | os.PathLike | None = None, scans: list[str] | None = None,
                        cfg: StandinConfig = StandinConfig(), res: Resources | None = None,
                        progress: bool = False) -> Iterable[HouseFeatures]:
    """Stand-in features house by house (all houses of the data directory by default)."""
    root = resolve_data_dir(data_dir)
    scans = scans if scans is not None else list_scans(root)
    res = res or Resources(root)
    bar = None
    if progress:

        total = sum(len(load_house(s, root)) for s in scans)
        bar = tqdm(total=total, desc="stand-in features", unit="vp")
    for scan in scans:
        house = load_house(scan, root)
        hf = build_house_features(house, load_house_objects(house, root), res, cfg)
        if bar is not None:
            bar.update(len(house))
        yield hf
    if bar is not None:
        bar.close()


def build_standin(data_dir: str | os.PathLike | None, out: str | os.PathLike, *,
                  objects_out: str | os.PathLike | None = None, scans: list[str] | None = None,
                  cfg: StandinConfig = StandinConfig(), dtype: str = "float16",
                  class_layout: str = "separate", progress: bool = False,
                  res: Resources | None = None, compress: bool = False,
                  on_house: Callable[[HouseFeatures], None] | None = None) -> dict:
    """Build stand-in view features (and optionally object features) into HDF5 files, atomically
    (``compress``: the view features gzip-compressed, lossless: :class:`FeatureWriter`).

    Returns a summary: houses, viewpoints, seconds, paths.
    """
    t0 = time.perf_counter()
    root = resolve_data_dir(data_dir)
    out = Path(out)
    if objects_out is not None and same_file(objects_out, out):
        raise DataError(f"the object features and the view features would both go to {out}: give each its own file")
    # before any work: the output folder must take files, and the view file (whose size is known from
    # the number of viewpoints) must fit beside whatever it replaces.  The temporary files that a
    # killed build of the same target left beside it (.NAME.tmpPID, PID no longer running; see
    # minivln.features.hdf5) are removed first: they only take space.
    for target in [out] + ([Path(objects_out)] if objects_out is not None else []):
        if target.is_dir():
            raise WriteError(f"cannot write {target}: it is a directory")
        check_writable_dir(target.parent, "output directory")
        remove_stale_temporaries(target)
    scans = scans if scans is not None else list_scans(root)
    n_views = sum(len(load_house(s, root)) for s in scans)
    expected = FeatureWriter.estimate_bytes(n_views, cfg.dim, class_layout, dtype)
    check_free_space(out, expected, f"stand-in features for {n_views:,} viewpoints ({class_layout} "
                                           f"class layout, {dtype})")
    res = res or Resources(root)
    layout = layout_name(cfg.dim)
    desc = STANDIN_DESCRIPTION.format(version=f"standin v{GENERATOR_VERSION}", layout=layout)
    attrs = {
        "generator": f"minivln.features.standin v{GENERATOR_VERSION}",
        "embedding_space": MODEL_NAME,
        "block_dim": EMBED_DIM,
        "layout": layout,
        "config": cfg.to_json(),
        "room_words": json.dumps(list(ROOM_WORDS)),
        "created_unix": int(time.time()),
    }
    writer = FeatureWriter(out, dim=cfg.dim, standin=True, description=desc, class_layout=class_layout,
                           class_names=res.class_names, dtype=dtype, attrs=attrs, expected_bytes=expected,
                           compress=compress)
    obj_writer = None
    n_vp = n_house = n_obj = 0
    try:
        if objects_out is not None:
            obj_desc = (f"STAND-IN REVERIE object features (MiniVLN standin v{GENERATOR_VERSION}): "
                        "[all-MiniLM-L6-v2 embedding of the object name (384) | room embedding of the "
                        "viewpoint (384)]; boxes from REVERIE BBox (largest view per object).")
            obj_writer = ObjectFeatureWriter(objects_out, dim=2 * EMBED_DIM, standin=True,
                                             description=obj_desc, dtype=dtype,
                                             attrs={"generator": attrs["generator"],
                                                    "embedding_space": MODEL_NAME})
        for hf in iter_house_features(root, scans, cfg, res, progress):
            for i, vp in enumerate(hf.vp_ids):
                writer.add(hf.scan, vp, hf.fts[i], hf.class_probs[i] if class_layout != "none" else None)
                if obj_writer is not None and len(hf.objects[i]):
                    obj_writer.add(hf.scan, vp, hf.objects[i])
                    n_obj += len(hf.objects[i])
            n_vp += len(hf.vp_ids)
            n_house += 1
            if on_house is not None:
                on_house(hf)
    except BaseException:
        writer.abort()
        if obj_writer is not None:
            obj_writer.abort()
        raise
    writer.close()
    if obj_writer is not None:
        obj_writer.close()
    return {"houses": n_house, "viewpoints": n_vp, "objects": n_obj, "seconds": time.perf_counter() - t0,
            "out": str(out), "objects_out": str(objects_out) if objects_out else None}
