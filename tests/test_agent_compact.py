"""Compaction: the agent runs the network on the samples still navigating only (``DUETAgent(compact=True)``,
the default). Against the full batch (``compact=False``, the reference's way) every rollout must give
the same actions, trajectories, losses, stage-2 terms and gradients, in every feedback, R2R and REVERIE,
with and without a stage-2 teacher (one whose angle features differ, so it builds its own panoramas).
"""

from __future__ import annotations

import pytest
import torch

from minivln.data.datasets import load_episodes
from minivln.data.graph import Graphs
from minivln.data.reverie import ReverieGoals
from minivln.distill.stage2 import stage2_terms
from minivln.env.env import NavBatchEnv
from minivln.features.hdf5 import FeatureStore
from minivln.model.config import DUETConfig
from minivln.model.duet import DUET
from minivln.training.agent import DUETAgent
from minivln.training.finetune import kd_records
from minivln.training.pretrain_data import SyntheticObjects
from minivln.training.trainer import freeze_teacher

COMMON = dict(num_attention_heads=2, image_feat_size=16, hidden_dropout=0.0, attention_dropout=0.0,
              feat_dropout=0.0)
STUDENT = DUETConfig(hidden_size=16, intermediate_size=32, num_l_layers=1, num_pano_layers=1, num_x_layers=1,
                     **COMMON)
TEACHER = DUETConfig(hidden_size=32, intermediate_size=64, num_l_layers=2, num_pano_layers=1, num_x_layers=2,
                     angle_feat_size=8, **COMMON)
MAX_STEPS = 8


def _run(small_toy, task: str, feedback: str, compact: bool, with_teacher: bool):
    data, feats = small_toy
    objects = task == "reverie"
    extra = {"obj_feat_size": 16} if objects else {}
    torch.manual_seed(0)
    student = DUET(STUDENT.replace(**extra)).eval()
    teacher = None
    if with_teacher:
        torch.manual_seed(1)
        teacher = freeze_teacher(DUET(TEACHER.replace(**extra)))
    graphs = Graphs(data)
    distinct = {}  # one instruction per path (several instructions share one): no two rows alike
    for split in ("train", "val_seen", "val_unseen"):
        for ep in load_episodes(task, split, data):
            distinct.setdefault((ep.scan, tuple(ep.path)), ep)
    episodes = list(distinct.values())[:6]
    env = NavBatchEnv(episodes, graphs, batch_size=6, features=FeatureStore(feats), max_steps=MAX_STEPS)
    agent = DUETAgent(student, max_action_len=MAX_STEPS, max_instr_len=40, features=env.features,
                      objects=SyntheticObjects(data, dim=16) if objects else None,
                      goals=ReverieGoals(data, graphs) if objects else None, compact=compact)
    torch.manual_seed(5)
    grad = torch.enable_grad() if feedback in ("teacher", "sample") else torch.no_grad()
    with grad:
        out = agent.rollout(env, episodes, feedback, generator=torch.Generator().manual_seed(3), teacher=teacher)
    total, kd = out.loss, {}
    if with_teacher and feedback in ("teacher", "sample"):
        s_rec, t_rec = kd_records(out, feedback, 1.0)
        for term in stage2_terms(student.config, teacher.config, kd_weight=1.0, init="identity"):
            kd[term.name] = term({"kd": [s_rec]}, {"kd": [t_rec]}, None)
        total = total + sum(kd.values())
    grads = {}
    if total.requires_grad:
        total.backward()
        grads = {k: p.grad.clone() for k, p in student.named_parameters() if p.grad is not None}
    return out, kd, grads


@pytest.mark.parametrize("task", ["r2r", "reverie"])
@pytest.mark.parametrize("feedback", ["teacher", "sample", "argmax"])
def test_compacted_rollouts_equal_full_batches(small_toy, one_thread, task, feedback):
    with_teacher = feedback != "argmax"
    (full, kd_full, g_full), (comp, kd_comp, g_comp) = (
        _run(small_toy, task, feedback, compact, with_teacher) for compact in (False, True))
    ended_early = any(not all(s.active) for s in full.steps)
    assert ended_early  # else compaction was never exercised
    assert [s.active for s in comp.steps] == [s.active for s in full.steps]

    def moves(steps):  # an ended sample's action is never used
        return [[a if on else None for a, on in zip(s.actions, s.active)] for s in steps]

    assert moves(comp.steps) == moves(full.steps)
    assert comp.results == full.results
    torch.testing.assert_close(comp.loss, full.loss)
    assert comp.metrics == pytest.approx(full.metrics)
    for s_c, s_f in zip(comp.steps, full.steps):
        rows = torch.tensor(s_f.active)
        torch.testing.assert_close(s_c.fused_logits[rows], s_f.fused_logits[rows][:, :s_c.fused_logits.size(1)])
        assert torch.isfinite(s_c.fused_logits).any(1).all()  # no row without an allowed action
        assert torch.equal(s_c.labels, s_f.labels)
        if s_f.obj_labels is not None:
            assert torch.equal(s_c.obj_labels, s_f.obj_labels)
    if task == "reverie" and feedback == "teacher":  # object labels where the batch was compacted
        assert any((s.obj_labels != -100).any() and not all(s.active) for s in full.steps)
    assert kd_full.keys() == kd_comp.keys() == ({"kd_txt", "kd_pano", "kd_fuse"} if with_teacher else set())
    for k in kd_full:
        torch.testing.assert_close(kd_comp[k], kd_full[k], msg=k)
    assert g_full.keys() == g_comp.keys()
    for k in g_full:
        torch.testing.assert_close(g_comp[k], g_full[k], atol=1e-5, rtol=1e-4, msg=k)
