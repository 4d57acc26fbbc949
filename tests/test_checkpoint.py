"""Checkpoints: our safetensors format, DUET/ScaleVLN fine-tuning and pre-training dicts, errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SMALL_DUET
from safetensors.torch import load_file

from minivln.model.checkpoint import (
    CheckpointError,
    infer_config,
    load_duet,
    load_pretrained,
    load_weights,
    navigation_state_dict,
    read_agent_config,
    save_duet_checkpoint,
    save_pretrained,
)
from minivln.model.config import DUETConfig
from minivln.model.duet import DUET
from minivln.model.fixture import Fixture, run_fixture
from minivln.model.registry import create_model, preset_parameters

pytestmark = pytest.mark.usefixtures("one_thread")  # `fixture` comes from conftest.py


def _assert_reproduces(model: DUET, fixture: Fixture) -> None:
    report = run_fixture(model.eval(), fixture)
    bad = {name: [c for c in checks if not c.ok] for name, checks in report.items()}
    assert not any(bad.values()), bad


# ----------------------------------------------------------------------------- parameter counts


@pytest.mark.parametrize(
    "preset, expected",
    [("duet-r2r", 180_489_221), ("duet-reverie", 181_082_118), ("scalevln-r2r", 180_292_613)],
)
def test_teacher_parameter_counts(preset, expected):
    assert preset_parameters(preset)["total"] == expected


def test_teacher_names_and_shapes_match_reference(reference_dir):
    ref = json.loads((reference_dir / "duet_state_dict_shapes.json").read_text())
    for task in ("r2r", "reverie"):
        with torch.device("meta"):
            model = DUET(DUETConfig.from_dict(ref[task]["config"]))
        shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
        assert list(shapes) == list(ref[task]["state_dict"])  # same names, same order
        assert shapes == ref[task]["state_dict"]


# ----------------------------------------------------------------------------- our own format


def test_safetensors_round_trip(fixture, tmp_path):
    model = fixture.build_model()
    save_pretrained(model, tmp_path / "ckpt")
    # Readable without our code: plain JSON + safetensors with the DUET parameter names.
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["hidden_size"] == 64 and cfg["model_type"] == "duet"
    tensors = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert set(tensors) == set(fixture.state_dict)
    loaded = load_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    _assert_reproduces(loaded, fixture)


def test_duet_format_round_trip(fixture, tmp_path):
    path = save_duet_checkpoint(fixture.build_model(), tmp_path / "best_val_unseen")
    raw = torch.load(path, weights_only=True)
    assert "vln_bert.embeddings.word_embeddings.weight" in raw["vln_bert"]["state_dict"]
    _assert_reproduces(load_duet(path, num_attention_heads=4), fixture)


# ----------------------------------------------------------------------------- DUET / ScaleVLN


def _finetune_dict(state_dict, ddp: bool) -> dict:
    prefix = "module.vln_bert." if ddp else "vln_bert."
    return {
        "vln_bert": {
            "epoch": 12345,
            "state_dict": {prefix + k: v.clone() for k, v in state_dict.items()},
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5}]},
        },
        "critic": {
            "epoch": 12345,
            "state_dict": {"state2value.0.weight": torch.zeros(512, 768)},
            "optimizer": {},
        },
    }


@pytest.mark.parametrize("ddp", [False, True])
def test_load_duet_finetune_checkpoint(fixture, tmp_path, ddp):
    ckpt = _finetune_dict(fixture.state_dict, ddp)
    model = DUET(fixture.config)
    assert load_weights(model, ckpt) == "finetune"
    _assert_reproduces(model, fixture)
    # From a file too, with the architecture inferred from the shapes.
    torch.save(ckpt, tmp_path / "ckpt.pt")
    inferred = load_duet(tmp_path / "ckpt.pt", num_attention_heads=4)
    assert inferred.config == fixture.config
    _assert_reproduces(inferred, fixture)


def _pretrain_dict(state_dict, cfg) -> dict:
    heads = ("global_sap_head.", "local_sap_head.", "sap_fuse_linear.", "og_head.")
    out = {}
    for k, v in state_dict.items():
        out[k if k.startswith(heads) else "bert." + k] = v.clone()
    h = cfg.hidden_size
    # Pre-training-only tensors: language-update branch, MLM and MRC heads.
    for branch in ("global_encoder", "local_encoder"):
        for i in range(cfg.num_x_layers):
            base = f"bert.{branch}.encoder.x_layers.{i}"
            out[f"{base}.lang_self_att.self.query.weight"] = torch.zeros(h, h)
            out[f"{base}.lang_inter.dense.weight"] = torch.zeros(cfg.intermediate_size, h)
            out[f"{base}.lang_output.LayerNorm.bias"] = torch.zeros(h)
    out["mlm_head.predictions.decoder.weight"] = torch.zeros(cfg.vocab_size, h)
    out["mlm_head.predictions.bias"] = torch.zeros(cfg.vocab_size)
    out["image_classifier.net.3.weight"] = torch.zeros(1000, h)
    return out


def test_load_pretraining_checkpoint(fixture):
    ckpt = _pretrain_dict(fixture.state_dict, fixture.config)
    model = DUET(fixture.config)
    assert load_weights(model, ckpt) == "pretrain"
    _assert_reproduces(model, fixture)
    # DDP-saved pre-training checkpoints carry 'module.' too.
    sd, kind = navigation_state_dict({"module." + k: v for k, v in ckpt.items()})
    assert kind == "pretrain" and set(sd) == set(fixture.state_dict)


def test_wrong_checkpoint_lists_every_problem(fixture):
    sd = {k: v.clone() for k, v in fixture.state_dict.items()}
    del sd["global_encoder.sprel_linear.bias"]
    sd["img_embeddings.img_linear.weight"] = torch.zeros(64, 48)
    sd["lang_encoder.layer.7.output.dense.weight"] = torch.zeros(3)
    model = DUET(fixture.config)
    with pytest.raises(CheckpointError) as info:
        load_weights(model, _finetune_dict(sd, ddp=False))
    err = info.value
    assert err.missing == ["global_encoder.sprel_linear.bias"]
    assert err.unexpected == ["lang_encoder.layer.7.output.dense.weight"]
    assert err.mismatched == [("img_embeddings.img_linear.weight", (64, 48), (64, 32))]
    msg = str(err)
    for needle in ("global_encoder.sprel_linear.bias", "lang_encoder.layer.7", "img_linear.weight",
                   "[64, 48]", "[64, 32]", "1 missing, 1 unexpected, 1 shape mismatches"):  # fmt: skip
        assert needle in msg
    # Nothing was half-loaded.
    loaded = model.global_encoder.sprel_linear.weight
    assert not torch.equal(loaded, fixture.state_dict["global_encoder.sprel_linear.weight"])


def test_infer_config_of_teachers():
    from minivln.model.registry import create_model, get_config

    for name in ("duet-r2r", "duet-reverie", "scalevln-reverie", "minivln-r2r"):
        sd = create_model(name, device="meta").state_dict()
        heads = get_config(name).num_attention_heads
        assert infer_config(sd, num_attention_heads=heads) == get_config(name)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_duet(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="missing"):
        load_pretrained(tmp_path)


def test_reverie_model_from_r2r_weights_with_fresh_og_head(tmp_path):
    from minivln.model.registry import create_model

    torch.manual_seed(0)
    r2r = create_model("duet-cpu", hidden_size=16, num_attention_heads=2, intermediate_size=32,
                       num_l_layers=1, num_pano_layers=1, num_x_layers=1, image_feat_size=16)
    src = save_pretrained(r2r, tmp_path / "r2r")
    rev = create_model("duet-cpu", hidden_size=16, num_attention_heads=2, intermediate_size=32,
                       num_l_layers=1, num_pano_layers=1, num_x_layers=1, image_feat_size=16, obj_feat_size=16)
    with pytest.raises(CheckpointError, match="og_head"):  # strict by default
        load_weights(rev, src)
    before = {k: v.clone() for k, v in rev.state_dict().items()}
    fresh: list[str] = []
    load_weights(rev, src, fresh=["og_head"], report=fresh)
    assert fresh and all(k.startswith("og_head.") for k in fresh)
    state = rev.state_dict()
    assert all(torch.equal(state[k], before[k]) for k in fresh)  # kept their own init
    assert torch.equal(state["embeddings.word_embeddings.weight"], r2r.state_dict()["embeddings.word_embeddings.weight"])


def test_read_agent_config_reads_the_config_without_the_weights(tmp_path):
    """What load_agent_model would build, cheaply: a saved model's (or RUN/model's) config.json, a DUET
    checkpoint's shapes; a missing or corrupt one is a CheckpointError."""
    model = create_model("duet-cpu", **SMALL_DUET)
    run = tmp_path / "run"
    save_pretrained(model, run / "model")
    (run / "model" / "model.safetensors").write_bytes(b"not read")  # the weights are not opened
    assert read_agent_config(run) == read_agent_config(run / "model") == model.config
    pt = save_duet_checkpoint(model, tmp_path / "duet.pt")
    assert read_agent_config(pt) == infer_config(navigation_state_dict(torch.load(pt))[0])
    assert read_agent_config(pt).hidden_size == SMALL_DUET["hidden_size"]
    with pytest.raises(CheckpointError, match="not found"):
        read_agent_config(tmp_path / "nothing")
    (run / "model" / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_agent_config(run / "model")
