"""Knowledge-distillation losses, one small module each (MiniVLN's two stages use them).

* :func:`layer_map`: which teacher block a student block learns from (uniform: ``h(m) = m * N_T / N_S``,
  i.e. 3m for a 9-layer teacher text encoder and a 3-layer student, 2m for 2->1 and 4->2).
* :class:`ProjectedMSE`: MSE between teacher states and the student's, projected by a learnable
  linear map (``W_e`` for embeddings, ``W_h`` for hidden states, ``W_l``/``W_r`` for the text and
  panorama encoder outputs of stage 2), averaged over the real (unpadded) tokens.
* :class:`AttentionMSE`: MSE between per-head *pre-softmax* attention scores, over real query/key pairs
  only (the additive mask, ``-10000`` or ``-inf`` on padded keys, never enters the loss).
* :class:`SoftTargetCE`: cross-entropy between the teacher's and the student's action distributions
  at temperature ``t``, over the candidates both may choose (``-inf`` logits are excluded).

All return a scalar; all accept a leading batch dimension and boolean masks with True = real element.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def layer_map(num_student: int, num_teacher: int) -> list[int]:
    """Teacher block (1-based) for each student block ``m = 1..num_student``: ``m * N_T / N_S``.

    >>> layer_map(3, 9), layer_map(1, 2), layer_map(2, 4)
    ([3, 6, 9], [2], [2, 4])
    """
    if num_student < 1 or num_teacher < num_student or num_teacher % num_student:
        raise ValueError(f"a {num_student}-block student cannot map uniformly onto a {num_teacher}-block teacher")
    step = num_teacher // num_student
    return [m * step for m in range(1, num_student + 1)]


def _masked_mean_sq(diff: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``diff**2`` over the elements whose leading positions ``mask`` marks real."""
    sq = diff.float().pow(2)
    if mask is None:
        return sq.mean()
    m = mask.to(sq.dtype)
    while m.dim() < sq.dim():
        m = m.unsqueeze(-1)
    m = m.expand_as(sq)
    return (sq * m).sum() / m.sum().clamp_min(1.0)


#: starting values of a :class:`ProjectedMSE` projection: ``nn.Linear``'s own, or ``W = I`` (zero-padded
#: when the widths differ) with bias 0
PROJECTION_INITS = ("default", "identity")


class ProjectedMSE(nn.Module):
    """``MSE(student @ W + b, teacher)`` over real tokens; ``W`` is learnable (identity when the widths
    match and ``project=False``), initialised as ``init`` says (:data:`PROJECTION_INITS`).

    ``student``: (..., D_s); ``teacher``: (..., D_t); ``mask``: the leading shape (True = real).
    """

    def __init__(self, student_dim: int, teacher_dim: int, project: bool = True, init: str = "default") -> None:
        super().__init__()
        if not project and student_dim != teacher_dim:
            raise ValueError(f"widths differ ({student_dim} vs {teacher_dim}): a projection is needed")
        if init not in PROJECTION_INITS:
            raise ValueError(f"init: expected one of {PROJECTION_INITS}, got {init!r}")
        self.proj = nn.Linear(student_dim, teacher_dim) if project else nn.Identity()
        if project and init == "identity":
            with torch.no_grad():
                nn.init.eye_(self.proj.weight)
                nn.init.zeros_(self.proj.bias)

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
        if student.shape[:-1] != teacher.shape[:-1]:
            raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ in tokens")
        return _masked_mean_sq(self.proj(student) - teacher.detach(), mask)


class AttentionMSE(nn.Module):
    """MSE between pre-softmax attention scores (B, heads, Q, K) of student and teacher.

    Only pairs of a real query and a real key count (``query_mask`` (B, Q), ``key_mask`` (B, K); True =
    real).  Without masks, TinyBERT's rule applies: scores at or below ``-100`` (the additive padding
    mask) are set to 0 in both before the mean.  Head counts must match.
    """

    def forward(self, student: Tensor, teacher: Tensor, query_mask: Tensor | None = None,
                key_mask: Tensor | None = None) -> Tensor:
        if student.shape != teacher.shape:
            raise ValueError(f"attention shapes differ: student {tuple(student.shape)}, teacher "
                             f"{tuple(teacher.shape)} (the student needs as many heads as the teacher)")
        teacher = teacher.detach()
        if query_mask is None and key_mask is None:
            zero = torch.zeros((), dtype=student.dtype, device=student.device)
            s = torch.where(student <= -100, zero, student)
            t = torch.where(teacher <= -100, zero, teacher)
            return (s.float() - t.float()).pow(2).mean()
        b, _, q, k = student.shape
        qm = query_mask if query_mask is not None else student.new_ones((b, q), dtype=torch.bool)
        km = key_mask if key_mask is not None else student.new_ones((b, k), dtype=torch.bool)
        pair = (qm[:, :, None] & km[:, None, :])[:, None]  # (B, 1, Q, K)
        diff = torch.where(pair, student.float() - teacher.float(), torch.zeros((), device=student.device))
        count = pair.expand_as(diff).sum().clamp_min(1)
        return diff.pow(2).sum() / count


class SoftTargetCE(nn.Module):
    """``-sum_a p_T(a) log p_S(a)`` at temperature ``t``, averaged over the samples with a target.

    ``student_logits``, ``teacher_logits``: (B, A) with ``-inf`` at actions that cannot be taken (the
    same positions in both).  ``valid``: (B,) bool, False for samples to skip (e.g. ended episodes).
    No ``t**2`` factor (TinyBERT's prediction-layer loss); at ``t = 1`` (the paper's choice) it does not
    matter.
    """

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, valid: Tensor | None = None) -> Tensor:
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(f"logit shapes differ: {tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}")
        s = student_logits.float() / self.temperature
        t = teacher_logits.detach().float() / self.temperature
        allowed = torch.isfinite(s) & torch.isfinite(t)
        if valid is not None:
            allowed = allowed & valid[:, None]
        rows = allowed.any(1)
        if not bool(rows.any()):
            # no target in this batch: a zero that keeps the graph (and no 0 * inf)
            return student_logits.masked_fill(~torch.isfinite(student_logits), 0.0).sum() * 0.0
        neg = torch.finfo(torch.float32).min
        p_t = F.softmax(t.masked_fill(~allowed, neg), dim=1)
        log_p_s = F.log_softmax(s.masked_fill(~allowed, neg), dim=1)
        ce = -(p_t * log_p_s).masked_fill(~allowed, 0.0).sum(1)
        return ce[rows].mean()


class LossTerm(nn.Module):
    """An extra loss: ``total = task loss + sum(term.weight * term(outputs, teacher_outputs, batch))``.

    Subclasses implement :meth:`forward` returning an unweighted scalar; they may own parameters
    (optimised with the model and saved in ``loss_terms.safetensors`` under ``"<name>.<param>"``).
    Each term is logged as ``loss/<name>`` (unweighted).  The interface lives here, beside the losses,
    so that the distillation terms need nothing from the training layer (which plugs them in).
    """

    def __init__(self, name: str, weight: float = 1.0) -> None:
        super().__init__()
        self.name = name
        self.weight = float(weight)

    def forward(
        self, outputs: Mapping[str, Any], teacher_outputs: Mapping[str, Any] | None, batch: Any
    ) -> torch.Tensor:
        raise NotImplementedError


__all__ = ["layer_map", "LossTerm", "PROJECTION_INITS", "ProjectedMSE", "AttentionMSE", "SoftTargetCE"]
