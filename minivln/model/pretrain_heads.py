"""Pretraining-only modules of DUET: the language-update branch, the MLM head and the MRC head.

Upstream pretraining (``pretrain_src``, ``use_lang2visn_attn``) lets every cross-modal layer also
update the text: the text attends to the layer's *input* visual tokens through the **same**
``visual_attention`` module the visual tokens use to attend to the text, then runs its own text
self-attention and FFN (``lang_self_att``/``lang_inter``/``lang_output``).  Fine-tuning drops those
modules, so :class:`~minivln.model.duet.DUET` has none; here they are extra modules
(:class:`LangUpdateBranch`, one per branch) that hold only the text self-attention/FFN weights
and borrow the cross-attention from the DUET layers at call time.  The global and local branches'
text outputs are summed and fed to :class:`MLMHead`, whose decoder weight *is* the DUET word
embedding matrix (tied).

:class:`DUETPretrainer` wraps a DUET (attribute ``duet``) and these heads; ``pretrainer.duet`` is
exactly the navigation network to export (:func:`~minivln.model.checkpoint.save_pretrained`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minivln.model.duet import (
    DUET,
    BertAttention,
    BertIntermediate,
    BertSelfOutput,
    CrossModalEncoder,
    additive_mask,
)


class LangUpdateLayer(nn.Module):
    """Text update of one cross-modal layer: text -> (shared) cross-attention to the visual input
    tokens -> text self-attention -> FFN, each with residual + LayerNorm (upstream naming)."""

    def __init__(self, duet: DUET) -> None:
        super().__init__()
        cfg = duet.config
        self.lang_self_att = BertAttention(cfg)
        self.lang_inter = BertIntermediate(cfg)
        self.lang_output = BertSelfOutput(cfg, in_size=cfg.intermediate_size)

    def forward(self, text: Tensor, text_mask: Tensor, visn: Tensor, visn_mask: Tensor,
                cross: nn.Module) -> Tensor:
        """``cross`` is the DUET layer's ``visual_attention`` (a ``BertXAttention``); masks additive."""
        x = cross(text, cross.att.key_value(visn), visn_mask)
        x = self.lang_self_att(x, text_mask)
        return self.lang_output(self.lang_inter(x), x)


class LangUpdateBranch(nn.Module):
    """One :class:`LangUpdateLayer` per x-layer of a DUET branch (``encoder``)."""

    def __init__(self, duet: DUET, encoder: CrossModalEncoder) -> None:
        super().__init__()
        self.layers = nn.ModuleList(LangUpdateLayer(duet) for _ in encoder.x_layers)

    def forward(self, encoder: CrossModalEncoder, text: Tensor, txt_masks: Tensor,
                visn_inputs: list[Tensor], visn_masks: Tensor) -> Tensor:
        """``visn_inputs[i]`` is the visual input of x-layer i (recorded during navigation)."""
        t_mask = additive_mask(txt_masks, text.dtype)
        v_mask = additive_mask(visn_masks, text.dtype)
        for layer, x_layer, visn in zip(self.layers, encoder.x_layers, visn_inputs):
            text = layer(text, t_mask, visn, v_mask, x_layer.visual_attention)
        return text


@contextlib.contextmanager
def record_layer_inputs(encoder: CrossModalEncoder) -> Iterator[list[Tensor]]:
    """Collect the visual input (first argument) of every x-layer of ``encoder`` while inside."""
    inputs: list[Tensor] = []

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        inputs.append(args[0] if args else kwargs["x"])

    hooks = [layer.register_forward_pre_hook(grab, with_kwargs=True) for layer in encoder.x_layers]
    try:
        yield inputs
    finally:
        for h in hooks:
            h.remove()


class MLMHead(nn.Module):
    """BERT MLM head: dense -> GELU -> LayerNorm -> decoder tied to the word embeddings (+ bias)."""

    def __init__(self, duet: DUET) -> None:
        super().__init__()
        cfg = duet.config
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        word = duet.embeddings.word_embeddings.weight
        self.decoder = nn.Linear(cfg.hidden_size, word.size(0), bias=False)
        self.decoder.weight = word  # tied
        self.bias = nn.Parameter(torch.zeros(word.size(0)))

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.LayerNorm(F.gelu(self.dense(x)))) + self.bias


class RegionClassifier(nn.Module):
    """MRC head: Linear(H, H) -> ReLU -> LayerNorm -> Linear(H, C)."""

    def __init__(self, hidden: int, num_classes: int, eps: float = 1e-12) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.LayerNorm(hidden, eps=eps),
                                 nn.Linear(hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class DUETPretrainer(nn.Module):
    """DUET (``self.duet``) + language-update branches + MLM and MRC heads.

    ``state_dict`` keys: ``duet.*`` (the navigation network), ``global_lang.*``, ``local_lang.*``,
    ``mlm_head.*`` (its ``decoder.weight`` is the tied word embedding), ``image_classifier.*``.
    """

    def __init__(self, duet: DUET, num_classes: int = 1000) -> None:
        super().__init__()
        self.duet = duet
        self.global_lang = LangUpdateBranch(duet, duet.global_encoder.encoder)
        self.local_lang = LangUpdateBranch(duet, duet.local_encoder.encoder)
        self.mlm_head = MLMHead(duet)
        self.image_classifier = RegionClassifier(duet.config.hidden_size, num_classes,
                                                 duet.config.layer_norm_eps)
        for m in (self.global_lang, self.local_lang, self.mlm_head, self.image_classifier):
            m.apply(DUET._init_weights)
        with torch.no_grad():
            self.mlm_head.bias.zero_()

    def forward(self, mode: str, batch: Any, taps: bool = False) -> Any:
        """Delegates to the DUET network (so ``pretrainer(mode, batch)`` works like a DUET)."""
        return self.duet(mode, batch, taps=taps)

    def navigation_with_text(
        self, nav_batch: dict[str, Any], taps: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], Tensor]:
        """'navigation' mode plus the language-update branch: returns (navigation outputs,
        updated text (B, L, H) = global branch text + local branch text).

        With ``taps`` (a dict), the navigation call's distillation taps (``global.*``, ``local.*``,
        ``action_probs``; see :meth:`DUET.forward`) are merged into it; the language-update branch
        itself records none.
        """
        duet = self.duet
        with record_layer_inputs(duet.global_encoder.encoder) as g_in, \
                record_layer_inputs(duet.local_encoder.encoder) as l_in:
            if taps is None:
                outs = duet("navigation", nav_batch)
            else:
                outs, nav_taps = duet("navigation", nav_batch, taps=True)
                taps.update(nav_taps)
        txt, txt_masks = nav_batch["txt_embeds"], nav_batch["txt_masks"]
        g_txt = self.global_lang(duet.global_encoder.encoder, txt, txt_masks, g_in, nav_batch["gmap_masks"])
        l_txt = self.local_lang(duet.local_encoder.encoder, txt, txt_masks, l_in, nav_batch["vp_masks"])
        return outs, g_txt + l_txt


def navigation_network(model: torch.nn.Module) -> DUET:
    """The DUET of ``model``: a :class:`DUET` itself, or a :class:`DUETPretrainer`'s ``.duet``."""
    if isinstance(model, DUETPretrainer):
        return model.duet
    if isinstance(model, DUET):
        return model
    raise TypeError(f"expected a DUET or a DUETPretrainer, got {type(model).__name__}")
