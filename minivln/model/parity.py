"""``minivln parity``: replay the reference DUET episode and compare everything.

The reference fixture (``duet_fixture_r2r.npz`` + ``.json``) records one batched episode of the
upstream DUET agent: its weights, the raw per-step observations, the prescribed actions, every
model call's inputs and outputs and the final paths.  The REVERIE fixture
(``duet_fixture_reverie.npz``, upstream's ``reverie/agent_obj.py``) adds each viewpoint's objects
to the observations, object tokens to the panorama, ``vp_obj_masks``/``obj_logits`` to the
navigation calls and the predicted object of each episode (``final.pred_objid``).  :func:`run_parity` rebuilds the network
from the stored config/weights and replays the episode **from the raw observations** through our
agent-side bookkeeping (:class:`~minivln.model.agent_inputs.MapNavigator`) and our network,
comparing every intermediate input, every output, the moves and the final paths (the fixture's
``comparison.integration_test``).  Each call is also fed the *recorded* inputs (the fixture's
``comparison.unit_test``), so a network bug and a bookkeeping bug are told apart.

Comparison rules (from the fixture's JSON): float items by max |diff| over finite values, the
positions of ``-inf`` must match exactly; embeddings only at rows whose mask is True; ids, masks
and integer arrays must match exactly (their "diff" is the number of mismatching entries).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from minivln.model import fixture as fixture_ids
from minivln.model.agent_inputs import MapNavigator, PanoramaBatch
from minivln.model.graph_map import Candidate, NodeObservation
from minivln.paths import DataError

# Per-call items whose rows are compared only where a mask is True: item -> mask item.
_MASKED_ROWS = {
    "language.out.txt_embeds": "language.in.txt_masks",
    "panorama.out.pano_embeds": "panorama.out.pano_masks",
    "navigation.in.txt_embeds": "navigation.in.txt_masks",
    "navigation.in.gmap_img_embeds": "navigation.in.gmap_masks",
    "navigation.in.vp_img_embeds": "navigation.in.vp_masks",
    "navigation.out.gmap_embeds": "navigation.in.gmap_masks",
    "navigation.out.vp_embeds": "navigation.in.vp_masks",
}
_ID_ITEMS = {
    "panorama.in.cand_vpids", "panorama.in.obj_ids", "navigation.in.gmap_vpids",
    "navigation.in.vp_cand_vpids",
}
#: ``final.pred_objid`` of a sample whose stop node showed no object (None upstream).
NO_OBJECT_ID = -1


# ------------------------------------------------------------------------------------ report


@dataclass
class ParityItem:
    """One compared quantity, aggregated over every call/step where it occurs."""

    name: str
    exact: bool  # ids / ints / bools: must match entry for entry
    max_diff: float = 0.0  # float items: max |diff|; exact items: number of mismatches
    count: int = 0  # occurrences compared
    inf_mismatch: int = 0  # entries where exactly one side is -inf/+inf/nan
    problems: list[str] = field(default_factory=list)  # shape mismatches and the like

    def passed(self, tol: float) -> bool:
        if self.problems or self.inf_mismatch:
            return False
        return self.max_diff == 0 if self.exact else self.max_diff <= tol


@dataclass
class ParityReport:
    """All compared items; ``passed`` when every item is within ``tol`` (exact ones exact)."""

    tol: float
    items: dict[str, ParityItem] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(item.passed(self.tol) for item in self.items.values())

    def failures(self) -> list[ParityItem]:
        return [item for item in self.items.values() if not item.passed(self.tol)]

    def format_table(self) -> str:
        width = max([len(n) for n in self.items] + [4])
        lines = [f"{'item':<{width}}  {'n':>3}  {'max |diff|':>11}  {'-inf':>4}  result"]
        lines.append("-" * len(lines[0]))
        for item in self.items.values():
            diff = f"{int(item.max_diff):d} wrong" if item.exact else f"{item.max_diff:.3e}"
            verdict = "ok" if item.passed(self.tol) else "FAIL"
            if item.problems:
                verdict += " (" + "; ".join(item.problems[:2]) + ")"
            lines.append(
                f"{item.name:<{width}}  {item.count:>3}  {diff:>11}  {item.inf_mismatch:>4}  {verdict}"
            )
        n_fail = len(self.failures())
        lines.append(
            f"{len(self.items)} items, tolerance {self.tol:g}: "
            + ("PASS" if n_fail == 0 else f"FAIL ({n_fail} items)")
        )
        return "\n".join(lines)


class _Comparator:
    """Accumulates comparisons into a :class:`ParityReport`."""

    def __init__(self, tol: float) -> None:
        self.report = ParityReport(tol)

    def _item(self, name: str, exact: bool) -> ParityItem:
        if name not in self.report.items:
            self.report.items[name] = ParityItem(name, exact)
        return self.report.items[name]

    def problem(self, name: str, message: str, exact: bool = True) -> None:
        self._item(name, exact).problems.append(message)

    def compare(
        self,
        name: str,
        ours: Any,
        ref: Any,
        *,
        exact: bool = False,
        row_mask: np.ndarray | None = None,
        where: str = "",
    ) -> None:
        """Compare two arrays; ``row_mask`` (leading dims) selects the rows compared."""
        item = self._item(name, exact)
        item.count += 1
        ours_a, ref_a = _to_numpy(ours), _to_numpy(ref)
        if ours_a.shape != ref_a.shape:
            item.problems.append(f"{where}shape {ours_a.shape} vs {ref_a.shape}")
            return
        if row_mask is not None:
            row_mask = np.asarray(row_mask, dtype=bool)
            ours_a, ref_a = ours_a[row_mask], ref_a[row_mask]
        if exact:
            item.max_diff = max(item.max_diff, float(np.count_nonzero(ours_a != ref_a)))
            return
        o, r = ours_a.astype(np.float64), ref_a.astype(np.float64)
        o_fin, r_fin = np.isfinite(o), np.isfinite(r)
        special_match = (~o_fin & ~r_fin) & ((o == r) | (np.isnan(o) & np.isnan(r)))
        item.inf_mismatch += int(np.count_nonzero((o_fin != r_fin) | (~o_fin & ~r_fin & ~special_match)))
        both = o_fin & r_fin
        if both.any():
            item.max_diff = max(item.max_diff, float(np.max(np.abs(o[both] - r[both]))))


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


# ----------------------------------------------------------------------------------- fixture


def load_fixture_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """All arrays of a fixture ``.npz`` (no pickles)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"fixture {path} does not exist")
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def fixture_config(data: dict[str, np.ndarray]) -> dict[str, Any]:
    return json.loads(str(data["config_json"]))


def encode_ids(lists: Sequence[Sequence[Any]], width: int) -> np.ndarray:
    """Per-sample id lists -> int64 array in the fixture's encoding, at least ``width`` wide
    (wider when a list is longer, so that the comparison reports a shape mismatch)."""
    return fixture_ids.encode_ids([list(r) for r in lists], max([width] + [len(r) for r in lists]))


def fixture_observation(data: dict[str, np.ndarray], t: int, i: int, image_feat_size: int) -> NodeObservation:
    """Sample ``i``'s raw observation at step ``t``; the stored features are image ++ angle
    (the angle part is recomputed by our panorama builder, and compared separately).  A REVERIE
    fixture's observations also carry the viewpoint's objects (``obj_img_fts``, ``obj_ang_fts``,
    ``obj_box_fts``, ``obj_ids``: upstream's observation fields, taken as they are)."""
    p = f"step{t}.obs{i}."
    cands = [
        Candidate(
            viewpoint=int(vp),
            point_id=int(pid),
            position=np.asarray(pos, dtype=np.float64),
            rel_heading=float(h),
            rel_elevation=float(e),
        )
        for vp, pid, pos, h, e in zip(
            data[p + "cand_vpids"], data[p + "cand_pointids"], data[p + "cand_positions"],
            data[p + "cand_headings"], data[p + "cand_elevations"],
        )
    ]
    ob = NodeObservation(
        viewpoint=int(data[p + "viewpoint"]),
        view_index=int(data[p + "viewIndex"]),
        heading=float(data[p + "heading"]),
        elevation=float(data[p + "elevation"]),
        position=np.asarray(data[p + "position"], dtype=np.float64),
        view_features=np.asarray(data[p + "feature"][:, :image_feat_size], dtype=np.float32),
        candidates=cands,
    )
    if p + "obj_img_fts" in data:
        ob.obj_img_fts = np.asarray(data[p + "obj_img_fts"], dtype=np.float32)
        ob.obj_ang_fts = np.asarray(data[p + "obj_ang_fts"], dtype=np.float32)
        ob.obj_box_fts = np.asarray(data[p + "obj_box_fts"], dtype=np.float32)
        ob.obj_ids = [int(x) for x in data[p + "obj_ids"]]
    return ob


def fixture_calls(data: dict[str, np.ndarray]) -> list[tuple[str, str]]:
    """[(prefix 'callNN', mode)] in execution order."""
    out = []
    for entry in data["call_order"].tolist():
        prefix, mode = str(entry).split(".")
        out.append((prefix, mode))
    return out


def call_arrays(data: dict[str, np.ndarray], prefix: str, mode: str, side: str) -> dict[str, np.ndarray]:
    head = f"{prefix}.{mode}.{side}."
    return {k[len(head):]: v for k, v in data.items() if k.startswith(head)}


def build_fixture_model(fixture_path: str | Path) -> nn.Module:
    """Our DUET from the fixture's config and stored weights, in eval mode."""
    return fixture_ids.load_fixture(fixture_path).build_model()


class RecordedModel:
    """Stand-in network that returns the fixture's recorded outputs call by call (to test the
    bookkeeping alone)."""

    def __init__(self, data: dict[str, np.ndarray]) -> None:
        self.data = data
        self.calls = fixture_calls(data)
        self.next = 0

    def __call__(self, mode: str, batch: dict[str, Any]) -> Any:
        prefix, rec_mode = self.calls[self.next]
        self.next += 1
        if rec_mode != mode:
            raise RuntimeError(f"call {prefix} is {rec_mode}, the agent asked for {mode}")
        out = {k: torch.from_numpy(v) for k, v in call_arrays(self.data, prefix, mode, "out").items()}
        if mode == "language":
            return out["txt_embeds"]
        if mode == "panorama":
            return out["pano_embeds"], out["pano_masks"]
        out.setdefault("obj_logits", None)
        return out


# ------------------------------------------------------------------------------------ replay


def _fuse_weights(outs: dict[str, Any]) -> Any:
    w = outs.get("fuse_weights", outs.get("fuse_weight"))
    return None if w is None else torch.as_tensor(w).reshape(-1, 1)


def _compare_call(
    cmp: _Comparator,
    data: dict[str, np.ndarray],
    prefix: str,
    mode: str,
    ours_in: dict[str, Any],
    ours_out: dict[str, Any],
    section: str,
    compare_inputs: bool = True,
) -> None:
    """Compare one call's inputs (those we built) and outputs with the recording."""
    ref_in = call_arrays(data, prefix, mode, "in")
    ref_out = call_arrays(data, prefix, mode, "out")
    sides = [("out", ref_out, ours_out)] + ([("in", ref_in, ours_in)] if compare_inputs else [])
    masks = {f"{mode}.in.{k}": v for k, v in ref_in.items()}
    masks.update({f"{mode}.out.{k}": v for k, v in ref_out.items()})
    for side, ref, ours in sides:
        for key, ref_arr in ref.items():
            name = f"{mode}.{side}.{key}"
            label = f"{section}.{name}"
            if key not in ours or ours[key] is None:
                cmp.problem(label, f"{prefix}: not produced")
                continue
            value = ours[key]
            if name in _ID_ITEMS:
                ours_ids = encode_ids(value, ref_arr.shape[1])
                cmp.compare(label, ours_ids, ref_arr, exact=True, where=f"{prefix} ")
                continue
            exact = ref_arr.dtype.kind in "biu"
            row_mask = masks.get(_MASKED_ROWS.get(name, ""))
            cmp.compare(label, value, ref_arr, exact=exact, row_mask=row_mask, where=f"{prefix} ")


def replay(
    data: dict[str, np.ndarray],
    model: Callable[[str, dict[str, Any]], Any],
    cmp: _Comparator,
    *,
    navigator_factory: Callable[..., MapNavigator] = MapNavigator,
    check_outputs: bool = True,
) -> MapNavigator:
    """Integration replay: raw observations + prescribed actions through our bookkeeping and
    ``model``; every built input, output, move and final path is compared."""
    cfg = fixture_config(data)
    image_feat_size = int(cfg["image_feat_size"])
    angle_feat_size = int(cfg.get("angle_feat_size", 4))
    batch_size = int(data["step0.action_idx"].shape[0])
    n_steps = 1 + max(int(k.split(".")[0][4:]) for k in data if k.startswith("step"))
    calls = iter(fixture_calls(data))
    sect = "integration"

    def obs_at(t: int) -> list[NodeObservation]:
        return [fixture_observation(data, t, i, image_feat_size) for i in range(batch_size)]

    nav = navigator_factory(
        obs_at(0),
        angle_feat_size=angle_feat_size,
        enc_full_graph=bool(cfg.get("enc_full_graph", True)),
        act_visited_nodes=bool(cfg.get("act_visited_nodes", False)),
    )
    with torch.no_grad():
        prefix, mode = next(calls)
        lang_in = {
            "txt_ids": torch.from_numpy(data["instr_encoding"]).long(),
            "txt_masks": torch.from_numpy(data["instr_encoding"] != 0),
        }
        txt_embeds = model("language", lang_in)
        _compare_call(cmp, data, prefix, mode, lang_in, {"txt_embeds": txt_embeds}, sect)

        for t in range(n_steps):
            cmp.compare(f"{sect}.step.ended_before", nav.ended, data[f"step{t}.ended_before"], exact=True)
            nav.begin_step(t)
            pano = nav.panorama_inputs()
            prefix, mode = next(calls)
            pano_in = dict(pano.model_inputs(), cand_vpids=pano.cand_vpids)
            if pano.uses_objects:
                pano_in["obj_ids"] = pano.obj_ids
            pano_embeds, pano_masks = model("panorama", pano.model_inputs())
            _compare_call(
                cmp, data, prefix, mode, pano_in,
                {"pano_embeds": pano_embeds, "pano_masks": pano_masks}, sect,
            )
            _compare_obs_angles(cmp, data, t, pano, image_feat_size, angle_feat_size, sect)
            avg = nav.absorb_panorama(pano, pano_embeds, pano_masks)
            cmp.compare(f"{sect}.step.avg_pano_embeds", avg, data[f"step{t}.avg_pano_embeds"])

            batch = nav.navigation_inputs(pano, pano_embeds, pano_masks, txt_embeds, lang_in["txt_masks"])
            prefix, mode = next(calls)
            outs = model("navigation", batch.inputs)
            nav_in = dict(batch.inputs, no_vp_left=np.array(batch.no_vp_left))
            nav_out = dict(outs, fuse_weights=_fuse_weights(outs))
            _compare_call(cmp, data, prefix, mode, nav_in, nav_out, sect)
            nav.record_scores(outs["fused_logits"], outs.get("obj_logits"), pano)

            actions = data[f"step{t}.action_idx"]
            moves = nav.act(t, [max(int(a), 0) for a in actions], batch)
            targets = np.array([-1 if m is None else int(m.target) for m in moves], dtype=np.int64)
            cmp.compare(f"{sect}.step.action_vpid", targets, data[f"step{t}.action_vpid"], exact=True)
            if t + 1 < n_steps:
                next_obs = obs_at(t + 1)
                _compare_moves(cmp, nav.obs, moves, next_obs, sect)
                nav.observe(next_obs)
            elif not nav.all_ended:
                cmp.problem(f"{sect}.final.ended", "episode not over after the last recorded step")

    for i in range(batch_size):
        cmp.compare(f"{sect}.final.path", np.array(nav.paths[i]), data[f"final.path{i}"], exact=True,
                    where=f"sample {i} ")
    cmp.compare(
        f"{sect}.final.stop_node",
        np.array([-2 if s is None else s for s in nav.stop_nodes]), data["final.stop_node"], exact=True,
    )
    if "final.pred_objid" in data:
        pred = [NO_OBJECT_ID if o is None else int(o) for o in nav.predicted_objects]
        cmp.compare(f"{sect}.final.pred_objid", np.array(pred, dtype=np.int64), data["final.pred_objid"],
                    exact=True)
    return nav


def _compare_moves(
    cmp: _Comparator,
    obs: Sequence[NodeObservation],
    moves: Sequence[Any],
    next_obs: Sequence[NodeObservation],
    sect: str,
) -> None:
    """Where each sample ends up (node, heading, elevation, view) vs the next observation."""
    ours_vp, ref_vp, ours_dir, ref_dir = [], [], [], []
    for ob, move, nxt in zip(obs, moves, next_obs):
        if move is None:
            ours_vp.append([ob.viewpoint, ob.view_index])
            ours_dir.append([ob.heading, ob.elevation])
        else:
            ours_vp.append([move.target, move.view_index])
            ours_dir.append([move.heading, move.elevation])
        ref_vp.append([nxt.viewpoint, nxt.view_index])
        ref_dir.append([nxt.heading, nxt.elevation])
    cmp.compare(f"{sect}.step.next_viewpoint_view", np.array(ours_vp), np.array(ref_vp), exact=True)
    dh = np.array(ours_dir) - np.array(ref_dir)
    dh[:, 0] = (dh[:, 0] + math.pi) % (2 * math.pi) - math.pi  # headings modulo 2 pi
    cmp.compare(f"{sect}.step.next_heading_elevation", dh, np.zeros_like(dh))


def _compare_obs_angles(
    cmp: _Comparator,
    data: dict[str, np.ndarray],
    t: int,
    pano: PanoramaBatch,
    image_feat_size: int,
    angle_feat_size: int,
    sect: str,
) -> None:
    """Our recomputed angle features vs the angle part stored in the raw observations."""
    for i, cands in enumerate(pano.cand_vpids):
        p = f"step{t}.obs{i}."
        n_c = len(cands)
        loc = pano.loc_fts[i].numpy()
        cmp.compare(f"{sect}.obs.cand_angle_fts", loc[:n_c, :angle_feat_size],
                    data[p + "cand_features"][:, image_feat_size:])
        used = set(int(v) for v in data[p + "cand_pointids"])
        rest = [k for k in range(36) if k not in used]
        n_v = int(pano.view_lens[i])
        cmp.compare(f"{sect}.obs.view_angle_fts", loc[n_c:n_v, :angle_feat_size],
                    data[p + "feature"][rest, image_feat_size:])


def unit_calls(
    fixture_path: str | Path, model: Callable[[str, dict[str, Any]], Any], cmp: _Comparator
) -> None:
    """Unit replay: each call fed its *recorded* inputs; outputs compared."""
    fixture = fixture_ids.load_fixture(fixture_path)
    data = load_fixture_arrays(fixture_path)
    with torch.no_grad():
        for call in fixture.calls:
            out = model(call.mode, call.batch())
            if call.mode == "language":
                ours = {"txt_embeds": out}
            elif call.mode == "panorama":
                ours = {"pano_embeds": out[0], "pano_masks": out[1]}
            else:
                ours = dict(out, fuse_weights=_fuse_weights(out))
            _compare_call(cmp, data, call.name, call.mode, {}, ours, "unit", compare_inputs=False)


def run_parity(
    fixture_path: str | Path,
    tol: float = 1e-4,
    *,
    model: nn.Module | None = None,
    recorded_outputs: bool = False,
    navigator_factory: Callable[..., MapNavigator] = MapNavigator,
) -> ParityReport:
    """Replay the fixture and compare everything; see the module docstring.

    ``model``: a network to test instead of the one built from the fixture's weights.
    ``recorded_outputs``: skip our network and feed the recorded outputs back (tests the
    agent-side bookkeeping alone; output items are then trivially equal and not reported).
    """
    data = load_fixture_arrays(fixture_path)
    cmp = _Comparator(tol)
    if recorded_outputs:
        replay(data, RecordedModel(data), cmp, navigator_factory=navigator_factory)
        for name in [n for n in cmp.report.items if ".out." in n]:
            del cmp.report.items[name]
        return cmp.report
    if model is None:
        model = build_fixture_model(fixture_path)
    unit_calls(fixture_path, model, cmp)
    replay(data, model, cmp, navigator_factory=navigator_factory)
    return cmp.report


# --------------------------------------------------------------------------------------- CLI


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "parity",
        help="replay the reference DUET fixture through our network and map; compare everything",
    )
    p.add_argument("--fixture", required=True, help="reference fixture .npz (duet_fixture_*.npz)")
    p.add_argument("--tol", type=float, default=1e-4, help="max |diff| allowed on float values")
    p.add_argument(
        "--recorded-outputs", action="store_true",
        help="check the agent-side bookkeeping only (feed back the recorded network outputs)",
    )
    p.set_defaults(func=_parity)


def _parity(args: argparse.Namespace) -> int:
    report = run_parity(args.fixture, args.tol, recorded_outputs=args.recorded_outputs)
    print(report.format_table())
    return 0 if report.passed else 1
