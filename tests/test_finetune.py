"""Fine-tuning (DUETAgent, FinetuneTask, ``minivln finetune`` / ``navigate``) on a small toy world.

A tiny DUET (hidden 32, one layer per encoder, 16-d random "stand-in" features) keeps this fast.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SMALL_TOY_DIM as DIM  # tests/ is on sys.path

from minivln.cli import main as cli_main
from minivln.data.datasets import load_episodes
from minivln.data.graph import Graphs
from minivln.env.env import NavBatchEnv
from minivln.features.hdf5 import FeatureStore
from minivln.model.checkpoint import load_pretrained
from minivln.model.registry import create_model
from minivln.training.agent import IGNORE, DUETAgent, spl_expert_slot, teacher_slot
from minivln.training.logging import read_jsonl

TINY = {
    "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64, "num_l_layers": 1,
    "num_pano_layers": 1, "num_x_layers": 1, "image_feat_size": DIM,
}


@pytest.fixture(scope="module")
def toy(small_toy):
    """The shared 3-house toy world with 16-d random features (tests/conftest.py)."""
    return small_toy


def _tiny_agent(seed: int = 0, **kw) -> DUETAgent:
    torch.manual_seed(seed)
    return DUETAgent(create_model("duet-cpu", **TINY), max_action_len=10, max_instr_len=64, **kw)


def test_spl_expert_slot_hand_checked():
    # a line a - b - c - g plus a side branch a - d; slot 1 (b) is visited
    pos = {"a": 0.0, "b": 1.0, "c": 2.0, "g": 3.0, "d": -1.0}

    def dist(x, y):
        return abs(pos[x] - pos[y])

    vpids = [None, "b", "d", "c"]
    visited = [False, True, False, False]
    assert spl_expert_slot(vpids, visited, "b", "g", dist) == 3  # c: 1 + 1, d: 2 + 4; b is visited
    assert spl_expert_slot(vpids, visited, "g", "g", dist) == 0  # at the goal: STOP
    assert teacher_slot(vpids, "b", ["a", "b", "c", "g"]) == 3
    assert teacher_slot(vpids, "g", ["a", "b", "c", "g"]) == 0
    assert teacher_slot(vpids, "d", ["a", "b", "c", "g"]) is None  # off the path


def test_teacher_rollout_follows_gt_path(toy):
    data, feats = toy
    store = FeatureStore(feats)
    eps = load_episodes("r2r", "train", data)[:4]
    env = NavBatchEnv(eps, Graphs(data), batch_size=4, features=store, max_steps=10)
    agent = _tiny_agent(features=store)
    out = agent.rollout(env, eps, "teacher")
    assert out.loss.requires_grad and float(out.loss.detach()) > 0
    for i, ep in enumerate(eps):
        labelled = [(s.t, int(s.labels[i]), s.gmap_vpids[i]) for s in out.steps if s.active[i]]
        assert len(labelled) == len(ep.path)  # one step per GT node, STOP at the goal
        for t, label, vpids in labelled:
            assert label != IGNORE
            if t < len(ep.path) - 1:
                assert vpids[label] == ep.path[t + 1]
            else:
                assert label == 0
        for s in out.steps:
            if not s.active[i]:
                assert int(s.labels[i]) == IGNORE
        traj = [p[0] for p in out.results[i]["trajectory"]]
        assert traj[: len(ep.path)] == list(ep.path)
    out.loss.backward()


def test_sample_and_argmax_rollouts(toy):
    data, feats = toy
    store = FeatureStore(feats)
    eps = load_episodes("r2r", "train", data)[:4]
    env = NavBatchEnv(eps, Graphs(data), batch_size=4, features=store, max_steps=10)
    agent = _tiny_agent(features=store)
    seen = []
    out = agent.rollout(env, eps, "sample", step_hook=lambda t, o, b, y: seen.append(t))
    assert seen == [s.t for s in out.steps] and torch.isfinite(out.loss)
    graphs = Graphs(data)
    for s in out.steps:  # expert labels are STOP exactly at the goal
        for i, ep in enumerate(eps):
            if s.active[i] and int(s.labels[i]) > 0:
                assert s.gmap_vpids[i][int(s.labels[i])] is not None
    agent.model.eval()
    with torch.no_grad():
        res = agent.rollout(env, eps, "argmax")
    assert float(res.loss) == 0.0
    for r, ep in zip(res.results, eps):  # the trajectory is a walk of neighbours from the start
        vps = [p[0] for p in r["trajectory"]]
        assert vps[0] == ep.start
        house = graphs[ep.scan]
        assert all(house.is_neighbor(a, b) for a, b in zip(vps, vps[1:]))


def _tiny_finetune(data, feats, steps: int) -> list[str]:
    """Overrides of a tiny toy-world fine-tuning run of ``steps`` iterations."""
    return ["model=duet-cpu", f"model_overrides={json.dumps(TINY)}", f"data_dir={data}", f"features={feats}",
            "batch_size=2", "val_batch_size=8", "max_action_len=8", "max_instr_len=64", "num_threads=1",
            f"train.max_steps={steps}", "train.val_every=0", "train.log_every=1", "train.optim.lr=1e-3",
            "train.progress=false"]


def test_finetune_cli_end_to_end_navigate_eval_resume(toy, tmp_path, capsys):
    data, feats = toy
    run = tmp_path / "run"
    overrides = _tiny_finetune(data, feats, steps=2)
    assert cli_main(["finetune", "--out", str(run), *overrides]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    # the same run directory again, without --resume: an error (exit 2), nothing overwritten
    assert cli_main(["finetune", "--out", str(run), *overrides]) == 2
    assert "resume" in capsys.readouterr().err
    assert json.loads((run / "metrics.json").read_text()) == metrics
    for key in ("sr", "spl", "nav_error", "oracle_sr", "ndtw", "sdtw", "cls"):
        assert key in metrics and key in metrics["random"]
    assert metrics["features"] == "stand-in" and metrics["best_step"] == 2
    assert (run / "submissions" / "val_unseen_step2.json").exists()
    assert (run / "model" / "config.json").exists() and (run / "config.yaml").exists()
    val = [r for r in read_jsonl(run / "log.jsonl") if r.get("kind") == "val"]
    assert "val_unseen.spl" in val[-1] and "val_seen.sr" in val[-1]

    out = tmp_path / "nav"
    assert cli_main(["navigate", "--checkpoint", str(run / "model"), "--task", "r2r", "--split", "val_unseen",
                     "--data-dir", str(data), "--features", str(feats), "--out", str(out)]) == 0
    sub = out / "submission_val_unseen.json"
    entries = json.loads(sub.read_text())
    assert len(entries) == len(load_episodes("r2r", "val_unseen", data))
    assert json.loads((out / "metrics_val_unseen.json").read_text())["features"] == "stand-in"
    assert cli_main(["eval", "--task", "r2r", "--split", "val_unseen", "--preds", str(sub),
                     "--data-dir", str(data), "--strict"]) == 0
    # the test split has no goals: submission only
    assert cli_main(["navigate", "--checkpoint", str(run), "--split", "test", "--out", str(out)]) == 0
    assert (out / "submission_test.json").exists() and not (out / "metrics_test.json").exists()

    # resume continues from step 2 to step 3
    over3 = [o if not o.startswith("train.max_steps") else "train.max_steps=3" for o in overrides]
    with pytest.warns(UserWarning, match="max_steps differ from the checkpoint's config"):
        assert cli_main(["finetune", "--out", str(run), "--resume", *over3]) == 0
    steps = [r["step"] for r in read_jsonl(run / "log.jsonl") if r.get("kind") == "train"]
    assert steps == [1, 2, 3]
    capsys.readouterr()


def test_finetune_with_a_weight_average_exports_it_beside_the_model(toy, tmp_path):
    """train.ema_decay > 0: RUN/model-ema holds the average at the last step (a loadable model of the
    same config, other weights than RUN/model); without it no model-ema is written."""
    data, feats = toy
    run = tmp_path / "run"
    plain = [*_tiny_finetune(data, feats, steps=3), "val_splits=[val_unseen]"]
    assert cli_main(["finetune", "--out", str(run), *plain, "train.ema_decay=0.5", "train.ema_start=1"]) == 0
    last, avg = load_pretrained(run / "model"), load_pretrained(run / "model-ema")
    assert last.config == avg.config
    sl, sa = last.state_dict(), avg.state_dict()
    assert any(not torch.equal(sl[k], sa[k]) for k in sl if sl[k].is_floating_point())
    assert cli_main(["finetune", "--out", str(tmp_path / "plain"), *plain]) == 0
    assert (tmp_path / "plain" / "model").is_dir() and not (tmp_path / "plain" / "model-ema").exists()
