"""The two distillation stages from the command line: ``teacher=DIR`` on ``minivln pretrain`` / ``finetune``."""

from __future__ import annotations

import json

import torch
from conftest import SMALL_DUET as SMALL
from safetensors.torch import load_file

from minivln.cli import main as cli_main
from minivln.model.checkpoint import save_pretrained
from minivln.model.registry import create_model
from minivln.training.logging import read_jsonl

TEACHER = {**SMALL, "hidden_size": 32, "intermediate_size": 64, "num_l_layers": 3, "num_pano_layers": 2,
           "num_x_layers": 2}


def _teacher(tmp_path):
    torch.manual_seed(1)
    return save_pretrained(create_model("duet-cpu", **TEACHER), tmp_path / "teacher")


def _train_records(run):
    return [r for r in read_jsonl(run / "log.jsonl") if r.get("kind") == "train"]


def test_finetune_with_teacher_is_stage2(small_toy, tmp_path, one_thread):
    data, feats = small_toy
    teacher_dir = _teacher(tmp_path)
    before = load_file(teacher_dir / "model.safetensors")
    run = tmp_path / "ft"
    overrides = [
        "model=duet-cpu", f"model_overrides={json.dumps(SMALL)}", f"data_dir={data}", f"features={feats}",
        f"teacher={teacher_dir}", "kd_weight=0.5", "kd_terms.txt=2", "batch_size=2", "max_action_len=6",
        "max_instr_len=40",
        "val_splits=[val_unseen]", "val_max_episodes=2", "num_threads=1", "train.max_steps=2",
        "train.log_every=1", "train.progress=false",
    ]
    assert cli_main(["finetune", "--out", str(run), *overrides]) == 0
    recs = _train_records(run)
    for key in ("loss/kd_txt", "loss/kd_pano", "loss/kd_fuse"):
        assert all(key in r and r[key] > 0 for r in recs), key
    # the total is the action loss + KDWeight x term weight x term: the weights really scale
    for r in recs:
        kd = 0.5 * (2 * r["loss/kd_txt"] + r["loss/kd_pano"] + r["loss/kd_fuse"])
        assert abs(r["loss"] - (r["loss/task"] + kd)) < 1e-4 * r["loss"], r
    terms = load_file(next((run / "latest").glob("**/loss_terms.safetensors")))
    assert any(k.startswith("kd_txt.") for k in terms) and any(k.startswith("kd_pano.") for k in terms)
    # the exported student is the student alone, and the teacher's files are untouched
    student = json.loads((run / "model" / "config.json").read_text())
    assert student["hidden_size"] == 16
    after = load_file(teacher_dir / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_pretrain_with_teacher_is_stage1(small_toy, tmp_path, one_thread):
    data, feats = small_toy
    teacher_dir = _teacher(tmp_path)
    run = tmp_path / "pt"
    overrides = [
        "model=duet-cpu", f"model_overrides={json.dumps(SMALL)}", f"data_dir={data}", f"features={feats}",
        f"teacher={teacher_dir}", "batch_size=4", "max_instr_len=40", "val_batches=1", "num_threads=1",
        "train.max_steps=3", "train.log_every=1", "train.progress=false", "kd_weight=0.5", "kd_terms.hid=3",
    ]
    assert cli_main(["pretrain", "--out", str(run), *overrides]) == 0
    recs = _train_records(run)
    for key in ("loss/kd_emb", "loss/kd_att", "loss/kd_hid"):
        assert all(key in r and r[key] > 0 for r in recs), key
    for r in recs:  # kd_weight and the term weights scale the loss
        kd = 0.5 * (r["loss/kd_emb"] + r["loss/kd_att"] + 3 * r["loss/kd_hid"])
        assert abs(r["loss"] - (r["loss/task"] + kd)) < 1e-4 * r["loss"], r
    assert (run / "pretrained" / "config.json").exists()


def test_bad_kd_settings_are_config_errors(small_toy, tmp_path, capsys):
    data, feats = small_toy
    code = cli_main(["finetune", "--out", str(tmp_path / "x"), f"data_dir={data}", f"features={feats}",
                     "teacher=somewhere", "kd_temperature=0"])
    assert code == 2 and "kd_temperature" in capsys.readouterr().err


def test_missing_teacher_is_reported_before_any_work(small_toy, tmp_path, capsys):
    data, feats = small_toy
    for cmd in ("finetune", "pretrain"):
        code = cli_main([cmd, "--out", str(tmp_path / cmd), f"data_dir={data}", f"features={feats}",
                         f"teacher={tmp_path / 'nowhere'}"])
        assert code == 2 and "not found" in capsys.readouterr().err
        assert not (tmp_path / cmd / "log.jsonl").exists()


def test_term_weight_zero_leaves_the_term_out(small_toy, tmp_path, one_thread):
    """Table IV's subsets are YAML only: a term of weight 0 is neither computed nor logged."""
    data, feats = small_toy
    teacher_dir = _teacher(tmp_path)
    run = tmp_path / "ft"
    overrides = [
        "model=duet-cpu", f"model_overrides={json.dumps(SMALL)}", f"data_dir={data}", f"features={feats}",
        f"teacher={teacher_dir}", "kd_terms.txt=0", "kd_terms.pano=0", "batch_size=2", "max_action_len=6",
        "max_instr_len=40", "val_splits=[val_unseen]", "val_max_episodes=2", "num_threads=1",
        "train.max_steps=1", "train.log_every=1", "train.progress=false",
    ]
    assert cli_main(["finetune", "--out", str(run), *overrides]) == 0
    (rec,) = _train_records(run)
    assert "loss/kd_fuse" in rec and "loss/kd_txt" not in rec and "loss/kd_pano" not in rec
    assert abs(rec["loss"] - (rec["loss/task"] + 0.1 * rec["loss/kd_fuse"])) < 1e-4 * rec["loss"]


def test_teacher_reading_other_features_is_refused_before_any_work(small_toy, tmp_path, capsys):
    data, feats = small_toy
    torch.manual_seed(1)
    wrong = save_pretrained(create_model("duet-cpu", **{**TEACHER, "image_feat_size": 24}), tmp_path / "wrong")
    for cmd in ("pretrain", "finetune"):
        code = cli_main([cmd, "--out", str(tmp_path / cmd), "model=duet-cpu",
                         f"model_overrides={json.dumps(SMALL)}", f"data_dir={data}", f"features={feats}",
                         f"teacher={wrong}"])
        err = capsys.readouterr().err
        assert code == 2 and "view features 24-d (student 16-d)" in err, err
        assert not (tmp_path / cmd / "log.jsonl").exists()


def test_teacher_autocast_bf16_returns_fp32_close_to_fp32(one_thread):
    import pytest

    from minivln.training.trainer import teacher_autocast

    torch.manual_seed(0)
    teacher = create_model("duet-cpu", **TEACHER).eval()
    ids = torch.randint(1000, 2000, (2, 7))
    lang = {"txt_ids": ids, "txt_masks": torch.ones(2, 7, dtype=torch.bool)}
    with torch.no_grad():
        ref = teacher("language", lang)
        assert teacher_autocast(teacher, "fp32") is teacher and torch.equal(teacher("language", lang), ref)
        teacher_autocast(teacher, "bf16")
        out = teacher("language", lang)
    assert out.dtype == torch.float32  # the student and the losses get fp32 back
    assert not torch.equal(out, ref)  # it did run in bf16 ...
    assert torch.allclose(out, ref, atol=0.1, rtol=0.05)  # ... and stays close
    with pytest.raises(ValueError, match="teacher dtype"):
        teacher_autocast(teacher, "fp8")


def test_stage_loss_terms_follow_the_config():
    """``stage1_loss_terms`` / ``stage2_loss_terms`` (what pretraining, fine-tuning and ``bench train``
    build): a part or term weighted 0 is left out, the others weighted ``kd_weight`` x their weight, and
    the config's other settings reach the terms."""
    from minivln.training.finetune import FinetuneConfig, stage2_loss_terms
    from minivln.training.pretrain import PretrainConfig, stage1_loss_terms, stage1_weights

    student, teacher = create_model("minivln-cpu", **SMALL).config, create_model("duet-cpu", **TEACHER).config
    pre = PretrainConfig(kd_weight=2.0, kd_cross_attention=True, kd_embed_encoders=["text", "pano"])
    pre.kd_terms.att = 0.0
    pre.kd_terms.hid = 0.5
    assert stage1_weights(pre) == {"emb": 2.0, "att": 0.0, "hid": 1.0}
    terms = stage1_loss_terms(pre, student, teacher)
    assert [(t.name, t.weight) for t in terms] == [("kd_emb", 2.0), ("kd_hid", 1.0)]
    assert all(t.cross_attention and t.embed_encoders == ("text", "pano") for t in terms)

    ft = FinetuneConfig(kd_weight=0.1, kd_temperature=2.0)
    ft.kd_terms.pano = 0.0
    terms = stage2_loss_terms(ft, student, teacher)
    assert [t.name for t in terms] == ["kd_txt", "kd_fuse"]
    assert [round(t.weight, 6) for t in terms] == [0.1, 0.1]
    assert terms[-1].loss.temperature == 2.0
