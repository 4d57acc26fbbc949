import math

import numpy as np
import pytest
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import dijkstra
from tinyworld import SCAN, write_tiny_data

from minivln import geometry as geo
from minivln.data.datasets import load_episodes
from minivln.data.graph import Graphs, build_house, list_scans, load_house, shortest_paths
from minivln.data.toyworld import ToyWorldConfig, ensure_toy_world
from minivln.env.env import (
    NavBatchEnv,
    candidates_at,
    evaluate_policy,
    expert_policy,
    make_random_policy,
)
from minivln.paths import DataError


@pytest.fixture()
def tiny(tmp_path):
    return write_tiny_data(tmp_path)


def test_graph_symmetrises_edges_and_drops_excluded(tiny):
    h = load_house(SCAN, tiny)
    assert h.vp_ids == ["a", "b", "c", "d", "e"]
    assert h.is_neighbor("b", "a") and h.is_neighbor("a", "b")
    assert not h.is_neighbor("a", "c")
    assert sorted(h.neighbors("b")) == ["a", "c", "e"]
    assert "f" not in h  # e-f edge goes away with f
    assert h.neighbors("e") == ["b"]


def test_shortest_distances_and_paths(tiny):
    h = load_house(SCAN, tiny)
    assert h.distance("a", "d") == pytest.approx(7.0)
    assert h.distance("d", "e") == pytest.approx(3.0 + 2.0 + 2.0)
    assert h.shortest_path("a", "d") == ["a", "b", "c", "d"]
    assert h.shortest_path("d", "d") == ["d"]
    assert h.path_length(["a", "b", "b", "a"]) == pytest.approx(4.0)
    assert h.euclidean("a", "d") == pytest.approx(5.0)
    with pytest.raises(KeyError, match="not an included viewpoint"):
        h.idx("f")


def test_graph_cache_round_trip(tiny):
    h1 = load_house(SCAN, tiny)
    from minivln.data import graph

    graph._load_house_cached.cache_clear()
    h2 = load_house(SCAN, tiny)  # now from the on-disk cache
    assert h2.vp_ids == h1.vp_ids
    np.testing.assert_array_equal(h1.dist, h2.dist)
    np.testing.assert_array_equal(h1.pred, h2.pred)


def _scipys(weights):
    dist, pred = dijkstra(csr_matrix(weights), directed=False, return_predecessors=True)
    return dist, pred.astype(np.int32)


def test_shortest_paths_are_scipys_on_random_graphs():
    """Same distances (bit for bit) and predecessors as scipy's Dijkstra, disconnected parts included."""
    rng = np.random.default_rng(0)
    for n in (0, 1, 2, 9, 60):
        edge = rng.random((n, n)) < 0.1
        edge = np.triu(edge | edge.T, 1)
        edge[: n // 2, n // 2:] = False  # two parts that no path joins
        weights = rng.uniform(0.5, 3.0, (n, n)) * edge
        weights = weights + weights.T
        dist, pred = shortest_paths(weights)
        ref_dist, ref_pred = _scipys(weights)
        assert dist.dtype == np.float64 and pred.dtype == np.int32
        np.testing.assert_array_equal(dist, ref_dist)
        np.testing.assert_array_equal(pred, ref_pred)
        if n == 60:
            assert np.isinf(dist).sum() == 2 * 30 * 30 and (pred >= 0).sum() > 2 * n


def _graph_weights(house):
    return np.linalg.norm(house.positions[:, None] - house.positions[None], axis=-1) * house.adjacency


def test_shortest_paths_are_scipys_on_the_toy_world(tmp_path):
    data = ensure_toy_world(tmp_path / "toy", 0, ToyWorldConfig())
    graphs = Graphs(data)
    for scan in graphs.scans():
        house = graphs[scan]
        ref_dist, ref_pred = _scipys(_graph_weights(house))
        np.testing.assert_array_equal(house.dist, ref_dist)
        np.testing.assert_array_equal(house.pred, ref_pred)


@pytest.mark.realdata
def test_shortest_paths_are_scipys_on_every_real_house(real_data_dir):
    import json

    for scan in list_scans(real_data_dir):
        entries = json.loads((real_data_dir / "connectivity" / f"{scan}_connectivity.json").read_text())
        house = build_house(scan, entries)
        ref_dist, ref_pred = _scipys(_graph_weights(house))
        np.testing.assert_array_equal(house.dist, ref_dist, err_msg=scan)
        np.testing.assert_array_equal(house.pred, ref_pred, err_msg=scan)


def test_missing_and_malformed_connectivity(tmp_path):
    (tmp_path / "connectivity").mkdir()
    with pytest.raises(DataError, match="no connectivity file"):
        load_house("nope", tmp_path)
    (tmp_path / "connectivity" / "bad_connectivity.json").write_text("[{")
    with pytest.raises(DataError, match="not valid JSON"):
        load_house("bad", tmp_path)
    assert list_scans(tmp_path) == ["bad"]


def test_geometry_conventions():
    # heading from +y, clockwise seen from above: +x is 90 degrees
    h, e, d = geo.direction([0, 0, 0], [1, 0, 0])
    assert h == pytest.approx(math.pi / 2) and e == pytest.approx(0) and d == pytest.approx(1)
    h, e, _ = geo.direction([0, 0, 0], [0, -1, 1])
    assert h == pytest.approx(math.pi) and e == pytest.approx(math.pi / 4)
    assert geo.nearest_view(math.pi / 2, 0.0) == 12 + 3
    assert geo.nearest_view(math.radians(355), math.radians(-40)) == 0
    assert geo.nearest_view(math.radians(44), math.radians(20)) == 24 + 1
    assert geo.discretised_view(math.radians(44)) == 12 + 1
    assert geo.view_elevation(30) == pytest.approx(math.radians(30))


def test_candidates_relative_to_discretised_view(tiny):
    h = load_house(SCAN, tiny)
    cands = {c.viewpoint: c for c in candidates_at(h, "b", heading=math.radians(100), elevation=0.0)}
    assert set(cands) == {"a", "c", "e"}
    c = cands["c"]  # due east: heading 90 degrees, view 15
    assert c.view_index == 15 and c.distance == pytest.approx(2.0)
    # agent's discretised view is 90 degrees (100 rounds to 90), so c is straight ahead
    assert c.rel_heading == pytest.approx(0.0, abs=1e-9)
    assert cands["a"].rel_heading == pytest.approx(-math.pi)  # behind, wrapped to [-pi, pi)
    assert cands["e"].view_index == 12 + 6  # due south


def test_env_expert_reaches_goal_and_records_leaderboard_trajectory(tiny):
    graphs = Graphs(tiny)
    eps = load_episodes("r2r", "val_unseen", tiny)
    env = NavBatchEnv(eps, graphs, batch_size=2)
    obs = env.reset()
    assert [o.viewpoint for o in obs] == ["a", "a"]
    assert obs[0].distance_to_goal == pytest.approx(7.0)
    # put one agent off the reference path: the expert must route back from there
    obs = env.step(["b", "b"])
    obs = env.step(["e", None])
    assert env.agents[1].done and obs[0].viewpoint == "e"
    assert env.expert_action(0) == "b"
    while not env.all_done:
        env.step(env.expert_actions())
    res = env.results()
    assert [t[0] for t in res[0]["trajectory"]] == ["a", "b", "e", "b", "c", "d"]
    assert [t[0] for t in res[1]["trajectory"]] == ["a", "b"]
    # heading after a move: the view in which the target was seen (north = 0 when going c -> d)
    assert res[0]["trajectory"][-1][1] == pytest.approx(0.0) and res[0]["trajectory"][-1][2] == 0.0
    assert res[0]["trajectory"][0] == ["a", pytest.approx(1.5707963), 0.0]


def test_env_rejects_jumps_and_limits_steps(tiny):
    env = NavBatchEnv(load_episodes("r2r", "train", tiny), Graphs(tiny), batch_size=1, max_steps=3)
    env.reset()
    with pytest.raises(ValueError, match="not a neighbour"):
        env.step(["d"])
    env.reset()
    env.step([["b", "c", "d"]])  # a walk of neighbours is one action
    assert env.agents[0].viewpoint == "d" and env.agents[0].steps == 1
    for _ in range(2):
        env.step(["c"])
    assert env.all_done  # step limit


def test_random_policy_is_seeded(tiny):
    env = NavBatchEnv(load_episodes("r2r", "train", tiny) * 4, Graphs(tiny), batch_size=4)
    r1 = evaluate_policy(env, make_random_policy(3))
    r2 = evaluate_policy(env, make_random_policy(3))
    assert r1 == r2
    for r in r1:
        vps = [t[0] for t in r["trajectory"]]
        h = env.house(SCAN)
        assert all(h.is_neighbor(a, b) for a, b in zip(vps[:-1], vps[1:]))


@pytest.mark.realdata
def test_real_graphs_and_expert(real_data_dir):
    graphs = Graphs(real_data_dir)
    houses = graphs.load_all()
    assert len(houses) == 90 and sum(len(h) for h in houses.values()) == 10567
    eps = load_episodes("r2r", "val_unseen", real_data_dir)
    assert len(eps) == 2349 and eps[0].instr_id == "4332_0"
    # annotated distances are path lengths on our graph (within the file's rounding)
    for e in eps[::3]:
        assert graphs[e.scan].path_length(list(e.path)) == pytest.approx(e.distance, abs=0.01)
    env = NavBatchEnv(eps[:200], graphs, batch_size=50)
    for r, e in zip(evaluate_policy(env, expert_policy), eps[:200]):
        assert r["trajectory"][-1][0] == e.goal
    rev = load_episodes("reverie", "val_unseen", real_data_dir)
    assert len(rev) == 3433 and rev[0].instr_id == "4634_215_0" and rev[0].obj_id == 215


@pytest.mark.realdata
def test_reverie_test_split_has_no_target(real_data_dir):
    eps = load_episodes("reverie", "test", real_data_dir)
    assert len(eps) == 6144 and eps[0].instr_id == "2021_0"
    assert eps[0].obj_id is None and len(eps[0].path) == 1 and eps[0].path_id == 2021


def test_random_policy_uniform_stop(tiny):
    env = NavBatchEnv(load_episodes("r2r", "train", tiny) * 200, Graphs(tiny), batch_size=200)
    res = evaluate_policy(env, make_random_policy(0, stop_prob="uniform"))
    first_moves = [len(r["trajectory"]) == 1 for r in res]  # at 'a' (1 neighbour): STOP w.p. 1/2
    assert 0.4 < sum(first_moves) / len(first_moves) < 0.6
    with pytest.raises(ValueError, match="uniform"):
        make_random_policy(0, stop_prob="sometimes")
