"""Stage-2 distillation: the teacher in lock-step in the fine-tuning rollouts and the kd_txt /
kd_pano / kd_fuse loss terms.

Tiny teacher (hidden 32) and student (hidden 16), 2 heads each, no dropout, on the small toy world
with random 16-d view features (REVERIE: synthetic 16-d object features).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from minivln.data.datasets import load_episodes
from minivln.data.graph import Graphs
from minivln.data.reverie import ReverieGoals
from minivln.distill.stage2 import FuseKD, PanoKD, TextKD, stage2_terms
from minivln.env.env import NavBatchEnv
from minivln.features.hdf5 import FeatureStore
from minivln.model.config import DUETConfig
from minivln.model.duet import DUET
from minivln.training.agent import DUETAgent
from minivln.training.finetune import FinetuneTask
from minivln.training.logging import read_jsonl
from minivln.training.pretrain_data import SyntheticObjects
from minivln.training.trainer import TrainConfig, Trainer, freeze_teacher

COMMON = dict(num_attention_heads=2, image_feat_size=16, hidden_dropout=0.0, attention_dropout=0.0,
              feat_dropout=0.0)
TEACHER = DUETConfig(hidden_size=32, intermediate_size=64, num_l_layers=2, num_pano_layers=2,
                     num_x_layers=2, **COMMON)
STUDENT = DUETConfig(hidden_size=16, intermediate_size=32, num_l_layers=1, num_pano_layers=1,
                     num_x_layers=1, **COMMON)
KD_NAMES = ("kd_txt", "kd_pano", "kd_fuse")
MAX_STEPS = 8


def _model(cfg: DUETConfig, seed: int) -> DUET:
    torch.manual_seed(seed)
    return DUET(cfg)


def _env(small_toy, batch_size: int = 4, task: str = "r2r", **kw) -> NavBatchEnv:
    data, feats = small_toy
    return NavBatchEnv(load_episodes(task, "train", data), Graphs(data), batch_size=batch_size,
                       features=FeatureStore(feats), max_steps=MAX_STEPS, **kw)


def _task(small_toy, student: DUET, feedback: str = "sample", seed: int = 0) -> FinetuneTask:
    env = _env(small_toy, shuffle=True, seed=seed)
    agent = DUETAgent(student, max_action_len=MAX_STEPS, max_instr_len=40, features=env.features)
    return FinetuneTask(agent, env, 0.2, feedback=feedback, rank=0, world_size=1)


def _kd(terms, out) -> dict[str, torch.Tensor]:
    return {t.name: t(out.outputs, out.teacher_outputs, None) for t in terms}


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-row entropy of softmax over the finite logits (test oracle, independent of SoftTargetCE)."""
    p = torch.softmax(logits.double(), 1)
    return -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(1)


def test_teacher_copy_of_student_gives_zero_kd(small_toy, one_thread):
    """Teacher = a copy of the student, identity W_l/W_r: kd_txt and kd_pano ~0, the teacher's fused
    logits are the student's, so kd_fuse is the entropy of the student's distribution (a
    cross-entropy's minimum) with zero gradient; both reductions match a hand computation."""
    student = _model(STUDENT, 0)
    teacher = freeze_teacher(copy.deepcopy(student))
    task = _task(small_toy, student)
    batch = task.next_batch(0)
    torch.manual_seed(1)
    out = task.compute(student, batch, teacher)
    kd = _kd(stage2_terms(STUDENT, STUDENT, init="identity"), out)
    assert kd["kd_txt"] < 1e-10 and kd["kd_pano"] < 1e-10

    s_recs, t_recs = out.outputs["kd"], out.teacher_outputs["kd"]
    assert [r["rollout"] for r in s_recs] == ["teacher", "sample"] and [r["weight"] for r in s_recs] == [0.2, 1.0]
    action_sum, mean_sum, n_total, logits = 0.0, 0.0, 0, []
    for s, t, steps in zip(s_recs, t_recs, (out.outputs["teacher_steps"], out.outputs["sample_steps"])):
        assert len(s["fused_logits"]) == len(steps) > 1
        for z_s, z_t, active in zip(s["fused_logits"], t["fused_logits"], s["active"]):
            assert torch.equal(torch.isinf(z_s), torch.isinf(z_t))
            torch.testing.assert_close(z_t, z_s.detach(), rtol=1e-5, atol=1e-5)
            h = _entropy(z_s.detach())[active]
            action_sum += s["weight"] / s["batch_size"] * float(h.sum())
            mean_sum, n_total = mean_sum + float(h.sum()), n_total + int(active.sum())
            logits.append(z_s)
    assert math.isclose(float(kd["kd_fuse"].detach()), action_sum, rel_tol=1e-5) and action_sum > 1.0
    mean = FuseKD(reduction="mean")(out.outputs, out.teacher_outputs, None)
    assert math.isclose(float(mean.detach()), mean_sum / n_total, rel_tol=1e-5)
    grads = torch.autograd.grad(kd["kd_fuse"], logits)
    assert max(float(g.abs().max()) for g in grads) < 1e-6

    # controls: random projections; a teacher whose action head differs (only kd_fuse moves), then
    # whose panorama encoder differs too (kd_pano moves, the text does not)
    rand = _kd(stage2_terms(STUDENT, STUDENT), out)
    assert rand["kd_txt"] > 1e-3 and rand["kd_pano"] > 1e-3
    identity = stage2_terms(STUDENT, STUDENT, init="identity")
    with torch.no_grad():
        for p in teacher.global_sap_head.parameters():
            p.add_(torch.randn_like(p))
    out2 = task.compute(student, batch, teacher)
    kd2 = _kd(identity, out2)
    assert kd2["kd_txt"] < 1e-10 and kd2["kd_pano"] < 1e-10
    # cross-entropy = the teacher's entropy + KL(teacher || student)
    entropy = sum(s["weight"] / s["batch_size"] * float(_entropy(z)[a].sum())
                  for s, t in zip(out2.outputs["kd"], out2.teacher_outputs["kd"])
                  for z, a in zip(t["fused_logits"], s["active"]))
    assert float(kd2["kd_fuse"].detach()) > entropy + 1e-2
    with torch.no_grad():
        for p in teacher.img_embeddings.pano_encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    kd3 = _kd(identity, task.compute(student, batch, teacher))
    assert kd3["kd_txt"] < 1e-10 and kd3["kd_pano"] > 1e-4


def _check_lock_step(plain, with_t) -> None:
    """The student's rollout is bit-identical with and without a teacher, and the teacher saw its
    states: same slots, same current nodes, the node the student's action chose next."""
    assert torch.equal(plain.loss, with_t.loss) and plain.results == with_t.results
    assert plain.txt_embeds is None and all(s.teacher is None and s.pano_embeds is None for s in plain.steps)
    assert len(plain.steps) == len(with_t.steps)
    for a, b in zip(plain.steps, with_t.steps):
        assert torch.equal(a.fused_logits, b.fused_logits) and a.actions == b.actions and a.active == b.active
    steps = with_t.steps
    for k, s in enumerate(steps):
        t = s.teacher
        assert t.gmap_vpids == s.gmap_vpids and t.viewpoints == s.viewpoints and t.active == s.active
        assert torch.equal(t.pano_masks, s.pano_masks) and torch.equal(t.fused_logits.isinf(), s.fused_logits.isinf())
        assert not t.fused_logits.requires_grad and not t.pano_embeds.requires_grad
        assert t.pano_embeds.shape[:2] == s.pano_embeds.shape[:2] and t.pano_embeds.size(-1) == 32
        if k + 1 < len(steps):
            for i, a in enumerate(s.actions):
                if steps[k + 1].active[i]:  # still navigating: it stands where its action led
                    assert steps[k + 1].viewpoints[i] == s.gmap_vpids[i][a] == steps[k + 1].teacher.viewpoints[i]
    for i, r in enumerate(with_t.results):  # the visited nodes are the environment's trajectory
        traj = [p[0] for p in r["trajectory"]]
        visited = [s.viewpoints[i] for s in steps if s.active[i]]
        it = iter(traj)
        assert all(vp in it for vp in visited)
    assert with_t.teacher_txt_embeds.shape[:2] == with_t.txt_embeds.shape[:2]
    assert not with_t.teacher_txt_embeds.requires_grad


def test_teacher_visits_exactly_the_students_states(small_toy, one_thread):
    """R2R teacher-forced and sampled rollouts, and a REVERIE sampled rollout with object tokens (padded
    panoramas) and a teacher with another angle-feature size (its own panorama inputs)."""
    student, teacher = _model(STUDENT, 0), freeze_teacher(_model(TEACHER, 1))
    env = _env(small_toy)
    agent = DUETAgent(student, max_action_len=MAX_STEPS, max_instr_len=40, features=env.features)
    eps = load_episodes("r2r", "train", small_toy[0])[:4]
    for feedback in ("teacher", "sample"):
        runs = []
        for kd_teacher in (None, teacher):
            torch.manual_seed(0)
            runs.append(agent.rollout(env, eps, feedback, generator=torch.Generator().manual_seed(3),
                                      teacher=kd_teacher))
        _check_lock_step(*runs)
        assert len(runs[1].steps) > 2

    data, _ = small_toy
    graphs = Graphs(data)
    rev = dict(obj_feat_size=16)
    student_r = _model(STUDENT.replace(**rev), 0)
    teacher_r = freeze_teacher(_model(TEACHER.replace(angle_feat_size=8, **rev), 1))
    r_env = _env(small_toy, task="reverie", batch_size=3)
    r_agent = DUETAgent(student_r, max_action_len=MAX_STEPS, max_instr_len=40, features=r_env.features,
                        objects=SyntheticObjects(data, dim=16), goals=ReverieGoals(data, graphs), max_objects=5)
    r_eps = load_episodes("reverie", "train", data)[:3]
    runs = []
    for kd_teacher in (None, teacher_r):
        torch.manual_seed(0)
        runs.append(r_agent.rollout(r_env, r_eps, "sample", generator=torch.Generator().manual_seed(3),
                                    teacher=kd_teacher))
    _check_lock_step(*runs)
    assert not all(bool(s.pano_masks.all()) for s in runs[1].steps)  # object counts differ: padding
    assert all(s.teacher.obj_logits is not None for s in runs[1].steps)

    with pytest.raises(ValueError, match="objects"):
        r_agent.rollout(r_env, r_eps, "sample", teacher=teacher)  # a teacher without objects
    with pytest.raises(TypeError, match="DUET"):
        agent.rollout(env, eps, "teacher", teacher=torch.nn.Linear(2, 2))


def test_gradients_reach_student_and_projections_not_teacher(small_toy, one_thread):
    """Each term reaches its part of the student (kd_txt: the text encoder only; kd_pano: the
    panorama encoder, not the text; kd_fuse: the cross-modal encoders and heads) and its projection;
    no gradient reaches the teacher (not frozen here: the task runs it under no_grad itself)."""
    student, teacher = _model(STUDENT, 0), _model(TEACHER, 1).eval()
    task = _task(small_toy, student)
    batch = task.next_batch(0)
    torch.manual_seed(1)
    out = task.compute(student, batch, teacher)
    assert "kd" not in task.compute(student, batch).outputs  # nothing recorded without a teacher
    for rec in out.teacher_outputs["kd"]:  # the teacher ran under no_grad
        assert not rec["text"].requires_grad
        assert not any(x.requires_grad for x in rec["pano"] + rec["fused_logits"])
    txt, pano, fuse = stage2_terms(STUDENT, TEACHER)
    groups = {"text": student.lang_encoder, "pano": student.img_embeddings.pano_encoder,
              "global": student.global_encoder, "local": student.local_encoder, "head": student.global_sap_head}
    reached = {}
    for term, expect in ((txt, {"text"}), (pano, {"pano"}), (fuse, {"text", "pano", "global", "local", "head"})):
        student.zero_grad(set_to_none=True)
        value = term(out.outputs, out.teacher_outputs, batch)
        assert torch.isfinite(value) and float(value.detach()) > 0
        (term.weight * value).backward(retain_graph=True)
        reached[term.name] = {g for g, m in groups.items()
                              if any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in m.parameters())}
        assert reached[term.name] == expect, (term.name, reached[term.name])
    for term in (txt, pano):
        assert float(term.loss.proj.weight.grad.abs().sum()) > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_trainer_with_teacher_and_stage2_terms(small_toy, one_thread, tmp_path):
    """Trainer steps with a teacher and the three terms: logged as loss/kd_*, W_l/W_r trained and
    checkpointed, the teacher unchanged, and the KD loss on a fixed teacher-forced batch falls."""
    student, teacher = _model(STUDENT, 0), _model(TEACHER, 1)
    teacher_state = copy.deepcopy(teacher.state_dict())
    terms = stage2_terms(STUDENT, TEACHER, kd_weight=1.0)
    probe = _task(small_toy, student, feedback="teacher", seed=5)
    probe_batch = probe.next_batch(0)

    def probe_kd() -> float:
        with torch.no_grad():
            out = probe.compute(student, probe_batch, teacher)
            return sum(float(v) for v in _kd(terms, out).values())

    freeze_teacher(teacher)
    before = probe_kd()
    w_l = terms[0].loss.proj.weight.detach().clone()
    cfg = TrainConfig(run_dir=str(tmp_path / "run"), max_steps=10, log_every=1, ckpt_every=0, device="cpu",
                      progress=False)
    cfg.optim.lr, cfg.optim.schedule = 3e-3, "constant"
    trainer = Trainer(student, _task(small_toy, student), cfg, teacher=teacher, loss_terms=terms)
    try:
        trainer.fit()
    finally:
        trainer.close()
    after = probe_kd()
    assert after < 0.8 * before, (before, after)
    logs = [r for r in read_jsonl(tmp_path / "run" / "log.jsonl") if r.get("kind") == "train"]
    assert len(logs) == 10
    for r in logs:
        assert all(math.isfinite(r[f"loss/{k}"]) and r[f"loss/{k}"] > 0 for k in KD_NAMES)
        assert math.isclose(r["loss"], r["loss/task"] + sum(r[f"loss/{k}"] for k in KD_NAMES), rel_tol=1e-4)
    assert not torch.equal(terms[0].loss.proj.weight.detach(), w_l)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_state[k]), k
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run" / "latest" / "loss_terms.safetensors"))
    assert {"kd_txt.loss.proj.weight", "kd_pano.loss.proj.weight"} <= set(saved)


def _synthetic_records(seed: int = 0):
    """Two rollouts of hand-made records (widths 4): rollout 0 (weight 0.2, 2 samples, 2 steps),
    rollout 1 (weight 1, 3 samples, 1 step); padded tokens, ended samples and -inf slots hold garbage.
    Returns (outputs, teacher_outputs, oracle) with the oracle's per-(rollout, step) sums."""
    g = torch.Generator().manual_seed(seed)
    garbage = 1e3
    s_recs, t_recs, oracle = [], [], []
    for weight, bsz, actives in ((0.2, 2, ([True, True], [True, False])), (1.0, 3, ([False, True, True],))):
        txt_masks = torch.ones(bsz, 5, dtype=torch.bool)
        txt_masks[0, 3:] = False
        t_txt = torch.randn(bsz, 5, 4, generator=g)
        s_txt = t_txt + 0.1 * torch.randn(bsz, 5, 4, generator=g)
        s_txt[~txt_masks] = garbage
        txt_sq = ((s_txt - t_txt)[txt_masks] ** 2)
        rec = {"rollout": "r", "weight": weight, "batch_size": bsz, "text": s_txt, "text_masks": txt_masks,
               "pano": [], "pano_masks": [], "fused_logits": [], "active": []}
        trec = {"text": t_txt, "text_masks": txt_masks, "pano": [], "pano_masks": [], "fused_logits": []}
        steps = []
        for active in actives:
            active = torch.tensor(active)
            masks = torch.ones(bsz, 3, dtype=torch.bool)
            masks[-1, 2] = False
            t_pano = torch.randn(bsz, 3, 4, generator=g)
            s_pano = t_pano + 0.1 * torch.randn(bsz, 3, 4, generator=g)
            s_pano[~masks] = garbage
            s_pano[~active] = garbage
            sel = masks & active[:, None]
            z_t = torch.randn(bsz, 4, generator=g)
            z_s = torch.randn(bsz, 4, generator=g)
            z_t[:, 3] = z_s[:, 3] = float("-inf")
            z_s[~active, 0] = garbage
            ce = []
            for i in range(bsz):
                if active[i]:
                    p_t = torch.softmax(z_t[i, :3].double(), 0)
                    ce.append(float(-(p_t * torch.log_softmax(z_s[i, :3].double(), 0)).sum()))
            steps.append({"n": int(active.sum()), "pano": float(((s_pano - t_pano)[sel] ** 2).mean()),
                          "fuse": sum(ce) / len(ce)})
            rec["pano"].append(s_pano)
            rec["pano_masks"].append(masks)
            rec["fused_logits"].append(z_s)
            rec["active"].append(active)
            trec["pano"].append(t_pano)
            trec["pano_masks"].append(masks)
            trec["fused_logits"].append(z_t)
        s_recs.append(rec)
        t_recs.append(trec)
        oracle.append({"weight": weight, "bsz": bsz, "text": float(txt_sq.mean()), "steps": steps})
    return {"kd": s_recs}, {"kd": t_recs}, oracle


def test_reductions_on_synthetic_records():
    """Both reductions against a hand computation: padded tokens, ended samples and -inf slots never
    enter; 'action' = sum_r w_r sum_t (n_rt / B_r) m_rt (text: sum_r w_r m_r), 'mean' = sum n m / sum n."""
    cfg = DUETConfig(hidden_size=4, num_attention_heads=2, intermediate_size=8)
    outputs, teacher_outputs, oracle = _synthetic_records()
    expect = {
        "action": {
            "kd_txt": sum(r["weight"] * r["text"] for r in oracle),
            "kd_pano": sum(r["weight"] * s["n"] / r["bsz"] * s["pano"] for r in oracle for s in r["steps"]),
            "kd_fuse": sum(r["weight"] * s["n"] / r["bsz"] * s["fuse"] for r in oracle for s in r["steps"]),
        },
        "mean": {
            "kd_txt": sum(r["bsz"] * r["text"] for r in oracle) / sum(r["bsz"] for r in oracle),
            "kd_pano": sum(s["n"] * s["pano"] for r in oracle for s in r["steps"])
            / sum(s["n"] for r in oracle for s in r["steps"]),
            "kd_fuse": sum(s["n"] * s["fuse"] for r in oracle for s in r["steps"])
            / sum(s["n"] for r in oracle for s in r["steps"]),
        },
    }
    for reduction, values in expect.items():
        terms = stage2_terms(cfg, cfg, kd_weight=0.5, reduction=reduction, init="identity")
        assert [t.weight for t in terms] == [0.5] * 3
        for term in terms:
            got = float(term(outputs, teacher_outputs, None).detach())
            assert math.isclose(got, values[term.name], rel_tol=1e-5), (reduction, term.name, got, values[term.name])
            assert 0 < got < 10  # no garbage
    # temperature: the targets and the student's distribution are both softened
    hot = FuseKD(temperature=2.0)(outputs, teacher_outputs, None)
    halved = copy.deepcopy(outputs), copy.deepcopy(teacher_outputs)
    for recs in (halved[0]["kd"], halved[1]["kd"]):
        for rec in recs:
            rec["fused_logits"] = [z / 2 for z in rec["fused_logits"]]
    assert math.isclose(float(hot), float(FuseKD()(*halved, None)), rel_tol=1e-6)


def test_clear_errors(small_toy, one_thread):
    student = _model(STUDENT, 0)
    task = _task(small_toy, student, feedback="teacher")
    out = task.compute(student, task.next_batch(0))  # no teacher: no records
    assert out.teacher_outputs is None
    for term in stage2_terms(STUDENT, TEACHER):
        with pytest.raises(ValueError, match="teacher"):
            term(out.outputs, out.teacher_outputs, None)
    with pytest.raises(ValueError, match="reduction"):
        FuseKD(reduction="sum")
    with pytest.raises(ValueError, match="init"):
        TextKD(STUDENT, TEACHER, init="eye")
    with pytest.raises(ValueError, match="init"):
        PanoKD(STUDENT, TEACHER, init="eye")
    with pytest.raises(TypeError, match="DUET"):
        task.compute(student, task.next_batch(1), torch.nn.Linear(2, 2))


@pytest.mark.parametrize("task_name", ["r2r", "reverie"])
def test_merged_rollouts_equal_two_rollouts(small_toy, one_thread, task_name):
    """DAgger's two rollouts run as one batch (merge_rollouts) give the same losses, metrics, actions,
    trajectories, stage-2 terms and gradients as two rollouts (eval mode: no dropout; the same
    sampling draws from the same seed)."""
    data, _ = small_toy
    objects = task_name == "reverie"
    s_cfg = STUDENT.replace(obj_feat_size=16 if objects else 0)
    t_cfg = TEACHER.replace(obj_feat_size=16 if objects else 0)
    results = []
    for merge in (False, True):
        student, teacher = _model(s_cfg, 0).eval(), freeze_teacher(_model(t_cfg, 1))
        env = _env(small_toy, task=task_name, shuffle=True, seed=3)
        agent = DUETAgent(student, max_action_len=MAX_STEPS, max_instr_len=40, features=env.features,
                          objects=SyntheticObjects(data, dim=16) if objects else None,
                          goals=ReverieGoals(data) if objects else None, max_objects=5)
        task = FinetuneTask(agent, env, 0.2, rank=0, world_size=1, merge=merge)
        terms = stage2_terms(s_cfg, t_cfg, kd_weight=0.5, init="identity")
        torch.manual_seed(7)
        out = task.compute(student, task.next_batch(0), teacher)
        kd = {t.name: t(out.outputs, out.teacher_outputs, None) for t in terms}
        (out.loss + sum(kd.values())).backward()
        grads = {k: p.grad.clone() for k, p in student.named_parameters() if p.grad is not None}
        actions = [[s.actions for s in out.outputs[f"{h}_steps"]] for h in ("teacher", "sample")]
        results.append((out, kd, grads, actions))
    with pytest.raises(ValueError, match="both halves"):
        task.agent.rollout_pair(task.env, [], task.next_batch(1)["sample"])
    (a, kd_a, g_a, act_a), (b, kd_b, g_b, act_b) = results
    assert act_a == act_b and len(act_b[1]) > 1
    torch.testing.assert_close(a.loss, b.loss)
    assert set(a.metrics) == set(b.metrics)
    for k, v in a.metrics.items():
        torch.testing.assert_close(torch.as_tensor(b.metrics[k], dtype=torch.float64),
                                   torch.as_tensor(v, dtype=torch.float64), msg=k)
    for k in KD_NAMES:
        torch.testing.assert_close(kd_b[k], kd_a[k], msg=k)
    assert g_a.keys() == g_b.keys()
    for k in g_a:
        torch.testing.assert_close(g_b[k], g_a[k], atol=1e-5, rtol=1e-4, msg=k)
