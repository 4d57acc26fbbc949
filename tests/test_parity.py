"""Parity with the reference DUET episode, and unit tests of the agent's topological map."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from minivln.geometry import direction, nearest_view, view_elevation, view_heading
from minivln.model import duet as duet_module
from minivln.model.agent_inputs import MapNavigator, build_panorama_inputs
from minivln.model.graph_map import (
    MAX_DIST,
    UNKNOWN_DIST,
    Candidate,
    FloydGraph,
    GraphMap,
    NodeObservation,
    object_location_fts,
)
from minivln.model.parity import build_fixture_model, run_parity

FIXTURE = "duet_fixture_r2r.npz"
REVERIE_FIXTURE = "duet_fixture_reverie.npz"


# ------------------------------------------------------------------------------ parity


@pytest.fixture(scope="module")
def fixture_path(reference_dir):
    path = reference_dir / FIXTURE
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


def test_fixture_parity_passes(fixture_path):
    report = run_parity(fixture_path, 1e-4)
    assert report.passed, report.format_table()
    # Every kind of quantity was actually compared.
    for name in (
        "integration.navigation.in.gmap_pos_fts",
        "integration.navigation.in.gmap_pair_dists",
        "integration.navigation.in.vp_pos_fts",
        "integration.navigation.out.fused_logits",
        "integration.final.path",
        "unit.navigation.out.fuse_weights",
    ):
        assert report.items[name].count > 0


def test_bookkeeping_alone_is_bit_exact(fixture_path):
    """With the recorded network outputs fed back, every built input equals the reference's."""
    report = run_parity(fixture_path, 0.0, recorded_outputs=True)
    assert report.passed, report.format_table()


def test_perturbed_weight_fails(fixture_path):
    model = build_fixture_model(fixture_path)
    with torch.no_grad():
        model.global_encoder.sprel_linear.weight.add_(1e-3)  # graph-distance slope, one scalar
    report = run_parity(fixture_path, 1e-4, model=model)
    assert not report.passed
    failed = {item.name for item in report.failures()}
    assert "integration.navigation.out.fused_logits" in failed
    assert "unit.navigation.out.gmap_embeds" in failed


def test_broken_go_back_rule_fails(fixture_path, monkeypatch):
    """Fusion without the summed "go back" score of visited candidates must be caught."""
    original = duet_module.fuse_local_into_global

    def no_backtrack(global_logits, local_logits, gmap_vpids, gmap_visited_masks, vp_cand_vpids):
        local = local_logits.clone()
        for i, cands in enumerate(vp_cand_vpids):
            visited = {vp for vp, v in zip(gmap_vpids[i], gmap_visited_masks[i].tolist()) if v}
            for j, vp in enumerate(cands):
                if j > 0 and vp in visited:
                    local[i, j] = 0.0
        return original(global_logits, local, gmap_vpids, gmap_visited_masks, vp_cand_vpids)

    monkeypatch.setattr(duet_module, "fuse_local_into_global", no_backtrack)
    report = run_parity(fixture_path, 1e-4)
    failed = {item.name for item in report.failures()}
    assert "integration.navigation.out.fused_logits" in failed
    assert "integration.navigation.out.global_logits" not in failed


def test_swapped_ghost_slots_fail(fixture_path, monkeypatch):
    original = GraphMap.slots

    def swapped(self, current, **kw):
        vpids, mask = original(self, current, **kw)
        ghosts = [j for j, m in enumerate(mask) if j > 0 and not m]
        if len(ghosts) >= 2:
            a, b = ghosts[-2:]
            vpids[a], vpids[b] = vpids[b], vpids[a]
        return vpids, mask

    monkeypatch.setattr(GraphMap, "slots", swapped)
    report = run_parity(fixture_path, 1e-4, recorded_outputs=True)
    failed = {item.name for item in report.failures()}
    assert "integration.navigation.in.gmap_vpids" in failed
    assert "integration.navigation.in.gmap_img_embeds" in failed


def test_missing_walk_back_fails(fixture_path, monkeypatch):
    monkeypatch.setattr(GraphMap, "best_stop", lambda self: None)
    report = run_parity(fixture_path, 1e-4, recorded_outputs=True)
    failed = {item.name for item in report.failures()}
    assert failed == {"integration.final.path", "integration.final.stop_node"}


def test_cli_exit_codes(fixture_path, capsys):
    from minivln.cli import main

    assert main(["parity", "--fixture", str(fixture_path), "--recorded-outputs"]) == 0
    assert "PASS" in capsys.readouterr().out
    # A negative tolerance cannot be met by any float item.
    assert main(["parity", "--fixture", str(fixture_path), "--recorded-outputs", "--tol", "-1"]) == 1
    assert "FAIL" in capsys.readouterr().out


# ---------------------------------------------------------------------- REVERIE parity
#
# The REVERIE episode: 3 samples, 5 steps, 0-5 objects per viewpoint (none at step 0 sample 1 and
# at step 3 sample 0), views and objects sharing one image projection, OG logits at every call.

OBJECT_ITEMS = (
    "integration.panorama.in.obj_img_fts",
    "integration.panorama.in.obj_lens",
    "integration.panorama.in.obj_ids",
    "integration.navigation.in.vp_obj_masks",
    "integration.navigation.out.obj_logits",
    "integration.final.pred_objid",
    "unit.navigation.out.obj_logits",
)


@pytest.fixture(scope="module")
def reverie_path(reference_dir):
    path = reference_dir / REVERIE_FIXTURE
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


def edited_fixture(src, dst, edit):
    """A copy of the fixture at ``dst`` with ``edit(arrays)`` applied to its arrays."""
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    edit(arrays)
    np.savez(dst, **arrays)
    return dst


def test_reverie_fixture_parity_passes(reverie_path):
    report = run_parity(reverie_path, 1e-4)
    assert report.passed, report.format_table()
    for name in OBJECT_ITEMS + ("integration.panorama.in.loc_fts", "integration.step.avg_pano_embeds"):
        assert report.items[name].count > 0, name


def test_reverie_bookkeeping_alone(reverie_path):
    """With the recorded outputs fed back, every built input equals the reference's up to float
    rounding: the reference's view angles come from its simulator's heading arithmetic (ours are
    recomputed from the view index; they differ by ~1e-15) and its masked mean of the panorama
    outputs sums them in another memory order (~1e-7); every id, mask and length is exact."""
    report = run_parity(reverie_path, 1e-6, recorded_outputs=True)
    assert report.passed, report.format_table()
    assert report.items["integration.final.pred_objid"].count == 1


def test_reverie_perturbed_object_feature_fails(reverie_path, tmp_path):
    def perturb(arrays):
        arrays["step2.obs0.obj_img_fts"][1, 3] += 0.05  # one entry of one object's feature

    path = edited_fixture(reverie_path, tmp_path / "perturbed.npz", perturb)
    failed = {item.name for item in run_parity(path, 1e-4).failures()}
    assert {
        "integration.panorama.in.obj_img_fts",
        "integration.panorama.out.pano_embeds",
        "integration.step.avg_pano_embeds",
        "integration.navigation.out.obj_logits",
    } <= failed
    assert not any(name.startswith("unit.") for name in failed)  # the recorded calls are untouched


def test_reverie_dropped_object_fails(reverie_path, tmp_path):
    def drop(arrays):  # step 1, sample 0 sees 2 objects: keep the first
        for key in ("obj_img_fts", "obj_ang_fts", "obj_box_fts", "obj_ids"):
            arrays[f"step1.obs0.{key}"] = arrays[f"step1.obs0.{key}"][:1]

    path = edited_fixture(reverie_path, tmp_path / "dropped.npz", drop)
    failed = {item.name for item in run_parity(path, 1e-4, recorded_outputs=True).failures()}
    assert {
        "integration.panorama.in.obj_lens",
        "integration.panorama.in.obj_ids",
        "integration.panorama.in.nav_types",
        "integration.navigation.in.vp_masks",
        "integration.navigation.in.vp_obj_masks",
    } <= failed


def test_reverie_replay_without_objects_fails(reverie_path):
    """The navigator building view tokens only (the bug this fixture caught) fails the replay."""

    class ViewsOnly(MapNavigator):
        def panorama_inputs(self, use_objects=None):
            return super().panorama_inputs(use_objects=False)

    failed = {item.name for item in run_parity(reverie_path, 1e-4, navigator_factory=ViewsOnly).failures()}
    assert {
        "integration.panorama.in.obj_img_fts",
        "integration.navigation.in.vp_obj_masks",
        "integration.navigation.out.obj_logits",
        "integration.navigation.out.fused_logits",
        "integration.final.pred_objid",
    } <= failed
    assert not any(name.startswith("unit.") for name in failed)


def test_reverie_lost_object_prediction_fails(reverie_path, monkeypatch):
    original = GraphMap.record_stop

    def without_object(self, vp, stop_prob, object_id=None):
        original(self, vp, stop_prob, None)

    monkeypatch.setattr(GraphMap, "record_stop", without_object)
    failed = {item.name for item in run_parity(reverie_path, 1e-4, recorded_outputs=True).failures()}
    assert failed == {"integration.final.pred_objid"}


# ------------------------------------------------------------------------- tiny world
#
#            B (0,4)
#            |
#   D (-2,1) A (0,2)          D is joined to both S and A
#            |
#            S (0,0) --- C (2,0)          heading 0 = +y (north), 90 degrees = +x (east)

POS = {
    "S": (0.0, 0.0, 0.0), "A": (0.0, 2.0, 0.0), "B": (0.0, 4.0, 0.0), "C": (2.0, 0.0, 0.0),
    "D": (-2.0, 1.0, 0.0),
}
ADJ = {"S": ["A", "C", "D"], "A": ["S", "B", "D"], "B": ["A"], "C": ["S"], "D": ["S", "A"]}
FEAT = 8


def make_obs(vp: str, view_index: int = 12, seed: int = 0) -> NodeObservation:
    """NodeObservation at ``vp`` facing discretised view ``view_index``; absolute candidate angles."""
    cands = []
    for n in ADJ[vp]:
        h, e, dist = direction(np.array(POS[vp]), np.array(POS[n]))
        cands.append(
            Candidate(n, nearest_view(h, e), np.array(POS[n]), heading=h, elevation=e, distance=dist)
        )
    rng = np.random.default_rng(seed)
    return NodeObservation(
        viewpoint=vp,
        view_index=view_index,
        heading=view_heading(view_index),
        elevation=view_elevation(view_index),
        position=np.array(POS[vp]),
        view_features=rng.standard_normal((36, FEAT)).astype(np.float32),
        candidates=cands,
    )


def angles(h: float, e: float) -> list[float]:
    return [math.sin(h), math.cos(h), math.sin(e), math.cos(e)]


def text(batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dummy (txt_embeds, txt_masks): the navigation inputs only pass them through."""
    return torch.zeros(batch_size, 2, 4), torch.ones(batch_size, 2, dtype=torch.bool)


def test_floyd_unknown_pairs_and_incremental_relaxation():
    g = FloydGraph()
    g.add_edge("S", "X", 1.0)
    g.add_edge("S", "M", 2.0)
    g.add_edge("S", "P", 5.0)
    assert g.distance("X", "M") == UNKNOWN_DIST  # not relaxed yet
    assert g.distance("X", "X") == 0.0
    g.update("S")
    assert g.distance("X", "M") == 3.0 and g.path("X", "M") == ["S", "M"]
    g.add_edge("P", "K", 6.0)
    g.update("P")
    assert g.distance("X", "K") == 12.0
    # Visiting K reveals a 1 m edge K-M; X-S-M-K is only 4 m, but the reference relaxes through
    # the newly visited node only, so pairs ending at K keep their old (longer) distance.
    g.add_edge("K", "M", 1.0)
    g.update("K")
    assert g.distance("K", "M") == 1.0
    assert g.distance("X", "K") == 12.0
    assert g.path("K", "X") == ["P", "S", "X"]
    assert g.visited("K") and not g.visited("M")


def test_ghost_feature_is_mean_over_visits_and_discarded_once_visited():
    def v(x: float) -> torch.Tensor:
        return torch.full((4,), float(x))

    gmap = GraphMap("S")
    gmap.update_graph(make_obs("S"))  # candidates A, C, D
    gmap.update_from_panorama("S", ["A", "C", "D"], torch.stack([v(1), v(2), v(3)]), v(10))
    gmap.update_graph(make_obs("A"))  # candidates S, B, D
    gmap.update_from_panorama("A", ["S", "B", "D"], torch.stack([v(4), v(5), v(6)]), v(20))
    assert torch.equal(gmap.node_embed("S"), v(10))  # a visited candidate is not accumulated
    assert torch.equal(gmap.node_embed("A"), v(20))  # current node: masked mean, ghost sum dropped
    assert torch.equal(gmap.node_embed("D"), v(4.5))  # ghost seen from S and from A: mean
    assert torch.equal(gmap.node_embed("C"), v(2)) and torch.equal(gmap.node_embed("B"), v(5))
    gmap.update_graph(make_obs("D"))
    gmap.update_from_panorama("D", ["S", "A"], torch.stack([v(7), v(8)]), v(30))
    assert torch.equal(gmap.node_embed("D"), v(30))
    assert torch.equal(gmap.node_embed("A"), v(20))


def test_slot_order_and_pos_fts():
    gmap = GraphMap("S")
    gmap.update_graph(make_obs("S"))
    gmap.update_graph(make_obs("A"))
    vpids, visited = gmap.slots("A")
    assert vpids == [None, "S", "A", "C", "D", "B"]
    assert visited == [False, True, True, False, False, False]
    h0, e0 = 0.3, 0.1
    fts = gmap.pos_fts("A", [None, "A", "S", "C"], h0, e0)
    assert fts.dtype == np.float32 and fts.shape == (4, 7)
    np.testing.assert_array_equal(fts[0], [0, 1, 0, 1, 0, 0, 0])
    np.testing.assert_allclose(fts[1, :4], angles(-h0, -e0), atol=1e-7)
    np.testing.assert_allclose(fts[1, 4:], 0.0, atol=1e-9)
    # S lies due south of A (heading pi); one hop, 2 m.
    np.testing.assert_allclose(fts[2, :2], [math.sin(math.pi - h0), math.cos(math.pi - h0)], atol=1e-6)
    np.testing.assert_allclose(fts[2, 4:], [2 / MAX_DIST, 2 / MAX_DIST, 0.1], rtol=1e-6)
    # C: straight line sqrt(8) but 4 m and 2 hops on the agent's graph.
    np.testing.assert_allclose(fts[3, 4:], [math.sqrt(8) / MAX_DIST, 4 / MAX_DIST, 0.2], rtol=1e-6)
    pair = gmap.pair_dists(vpids)
    assert pair[0].sum() == 0 and pair[:, 0].sum() == 0
    assert pair[3, 5] == pytest.approx(6.0)  # C-S-A-B
    assert pair[4, 5] == pytest.approx(math.sqrt(5) + 2)  # D-A-B


def _step(nav: MapNavigator, t: int, stop_probs: dict[str, float], choose: str | None):
    """One step with random panorama outputs; the fused logits give ``stop_probs[current]`` to
    STOP and pick ``choose`` (None = STOP)."""
    nav.begin_step(t)
    pano = nav.panorama_inputs()
    gen = torch.Generator().manual_seed(t)
    n = pano.loc_fts.shape[1]
    pano_embeds = torch.randn(1, n, 4, generator=gen)
    pano_masks = torch.arange(n)[None] < pano.view_lens[:, None]
    nav.absorb_panorama(pano, pano_embeds, pano_masks)
    batch = nav.navigation_inputs(pano, pano_embeds, pano_masks, *text(1))
    vpids = batch.gmap_vpids[0]
    p = stop_probs[nav.obs[0].viewpoint]
    logits = torch.full((1, len(vpids)), -math.inf)
    logits[0, 0] = math.log(p)
    ghosts = [j for j, m in enumerate(batch.inputs["gmap_visited_masks"][0].tolist()) if j > 0 and not m]
    for j in ghosts:
        logits[0, j] = math.log((1 - p) / len(ghosts))
    nav.record_scores(logits)
    action = 0 if choose is None else vpids.index(choose)
    return batch, nav.act(t, [action], batch)


def test_episode_teleport_step_ids_and_final_walk_back():
    nav = MapNavigator([make_obs("S", view_index=12)])
    probs = {"S": 0.9, "A": 0.5, "C": 0.1}
    batch, moves = _step(nav, 0, probs, "A")
    assert batch.gmap_vpids[0] == [None, "S", "A", "C", "D"]
    assert moves[0].path == ["A"] and moves[0].view_index == 12  # A is due north of S
    nav.observe([make_obs("A", view_index=moves[0].view_index)])

    batch, moves = _step(nav, 1, probs, "C")  # C is not adjacent to A: teleport through S
    assert moves[0].path == ["S", "C"]
    assert moves[0].view_index == 15  # the view in which C was seen from S (east, level)
    assert moves[0].heading == pytest.approx(math.pi / 2) and moves[0].elevation == 0.0
    nav.observe([make_obs("C", view_index=moves[0].view_index)])

    batch, moves = _step(nav, 2, probs, None)
    # slots [stop, S, A, C, D, B]: S, A, C visited at steps 0, 1, 2; D and B are ghosts
    assert batch.inputs["gmap_step_ids"][0].tolist() == [0, 1, 2, 3, 0, 0]
    assert moves == [None] and nav.all_ended
    # STOP at C, but S had the highest STOP probability: walk back along the agent's graph.
    assert nav.paths[0] == ["S", "A", "S", "C", "S"]
    assert nav.stop_nodes[0] == "S"
    assert pytest.approx(nav.maps[0].stop_records["A"].stop_prob) == 0.5

    # The frozen map of an ended sample is not touched by later calls.
    before = dict(nav.maps[0].step_ids)
    nav.observe([make_obs("C", view_index=15)])
    nav.begin_step(3)
    assert nav.maps[0].step_ids == before


def test_step_ids_overwritten_on_revisit():
    nav = MapNavigator([make_obs("S")], act_visited_nodes=True)
    probs = {"S": 0.2, "A": 0.2}
    batch, moves = _step(nav, 0, probs, "A")
    nav.observe([make_obs("A", view_index=moves[0].view_index)])
    batch, moves = _step(nav, 1, probs, "S")  # with act_visited_nodes, S may be chosen again
    # only the current node counts as visited
    assert batch.gmap_vpids[0] == [None, "A", "S", "C", "D", "B"]
    nav.observe([make_obs("S", view_index=moves[0].view_index)])
    nav.begin_step(2)
    assert nav.maps[0].step_ids == {"S": 3, "A": 2}


def test_last_step_and_no_ghost_end_the_episode():
    nav = MapNavigator([make_obs("S")], max_action_len=1)
    _, moves = _step(nav, 0, {"S": 0.3}, "A")
    assert moves == [None] and nav.paths[0] == ["S"]  # t == max_action_len - 1: forced stop


def test_panorama_tokens_shared_view_and_angles():
    ob = make_obs("S", view_index=14)  # facing 60 degrees, level
    ob.candidates = [
        Candidate("P", 12, np.zeros(3), rel_heading=-1.0, rel_elevation=0.0),
        Candidate("Q", 12, np.zeros(3), rel_heading=-1.1, rel_elevation=0.05),
        Candidate("R", 15, np.zeros(3), heading=math.radians(95), elevation=0.0),  # absolute
    ]
    pano = build_panorama_inputs([ob, make_obs("A")])
    assert pano.view_lens.tolist() == [37, 36]
    assert pano.cand_vpids[0] == ["P", "Q", "R"]
    order = [12, 12, 15] + [k for k in range(36) if k not in (12, 15)]
    np.testing.assert_array_equal(pano.view_img_fts[0].numpy(), ob.view_features[order])
    assert pano.nav_types[0].tolist() == [1, 1, 1] + [0] * 34
    assert pano.nav_types[1, 36].item() == 0 and pano.loc_fts[1, 36].abs().sum() == 0  # padding
    loc = pano.loc_fts[0].numpy()
    np.testing.assert_allclose(loc[0, :4], [math.sin(-1.0), math.cos(-1.0), 0, 1], atol=1e-7)
    base = math.radians(60)
    np.testing.assert_allclose(loc[2, :4], angles(math.radians(95) - base, 0.0), atol=1e-7)
    # view 0 (heading 0, looking down) relative to view 14 (heading 60, level)
    np.testing.assert_allclose(loc[3, :4], angles(-base, -math.radians(30)), atol=1e-7)
    np.testing.assert_array_equal(loc[:37, 4:], 1.0)


def test_object_location_features():
    """Upstream's ObjectFeatureDB: angles relative to the given base, boxes (h/480, w/640, product)."""
    dirs = np.array([[0.5, 0.1], [-2.0, -0.3]])  # (heading, elevation)
    sizes = np.array([[64.0, 48.0], [640.0, 480.0]])  # (width, height)
    ang, box = object_location_fts(dirs, sizes, 0.4, 0.2)
    assert ang.dtype == box.dtype == np.float32 and ang.shape == (2, 4) and box.shape == (2, 3)
    np.testing.assert_allclose(ang[0], angles(0.5 - 0.4, 0.1 - 0.2), atol=1e-7)
    np.testing.assert_allclose(ang[1], angles(-2.4, -0.5), atol=1e-7)
    np.testing.assert_allclose(box, [[0.1, 0.1, 0.01], [1.0, 1.0, 1.0]], rtol=1e-6)
    empty_ang, empty_box = object_location_fts(np.zeros((0, 2)), np.zeros((0, 2)), 0.0, 0.0)
    assert empty_ang.shape == (0, 4) and empty_box.shape == (0, 3)


def test_object_tokens_and_masks():
    ob = make_obs("S")
    ob.obj_img_fts = np.ones((2, 5), dtype=np.float32)
    ob.obj_ang_fts, ob.obj_box_fts = object_location_fts(
        np.array([[0.1, 0.0], [-0.2, 0.3]]), np.array([[64.0, 48.0], [640.0, 480.0]]), 0.0, 0.0
    )
    ob.obj_ids = ["o1", "o2"]
    other = make_obs("A")  # no objects
    pano = build_panorama_inputs([ob, other])
    assert pano.uses_objects and pano.obj_lens.tolist() == [2, 0]
    assert pano.obj_img_fts.shape == (2, 2, 5)
    assert pano.nav_types[0, 36:].tolist() == [2, 2]
    np.testing.assert_allclose(pano.loc_fts[0, 36].numpy(), angles(0.1, 0.0) + [0.1, 0.1, 0.01], rtol=1e-6)
    np.testing.assert_allclose(pano.loc_fts[0, 37, 4:].numpy(), [1.0, 1.0, 1.0])
    # an 8-d angle feature tiles the 4-d one (upstream's get_angle_fts)
    wide = build_panorama_inputs([ob, other], angle_feat_size=8)
    np.testing.assert_array_equal(wide.loc_fts[0, 36, :4], wide.loc_fts[0, 36, 4:8])
    np.testing.assert_array_equal(wide.loc_fts[0, 36, 8:], pano.loc_fts[0, 36, 4:])
    # a batch in which no viewpoint shows an object keeps the object feature width
    other.obj_img_fts = np.zeros((0, 5), dtype=np.float32)
    none = build_panorama_inputs([other, other])
    assert none.obj_img_fts.shape == (2, 0, 5) and none.obj_lens.tolist() == [0, 0]
    nav = MapNavigator([ob, other])
    nav.begin_step(0)
    n = pano.loc_fts.shape[1]
    embeds = torch.randn(2, n, 4)
    masks = torch.arange(n)[None] < (pano.view_lens + pano.obj_lens)[:, None]
    nav.absorb_panorama(pano, embeds, masks)
    batch = nav.navigation_inputs(pano, embeds, masks, *text(2))
    assert batch.inputs["vp_obj_masks"][0].nonzero().ravel().tolist() == [37, 38]
    assert batch.inputs["vp_masks"].sum(1).tolist() == [39, 37]
    obj_logits = torch.full((2, n + 1), -math.inf)
    obj_logits[0, 37], obj_logits[0, 38] = 0.0, 1.0
    nav.record_scores(torch.zeros(2, batch.inputs["gmap_masks"].shape[1]), obj_logits, pano)
    assert nav.maps[0].stop_records["S"].object_id == "o2"
    assert nav.maps[1].stop_records["A"].object_id is None


def test_stop_slot_without_stop_decision_ends_without_walk_back():
    nav = MapNavigator([make_obs("S")])
    _, moves = _step(nav, 0, {"S": 0.3, "A": 0.9}, "A")
    nav.observe([make_obs("A", view_index=moves[0].view_index)])
    nav.begin_step(1)
    pano = nav.panorama_inputs()
    n = pano.loc_fts.shape[1]
    embeds = torch.randn(1, n, 4)
    masks = torch.arange(n)[None] < pano.view_lens[:, None]
    nav.absorb_panorama(pano, embeds, masks)
    batch = nav.navigation_inputs(pano, embeds, masks, *text(1))
    moves = nav.act(1, [0], batch, stop=[False])
    assert moves == [None] and nav.all_ended
    assert nav.paths[0] == ["S", "A"] and nav.stop_nodes[0] == "A"
