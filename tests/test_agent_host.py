"""The agent's host work (map bookkeeping, input building, expert labels, feature reads) is batched,
vectorised and cached; these tests hold it bit for bit to the code it replaced, kept in
``tests/agent_reference.py``: the same DAgger iterations (teacher-forced + sampled rollouts, backward,
an optimiser step; R2R with a stage-2 teacher, REVERIE with objects and goal sets) give equal
navigation inputs, logits, labels, actions, losses, metrics and gradients, and the parts do too on
random graphs, panoramas and feature files.
"""

from __future__ import annotations

import dataclasses
import random

import h5py
import numpy as np
import pytest
import torch
from agent_reference import (  # tests/ is on sys.path
    RefFloydGraph,
    RefGraphMap,
    read_features,
    relative_direction,
    use_reference,
)
from agent_reference import build_panorama_inputs as ref_panorama_inputs
from conftest import SMALL_DUET

from minivln.data.datasets import load_episodes
from minivln.data.graph import Graphs
from minivln.data.reverie import ReverieGoals
from minivln.env.env import NavBatchEnv
from minivln.features.hdf5 import FeatureStore, MissingFeatureError
from minivln.model.agent_inputs import build_panorama_inputs
from minivln.model.config import DUETConfig
from minivln.model.duet import DUET
from minivln.model.graph_map import (
    Candidate,
    FloydGraph,
    GraphMap,
    NodeObservation,
    relative_directions,
)
from minivln.model.registry import create_model
from minivln.paths import DataError
from minivln.training.agent import DUETAgent
from minivln.training.pretrain_data import SyntheticObjects
from minivln.training.trainer import freeze_teacher

MAX_STEPS = 8


def assert_same(a, b, where: str = "") -> None:
    """Equal bit for bit: tensors (dtype, shape, values), arrays, containers and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b), where
    elif dataclasses.is_dataclass(a):
        assert type(a) is type(b), where
        assert_same(vars(a), vars(b), where)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: {set(a) ^ set(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b and type(a) is type(b), f"{where}: {a!r} != {b!r}"


def _steps(out) -> list[dict]:
    rows = []
    for s in out.steps:
        row = {"t": s.t, "logits": s.fused_logits.detach(), "labels": s.labels, "actions": s.actions,
               "active": s.active, "slots": s.gmap_vpids, "inputs": s.inputs,
               "outputs": {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in s.outputs.items()},
               "obj_logits": None if s.obj_logits is None else s.obj_logits.detach(), "obj_labels": s.obj_labels}
        if s.teacher is not None:
            row["teacher"] = {"logits": s.teacher.fused_logits, "pano": s.teacher.pano_embeds,
                              "slots": s.teacher.gmap_vpids, "viewpoints": s.teacher.viewpoints}
            row["pano"], row["viewpoints"] = s.pano_embeds.detach(), s.viewpoints
        rows.append(row)
    return rows


def _iterations(small_toy, task: str, iters: int = 2) -> dict:
    """``iters`` DAgger iterations from a fixed seed, then an arg-max rollout: everything they give."""
    data, feats = small_toy
    graphs = Graphs(data)
    torch.manual_seed(0)
    kw, teacher = {}, None
    if task == "reverie":
        model = create_model("duet-cpu", **SMALL_DUET, obj_feat_size=16)
        goals = ReverieGoals(data, graphs)
        kw = dict(objects=SyntheticObjects(data, dim=16), goals=goals, max_objects=5)
        env_goals = goals.episode_goals
    else:
        model = create_model("duet-cpu", **SMALL_DUET)
        teacher = freeze_teacher(DUET(DUETConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                                 num_l_layers=1, num_pano_layers=1, num_x_layers=1,
                                                 image_feat_size=16, angle_feat_size=8)))
        env_goals = None
    store = FeatureStore(feats, cache_size=8)  # a small cache: features are read again after evictions
    env = NavBatchEnv(load_episodes(task, "train", data), graphs, batch_size=3, features=store,
                      max_steps=MAX_STEPS, shuffle=True, seed=0, goals=env_goals)
    agent = DUETAgent(model, max_action_len=MAX_STEPS, max_instr_len=40, features=store, **kw)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    record: dict = {}
    for it in range(iters):
        rollouts = {fb: agent.rollout(env, env.next_batch(), fb, keep_inputs=True, teacher=teacher)
                    for fb in ("teacher", "sample")}
        loss = 0.2 * rollouts["teacher"].loss + rollouts["sample"].loss
        loss.backward()
        record[it] = {"loss": loss.detach(), "grads": {n: p.grad.clone() for n, p in model.named_parameters()
                                                       if p.grad is not None}}
        for fb, out in rollouts.items():
            record[it][fb] = {"steps": _steps(out), "metrics": out.metrics, "results": out.results,
                              "og_loss": None if out.og_loss is None else out.og_loss.detach()}
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        out = agent.rollout(env, env.next_batch(), "argmax", keep_inputs=True)
    record["argmax"] = {"steps": _steps(out), "results": out.results}
    return record


@pytest.mark.parametrize("task", ["r2r", "reverie"])
def test_finetuning_iterations_match_the_reference(small_toy, one_thread, monkeypatch, task):
    new = _iterations(small_toy, task)
    use_reference(monkeypatch)
    old = _iterations(small_toy, task)
    assert sum(len(new[i][fb]["steps"]) for i in (0, 1) for fb in ("teacher", "sample")) >= 8
    if task == "reverie":
        assert any(s["obj_labels"] is not None and bool((s["obj_labels"] >= 0).any())
                   for i in (0, 1) for fb in ("teacher", "sample") for s in new[i][fb]["steps"])
    else:
        assert all("teacher" in s for s in new[0]["sample"]["steps"])
    assert_same(new, old, task)


# ----------------------------------------------------------------------------------- the parts


def _random_world(rng: np.random.Generator, n: int) -> tuple[dict, dict]:
    pos = {f"v{i}": rng.uniform(-20, 20, 3) * np.array([1.0, 1.0, 0.1]) for i in range(n)}
    pos["v1"] = pos["v0"].copy()  # two nodes at one place: zero-length edges
    pos["v2"] = pos["v0"] + np.array([0.0, -1.0, 0.0])  # straight behind: the mirrored heading
    names = sorted(pos)
    nbrs = {v: [c for c in rng.choice(names, size=min(5, n - 1), replace=False) if c != v] for v in names}
    return pos, nbrs


def test_relative_directions_match_the_one_pair_formula():
    """float64 headings, elevations and lengths of many pairs at once equal the scalar formula's
    (numpy's scalar ``x**2`` is ``pow``, which differs from ``x * x`` in the last bit now and then)."""
    rng = np.random.default_rng(3)
    a = rng.uniform(-30, 30, 3)
    b = np.concatenate([rng.uniform(-30, 30, (20000, 3)), a[None], a[None] + [0.0, -2.0, 0.0]])
    base_h, base_e = 0.7, -0.3
    h, e, d = relative_directions(a, b, base_h, base_e)
    ref = np.array([relative_direction(a, row, base_h, base_e) for row in b])
    assert_same(np.stack([h, e, d], 1), ref)


def test_graph_map_matches_the_reference():
    """Floyd relaxation, distances, paths, position features (one call for many nodes = one call
    per node) and pair distances on random maps walked at random."""
    rng, pick = np.random.default_rng(0), random.Random(0)
    for _ in range(40):
        pos, nbrs = _random_world(rng, int(rng.integers(4, 40)))
        new, old = GraphMap("v0"), RefGraphMap("v0")
        cur = "v0"
        for _ in range(int(rng.integers(1, 12))):
            cands = [Candidate(c, int(rng.integers(36)), pos[c]) for c in nbrs[cur]]
            ob = NodeObservation(cur, 0, 0.0, 0.0, pos[cur], np.zeros((36, 1), np.float32), cands)
            new.update_graph(ob)
            old.update_graph(ob)
            vpids, _ = new.slots(cur)
            assert vpids == old.slots(cur)[0]
            heading, elevation = float(rng.uniform(-7, 7)), float(rng.uniform(-1, 1))
            for size in (4, 8):
                assert_same(new.pos_fts(cur, vpids, heading, elevation, size),
                            old.pos_fts(cur, vpids, heading, elevation, size), "pos_fts")
            many = new.pos_fts(cur, [*vpids, "v0", *[c.viewpoint for c in cands]], heading, elevation)
            assert_same(many[len(vpids)], old.pos_fts(cur, ["v0"], heading, elevation)[0], "start row")
            assert_same(new.pair_dists(vpids), old.pair_dists(vpids), "pair_dists")
            nodes = list(pos)
            for x in nodes:
                for y in nodes:
                    assert new.graph.distance(x, y) == old.graph.distance(x, y)
                    assert new.graph.path(x, y) == old.graph.path(x, y)
                    assert new.graph.hops(x, y) == len(old.graph.path(x, y))
            cur = pick.choice(new.ghost_nodes or nodes)


def test_floyd_graph_grows_past_its_first_capacity():
    new, old = FloydGraph(), RefFloydGraph()
    for k in range(40):  # a chain: the matrix doubles from 16 rows twice
        for g in (new, old):
            g.add_edge(k, k + 1, 1.0 + k / 10)
            g.update(k)
    assert new.distance(0, 40) == old.distance(0, 40) and new.path(0, 40) == old.path(0, 40) == list(range(1, 41))
    assert new.nodes == old.nodes and new.distance(3, "unseen") == old.distance(3, "unseen")


def test_panorama_inputs_match_the_reference():
    """Candidates sharing a view, samples without candidates or objects, two angle-feature sizes."""
    rng = np.random.default_rng(1)
    obs = []
    for i in range(5):
        cands = [Candidate(f"c{j}", int(v), rng.normal(size=3), rel_heading=float(rng.uniform(-3, 3)),
                           rel_elevation=float(rng.uniform(-1, 1)))
                 for j, v in enumerate(rng.integers(0, 36, size=i))]  # i candidates, views may repeat
        ob = NodeObservation(f"n{i}", int(rng.integers(36)), 0.0, 0.0, np.zeros(3),
                             rng.normal(size=(36, 8)).astype(np.float32), cands)
        k = int(rng.integers(0, 4)) if i != 2 else 0
        if i != 4:  # one sample carries no object features at all
            ob.obj_img_fts = rng.normal(size=(k, 6)).astype(np.float32)
            ob.obj_ang_fts = rng.normal(size=(k, 4)).astype(np.float32)
            ob.obj_box_fts = rng.uniform(size=(k, 3)).astype(np.float32)
            ob.obj_ids = list(range(k))
        obs.append(ob)
    for size in (4, 8):
        for use_objects in (None, False):
            assert_same(vars(build_panorama_inputs(obs, size, use_objects)),
                        vars(ref_panorama_inputs(obs, size, use_objects)), f"pano {size} {use_objects}")
    assert_same(vars(build_panorama_inputs(obs[4:], 4, True)), vars(ref_panorama_inputs(obs[4:], 4, True)))


def test_feature_reads_match_h5py(tmp_path):
    """float32 and float16 contiguous datasets (read directly), a chunked compressed one (through
    h5py), logits concatenated to the features, and the errors of a missing key and of a group."""
    rng = np.random.default_rng(2)
    path = tmp_path / "feats.h5"
    data = {f"s_v{i}": rng.normal(size=(36, 1016)) for i in range(4)}
    with h5py.File(path, "w") as f:
        f.attrs.update({"feature_dim": 16, "class_layout": "concat"})
        f.create_dataset("s_v0", data=data["s_v0"].astype(np.float32))
        f.create_dataset("s_v1", data=data["s_v1"].astype(np.float16))
        f.create_dataset("s_v2", data=data["s_v2"].astype(np.float16), chunks=(6, 1016), compression="gzip")
        f.create_dataset("s_v3", data=data["s_v3"].astype(">f4"))  # big-endian
        f.create_group("s_group")
    new, old = FeatureStore(path, cache_size=1), FeatureStore(path, cache_size=1)
    for _ in range(2):  # the second round reads again after evictions (cache of one)
        for key in data:
            a, b = new._read(key), read_features(old, key)
            assert_same(list(a), list(b), key)
            assert a[0].flags.c_contiguous and a[0].flags.writeable
    assert new._f._locations["s_v2"][0] is None and new._f._locations["s_v0"][0] is not None
    with pytest.raises(MissingFeatureError, match="s_nope"):
        new.get("s", "nope")
    with pytest.raises(DataError, match="a group"):
        new._read("s_group")
