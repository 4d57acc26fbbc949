"""Latency a user can trust: ``minivln bench model --episodes real`` (whole rollouts of the real agent,
every model replaying the ground-truth paths), ``--checkpoint NAME=PATH``, ``bench gemm`` and
``bench figure``.  Tiny models on the small toy world; no timing values are asserted, only the
structure, the equal work and the bookkeeping of the times."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SMALL_DUET as SMALL

from minivln.bench import episodes as real
from minivln.bench.episodes import bench_real, select_instructions
from minivln.bench.gemm import bench_gemm, flop_bounds
from minivln.cli import main
from minivln.data.graph import Graphs
from minivln.env.env import NavBatchEnv
from minivln.features.hdf5 import FeatureStore
from minivln.model.checkpoint import save_pretrained
from minivln.model.registry import (
    UnknownPresetError,
    create_model,
    get_config,
    get_preset,
    register_preset,
)
from minivln.training.agent import DUETAgent

TINY = "test-latency-tiny"


@pytest.fixture(scope="module")
def models(tmp_path_factory, one_thread):
    """A tiny preset (random weights) and a checkpoint of another architecture (2 cross layers)."""
    try:
        get_preset(TINY)
    except UnknownPresetError:
        register_preset(TINY, get_config("duet-cpu", **SMALL), "test only")
    torch.manual_seed(1)
    root = tmp_path_factory.mktemp("latency")
    save_pretrained(create_model("duet-cpu", **{**SMALL, "num_x_layers": 2}), root / "other")
    return root / "other"


def test_path_feedback_follows_the_ground_truth(small_toy, one_thread):
    """The agent's 'path' feedback walks each instruction's annotated path (one step per node), with
    no loss, whatever the network's scores."""
    data, feats = small_toy
    episodes = select_instructions(data, "val_unseen", 3, seed=0)
    store = FeatureStore(feats)
    env = NavBatchEnv(episodes, Graphs(data), batch_size=3, features=store)
    agent = DUETAgent(create_model("duet-cpu", **SMALL).eval(), features=store)
    with torch.no_grad():
        out = agent.rollout(env, episodes, "path")
    assert out.metrics["steps"] == max(len(e.path) for e in episodes)
    assert float(out.loss) == 0.0 and all(int((s.labels != -100).sum()) == 0 for s in out.steps)
    for ep, res in zip(episodes, out.results):
        walked = [vp for vp, _, _ in res["trajectory"]]
        assert walked[:len(ep.path)] == list(ep.path), ep.instr_id  # then, maybe, the walk back


def test_real_episodes_same_work_and_time_split(small_toy, models):
    data, feats = small_toy
    rep = bench_real([TINY], [1, 2], checkpoints=[f"other={models}"], data_dir=data, features=feats,
                     instructions=2, repeats=2, warmup=1, threads=1, seed=0)
    rows = rep["results"]
    assert [(r["label"], r["batch_size"], r["weights"]) for r in rows] == [
        (TINY, 1, "random"), ("other", 1, "trained"), (TINY, 2, "random"), ("other", 2, "trained")]
    lengths = rep["settings"]["path_lengths"]
    assert len(lengths) == 2 and rep["settings"]["feature_kind"] == "stand-in"
    for bs, want_steps in ((1, sum(lengths) / 2), (2, max(lengths))):
        mine = [r for r in rows if r["batch_size"] == bs]
        # every model replays the ground-truth paths: one step per path node, the same calls
        assert all(r["steps_per_episode"] == want_steps for r in mine), (bs, mine)
        # the agent runs the samples still navigating only: when the shorter path of a batch of two
        # has ended, the text keys/values of the other are projected once more
        text_kv = 1.0 if bs == 1 or len(set(lengths)) == 1 else 2.0
        assert mine[0]["calls_per_episode"] == mine[1]["calls_per_episode"] == {
            "language": 1.0, "text_kv": text_kv, "panorama": want_steps, "navigation": want_steps}
        assert mine[0]["slots_per_step_mean"] == mine[1]["slots_per_step_mean"] > 1
    for r in rows:
        assert r["network_ms"] > 0 and r["agent_ms"] > 0 and r["episode_ms"] > r["network_ms"]
        parts = r["language_ms"] + r["text_kv_ms"] + r["panorama_ms"] + r["navigation_ms"]
        assert parts == pytest.approx(r["network_ms"], rel=0.25)  # medians of the parts vs of their sum
        for e, n, a in zip(r["episode_ms_all"], r["network_ms_all"], r["agent_ms_all"]):
            assert e == pytest.approx(n + a, abs=0.01)
        assert len(r["episode_ms_all"]) == 2 and r["gflop_per_episode"] > 0
    # the 2-cross-layer checkpoint does more work per call than the 1-layer preset
    assert rows[1]["gflop_per_episode"] > rows[0]["gflop_per_episode"]
    (q1, q2) = rep["ratios"]
    assert (q1["numerator"], q1["denominator"], q1["batch_size"], q2["batch_size"]) == (TINY, "other", 1, 2)
    assert q1["paired_episode_ratio"] > 0 and q1["paired_network_ratio"] > 0 and q1["flop_ratio"] < 1
    assert rep["machine"]["model_name"] and rep["machine"]["torch"] and rep["date"] and rep["code"]["commit"]


def test_real_episodes_detect_unequal_work(small_toy, models, monkeypatch):
    """A model whose agent stops early does not replay the others' work: the run stops."""
    data, feats = small_toy
    original = real.DUETAgent

    def agent(net, **kw):
        if net.config.num_x_layers == 2:  # the checkpoint's agent gets one step only
            kw["max_action_len"] = 1
        return original(net, **kw)

    monkeypatch.setattr(real, "DUETAgent", agent)
    with pytest.raises(RuntimeError, match="did not replay the work"):
        bench_real([TINY], [1], checkpoints=[f"other={models}"], data_dir=data, features=feats,
                   instructions=1, repeats=1, warmup=0, threads=1)


def test_real_episodes_cli_json_and_reference(small_toy, models, tmp_path, capsys):
    data, feats = small_toy
    out = tmp_path / "bench.json"
    assert main(["bench", "model", "--episodes", "real", "--data-dir", str(data), "--features", str(feats),
                 "--presets", TINY, "--checkpoint", f"other={models}", "--reference", "other",
                 "--batch-sizes", "1", "--instructions", "1", "--repeats", "1", "--warmup", "0",
                 "--threads", "1", "--quiet", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["settings"]["episodes"] == "real" and report["settings"]["reference"] == "other"
    assert [(q["numerator"], q["denominator"]) for q in report["ratios"]] == [("other", TINY)]
    printed = capsys.readouterr().out
    assert "network" in printed and "agent" in printed and f"other / {TINY} at batch 1" in printed


@pytest.mark.parametrize("args,needle", [
    (["--checkpoint", "student"], "takes NAME=PATH"),  # no NAME=
    (["--checkpoint", "=somewhere"], "takes NAME=PATH"),  # no name
    (["--checkpoint", "bad name=x"], "NAME may hold"),  # a name with a space
    (["--checkpoint", "a=/no/such/checkpoint"], "/no/such/checkpoint does not exist"),
    (["--checkpoint", f"{TINY}=."], "given twice"),  # the name of a preset given too
    (["--skip", "nope"], "--skip 'nope' is not a row"),
    (["--skip", TINY], "leaves no row"),
    (["--episodes", "real"], "needs --features"),
    (["--episodes", "real", "--features", "/no/such/features.h5"], "does not exist"),
    (["--episodes", "real", "--features", "FEATS", "--instructions", "3", "--batch-sizes", "2"], "multiple"),
    (["--episodes", "real", "--features", "FEATS", "--dtype", "bf16"], "bf16"),
])
def test_bench_model_bad_input_is_one_line(args, needle, small_toy, models, capsys):
    data, feats = small_toy
    argv = ["bench", "model", "--presets", TINY, "--repeats", "1", "--warmup", "0", "--threads", "1",
            "--quiet", "--data-dir", str(data), "--instructions", "2", "--batch-sizes", "1"]
    assert main(argv + [str(feats) if a == "FEATS" else a for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error: " in err and needle in err, err


def test_gemm_rates_and_flop_bounds(capsys, tmp_path):
    rep = bench_gemm([32, 64], [1], repeats=2, min_time=0.01)
    assert [(r["threads"], r["size"]) for r in rep["results"]] == [(1, 32), (1, 64)]
    assert all(r["gflop_per_s_best"] >= r["gflop_per_s_median"] > 0 for r in rep["results"])
    assert rep["peak_gflop_per_s"]["1"] == max(r["gflop_per_s_best"] for r in rep["results"])
    bench = {"machine": {"threads": 1}, "results": [
        {"label": "s", "batch_size": 1, "episode_ms": 50.0, "gflop_per_episode": 2.0}]}
    (b,) = flop_bounds({"peak_gflop_per_s": {"1": 100.0}}, bench)
    assert b["bound_ms"] == pytest.approx(20.0)
    assert flop_bounds({"peak_gflop_per_s": {"2": 100.0}}, bench)[0]["bound_ms"] is None
    (tmp_path / "x.json").write_text("{}")
    assert main(["bench", "gemm", "--sizes", "16", "--threads", "1", "--bench", str(tmp_path / "x.json")]) == 2
    assert "not a `minivln bench model` report" in capsys.readouterr().err


def _bench_report(path):
    path.write_text(json.dumps({
        "date": "2026-01-01", "code": {"commit": "abc", "dirty": False},
        "machine": {"model_name": "Test CPU", "threads": 1},
        "settings": {"episodes": "real"},
        "results": [{"label": "teacher", "batch_size": 1, "episode_ms": 900.0, "weights": "random"},
                    {"label": "student:onnxruntime-int8", "batch_size": 1, "episode_ms": 40.0, "weights": "trained"},
                    {"label": "student:onnxruntime-int8", "batch_size": 8, "episode_ms": 200.0, "weights": "trained"}],
    }))
    return path


def test_figure_writes_a_png(tmp_path):
    bench = _bench_report(tmp_path / "bench.json")
    metrics = tmp_path / "metrics_val_unseen.json"
    metrics.write_text(json.dumps({"sr": 0.4, "split": "val_unseen", "features": "stand-in"}))
    table = tmp_path / "table.json"
    table.write_text(json.dumps({"split": "val_unseen", "features": "stand-in",
                                 "rows": [{"name": "two-stage", "run": "ft-both", "sr": 0.38}]}))
    out = tmp_path / "img" / "fig.png"
    assert main(["bench", "figure", "--bench", str(bench), "--point", "teacher", "teacher", str(metrics),
                 "--point", "int8 student", "student:onnxruntime-int8", f"{table}#ft-both",
                 "--out", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


@pytest.mark.parametrize("point,extra,needle", [
    (["x", "no-such-row", "METRICS"], [], "row 'no-such-row' is not in the latency report"),
    (["x", "teacher", "METRICS"], ["--batch-size", "4"], "no rows at batch size 4"),
    (["x", "teacher", "TABLE"], [], "needs FILE#ROW"),
    (["x", "teacher", "TABLE#nope"], [], "has no row 'nope'"),
    (["x", "teacher", "/no/such.json"], [], "does not exist"),
    (["x", "teacher", "METRICS"], ["--out-png-suffix"], "name it *.png"),
    (["x", "teacher", "PARTIAL"], ["--point", "y", "teacher", "METRICS"], "different numbers of instructions"),
    (["x", "teacher", "SEEN"], ["--point", "y", "teacher", "METRICS"], "different splits"),
])
def test_figure_rejects_bad_points(point, extra, needle, tmp_path, capsys):
    bench = _bench_report(tmp_path / "bench.json")
    (tmp_path / "m.json").write_text(json.dumps({"sr": 0.4, "split": "val_unseen", "instructions": 2349}))
    (tmp_path / "p.json").write_text(json.dumps({"sr": 0.25, "split": "val_unseen", "instructions": 4}))
    (tmp_path / "s.json").write_text(json.dumps({"sr": 0.5, "split": "val_seen"}))
    (tmp_path / "t.json").write_text(json.dumps({"rows": [{"name": "a", "sr": 0.3}]}))
    files = {"METRICS": "m.json", "PARTIAL": "p.json", "SEEN": "s.json", "TABLE": "t.json"}

    def fill(args):
        out = []
        for a in args:
            for key, name in files.items():
                a = a.replace(key, str(tmp_path / name))
            out.append(a)
        return out

    point, extra = fill(point), fill(extra)
    out = tmp_path / ("fig.jpg" if "--out-png-suffix" in extra else "fig.png")
    extra = [e for e in extra if e != "--out-png-suffix"]
    assert main(["bench", "figure", "--bench", str(bench), "--point", *point, "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not out.exists()


def test_figure_labels_of_close_points_do_not_overlap():
    """Points at about the same latency get labels at least `gap` apart, in the order of their SR;
    a point alone keeps its label at its own height."""
    from minivln.bench.figure import _label_heights

    pts = [{"episode_ms": 32.0, "sr": 0.389}, {"episode_ms": 33.0, "sr": 0.358}, {"episode_ms": 32.5, "sr": 0.369},
           {"episode_ms": 109.0, "sr": 0.399}]
    ys = _label_heights(pts, gap=4.0)
    close = sorted([0, 1, 2], key=lambda i: -pts[i]["sr"])
    assert all(ys[a] - ys[b] >= 4.0 - 1e-9 for a, b in zip(close, close[1:]))
    assert ys[close[0]] >= 38.9 - 1e-9
    assert ys[3] == pytest.approx(39.9)


def test_figure_points_of_one_label_are_their_mean(tmp_path):
    """Seeds given one label are one point: mean SR, its standard error over them, median latency."""
    from minivln.bench.figure import figure_points

    bench = {"results": [{"label": f"s{k}", "batch_size": 1, "episode_ms": ms, "weights": "trained"}
                         for k, ms in enumerate((40.0, 42.0, 39.0))]
             + [{"label": "t", "batch_size": 1, "episode_ms": 150.0, "weights": "trained"}]}
    table = tmp_path / "table.json"
    table.write_text(json.dumps({"split": "val_unseen", "rows": [
        {"name": f"seed {k}", "run": f"r{k}", "sr": sr, "episodes": 2349} for k, sr in enumerate((0.30, 0.36, 0.33))]
        + [{"name": "teacher", "run": "t", "sr": 0.47, "episodes": 2349}]}))
    points = figure_points(bench, [("student", f"s{k}", f"{table}#r{k}") for k in range(3)]
                           + [("teacher", "t", f"{table}#t")], batch_size=1)
    assert [p["label"] for p in points] == ["student", "teacher"]
    student, teacher = points
    assert student["n"] == 3 and student["rows"] == ["s0", "s1", "s2"]
    assert student["sr"] == pytest.approx(0.33) and student["episode_ms"] == 40.0
    assert student["sr_se"] == pytest.approx(0.03 / 3 ** 0.5)  # SD 0.03 over three seeds
    assert teacher["n"] == 1 and teacher["sr_se"] is None and teacher["sr"] == 0.47
    out = tmp_path / "fig.png"
    assert main(["bench", "figure", "--bench", str(_bench_report(tmp_path / "b.json")),
                 "--point", "int8", "student:onnxruntime-int8", f"{table}#r0",
                 "--point", "int8", "student:onnxruntime-int8", f"{table}#r1", "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
