"""Smoke test of ``minivln bench model`` (structure only, no timing assertions) and of the
inference fast path it relies on (packed projections stay in sync with the parameters)."""

from __future__ import annotations

import json

import pytest
import torch

from minivln.bench.model import bench_models, make_world, record_episode, run_episode
from minivln.bench.train import METADATA_OPS, OpCounter, allocation_peak, bench_train, split_summary
from minivln.cli import main
from minivln.model import duet as duet_module
from minivln.model.checkpoint import save_pretrained
from minivln.model.parity import run_parity
from minivln.model.registry import create_model, get_config, register_preset


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_bench_result_structure():
    report = bench_models(["minivln-cpu"], [1, 2], repeats=1, warmup=0, threads=1, steps=2)
    assert report["settings"]["steps"] == 2 and report["settings"]["dtype"] == "fp32"
    assert {"model_name", "avx512_bf16", "amx_bf16", "threads"} <= set(report["machine"])
    assert [(r["preset"], r["batch_size"]) for r in report["results"]] == [
        ("minivln-cpu", 1), ("minivln-cpu", 2)
    ]
    for row in report["results"]:
        for key in ("episode_ms", "step_ms", "language_ms", "panorama_ms", "navigation_ms",
                    "episode_ms_min", "gflop_per_episode", "gflop_per_s"):
            assert row[key] > 0, key
        assert row["episode_ms"] >= row["language_ms"]
        assert len(row["episode_ms_all"]) == 1
        assert row["slots_per_step"] == [4, 6]
        assert all(36 <= v <= 40 for v in row["views_per_step"])
    assert report["ratios"] == []  # one preset: nothing to compare


def test_bench_ratio_and_cli_json(tmp_path):
    """A preset and a checkpoint of the same architecture: same FLOPs; the checkpoint's trained
    weights are recorded; the reference row can be chosen."""
    save_pretrained(create_model("minivln-cpu"), tmp_path / "model")
    out = tmp_path / "bench.json"
    rc = main([
        "bench", "model", "--presets", "minivln-cpu", "--checkpoint", f"trained={tmp_path / 'model'}",
        "--reference", "trained", "--batch-sizes", "1",
        "--repeats", "1", "--warmup", "0", "--steps", "1", "--threads", "1", "--quiet",
        "--json", str(out),
    ])
    assert rc == 0
    report = json.loads(out.read_text())
    (ratio,) = report["ratios"]
    assert (ratio["numerator"], ratio["denominator"]) == ("trained", "minivln-cpu")
    assert ratio["batch_size"] == 1 and ratio["episode_ratio"] > 0 and ratio["step_ratio"] > 0
    assert ratio["flop_ratio"] == pytest.approx(1.0)  # the same architecture
    assert [(r["label"], r["weights"]) for r in report["results"]] == [("minivln-cpu", "random"), ("trained", "trained")]
    assert report["code"]["commit"] and report["settings"]["episodes"] == "synthetic"
    assert main(["bench", "model", "--presets", "no-such-model", "--quiet"]) == 2
    # a name given twice, an unknown reference row
    assert main(["bench", "model", "--presets", "minivln-cpu", "minivln-cpu", "--quiet"]) == 2
    assert main(["bench", "model", "--presets", "minivln-cpu", "--reference", "nope", "--repeats", "1",
                 "--warmup", "0", "--steps", "1", "--batch-sizes", "1", "--quiet"]) == 2


def test_episode_protocol_shapes():
    model = create_model("minivln-cpu").eval()
    ep = record_episode(model, batch_size=2, steps=7, txt_len=60)
    assert ep.language["txt_ids"].shape == (2, 60)
    assert ep.slots_per_step == [4, 6, 8, 10, 12, 14, 16]
    assert all(36 <= v <= 40 for v in ep.views_per_step)
    assert set(run_episode(model, ep)) == {"episode", "language", "panorama", "navigation"}
    world = make_world(3, steps=7, feat_size=16)
    assert world.features[("n", 0)].shape == (36, 16)


def test_episode_protocol_times_a_model_that_embeds_its_instructions():
    """og_text_encoder: the recorded episode carries seeded instruction embeddings (the model needs
    them to build its text cache), with and without the cache."""
    model = create_model("minivln-cpu-reverie", og_text_encoder="minilm").eval()
    ep = record_episode(model, batch_size=2, steps=2)
    assert ep.instr_embeds is not None and ep.instr_embeds.shape == (2, 384)
    for cache in (True, False):
        assert set(run_episode(model, ep, text_cache=cache)) == {"episode", "language", "panorama", "navigation"}
    assert record_episode(create_model("minivln-cpu"), batch_size=1, steps=1).instr_embeds is None


@pytest.mark.parametrize("onednn", [False, True])
def test_packed_projections_follow_parameter_updates(onednn, monkeypatch):
    """The fused q/k/v and text k/v weights (and, for wide layers, the oneDNN-reordered weights)
    are cached; in-place updates must be seen."""
    if onednn:
        if not duet_module._ONEDNN_LINEAR:
            pytest.skip("no oneDNN linear in this torch build")
        monkeypatch.setattr(duet_module, "PREPACK_MIN_FEATURES", 1)  # every layer counts as wide
    model = create_model("minivln-cpu").eval()
    ep = record_episode(model, batch_size=1, steps=1)
    nav = dict(ep.navigation[0])

    def navigate():
        with torch.no_grad():
            txt = model("language", ep.language)
            nav["txt_kv"] = model.precompute_text_kv(txt, ep.language["txt_masks"])
            return model("navigation", nav)["fused_logits"]

    def reference():  # unpacked path: grad mode on, parameters trainable
        txt = model("language", ep.language)
        nav["txt_kv"] = model.precompute_text_kv(txt, ep.language["txt_masks"])
        return model("navigation", nav)["fused_logits"].detach()

    before = navigate()
    assert torch.allclose(before, reference(), atol=1e-5)
    att = model.local_encoder.encoder.x_layers[0]
    with torch.no_grad():  # optimizer-style in-place updates (version counters move)
        att.visn_self_att.self.key.weight.mul_(3.0)
        att.visual_attention.att.value.bias.add_(0.5)
        model.lang_encoder.layer[0].attention.self.query.weight.mul_(-1.0)
    after = navigate()
    assert not torch.allclose(before, after, atol=1e-4)
    assert torch.allclose(after, reference(), atol=1e-5)
    # edits through .data are invisible to the version counter: eval() clears the cache
    model.global_encoder.encoder.x_layers[0].visn_self_att.self.value.weight.data.mul_(2.0)
    model.eval()
    assert torch.allclose(navigate(), reference(), atol=1e-5)


def test_onednn_path_keeps_reference_parity(reference_dir, monkeypatch):
    """The wide-layer oneDNN path (used by the bert-base teacher) against the reference episode:
    the fixture network is narrow, so force every layer onto that path."""
    if not duet_module._ONEDNN_LINEAR:
        pytest.skip("no oneDNN linear in this torch build")
    path = reference_dir / "duet_fixture_r2r.npz"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    monkeypatch.setattr(duet_module, "PREPACK_MIN_FEATURES", 1)
    report = run_parity(path, 1e-4)
    assert report.passed, report.format_table()


def test_bench_train_times_every_preset_and_phase(small_toy, one_thread, capsys):
    """`minivln bench train` on the toy world: both phases, both presets, the same number of timings."""
    tiny = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_l_layers=1,
                num_pano_layers=1, num_x_layers=1, image_feat_size=16)
    register_preset("test-bench-a", get_config("duet-cpu", **tiny), "test only")
    register_preset("test-bench-b", get_config("duet-cpu", **{**tiny, "num_x_layers": 2}), "test only")
    data, feats = small_toy
    rep = bench_train(["test-bench-a", "test-bench-b"], ["pretrain", "finetune"], str(data), str(feats),
                      iters=2, warmup=1, batch_size=4, max_action_len=5, quiet=True)
    assert set(rep["phases"]) == {"pretrain", "finetune"}
    for rows in rep["phases"].values():
        assert list(rows) == ["test-bench-a", "test-bench-b"]
        assert rows["test-bench-a"]["ratio_to_first"] == 1.0
        for r in rows.values():
            assert len(r["all_s"]) == 2 and r["s_per_it"] > 0 and abs(r["it_s"] * r["s_per_it"] - 1) < 1e-9
            # the data and step parts are inside the iteration
            assert 0 <= r["data_s"] and 0 < r["step_s"] and r["data_s"] + r["step_s"] <= max(r["all_s"]) + 1e-6
    assert rep["precision"] == "fp32"
    with pytest.raises(ValueError, match="unknown precision"):
        bench_train(["test-bench-a"], ["pretrain"], str(data), str(feats), iters=1, precision="fp8")
    assert main(["bench", "train", "--presets", "test-bench-a", "--phases", "pretrain", "--data-dir", str(data),
                 "--features", str(feats), "--iters", "1", "--warmup", "0", "--batch-size", "4", "--quiet"]) == 0
    assert "it/s" in capsys.readouterr().out
    # the iteration before the agent's and the optimizer's speed-ups, in the same process
    old = bench_train(["test-bench-a"], ["finetune"], str(data), str(feats), iters=1, warmup=0, batch_size=4,
                      max_action_len=5, quiet=True, optimizer="single", full_batch=True, merge_rollouts=True)
    assert (old["optimizer"], old["full_batch"], old["merge_rollouts"]) == ("single", True, True)
    assert old["phases"]["finetune"]["test-bench-a"]["s_per_it"] > 0
    # operator counts: a deeper model dispatches more; a merged DAgger iteration fewer (one batch per step)
    counted = {m: bench_train(["test-bench-a", "test-bench-b"], ["finetune"], str(data), str(feats), iters=1,
                              warmup=0, batch_size=4, max_action_len=5, quiet=True, count_ops=True,
                              merge_rollouts=m)["phases"]["finetune"] for m in (False, True)}
    a, b = counted[False]["test-bench-a"], counted[False]["test-bench-b"]
    assert 0 < a["compute_ops_per_it"] < a["ops_per_it"] and a["compute_ops_per_it"] < b["compute_ops_per_it"]
    assert counted[True]["test-bench-a"]["compute_ops_per_it"] < a["compute_ops_per_it"]
    # split into the data part and the step part (the rollouts, backward and optimiser are in the step)
    assert a["data_compute_ops_per_it"] + a["step_compute_ops_per_it"] == a["compute_ops_per_it"]
    assert a["step_compute_ops_per_it"] > 0.9 * a["compute_ops_per_it"]
    assert sum(a["top_step_ops"].values()) <= a["step_compute_ops_per_it"]
    pre = bench_train(["test-bench-a"], ["pretrain"], str(data), str(feats), iters=1, warmup=0, batch_size=4,
                      quiet=True, count_ops=True)["phases"]["pretrain"]["test-bench-a"]
    assert pre["data_compute_ops_per_it"] > 0 and pre["step_compute_ops_per_it"] > 0  # a batch is built in torch
    assert pre["data_compute_ops_per_it"] + pre["step_compute_ops_per_it"] == pre["compute_ops_per_it"]


def test_op_counter_counts_kernels_and_sets_views_aside():
    x, w = torch.randn(4, 3, requires_grad=True), torch.randn(5, 3, requires_grad=True)
    with OpCounter() as c:
        (x @ w.t()).relu().sum().backward()
    s = c.summary()
    assert c.counts["aten.mm"] == 3 and c.counts["aten.t"] >= 1  # forward, and both gradients
    assert s["top_compute_ops"]["aten.mm"] == 3 and "aten.t" not in s["top_compute_ops"]
    assert s["compute_ops_per_it"] == s["ops_per_it"] - sum(v for k, v in c.counts.items() if k in METADATA_OPS)
    with OpCounter() as d:
        torch.zeros(3).add_(1)
    both = split_summary(d, c)
    assert both["ops_per_it"] == s["ops_per_it"] + sum(d.counts.values())
    assert both["step_compute_ops_per_it"] == s["compute_ops_per_it"] and both["top_step_ops"] == s["top_compute_ops"]
    assert both["data_compute_ops_per_it"] == sum(d.compute().values()) > 0


def test_allocation_peak_counts_what_a_step_holds_at_once():
    """The CPU memory of ``bench train --memory``, checked by hand.  Tensors: the peak of what the
    function's own allocations held at once (a tensor from before it, freed inside, is not subtracted)."""
    before = torch.empty(10_000)

    def allocations():
        nonlocal before
        a, b = torch.empty(1000, 1000), torch.empty(500, 1000)  # 4 MB + 2 MB held at once
        del a, b, before
        return torch.empty(250, 1000)

    assert allocation_peak(allocations)[1] == 6_000_000
    # a training step of y = x W^T, loss sum(y^2): y (B x D) is kept for the backward, whose formula for
    # pow (grad * 2 * y^1) holds three more B x D temporaries at once; then W's gradient (D x D)
    B, D = 2048, 128
    lin, x = torch.nn.Linear(D, D, bias=False), torch.randn(B, D)
    unit = B * D * 4
    _, peak = allocation_peak(lambda: lin(x).pow(2).sum().backward())
    assert 4 * unit <= peak <= 4 * unit + D * D * 4 + 4096, peak / unit


def test_bench_train_measures_cpu_memory_growing_with_the_batch(small_toy, one_thread):
    tiny = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_l_layers=1,
                num_pano_layers=1, num_x_layers=1, image_feat_size=16)
    register_preset("test-bench-mem", get_config("duet-cpu", **tiny), "test only")
    data, feats = small_toy
    plain = bench_train(["test-bench-mem"], ["pretrain"], str(data), str(feats), iters=1, warmup=0, batch_size=2,
                        quiet=True)
    assert "memory_method" not in plain and "step_extra_gb" not in plain["phases"]["pretrain"]["test-bench-mem"]
    gb, every = {}, {}
    for phase in ("pretrain", "finetune"):
        for b in (2, 16):
            rep = bench_train(["test-bench-mem"], [phase], str(data), str(feats), iters=2, warmup=1, batch_size=b,
                              max_action_len=5, quiet=True, memory=True)
            assert rep["memory_method"].startswith("torch.profiler")
            row = rep["phases"][phase]["test-bench-mem"]
            assert len(row["step_extra_gb_all"]) == 3 and row["step_extra_gb"] == max(row["step_extra_gb_all"])
            gb[phase, b], every[phase, b] = row["step_extra_gb_all"][-1], row["step_extra_gb_all"]
        assert 0 < gb[phase, 2] < gb[phase, 16], (phase, gb)
    assert rep["phases"]["finetune"]["test-bench-mem"].get("iteration_tasks") is None
    # with a frozen teacher (stage 1 / stage 2) the same step needs more: the teacher's forward, the terms
    register_preset("test-bench-mem-teacher", get_config("duet-cpu", **{**tiny, "num_x_layers": 2}), "test only")
    for phase in ("pretrain", "finetune"):
        rep = bench_train(["test-bench-mem"], [phase], str(data), str(feats), iters=2, warmup=1, batch_size=16,
                          max_action_len=5, quiet=True, memory=True, teacher="test-bench-mem-teacher")
        assert rep["teacher"] == "test-bench-mem-teacher"
        row = rep["phases"][phase]["test-bench-mem"]  # the same batches as without the teacher
        assert all(t > s for t, s in zip(row["step_extra_gb_all"], every[phase, 16])), (phase, row, every)
        if phase == "pretrain":
            assert len(row["iteration_tasks"]) == 3 and set(row["iteration_tasks"]) <= {"mlm", "sap", "mrc", "og"}
