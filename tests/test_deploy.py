"""ONNX export and the ONNX Runtime backends (``minivln export``, ``minivln navigate --backend``).

Needs the optional extra (``pip install -e '.[deploy]'``); skipped without it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnx", reason="onnx not installed (optional extra: pip install -e '.[deploy]')")
pytest.importorskip("onnxruntime", reason="onnxruntime not installed (optional extra: pip install -e '.[deploy]')")

from conftest import SMALL_DUET as SMALL

from minivln.cli import main as cli_main  # noqa: E402
from minivln.deploy.backends import load_backend  # noqa: E402
from minivln.deploy.compare import CompareModel  # noqa: E402
from minivln.deploy.export import (  # noqa: E402
    TRACE_SHAPE,
    entry_inputs,
    example_batches,
    export_model,
    max_abs_diff,
)
from minivln.deploy.runtime import OnnxRuntimeDUET  # noqa: E402
from minivln.model.checkpoint import save_pretrained  # noqa: E402
from minivln.model.fixture import load_fixture, outputs_as_dict, run_fixture  # noqa: E402
from minivln.model.registry import create_model  # noqa: E402
from minivln.model.tensor_modes import (  # noqa: E402
    NAVIGATION_INPUTS,
    UnsupportedModelError,
    mode_outputs,
    tensor_modes,
)

# the entry points' names before og_text_encoder (format 1): exports of models without it keep them
FORMAT1_INPUTS = {"language": ["txt_ids", "txt_masks"], "text_kv": ["txt_embeds"],
                  "panorama": ["view_img_fts", "loc_fts", "nav_types", "view_lens"],
                  "navigation": list(NAVIGATION_INPUTS)}
FORMAT1_OUTPUTS = {"language": ["txt_embeds"], "text_kv": ["txt_kv"], "panorama": ["pano_embeds", "pano_masks"],
                   "navigation": ["gmap_embeds", "vp_embeds", "global_logits", "local_logits", "fused_logits",
                                  "fuse_weights"]}
# (batch, text tokens, panorama tokens, map slots): neither is the traced shape, one has batch 1
SHAPES = ((3, 12, 15, 7), (1, 4, 10, 3))
TOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    """A seeded tiny student, saved (``model/``) and exported (``export/``, fp32 + int8)."""
    torch.manual_seed(0)
    model = create_model("duet-cpu", **SMALL).eval()
    root = tmp_path_factory.mktemp("deploy")
    save_pretrained(model, root / "model")
    export_model(model, root / "export", source=str(root / "model"), check=False)
    return model, root


def _outputs(model, mode, batch):
    with torch.no_grad():
        return {k: v.numpy() for k, v in outputs_as_dict(mode, model(mode, batch)).items()}


def _diffs(model, other, batches):
    """max |other - model| per mode and output name (on the model's own calling convention)."""
    out = {}
    for mode, batch in batches.items():
        ref, got = _outputs(model, mode, batch), _outputs(other, mode, batch)
        assert ref.keys() == got.keys(), mode
        out.update({f"{mode}.{k}": max_abs_diff(ref[k], got[k]) for k in ref})
    return out


def test_fp32_graphs_equal_eager_on_other_shapes(tiny):
    model, root = tiny
    ort_model = OnnxRuntimeDUET(root / "export", "fp32", threads=1)
    assert TRACE_SHAPE not in SHAPES
    for k, shape in enumerate(SHAPES):
        batches = example_batches(model, *shape, seed=10 + k)
        diffs = _diffs(model, ort_model, batches)
        assert len(diffs) == 1 + 2 + 6 and max(diffs.values()) < TOL, (shape, diffs)
        # the navigation outputs have the batch's dynamic sizes
        out = ort_model("navigation", batches["navigation"])
        assert out["fused_logits"].shape == (shape[0], shape[3]) and out["vp_embeds"].shape[1] == shape[2] + 1
        assert out["obj_logits"] is None
        # with the per-episode text cache, as the agent calls it: the same outputs
        nav = dict(batches["navigation"])
        nav["txt_kv"] = ort_model.precompute_text_kv(nav.pop("txt_embeds"), nav.pop("txt_masks"))
        cached = ort_model("navigation", nav)
        assert all(torch.equal(cached[k], out[k]) for k in out if out[k] is not None)


def _graph_names(ort_model):
    """The input and output names of the runtime's four graphs, by mode."""
    return ({m: [i.name for i in s.get_inputs()] for m, s in ort_model.sessions.items()},
            {m: [o.name for o in s.get_outputs()] for m, s in ort_model.sessions.items()})


def test_models_without_og_text_encoder_export_as_before(tiny):
    """Without og_text_encoder the export is format 1 with the names it always had (no og_text, no
    instr_embeds for the text cache), in the manifest and in the graphs; the runtime's text cache
    ignores instr_embeds, as DUET's does."""
    model, root = tiny
    manifest = json.loads((root / "export" / "export.json").read_text())
    assert manifest["format_version"] == 1
    assert "og_text" not in manifest["dynamic_axes"] and "instr_embeds" not in manifest["dynamic_axes"]
    assert manifest["inputs"] == FORMAT1_INPUTS and manifest["outputs"] == FORMAT1_OUTPUTS
    for variant in ("fp32", "int8"):
        assert _graph_names(OnnxRuntimeDUET(root / "export", variant, threads=1)) == (FORMAT1_INPUTS, FORMAT1_OUTPUTS)
    nav = example_batches(model, *SHAPES[1], seed=3)["navigation"]
    text = OnnxRuntimeDUET(root / "export", "fp32", threads=1).precompute_text_kv(
        nav["txt_embeds"], nav["txt_masks"], torch.randn(SHAPES[1][0], 384))
    assert text.og_text is None


def test_comparison_catches_a_changed_weight(tiny):
    """The parity check above is sensitive: a 1e-3 change of one scalar (the global head's bias)
    shows in the navigation outputs, and only there."""
    model, root = tiny
    ort_model = OnnxRuntimeDUET(root / "export", "fp32", threads=1)
    changed = create_model("duet-cpu", **SMALL).eval()
    changed.load_state_dict(model.state_dict())
    with torch.no_grad():
        changed.global_sap_head.net[3].bias.add_(1e-3)
    diffs = _diffs(changed, ort_model, example_batches(model, *SHAPES[0], seed=10))
    assert diffs["language.txt_embeds"] < TOL and diffs["panorama.pano_embeds"] < TOL, diffs
    assert diffs["navigation.global_logits"] > TOL and diffs["navigation.fused_logits"] > TOL, diffs


def test_graphs_are_tensor_only(tiny):
    """No private operator, no custom domain, no loop or branch in any graph; dynamic axes are named."""
    import onnx

    _, root = tiny
    manifest = json.loads((root / "export" / "export.json").read_text())
    for variant, graphs in manifest["graphs"].items():
        for mode, rel in graphs.items():
            g = onnx.load(root / "export" / rel).graph
            ops = {(n.domain or "ai.onnx", n.op_type) for n in g.node}
            assert {d for d, _ in ops} <= {"ai.onnx", "com.microsoft"}, (variant, mode, ops)
            assert not {op for _, op in ops} & {"If", "Loop", "Scan"}, (variant, mode, ops)
            if variant == "int8" and mode != "text_kv":
                assert any(op in ("MatMulInteger", "DynamicQuantizeMatMul") for _, op in ops), (mode, ops)
            batch_dims = {i.name: i.type.tensor_type.shape.dim[0 if i.name != "txt_kv" else 1].dim_param
                          for i in g.input}
            assert set(batch_dims.values()) == {"B"}, (mode, batch_dims)


def test_fixture_calls_within_1e4(fixture, tmp_path, one_thread):
    model = fixture.build_model()
    export_model(model, tmp_path / "fx", int8=False, check=False)
    report = run_fixture(OnnxRuntimeDUET(tmp_path / "fx", "fp32", threads=1), fixture, atol=TOL)
    failed = [(call, c) for call, checks in report.items() for c in checks if not c.ok]
    assert not failed, failed
    compared = {c.name for checks in report.values() for c in checks}
    assert {"txt_embeds", "pano_embeds", "gmap_embeds", "vp_embeds", "fused_logits"} <= compared


def test_reverie_fixture_calls_within_1e4(reference_dir, tmp_path, one_thread):
    """The reference REVERIE episode (object tokens, 0-5 objects per viewpoint, OG logits at every
    call) through the exported graphs: every recorded output within 1e-4, obj_logits included."""
    path = reference_dir / "duet_fixture_reverie.npz"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    fx = load_fixture(path)
    export_model(fx.build_model(), tmp_path / "fx", int8=False, check=False)
    report = run_fixture(OnnxRuntimeDUET(tmp_path / "fx", "fp32", threads=1), fx, atol=TOL)
    failed = [(call, c) for call, checks in report.items() for c in checks if not c.ok]
    assert not failed, failed
    assert {"pano_embeds", "obj_logits", "fused_logits"} <= {c.name for checks in report.values() for c in checks}


def test_int8_runs_and_is_close(tiny):
    model, root = tiny
    ort8 = OnnxRuntimeDUET(root / "export", "int8", threads=1)
    batches = example_batches(model, *SHAPES[0], seed=10)
    diffs = _diffs(model, ort8, batches)
    # quantized, so not equal ...
    assert max(diffs.values()) > TOL, diffs
    # ... but close: -inf at the same places (else inf) and the scores within 10% of their spread
    ref = _outputs(model, "navigation", batches["navigation"])["fused_logits"]
    spread = np.ptp(ref[np.isfinite(ref)])
    assert diffs["navigation.fused_logits"] < 0.1 * spread, (diffs, spread)
    assert diffs["language.txt_embeds"] < 0.1 and diffs["panorama.pano_embeds"] < 0.1, diffs


def _navigate(root, data, feats, backend, checkpoint, out):
    argv = ["navigate", "--checkpoint", str(checkpoint), "--task", "r2r", "--split", "val_unseen",
            "--data-dir", str(data), "--features", str(feats), "--out", str(out), "--backend", backend,
            "--batch-size", "2", "--threads", "1"]
    assert cli_main(argv) == 0
    sub = json.loads((out / "submission_val_unseen.json").read_text())
    metrics = json.loads((out / "metrics_val_unseen.json").read_text())
    assert metrics["backend"] == backend
    return sub, metrics


def test_navigate_backends_give_the_same_episodes(tiny, small_toy, tmp_path):
    _, root = tiny
    data, feats = small_toy
    ref, ref_metrics = _navigate(root, data, feats, "torch", root / "model", tmp_path / "torch")
    assert len(ref) == 9 and any(len(e["trajectory"]) > 2 for e in ref)
    backend = load_backend("onnxruntime", root / "model")  # exported on the fly, to a temporary directory
    assert isinstance(backend.model, OnnxRuntimeDUET) and backend.model.variant == "fp32"
    tmp = backend.export_dir
    backend.close()
    assert not tmp.exists()
    # from the export directory, and from the plain checkpoint
    for checkpoint in (root / "export", root / "model"):
        sub, metrics = _navigate(root, data, feats, "onnxruntime", checkpoint, tmp_path / f"ort-{checkpoint.name}")
        assert sub == ref
        assert {k: v for k, v in metrics.items() if k not in ("backend", "checkpoint")} == \
            {k: v for k, v in ref_metrics.items() if k not in ("backend", "checkpoint")}
    sub, _ = _navigate(root, data, feats, "onnxruntime-int8", root / "export", tmp_path / "int8")
    assert [e["instr_id"] for e in sub] == [e["instr_id"] for e in ref]


def test_navigate_compare_and_max_episodes(tiny, small_toy, tmp_path, capsys):
    _, root = tiny
    data, feats = small_toy
    common = ["navigate", "--checkpoint", str(root / "export"), "--split", "val_unseen", "--data-dir", str(data),
              "--features", str(feats), "--threads", "1", "--max-episodes", "4", "--compare"]
    assert cli_main([*common, "--backend", "onnxruntime", "--out", str(tmp_path / "fp32")]) == 0
    report = json.loads((tmp_path / "fp32" / "compare_val_unseen.json").read_text())
    assert report["within_tolerance"] and report["max"] < TOL and report["calls"]["language"] >= 1
    assert len(report["max_abs_diff"]) == 1 + 2 + 6 and report["calls"]["navigation"] == report["calls"]["panorama"]
    assert json.loads((tmp_path / "fp32" / "metrics_val_unseen.json").read_text())["instructions"] == 4
    assert cli_main([*common, "--backend", "onnxruntime-int8", "--out", str(tmp_path / "int8")]) == 0
    assert not json.loads((tmp_path / "int8" / "compare_val_unseen.json").read_text())["within_tolerance"]
    capsys.readouterr()
    assert cli_main([*common, "--backend", "torch", "--out", str(tmp_path / "torch")]) == 2
    assert capsys.readouterr().err.startswith("minivln: error: navigate: --compare")


@pytest.mark.parametrize("obj_size", [SMALL["image_feat_size"], 24])  # shared / separate object projection
def test_models_with_objects_export_with_object_inputs_and_scores(obj_size, tmp_path, one_thread):
    """REVERIE models: the panorama graph packs views then objects (any number of objects, none
    included), the navigation graph adds obj_logits; fp32 equals eager on shapes other than the traced
    one, int8 is close, and the runtime gives no object scores where the torch model gives none."""
    torch.manual_seed(0)
    model = create_model("duet-cpu", **SMALL, obj_feat_size=obj_size).eval()
    manifest = export_model(model, tmp_path / "exp", check=True).manifest
    assert manifest["objects"] and manifest["inputs"]["panorama"][-2:] == ["obj_img_fts", "obj_lens"]
    assert manifest["inputs"]["navigation"][-1] == "vp_obj_masks" and manifest["outputs"]["navigation"][-1] == "obj_logits"
    assert manifest["format_version"] == 1 and manifest["inputs"]["navigation"] == [*NAVIGATION_INPUTS, "vp_obj_masks"]
    assert manifest["inputs"]["text_kv"] == ["txt_embeds"] and manifest["outputs"]["text_kv"] == ["txt_kv"]
    assert max(manifest["check"]["max_abs_diff"]["fp32"].values()) < TOL, manifest["check"]
    int8 = manifest["check"]["max_abs_diff"]["int8"]  # -inf at the same places (else inf), and close
    assert TOL < max(int8.values()) < 0.1, int8
    ort_model = OnnxRuntimeDUET(tmp_path / "exp", "fp32", threads=1)
    for k, shape in enumerate(SHAPES):
        batches = example_batches(model, *shape, seed=10 + k)
        diffs = _diffs(model, ort_model, batches)
        assert "navigation.obj_logits" in diffs and max(diffs.values()) < TOL, (shape, diffs)
    # a batch without any object (O = 0), and a model with objects shown none: as eager
    pano = dict(example_batches(model, *SHAPES[0], seed=12)["panorama"])
    pano.update(obj_img_fts=pano["obj_img_fts"][:, :0], obj_lens=torch.zeros_like(pano["obj_lens"]),
                nav_types=pano["nav_types"].masked_fill(pano["nav_types"] == 2, 0))
    v = pano["view_img_fts"].size(1)
    views_only = {"view_img_fts": pano["view_img_fts"], "loc_fts": pano["loc_fts"][:, :v],
                  "nav_types": pano["nav_types"][:, :v], "view_lens": pano["view_lens"]}
    for batch in (pano, views_only):
        ref, got = _outputs(model, "panorama", batch), ort_model("panorama", batch)
        assert max_abs_diff(ref["pano_embeds"], got[0].numpy()) < TOL and np.array_equal(ref["pano_masks"], got[1].numpy())
    nav = {k: v for k, v in batches["navigation"].items() if k != "vp_obj_masks"}
    assert ort_model("navigation", nav)["obj_logits"] is None


@pytest.fixture(scope="module")
def og_model(one_thread):
    """A seeded tiny model with objects and og_text_encoder='minilm' (instr_embeds (B, 384)),
    og_text_proj's weight random (zero at init: the term would not show)."""
    torch.manual_seed(0)
    model = create_model("duet-cpu", **SMALL, obj_feat_size=24, og_text_encoder="minilm").eval()
    with torch.no_grad():
        model.og_text_proj.weight.normal_()
    return model


def test_og_text_encoder_tensor_modes_equal_eager(og_model):
    """og_text_encoder: the text_kv entry point takes (txt_embeds, instr_embeds) and also gives
    og_text (B, H), the navigation one takes it last, and together they give
    model('navigation', batch)'s outputs (the batch with its instr_embeds), obj_logits included; the
    term matters (a zero og_text changes obj_logits, and only them)."""
    model = og_model
    modes = tensor_modes(model)
    for k, shape in enumerate(SHAPES):
        batches = example_batches(model, *shape, seed=10 + k)
        inputs = entry_inputs(model, batches)
        assert list(inputs["text_kv"]) == ["txt_embeds", "instr_embeds"]
        assert inputs["text_kv"]["instr_embeds"].shape == (shape[0], model.config.og_text_size) == (shape[0], 384)
        assert list(inputs["navigation"]) == [*NAVIGATION_INPUTS, "vp_obj_masks", "og_text"]
        with torch.no_grad():
            txt_kv, og_text = modes["text_kv"](*inputs["text_kv"].values())
            got = dict(zip(mode_outputs(model, "navigation"), modes["navigation"](*inputs["navigation"].values())))
            ref = model("navigation", batches["navigation"])
            nav = batches["navigation"]
            eager = model.precompute_text_kv(nav["txt_embeds"], nav["txt_masks"], nav["instr_embeds"])
            zero = dict(inputs["navigation"], og_text=torch.zeros_like(og_text))
            without = dict(zip(mode_outputs(model, "navigation"), modes["navigation"](*zero.values())))
        assert og_text.shape == (shape[0], model.config.hidden_size)
        assert max_abs_diff(eager.og_text.numpy(), og_text.numpy()) < TOL
        assert torch.equal(txt_kv, inputs["navigation"]["txt_kv"]) and torch.equal(og_text, inputs["navigation"]["og_text"])
        diffs = {name: max_abs_diff(ref[name].numpy(), got[name].numpy()) for name in got}
        assert max(diffs.values()) < TOL, (shape, diffs)
        assert max_abs_diff(got["obj_logits"].numpy(), without["obj_logits"].numpy()) > 0.1
        assert max_abs_diff(got["fused_logits"].numpy(), without["fused_logits"].numpy()) == 0.0
    with pytest.raises(ValueError, match="needs og_text"):
        modes["navigation"](*[v for k, v in inputs["navigation"].items() if k != "og_text"])
    with pytest.raises(ValueError, match="give instr_embeds"):  # DUET.grounding_text's error
        modes["text_kv"](inputs["text_kv"]["txt_embeds"])


def test_og_text_encoder_exports_and_runs_as_torch(og_model, tmp_path):
    """og_text_encoder exports as format 2: text_kv takes instr_embeds and gives og_text, navigation
    takes it last; on the runtime, with the per-episode cache as the agent passes it
    (precompute_text_kv(txt_embeds, txt_masks, instr_embeds), also through --compare's CompareModel),
    every output equals torch's within 1e-4, obj_logits included; without instr_embeds the runtime
    says what is missing, as DUET does."""
    model = og_model
    manifest = export_model(model, tmp_path / "exp", int8=False, check=True).manifest
    assert manifest["format_version"] == 2 and manifest["dynamic_axes"]["og_text"] == {"0": "B"}
    assert manifest["dynamic_axes"]["instr_embeds"] == {"0": "B"}
    assert manifest["inputs"]["text_kv"] == ["txt_embeds", "instr_embeds"]
    assert manifest["outputs"]["text_kv"] == ["txt_kv", "og_text"]
    assert manifest["inputs"]["navigation"] == [*NAVIGATION_INPUTS, "vp_obj_masks", "og_text"]
    assert max(manifest["check"]["max_abs_diff"]["fp32"].values()) < TOL, manifest["check"]
    ort_model = OnnxRuntimeDUET(tmp_path / "exp", "fp32", threads=1)
    assert _graph_names(ort_model) == (manifest["inputs"], manifest["outputs"])
    for k, shape in enumerate(SHAPES):
        batches = example_batches(model, *shape, seed=10 + k)
        diffs = _diffs(model, ort_model, batches)  # navigation without a cache: the runtime makes one
        assert "navigation.obj_logits" in diffs and max(diffs.values()) < TOL, (shape, diffs)
        nav = dict(batches["navigation"])
        instr_embeds = nav.pop("instr_embeds")
        text = ort_model.precompute_text_kv(nav.pop("txt_embeds"), nav.pop("txt_masks"), instr_embeds)
        assert text.og_text is not None and text.og_text.shape == (shape[0], model.config.hidden_size)
        got = ort_model("navigation", {**nav, "txt_kv": text})
        ref = _outputs(model, "navigation", batches["navigation"])
        assert max_abs_diff(ref["obj_logits"], got["obj_logits"].numpy()) < TOL
        cmp = CompareModel(model, ort_model)
        cmp("navigation", {**nav, "txt_kv": cmp.precompute_text_kv(batches["navigation"]["txt_embeds"],
                                                                   text.txt_masks, instr_embeds)})
        assert cmp.report(TOL)["within_tolerance"] and "navigation.obj_logits" in cmp.max_abs_diff, cmp.report(TOL)
    for runtime in (model, ort_model):  # the same error from both
        with pytest.raises(ValueError, match=r"give instr_embeds \(B, 384\)"):
            runtime.precompute_text_kv(torch.zeros(1, 4, model.config.hidden_size),
                                       torch.ones(1, 4, dtype=torch.bool))


def test_bad_input_is_one_line_errors(tiny, tmp_path, capsys):
    _, root = tiny
    with pytest.raises(UnsupportedModelError, match="expected a DUET network"):
        tensor_modes(torch.nn.Linear(2, 2))
    cases = [
        ["export", str(tmp_path / "missing"), "--out", str(tmp_path / "x2")],  # no checkpoint
        ["export", str(root / "model"), "--out", str(root / "export")],  # not empty
    ]
    for argv in cases:
        capsys.readouterr()
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("minivln: error: ") and "Traceback" not in err, (argv, err)
    (root / "export-bad").mkdir()
    (root / "export-bad" / "export.json").write_text('{"format_version": 0}')
    with pytest.raises(Exception, match="export format"):
        load_backend("onnxruntime", root / "export-bad")


def test_bench_model_backends(tmp_path):
    from minivln.bench.model import bench_models

    report = bench_models(["tiny"], [2], repeats=1, warmup=0, threads=1, steps=2,
                          model_factory=lambda name: create_model("duet-cpu", **SMALL),
                          backends=["torch", "onnxruntime", "onnxruntime-int8"])
    rows = report["results"]
    assert [r["label"] for r in rows] == ["tiny", "tiny:onnxruntime", "tiny:onnxruntime-int8"]
    assert all(r["episode_ms"] > 0 and r["navigation_ms"] > 0 for r in rows)
    assert rows[1]["gflop_per_episode"] == rows[0]["gflop_per_episode"] > 0
    assert [(q["numerator"], q["denominator"]) for q in report["ratios"]] == [
        ("tiny", "tiny:onnxruntime"), ("tiny", "tiny:onnxruntime-int8")]
    assert report["settings"]["backends"] == ["torch", "onnxruntime", "onnxruntime-int8"]
    assert cli_main(["bench", "model", "--backend", "onnxruntime", "--dtype", "bf16", "--quiet"]) == 2


def test_bench_real_episodes_backends(tiny, small_toy):
    """Real episodes on the three backends, from a checkpoint (exported on the fly) and from an export
    directory (its graphs used as they are): every row replays the same work."""
    from minivln.bench.episodes import bench_real

    _, root = tiny
    data, feats = small_toy
    report = bench_real([], [1], checkpoints=[f"ckpt={root / 'model'}", f"exp={root / 'export'}"],
                        data_dir=data, features=feats, instructions=2, repeats=1, warmup=0, threads=1,
                        backends=["torch", "onnxruntime", "onnxruntime-int8"], skip=["ckpt:onnxruntime"])
    rows = report["results"]
    assert [r["label"] for r in rows] == ["ckpt", "ckpt:onnxruntime-int8",
                                          "exp", "exp:onnxruntime", "exp:onnxruntime-int8"]
    assert len({json.dumps(r["calls_per_episode"], sort_keys=True) for r in rows}) == 1
    assert len({r["steps_per_episode"] for r in rows}) == 1
    assert all(r["network_ms"] > 0 and r["agent_ms"] > 0 for r in rows)
    assert rows[1]["gflop_per_episode"] == rows[0]["gflop_per_episode"] == rows[3]["gflop_per_episode"] > 0
    assert "onnxruntime" in report["machine"]
