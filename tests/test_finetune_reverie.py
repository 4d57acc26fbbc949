"""REVERIE fine-tuning on a small toy world: goal rule, object-grounding (OG) labels and loss,
rollouts with object tokens, ``minivln finetune`` / ``navigate`` / ``eval`` end to end.

A tiny DUET with objects (hidden 32, one layer per encoder, 16-d random view and object features)
keeps this fast.  The goal-rule tests read the BBox files with their own few lines (a test oracle
for ``METRICS.md``'s definition, independent of :mod:`minivln.data.reverie`).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minivln.bench.episodes import bench_real
from minivln.cli import main as cli_main
from minivln.data.datasets import load_episodes
from minivln.data.graph import Graphs
from minivln.data.reverie import ReverieGoals, nearest_goal, with_random_endpoint
from minivln.data.toyworld import ToyWorldConfig, ensure_toy_world
from minivln.env import env as E
from minivln.env.env import NavBatchEnv, candidates_at, evaluate_policy, expert_policy
from minivln.evaluation.evaluator import Evaluator
from minivln.features.hdf5 import (
    FeatureStore,
    FeatureWriter,
    ObjectFeatures,
    ObjectFeatureStore,
    ObjectFeatureWriter,
)
from minivln.model.agent_inputs import build_panorama_inputs
from minivln.model.checkpoint import save_pretrained
from minivln.model.registry import create_model
from minivln.paths import DataError
from minivln.training.agent import (
    IGNORE,
    DUETAgent,
    nearest_goal_slot,
    object_label,
    to_nav_observation,
)
from minivln.training.logging import read_jsonl

DIM = 16
TINY = {
    "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64, "num_l_layers": 1,
    "num_pano_layers": 1, "num_x_layers": 1, "image_feat_size": DIM, "obj_feat_size": DIM,
}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """(data dir, view feature file, object feature file) of a 3-house toy world; the objects of a
    viewpoint are its BBox-visible objects in a shuffled order, with random features and boxes."""
    root = tmp_path_factory.mktemp("ftrev")
    cfg = ToyWorldConfig(n_houses=3, r2r_train=2, r2r_val_seen=1, r2r_val_unseen=1, r2r_test=1,
                         reverie_train=8, reverie_val_seen=2, reverie_val_unseen=3, reverie_test=1)
    data = ensure_toy_world(root / "data", 0, cfg)
    feats, objs = root / "feats.h5", root / "objs.h5"
    rng = np.random.default_rng(0)
    graphs, goals = Graphs(data), ReverieGoals(data)
    with FeatureWriter(feats, dim=DIM, standin=True, description="random test features", dtype="float32") as w, \
            ObjectFeatureWriter(objs, dim=DIM, standin=True, description="random test objects",
                                dtype="float32") as ow:
        for scan in graphs.scans():
            for vp in graphs[scan].vp_ids:
                w.add(scan, vp, rng.standard_normal((36, DIM)).astype(np.float32))
                ids = np.array(sorted(int(x) for x in goals.visible_objects(scan, vp)), dtype=np.int64)
                ids = rng.permutation(ids)
                k = len(ids)
                if k:
                    sizes = rng.uniform(10, 300, (k, 2)).astype(np.float32)
                    ow.add(scan, vp, ObjectFeatures(
                        fts=rng.standard_normal((k, DIM)).astype(np.float32), obj_ids=ids,
                        directions=rng.uniform(-1, 1, (k, 2)).astype(np.float32), sizes=sizes,
                        bboxes=np.concatenate([np.zeros((k, 2), np.float32), sizes], 1),
                        view_ids=rng.integers(0, 36, k)))
    return data, feats, objs


def _agent(toy, seed: int = 0, **kw) -> DUETAgent:
    data, feats, objs = toy
    torch.manual_seed(seed)
    return DUETAgent(create_model("duet-cpu-reverie", **TINY), max_action_len=8, max_instr_len=64,
                     features=FeatureStore(feats), objects=ObjectFeatureStore(objs),
                     goals=ReverieGoals(data), **kw)


def _bbox_goal_set(data, house, obj_id) -> set[str]:
    """Test oracle (METRICS.md): included viewpoints whose BBox lists the object with a non-empty
    ``visible_pos``."""
    out = set()
    for vp in house.vp_ids:
        path = data / "REVERIE" / "BBox" / f"{house.scan}_{vp}.json"
        if path.is_file():
            info = json.loads(path.read_text()).get(vp, {}).get(str(obj_id))
            if info and info["visible_pos"]:
                out.add(vp)
    return out


# ------------------------------------------------------------------------------- OG label / loss


def test_object_label_hand_built():
    ids = [5, 7, 9]
    assert object_label(ids, 7, True, 36) == 38  # row 0 = [stop], rows 1..36 views, 37.. objects
    assert object_label(ids, 5, True, 40) == 41  # more view tokens (a view used by two candidates)
    assert object_label(ids, "9", True, 36) == 39  # ids compared as strings, as upstream
    assert object_label(ids, 7, False, 36) == IGNORE  # not where the target is visible
    assert object_label(ids, 8, True, 36) == IGNORE  # target not among the viewpoint's objects
    assert object_label([], 7, True, 36) == IGNORE
    assert object_label(ids, None, True, 36) == IGNORE


def test_og_loss_in_a_rollout_hand_checked(toy):
    """Sample 0 starts where its target is visible, sample 1 does not: the OG label of step 0 is the
    target's row for 0 (view tokens counted by hand) and none for 1; the OG loss is the CE by hand."""
    data, _, objs = toy
    graphs, goals = Graphs(data), ReverieGoals(data)
    eps = load_episodes("reverie", "train", data)
    ep1 = next(e for e in eps if e.start not in goals.episode_goals(e))
    g = sorted(goals.episode_goals(ep1))[0]
    ep0 = replace(ep1, instr_id="999_1_0", path=(g,))  # starts (and ends) at a goal viewpoint
    env = NavBatchEnv([ep0, ep1], graphs, batch_size=2, max_steps=8)
    agent = _agent(toy, og_weight=0.5)
    out = agent.rollout(env, [ep0, ep1], "teacher")

    house = graphs[ep0.scan]
    cands = candidates_at(house, g, ep0.heading % (2 * np.pi), 0.0)
    view_len = len(cands) + 36 - len({c.view_index for c in cands})
    obj_ids = [int(x) for x in ObjectFeatureStore(objs).get(ep0.scan, g).obj_ids]
    expected = view_len + 1 + obj_ids.index(int(ep0.obj_id))
    s0 = out.steps[0]
    assert int(s0.obj_labels[0]) == expected and int(s0.labels[0]) == 0  # OG target, and STOP at the goal
    assert int(s0.obj_labels[1]) == IGNORE
    assert not out.steps[1].active[0]  # sample 0 stopped at once

    og, nav = torch.zeros(()), torch.zeros(())
    n_og = 0
    for s in out.steps:
        nav = nav + F.cross_entropy(s.fused_logits.float(), s.labels, ignore_index=IGNORE, reduction="sum")
        for i in range(2):
            y = int(s.obj_labels[i])
            if y != IGNORE:
                row = s.obj_logits[i].float()
                og = og - (row[y] - torch.logsumexp(row[torch.isfinite(row)], 0))
                n_og += 1
    assert n_og >= 2  # sample 1 reaches its goal (teacher) and is labelled there too
    torch.testing.assert_close(out.og_loss, og / 2)
    torch.testing.assert_close(out.loss, nav / 2 + 0.5 * og / 2)
    out.loss.backward()
    assert agent.model.og_head is not None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in agent.model.og_head.parameters())


def test_agent_observation_objects_as_upstream(toy):
    """The agent's REVERIE observation has upstream's object fields (``ObjectFeatureDB``): angle
    features of the directions relative to the agent's actual heading/elevation (not its discretised
    view), boxes (h/480, w/640, product), ids; the panorama builder appends them after the views."""
    data, _, objs = toy
    store, graphs = ObjectFeatureStore(objs), Graphs(data)
    scan = graphs.scans()[0]
    vp = next(v for v in graphs[scan].vp_ids if len(store.get(scan, v)) >= 2)
    heading, elevation = 0.3, 0.1  # between discretised views
    ob = E.Observation(instr_id="0_0", scan=scan, viewpoint=vp, view_index=12, heading=heading,
                       elevation=elevation, position=graphs[scan].position(vp), candidates=[],
                       instruction="find it", step=0, done=False, features=np.zeros((36, DIM), np.float32))
    nav_ob = to_nav_observation(ob, objects=store)
    objects = store.get(scan, vp)
    assert nav_ob.obj_ids == [int(x) for x in objects.obj_ids]
    np.testing.assert_array_equal(nav_ob.obj_img_fts, objects.fts)
    (h, e), (w, bh) = objects.directions[0].astype(float), objects.sizes[0].astype(float)
    expected = [math.sin(h - heading), math.cos(h - heading), math.sin(e - elevation), math.cos(e - elevation)]
    np.testing.assert_allclose(nav_ob.obj_ang_fts[0], expected, atol=1e-6)
    np.testing.assert_allclose(nav_ob.obj_box_fts[0], [bh / 480, w / 640, bh * w / 480 / 640], rtol=1e-6)
    assert to_nav_observation(ob, objects=store, max_objects=1).obj_ids == nav_ob.obj_ids[:1]
    pano = build_panorama_inputs([nav_ob])
    n = nav_ob.num_objects
    assert pano.obj_lens.tolist() == [n] and pano.nav_types[0, 36:].tolist() == [2] * n
    loc = np.concatenate([nav_ob.obj_ang_fts, nav_ob.obj_box_fts], 1)
    np.testing.assert_array_equal(pano.loc_fts[0, 36:].numpy(), loc)


# ------------------------------------------------------------------------------------ goal rule


def test_reverie_goal_rule_matches_definition(toy):
    data, _, _ = toy
    graphs, goals = Graphs(data), ReverieGoals(data)
    ev = Evaluator("reverie", "val_unseen", data)
    for split in ("train", "val_seen", "val_unseen"):
        for ep in load_episodes("reverie", split, data):
            house = graphs[ep.scan]
            oracle = _bbox_goal_set(data, house, ep.obj_id)
            assert oracle and goals.episode_goals(ep) == oracle
            assert all(goals.is_goal(ep, vp) == (vp in oracle) for vp in house.vp_ids)
            if split != "val_unseen":
                continue
            # success (METRICS.md) = the target is visible from the final viewpoint: any goal viewpoint
            for vp in house.vp_ids:
                walk = house.shortest_path(ep.start, vp)
                assert ev.score_episode(ep.instr_id, walk, ep.obj_id)["sr"] == float(vp in oracle)

    # the env expert with goal sets heads for the nearest goal viewpoint and stops at the first one
    eps = load_episodes("reverie", "train", data)
    env = NavBatchEnv(eps, graphs, batch_size=len(eps), max_steps=15, goals=goals.episode_goals)
    for r, ep in zip(evaluate_policy(env, expert_policy), eps):
        house, gs = graphs[ep.scan], goals.episode_goals(ep)
        vps = [p[0] for p in r["trajectory"]]
        assert vps[-1] in gs and not any(v in gs for v in vps[:-1])
        assert house.path_length(vps) == pytest.approx(min(house.distance(ep.start, g) for g in gs))
        assert vps[-1] == nearest_goal(house, ep.start, gs)
    # without goal sets the expert still walks to the annotated goal (R2R behaviour)
    env = NavBatchEnv(eps, graphs, batch_size=len(eps), max_steps=15)
    assert [r["trajectory"][-1][0] for r in evaluate_policy(env, expert_policy)] == [e.goal for e in eps]

    # hand-built line a - b - c - g, side branch d: goals {c, g}; the expert stops at c
    pos = {"a": 0.0, "b": 1.0, "c": 2.0, "g": 3.0, "d": -1.0}

    def dist(x, y):
        return abs(pos[x] - pos[y])

    vpids, visited = [None, "a", "d", "c", "g"], [False, True, False, False, False]
    assert nearest_goal_slot(vpids, visited, "b", {"c", "g"}, dist) == 3  # c: 1 + 0
    assert nearest_goal_slot(vpids, visited, "b", {"g"}, dist) == 3  # c: 1 + 1, g: 2 + 0 (first wins)
    assert nearest_goal_slot(vpids, visited, "c", {"c", "g"}, dist) == 0  # at a goal: STOP
    assert nearest_goal_slot(vpids, visited, "b", {"d", "g"}, dist) == 2  # d: 2 + 0


def test_goal_sets_hand_built_bbox(tmp_path):
    """Listed with an empty ``visible_pos`` is not visible; no BBox file sees nothing; the env expert
    with goal sets walks to the nearest goal viewpoint, without them to the annotated goal."""
    from tinyworld import SCAN, write_tiny_data

    from minivln.data.datasets import Episode

    root = write_tiny_data(tmp_path)
    bbox = {"a": {"1": [3], "3": []}, "b": {"1": [], "2": [7]}, "d": {"1": [20]}, "e": {"2": [1, 2]}}  # no c file
    (root / "REVERIE" / "BBox").mkdir(parents=True)
    for vp, objs in bbox.items():
        entry = {vp: {o: {"name": "thing", "visible_pos": v, "bbox2d": [[0, 0, 9, 9]] * len(v)}
                      for o, v in objs.items()}}
        (root / "REVERIE" / "BBox" / f"{SCAN}_{vp}.json").write_text(json.dumps(entry))
    goals = ReverieGoals(root)
    assert goals.goal_viewpoints(SCAN, 1) == {"a", "d"} and goals.goal_viewpoints(SCAN, "2") == {"b", "e"}
    assert goals.goal_viewpoints(SCAN, 3) == frozenset() and goals.visible_objects(SCAN, "c") == frozenset()
    ep = Episode("7_1_0", "reverie", SCAN, 7, ("e", "b", "c", "d"), 0.0, "find the thing", obj_id=1)
    assert goals.episode_goals(ep) == {"a", "d"} and goals.is_goal(ep, "a") and not goals.is_goal(ep, "b")
    assert goals.episode_goals(replace(ep, obj_id=3)) == {"d"}  # visible nowhere: the annotated goal
    graphs = Graphs(root)
    assert nearest_goal(graphs[SCAN], "e", {"a", "d"}) == "a"  # 2.83 + 2 m against 2.83 + 2 + 3 m
    env = NavBatchEnv([ep], graphs, batch_size=1, goals=goals.episode_goals)
    assert [p[0] for p in evaluate_policy(env, expert_policy)[0]["trajectory"]] == ["e", "b", "a"]
    assert env.observe()[0].distance_to_goal == 0.0
    env = NavBatchEnv([ep], graphs, batch_size=1)
    assert [p[0] for p in evaluate_policy(env, expert_policy)[0]["trajectory"]] == ["e", "b", "c", "d"]


def test_random_endpoints_draw_visible_goals(toy):
    data, _, _ = toy
    graphs, goals = Graphs(data), ReverieGoals(data)
    rng = random.Random(0)
    ep = max(load_episodes("reverie", "train", data), key=lambda e: len(goals.episode_goals(e)))
    gs = goals.episode_goals(ep)
    assert len(gs) >= 2
    ends = set()
    for _ in range(40):
        new = with_random_endpoint(ep, gs, graphs[ep.scan], rng)
        assert new.goal in gs and new.start == ep.start and new.instr_id == ep.instr_id
        assert list(new.path) == graphs[ep.scan].shortest_path(ep.start, new.goal)
        ends.add(new.goal)
    assert ends == set(gs)


# ------------------------------------------------------------------------------------ rollouts


def test_reverie_rollouts_objects_stop_rules_and_predobjid(toy):
    data, _, objs = toy
    graphs, goals = Graphs(data), ReverieGoals(data)
    store = ObjectFeatureStore(objs)
    eps = load_episodes("reverie", "train", data)[:4]
    agent = _agent(toy, max_objects=50)
    # (the trajectory of a stopped episode may end with the walk back to its best STOP node, as upstream)
    def walked_until(vps, done):
        k = next(k for k, v in enumerate(vps) if done(v))
        return vps[: k + 1]

    # 'annotated' goal: the teacher (expert labels) walks a shortest path to the annotated goal
    env = NavBatchEnv(eps, graphs, batch_size=4, max_steps=8)
    out = agent.rollout(env, eps, "teacher")
    assert out.og_loss is not None and torch.isfinite(out.loss) and out.metrics["og_labels"] >= len(eps)
    assert all(s.obj_logits is not None and s.obj_logits.shape[1] > 37 for s in out.steps)  # [stop]+views+objects
    for i, (r, ep) in enumerate(zip(out.results, eps)):
        house = graphs[ep.scan]
        walk = walked_until([p[0] for p in r["trajectory"]], lambda v: v == ep.goal)
        assert house.path_length(walk) == pytest.approx(house.distance(ep.start, ep.goal))
        assert sum(s.active[i] for s in out.steps) == len(walk)  # one step per node, STOP at the goal
    # 'nearest': goal sets in the environment; the teacher stops at the first goal viewpoint, the nearest
    env = NavBatchEnv(eps, graphs, batch_size=4, max_steps=8, goals=goals.episode_goals)
    out = agent.rollout(env, eps, "teacher")
    for i, (r, ep) in enumerate(zip(out.results, eps)):
        house, gs = graphs[ep.scan], goals.episode_goals(ep)
        walk = walked_until([p[0] for p in r["trajectory"]], lambda v: v in gs)
        assert house.path_length(walk) == pytest.approx(min(house.distance(ep.start, g) for g in gs))
        assert sum(s.active[i] for s in out.steps) == len(walk)
        labelled = [int(s.labels[i]) for s in out.steps if s.active[i]]
        assert labelled[-1] == 0 and all(y > 0 for y in labelled[:-1])
    out = agent.rollout(env, eps, "sample")
    assert torch.isfinite(out.loss) and "og_acc" in out.metrics
    # in training an episode ends as soon as it stands at a goal viewpoint, whatever it samples:
    # six episodes starting at a goal viewpoint that is not the annotated goal all end at step 0
    ep = next(e for e in eps if len(goals.episode_goals(e)) >= 2)
    g = sorted(goals.episode_goals(ep) - {ep.goal})[0]
    at_goal = [replace(ep, instr_id=f"{900 + k}_{ep.obj_id}_0", path=tuple(graphs[ep.scan].shortest_path(g, ep.goal)))
               for k in range(6)]
    out = agent.rollout(NavBatchEnv(at_goal, graphs, batch_size=6, max_steps=8, goals=goals.episode_goals),
                        at_goal, "sample", generator=torch.Generator().manual_seed(0))
    assert len(out.steps) == 1 and out.steps[0].labels.tolist() == [0] * 6
    agent.model.eval()
    with torch.no_grad():
        res = agent.rollout(env, eps, "argmax")
    assert res.og_loss is None and float(res.loss) == 0.0
    for r, ep in zip(res.results, eps):
        final = r["trajectory"][-1][0]
        ids = [int(x) for x in store.get(ep.scan, final).obj_ids]
        assert isinstance(r["predObjId"], int) and (r["predObjId"] in ids or (r["predObjId"] == -1 and not ids))
    # a model with objects needs the object store for REVERIE episodes
    agent.objects = None
    with pytest.raises(ValueError, match="object feature store"):
        agent.rollout(env, eps, "argmax")


# ------------------------------------------------------------------------------------ end to end


def test_finetune_reverie_cli_end_to_end(toy, tmp_path, capsys):
    data, feats, objs = toy
    run = tmp_path / "run"
    overrides = [
        "task=reverie", "model=duet-cpu-reverie", f"model_overrides={json.dumps(TINY)}", f"data_dir={data}",
        f"features={feats}", f"objects={objs}", "reverie_goal=random", "batch_size=2", "val_batch_size=8",
        "max_action_len=6", "max_instr_len=64", "num_threads=1", "train.max_steps=2", "train.val_every=0",
        "train.log_every=1", "train.optim.lr=1e-3", "train.progress=false",
    ]
    assert cli_main(["finetune", "--out", str(run), *overrides]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("sr", "oracle_sr", "spl", "rgs", "rgspl", "trajectory_length"):
        assert key in metrics and key in metrics["random"]
    assert "nav_error" not in metrics  # scored by the REVERIE evaluator
    assert metrics["task"] == "reverie" and metrics["reverie_goal"] == "random"
    assert metrics["features"] == "stand-in" and metrics["object_features"] == "stand-in"
    sub = json.loads((run / "submissions" / "val_unseen_step2.json").read_text())
    assert len(sub) == len(load_episodes("reverie", "val_unseen", data))
    assert all(isinstance(e["predObjId"], int) for e in sub)
    train = [r for r in read_jsonl(run / "log.jsonl") if r.get("kind") == "train"]
    assert all("loss/og_sample" in r and "loss/og_teacher" in r for r in train)
    val = [r for r in read_jsonl(run / "log.jsonl") if r.get("kind") == "val"]
    assert "val_unseen.rgs" in val[-1] and "val_seen.rgspl" in val[-1]

    out = tmp_path / "nav"
    assert cli_main(["navigate", "--checkpoint", str(run / "model"), "--task", "reverie", "--split", "val_unseen",
                     "--data-dir", str(data), "--features", str(feats), "--objects", str(objs),
                     "--out", str(out)]) == 0
    path = out / "submission_val_unseen.json"
    assert all(isinstance(e["predObjId"], int) for e in json.loads(path.read_text()))
    nav_metrics = json.loads((out / "metrics_val_unseen.json").read_text())
    assert "rgspl" in nav_metrics and nav_metrics["object_features"] == "stand-in"
    assert cli_main(["eval", "--task", "reverie", "--split", "val_unseen", "--preds", str(path),
                     "--data-dir", str(data), "--strict"]) == 0
    # the run directory gives data, features and objects; the test split: submission only
    assert cli_main(["navigate", "--checkpoint", str(run), "--task", "reverie", "--split", "test",
                     "--out", str(out)]) == 0
    test_sub = json.loads((out / "submission_test.json").read_text())
    assert test_sub and all("predObjId" in e for e in test_sub) and not (out / "metrics_test.json").exists()

    # resume (the random-endpoint generator is part of the task state) continues from step 2 to 3
    over3 = [o if not o.startswith("train.max_steps") else "train.max_steps=3" for o in overrides]
    with pytest.warns(UserWarning, match="max_steps differ"):
        assert cli_main(["finetune", "--out", str(run), "--resume", *over3]) == 0
    assert [r["step"] for r in read_jsonl(run / "log.jsonl") if r.get("kind") == "train"] == [1, 2, 3]
    capsys.readouterr()


@pytest.mark.parametrize("og_text_encoder", ["", "minilm"])
def test_reverie_on_onnx_runtime_gives_the_torch_episodes(toy, tmp_path, og_text_encoder):
    """``minivln navigate --task reverie --backend onnxruntime``: the exported graphs (object tokens
    packed in the panorama graph, obj_logits from the navigation graph) give the torch backend's
    trajectories and object choices, episode for episode; ``--compare`` checks every call.  With
    og_text_encoder (og_text_proj made non-zero) the text cache's og_text, from the instructions'
    instr_embeds, reaches every navigation call."""
    pytest.importorskip("onnx", reason="onnx not installed (optional extra: pip install -e '.[deploy]')")
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed (optional extra)")
    data, feats, objs = toy
    torch.manual_seed(3)
    model = create_model("duet-cpu-reverie", **TINY)
    if og_text_encoder:  # the same network (its episodes move) plus a non-zero og_text_proj
        og = create_model("duet-cpu-reverie", **TINY, og_text_encoder=og_text_encoder)
        og.load_state_dict({**og.state_dict(), **model.state_dict()})
        with torch.no_grad():
            og.og_text_proj.weight.normal_()
        model = og
    save_pretrained(model, tmp_path / "model")

    def navigate(backend: str, *extra: str) -> list[dict]:
        out = tmp_path / backend
        assert cli_main(["navigate", "--checkpoint", str(tmp_path / "model"), "--task", "reverie", "--split",
                         "val_unseen", "--data-dir", str(data), "--features", str(feats), "--objects", str(objs),
                         "--out", str(out), "--backend", backend, "--batch-size", "2", "--threads", "1",
                         *extra]) == 0
        return json.loads((out / "submission_val_unseen.json").read_text())

    ref = navigate("torch")
    assert len(ref) == 7 and all("predObjId" in e for e in ref)
    assert any(len(e["trajectory"]) > 1 for e in ref)  # some episodes move: several steps compared
    assert navigate("onnxruntime", "--compare") == ref
    report = json.loads((tmp_path / "onnxruntime" / "compare_val_unseen.json").read_text())
    assert report["within_tolerance"] and "navigation.obj_logits" in report["max_abs_diff"], report


def test_bench_real_reverie_episodes_with_objects(toy, tmp_path):
    """``bench model --episodes real --task reverie``: REVERIE instructions replayed with their
    objects on torch and ONNX Runtime, the same work on both (object shapes included); a model
    without objects, or REVERIE without an object file, is refused before any work."""
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed (optional extra)")
    data, feats, objs = toy
    torch.manual_seed(0)
    save_pretrained(create_model("duet-cpu-reverie", **TINY), tmp_path / "rev")
    report = bench_real([], [1], checkpoints=[f"rev={tmp_path / 'rev'}"], data_dir=data, features=feats,
                        objects=objs, task="reverie", instructions=2, repeats=1, warmup=0, threads=1,
                        backends=["torch", "onnxruntime"])
    assert report["settings"]["task"] == "reverie" and report["settings"]["object_kind"] == "stand-in"
    rows = report["results"]
    assert [r["label"] for r in rows] == ["rev", "rev:onnxruntime"] and all(r["network_ms"] > 0 for r in rows)
    save_pretrained(create_model("duet-cpu", **{k: v for k, v in TINY.items() if k != "obj_feat_size"}),
                    tmp_path / "r2r")
    with pytest.raises(DataError, match="without object tokens"):
        bench_real([], [1], checkpoints=[f"r2r={tmp_path / 'r2r'}"], data_dir=data, features=feats, objects=objs,
                   task="reverie", instructions=2, repeats=1, warmup=0, threads=1)
    with pytest.raises(DataError, match="need --objects"):
        bench_real([], [1], checkpoints=[f"rev={tmp_path / 'rev'}"], data_dir=data, features=feats,
                   task="reverie", instructions=2, repeats=1, warmup=0, threads=1)
    # the command line
    assert cli_main(["bench", "model", "--episodes", "real", "--task", "reverie", "--objects", str(objs),
                     "--features", str(feats), "--data-dir", str(data), "--checkpoint", f"rev={tmp_path / 'rev'}",
                     "--batch-sizes", "1", "--instructions", "2", "--repeats", "1", "--warmup", "0",
                     "--threads", "1", "--quiet", "--json", str(tmp_path / "b.json")]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["settings"]["task"] == "reverie"
