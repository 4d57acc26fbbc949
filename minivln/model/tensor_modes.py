"""Tensor-only entry points of the DUET network, for tracing and export (ONNX, see ``minivln.deploy``).

``model(mode, batch)`` dispatches on a string and reads a dict that also holds Python lists of node
ids; the modules here take and return tensors only, with fixed input/output names and orders, and
run inside :func:`~minivln.model.duet.plain_ops` (no packed/oneDNN fast path, attention masks always
applied: no data-dependent branch, no private operator).  They wrap a :class:`~minivln.model.duet.DUET`
(sharing its parameters) and compute the same outputs as its modes:

=============  ===============================================  ====================================
entry point    inputs                                           outputs
=============  ===============================================  ====================================
``language``   txt_ids (B, L) int64, txt_masks (B, L) bool      txt_embeds (B, L, H)
``text_kv``    txt_embeds (B, L, H)                             txt_kv (2X, B, heads, L, H/heads)
               {+ instr_embeds (B, E)}                          {+ og_text (B, H)}
``panorama``   view_img_fts (B, N, D), loc_fts (B, N, A+3),     pano_embeds (B, N, H),
               nav_types (B, N) int64, view_lens (B,) int64     pano_masks (B, N) bool
               [+ obj_img_fts (B, O, D_obj), obj_lens (B,)]
``navigation`` txt_kv, txt_masks, the ``gmap_*`` and ``vp_*``   gmap_embeds, vp_embeds,
               tensors of the batch, and the fusion indices     global_logits, local_logits,
               cand_row, backtrack, bw_rows (see                fused_logits, fuse_weights
               :func:`~minivln.model.duet.fusion_indices`)      [+ obj_logits (B, M)]
               [+ vp_obj_masks (B, M) bool] {+ og_text (B, H)}
=============  ===============================================  ====================================

The bracketed inputs and outputs are those of models with object tokens (REVERIE): their panorama
packs each sample's views then its objects (:func:`~minivln.model.duet.pack_views_objects`, gathers
only), and their navigation scores the local tokens as objects too (``obj_logits``, -inf where
``vp_obj_masks`` is False).  The braced ones are those of models with ``og_text_encoder`` (which
have object tokens): ``text_kv`` also takes the instructions' sentence embeddings ``instr_embeds``
(E = ``config.og_text_size``) and gives their grounding vector (:meth:`DUET.grounding_text`), and
navigation takes it last and adds its match with the local tokens to ``obj_logits``.
:func:`mode_inputs` / :func:`mode_outputs` give a model's names.

``text_kv`` is the per-episode text key/value cache (:meth:`DUET.precompute_text_kv`) as one tensor:
keys then values of every cross-modal layer, the global branch's layers first (X = both branches'
layers); :func:`unstack_text_kv` makes it a :class:`~minivln.model.duet.TextKV` again (with
``og_text``).  :func:`navigation_tensors` turns a navigation batch dict (with its id lists) into the
navigation inputs, in :data:`NAVIGATION_INPUTS` order.

"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from minivln.model.duet import DUET, TextKV, additive_mask, fusion_indices, plain_ops
from minivln.paths import DataError

MODES = ("language", "text_kv", "panorama", "navigation")

LANGUAGE_INPUTS = ("txt_ids", "txt_masks")
LANGUAGE_OUTPUTS = ("txt_embeds",)
TEXT_KV_INPUTS = ("txt_embeds",)
TEXT_KV_OUTPUTS = ("txt_kv",)
PANORAMA_INPUTS = ("view_img_fts", "loc_fts", "nav_types", "view_lens")
PANORAMA_OUTPUTS = ("pano_embeds", "pano_masks")
NAVIGATION_INPUTS = (
    "txt_kv", "txt_masks",
    "gmap_img_embeds", "gmap_step_ids", "gmap_pos_fts", "gmap_masks", "gmap_pair_dists",
    "gmap_visited_masks",
    "vp_img_embeds", "vp_pos_fts", "vp_masks", "vp_nav_masks",
    "cand_row", "backtrack", "bw_rows",
)  # fmt: skip
NAVIGATION_OUTPUTS = (
    "gmap_embeds", "vp_embeds", "global_logits", "local_logits", "fused_logits", "fuse_weights",
)  # fmt: skip

INPUTS = {"language": LANGUAGE_INPUTS, "text_kv": TEXT_KV_INPUTS, "panorama": PANORAMA_INPUTS,
          "navigation": NAVIGATION_INPUTS}
OUTPUTS = {"language": LANGUAGE_OUTPUTS, "text_kv": TEXT_KV_OUTPUTS, "panorama": PANORAMA_OUTPUTS,
           "navigation": NAVIGATION_OUTPUTS}
OBJECT_INPUTS = {"panorama": ("obj_img_fts", "obj_lens"), "navigation": ("vp_obj_masks",)}
OBJECT_OUTPUTS = {"navigation": ("obj_logits",)}
"""What models with object tokens add, after the inputs and outputs above."""
OG_TEXT_INPUTS = {"text_kv": ("instr_embeds",), "navigation": ("og_text",)}
OG_TEXT_OUTPUTS = {"text_kv": ("og_text",)}
"""What models with ``og_text_encoder`` add, after the object inputs and outputs."""

# Variable axes of every input and output (axis -> name); the other axes are fixed by the config.
# B: batch, L: instruction tokens, N: panorama tokens, G: global map slots, M: local tokens (N + 1);
# with object tokens, O: objects and V: views (see dynamic_axes).
DYNAMIC_AXES: dict[str, dict[int, str]] = {
    "txt_ids": {0: "B", 1: "L"}, "txt_masks": {0: "B", 1: "L"}, "txt_embeds": {0: "B", 1: "L"},
    "txt_kv": {1: "B", 3: "L"},
    "view_img_fts": {0: "B", 1: "N"}, "loc_fts": {0: "B", 1: "N"}, "nav_types": {0: "B", 1: "N"},
    "view_lens": {0: "B"}, "pano_embeds": {0: "B", 1: "N"}, "pano_masks": {0: "B", 1: "N"},
    "gmap_img_embeds": {0: "B", 1: "G"}, "gmap_step_ids": {0: "B", 1: "G"},
    "gmap_pos_fts": {0: "B", 1: "G"}, "gmap_masks": {0: "B", 1: "G"},
    "gmap_pair_dists": {0: "B", 1: "G", 2: "G"}, "gmap_visited_masks": {0: "B", 1: "G"},
    "vp_img_embeds": {0: "B", 1: "M"}, "vp_pos_fts": {0: "B", 1: "M"}, "vp_masks": {0: "B", 1: "M"},
    "vp_nav_masks": {0: "B", 1: "M"},
    "cand_row": {0: "B", 1: "G"}, "backtrack": {0: "B", 1: "G"}, "bw_rows": {0: "B", 1: "M"},
    "gmap_embeds": {0: "B", 1: "G"}, "vp_embeds": {0: "B", 1: "M"},
    "global_logits": {0: "B", 1: "G"}, "local_logits": {0: "B", 1: "M"},
    "fused_logits": {0: "B", 1: "G"}, "fuse_weights": {0: "B"},
    "obj_img_fts": {0: "B", 1: "O"}, "obj_lens": {0: "B"}, "vp_obj_masks": {0: "B", 1: "M"},
    "obj_logits": {0: "B", 1: "M"}, "instr_embeds": {0: "B"}, "og_text": {0: "B"},
}  # fmt: skip


class UnsupportedModelError(DataError):
    """The model cannot run through the tensor-only entry points (a :class:`DataError`: the command
    line reports it in one line and exits with 2)."""


def check_tensor_modes(model: DUET) -> None:
    """Raise :class:`UnsupportedModelError` unless ``model`` can run through these entry points."""
    if not isinstance(model, DUET):
        raise UnsupportedModelError(f"expected a DUET network, got {type(model).__name__}")


def mode_inputs(model: DUET, mode: str) -> tuple[str, ...]:
    """The input names of ``model``'s entry point ``mode``, in order (object inputs, then those of
    ``og_text_encoder``, last)."""
    cfg = model.config
    return (INPUTS[mode] + (OBJECT_INPUTS.get(mode, ()) if cfg.use_objects else ())
            + (OG_TEXT_INPUTS.get(mode, ()) if cfg.og_text_encoder else ()))


def dynamic_axes(model: DUET) -> dict[str, dict[int, str]]:
    """:data:`DYNAMIC_AXES` for ``model``: with object tokens the views are V of the N panorama
    tokens (N = V + O after packing), so ``view_img_fts``' second axis is V, not N.  ``instr_embeds``
    and ``og_text`` only for models with ``og_text_encoder`` (the others' export manifests stay as
    they were)."""
    axes = dict(DYNAMIC_AXES)
    if not model.config.og_text_encoder:
        del axes["instr_embeds"], axes["og_text"]
    if model.config.use_objects:
        axes["view_img_fts"] = {0: "B", 1: "V"}
    return axes


def mode_outputs(model: DUET, mode: str) -> tuple[str, ...]:
    """The output names of ``model``'s entry point ``mode``, in order (object outputs, then those of
    ``og_text_encoder``, last)."""
    cfg = model.config
    return (OUTPUTS[mode] + (OBJECT_OUTPUTS.get(mode, ()) if cfg.use_objects else ())
            + (OG_TEXT_OUTPUTS.get(mode, ()) if cfg.og_text_encoder else ()))


def text_layers(model: DUET) -> tuple[int, int]:
    """Cross-modal layers of the global and the local branch (the text cache holds 2 per layer)."""
    return len(model.global_encoder.encoder.x_layers), len(model.local_encoder.encoder.x_layers)


class _Mode(nn.Module):
    def __init__(self, model: DUET) -> None:
        super().__init__()
        check_tensor_modes(model)
        self.model = model
        self.train(model.training)  # a wrapper's train()/eval() sets the model's, so start alike


class LanguageMode(_Mode):
    """``'language'``: (txt_ids, txt_masks) -> txt_embeds."""

    def forward(self, txt_ids: Tensor, txt_masks: Tensor) -> Tensor:
        with plain_ops():
            return self.model.forward_language(txt_ids, txt_masks)


class TextKVMode(_Mode):
    """The per-episode text cache: txt_embeds -> txt_kv (2X, B, heads, L, head size); with
    ``og_text_encoder``, (txt_embeds, instr_embeds (B, og_text_size)) -> (txt_kv, og_text (B, H))."""

    def forward(self, txt_embeds: Tensor, instr_embeds: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        m = self.model
        with plain_ops():
            kv = m.global_encoder.encoder.text_kv(txt_embeds) + m.local_encoder.encoder.text_kv(txt_embeds)
            # None without og_text_encoder; with it, DUET's ValueError when instr_embeds is missing
            og_text = m.grounding_text(instr_embeds)
        txt_kv = torch.stack([t for pair in kv for t in pair])
        return txt_kv if og_text is None else (txt_kv, og_text)


def unstack_text_kv(model: DUET, txt_kv: Tensor, txt_masks: Tensor, og_text: Tensor | None = None) -> TextKV:
    """:class:`TextKV` from the outputs of :class:`TextKVMode` (mask always applied)."""
    n_global, n_local = text_layers(model)
    pairs = [(txt_kv[2 * i], txt_kv[2 * i + 1]) for i in range(n_global + n_local)]
    return TextKV(txt_masks, additive_mask(txt_masks, txt_kv.dtype), pairs[:n_global], pairs[n_global:], og_text)


class PanoramaMode(_Mode):
    """``'panorama'``: (view_img_fts, loc_fts, nav_types, view_lens[, obj_img_fts, obj_lens]) ->
    (pano_embeds, pano_masks)."""

    def forward(self, view_img_fts: Tensor, loc_fts: Tensor, nav_types: Tensor, view_lens: Tensor,
                obj_img_fts: Tensor | None = None, obj_lens: Tensor | None = None) -> tuple[Tensor, Tensor]:
        with plain_ops():
            return self.model.forward_panorama(view_img_fts, loc_fts, nav_types, view_lens, obj_img_fts, obj_lens)


class NavigationMode(_Mode):
    """``'navigation'`` on the text cache, the map tensors and the fusion indices (then
    ``vp_obj_masks`` and ``og_text``, for the models that take them); outputs in :func:`mode_outputs`
    order (``obj_logits`` last, for models with object tokens)."""

    def forward(
        self,
        txt_kv: Tensor,
        txt_masks: Tensor,
        gmap_img_embeds: Tensor,
        gmap_step_ids: Tensor,
        gmap_pos_fts: Tensor,
        gmap_masks: Tensor,
        gmap_pair_dists: Tensor,
        gmap_visited_masks: Tensor,
        vp_img_embeds: Tensor,
        vp_pos_fts: Tensor,
        vp_masks: Tensor,
        vp_nav_masks: Tensor,
        cand_row: Tensor,
        backtrack: Tensor,
        bw_rows: Tensor,
        vp_obj_masks: Tensor | None = None,
        og_text: Tensor | None = None,
    ) -> tuple[Tensor, ...]:
        m = self.model
        if m.config.og_text_encoder and og_text is None:  # obj_logits would silently lack its term
            raise ValueError("a model with og_text_encoder needs og_text (the text_kv entry point's second output)")
        with plain_ops():
            out = m.forward_navigation(
                unstack_text_kv(m, txt_kv, txt_masks, og_text),
                gmap_img_embeds=gmap_img_embeds, gmap_step_ids=gmap_step_ids, gmap_pos_fts=gmap_pos_fts,
                gmap_masks=gmap_masks, gmap_pair_dists=gmap_pair_dists,
                gmap_visited_masks=gmap_visited_masks, gmap_vpids=[],
                vp_img_embeds=vp_img_embeds, vp_pos_fts=vp_pos_fts, vp_masks=vp_masks,
                vp_nav_masks=vp_nav_masks, vp_cand_vpids=[], fusion_idx=(cand_row, backtrack, bw_rows),
                vp_obj_masks=vp_obj_masks,
            )
        return tuple(out[name] for name in mode_outputs(m, "navigation"))


def tensor_modes(model: DUET) -> dict[str, nn.Module]:
    """The four entry points of ``model``, by name (see :data:`MODES`)."""
    return {"language": LanguageMode(model), "text_kv": TextKVMode(model),
            "panorama": PanoramaMode(model), "navigation": NavigationMode(model)}


def navigation_tensors(batch: Mapping[str, Any], txt_kv: Tensor, txt_masks: Tensor,
                       with_objects: bool = False, og_text: Tensor | None = None) -> dict[str, Tensor]:
    """The navigation entry point's inputs (:data:`NAVIGATION_INPUTS` order, then ``vp_obj_masks``
    ``with_objects``: all False when the batch has none, then ``og_text`` when given) from a
    navigation batch dict (the agent's or the fixture's, with its node-id lists), the stacked text
    cache and its mask (and the grounding vector of a model with ``og_text_encoder``, from the
    ``text_kv`` entry point): the id lists become the fusion indices
    (:func:`~minivln.model.duet.fusion_indices`)."""
    if og_text is not None and not with_objects:
        raise ValueError("og_text is an input of models with object tokens only (with_objects=True)")
    cand_row, backtrack, bw_rows = fusion_indices(
        batch["gmap_vpids"], batch["gmap_visited_masks"], batch["vp_cand_vpids"], batch["vp_masks"].size(1)
    )
    given = {"txt_kv": txt_kv, "txt_masks": txt_masks, "cand_row": cand_row, "backtrack": backtrack,
             "bw_rows": bw_rows}
    out = {name: given[name] if name in given else batch[name] for name in NAVIGATION_INPUTS}
    if with_objects:
        masks = batch.get("vp_obj_masks")
        out["vp_obj_masks"] = masks if masks is not None else torch.zeros_like(batch["vp_masks"])
    if og_text is not None:
        out["og_text"] = og_text
    return out
