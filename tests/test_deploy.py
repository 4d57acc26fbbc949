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
from minivln.deploy.export import (  # noqa: E402
    TRACE_SHAPE,
    example_batches,
    export_model,
    max_abs_diff,
)
from minivln.deploy.runtime import OnnxRuntimeDUET  # noqa: E402
from minivln.model.checkpoint import save_pretrained  # noqa: E402
from minivln.model.fixture import load_fixture, outputs_as_dict, run_fixture  # noqa: E402
from minivln.model.registry import create_model  # noqa: E402
from minivln.model.tensor_modes import UnsupportedModelError, tensor_modes  # noqa: E402

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
