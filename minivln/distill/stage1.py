"""Stage-1 distillation (MiniVLN "distillation while pretraining"): intermediate-layer KD.

On the pretraining batches (MLM, SAP, MRC, OG), the student learns the teacher's

* **embeddings**: ``MSE(E_S W_e, E_T)`` on the instruction's embedding-layer output (the paper's
  ``E``), one learnable ``W_e``; the other encoders' inputs (panorama, global and local) are an option
  (``embed_encoders``);
* **attention scores**: per-head *pre-softmax* scores of student layer ``m`` against teacher layer
  ``h(m)`` (:func:`~minivln.distill.losses.layer_map`: ``3m`` in the text encoder, ``2m`` in the
  panorama and the two cross-modal encoders for the 9/2/4 -> 3/1/2 pair), the self-attention of
  every encoder (the paper's Eq. 5); the visual -> text cross-attention of the two cross-modal
  branches is an option (``cross_attention=True``: TinyBERT distils every attention matrix; the
  shapes match because both attend to the same text with the same number of heads);
* **hidden states**: ``MSE(H_S^m W_h, H_T^{h(m)})``, one learnable ``W_h`` shared by every layer of
  every encoder.

over the four encoders ``text``, ``pano``, ``global`` and ``local``.  Padding never enters: tokens
and attention pairs are averaged over the real ones only (the ``<p>.masks`` recorded with the taps).
The term is a plain **sum** of per-tensor means (one per encoder for embeddings, one per mapped
layer for attentions and hidden states), as in TinyBERT.

The taps come from :meth:`minivln.training.pretrain.PretrainTask.compute` with a teacher:
``outputs['taps']`` and ``teacher_outputs['taps']`` (see ``docs/distillation.md``).

The trainer logs one scalar per loss term (``loss/<name>``); to see the parts separately, use
:func:`stage1_terms`, one term per part (``loss/kd_emb``, ``loss/kd_att``, ``loss/kd_hid``), whose sum
is the full stage-1 loss.  :meth:`Stage1KD.components` gives the per-encoder breakdown.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from minivln.distill.losses import (
    PROJECTION_INITS,
    AttentionMSE,
    LossTerm,
    ProjectedMSE,
    layer_map,
)
from minivln.model.config import DUETConfig

ENCODERS = ("text", "pano", "global", "local")
"""Tap prefixes of the four encoders (``global``/``local``: the two cross-modal branches)."""

PARTS = ("embeddings", "attentions", "hidden")
"""What stage 1 distils; ``attentions`` is self-attention (plus cross-attention with ``cross_attention``)."""

EMBED_ENCODERS = ("text",)
"""The paper's default for ``embeddings``: the instruction's embedding-layer output only."""

CROSS_MODAL = ("global", "local")


def encoder_depths(cfg: DUETConfig) -> dict[str, int]:
    """Number of layers of each encoder of a DUET config."""
    return {"text": cfg.num_l_layers, "pano": cfg.num_pano_layers,
            "global": cfg.num_x_layers, "local": cfg.num_x_layers}


def encoder_layer_maps(student_cfg: DUETConfig, teacher_cfg: DUETConfig) -> dict[str, list[int]]:
    """Per encoder, the teacher layer (1-based) each student layer learns from (:func:`layer_map`);
    ``[]`` for an encoder neither model has (``num_pano_layers=0``).  ValueError names the encoder
    whose depths do not divide."""
    s_depths, t_depths = encoder_depths(student_cfg), encoder_depths(teacher_cfg)
    maps: dict[str, list[int]] = {}
    for enc in ENCODERS:
        n_s, n_t = s_depths[enc], t_depths[enc]
        if n_s == 0 and n_t == 0:
            maps[enc] = []
            continue
        try:
            maps[enc] = layer_map(n_s, n_t)
        except ValueError:
            raise ValueError(
                f"{enc} encoder: a {n_s}-layer student cannot learn uniformly from a {n_t}-layer "
                f"teacher (student layer m learns from teacher layer m * N_T / N_S, so N_T must be a "
                f"positive multiple of N_S)") from None
    return maps


def _taps_of(outputs: Mapping[str, Any] | None, who: str) -> Mapping[str, Any]:
    taps = outputs.get("taps") if outputs is not None else None
    if taps is None:
        raise ValueError(
            f"Stage1KD needs the {who}'s distillation taps in {'teacher_' if who == 'teacher' else ''}"
            "outputs['taps']: run the task with a teacher (e.g. Trainer(..., teacher=...) with "
            "PretrainTask, whose compute() records them)")
    return taps


def _tap(taps: Mapping[str, Any], key: str, who: str) -> Any:
    if key not in taps:
        raise ValueError(f"the {who}'s taps have no {key!r} (have: {', '.join(sorted(taps))})")
    return taps[key]


def _layers(taps: Mapping[str, Any], key: str, depth: int, who: str) -> Sequence[Tensor]:
    layers = _tap(taps, key, who)
    if len(layers) != depth:
        raise ValueError(
            f"the {who}'s taps hold {len(layers)} {key} layers but its config says {depth}: build "
            "Stage1KD from the configs of the models it distils")
    return layers


class Stage1KD(LossTerm):
    """Stage-1 KD loss term (see the module docstring): embeddings, attentions, hidden states.

    Args:
        student_cfg, teacher_cfg: the two models' configs (widths, depths, heads).
        name, weight: as for every :class:`~minivln.training.trainer.LossTerm`.
        parts: any of :data:`PARTS`; only the projections of the chosen parts are built
            (``W_e`` = ``embed_loss.proj``, ``W_h`` = ``hidden_loss.proj``, student -> teacher width).
        cross_attention: also distil the visual -> text cross-attention scores of the global and
            local branches (with ``attentions``; default off, as the paper's Eq. 5).
        embed_encoders: whose embedding-layer outputs ``embeddings`` covers (default ``("text",)``,
            the paper's ``E``; any of :data:`ENCODERS`).
        init: ``"default"`` (``nn.Linear``'s init) or ``"identity"`` (``W = I``, zero-padded when the
            widths differ, bias 0).

    Raises ValueError when attention is distilled and the head counts differ, when an encoder's
    depths do not divide (for attentions/hidden), or, at call time, when taps are missing.
    """

    def __init__(
        self,
        student_cfg: DUETConfig,
        teacher_cfg: DUETConfig,
        name: str = "kd",
        weight: float = 1.0,
        parts: Sequence[str] = PARTS,
        *,
        cross_attention: bool = False,
        embed_encoders: Sequence[str] = EMBED_ENCODERS,
        init: str = "default",
    ) -> None:
        super().__init__(name, weight)
        embed_encoders = tuple(dict.fromkeys(embed_encoders))
        if not embed_encoders or any(e not in ENCODERS for e in embed_encoders):
            raise ValueError(f"embed_encoders: expected a non-empty subset of {ENCODERS}, got {embed_encoders}")
        self.embed_encoders = embed_encoders
        parts = tuple(dict.fromkeys(parts))
        unknown = [p for p in parts if p not in PARTS]
        if not parts or unknown:
            raise ValueError(f"parts: expected a non-empty subset of {PARTS}, got {parts}")
        if init not in PROJECTION_INITS:  # checked here too: with parts that need no projection
            raise ValueError(f"init: expected one of {PROJECTION_INITS}, got {init!r}")
        if "attentions" in parts and student_cfg.num_attention_heads != teacher_cfg.num_attention_heads:
            raise ValueError(
                f"attention distillation needs as many heads in the student as in the teacher: "
                f"student {student_cfg.num_attention_heads}, teacher {teacher_cfg.num_attention_heads} "
                "(set the student's num_attention_heads, or leave 'attentions' out of parts)")
        self.parts = parts
        self.cross_attention = bool(cross_attention)
        self.student_depths = encoder_depths(student_cfg)
        self.teacher_depths = encoder_depths(teacher_cfg)
        needs_layers = "attentions" in parts or "hidden" in parts
        self.layer_maps = encoder_layer_maps(student_cfg, teacher_cfg) if needs_layers else {}
        s_width, t_width = student_cfg.hidden_size, teacher_cfg.hidden_size
        self.embed_loss = ProjectedMSE(s_width, t_width, init=init) if "embeddings" in parts else None
        self.hidden_loss = ProjectedMSE(s_width, t_width, init=init) if "hidden" in parts else None
        self.attention_loss = AttentionMSE()

    def components(
        self, outputs: Mapping[str, Any], teacher_outputs: Mapping[str, Any] | None
    ) -> dict[str, Tensor]:
        """The unweighted loss per part and encoder: keys ``embeddings/<enc>``, ``attentions/<enc>``,
        ``cross_attentions/global|local``, ``hidden/<enc>`` (layer terms summed over the mapped
        layers).  Masks are the student's ``<enc>.masks`` (the teacher saw the same batch)."""
        s_taps, t_taps = _taps_of(outputs, "student"), _taps_of(teacher_outputs, "teacher")
        out: dict[str, Tensor] = {}
        for enc in ENCODERS:
            mask = _tap(s_taps, f"{enc}.masks", "student")
            if self.embed_loss is not None and enc in self.embed_encoders:
                out[f"embeddings/{enc}"] = self.embed_loss(
                    _tap(s_taps, f"{enc}.embeddings", "student"),
                    _tap(t_taps, f"{enc}.embeddings", "teacher"), mask)
            if not self.layer_maps.get(enc):
                continue
            if "attentions" in self.parts:
                out[f"attentions/{enc}"] = self._layer_sum(
                    s_taps, t_taps, enc, "attentions", self.attention_loss, mask, mask)
                if self.cross_attention and enc in CROSS_MODAL:
                    text_mask = _tap(s_taps, "text.masks", "student")
                    out[f"cross_attentions/{enc}"] = self._layer_sum(
                        s_taps, t_taps, enc, "cross_attentions", self.attention_loss, mask, text_mask)
            if self.hidden_loss is not None:
                out[f"hidden/{enc}"] = self._layer_sum(
                    s_taps, t_taps, enc, "hidden_states", self.hidden_loss, mask)
        return out

    def _layer_sum(self, s_taps: Mapping[str, Any], t_taps: Mapping[str, Any], enc: str, key: str,
                   loss: nn.Module, *masks: Tensor) -> Tensor:
        """``sum_m loss(student[enc.key][m], teacher[enc.key][h(m)], *masks)`` over the mapped layers."""
        s_layers = _layers(s_taps, f"{enc}.{key}", self.student_depths[enc], "student")
        t_layers = _layers(t_taps, f"{enc}.{key}", self.teacher_depths[enc], "teacher")
        terms = [loss(s_layers[m], t_layers[h - 1], *masks) for m, h in enumerate(self.layer_maps[enc])]
        return torch.stack(terms).sum()

    def forward(
        self, outputs: Mapping[str, Any], teacher_outputs: Mapping[str, Any] | None, batch: Any = None
    ) -> Tensor:
        """The sum of :meth:`components` (unweighted; the trainer applies ``weight``)."""
        return torch.stack(list(self.components(outputs, teacher_outputs).values())).sum()


PART_NAMES = {"embeddings": "emb", "attentions": "att", "hidden": "hid"}


def stage1_terms(
    student_cfg: DUETConfig,
    teacher_cfg: DUETConfig,
    weight: float = 1.0,
    *,
    part_weights: Mapping[str, float] | None = None,
    prefix: str = "kd",
    cross_attention: bool = False,
    embed_encoders: Sequence[str] = EMBED_ENCODERS,
    init: str = "default",
) -> list[Stage1KD]:
    """The stage-1 loss as one term per part, named ``<prefix>_emb``, ``<prefix>_att`` and
    ``<prefix>_hid``, so that the trainer logs each part (``loss/kd_emb``, ...); together they are
    :class:`Stage1KD` with every part (``W_e`` lives in the first, ``W_h`` in the last).

    Each term's weight is ``weight * part_weights[short name]`` (``part_weights`` keyed ``emb``,
    ``att``, ``hid``; missing = 1); a part whose weight is 0 is not built (no projection, no cost)."""
    part_weights = dict(part_weights or {})
    unknown = sorted(set(part_weights) - set(PART_NAMES.values()))
    if unknown:
        raise ValueError(f"part_weights: unknown part(s) {unknown}; expected {sorted(PART_NAMES.values())}")
    terms = []
    for part in PARTS:
        w = weight * float(part_weights.get(PART_NAMES[part], 1.0))
        if w < 0:
            raise ValueError(f"the weight of {PART_NAMES[part]} must be >= 0, got {w}")
        if w == 0:
            continue
        terms.append(Stage1KD(student_cfg, teacher_cfg, name=f"{prefix}_{PART_NAMES[part]}", weight=w,
                              parts=(part,), cross_attention=cross_attention,
                              embed_encoders=embed_encoders, init=init))
    return terms


__all__ = ["EMBED_ENCODERS", "ENCODERS", "PARTS", "PART_NAMES", "Stage1KD", "encoder_depths", "encoder_layer_maps", "stage1_terms"]
