"""Stage-2 distillation (MiniVLN "distillation while fine-tuning"): encoder outputs and actions.

During DAgger fine-tuning (:class:`~minivln.training.finetune.FinetuneTask` with a teacher) the frozen
teacher runs in lock-step on exactly the states the student visits, and the student learns

* ``kd_txt``: the teacher's **text-encoder output**, ``MSE(T_S W_l, T_T)`` over the real tokens;
* ``kd_pano``: the teacher's **panorama-encoder output** at every step, ``MSE(P_S W_r, P_T)`` over the
  real panorama tokens (views and objects) of the samples still navigating;
* ``kd_fuse``: the teacher's **fused action distribution**, the cross-entropy
  ``-sum_a softmax(z_T / t)_a log softmax(z_S / t)_a`` over the actions both may take
  (:class:`~minivln.distill.losses.SoftTargetCE`), for the samples still navigating;

each as its own :class:`~minivln.training.trainer.LossTerm` (logged as ``loss/kd_txt``,
``loss/kd_pano``, ``loss/kd_fuse``) with the paper's weight ``KDWeight`` (0.1): total loss = action
loss + KDWeight x (L_txt + L_pano + L_fuse).  ``W_l`` and ``W_r`` are learnable ``nn.Linear(student
width, teacher width)`` owned by the terms.  ``kd_fuse`` is a cross-entropy, not a KL divergence: at
its minimum (student = teacher) it equals the teacher's entropy, and its gradient is 0.

**Reduction** (``reduction="action"``, the default): every term is reduced exactly as the action loss
of the task is.  Per rollout ``r`` (batch size ``B_r``, action-loss weight ``w_r``: ``ml_weight``
for the teacher-forced rollout, 1 for the sampled one, ``teacher_weight`` with ``feedback: teacher``)
and step ``t`` (``n_rt`` samples still navigating, ``m_rt`` the term's mean over them: over their real
tokens for ``kd_pano``, over the samples for ``kd_fuse``)::

    L = sum_r w_r * sum_t (n_rt / B_r) * m_rt        (kd_pano, kd_fuse)
    L = sum_r w_r * m_r                               (kd_txt: the text is encoded once per rollout)

i.e. summed over steps and averaged over the batch like the action loss (``sum_t CE_sum / B``; for
``kd_fuse`` exactly that with the teacher's distribution as the target), so ``KDWeight`` is a ratio
to the action loss that does not depend on episode length or ``ml_weight``.  ``reduction="mean"``
instead averages uniformly over every (rollout, step, navigating sample), i.e. ``sum n_rt m_rt /
sum n_rt`` (``kd_txt``: over the samples of both rollouts), with the rollout weights ignored.

The records come from :func:`minivln.training.finetune.kd_records` (``outputs['kd']`` and
``teacher_outputs['kd']``, one per rollout).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from minivln.distill.losses import LossTerm, ProjectedMSE, SoftTargetCE
from minivln.model.config import DUETConfig

REDUCTIONS = ("action", "mean")


def _records(outputs: Mapping[str, Any] | None, teacher_outputs: Mapping[str, Any] | None,
             name: str) -> list[tuple[Mapping[str, Any], Mapping[str, Any]]]:
    s = outputs.get("kd") if outputs is not None else None
    t = teacher_outputs.get("kd") if teacher_outputs is not None else None
    if s is None or t is None:
        raise ValueError(
            f"{name} needs the stage-2 records outputs['kd'] and teacher_outputs['kd']: run the task with "
            "a teacher (e.g. Trainer(..., teacher=...) with FinetuneTask, whose compute() records them)")
    if len(s) != len(t):
        raise ValueError(f"{name}: {len(s)} student rollouts but {len(t)} teacher rollouts")
    return list(zip(s, t))


class _Stage2Term(LossTerm):
    """Shared reduction over rollouts and steps (see the module docstring)."""

    def __init__(self, name: str, weight: float, reduction: str) -> None:
        super().__init__(name, weight)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction

    def parts(self, student: Mapping[str, Any], teacher: Mapping[str, Any]) -> Iterable[tuple[Tensor, Tensor]]:
        """``(mean, count)`` pairs of one rollout: the term's mean over ``count`` samples."""
        raise NotImplementedError

    def forward(self, outputs: Mapping[str, Any], teacher_outputs: Mapping[str, Any] | None,
                batch: Any = None) -> Tensor:
        total: Tensor | None = None
        counts: Tensor | None = None
        for student, teacher in _records(outputs, teacher_outputs, type(self).__name__):
            for mean, count in self.parts(student, teacher):
                if self.reduction == "action":
                    scale = float(student["weight"]) / int(student["batch_size"])
                    value = mean * (count * scale)
                else:
                    value = mean * count
                    counts = count if counts is None else counts + count
                total = value if total is None else total + value
        if total is None:
            raise ValueError(f"{type(self).__name__}: no rollout to distil")
        if self.reduction == "mean":
            total = total / counts.clamp_min(1)
        return total


class _ProjectedKD(_Stage2Term):
    """A stage-2 term that owns one learnable projection student width -> teacher width (``loss.proj``)."""

    def __init__(self, student_cfg: DUETConfig, teacher_cfg: DUETConfig, name: str,
                 weight: float = 0.1, *, reduction: str = "action", init: str = "default") -> None:
        super().__init__(name, weight, reduction)
        self.loss = ProjectedMSE(student_cfg.hidden_size, teacher_cfg.hidden_size, init=init)


class TextKD(_ProjectedKD):
    """``kd_txt``: ``MSE(T_S W_l, T_T)`` over the real instruction tokens of each rollout
    (``W_l`` = ``loss.proj``)."""

    def __init__(self, student_cfg: DUETConfig, teacher_cfg: DUETConfig, name: str = "kd_txt",
                 weight: float = 0.1, *, reduction: str = "action", init: str = "default") -> None:
        super().__init__(student_cfg, teacher_cfg, name, weight, reduction=reduction, init=init)

    def parts(self, student: Mapping[str, Any], teacher: Mapping[str, Any]) -> Iterable[tuple[Tensor, Tensor]]:
        masks = student["text_masks"]
        n = torch.tensor(float(masks.size(0)), device=masks.device)
        yield self.loss(student["text"], teacher["text"], masks), n


class PanoKD(_ProjectedKD):
    """``kd_pano``: ``MSE(P_S W_r, P_T)`` over the real panorama tokens of the navigating samples at
    every step (``W_r`` = ``loss.proj``)."""

    def __init__(self, student_cfg: DUETConfig, teacher_cfg: DUETConfig, name: str = "kd_pano",
                 weight: float = 0.1, *, reduction: str = "action", init: str = "default") -> None:
        super().__init__(student_cfg, teacher_cfg, name, weight, reduction=reduction, init=init)

    def parts(self, student: Mapping[str, Any], teacher: Mapping[str, Any]) -> Iterable[tuple[Tensor, Tensor]]:
        for s, t, masks, active in zip(student["pano"], teacher["pano"], student["pano_masks"],
                                       student["active"], strict=True):
            yield self.loss(s, t, masks & active[:, None]), active.sum().float()


class FuseKD(_Stage2Term):
    """``kd_fuse``: :class:`~minivln.distill.losses.SoftTargetCE` at temperature ``t`` between the
    teacher's and the student's fused action logits of the navigating samples at every step."""

    def __init__(self, name: str = "kd_fuse", weight: float = 0.1, *, temperature: float = 1.0,
                 reduction: str = "action") -> None:
        super().__init__(name, weight, reduction)
        self.loss = SoftTargetCE(temperature)

    def parts(self, student: Mapping[str, Any], teacher: Mapping[str, Any]) -> Iterable[tuple[Tensor, Tensor]]:
        for s, t, active in zip(student["fused_logits"], teacher["fused_logits"], student["active"], strict=True):
            yield self.loss(s, t, active), active.sum().float()


TERM_NAMES = ("txt", "pano", "fuse")
"""The stage-2 terms' short names (``<prefix>_txt``, ...), the keys of ``term_weights``."""


def stage2_terms(
    student_cfg: DUETConfig,
    teacher_cfg: DUETConfig,
    kd_weight: float = 0.1,
    temperature: float = 1.0,
    *,
    term_weights: Mapping[str, float] | None = None,
    reduction: str = "action",
    init: str = "default",
    prefix: str = "kd",
) -> list[_Stage2Term]:
    """The stage-2 loss as three terms, ``<prefix>_txt`` (owns ``W_l``), ``<prefix>_pano`` (owns
    ``W_r``) and ``<prefix>_fuse``, for ``Trainer(..., teacher=teacher, loss_terms=stage2_terms(...))``
    with a :class:`~minivln.training.finetune.FinetuneTask`.  Each is weighted
    ``kd_weight * term_weights[name]`` (the paper's KDWeight, 0.1 best; ``term_weights`` keyed ``txt``,
    ``pano``, ``fuse``, missing = 1); a term of weight 0 is not built (Table IV's term subsets).
    ``init="identity"`` starts ``W_l``/``W_r`` at the identity (zero-padded when the widths differ)."""
    term_weights = dict(term_weights or {})
    unknown = sorted(set(term_weights) - set(TERM_NAMES))
    if unknown:
        raise ValueError(f"term_weights: unknown term(s) {unknown}; expected {list(TERM_NAMES)}")
    builders = {
        "txt": lambda w: TextKD(student_cfg, teacher_cfg, f"{prefix}_txt", w, reduction=reduction, init=init),
        "pano": lambda w: PanoKD(student_cfg, teacher_cfg, f"{prefix}_pano", w, reduction=reduction, init=init),
        "fuse": lambda w: FuseKD(f"{prefix}_fuse", w, temperature=temperature, reduction=reduction),
    }
    terms: list[_Stage2Term] = []
    for name in TERM_NAMES:
        w = kd_weight * float(term_weights.get(name, 1.0))
        if w < 0:
            raise ValueError(f"the weight of {name} must be >= 0, got {w}")
        if w > 0:
            terms.append(builders[name](w))
    return terms


__all__ = ["FuseKD", "PanoKD", "REDUCTIONS", "TERM_NAMES", "TextKD", "stage2_terms"]
