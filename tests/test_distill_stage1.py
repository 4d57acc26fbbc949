"""Stage-1 distillation: teacher taps in the pretraining task and the Stage1KD loss term.

Tiny teacher (hidden 32, layers 9/2/4) and student (hidden 16, layers 3/1/2), both with 2 heads, on
the small toy world with synthetic 16-d features.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from minivln.data.datasets import load_episodes
from minivln.data.graph import Graphs
from minivln.data.reverie import ReverieGoals
from minivln.data.tokenizer import get_tokenizer
from minivln.distill.losses import layer_map
from minivln.distill.stage1 import ENCODERS, Stage1KD, stage1_terms
from minivln.model.config import DUETConfig
from minivln.model.duet import DUET
from minivln.model.pretrain_heads import DUETPretrainer
from minivln.training.pretrain import PretrainTask, collect_taps
from minivln.training.pretrain_data import (
    PrefixDataset,
    SyntheticFeatures,
    SyntheticObjects,
    collate_states,
)
from minivln.training.trainer import TrainConfig, Trainer

COMMON = dict(num_attention_heads=2, image_feat_size=16, hidden_dropout=0.0, attention_dropout=0.0,
              feat_dropout=0.0)
TEACHER = DUETConfig(hidden_size=32, intermediate_size=64, num_l_layers=9, num_pano_layers=2,
                     num_x_layers=4, **COMMON)
STUDENT = DUETConfig(hidden_size=16, intermediate_size=32, num_l_layers=3, num_pano_layers=1,
                     num_x_layers=2, **COMMON)
#: every component of the full stage-1 loss
ALL_KEYS = ({f"embeddings/{e}" for e in ENCODERS} | {f"attentions/{e}" for e in ENCODERS}
            | {f"hidden/{e}" for e in ENCODERS} | {"cross_attentions/global", "cross_attentions/local"})
FULL = {"cross_attention": True, "embed_encoders": ENCODERS}  # every option on: ALL_KEYS
PAPER_KEYS = ({"embeddings/text"} | {f"attentions/{e}" for e in ENCODERS}  # the defaults (Eq. 5, E = text)
              | {f"hidden/{e}" for e in ENCODERS})


@pytest.fixture(scope="module")
def ds(small_toy) -> PrefixDataset:
    root, _ = small_toy
    return PrefixDataset(load_episodes("r2r", "train", root), Graphs(root),
                         SyntheticFeatures(dim=16, num_classes=10), get_tokenizer().encode,
                         max_instr_len=40, with_classes=True)


@pytest.fixture(scope="module")
def reverie_ds(small_toy) -> PrefixDataset:
    """REVERIE with object tokens: unlike the toy R2R panoramas (always 36 views), the number of
    objects varies, so the panorama and viewpoint tokens are padded."""
    root, _ = small_toy
    graphs = Graphs(root)
    return PrefixDataset(load_episodes("reverie", "train", root), graphs,
                         SyntheticFeatures(dim=16, num_classes=10), get_tokenizer().encode,
                         max_instr_len=40, objects=SyntheticObjects(root, dim=16),
                         goals=ReverieGoals(root, graphs).episode_goals)


def _pretrainer(cfg: DUETConfig, seed: int) -> DUETPretrainer:
    torch.manual_seed(seed)
    return DUETPretrainer(DUET(cfg), num_classes=10)


def _task(ds: PrefixDataset, batch_size: int = 4) -> PretrainTask:
    return PretrainTask(ds, batch_size, {"mlm": 1, "sap": 1, "mrc": 1}, seed=0, rank=0, world_size=1)


def _batch(task: PretrainTask, name: str, seed: int = 0) -> dict:
    return task.make_batch(name, task.episodes_of(0), np.random.default_rng(seed))


def test_teacher_copy_of_student_gives_zero_kd_on_every_task(ds, one_thread):
    """Teacher = the student's own DUET, identity projections: every component is ~0, on every task;
    a real projection or a changed teacher layer makes the matching components > 0."""
    student = _pretrainer(STUDENT, 0).eval()
    teacher = copy.deepcopy(student.duet)  # a bare DUET is accepted as the teacher
    term = Stage1KD(STUDENT, STUDENT, init="identity", **FULL)
    task = _task(ds)
    torch.set_grad_enabled(False)  # the student path needs no graph here
    try:
        for name in ("mlm", "sap", "mrc"):
            out = task.compute(student, _batch(task, name), teacher)
            comps = term.components(out.outputs, out.teacher_outputs)
            assert set(comps) == ALL_KEYS
            assert all(float(v) < 1e-9 for v in comps.values()), {k: float(v) for k, v in comps.items()}
        # the test can fail: a non-identity W_e / W_h gives a clearly non-zero loss
        assert float(Stage1KD(STUDENT, STUDENT)(out.outputs, out.teacher_outputs)) > 1e-3
        # change teacher text layer 2 only: text attentions/hidden states differ, the embeddings not
        layer = teacher.lang_encoder.layer[1]
        layer.attention.self.query.weight.mul_(3.0)
        layer.output.dense.bias.add_(torch.randn(16, generator=torch.Generator().manual_seed(0)))
        out = task.compute(student, _batch(task, "sap"), teacher)
        comps = term.components(out.outputs, out.teacher_outputs)
    finally:
        torch.set_grad_enabled(True)
    assert float(comps["attentions/text"]) > 1e-6 and float(comps["hidden/text"]) > 1e-3
    assert float(comps["embeddings/text"]) < 1e-9 and float(comps["embeddings/pano"]) < 1e-9


def test_real_pair_gradients_reach_student_and_projections_not_teacher(ds, one_thread):
    student = _pretrainer(STUDENT, 0).eval()
    teacher = _pretrainer(TEACHER, 1).eval()  # a DUETPretrainer teacher, deliberately NOT frozen
    term = Stage1KD(STUDENT, TEACHER, **FULL)
    task = _task(ds)
    batch = _batch(task, "mlm")
    plain = task.compute(student, batch)
    assert plain.outputs == {} and plain.teacher_outputs is None  # no teacher: no taps
    out = task.compute(student, batch, teacher)
    assert torch.allclose(out.loss, plain.loss, rtol=1e-5, atol=1e-6)  # the task loss is unchanged
    s_taps, t_taps = out.outputs["taps"], out.teacher_outputs["taps"]
    assert len(s_taps["text.attentions"]) == 3 and len(t_taps["text.attentions"]) == 9
    assert t_taps["global.hidden_states"][0].shape[-1] == 32 and s_taps["global.hidden_states"][0].shape[-1] == 16
    assert not any(v.requires_grad for v in t_taps["text.hidden_states"])
    comps = term.components(out.outputs, out.teacher_outputs)
    assert set(comps) == ALL_KEYS
    # the paper's defaults: self-attention only, the instruction's embeddings only
    assert set(Stage1KD(STUDENT, TEACHER).components(out.outputs, out.teacher_outputs)) == PAPER_KEYS
    assert all(math.isfinite(float(v.detach())) and float(v.detach()) > 0 for v in comps.values())
    kd = term(out.outputs, out.teacher_outputs, batch)
    assert torch.allclose(kd, sum(comps.values()))
    kd.backward()
    d = student.duet
    for name, p in [
        ("word embeddings", d.embeddings.word_embeddings.weight),
        ("text layer 1", d.lang_encoder.layer[0].attention.self.query.weight),
        ("pano layer 1", d.img_embeddings.pano_encoder.layers[0].self_attn.in_proj_weight),
        ("global self-att", d.global_encoder.encoder.x_layers[0].visn_self_att.self.query.weight),
        ("global cross-att", d.global_encoder.encoder.x_layers[0].visual_attention.att.query.weight),
        ("local last layer", d.local_encoder.encoder.x_layers[-1].visn_output.dense.weight),
        ("W_e", term.embed_loss.proj.weight),
        ("W_h", term.hidden_loss.proj.weight),
    ]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.requires_grad for p in teacher.parameters())
    assert all(p.grad is None for p in teacher.parameters())


@torch.no_grad()
def test_layer_map_padding_and_parts_on_synthetic_taps():
    """Only the mapped teacher layers and the real tokens / pairs count."""
    width = 8
    s_cfg = STUDENT.replace(hidden_size=width, intermediate_size=16)
    t_cfg = TEACHER.replace(hidden_size=width, intermediate_size=16)
    gen = torch.Generator().manual_seed(0)
    sizes = {"text": (2, 5), "pano": (3, 6), "global": (2, 4), "local": (2, 7)}
    masks = {e: torch.rand(*sz, generator=gen) > 0.3 for e, sz in sizes.items()}
    for m in masks.values():
        m[:, 0] = True
        m[0, -1] = False  # some padding everywhere
    s_taps, t_taps = {}, {}
    for enc, (b, n) in sizes.items():
        s_taps[f"{enc}.masks"] = t_taps[f"{enc}.masks"] = masks[enc]
        emb = torch.randn(b, n, width, generator=gen)
        s_taps[f"{enc}.embeddings"], t_taps[f"{enc}.embeddings"] = emb, emb.clone()
        keys = ["attentions", "hidden_states"] + (["cross_attentions"] if enc in ("global", "local") else [])
        n_s, n_t = (s_cfg.num_l_layers, t_cfg.num_l_layers) if enc == "text" else \
            (s_cfg.num_pano_layers, t_cfg.num_pano_layers) if enc == "pano" else \
            (s_cfg.num_x_layers, t_cfg.num_x_layers)
        for key in keys:
            k = sizes["text"][1] if key == "cross_attentions" else n
            shape = (b, 2, n, k) if key.endswith("attentions") else (b, n, width)
            s_list = [torch.randn(*shape, generator=gen) for _ in range(n_s)]
            t_list = [torch.randn(*shape, generator=gen) for _ in range(n_t)]  # unmapped: random
            for m, h in enumerate(layer_map(n_s, n_t)):
                t_list[h - 1] = s_list[m].clone()
            s_taps[f"{enc}.{key}"], t_taps[f"{enc}.{key}"] = s_list, t_list
    term = Stage1KD(s_cfg, t_cfg, init="identity", **FULL)
    assert float(term({"taps": s_taps}, {"taps": t_taps})) == 0.0
    # garbage at padded tokens / pairs of the teacher changes nothing
    for enc in ENCODERS:
        pad = ~masks[enc]
        t_taps[f"{enc}.embeddings"][pad] = 1e3
        for h in t_taps[f"{enc}.hidden_states"]:
            h[pad] = -1e3
        for a in t_taps[f"{enc}.attentions"]:
            a.masked_fill_(pad[:, None, None, :], -1e4)
            a.masked_fill_(pad[:, None, :, None], 5.0)
    assert float(term({"taps": s_taps}, {"taps": t_taps})) == 0.0
    # a mapped teacher layer differing in a real position is seen; an unmapped one is not
    t_taps["text.hidden_states"][0][0, 0] += 1.0  # teacher layer 1: not mapped (3, 6, 9)
    assert float(term({"taps": s_taps}, {"taps": t_taps})) == 0.0
    t_taps["text.hidden_states"][2][0, 0] += 1.0  # teacher layer 3 <- student layer 1
    comps = term.components({"taps": s_taps}, {"taps": t_taps})
    assert float(comps["hidden/text"]) > 0 and sum(float(v) for k, v in comps.items() if k != "hidden/text") == 0
    t_taps["global.cross_attentions"][3][0, 0, 0, 0] += 1.0  # teacher layer 4 <- student layer 2
    assert float(term.components({"taps": s_taps}, {"taps": t_taps})["cross_attentions/global"]) > 0
    assert "cross_attentions/global" not in Stage1KD(s_cfg, t_cfg, cross_attention=False).components(
        {"taps": s_taps}, {"taps": t_taps})
    # parts: only the chosen components and projections
    only_att = Stage1KD(s_cfg, t_cfg, parts=("attentions",), cross_attention=True)
    assert only_att.embed_loss is None and only_att.hidden_loss is None
    assert {k.split("/")[0] for k in only_att.components({"taps": s_taps}, {"taps": t_taps})} == {
        "attentions", "cross_attentions"}
    assert not list(only_att.parameters())


def test_clear_errors():
    with pytest.raises(ValueError, match="heads"):
        Stage1KD(STUDENT.replace(num_attention_heads=4), TEACHER)
    Stage1KD(STUDENT.replace(num_attention_heads=4), TEACHER, parts=("embeddings", "hidden"))  # fine
    with pytest.raises(ValueError, match="text encoder: a 2-layer student .* 9-layer teacher"):
        Stage1KD(STUDENT.replace(num_l_layers=2), TEACHER)
    with pytest.raises(ValueError, match="global encoder"):
        Stage1KD(STUDENT.replace(num_x_layers=3), TEACHER)
    with pytest.raises(ValueError, match="pano encoder"):
        Stage1KD(STUDENT.replace(num_pano_layers=0), TEACHER)
    Stage1KD(STUDENT.replace(num_l_layers=2), TEACHER, parts=("embeddings",))  # no layers mapped
    with pytest.raises(ValueError, match="parts"):
        Stage1KD(STUDENT, TEACHER, parts=("logits",))
    with pytest.raises(ValueError, match="init"):
        Stage1KD(STUDENT, TEACHER, init="eye")
    term = Stage1KD(STUDENT, TEACHER)
    with pytest.raises(ValueError, match="teacher"):
        term({"taps": {}}, None)
    with pytest.raises(ValueError, match="student"):
        term({}, {"taps": {}})
    with pytest.raises(ValueError, match="text.masks"):
        term({"taps": {"x": 1}}, {"taps": {}})
    with pytest.raises(TypeError, match="DUET or a DUETPretrainer"):
        collect_taps(torch.nn.Linear(2, 2), {})


def test_padding_never_enters_the_loss(reverie_ds, one_thread):
    """Garbage in every padded input position (text, panorama views/objects, map, viewpoint) changes
    the padded taps but not the loss (REVERIE SAP and OG batches, object tokens)."""
    s_cfg, t_cfg = STUDENT.replace(obj_feat_size=16), TEACHER.replace(obj_feat_size=16)
    student = _pretrainer(s_cfg, 0).eval()
    teacher = _pretrainer(t_cfg, 1).eval()
    term = Stage1KD(s_cfg, t_cfg, **FULL)
    task = PretrainTask(reverie_ds, 3, {"sap": 1, "og": 1}, rank=0, world_size=1)
    # different instruction lengths, map sizes and object counts (hence padding in every encoder)
    states = [reverie_ds.state(0, 3), reverie_ds.state(3, 0), reverie_ds.state(5, 4)]
    for name in ("sap", "og"):
        batch = collate_states(states)
        batch["task"] = name
        out = task.compute(student, batch, teacher)
        masks = {e: out.outputs["taps"][f"{e}.masks"] for e in ENCODERS}
        assert all(bool((~m).any()) for m in masks.values()), "every encoder needs padding for this test"
        loss = float(term(out.outputs, out.teacher_outputs).detach())

        gen = torch.Generator().manual_seed(1)

        def garbage(x: torch.Tensor, where: torch.Tensor, scale: float = 10.0) -> None:
            x[where] = scale * torch.randn(int(where.sum()), *x.shape[where.dim():], generator=gen)

        bad = copy.deepcopy(batch)
        pad_txt = ~bad["txt_masks"]
        bad["txt_ids"][pad_txt] = torch.randint(1000, 2000, (int(pad_txt.sum()),), generator=gen)
        pano = bad["pano"]
        for fts, lens in (("view_img_fts", "view_lens"), ("obj_img_fts", "obj_lens")):
            n = pano[fts].size(1)
            garbage(pano[fts], torch.arange(n)[None, :] >= pano[lens][:, None])
        garbage(pano["loc_fts"], ~masks["pano"])
        # (nav_types stay: they define which local tokens may be chosen, i.e. they are masks too)
        pad_g = ~bad["gmap_masks"]
        garbage(bad["gmap_pos_fts"], pad_g)
        bad["gmap_step_ids"][pad_g] = 7
        pair_pad = pad_g[:, :, None] | pad_g[:, None, :]
        bad["gmap_pair_dists"][pair_pad] = 10 * torch.rand(int(pair_pad.sum()), generator=gen)
        garbage(bad["vp_pos_fts"], ~masks["local"])
        out_bad = task.compute(student, bad, teacher)
        # the perturbation reaches the padded positions of every encoder ...
        for enc in ENCODERS:
            for taps in (out, out_bad):
                assert torch.equal(taps.outputs["taps"][f"{enc}.masks"], masks[enc])
            h0 = out.outputs["taps"][f"{enc}.hidden_states"][-1]
            h1 = out_bad.outputs["taps"][f"{enc}.hidden_states"][-1]
            assert not torch.allclose(h0[~masks[enc]], h1[~masks[enc]]), enc
            assert torch.allclose(h0[masks[enc]], h1[masks[enc]], atol=1e-5), enc
        # ... but not the loss
        assert float(term(out_bad.outputs, out_bad.teacher_outputs).detach()) == pytest.approx(loss, rel=1e-5)
        assert torch.allclose(out_bad.loss, out.loss, rtol=1e-5)


def test_trainer_with_teacher_and_stage1_terms_decreases_kd(ds, tmp_path, one_thread):
    student = _pretrainer(STUDENT, 0)
    teacher = _pretrainer(TEACHER, 1).eval()
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    terms = stage1_terms(STUDENT, TEACHER)
    assert [t.name for t in terms] == ["kd_emb", "kd_att", "kd_hid"]
    task = _task(ds)
    fixed = {name: _batch(task, name, seed=5) for name in ("mlm", "sap", "mrc")}

    def kd_on_fixed() -> float:
        student.eval()
        with torch.no_grad():
            total = 0.0
            for batch in fixed.values():
                out = task.compute(student, batch, teacher)
                total += sum(float(t(out.outputs, out.teacher_outputs)) for t in terms)
        return total

    before = kd_on_fixed()
    cfg = TrainConfig(run_dir=str(tmp_path / "run"), max_steps=12, log_every=1, ckpt_every=0,
                      progress=False, device="cpu")
    cfg.optim.lr, cfg.optim.schedule = 3e-3, "constant"
    trainer = Trainer(student, task, cfg, teacher=teacher, loss_terms=terms)
    try:
        trainer.fit()
    finally:
        trainer.close()
    after = kd_on_fixed()
    assert after < 0.8 * before, (before, after)  # measured: 58.8 -> 29.1
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("kind") == "train"]
    assert len(train) == 12
    assert all({"loss/kd_emb", "loss/kd_att", "loss/kd_hid", "loss/task"} <= set(r) for r in train)
    assert all(math.isfinite(r["loss"]) for r in train)
    kd = [sum(r[f"loss/kd_{p}"] for p in ("emb", "att", "hid")) for r in train]
    assert sum(kd[-3:]) < sum(kd[:3]), kd
    assert all(torch.equal(teacher_state[k], v) for k, v in teacher.state_dict().items())  # frozen
