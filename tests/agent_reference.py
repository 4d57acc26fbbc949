"""The agent's host work as it was before it was batched (commit 73977f2), kept as the reference
that the faster code must match bit for bit (``tests/test_agent_host.py``).

Only what changed is here, copied as it was: the pair-by-pair Floyd graph, the per-node position
features and pair distances, the per-sample panorama and navigation input building with its many
small tensors, the per-sample STOP-probability reads, the expert labels read back from the device,
and the feature reads through h5py.  :func:`use_reference` swaps them into the package (with
pytest's ``monkeypatch``), so that the same rollout code runs on the old bookkeeping.
"""

from __future__ import annotations

from typing import Any, Sequence

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from minivln.features import hdf5 as H
from minivln.model import agent_inputs as A
from minivln.model import graph_map as G
from minivln.training import agent as T
from minivln.training.agent import (
    IGNORE,
    nearest_goal_slot,
    object_label,
    spl_expert_slot,
    teacher_slot,
)

# ------------------------------------------------------------------------------------ graph map


def relative_direction(a, b, base_heading: float = 0.0, base_elevation: float = 0.0):
    dx, dy, dz = b[0] - a[0], b[1] - a[1], b[2] - a[2]
    xy_dist = max(np.sqrt(dx**2 + dy**2), 1e-8)
    xyz_dist = max(np.sqrt(dx**2 + dy**2 + dz**2), 1e-8)
    heading = np.arcsin(dx / xy_dist)
    if b[1] < a[1]:
        heading = np.pi - heading
    heading -= base_heading
    elevation = np.arcsin(dz / xyz_dist) - base_elevation
    return float(heading), float(elevation), float(xyz_dist)


class RefFloydGraph:
    def __init__(self) -> None:
        self._dist: dict[Any, dict[Any, float]] = {}
        self._via: dict[Any, dict[Any, Any]] = {}
        self._nodes: dict[Any, None] = {}
        self._visited: set[Any] = set()

    def _get(self, x, y) -> float:
        return self._dist.get(x, {}).get(y, G.UNKNOWN_DIST)

    def _set(self, x, y, d: float, via) -> None:
        for a, b in ((x, y), (y, x)):
            self._dist.setdefault(a, {})[b] = d
            if via is None:
                self._via.setdefault(a, {}).pop(b, None)
            else:
                self._via.setdefault(a, {})[b] = via

    @property
    def nodes(self) -> list:
        return list(self._nodes)

    def distance(self, x, y) -> float:
        return 0.0 if x == y else self._get(x, y)

    def add_edge(self, x, y, dist: float) -> None:
        self._nodes.setdefault(x)
        self._nodes.setdefault(y)
        if dist < self._get(x, y):
            self._set(x, y, dist, None)

    def update(self, k) -> None:
        self._nodes.setdefault(k)
        for x in self._nodes:
            for y in self._nodes:
                if x != y:
                    through = self._get(x, k) + self._get(k, y)
                    if through < self._get(x, y):
                        self._set(x, y, through, k)
        self._visited.add(k)

    def visited(self, k) -> bool:
        return k in self._visited

    def path(self, x, y) -> list:
        if x == y:
            return []
        k = self._via.get(x, {}).get(y)
        if k is None:
            return [y]
        return self.path(x, k) + self.path(k, y)


class RefGraphMap(G.GraphMap):
    def __init__(self, start) -> None:
        super().__init__(start)
        self.graph = RefFloydGraph()

    def pos_fts(self, current, vpids, heading, elevation, angle_feat_size=4) -> np.ndarray:
        angles, dists = [], []
        for vp in vpids:
            if vp is None:
                angles.append([0.0, 0.0])
                dists.append([0.0, 0.0, 0.0])
                continue
            h, e, d = relative_direction(self.positions[current], self.positions[vp], heading, elevation)
            angles.append([h, e])
            dists.append([d / G.MAX_DIST, self.graph.distance(current, vp) / G.MAX_DIST,
                          len(self.graph.path(current, vp)) / G.MAX_STEP])
        ang = np.array(angles, dtype=np.float64).reshape(-1, 2).astype(np.float32)
        dst = np.array(dists, dtype=np.float64).reshape(-1, 3).astype(np.float32)
        return np.concatenate([G.angle_features(ang[:, 0], ang[:, 1], angle_feat_size), dst], 1)

    def pair_dists(self, vpids) -> np.ndarray:
        n = len(vpids)
        out = np.zeros((n, n), dtype=np.float32)
        for i in range(1, n):
            for j in range(i + 1, n):
                if vpids[i] is None or vpids[j] is None:
                    continue
                out[i, j] = out[j, i] = self.graph.distance(vpids[i], vpids[j])
        return out


# ---------------------------------------------------------------------------------- agent inputs


def panorama_tokens(ob, angle_feat_size: int = 4):
    base_h, base_e = G.view_direction(ob.view_index)
    feats = np.asarray(ob.view_features, dtype=np.float32)
    img, ang, nav_types, cand_vpids = [], [], [], []
    used: set[int] = set()
    for cand in ob.candidates:
        img.append(feats[cand.point_id])
        ang.append(G.direction_angle_feature(*cand.relative_angles(ob.view_index), angle_feat_size))
        nav_types.append(1)
        cand_vpids.append(cand.viewpoint)
        used.add(int(cand.point_id))
    for k in range(len(feats)):
        if k in used:
            continue
        h, e = G.view_direction(k)
        img.append(feats[k])
        ang.append(G.direction_angle_feature(h - base_h, e - base_e, angle_feat_size))
        nav_types.append(0)
    box = np.ones((len(img), 3), dtype=np.float32)
    loc = np.concatenate([np.stack(ang, 0), box], 1)
    return np.stack(img, 0), loc, nav_types, cand_vpids


def object_features(obs_list) -> list[torch.Tensor]:
    widths = [np.shape(ob.obj_img_fts)[1] for ob in obs_list if ob.obj_img_fts is not None]
    dim = max(widths, default=0)
    return [
        torch.from_numpy(np.asarray(ob.obj_img_fts, dtype=np.float32).reshape(ob.num_objects, -1))
        if ob.num_objects else torch.zeros((0, dim), dtype=torch.float32)
        for ob in obs_list
    ]


def build_panorama_inputs(obs_list, angle_feat_size: int = 4, use_objects: bool | None = None) -> A.PanoramaBatch:
    if use_objects is None:
        use_objects = any(ob.obj_img_fts is not None for ob in obs_list)
    views, locs, types, cands, view_lens, obj_lens = [], [], [], [], [], []
    for ob in obs_list:
        img, loc, nav, cand = panorama_tokens(ob, angle_feat_size)
        if use_objects:
            obj_loc = A.object_tokens(ob, angle_feat_size)
            loc = np.concatenate([loc, obj_loc], 0)
            nav = nav + [2] * len(obj_loc)
            obj_lens.append(len(obj_loc))
        views.append(torch.from_numpy(img))
        locs.append(torch.from_numpy(loc))
        types.append(torch.tensor(nav, dtype=torch.long))
        cands.append(cand)
        view_lens.append(len(img))
    batch = A.PanoramaBatch(
        view_img_fts=A.pad_tensors(views),
        loc_fts=A.pad_tensors(locs),
        nav_types=A.pad_tensors(types),
        view_lens=torch.tensor(view_lens, dtype=torch.long),
        cand_vpids=cands,
    )
    if use_objects:
        batch.obj_img_fts = A.pad_tensors(object_features(obs_list))
        batch.obj_lens = torch.tensor(obj_lens, dtype=torch.long)
        batch.obj_ids = [list(ob.obj_ids) for ob in obs_list]
    return batch


def pad_tensors_wgrad(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    max_len = max(int(t.size(0)) for t in tensors)
    rows = []
    for t in tensors:
        if t.size(0) < max_len:
            t = torch.cat([t, t.new_zeros((max_len - t.size(0), *t.shape[1:]))], 0)
        rows.append(t)
    return torch.stack(rows, 0)


def build_gmap_inputs(maps, obs_list, *, angle_feat_size=4, enc_full_graph=True, act_visited_nodes=False):
    vpids_b, embeds_b, steps_b, pos_b, dists_b, visited_b, no_left = [], [], [], [], [], [], []
    for gmap, ob in zip(maps, obs_list):
        vpids, visited = gmap.slots(ob.viewpoint, enc_full_graph=enc_full_graph, act_visited_nodes=act_visited_nodes)
        no_left.append(gmap.num_ghosts(ob.viewpoint, act_visited_nodes) == 0)
        node_embeds = [gmap.node_embed(vp) for vp in vpids[1:]]
        if node_embeds:
            embeds = torch.stack([torch.zeros_like(node_embeds[0])] + node_embeds, 0)
        else:
            ref = next(iter(gmap.node_embeds.values()))[0]
            embeds = torch.zeros_like(ref)[None]
        vpids_b.append(vpids)
        embeds_b.append(embeds)
        steps_b.append(torch.tensor([gmap.step_ids.get(vp, 0) for vp in vpids], dtype=torch.long))
        pos_b.append(torch.from_numpy(gmap.pos_fts(ob.viewpoint, vpids, ob.heading, ob.elevation, angle_feat_size)))
        dists_b.append(torch.from_numpy(gmap.pair_dists(vpids)))
        visited_b.append(torch.tensor(visited, dtype=torch.bool))
    lens = torch.tensor([len(v) for v in vpids_b], dtype=torch.long)
    width = int(lens.max())
    device = embeds_b[0].device
    pair = torch.zeros(len(maps), width, width, dtype=torch.float32)
    for i, d in enumerate(dists_b):
        pair[i, : d.size(0), : d.size(1)] = d
    inputs = {
        "gmap_vpids": vpids_b,
        "gmap_img_embeds": pad_tensors_wgrad(embeds_b),
        "gmap_step_ids": A.pad_tensors(steps_b).to(device),
        "gmap_pos_fts": A.pad_tensors(pos_b).to(device),
        "gmap_visited_masks": A.pad_tensors(visited_b).to(device),
        "gmap_pair_dists": pair.to(device),
        "gmap_masks": A.seq_masks(lens).to(device),
    }
    return inputs, no_left


def build_vp_inputs(maps, obs_list, pano, pano_embeds, pano_masks=None, *, angle_feat_size=4):
    batch_size, n_tokens = pano_embeds.shape[:2]
    device = pano_embeds.device
    vp_img_embeds = torch.cat([torch.zeros_like(pano_embeds[:, :1]), pano_embeds], 1)
    pos_size = angle_feat_size + 3
    vp_pos = np.zeros((batch_size, n_tokens + 1, 2 * pos_size), dtype=np.float32)
    for i, (gmap, ob) in enumerate(zip(maps, obs_list)):
        start = gmap.pos_fts(ob.viewpoint, [gmap.start], ob.heading, ob.elevation, angle_feat_size)
        vp_pos[i, :, :pos_size] = start
        cands = pano.cand_vpids[i]
        if cands:
            vp_pos[i, 1 : len(cands) + 1, pos_size:] = gmap.pos_fts(
                ob.viewpoint, cands, ob.heading, ob.elevation, angle_feat_size)
    lens = pano.view_lens + (pano.obj_lens if pano.obj_lens is not None else 0)
    nav_types = pano.nav_types.to(device)
    inputs: dict[str, Any] = {
        "vp_img_embeds": vp_img_embeds,
        "vp_pos_fts": torch.from_numpy(vp_pos).to(device),
        "vp_masks": A.seq_masks(lens + 1, n_tokens + 1).to(device),
        "vp_nav_masks": torch.cat([torch.ones(batch_size, 1, dtype=torch.bool, device=device), nav_types == 1], 1),
        "vp_cand_vpids": [[None] + list(c) for c in pano.cand_vpids],
    }
    if pano.uses_objects:
        inputs["vp_obj_masks"] = torch.cat(
            [torch.zeros(batch_size, 1, dtype=torch.bool, device=device), nav_types == 2], 1)
    return inputs


def build_navigation_inputs(maps, obs_list, pano, pano_embeds, pano_masks, txt_embeds, txt_masks, *,
                            angle_feat_size=4, enc_full_graph=True, act_visited_nodes=False) -> A.NavigationBatch:
    inputs, no_left = build_gmap_inputs(maps, obs_list, angle_feat_size=angle_feat_size,
                                        enc_full_graph=enc_full_graph, act_visited_nodes=act_visited_nodes)
    inputs.update(build_vp_inputs(maps, obs_list, pano, pano_embeds, pano_masks, angle_feat_size=angle_feat_size))
    inputs["txt_embeds"] = txt_embeds
    inputs["txt_masks"] = txt_masks
    return A.NavigationBatch(inputs, no_left)


class RefMapNavigator(A.MapNavigator):
    """The navigator on the reference maps and input builders."""

    def __init__(self, start_obs, **kw) -> None:
        super().__init__(start_obs, **kw)
        self.maps = [RefGraphMap(ob.viewpoint) for ob in self.obs]
        for gmap, ob in zip(self.maps, self.obs):
            gmap.update_graph(ob)

    def panorama_inputs(self, use_objects=None) -> A.PanoramaBatch:
        return build_panorama_inputs(self.obs, self.angle_feat_size, use_objects)

    def navigation_inputs(self, pano, pano_embeds, pano_masks, txt_embeds, txt_masks) -> A.NavigationBatch:
        return build_navigation_inputs(
            self.maps, self.obs, pano, pano_embeds, pano_masks, txt_embeds, txt_masks,
            angle_feat_size=self.angle_feat_size, enc_full_graph=self.enc_full_graph,
            act_visited_nodes=self.act_visited_nodes)

    def record_scores(self, nav_logits, obj_logits=None, pano=None) -> torch.Tensor:
        probs = torch.softmax(nav_logits.detach(), 1)
        for i, gmap in enumerate(self.maps):
            if self.ended[i]:
                continue
            obj = None
            if obj_logits is not None and pano is not None and pano.obj_ids and pano.obj_ids[i]:
                row = obj_logits[i, int(pano.view_lens[i]) + 1 :]
                obj = pano.obj_ids[i][int(torch.argmax(row))]
            gmap.record_stop(self.obs[i].viewpoint, float(probs[i, 0].item()), obj)
        return probs


# ------------------------------------------------------------------------------- agent steps


def action_labels(self, run, batch, logits, active):
    batch_size = len(run.eps)
    labels = torch.full((batch_size,), IGNORE, dtype=torch.long)
    if not run.training:
        return labels.tolist(), labels
    visited = batch.inputs["gmap_visited_masks"].tolist()
    for i in range(batch_size):
        if not active[i]:
            continue
        cur, vpids, ep, goals = run.nav.obs[i].viewpoint, batch.gmap_vpids[i], run.eps[i], run.goal_sets[i]
        follow_path = run.feedback == "teacher" and ep.task == "r2r"
        label = teacher_slot(vpids, cur, ep.path) if follow_path else None
        if label is None:
            if len(goals) == 1:
                label = spl_expert_slot(vpids, visited[i], cur, next(iter(goals)), run.houses[i].distance)
            else:
                label = nearest_goal_slot(vpids, visited[i], cur, goals, run.houses[i].distance)
        labels[i] = label
    labels = labels.to(run.device)
    ce = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="sum")
    valid = labels != IGNORE
    if bool(valid.any()):
        run.loss = run.loss + ce
    run.n_labels += int(valid.sum())
    run.n_correct += int(((logits.detach().argmax(1) == labels) & valid).sum())
    return labels.tolist(), labels


def object_labels(self, run, pano, obj_logits, active):
    if not (run.training and run.use_objects):
        return None
    obj_labels = torch.full((len(run.eps),), IGNORE, dtype=torch.long)
    for i, ep in enumerate(run.eps):
        if active[i]:
            at_goal = self.goals.is_goal(ep, run.nav.obs[i].viewpoint)
            obj_labels[i] = object_label(pano.obj_ids[i], ep.obj_id, at_goal, int(pano.view_lens[i]))
    obj_labels = obj_labels.to(run.device)
    sel = obj_labels != IGNORE
    if bool(sel.any()):
        run.og_loss = run.og_loss + F.cross_entropy(obj_logits[sel].float(), obj_labels[sel], reduction="sum")
        run.n_og += int(sel.sum())
        run.n_og_correct += int((obj_logits.detach()[sel].argmax(1) == obj_labels[sel]).sum())
    return obj_labels


def choose(run, logits, expert, batch=None, active=None):  # the "path" feedback came later
    labels = torch.tensor(expert, dtype=torch.long)
    if run.feedback == "teacher":
        return [int(x) if x != IGNORE else 0 for x in labels.tolist()]
    if run.feedback == "sample":
        probs = torch.softmax(logits.detach().float(), 1)
        return torch.multinomial(probs, 1, generator=run.generator).squeeze(1).tolist()
    return logits.detach().argmax(1).tolist()


# ------------------------------------------------------------------------------- feature reads


def read_features(self, key: str):
    hit = self._f.cached(key)
    if hit is not None:
        return hit
    dim, stored, layout = self._resolve_layout()
    h5 = self._f.file()
    if key not in h5:
        raise H.MissingFeatureError(f"{self.path} has no features for key {key!r}")
    ds = h5[key]
    if not isinstance(ds, h5py.Dataset) or ds.shape != (H.NUM_VIEWS, stored):
        shape = getattr(ds, "shape", "a group")
        raise H.DataError(f"{self.path}: key {key!r} has shape {shape}; expected ({H.NUM_VIEWS}, {stored})")
    arr = ds[()]
    fts = np.ascontiguousarray(arr[:, :dim], dtype=np.float32)
    classes = H.softmax(arr[:, dim:]) if layout == "concat" else None
    value = (fts, classes)
    self._f.remember(key, value)
    return value


def use_reference(monkeypatch) -> None:
    """Run the agent on the reference bookkeeping (undone by ``monkeypatch`` at the end of the test)."""
    monkeypatch.setattr(T, "MapNavigator", RefMapNavigator)
    monkeypatch.setattr(T.DUETAgent, "_action_labels", action_labels)
    monkeypatch.setattr(T.DUETAgent, "_object_labels", object_labels)
    monkeypatch.setattr(T.DUETAgent, "_choose", staticmethod(choose))
    monkeypatch.setattr(H.FeatureStore, "_read", read_features)
