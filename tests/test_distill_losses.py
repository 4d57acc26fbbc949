"""Unit tests of the distillation losses (minivln.distill.losses), each against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from minivln.distill.losses import AttentionMSE, ProjectedMSE, SoftTargetCE, layer_map


def test_layer_map_matches_the_paper_and_rejects_non_uniform():
    assert layer_map(3, 9) == [3, 6, 9]  # text encoder: h(m) = 3m
    assert layer_map(1, 2) == [2]  # panorama encoder: 2m
    assert layer_map(2, 4) == [2, 4]  # cross-modal encoders: 2m
    assert layer_map(4, 4) == [1, 2, 3, 4]
    for bad in [(2, 9), (0, 3), (5, 4)]:
        with pytest.raises(ValueError):
            layer_map(*bad)


def test_projected_mse_hand_computed_and_ignores_padding():
    torch.manual_seed(0)
    loss = ProjectedMSE(3, 5)
    s, t = torch.randn(2, 4, 3), torch.randn(2, 4, 5)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    expected = ((loss.proj(s) - t)[mask] ** 2).mean()
    assert torch.allclose(loss(s, t, mask), expected)
    s2, t2 = s.clone(), t.clone()
    s2[~mask], t2[~mask] = 100.0, -100.0  # padded tokens change nothing
    assert torch.allclose(loss(s2, t2, mask), expected)
    # no mask: plain MSE; gradients reach W and the student, never the teacher
    s.requires_grad_(True)
    t.requires_grad_(True)
    out = loss(s, t)
    assert torch.allclose(out, F.mse_loss(loss.proj(s), t))
    out.backward()
    assert loss.proj.weight.grad is not None and s.grad is not None and t.grad is None
    same = ProjectedMSE(5, 5, project=False)
    assert same(t, t).item() == 0.0
    with pytest.raises(ValueError):
        ProjectedMSE(3, 5, project=False)
    with pytest.raises(ValueError):
        loss(torch.randn(2, 3, 3), torch.randn(2, 4, 5))


def test_attention_mse_counts_real_pairs_only():
    torch.manual_seed(0)
    b, h, n = 2, 3, 4
    s, t = torch.randn(b, h, n, n), torch.randn(b, h, n, n)
    km = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    s_masked = s.masked_fill(~km[:, None, None, :], -10000.0)  # the additive mask of the taps
    t_masked = t.masked_fill(~km[:, None, None, :], float("-inf"))
    pair = (km[:, :, None] & km[:, None, :])[:, None].expand(b, h, n, n)
    expected = ((s - t)[pair] ** 2).mean()
    got = AttentionMSE()(s_masked, t_masked, query_mask=km, key_mask=km)
    assert torch.isfinite(got) and torch.allclose(got, expected)
    # TinyBERT's rule without masks: masked scores (<= -100) count as 0 in both
    tb = AttentionMSE()(s_masked, s.masked_fill(~km[:, None, None, :], -10000.0))
    assert tb.item() == 0.0
    only_keys = AttentionMSE()(s_masked, t.masked_fill(~km[:, None, None, :], -1e4), key_mask=km)
    kpair = km[:, None, None, :].expand(b, h, n, n)
    assert torch.allclose(only_keys, ((s - t)[kpair] ** 2).mean())
    with pytest.raises(ValueError, match="heads"):
        AttentionMSE()(torch.randn(1, 2, 3, 3), torch.randn(1, 4, 3, 3))


def test_soft_target_ce_hand_computed_masked_and_tempered():
    s = torch.tensor([[1.0, 2.0, float("-inf"), 0.5], [0.0, float("-inf"), float("-inf"), 3.0]], requires_grad=True)
    t = torch.tensor([[2.0, 0.0, float("-inf"), 1.0], [1.0, float("-inf"), float("-inf"), -1.0]])
    for temp in (1.0, 2.0):
        got = SoftTargetCE(temp)(s, t)
        rows = []
        for i, cols in enumerate([[0, 1, 3], [0, 3]]):
            p = torch.softmax(t[i, cols] / temp, 0)
            rows.append(-(p * torch.log_softmax(s[i, cols] / temp, 0)).sum())
        assert torch.isfinite(got) and torch.allclose(got, torch.stack(rows).mean())
    got = SoftTargetCE()(s, t)
    got.backward()
    assert torch.isfinite(s.grad).all() and s.grad[0, 2] == 0
    # valid: skipped samples do not count
    only0 = SoftTargetCE()(s, t, valid=torch.tensor([True, False]))
    p = torch.softmax(t[0, [0, 1, 3]], 0)
    assert torch.allclose(only0, -(p * torch.log_softmax(s[0, [0, 1, 3]], 0)).sum())
    # the student matching the teacher is the minimum: zero gradient, loss = the teacher's entropy
    z = t.clone().requires_grad_(True)
    ce = SoftTargetCE()(z, t)
    ce.backward()
    assert torch.allclose(z.grad, torch.zeros_like(z.grad), atol=1e-7)
    p1 = torch.softmax(torch.tensor([1.0, -1.0]), 0)
    ent = torch.stack([-(torch.softmax(t[0, [0, 1, 3]], 0) * torch.log_softmax(t[0, [0, 1, 3]], 0)).sum(),
                       -(p1 * p1.log()).sum()]).mean()
    assert torch.allclose(ce, ent)
    assert SoftTargetCE()(s, t, valid=torch.tensor([False, False])).item() == 0.0
    with pytest.raises(ValueError):
        SoftTargetCE(0.0)


def test_losses_on_real_duet_taps():
    """Teacher and student DUETs with the same heads: text attention taps line up under layer_map."""
    from minivln.model.registry import create_model

    torch.manual_seed(0)
    small = dict(num_attention_heads=2, intermediate_size=64, num_pano_layers=1, num_x_layers=1, image_feat_size=16)
    teacher = create_model("duet-cpu", hidden_size=32, num_l_layers=3, **small).eval()
    student = create_model("duet-cpu", hidden_size=16, num_l_layers=1, **small).eval()
    ids = torch.randint(1000, 2000, (2, 7))
    masks = torch.tensor([[1] * 7, [1] * 4 + [0] * 3], dtype=torch.bool)
    batch = {"txt_ids": ids, "txt_masks": masks}
    t_out, t_taps = teacher("language", batch, taps=True)
    s_out, s_taps = student("language", batch, taps=True)
    (m,) = layer_map(1, 3)
    att = AttentionMSE()(s_taps["text.attentions"][0], t_taps["text.attentions"][m - 1], masks, masks)
    hid = ProjectedMSE(16, 32)(s_taps["text.hidden_states"][0], t_taps["text.hidden_states"][m - 1], masks)
    assert math.isfinite(att.item()) and att.item() > 0 and math.isfinite(hid.item()) and hid.item() > 0
    # same model on both sides: zero
    assert AttentionMSE()(t_taps["text.attentions"][1], t_taps["text.attentions"][1], masks, masks).item() == 0.0
