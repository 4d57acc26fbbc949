"""Building the DUET network's per-step inputs from observations and the agent's maps.

This is the agent side of DUET (``map_nav_src/r2r/agent.py`` and its REVERIE twin): it turns
:class:`~minivln.model.graph_map.NodeObservation` objects into the exact batch dicts of the
network's ``'panorama'`` and ``'navigation'`` modes, and :class:`MapNavigator` runs the per-step
bookkeeping of a batch of episodes in the reference's order (step ids → panorama → node
features → navigation inputs → STOP probabilities → action → teleport → new observations).

Typical evaluation loop (the environment only has to teleport to ``Move.target`` facing
``Move.heading``/``Move.elevation`` and return fresh observations)::

    nav = MapNavigator(env_obs)
    txt_embeds = model("language", {"txt_ids": ids, "txt_masks": masks})
    for t in range(nav.max_action_len):
        nav.begin_step(t)
        pano = nav.panorama_inputs()
        pano_embeds, pano_masks = model("panorama", pano.model_inputs())
        nav.absorb_panorama(pano, pano_embeds, pano_masks)
        batch = nav.navigation_inputs(pano, pano_embeds, pano_masks, txt_embeds, masks)
        outs = model("navigation", batch.inputs)
        nav.record_scores(outs["fused_logits"], outs.get("obj_logits"), pano)
        moves = nav.act(t, outs["fused_logits"].argmax(1).tolist(), batch)
        nav.observe(env.step(moves))
        if nav.all_ended:
            break
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import numpy as np
import torch

from minivln.model.graph_map import (
    GraphMap,
    Move,
    NodeId,
    NodeObservation,
    direction_angle_feature,
    view_direction,
)

# ----------------------------------------------------------------------------------- helpers


def pad_tensors(tensors: Sequence[torch.Tensor], pad: float = 0) -> torch.Tensor:
    """Stack (T_i, ...) tensors into (B, max T, ...), padding with ``pad`` (no gradient kept)."""
    max_len = max(int(t.size(0)) for t in tensors)
    out = torch.full(
        (len(tensors), max_len, *tensors[0].shape[1:]), pad, dtype=tensors[0].dtype,
        device=tensors[0].device,
    )
    for i, t in enumerate(tensors):
        out[i, : t.size(0)] = t.detach()
    return out


def seq_masks(lens: torch.Tensor | Sequence[int], max_len: int | None = None) -> torch.Tensor:
    """(B, max_len) bool: True at the first ``lens[i]`` positions of row i."""
    lens = torch.as_tensor(lens, dtype=torch.long)
    width = int(lens.max()) if max_len is None else max_len
    return torch.arange(width, device=lens.device)[None, :] < lens[:, None]


def masked_mean(embeds: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(B, H) mean of ``embeds`` (B, N, H) over the rows where ``masks`` (B, N) is True."""
    return torch.sum(embeds * masks.unsqueeze(2), 1) / torch.sum(masks, 1, keepdim=True)


# --------------------------------------------------------------------------------- panorama


@dataclass
class PanoramaBatch:
    """Inputs of the ``'panorama'`` mode plus the agent's bookkeeping for them."""

    view_img_fts: torch.Tensor  # (B, V, D)
    loc_fts: torch.Tensor  # (B, V+O, A+3)
    nav_types: torch.Tensor  # (B, V+O) int64
    view_lens: torch.Tensor  # (B,) int64
    cand_vpids: list[list[NodeId]]  # candidate of token row j (rows 0..len-1)
    obj_img_fts: torch.Tensor | None = None  # (B, O, D_obj)
    obj_lens: torch.Tensor | None = None  # (B,) int64
    obj_ids: list[list[Any]] = field(default_factory=list)

    @property
    def uses_objects(self) -> bool:
        return self.obj_img_fts is not None

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The batch dict of the network's ``'panorama'`` mode (object keys only with objects)."""
        out = {
            "view_img_fts": self.view_img_fts,
            "loc_fts": self.loc_fts,
            "nav_types": self.nav_types,
            "view_lens": self.view_lens,
        }
        if self.uses_objects:
            out["obj_img_fts"] = self.obj_img_fts
            out["obj_lens"] = self.obj_lens
        return out


@functools.cache
def view_angle_table(view_index: int, n_views: int, angle_feat_size: int = 4) -> np.ndarray:
    """(n_views, angle_feat_size) angle features of every discretised view relative to view
    ``view_index`` (static geometry, computed once per argument triple; read-only)."""
    base_h, base_e = view_direction(view_index)
    rows = []
    for k in range(n_views):
        h, e = view_direction(k)
        rows.append(direction_angle_feature(h - base_h, e - base_e, angle_feat_size))
    table = np.stack(rows, 0)
    table.flags.writeable = False
    return table


def panorama_token_order(ob: NodeObservation, angle_feat_size: int = 4) -> tuple[list[int], np.ndarray, int]:
    """One sample's view tokens without their image features: (the view index of each token, loc
    features (V, A+3), number of candidate tokens).  Candidates first in candidate order (a view
    showing two candidates is used twice), then every other view in increasing index."""
    n_views = len(ob.view_features)
    cand_views = [int(cand.point_id) for cand in ob.candidates]
    used = set(cand_views)
    rest = [k for k in range(n_views) if k not in used]
    loc = np.ones((len(cand_views) + len(rest), angle_feat_size + 3), dtype=np.float32)
    for j, cand in enumerate(ob.candidates):
        loc[j, :angle_feat_size] = direction_angle_feature(*cand.relative_angles(ob.view_index), angle_feat_size)
    loc[len(cand_views):, :angle_feat_size] = view_angle_table(ob.view_index, n_views, angle_feat_size)[rest]
    return cand_views + rest, loc, len(cand_views)


def panorama_tokens(
    ob: NodeObservation, angle_feat_size: int = 4
) -> tuple[np.ndarray, np.ndarray, list[int], list[NodeId]]:
    """One sample's view tokens: (image features (V, D), loc features (V, A+3), nav types,
    candidate ids), in :func:`panorama_token_order`."""
    order, loc, n_cands = panorama_token_order(ob, angle_feat_size)
    img = np.asarray(ob.view_features, dtype=np.float32)[order]
    return img, loc, [1] * n_cands + [0] * (len(order) - n_cands), [c.viewpoint for c in ob.candidates]


def object_tokens(ob: NodeObservation, angle_feat_size: int = 4) -> np.ndarray:
    """One sample's object loc features (O, A+3): its angle features (tiled to ``angle_feat_size``
    as upstream's ``get_angle_fts`` does) ++ its box features, in observation order."""
    n = ob.num_objects
    if n == 0:
        return np.zeros((0, angle_feat_size + 3), dtype=np.float32)
    ang = np.asarray(ob.obj_ang_fts, dtype=np.float32).reshape(n, 4)
    box = np.asarray(ob.obj_box_fts, dtype=np.float32).reshape(n, 3)
    return np.concatenate([np.tile(ang, (1, angle_feat_size // 4)), box], 1)


def build_panorama_inputs(
    obs_list: Sequence[NodeObservation], angle_feat_size: int = 4, use_objects: bool | None = None
) -> PanoramaBatch:
    """Collate the ``'panorama'`` inputs of a batch (VLN-DUET ``_panorama_feature_variable``).

    ``use_objects`` defaults to "some observation carries object features"; with objects every
    sample's tokens are [views, objects] (``loc_fts``/``nav_types`` concatenated, then padded),
    and ``obj_img_fts`` is padded over the batch separately (a sample may have no object; the
    object feature width is the widest in the batch, 0 if none carries features).

    Each padded array is allocated once and filled sample by sample (the image features are
    gathered straight into it), then handed to torch without a copy.
    """
    if use_objects is None:
        use_objects = any(ob.obj_img_fts is not None for ob in obs_list)
    batch_size = len(obs_list)
    tokens = [panorama_token_order(ob, angle_feat_size) for ob in obs_list]
    view_lens = [len(order) for order, _, _ in tokens]
    obj_locs = [object_tokens(ob, angle_feat_size) for ob in obs_list] if use_objects else None
    obj_lens = [len(o) for o in obj_locs] if obj_locs is not None else [0] * batch_size
    width = max(v + o for v, o in zip(view_lens, obj_lens))
    feats = [np.asarray(ob.view_features, dtype=np.float32) for ob in obs_list]
    view_img = np.zeros((batch_size, max(view_lens), feats[0].shape[1]), dtype=np.float32)
    loc = np.zeros((batch_size, width, angle_feat_size + 3), dtype=np.float32)
    nav_types = np.zeros((batch_size, width), dtype=np.int64)
    for i, (order, view_loc, n_cands) in enumerate(tokens):
        n = len(order)
        np.take(feats[i], order, axis=0, out=view_img[i, :n])
        loc[i, :n] = view_loc
        nav_types[i, :n_cands] = 1
        if obj_locs is not None:
            loc[i, n : n + obj_lens[i]] = obj_locs[i]
            nav_types[i, n : n + obj_lens[i]] = 2
    batch = PanoramaBatch(
        view_img_fts=torch.from_numpy(view_img),
        loc_fts=torch.from_numpy(loc),
        nav_types=torch.from_numpy(nav_types),
        view_lens=torch.tensor(view_lens, dtype=torch.long),
        cand_vpids=[[c.viewpoint for c in ob.candidates] for ob in obs_list],
    )
    if use_objects:
        dim = max((np.shape(ob.obj_img_fts)[1] for ob in obs_list if ob.obj_img_fts is not None), default=0)
        obj_img = np.zeros((batch_size, max(obj_lens), dim), dtype=np.float32)
        for i, ob in enumerate(obs_list):
            if ob.num_objects:
                obj_img[i, : ob.num_objects] = np.asarray(ob.obj_img_fts, dtype=np.float32).reshape(ob.num_objects, -1)
        batch.obj_img_fts = torch.from_numpy(obj_img)
        batch.obj_lens = torch.tensor(obj_lens, dtype=torch.long)
        batch.obj_ids = [list(ob.obj_ids) for ob in obs_list]
    return batch


# ------------------------------------------------------------------------------- navigation


@dataclass
class NavigationBatch:
    """Inputs of the ``'navigation'`` mode (``inputs``, exactly the reference's batch dict,
    including the id lists ``gmap_vpids``/``vp_cand_vpids`` with ``None`` for [stop]),
    ``no_vp_left`` (no ghost left: the sample must stop) and ``visited`` (the host copy of
    ``gmap_visited_masks``, one list of slot flags per sample, for the expert without a device sync)."""

    inputs: dict[str, Any]
    no_vp_left: list[bool]
    visited: list[list[bool]] = field(default_factory=list)

    @property
    def gmap_vpids(self) -> list[list[NodeId | None]]:
        return self.inputs["gmap_vpids"]

    @property
    def vp_cand_vpids(self) -> list[list[NodeId | None]]:
        return self.inputs["vp_cand_vpids"]


def gmap_embeds(maps: Sequence[GraphMap], slots: Sequence[Sequence[NodeId | None]], width: int) -> torch.Tensor:
    """(B, width, H) node features of each sample's slots (zeros for [stop] and the padding), with
    gradient, stacked at once from the maps' per-node means."""
    ref = next(embed for gmap in maps for embed, _ in gmap.node_embeds.values())
    zero = torch.zeros_like(ref)
    rows: list[torch.Tensor] = []
    for gmap, vpids in zip(maps, slots):
        rows.append(zero)
        rows.extend(gmap.node_embed(vp) for vp in vpids[1:])
        rows.extend([zero] * (width - len(vpids)))
    return torch.stack(rows, 0).view(len(maps), width, *ref.shape)


def build_gmap_inputs(
    maps: Sequence[GraphMap],
    slots: Sequence[tuple[list[NodeId | None], list[bool]]],
    pos: Sequence[np.ndarray],
) -> dict[str, Any]:
    """The global-branch inputs (``gmap_*``) from each sample's slots and visited flags
    (:meth:`GraphMap.slots`) and the position features of those slots (``pos[i]``, one row per slot).

    The host-side arrays are allocated padded once and filled sample by sample, then handed to
    torch without a copy and moved to the node features' device."""
    lens = [len(vpids) for vpids, _ in slots]
    batch_size, width = len(maps), max(lens)
    step_ids = np.zeros((batch_size, width), dtype=np.int64)
    pos_fts = np.zeros((batch_size, width, pos[0].shape[1]), dtype=np.float32)
    visited = np.zeros((batch_size, width), dtype=bool)
    pair = np.zeros((batch_size, width, width), dtype=np.float32)
    for i, (gmap, (vpids, flags)) in enumerate(zip(maps, slots)):
        n = len(vpids)
        step_ids[i, :n] = [gmap.step_ids.get(vp, 0) for vp in vpids]
        pos_fts[i, :n] = pos[i]
        visited[i, :n] = flags
        pair[i, :n, :n] = gmap.pair_dists(vpids)
    embeds = gmap_embeds(maps, [vpids for vpids, _ in slots], width)
    device = embeds.device
    return {
        "gmap_vpids": [vpids for vpids, _ in slots],
        "gmap_img_embeds": embeds,
        "gmap_step_ids": torch.from_numpy(step_ids).to(device),
        "gmap_pos_fts": torch.from_numpy(pos_fts).to(device),
        "gmap_visited_masks": torch.from_numpy(visited).to(device),
        "gmap_pair_dists": torch.from_numpy(pair).to(device),
        "gmap_masks": seq_masks(lens).to(device),
    }


def build_vp_inputs(pano: PanoramaBatch, pano_embeds: torch.Tensor, pos: Sequence[np.ndarray]) -> dict[str, Any]:
    """The local-branch inputs (``vp_*``) of the current nodes; ``pos[i]`` holds sample i's position
    features of its start node (row 0) and of its candidates (the rows after)."""
    batch_size, n_tokens = pano_embeds.shape[:2]
    device = pano_embeds.device
    vp_img_embeds = torch.cat([torch.zeros_like(pano_embeds[:, :1]), pano_embeds], 1)
    pos_size = pos[0].shape[1]
    vp_pos = np.zeros((batch_size, n_tokens + 1, 2 * pos_size), dtype=np.float32)
    for i, rows in enumerate(pos):
        vp_pos[i, :, :pos_size] = rows[0]
        vp_pos[i, 1 : len(rows), pos_size:] = rows[1:]
    lens = pano.view_lens + (pano.obj_lens if pano.obj_lens is not None else 0)
    nav_types = pano.nav_types.to(device)
    inputs: dict[str, Any] = {
        "vp_img_embeds": vp_img_embeds,
        "vp_pos_fts": torch.from_numpy(vp_pos).to(device),
        "vp_masks": seq_masks(lens + 1, n_tokens + 1).to(device),
        "vp_nav_masks": torch.cat(
            [torch.ones(batch_size, 1, dtype=torch.bool, device=device), nav_types == 1], 1
        ),
        "vp_cand_vpids": [[None] + list(c) for c in pano.cand_vpids],
    }
    if pano.uses_objects:
        inputs["vp_obj_masks"] = torch.cat(
            [torch.zeros(batch_size, 1, dtype=torch.bool, device=device), nav_types == 2], 1
        )
    return inputs


def build_navigation_inputs(
    maps: Sequence[GraphMap],
    obs_list: Sequence[NodeObservation],
    pano: PanoramaBatch,
    pano_embeds: torch.Tensor,
    pano_masks: torch.Tensor | None,
    txt_embeds: torch.Tensor,
    txt_masks: torch.Tensor,
    *,
    angle_feat_size: int = 4,
    enc_full_graph: bool = True,
    act_visited_nodes: bool = False,
) -> NavigationBatch:
    """The complete ``'navigation'`` batch: global + local inputs + the text.

    Each sample's position features (of its slots, its start node and its candidates, relative to
    where it stands) come from one :meth:`GraphMap.pos_fts` call; the rows of a node do not depend
    on the other nodes of the call."""
    slots = [
        gmap.slots(ob.viewpoint, enc_full_graph=enc_full_graph, act_visited_nodes=act_visited_nodes)
        for gmap, ob in zip(maps, obs_list)
    ]
    no_left = [gmap.num_ghosts(ob.viewpoint, act_visited_nodes) == 0 for gmap, ob in zip(maps, obs_list)]
    pos = [
        gmap.pos_fts(ob.viewpoint, [*vpids, gmap.start, *cands], ob.heading, ob.elevation, angle_feat_size)
        for gmap, ob, (vpids, _), cands in zip(maps, obs_list, slots, pano.cand_vpids)
    ]
    inputs = build_gmap_inputs(maps, slots, [rows[: len(vpids)] for rows, (vpids, _) in zip(pos, slots)])
    inputs.update(build_vp_inputs(pano, pano_embeds, [rows[len(vpids) :] for rows, (vpids, _) in zip(pos, slots)]))
    inputs["txt_embeds"] = txt_embeds
    inputs["txt_masks"] = txt_masks
    return NavigationBatch(inputs, no_left, [list(flags) for _, flags in slots])


# ------------------------------------------------------------------------------ the episode


class MapNavigator:
    """Agent-side state of a batch of episodes, stepped in the reference rollout's order.

    Samples that ended stay in the batch: their map is frozen (no step ids, node features,
    scores or graph updates), but they still get panorama/navigation inputs built from their
    (unchanged) observation, unless the caller passes ``rows`` (the samples to build, e.g.
    :meth:`active_rows`: the agent's compaction) and reads the others' slots from :meth:`full_batch`.
    ``paths[i]`` is the full node sequence of sample i (teleport paths expanded, final walk back to the
    best STOP node appended); ``stop_nodes[i]`` its final node.
    """

    def __init__(
        self,
        start_obs: Sequence[NodeObservation],
        *,
        max_action_len: int = 15,
        angle_feat_size: int = 4,
        enc_full_graph: bool = True,
        act_visited_nodes: bool = False,
    ) -> None:
        self.max_action_len = max_action_len
        self.angle_feat_size = angle_feat_size
        self.enc_full_graph = enc_full_graph
        self.act_visited_nodes = act_visited_nodes
        self.obs: list[NodeObservation] = list(start_obs)
        self.maps = [GraphMap(ob.viewpoint) for ob in self.obs]
        for gmap, ob in zip(self.maps, self.obs):
            gmap.update_graph(ob)
        self.paths: list[list[NodeId]] = [[ob.viewpoint] for ob in self.obs]
        self.ended = np.zeros(len(self.obs), dtype=bool)
        self.stop_nodes: list[NodeId | None] = [None] * len(self.obs)
        self.predicted_objects: list[Any] = [None] * len(self.obs)
        self._acted: list[int] = []  # samples that acted in the last act() (graph update due)
        self._slots: list[Any] = [None] * len(self.obs)  # per sample: its slots in the last navigation batch built

    @property
    def batch_size(self) -> int:
        return len(self.obs)

    @property
    def all_ended(self) -> bool:
        return bool(self.ended.all())

    def begin_step(self, t: int) -> None:
        """The agent occupies its current node at step ``t`` (step id t+1)."""
        for i, gmap in enumerate(self.maps):
            if not self.ended[i]:
                gmap.set_step(self.obs[i].viewpoint, t)

    def active_rows(self) -> list[int]:
        """The samples still navigating, in batch order."""
        return [i for i in range(len(self.obs)) if not self.ended[i]]

    def _rows(self, rows: Sequence[int] | None) -> Sequence[int]:
        return range(len(self.obs)) if rows is None else rows

    def panorama_inputs(self, use_objects: bool | None = None, rows: Sequence[int] | None = None) -> PanoramaBatch:
        """The 'panorama' batch of every sample, or of samples ``rows`` only (in that order)."""
        return build_panorama_inputs([self.obs[i] for i in self._rows(rows)], self.angle_feat_size, use_objects)

    def absorb_panorama(
        self, pano: PanoramaBatch, pano_embeds: torch.Tensor, pano_masks: torch.Tensor,
        rows: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Write the panorama outputs into the maps (row j of the batch is sample ``rows[j]``, or j);
        returns the masked means."""
        avg = masked_mean(pano_embeds, pano_masks)
        for j, i in enumerate(self._rows(rows)):
            if not self.ended[i]:
                self.maps[i].update_from_panorama(
                    self.obs[i].viewpoint, pano.cand_vpids[j], pano_embeds[j], avg[j]
                )
        return avg

    def navigation_inputs(
        self,
        pano: PanoramaBatch,
        pano_embeds: torch.Tensor,
        pano_masks: torch.Tensor,
        txt_embeds: torch.Tensor,
        txt_masks: torch.Tensor,
        rows: Sequence[int] | None = None,
    ) -> NavigationBatch:
        """The 'navigation' batch of every sample, or of samples ``rows`` only (``pano`` and the text
        then hold those rows).  The slots of every sample built are kept for :meth:`full_batch`."""
        idx = self._rows(rows)
        batch = build_navigation_inputs(
            [self.maps[i] for i in idx], [self.obs[i] for i in idx], pano, pano_embeds, pano_masks,
            txt_embeds, txt_masks, angle_feat_size=self.angle_feat_size, enc_full_graph=self.enc_full_graph,
            act_visited_nodes=self.act_visited_nodes,
        )
        for j, i in enumerate(idx):
            self._slots[i] = (batch.gmap_vpids[j], batch.vp_cand_vpids[j], batch.no_vp_left[j], batch.visited[j])
        return batch

    def full_batch(self) -> NavigationBatch:
        """The host side of a navigation batch of every sample (slot ids, ``no_vp_left``, visited
        flags; no tensors), from the last batch each sample was built in: an ended sample's map is
        frozen, so its slots are those of its last step."""
        if any(entry is None for entry in self._slots):
            raise RuntimeError("full_batch: a sample was never built (navigation_inputs first)")
        return NavigationBatch(
            {"gmap_vpids": [e[0] for e in self._slots], "vp_cand_vpids": [e[1] for e in self._slots]},
            [e[2] for e in self._slots], [e[3] for e in self._slots],
        )

    def record_scores(
        self,
        nav_logits: torch.Tensor,
        obj_logits: torch.Tensor | None = None,
        pano: PanoramaBatch | None = None,
        rows: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Record softmax(nav_logits)[:, 0] as the STOP probability of each active sample's
        current node (and, with objects, the arg-max object id); row j is sample ``rows[j]``, or j.
        Returns the probabilities."""
        probs = torch.softmax(nav_logits.detach(), 1)
        stop_probs = probs[:, 0].tolist()  # one device-to-host copy for the batch
        with_objects = obj_logits is not None and pano is not None and bool(pano.obj_ids)
        obj_rows = obj_logits.detach().cpu() if with_objects else None
        for j, i in enumerate(self._rows(rows)):
            if self.ended[i]:
                continue
            obj = None
            if obj_rows is not None and pano.obj_ids[j]:
                row = obj_rows[j, int(pano.view_lens[j]) + 1 :]
                obj = pano.obj_ids[j][int(torch.argmax(row))]
            self.maps[i].record_stop(self.obs[i].viewpoint, float(stop_probs[j]), obj)
        return probs

    def act(
        self,
        t: int,
        actions: Sequence[int],
        batch: NavigationBatch,
        *,
        stop: Sequence[bool] | None = None,
        space: Literal["global", "local"] = "global",
    ) -> list[Move | None]:
        """Apply the chosen slots (indices into ``gmap_vpids``, or ``vp_cand_vpids`` when
        ``space='local'``).

        A sample ends when ``stop[i]`` (default: its action is slot 0), when no ghost is left, or
        at the last allowed step; it then walks back to its visited node with the highest STOP
        probability.  (Training passes ``stop`` = "at the goal"; a sample whose action is then
        slot 0 anyway also ends, but without the walk back, as in the reference.)  Returns, per
        sample, the :class:`Move` the environment must make (None: stay).
        """
        vpids = batch.gmap_vpids if space == "global" else batch.vp_cand_vpids
        moves: list[Move | None] = []
        self._acted = []
        for i, gmap in enumerate(self.maps):
            if self.ended[i]:
                moves.append(None)
                continue
            self._acted.append(i)
            a = int(actions[i])
            stops = bool(stop[i]) if stop is not None else a == 0
            current = self.obs[i].viewpoint
            if stops or batch.no_vp_left[i] or t == self.max_action_len - 1:
                self.ended[i] = True
                moves.append(None)
                self._finish(i, current)
                continue
            target = vpids[i][a]
            if target is None:
                # The [stop] slot chosen while ``stop`` says "go on" (possible when training with
                # sampled actions): the reference ends the sample *without* the walk back.
                self.ended[i] = True
                self.stop_nodes[i] = current
                moves.append(None)
                continue
            move = gmap.plan_move(current, target)
            self.paths[i].extend(move.path)
            moves.append(move)
        return moves

    def _finish(self, i: int, current: NodeId) -> None:
        gmap = self.maps[i]
        best = gmap.best_stop()
        if best is not None and best != current:
            self.paths[i].extend(gmap.path(current, best))
        self.stop_nodes[i] = self.paths[i][-1]
        record = gmap.stop_records.get(self.stop_nodes[i])
        self.predicted_objects[i] = record.object_id if record is not None else None

    def observe(self, obs_list: Sequence[NodeObservation]) -> None:
        """New observations after the moves: the samples that acted in the last :meth:`act` add
        their new node's edges and relax through it (for those that just stopped this is a
        no-op on an unchanged observation, as in the reference)."""
        self.obs = list(obs_list)
        for i in self._acted:
            self.maps[i].update_graph(self.obs[i])
        self._acted = []
