"""Pretraining data: graph-map states on ground-truth path prefixes, built with the TRUE graph.

DUET pretrains on single steps of the expert path (``pretrain_src``; ``docs/training.md``).  A
*state* is a prefix ``path[0..t]`` of an annotated path: the agent has visited those nodes (in that
order), stands at ``path[t]``, and its map is built from the environment's true connectivity:

* visited slots: the prefix nodes, in path order; ghost slots: every neighbour of a visited node
  that is not visited, in order of first sighting (visited node order, then connectivity order);
* pair distances and the shortest-path distance / hop count in the node position features are the
  house's true shortest paths (not the agent's partial graph);
* heading at ``path[0]`` is the episode's; at ``path[k]`` (k > 0) it is the direction of the view in
  which ``path[k]`` is seen from ``path[k-1]`` (as the agent would face after the move);
* the action label is the next path node, or STOP (``None``) at the end of the path (R2R); with a
  REVERIE goal set (``goals``: the viewpoints that see the target object,
  :meth:`minivln.data.reverie.ReverieGoals.episode_goals`) it is the "nearest goal" label instead
  (:func:`minivln.training.agent.nearest_goal_slot`): STOP at a goal viewpoint, else the ghost ``n``
  minimising ``d(current, n) + min_g d(n, g)`` (global slot) and the candidate row minimising the
  same over every candidate, visited or not (local label);
* with an object store (REVERIE) every visited node's observation carries its objects (object tokens
  after the view tokens in the panorama) and ``og_label`` is the index of the episode's ``objId``
  among the current node's objects (-1 when it is not there).

Everything is pure Python / numpy on the CPU; :func:`collate_states` turns a list of
:class:`PrefixState` into one batch dict (panorama inputs of *every* visited node of every sample,
flattened, plus the global/local structure the model needs once the panoramas are encoded, see
:func:`minivln.training.pretrain.encode_states`).

Features: anything with ``get(scan, vp) -> (36, D)`` and (for MRC) ``classes(scan, vp) -> (36, C)``
(:class:`~minivln.features.hdf5.FeatureStore`), or :class:`SyntheticFeatures` (seeded random
features with a random class distribution, for tests and speed runs; NOT image features).  Objects:
anything with ``get(scan, vp) -> ObjectFeatures`` and ``dim``
(:class:`~minivln.features.hdf5.ObjectFeatureStore`), or :class:`SyntheticObjects` (the BBox objects
of each viewpoint with seeded random features).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Sequence

import numpy as np
import torch

from minivln import geometry as geo
from minivln.data.datasets import Episode
from minivln.data.graph import Graphs, House
from minivln.data.tokenizer import CLS_ID, MASK_ID, PAD_ID, SEP_ID, cut_ids
from minivln.env.env import candidates_at
from minivln.features.hdf5 import ObjectFeatures
from minivln.features.standin import EMBED_DIM, _object_features, load_house_objects
from minivln.model.agent_inputs import build_panorama_inputs, pad_tensors, seq_masks
from minivln.model.graph_map import (
    MAX_DIST,
    MAX_STEP,
    Candidate,
    NodeObservation,
    angle_features,
    object_location_fts,
    relative_direction,
    view_direction,
)
from minivln.training.agent import nearest_goal_slot

#: Random replacement ids of MLM (BERT uncased: the first real word piece .. the last).
MLM_RANDOM_LOW, MLM_RANDOM_HIGH = 1996, 29610  # inclusive
#: Label of a state without a valid target (cross-entropy's default ``ignore_index``).
IGNORE_LABEL = -100


# ----------------------------------------------------------------------------------- features


class SyntheticFeatures:
    """Seeded random view features ``(36, dim)`` and class distributions ``(36, classes)`` per
    viewpoint (a hash of seed, scan and viewpoint).  NOT image features: for tests and timing."""

    is_standin = True
    description = "SYNTHETIC random features (not from images)"

    def __init__(self, dim: int = 768, num_classes: int = 1000, seed: int = 0) -> None:
        self.dim, self.num_classes, self.seed = dim, num_classes, seed
        self._cache: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}

    @property
    def has_classes(self) -> bool:
        return True

    def _entry(self, scan: str, vp: str) -> tuple[np.ndarray, np.ndarray]:
        key = (scan, vp)
        hit = self._cache.get(key)
        if hit is None:
            digest = hashlib.sha256(f"{self.seed}/{scan}/{vp}".encode()).digest()
            rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
            fts = rng.standard_normal((36, self.dim)).astype(np.float32)
            logits = rng.standard_normal((36, self.num_classes)).astype(np.float32) * 3.0
            probs = np.exp(logits - logits.max(1, keepdims=True))
            hit = (fts, (probs / probs.sum(1, keepdims=True)).astype(np.float32))
            self._cache[key] = hit
        return hit

    def get(self, scan: str, vp: str) -> np.ndarray:
        return self._entry(scan, vp)[0]

    def classes(self, scan: str, vp: str) -> np.ndarray:
        return self._entry(scan, vp)[1]


class SyntheticObjects:
    """REVERIE objects of every viewpoint from the ``BBox`` files (ids, directions, box sizes as the
    stand-in object file has them, :func:`minivln.features.standin.load_house_objects`) with seeded
    random ``(K, dim)`` features per (scan, object id).  NOT image features: for tests and timing."""

    is_standin = True
    description = "SYNTHETIC random object features (not from images) at the BBox objects"

    def __init__(self, data_dir: str | Path, dim: int = 768, seed: int = 0) -> None:
        self.data_dir = Path(data_dir)
        self.dim, self.seed = dim, seed
        self._graphs = Graphs(self.data_dir)
        self._houses: dict[str, dict[str, Any]] = {}

    def _house(self, scan: str) -> dict[str, Any]:
        hit = self._houses.get(scan)
        if hit is None:
            house = self._graphs[scan]
            objs = load_house_objects(house, self.data_dir)
            hit = {}
            for i, vp in enumerate(house.vp_ids):
                # the stand-in's own per-viewpoint object list (same ids, order, directions and
                # boxes as a stand-in object file); its features are replaced below
                base = _object_features(i, objs, np.zeros((len(objs.names), EMBED_DIM), np.float32),
                                        np.zeros(EMBED_DIM, np.float32))
                fts = np.stack([self._feature(scan, int(o)) for o in base.obj_ids], 0) if len(base) \
                    else np.zeros((0, self.dim), np.float32)
                hit[vp] = ObjectFeatures(fts, base.obj_ids, base.directions, base.sizes, base.bboxes,
                                         base.view_ids, base.names)
            self._houses[scan] = hit
        return hit

    def _feature(self, scan: str, obj_id: int) -> np.ndarray:
        digest = hashlib.sha256(f"obj/{self.seed}/{scan}/{obj_id}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        return rng.standard_normal(self.dim).astype(np.float32)

    def get(self, scan: str, vp: str) -> Any:
        objs = self._house(scan).get(vp)
        if objs is None:
            raise KeyError(f"viewpoint {vp!r} is not an included viewpoint of scan {scan}")
        return objs


def attach_objects(ob: NodeObservation, objects: Any) -> NodeObservation:
    """Fill the object fields of ``ob`` from an ``ObjectFeatures`` (the agent's REVERIE
    observation): features, ids, and angle/box features with directions taken relative to the
    discretised current view."""
    base_h, base_e = view_direction(ob.view_index)
    ob.obj_img_fts = np.asarray(objects.fts, dtype=np.float32)
    ob.obj_ang_fts, ob.obj_box_fts = object_location_fts(objects.directions, objects.sizes, base_h, base_e)
    ob.obj_ids = [int(x) for x in np.asarray(objects.obj_ids).tolist()]
    return ob


def features_have_classes(store: Any) -> bool:
    """Whether ``store`` can give MRC targets (a class distribution per view)."""
    return bool(getattr(store, "has_classes", False)) and hasattr(store, "classes")


# ----------------------------------------------------------------------------------- states


@dataclass
class PrefixState:
    """One pretraining state: episode ``episode``, the agent at ``episode.path[t]``."""

    episode: Episode
    t: int
    txt_ids: list[int]
    obs: list[NodeObservation]  # one per visited node, path order (last = current node)
    gmap_vpids: list[str | None]  # [None] + visited + ghosts
    gmap_visited: list[bool]
    gmap_step_ids: list[int]
    gmap_pos_fts: np.ndarray  # (G, A+3)
    gmap_pair_dists: np.ndarray  # (G, G)
    vp_pos_fts: np.ndarray  # (1 + #candidates, 2(A+3)) rows for [stop] and candidates
    next_vp: str | None  # label node (R2R: next GT node; REVERIE: nearest-goal node), None = STOP
    global_label: int
    local_label: int
    view_classes: np.ndarray | None = None  # (36, C) class distribution of the current node
    token_views: list[int] = field(default_factory=list)  # view index of each current-node token
    uses_objects: bool = False  # observations carry object tokens
    og_label: int = -1  # index of the target object among the current node's objects (-1: none)
    goals: frozenset[str] | None = None  # REVERIE goal set used for the labels

    @property
    def current(self) -> str:
        return self.episode.path[self.t]


def _to_map_candidates(house: House, vp: str, heading: float, elevation: float) -> list[Candidate]:
    return [
        Candidate(
            viewpoint=c.viewpoint, point_id=int(c.view_index), position=np.asarray(c.position, np.float64),
            heading=c.heading, elevation=c.elevation, rel_heading=c.rel_heading,
            rel_elevation=c.rel_elevation, distance=c.distance,
        )
        for c in candidates_at(house, vp, heading, elevation)
    ]


def token_view_indices(ob: NodeObservation) -> list[int]:
    """The view index behind each panorama token, in ``panorama_tokens`` order (candidates first,
    then every other view in increasing index)."""
    views = [int(c.point_id) for c in ob.candidates]
    used = set(views)
    return views + [k for k in range(len(ob.view_features)) if k not in used]


def true_pos_fts(
    house: House, current: str, vpids: Sequence[str | None], heading: float, elevation: float,
    angle_feat_size: int = 4,
) -> np.ndarray:
    """(n, A+3) node position features relative to ``current`` with the TRUE shortest paths
    (distance / 30 and hop count / 10); ``None`` ([stop]) gives angles 0 and distances 0."""
    angles, dists = [], []
    cur_pos = house.position(current)
    for vp in vpids:
        if vp is None:
            angles.append([0.0, 0.0])
            dists.append([0.0, 0.0, 0.0])
            continue
        h, e, d = relative_direction(cur_pos, house.position(vp), heading, elevation)
        hops = 0 if vp == current else len(house.shortest_path(current, vp)) - 1
        angles.append([h, e])
        dists.append([d / MAX_DIST, house.distance(current, vp) / MAX_DIST, hops / MAX_STEP])
    ang = np.array(angles, dtype=np.float64).reshape(-1, 2).astype(np.float32)
    dst = np.array(dists, dtype=np.float64).reshape(-1, 3).astype(np.float32)
    return np.concatenate([angle_features(ang[:, 0], ang[:, 1], angle_feat_size), dst], 1)


def build_state(
    episode: Episode,
    t: int,
    house: House,
    features: Any,
    txt_ids: list[int],
    *,
    angle_feat_size: int = 4,
    with_classes: bool = False,
    objects: Any = None,
    goals: Collection[str] | None = None,
) -> PrefixState:
    """The state of ``episode`` after visiting ``path[0..t]`` (see the module docstring).

    ``objects``: an object store (adds object tokens to every observation and sets ``og_label``);
    ``goals``: the REVERIE goal set (nearest-goal labels instead of the next path node).
    """
    path = list(episode.path)
    if not 0 <= t < len(path):
        raise IndexError(f"prefix end {t} outside path of length {len(path)}")
    # poses along the prefix: start heading, then the view in which each node was seen
    obs: list[NodeObservation] = []
    heading, elevation = float(episode.heading), 0.0
    for k in range(t + 1):
        vp = path[k]
        if k > 0:
            prev_cands = obs[-1].candidates
            seen = next((c for c in prev_cands if c.viewpoint == vp), None)
            if seen is None:
                raise ValueError(f"{episode.instr_id}: path step {path[k-1]} -> {vp} is not an edge")
            heading, elevation = view_direction(seen.point_id)
        view_index = geo.discretised_view(heading, elevation)
        cands = _to_map_candidates(house, vp, heading, elevation)
        ob = NodeObservation(
            viewpoint=vp, view_index=view_index, heading=heading, elevation=elevation,
            position=house.position(vp), view_features=features.get(episode.scan, vp), candidates=cands,
        )
        if objects is not None:
            attach_objects(ob, objects.get(episode.scan, vp))
        obs.append(ob)
    visited: list[str] = []
    for vp in path[: t + 1]:
        if vp not in visited:
            visited.append(vp)
    ghosts: list[str] = []
    for ob in obs:
        for c in ob.candidates:
            if c.viewpoint not in visited and c.viewpoint not in ghosts:
                ghosts.append(c.viewpoint)
    vpids: list[str | None] = [None] + visited + ghosts
    step_ids = {vp: k + 1 for k, vp in enumerate(path[: t + 1])}  # revisits overwrite
    cur = obs[-1]
    n = len(vpids)
    pair = np.zeros((n, n), dtype=np.float32)
    for i in range(1, n):
        for j in range(i + 1, n):
            pair[i, j] = pair[j, i] = house.distance(vpids[i], vpids[j])
    pos = true_pos_fts(house, cur.viewpoint, vpids, cur.heading, cur.elevation, angle_feat_size)
    size = angle_feat_size + 3
    cand_ids = [c.viewpoint for c in cur.candidates]
    vp_pos = np.zeros((1 + len(cand_ids), 2 * size), dtype=np.float32)
    vp_pos[:, :size] = true_pos_fts(house, cur.viewpoint, [path[0]], cur.heading, cur.elevation, angle_feat_size)
    if cand_ids:
        vp_pos[1:, size:] = true_pos_fts(house, cur.viewpoint, cand_ids, cur.heading, cur.elevation,
                                         angle_feat_size)
    if goals is None:
        next_vp = path[t + 1] if t + 1 < len(path) else None
        global_label = 0 if next_vp is None else vpids.index(next_vp)
        local_label = 0 if next_vp is None else 1 + cand_ids.index(next_vp)
    else:
        goals = frozenset(goals)
        visited_set = set(visited)
        # global: over the ghosts (visited slots are -inf in the global logits); local: the same
        # rule over every candidate row, visited neighbours included (their rows are valid actions)
        global_label = nearest_goal_slot(vpids, [vp in visited_set for vp in vpids], cur.viewpoint, goals,
                                         house.distance)
        local_label = nearest_goal_slot([None] + cand_ids, [False] * (1 + len(cand_ids)), cur.viewpoint,
                                        goals, house.distance)
        next_vp = vpids[global_label] if global_label else None
    og_label = -1
    if objects is not None and episode.obj_id is not None and cur.obj_ids:
        og_label = cur.obj_ids.index(int(episode.obj_id)) if int(episode.obj_id) in cur.obj_ids else -1
    classes = None
    if with_classes:
        classes = np.asarray(features.classes(episode.scan, cur.viewpoint), dtype=np.float32)
    return PrefixState(
        episode=episode, t=t, txt_ids=list(txt_ids), obs=obs, gmap_vpids=vpids,
        gmap_visited=[False] + [True] * len(visited) + [False] * len(ghosts),
        gmap_step_ids=[step_ids.get(vp, 0) if vp is not None else 0 for vp in vpids],
        gmap_pos_fts=pos, gmap_pair_dists=pair, vp_pos_fts=vp_pos, next_vp=next_vp,
        global_label=global_label, local_label=local_label, view_classes=classes,
        token_views=token_view_indices(cur), uses_objects=objects is not None, og_label=og_label,
        goals=None if goals is None else frozenset(goals),
    )


class PrefixDataset:
    """Every prefix of every episode's path: ``dataset[i]`` is a :class:`PrefixState`.

    ``episodes`` are R2R/REVERIE :class:`~minivln.data.datasets.Episode` objects, ``graphs`` maps a
    scan to its :class:`~minivln.data.graph.House` (e.g. :class:`~minivln.data.graph.Graphs`),
    ``tokenize(text) -> ids`` encodes instructions (``[CLS] ... [SEP]``) that come without token ids
    (episodes read from DUET's files keep theirs, :attr:`~minivln.data.datasets.Episode.token_ids`).
    Items are pure functions of the index (deterministic).  :meth:`state` builds any (episode, prefix end) pair.
    REVERIE: ``objects`` (an object store) puts object tokens into every panorama and gives
    ``og_label``; ``goals(episode) -> goal viewpoints`` (e.g.
    :meth:`~minivln.data.reverie.ReverieGoals.episode_goals`) switches the SAP labels to "nearest goal".
    """

    def __init__(
        self,
        episodes: Sequence[Episode],
        graphs: Graphs | dict[str, House],
        features: Any,
        tokenize: Any,
        *,
        max_instr_len: int = 80,
        angle_feat_size: int = 4,
        with_classes: bool = False,
        objects: Any = None,
        goals: Callable[[Episode], Collection[str]] | None = None,
    ) -> None:
        self.episodes = [e for e in episodes if len(e.path) >= 1]
        self.objects = objects
        self.goals = goals
        self.graphs = graphs
        self.features = features
        self.tokenize = tokenize
        self.max_instr_len = max_instr_len
        self.angle_feat_size = angle_feat_size
        self.with_classes = with_classes
        self._offsets = np.cumsum([0] + [len(e.path) for e in self.episodes])
        self._tokens: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def num_episodes(self) -> int:
        return len(self.episodes)

    def txt_ids(self, e: int) -> list[int]:
        """The instruction's ids: the file's own (``Episode.token_ids``, e.g. DUET's
        ``instr_encoding``) when it has them, else ``tokenize(instruction)``; cut to ``max_instr_len``
        with [SEP] kept last."""
        ep = self.episodes[e]
        given = ep.token_ids  # decoded from compact bytes each time: not cached (millions of pairs)
        ids = self._tokens.get(e) if given is None else None
        if ids is None:
            ids = cut_ids(given if given is not None else list(self.tokenize(ep.instruction)), self.max_instr_len)
            if given is None:
                self._tokens[e] = ids
        return ids

    def locate(self, i: int) -> tuple[int, int]:
        """Flat index -> (episode index, prefix end t)."""
        if not 0 <= i < len(self):
            raise IndexError(i)
        e = int(np.searchsorted(self._offsets, i, side="right") - 1)
        return e, int(i - self._offsets[e])

    def state(self, e: int, t: int) -> PrefixState:
        ep = self.episodes[e]
        return build_state(ep, t, self.graphs[ep.scan], self.features, self.txt_ids(e),
                           angle_feat_size=self.angle_feat_size, with_classes=self.with_classes,
                           objects=self.objects, goals=None if self.goals is None else self.goals(ep))

    def __getitem__(self, i: int) -> PrefixState:
        return self.state(*self.locate(i))


def episode_text(ep: Episode) -> str:
    """The instruction's text (:attr:`~minivln.data.datasets.Episode.text`)."""
    return ep.text


# ----------------------------------------------------------------------------------- masking


def mask_tokens(ids: Sequence[int], rng: np.random.Generator, prob: float = 0.15,
                vocab_low: int = MLM_RANDOM_LOW, vocab_high: int = MLM_RANDOM_HIGH) -> tuple[list[int], list[int]]:
    """BERT masking of one instruction: each real token (not [CLS]/[SEP]/pad) is chosen with
    ``prob`` (at least one); chosen tokens become [MASK] (80 %), a random id in
    ``[vocab_low, vocab_high]`` (10 %) or stay (10 %).  Returns (masked ids, labels with -100
    where not chosen)."""
    ids = list(ids)
    labels = [-100] * len(ids)
    maskable = [k for k, x in enumerate(ids) if x not in (CLS_ID, SEP_ID, PAD_ID)]
    if not maskable:
        return ids, labels
    chosen = [k for k in maskable if rng.random() < prob]
    if not chosen:
        chosen = [maskable[int(rng.integers(len(maskable)))]]
    for k in chosen:
        labels[k] = ids[k]
        r = rng.random()
        if r < 0.8:
            ids[k] = MASK_ID
        elif r < 0.9:
            ids[k] = int(rng.integers(vocab_low, vocab_high + 1))
    return ids, labels


def choose_masked_views(n_tokens: int, rng: np.random.Generator, prob: float = 0.15) -> list[int]:
    """MRC: each of the current node's ``n_tokens`` view tokens is masked with ``prob`` (>= 1)."""
    chosen = [k for k in range(n_tokens) if rng.random() < prob]
    if not chosen and n_tokens:
        chosen = [int(rng.integers(n_tokens))]
    return chosen


# ----------------------------------------------------------------------------------- collate


def collate_states(
    states: Sequence[PrefixState],
    *,
    mlm_rng: np.random.Generator | None = None,
    mrc_rng: np.random.Generator | None = None,
    angle_feat_size: int = 4,
) -> dict[str, Any]:
    """One batch dict from states (CPU tensors plus python lists).

    Keys: ``txt_ids``/``txt_masks`` (masked when ``mlm_rng`` is given, with ``mlm_labels``);
    ``instructions`` (the texts, for models that also embed them whole: ``og_text_encoder``);
    ``pano`` (the 'panorama' inputs of every visited node of every sample, flattened in sample then
    path order) with ``pano_cand_vpids``; ``node_index`` (per sample, the flat index of each visited
    node, last = current); ``gmap_*`` (everything of the global branch except the image embeddings);
    ``vp_pos_fts``, ``vp_cand_vpids``; ``global_labels``/``local_labels`` (SAP); with ``mrc_rng``:
    ``mrc_rows`` (B, K) token rows of the current node whose features are zeroed (-1 = pad) and
    ``mrc_targets`` (B, K, C).  With objects (states built with an object store) the panoramas
    carry object tokens after the views, and ``og_labels`` (B,) is the local row (``1 + view_len +
    index``) of the target object of the current node, -100 where it is not there.
    """
    b = len(states)
    txt, labels = [], []
    for s in states:
        if mlm_rng is not None:
            ids, lab = mask_tokens(s.txt_ids, mlm_rng)
        else:
            ids, lab = list(s.txt_ids), [-100] * len(s.txt_ids)
        txt.append(torch.tensor(ids, dtype=torch.long))
        labels.append(torch.tensor(lab, dtype=torch.long))
    txt_ids = pad_tensors(txt, pad=PAD_ID)
    out: dict[str, Any] = {
        "txt_ids": txt_ids,
        "txt_masks": txt_ids != PAD_ID,
        "mlm_labels": pad_tensors(labels, pad=-100),
        "instructions": [episode_text(s.episode) for s in states],
    }
    # panoramas of all visited nodes
    flat_obs: list[NodeObservation] = []
    node_index: list[list[int]] = []
    for s in states:
        node_index.append(list(range(len(flat_obs), len(flat_obs) + len(s.obs))))
        flat_obs.extend(s.obs)
    use_objects = any(s.uses_objects for s in states)
    pano = build_panorama_inputs(flat_obs, angle_feat_size, use_objects=use_objects)
    if mrc_rng is not None:
        rows_b, targets_b = [], []
        for s, idx in zip(states, node_index):
            cur = idx[-1]
            n_tok = int(pano.view_lens[cur])
            rows = choose_masked_views(n_tok, mrc_rng)
            pano.view_img_fts[cur, rows] = 0.0
            assert s.view_classes is not None, "MRC needs states built with with_classes=True"
            rows_b.append(torch.tensor(rows, dtype=torch.long))
            targets_b.append(torch.from_numpy(s.view_classes[[s.token_views[r] for r in rows]]))
        out["mrc_rows"] = pad_tensors(rows_b, pad=-1)
        out["mrc_targets"] = pad_tensors(targets_b, pad=0.0)
    out["pano"] = pano.model_inputs()
    out["pano_cand_vpids"] = pano.cand_vpids
    out["node_index"] = node_index

    # global branch structure
    lens = torch.tensor([len(s.gmap_vpids) for s in states], dtype=torch.long)
    g = int(lens.max())
    pair = torch.zeros(b, g, g)
    for i, s in enumerate(states):
        n = len(s.gmap_vpids)
        pair[i, :n, :n] = torch.from_numpy(s.gmap_pair_dists)
    # gmap image embeddings, as a weighted scatter of source rows of [node means (F, H); panorama
    # outputs (F*N, H)] into the flat map slots (B*G): a visited node takes its panorama mean, a ghost
    # the mean of the candidate-view outputs that showed it from visited nodes (as the agent's map
    # does).  Three 1-D tensors (one entry per contributing source), so a batch grows linearly.
    n_flat, n_tok_all = len(flat_obs), int(pano.loc_fts.size(1))
    src_rows, src_slots, src_weights = [], [], []
    for i, (s, idx) in enumerate(zip(states, node_index)):
        flat_of = {}
        for f, ob in zip(idx, s.obs):
            flat_of[ob.viewpoint] = f  # revisits: last panorama wins (the agent rewrites it)
        sources: dict[str, list[int]] = {}
        for f in idx:
            for j, cand in enumerate(pano.cand_vpids[f]):
                if cand not in flat_of:
                    sources.setdefault(cand, []).append(n_flat + f * n_tok_all + j)
        for slot, vp in enumerate(s.gmap_vpids):
            if vp is None:
                continue
            rows = [flat_of[vp]] if vp in flat_of else sources[vp]
            src_rows.extend(rows)
            src_slots.extend([i * g + slot] * len(rows))
            src_weights.extend([1.0 / len(rows)] * len(rows))
    out["gmap_src_rows"] = torch.tensor(src_rows, dtype=torch.long)
    out["gmap_src_slots"] = torch.tensor(src_slots, dtype=torch.long)
    out["gmap_src_weights"] = torch.tensor(src_weights, dtype=torch.float32)
    out.update({
        "gmap_vpids": [list(s.gmap_vpids) for s in states],
        "gmap_step_ids": pad_tensors([torch.tensor(s.gmap_step_ids, dtype=torch.long) for s in states]),
        "gmap_pos_fts": pad_tensors([torch.from_numpy(s.gmap_pos_fts) for s in states]),
        "gmap_visited_masks": pad_tensors([torch.tensor(s.gmap_visited) for s in states]),
        "gmap_pair_dists": pair,
        "gmap_masks": seq_masks(lens),
    })
    # local branch structure: rows 0 ([stop]) + panorama tokens of the current node
    cur_idx = [idx[-1] for idx in node_index]
    n_tok = int(pano.loc_fts.size(1)) + 1
    size = 2 * (angle_feat_size + 3)
    vp_pos = torch.zeros(b, n_tok, size)
    for i, s in enumerate(states):
        vp_pos[i, :, : size // 2] = torch.from_numpy(s.vp_pos_fts[0, : size // 2])
        vp_pos[i, : s.vp_pos_fts.shape[0], size // 2:] = torch.from_numpy(s.vp_pos_fts[:, size // 2:])
    out["vp_pos_fts"] = vp_pos
    out["current_index"] = torch.tensor(cur_idx, dtype=torch.long)
    out["vp_cand_vpids"] = [[None] + list(pano.cand_vpids[c]) for c in cur_idx]
    out["global_labels"] = torch.tensor([s.global_label for s in states], dtype=torch.long)
    out["local_labels"] = torch.tensor([s.local_label for s in states], dtype=torch.long)
    if use_objects:
        out["og_labels"] = torch.tensor(
            [1 + int(pano.view_lens[c]) + s.og_label if s.og_label >= 0 else IGNORE_LABEL
             for s, c in zip(states, cur_idx)], dtype=torch.long)
    return out

