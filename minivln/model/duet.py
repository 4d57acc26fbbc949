"""DUET: the dual-scale graph transformer navigation agent, in one readable file.

A re-implementation of the fine-tuning network of DUET (Chen et al., CVPR 2022; upstream class
``GlocalTextPathNavCMT`` plus the feature dropout of its ``VLNBert`` wrapper).  Parameter names equal
the upstream checkpoint keys without their ``vln_bert.`` prefix, so DUET and ScaleVLN checkpoints load
directly (see :mod:`minivln.model.checkpoint`).  The same class, built from a smaller
:class:`~minivln.model.config.DUETConfig`, is the MiniVLN student.

The network is called three ways, ``model(mode, batch)``, in this order by the agent:

``'language'``   once per episode: instruction tokens -> ``txt_embeds`` (B, L, H).
``'panorama'``   once per step: the current node's views (+ objects) -> ``(pano_embeds, pano_masks)``.
``'navigation'`` once per step: global map slots + the current node's tokens, both cross-attending to
                 the text -> a dict of embeddings and action logits over the global map slots.

Reading order of this file: attention primitive -> BERT blocks -> text embeddings/encoder ->
panorama embeddings/encoder -> cross-modal encoders (global map, local viewpoint) -> heads ->
logit fusion -> the DUET module.

Conventions: masks are bool with True = real element; attention masks are additive
``-10000 * (1 - mask)`` on the keys (BERT style; the panorama encoder, which upstream runs through
``torch.nn.MultiheadAttention`` with a ``-inf`` key-padding mask, gives identical softmax outputs).

Distillation taps: ``model(mode, batch, taps=True)`` returns ``(outputs, taps)``, where ``taps`` is a
dict of intermediate tensors (embedding outputs, every layer's hidden states, every layer's
pre-softmax attention scores per head *with the additive mask applied*, TinyBERT convention, and the
fused action distribution).  With ``taps=False`` attention runs through
``torch.nn.functional.scaled_dot_product_attention`` and nothing extra is kept.

Inference fast path (whenever no gradient can reach the weights, e.g. under ``torch.no_grad()``):
each self-attention computes its query/key/value with one packed matrix product,
:meth:`DUET.precompute_text_kv` projects the text keys/values of all cross-modal layers of both
branches with one, and wide layers (bert-base width) run on CPU through oneDNN with weights
reordered once.  The packed weights are cached copies (see :func:`packed_linear`); parameters and
state-dict keys are unchanged.  Attention masks are skipped when nothing is padded.  Numbers and
how they were measured: ``docs/model.md`` (Speed) and ``minivln bench model``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minivln.model.config import DUETConfig

try:  # torch >= 2.3
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # pragma: no cover
    SDPBackend = sdpa_kernel = None

MASK_VALUE = -10000.0  # additive attention mask for padded keys (BERT convention)

# Inference fast path for linear layers (see packed_linear).  Layers whose input and output are
# both at least this wide run, on CPU in fp32, through a oneDNN matrix product with the weight
# reordered once into its blocked layout: for the few-row products of one navigation step
# (bert-base width, 16-60 rows) that was faster than the default (MKL) path on the 2-core
# benchmark CPU in micro-benchmarks, and no faster for the student's 312-wide layers; the
# end-to-end effect is what `minivln bench model` measures (docs/model.md, Speed).
PREPACK_MIN_FEATURES = 512
_ONEDNN_LINEAR = (
    torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
)

# Fused attention kernels allowed on a GPU: all but cuDNN's.  With bf16 autocast PyTorch picks the
# cuDNN kernel for head sizes 32 and 64, and our sequence lengths change from batch to batch and
# step to step: see docs/results.md ("On a GPU") for what it cost.  None: PyTorch's own choice.
CUDA_SDPA_BACKENDS = (
    [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH] if SDPBackend else None
)

Taps = dict[str, Any]
"""Recorder for distillation taps: a plain dict, keys listed in :meth:`DUET.forward`."""

_PLAIN_OPS = False  # set by plain_ops(): no inference fast path, attention masks always applied


@contextmanager
def plain_ops() -> Iterator[None]:
    """Run the network with its reference operators only, for tracing and export: no packed or
    oneDNN projections (no cached weight copies, no private operators) and additive attention masks
    always applied (no data-dependent skip when nothing is padded).  Same results (within float
    rounding).  See :mod:`minivln.model.tensor_modes`."""
    global _PLAIN_OPS
    old, _PLAIN_OPS = _PLAIN_OPS, True
    try:
        yield
    finally:
        _PLAIN_OPS = old


def additive_mask(mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """(B, L) bool key mask -> (B, 1, 1, L) additive mask: 0 for real keys, -10000 for padding."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * MASK_VALUE


def key_mask(mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor | None:
    """:func:`additive_mask`, or None when no key is padded (checked on CPU tensors only, where it
    costs no device sync).  Adding a zero mask changes nothing, and attention without a mask runs
    a faster kernel."""
    if not _PLAIN_OPS and mask.device.type == "cpu" and bool(mask.all()):
        return None
    return additive_mask(mask, dtype)


def inference_only(*modules: nn.Module) -> bool:
    """True when no gradient can flow into the parameters of ``modules`` (grad mode off, or all
    frozen): the inference fast paths (packed weights) are then safe to use.  False inside
    :func:`plain_ops`."""
    if _PLAIN_OPS:
        return False
    if not torch.is_grad_enabled():
        return True
    return not any(p.requires_grad for m in modules for p in m.parameters(recurse=False))


Params = Sequence[tuple[Tensor, Tensor]]
"""(weight, bias) pairs of linear maps, applied side by side (outputs concatenated)."""


def _packed_params(
    owner: nn.Module, name: str, params: Callable[[], Params]
) -> tuple[str, Any, Any]:
    """The cached packed form of ``params()``: ``(kind, weight, bias)`` with kind ``'onednn'``
    (wide maps, CPU fp32: weights concatenated and reordered for oneDNN), ``'dense'`` (several
    narrow maps: weights concatenated) or ``'plain'`` (one narrow map: nothing to gain)."""
    cache = owner.__dict__.get("_packed_cache")
    if cache is None:
        cache = owner.__dict__["_packed_cache"] = {}
    hit = cache.get(name)
    if hit is not None:
        tensors, key, kind, weight, bias = hit
        if key == [(t.data_ptr(), t._version) for t in tensors]:
            return kind, weight, bias
    pairs = list(params())
    tensors = [t for pair in pairs for t in pair]
    wide = all(min(w.shape) >= PREPACK_MIN_FEATURES for w, _ in pairs)
    with torch.no_grad(), torch.inference_mode(False):  # normal tensors, usable outside inference
        weight = torch.cat([w for w, _ in pairs]) if len(pairs) > 1 else pairs[0][0]
        bias = torch.cat([b for _, b in pairs]) if len(pairs) > 1 else pairs[0][1]
        cpu_fp32 = weight.device.type == "cpu" and weight.dtype == torch.float32
        if wide and _ONEDNN_LINEAR and cpu_fp32:
            kind = "onednn"
            weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
        else:
            kind = "dense" if len(pairs) > 1 else "plain"
    cache[name] = (tensors, [(t.data_ptr(), t._version) for t in tensors], kind, weight, bias)
    return kind, weight, bias


def packed_linear(
    owner: nn.Module, name: str, x: Tensor, params: Callable[[], Params]
) -> Tensor | None:
    """Inference fast path of one or several linear maps of ``x`` (outputs concatenated), or None
    when there is none (the caller then runs its layers as they are; same result).

    Several maps become one matrix product (e.g. a fused query/key/value projection); wide maps
    on CPU in fp32 run through oneDNN with a weight reordered once (see
    :data:`PREPACK_MIN_FEATURES`).  The parameters, and so the state-dict keys, stay as they are:
    the packed weights are copies cached on ``owner`` (inference only; not in the state dict),
    rebuilt when a parameter moves or is modified in place (address or version counter changes:
    ``load_state_dict``, an optimizer step, ``.to()``).  ``params`` is called only to (re)build
    them.  Invisible to that check: edits through ``.data`` and parameters replaced by new
    objects; call :meth:`DUET.clear_inference_cache` (or ``train()``/``eval()``) after those.
    """
    kind, weight, bias = _packed_params(owner, name, params)
    if kind == "onednn":
        if x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
            return None
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    if kind == "dense":
        return F.linear(x, weight, bias)
    return None


def linear(x: Tensor, layer: nn.Linear) -> Tensor:
    """``layer(x)``, through :func:`packed_linear`'s oneDNN path when the layer is wide enough and
    no gradient is needed."""
    if (
        layer.in_features >= PREPACK_MIN_FEATURES
        and layer.out_features >= PREPACK_MIN_FEATURES
        and inference_only(layer)
    ):
        y = packed_linear(layer, "self", x, lambda: ((layer.weight, layer.bias),))
        if y is not None:
            return y
    return layer(x)


def _pairs(*layers: nn.Linear) -> Params:
    return [(layer.weight, layer.bias) for layer in layers]


def attend(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float, scores: list | None
) -> Tensor:
    """Scaled dot-product attention over heads: q (B, h, Lq, d), k/v (B, h, Lk, d).

    ``mask`` is additive and broadcastable to (B, h, Lq, Lk).  When ``scores`` is a list, the
    pre-softmax scores (mask included) are appended to it and attention is computed explicitly;
    otherwise the fused SDPA kernel is used (same result, no copy of the scores kept).
    """
    if mask is not None and mask.dtype != q.dtype:
        mask = mask.to(q.dtype)
    if scores is None:
        if q.is_cuda and CUDA_SDPA_BACKENDS is not None:
            with sdpa_kernel(CUDA_SDPA_BACKENDS):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
    if mask is not None:
        s = s + mask
    scores.append(s)
    probs = F.dropout(s.softmax(dim=-1), p=dropout_p)
    return probs @ v


def pack_views_objects(views: Tensor, objects: Tensor, view_lens: Tensor, obj_lens: Tensor, n: int) -> Tensor:
    """Per sample its first ``view_lens`` rows of ``views`` (B, V, H), then its first ``obj_lens``
    rows of ``objects`` (B, O, H), zero-padded to ``n`` rows: (B, n, H).

    Gathers and selects on tensors only (no per-sample loop, no host sync), so that it traces into
    an exported graph with dynamic shapes; every output row is a copy of one input row or zero."""
    b, _, h = views.shape
    # a zero row after the objects: a batch without any object still has a row to gather from (no
    # Python branch on the shape, so that a traced graph takes any number of objects, none included)
    objects = torch.cat([objects.to(views.dtype), views.new_zeros(b, 1, h)], dim=1)
    j = torch.arange(n, device=views.device)[None, :]
    vl, ol = view_lens.to(views.device)[:, None], obj_lens.to(views.device)[:, None]
    vi = j.clamp(max=views.size(1) - 1).expand(b, n)
    oi = (j - vl).clamp(min=0, max=objects.size(1) - 1)
    v = views.gather(1, vi[..., None].expand(b, n, h))
    o = objects.gather(1, oi[..., None].expand(b, n, h))
    zero = views.new_zeros(())
    return torch.where((j < vl)[..., None], v, torch.where((j < vl + ol)[..., None], o, zero))


# ============================================================================ BERT building blocks


class BertSelfAttention(nn.Module):
    """Multi-head attention with separate query/key/value projections (BERT naming).

    Used as self-attention (keys from the input) and as cross-attention (keys from a context, or
    from precomputed ``kv``, e.g. the cached text keys/values of an episode).
    """

    def __init__(self, config: DUETConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_size = config.head_size
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(h, h)
        self.value = nn.Linear(h, h)
        self.dropout_p = config.attention_dropout

    def split_heads(self, x: Tensor) -> Tensor:
        """(B, L, H) -> (B, h, L, d)."""
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_size).transpose(1, 2)

    def key_value(self, ctx: Tensor) -> tuple[Tensor, Tensor]:
        """Projected, head-split keys and values of a context sequence."""
        kv = None
        if inference_only(self.key, self.value):  # one packed product
            kv = packed_linear(self, "kv", ctx, lambda: _pairs(self.key, self.value))
        if kv is None:
            return self.split_heads(self.key(ctx)), self.split_heads(self.value(ctx))
        bsz, n, _ = ctx.shape
        k, v = kv.view(bsz, n, 2, self.num_heads, self.head_size).permute(2, 0, 3, 1, 4).unbind(0)
        return k, v

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None,
        ctx: Tensor | None = None,
        kv: tuple[Tensor, Tensor] | None = None,
        scores: list | None = None,
    ) -> Tensor:
        qkv = None
        if kv is None and ctx is None and inference_only(self.query, self.key, self.value):
            # Self-attention at inference: one packed query/key/value product.
            qkv = packed_linear(self, "qkv", x, lambda: _pairs(self.query, self.key, self.value))
        if qkv is not None:
            bsz, n, _ = x.shape
            qkv = qkv.view(bsz, n, 3, self.num_heads, self.head_size)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, h, L, d)
        else:
            q = self.split_heads(linear(x, self.query))
            k, v = kv if kv is not None else self.key_value(x if ctx is None else ctx)
        p = self.dropout_p if self.training else 0.0
        out = attend(q, k, v, mask, p, scores)
        b, _, n, _ = out.shape
        return out.transpose(1, 2).reshape(b, n, -1)


class BertSelfOutput(nn.Module):
    """Post-LN residual: LayerNorm(x + dropout(dense(h)))."""

    def __init__(self, config: DUETConfig, in_size: int | None = None) -> None:
        super().__init__()
        self.dense = nn.Linear(in_size or config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, h: Tensor, x: Tensor) -> Tensor:
        h = linear(h, self.dense)
        if self.training:
            h = self.dropout(h)
        return self.LayerNorm(x + h)


class BertAttention(nn.Module):
    """Self-attention + post-LN residual."""

    def __init__(self, config: DUETConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, x: Tensor, mask: Tensor | None, scores: list | None = None) -> Tensor:
        return self.output(self.self(x, mask, scores=scores), x)


class BertXAttention(nn.Module):
    """Cross-attention (queries from x, keys/values from a context) + post-LN residual."""

    def __init__(self, config: DUETConfig) -> None:
        super().__init__()
        self.att = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(
        self, x: Tensor, kv: tuple[Tensor, Tensor], mask: Tensor, scores: list | None = None
    ) -> Tensor:
        return self.output(self.att(x, mask, kv=kv, scores=scores), x)


class BertIntermediate(nn.Module):
    """First FFN half: GELU(dense(x)), exact erf GELU."""

    def __init__(self, config: DUETConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(linear(x, self.dense))


class BertLayer(nn.Module):
    """A standard post-LN BERT layer: self-attention, then FFN, each with residual + LayerNorm."""

    def __init__(self, config: DUETConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertSelfOutput(config, in_size=config.intermediate_size)

    def forward(self, x: Tensor, mask: Tensor, scores: list | None = None) -> Tensor:
        x = self.attention(x, mask, scores)
        return self.output(self.intermediate(x), x)


# ============================================================================ text


class TextEmbeddings(nn.Module):
    """BERT embeddings: word + position + token type, then LayerNorm and dropout."""

    def __init__(self, config: DUETConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, h, padding_idx=0)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, h)
        # Row 0 types text tokens; row 1 is added to every panorama token.
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, h)
        self.LayerNorm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, txt_ids: Tensor) -> Tensor:
        positions = torch.arange(txt_ids.size(1), device=txt_ids.device)
        x = (
            self.word_embeddings(txt_ids)
            + self.position_embeddings(positions)[None]
            + self.token_type_embeddings.weight[0]
        )
        return self.dropout(self.LayerNorm(x))


class TextEncoder(nn.Module):
    """``num_l_layers`` BERT layers over the instruction."""

    def __init__(self, config: DUETConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_l_layers))

    def forward(self, x: Tensor, txt_masks: Tensor, taps: Taps | None = None) -> Tensor:
        mask = key_mask(txt_masks, x.dtype)
        for layer in self.layer:
            x = layer(x, mask, _tap_list(taps, "text.attentions"))
            _tap_append(taps, "text.hidden_states", x)
        return x


# ============================================================================ panorama


class PanoSelfAttention(nn.Module):
    """Multi-head self-attention with torch.nn.MultiheadAttention's packed parameter layout."""

    def __init__(self, config: DUETConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * h, h))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * h))
        self.out_proj = nn.Linear(h, h)
        self.dropout_p = config.hidden_dropout  # upstream passes the layer's dropout to MHA

    def _in_proj(self) -> Params:
        return ((self.in_proj_weight, self.in_proj_bias),)

    def forward(self, x: Tensor, mask: Tensor, scores: list | None = None) -> Tensor:
        b, n, h = x.shape
        qkv = None
        if inference_only(self):
            qkv = packed_linear(self, "in_proj", x, self._in_proj)
        if qkv is None:
            qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.view(b, n, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head size)
        p = self.dropout_p if self.training else 0.0
        out = attend(q, k, v, mask, p, scores)
        return linear(out.transpose(1, 2).reshape(b, n, h), self.out_proj)


class PanoLayer(nn.Module):
    """Pre-LN transformer layer, as ``nn.TransformerEncoderLayer(norm_first=True, activation='gelu')``."""

    def __init__(self, config: DUETConfig) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.pano_layer_norm_eps
        self.self_attn = PanoSelfAttention(config)
        self.linear1 = nn.Linear(h, config.intermediate_size)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.linear2 = nn.Linear(config.intermediate_size, h)
        self.norm1 = nn.LayerNorm(h, eps=eps)
        self.norm2 = nn.LayerNorm(h, eps=eps)
        self.dropout1 = nn.Dropout(config.hidden_dropout)
        self.dropout2 = nn.Dropout(config.hidden_dropout)

    def forward(self, x: Tensor, mask: Tensor, scores: list | None = None) -> Tensor:
        x = x + self.dropout1(self.self_attn(self.norm1(x), mask, scores))
        ffn = linear(self.dropout(F.gelu(linear(self.norm2(x), self.linear1))), self.linear2)
        return x + self.dropout2(ffn)


class PanoEncoder(nn.Module):
    """``num_pano_layers`` pre-LN layers followed by a final LayerNorm (as nn.TransformerEncoder)."""

    def __init__(self, config: DUETConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(PanoLayer(config) for _ in range(config.num_pano_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: Tensor, pano_masks: Tensor, taps: Taps | None = None) -> Tensor:
        mask = key_mask(pano_masks, x.dtype)
        for layer in self.layers:
            x = layer(x, mask, _tap_list(taps, "pano.attentions"))
            _tap_append(taps, "pano.hidden_states", x)
        return self.norm(x)


class ImageEmbeddings(nn.Module):
    """Panorama token embeddings (views, then objects) and the panorama encoder.

    token = LN_img(W_img f) + LN_loc(W_loc loc) + nav_type_emb[type] + token_type_emb[1]
    -> LayerNorm -> dropout -> pano encoder.  Objects share ``img_linear``/``img_layer_norm`` when their
    feature size equals the view feature size, and have their own projection otherwise.
    """

    def __init__(self, config: DUETConfig) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.layer_norm_eps
        self.img_linear = nn.Linear(config.image_feat_size, h)
        self.img_layer_norm = nn.LayerNorm(h, eps=eps)
        self.loc_linear = nn.Linear(config.pano_loc_size, h)
        self.loc_layer_norm = nn.LayerNorm(h, eps=eps)
        if config.separate_obj_projection:
            self.obj_linear = nn.Linear(config.obj_feat_size, h)
            self.obj_layer_norm = nn.LayerNorm(h, eps=eps)
        else:
            self.obj_linear = self.obj_layer_norm = None
        self.nav_type_embedding = nn.Embedding(3, h)  # 0 other view, 1 navigable view, 2 object
        self.layer_norm = nn.LayerNorm(h, eps=eps)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.pano_encoder = PanoEncoder(config) if config.num_pano_layers > 0 else None

    def embed_views(self, view_img_fts: Tensor) -> Tensor:
        return self.img_layer_norm(linear(view_img_fts, self.img_linear))

    def embed_objects(self, obj_img_fts: Tensor) -> Tensor:
        if self.obj_linear is None:
            return self.embed_views(obj_img_fts)
        return self.obj_layer_norm(self.obj_linear(obj_img_fts))


# ============================================================================ cross-modal encoders


class CrossModalLayer(nn.Module):
    """One cross-modal layer (upstream ``GraphLXRTXLayer`` without the language-update branch).

    (a) visual tokens attend to the text, (b) visual self-attention (+ optional graph bias, already
    folded into ``mask``), (c) FFN; each followed by residual + LayerNorm.  The text is not updated.
    """

    def __init__(self, config: DUETConfig) -> None:
        super().__init__()
        # Registration order as upstream, so state_dict() lists keys in checkpoint order.
        self.visn_self_att = BertAttention(config)
        self.visn_inter = BertIntermediate(config)
        self.visn_output = BertSelfOutput(config, in_size=config.intermediate_size)
        self.visual_attention = BertXAttention(config)

    def forward(
        self,
        x: Tensor,
        mask: Tensor,
        txt_kv: tuple[Tensor, Tensor],
        txt_mask: Tensor,
        taps: Taps | None = None,
        prefix: str = "",
    ) -> Tensor:
        x = self.visual_attention(x, txt_kv, txt_mask, _tap_list(taps, f"{prefix}.cross_attentions"))
        x = self.visn_self_att(x, mask, _tap_list(taps, f"{prefix}.attentions"))
        return self.visn_output(self.visn_inter(x), x)


class CrossModalEncoder(nn.Module):
    """``num_x_layers`` cross-modal layers (one stack per branch)."""

    def __init__(self, config: DUETConfig) -> None:
        super().__init__()
        self.x_layers = nn.ModuleList(CrossModalLayer(config) for _ in range(config.num_x_layers))

    def text_kv(self, txt_embeds: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Every layer's projected text keys/values (constant within an episode)."""
        return [layer.visual_attention.att.key_value(txt_embeds) for layer in self.x_layers]

    def forward(
        self,
        x: Tensor,
        mask: Tensor,
        txt_kv: Sequence[tuple[Tensor, Tensor]],
        txt_mask: Tensor,
        taps: Taps | None = None,
        prefix: str = "",
    ) -> Tensor:
        for layer, kv in zip(self.x_layers, txt_kv):
            x = layer(x, mask, kv, txt_mask, taps, prefix)
            _tap_append(taps, f"{prefix}.hidden_states", x)
        return x


@dataclass
class TextKV:
    """Per-episode cache of the text side of every cross-attention (see :meth:`DUET.precompute_text_kv`).

    Pass it as ``batch['txt_kv']`` in 'navigation' mode; ``txt_embeds``/``txt_masks`` may then be
    omitted.  Valid for as long as the text encoder output it came from (one episode).
    """

    txt_masks: Tensor  # (B, L) bool
    mask: Tensor | None  # (B, 1, 1, L) additive; None when no token is padded
    global_kv: list[tuple[Tensor, Tensor]]  # per global layer: keys, values (B, h, L, d)
    local_kv: list[tuple[Tensor, Tensor]]  # per local layer
    og_text: Tensor | None = None  # (B, H) the instruction for the grounding match (og_text_encoder)


class GlobalMapEncoder(nn.Module):
    """Coarse-scale branch over the global map slots ([stop] + visited nodes + ghost nodes).

    input = gmap_img_embeds + step_emb[gmap_step_ids] + LN(W_pos gmap_pos_fts); the self-attention of
    every layer gets the graph bias ``a * d + b`` of the pair distances (shared by heads and layers).
    """

    def __init__(self, config: DUETConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.gmap_pos_embeddings = nn.Sequential(
            nn.Linear(config.node_pos_size, h), nn.LayerNorm(h, eps=config.layer_norm_eps)
        )
        self.gmap_step_embeddings = nn.Embedding(config.max_action_steps, h)
        self.encoder = CrossModalEncoder(config)
        self.sprel_linear = nn.Linear(1, 1) if config.graph_sprels else None

    def forward(
        self,
        gmap_img_embeds: Tensor,
        gmap_step_ids: Tensor,
        gmap_pos_fts: Tensor,
        gmap_masks: Tensor,
        gmap_pair_dists: Tensor,
        text: TextKV,
        taps: Taps | None = None,
    ) -> Tensor:
        x = (
            gmap_img_embeds
            + self.gmap_step_embeddings(gmap_step_ids)
            + self.gmap_pos_embeddings(gmap_pos_fts)
        )
        _tap_set(taps, "global.embeddings", x)
        mask = key_mask(gmap_masks, x.dtype)  # (B, 1, 1, G) or None
        if self.sprel_linear is not None:
            # a * d + b for every pair, (B, G, G) metres -> (B, 1, G, G), computed once and shared
            # by every layer; [stop] and padded entries have d = 0 and still get b.
            lin = self.sprel_linear
            bias = torch.addcmul(lin.bias, gmap_pair_dists.unsqueeze(1), lin.weight.view(()))
            mask = bias if mask is None else mask + bias
        x = self.encoder(x, mask, text.global_kv, text.mask, taps, "global")
        _tap_set(taps, "global.output", x)
        return x


class LocalViewpointEncoder(nn.Module):
    """Fine-scale branch over the current node's tokens ([stop] + panorama outputs).

    input = vp_img_embeds + LN(W_pos vp_pos_fts).
    """

    def __init__(self, config: DUETConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.vp_pos_embeddings = nn.Sequential(
            nn.Linear(config.vp_pos_size, h), nn.LayerNorm(h, eps=config.layer_norm_eps)
        )
        self.encoder = CrossModalEncoder(config)

    def forward(
        self,
        vp_img_embeds: Tensor,
        vp_pos_fts: Tensor,
        vp_masks: Tensor,
        text: TextKV,
        taps: Taps | None = None,
    ) -> Tensor:
        x = vp_img_embeds + self.vp_pos_embeddings(vp_pos_fts)
        _tap_set(taps, "local.embeddings", x)
        x = self.encoder(x, key_mask(vp_masks, x.dtype), text.local_kv, text.mask, taps, "local")
        _tap_set(taps, "local.output", x)
        return x


# ============================================================================ heads and fusion


class ClsPrediction(nn.Module):
    """Scoring head: Linear -> ReLU -> LayerNorm -> Linear(., 1)."""

    def __init__(self, hidden_size: int, input_size: int | None = None, eps: float = 1e-12) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(input_size or hidden_size, hidden_size),
            nn.ReLU(),
            nn.LayerNorm(hidden_size, eps=eps),
            nn.Linear(hidden_size, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


NodeIds = Sequence[Sequence[Any]]
"""Per sample, the node id of every slot; slot 0 is the [stop] token (``None``)."""


def fuse_local_into_global(
    global_logits: Tensor,
    local_logits: Tensor,
    gmap_vpids: NodeIds,
    gmap_visited_masks: Tensor,
    vp_cand_vpids: NodeIds,
) -> Tensor:
    """Map the local (current node) scores onto the global slots and add them.

    STOP: fused[0] = global[0] + local[0].  Each unvisited node j > 0 gets the local score of the
    candidate row showing it, or, if it is not adjacent, ``bw``: the sum of the local scores of every
    candidate that is already visited ("going back" is spread, unsplit, to every non-adjacent ghost).
    Visited and padded slots keep their ``-inf``.  ``gmap_vpids``/``vp_cand_vpids`` are lists of node ids
    per sample (entries past each list's length are padding and receive nothing).
    """
    return fuse_with_indices(
        global_logits,
        local_logits,
        *fusion_indices(gmap_vpids, gmap_visited_masks, vp_cand_vpids, local_logits.size(1)),
    )


def fusion_indices(
    gmap_vpids: NodeIds, gmap_visited_masks: Tensor, vp_cand_vpids: NodeIds, num_local: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The node-id bookkeeping of :func:`fuse_local_into_global` as tensors (the ids are Python
    objects): ``cand_row`` (B, G) int64, the local row showing slot j (0 = none); ``backtrack``
    (B, G) bool, slot j receives the "go back" score; ``bw_rows`` (B, N) bool, candidate rows
    already visited (N = ``num_local``).  On ``gmap_visited_masks``' device."""
    b, g = gmap_visited_masks.shape
    n = num_local
    # Built as Python lists (the ids are Python objects) and turned into tensors once.
    cand_row = [[0] * g for _ in range(b)]  # local row that shows slot j (0 = none)
    backtrack = [[False] * g for _ in range(b)]  # slot j receives bw
    bw_rows = [[False] * n for _ in range(b)]  # candidate rows already visited
    visited = gmap_visited_masks.tolist()
    for i in range(b):
        visited_nodes = {vp for vp, v in zip(gmap_vpids[i], visited[i]) if v}
        row_of: dict[Any, int] = {}
        for j, vp in enumerate(vp_cand_vpids[i]):
            if j == 0:
                continue
            if vp in visited_nodes:
                bw_rows[i][j] = True
            else:
                row_of[vp] = j
        for j, vp in enumerate(gmap_vpids[i]):
            if j == 0 or vp in visited_nodes:
                continue
            if vp in row_of:
                cand_row[i][j] = row_of[vp]
            else:
                backtrack[i][j] = True
    device = gmap_visited_masks.device
    return (
        torch.tensor(cand_row, dtype=torch.long, device=device),
        torch.tensor(backtrack, dtype=torch.bool, device=device),
        torch.tensor(bw_rows, dtype=torch.bool, device=device),
    )


def fuse_with_indices(
    global_logits: Tensor, local_logits: Tensor, cand_row: Tensor, backtrack: Tensor, bw_rows: Tensor
) -> Tensor:
    """The tensor part of :func:`fuse_local_into_global`, given :func:`fusion_indices`."""
    bw = local_logits.masked_fill(~bw_rows, 0.0).sum(dim=1, keepdim=True)  # (B, 1)
    added = torch.where(
        cand_row > 0,
        local_logits.gather(1, cand_row),
        torch.where(backtrack, bw, torch.zeros_like(bw)),
    )
    added = torch.cat([local_logits[:, :1], added[:, 1:]], dim=1)  # slot 0: STOP
    return global_logits + added


# ============================================================================ the model


class DUET(nn.Module):
    """The DUET navigation network (teacher and student).  See the module docstring."""

    def __init__(self, config: DUETConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        eps = config.layer_norm_eps
        self.embeddings = TextEmbeddings(config)
        self.lang_encoder = TextEncoder(config)
        self.img_embeddings = ImageEmbeddings(config)
        self.local_encoder = LocalViewpointEncoder(config)
        self.global_encoder = GlobalMapEncoder(config)
        self.global_sap_head = ClsPrediction(h, eps=eps)
        self.local_sap_head = ClsPrediction(h, eps=eps)
        self.sap_fuse_linear = (
            ClsPrediction(h, input_size=2 * h, eps=eps) if config.fusion == "dynamic" else None
        )
        self.og_head = ClsPrediction(h, eps=eps) if config.use_objects else None
        self.og_text_proj = nn.Linear(config.og_text_size, h) if config.og_text_encoder else None
        # The upstream agent wrapper's dropout on raw image features (panorama mode only).
        self.feat_dropout = nn.Dropout(config.feat_dropout)
        if not self.embeddings.word_embeddings.weight.is_meta:  # nothing to fill on 'meta'
            self.apply(self._init_weights)
            if self.og_text_proj is not None:  # zero: at init the grounding is DUET's own
                nn.init.zeros_(self.og_text_proj.weight)

    def clear_inference_cache(self) -> None:
        """Drop the packed projection weights cached for inference (see :func:`packed_linear`);
        they are rebuilt on the next inference call.  ``train()``/``eval()`` call this too."""
        for module in self.modules():
            module.__dict__.pop("_packed_cache", None)

    def train(self, mode: bool = True) -> "DUET":
        self.clear_inference_cache()
        return super().train(mode)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "DUET":  # .to(), .float(), ...
        self.clear_inference_cache()
        return super()._apply(fn, *args, **kwargs)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """BERT initialisation (as upstream): N(0, 0.02) weights, zero biases, unit LayerNorms."""
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, PanoSelfAttention):
            # nn.MultiheadAttention's own init, which BERT's init does not touch.
            nn.init.xavier_uniform_(module.in_proj_weight)
            nn.init.zeros_(module.in_proj_bias)

    # ------------------------------------------------------------------------ dispatch

    def forward(self, mode: str, batch: Mapping[str, Any], taps: bool = False) -> Any:
        """Run one of the three modes on a batch dict with the reference input names.

        * ``'language'``: ``txt_ids``, ``txt_masks`` -> ``txt_embeds`` (B, L, H).
        * ``'panorama'``: ``view_img_fts``, ``loc_fts``, ``nav_types``, ``view_lens`` and optionally
          ``obj_img_fts``, ``obj_lens`` -> ``(pano_embeds, pano_masks)``.
        * ``'navigation'``: ``txt_embeds``, ``txt_masks`` (or a cached ``txt_kv``), ``gmap_img_embeds``,
          ``gmap_step_ids``, ``gmap_pos_fts``, ``gmap_masks``, ``gmap_pair_dists``,
          ``gmap_visited_masks``, ``gmap_vpids``, ``vp_img_embeds``, ``vp_pos_fts``, ``vp_masks``,
          ``vp_nav_masks``, ``vp_cand_vpids`` and optionally ``vp_obj_masks`` -> dict with
          ``gmap_embeds``, ``vp_embeds``, ``global_logits``, ``local_logits``, ``fused_logits``,
          ``obj_logits`` (None without objects) and ``fuse_weights`` (B, 1).

        Other keys in ``batch`` are ignored.  With ``taps=True`` the result is ``(outputs, taps)``;
        the taps dict holds, per mode ('text', 'pano', 'global', 'local' prefixes):
        ``<p>.embeddings`` (encoder input), ``<p>.hidden_states`` (list, one per layer),
        ``<p>.attentions`` (list of (B, heads, Lq, Lk) pre-softmax self-attention scores, mask
        added), for the cross-modal branches also ``<p>.cross_attentions`` (visual -> text scores),
        ``<p>.output`` (encoder output), and in navigation mode ``action_probs`` = softmax(fused).
        """
        recorder: Taps | None = {} if taps else None
        if mode == "language":
            out: Any = self.forward_language(batch["txt_ids"], batch["txt_masks"], recorder)
        elif mode == "panorama":
            out = self.forward_panorama(
                batch["view_img_fts"],
                batch["loc_fts"],
                batch["nav_types"],
                batch["view_lens"],
                obj_img_fts=batch.get("obj_img_fts"),
                obj_lens=batch.get("obj_lens"),
                taps=recorder,
            )
        elif mode == "navigation":
            text = batch.get("txt_kv")
            if text is None:
                text = self.precompute_text_kv(batch["txt_embeds"], batch["txt_masks"], batch.get("instr_embeds"))
            out = self.forward_navigation(
                text,
                gmap_img_embeds=batch["gmap_img_embeds"],
                gmap_step_ids=batch["gmap_step_ids"],
                gmap_pos_fts=batch["gmap_pos_fts"],
                gmap_masks=batch["gmap_masks"],
                gmap_pair_dists=batch["gmap_pair_dists"],
                gmap_visited_masks=batch["gmap_visited_masks"],
                gmap_vpids=batch["gmap_vpids"],
                vp_img_embeds=batch["vp_img_embeds"],
                vp_pos_fts=batch["vp_pos_fts"],
                vp_masks=batch["vp_masks"],
                vp_nav_masks=batch["vp_nav_masks"],
                vp_cand_vpids=batch["vp_cand_vpids"],
                vp_obj_masks=batch.get("vp_obj_masks"),
                taps=recorder,
            )
        else:
            raise ValueError(f"unknown mode {mode!r} (expected language, panorama or navigation)")
        return (out, recorder) if taps else out

    # ------------------------------------------------------------------------ language

    def forward_language(self, txt_ids: Tensor, txt_masks: Tensor, taps: Taps | None = None) -> Tensor:
        """Instruction tokens (B, L) int64 (0 = pad) and mask (B, L) bool -> (B, L, H)."""
        x = self.embeddings(txt_ids)
        _tap_set(taps, "text.embeddings", x)
        x = self.lang_encoder(x, txt_masks, taps)
        _tap_set(taps, "text.output", x)
        return x

    # ------------------------------------------------------------------------ panorama

    def forward_panorama(
        self,
        view_img_fts: Tensor,
        loc_fts: Tensor,
        nav_types: Tensor,
        view_lens: Tensor,
        obj_img_fts: Tensor | None = None,
        obj_lens: Tensor | None = None,
        taps: Taps | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Encode the current node's panorama.

        Per sample the tokens are its first ``view_lens`` views then its first ``obj_lens`` objects,
        zero-padded to N = ``loc_fts.size(1)``; ``loc_fts``/``nav_types`` follow that packed order.
        Returns ``pano_embeds`` (B, N, H) and ``pano_masks`` (B, N) (first view_len + obj_len True).
        """
        emb = self.img_embeddings
        view_embeds = emb.embed_views(self.feat_dropout(view_img_fts))
        n = loc_fts.size(1)
        if obj_img_fts is not None:
            if obj_lens is None:
                raise ValueError("obj_img_fts given without obj_lens")
            obj_embeds = emb.embed_objects(self.feat_dropout(obj_img_fts))
            img_embeds = pack_views_objects(view_embeds, obj_embeds, view_lens, obj_lens, n)
            pano_lens = view_lens + obj_lens
        else:
            img_embeds = view_embeds
            pano_lens = view_lens

        x = (
            img_embeds
            + emb.loc_layer_norm(emb.loc_linear(loc_fts))
            + emb.nav_type_embedding(nav_types)
            + self.embeddings.token_type_embeddings.weight[1]
        )
        x = emb.dropout(emb.layer_norm(x))
        _tap_set(taps, "pano.embeddings", x)
        pano_masks = torch.arange(n, device=x.device)[None, :] < pano_lens.to(x.device)[:, None]
        if emb.pano_encoder is not None:
            x = emb.pano_encoder(x, pano_masks, taps)
        _tap_set(taps, "pano.output", x)
        return x, pano_masks

    # ------------------------------------------------------------------------ navigation

    def precompute_text_kv(self, txt_embeds: Tensor, txt_masks: Tensor, instr_embeds: Tensor | None = None) -> TextKV:
        """Project the text keys/values of every cross-modal layer once per episode.

        The text is never updated by the cross-modal layers, so the result can be passed as
        ``batch['txt_kv']`` to every 'navigation' call of the episode (outputs are identical).
        A model with ``og_text_encoder`` also needs ``instr_embeds`` (B, og_text_size): the
        instructions embedded by that sentence encoder (:meth:`grounding_text`).
        """
        mask = key_mask(txt_masks, txt_embeds.dtype)
        branches = (self.global_encoder.encoder, self.local_encoder.encoder)
        atts = [layer.visual_attention.att for enc in branches for layer in enc.x_layers]
        linears = [lin for a in atts for lin in (a.key, a.value)]
        og_text = self.grounding_text(instr_embeds)
        kv = None
        if atts and inference_only(*linears):
            # the keys and values of every layer of both branches in one matrix product
            kv = packed_linear(self, "text_kv", txt_embeds, lambda: _pairs(*linears))
        if kv is None:
            g_kv, l_kv = branches[0].text_kv(txt_embeds), branches[1].text_kv(txt_embeds)
            return TextKV(txt_masks, mask, g_kv, l_kv, og_text)
        bsz, n, _ = txt_embeds.shape
        heads, size = atts[0].num_heads, atts[0].head_size
        kv = kv.view(bsz, n, 2 * len(atts), heads, size)
        kv = kv.permute(2, 0, 3, 1, 4).contiguous()  # (2 * layers, B, heads, L, head size)
        pairs = [(kv[2 * i], kv[2 * i + 1]) for i in range(len(atts))]
        n_global = len(branches[0].x_layers)
        return TextKV(txt_masks, mask, pairs[:n_global], pairs[n_global:], og_text)

    def grounding_text(self, instr_embeds: Tensor | None) -> Tensor | None:
        """The instruction as the grounding match sees it, (B, H): ``og_text_proj`` of its sentence
        embedding (B, og_text_size); None without ``og_text_encoder``."""
        if self.og_text_proj is None:
            return None
        if instr_embeds is None:
            raise ValueError(f"this model grounds objects with the instructions' {self.config.og_text_encoder} "
                             "embeddings: give instr_embeds (B, "
                             f"{self.config.og_text_size}) with the text (minivln.features.embed)")
        return self.og_text_proj(instr_embeds.to(self.og_text_proj.weight.dtype))

    def forward_navigation(
        self,
        text: TextKV,
        *,
        gmap_img_embeds: Tensor,
        gmap_step_ids: Tensor,
        gmap_pos_fts: Tensor,
        gmap_masks: Tensor,
        gmap_pair_dists: Tensor,
        gmap_visited_masks: Tensor,
        gmap_vpids: NodeIds,
        vp_img_embeds: Tensor,
        vp_pos_fts: Tensor,
        vp_masks: Tensor,
        vp_nav_masks: Tensor,
        vp_cand_vpids: NodeIds,
        vp_obj_masks: Tensor | None = None,
        taps: Taps | None = None,
        fusion_idx: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> dict[str, Tensor | None]:
        """Both cross-modal branches, the scoring heads and the local -> global fusion.

        ``fusion_idx``: the :func:`fusion_indices` of the batch, computed beforehand (the node-id
        lists are then not read; tensor-only entry points, :mod:`minivln.model.tensor_modes`)."""
        gmap_embeds = self.global_encoder(
            gmap_img_embeds, gmap_step_ids, gmap_pos_fts, gmap_masks, gmap_pair_dists, text, taps
        )
        vp_embeds = self.local_encoder(vp_img_embeds, vp_pos_fts, vp_masks, text, taps)

        # Fusion gate: one scalar per sample from the two [stop] tokens.
        if self.sap_fuse_linear is not None:
            fuse_weights = torch.sigmoid(
                self.sap_fuse_linear(torch.cat([gmap_embeds[:, 0], vp_embeds[:, 0]], dim=1))
            )
        else:
            fuse_weights = gmap_embeds.new_full((gmap_embeds.size(0), 1), 0.5)

        neg_inf = float("-inf")
        global_logits = self.global_sap_head(gmap_embeds).squeeze(2) * fuse_weights
        global_logits = global_logits.masked_fill(gmap_visited_masks | ~gmap_masks, neg_inf)
        local_logits = self.local_sap_head(vp_embeds).squeeze(2) * (1 - fuse_weights)
        local_logits = local_logits.masked_fill(~vp_nav_masks, neg_inf)
        if fusion_idx is not None:
            fused_logits = fuse_with_indices(global_logits, local_logits, *fusion_idx)
        else:
            fused_logits = fuse_local_into_global(
                global_logits, local_logits, gmap_vpids, gmap_visited_masks, vp_cand_vpids
            )

        obj_logits = None
        if self.og_head is not None and vp_obj_masks is not None:
            obj_logits = self.og_head(vp_embeds).squeeze(2)
            if text.og_text is not None:  # the shallow match of og_text_encoder
                obj_logits = obj_logits + (vp_img_embeds * text.og_text[:, None]).sum(-1)
            obj_logits = obj_logits.masked_fill(~vp_obj_masks, neg_inf)

        if taps is not None:
            taps["action_probs"] = fused_logits.softmax(dim=-1)
        return {
            "gmap_embeds": gmap_embeds,
            "vp_embeds": vp_embeds,
            "global_logits": global_logits,
            "local_logits": local_logits,
            "fused_logits": fused_logits,
            "obj_logits": obj_logits,
            "fuse_weights": fuse_weights,
        }


# ============================================================================ compilation


COMPILED_LAYERS: tuple[type[nn.Module], ...] = (BertLayer, PanoLayer, CrossModalLayer)
"""The blocks :func:`compile_layers` compiles: every transformer layer of every encoder."""


def compile_layers(model: nn.Module, *, backend: str = "inductor", dynamic: bool = True) -> int:
    """``torch.compile`` every transformer layer of ``model`` in place (:data:`COMPILED_LAYERS`);
    returns how many.  For training on a GPU, where a step is bound by the host launching a few
    thousand small kernels: each layer's forward and backward become a handful of fused kernels.

    Shapes are compiled as dynamic (text, panorama and map lengths change with every batch and
    navigation step).  Parameters and state-dict keys are unchanged (``nn.Module.compile``), so
    checkpoints and resume are unaffected.  The first iterations pay the compilation (tens of
    seconds to minutes).  Meant for gradient steps: run inference (validation, navigation) under
    ``torch.compiler.set_stance("force_eager")``, as the trainer does, so that the inference fast
    path (:func:`packed_linear`) runs eagerly as it is.
    """
    n = 0
    for module in model.modules():
        if isinstance(module, COMPILED_LAYERS):
            module.compile(backend=backend, dynamic=dynamic)
            n += 1
    return n


# ============================================================================ tap helpers


def _tap_list(taps: Taps | None, key: str) -> list | None:
    """The list under ``key`` (created on first use), or None when taps are off."""
    if taps is None:
        return None
    return taps.setdefault(key, [])


def _tap_append(taps: Taps | None, key: str, value: Tensor) -> None:
    if taps is not None:
        taps.setdefault(key, []).append(value)


def _tap_set(taps: Taps | None, key: str, value: Any) -> None:
    if taps is not None:
        taps[key] = value
