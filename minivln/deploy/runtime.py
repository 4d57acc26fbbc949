"""The exported network on ONNX Runtime, behind :class:`~minivln.model.duet.DUET`'s calling convention.

:class:`OnnxRuntimeDUET` is a drop-in for the torch model in
:class:`~minivln.training.agent.DUETAgent` and :func:`~minivln.training.agent.run_agent`: the same
``model(mode, batch)`` calls with the same batch dicts (node-id lists included) give the same
outputs (torch tensors on the CPU), and ``precompute_text_kv`` gives the per-episode text cache
(:class:`OnnxTextKV`, accepted as ``batch['txt_kv']``).  Inference only: no taps, no gradient.
Models with object tokens (REVERIE) take ``obj_img_fts``/``obj_lens`` in the panorama call and give
``obj_logits`` in the navigation call, as the torch model does; for those with ``og_text_encoder``
``precompute_text_kv`` also takes ``instr_embeds`` (the instructions' sentence embeddings; in a
navigation batch without ``txt_kv``, ``batch['instr_embeds']``) and the text cache also holds their
grounding vector (``og_text``), passed to every navigation call.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from minivln.deploy.format import (
    MANIFEST,
    READ_VERSIONS,
    ExportError,
    find_export,
    make_session,
    verify_files,
)
from minivln.model.checkpoint import CONFIG_NAME
from minivln.model.config import DUETConfig
from minivln.model.tensor_modes import (
    MODES,
    UnsupportedModelError,
    navigation_tensors,
)

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(bool)": np.bool_}


def is_export_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory written by :func:`~minivln.deploy.export.export_model` (an
    export swap cut short by a crash is repaired first: :func:`~minivln.deploy.format.find_export`)."""
    return find_export(path) is not None


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of an export directory; :class:`ExportError` when it is not one."""
    directory = find_export(directory) or Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ExportError(f"not an export directory (no {MANIFEST}): {directory}; run `minivln export` first")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path}: not valid JSON ({exc})") from None
    if manifest.get("format_version") not in READ_VERSIONS:
        raise ExportError(f"{path}: export format {manifest.get('format_version')!r}, this code reads "
                          f"{' and '.join(map(str, READ_VERSIONS))}; export again")
    return manifest


@dataclass
class OnnxTextKV:
    """The per-episode text cache of :class:`OnnxRuntimeDUET` (pass it as ``batch['txt_kv']``)."""

    txt_kv: torch.Tensor  # (2X, B, heads, L, head size), see minivln.model.tensor_modes
    txt_masks: torch.Tensor  # (B, L) bool
    og_text: torch.Tensor | None = None  # (B, H) the grounding vector (og_text_encoder), else None


class OnnxRuntimeDUET:
    """An exported DUET (``variant`` 'fp32' or 'int8') run by ONNX Runtime; see the module docstring."""

    training = False

    def __init__(self, directory: str | Path, variant: str = "fp32", threads: int = 0) -> None:
        directory = find_export(directory) or Path(directory)
        manifest = read_manifest(directory)
        graphs = manifest.get("graphs", {})
        if variant not in graphs:
            raise ExportError(f"{directory} has no {variant!r} graphs (it has: {', '.join(graphs) or 'none'})")
        cfg_path = directory / CONFIG_NAME
        if not cfg_path.is_file():
            raise ExportError(f"incomplete export directory, missing {cfg_path}")
        for mode in MODES:
            path = directory / graphs[variant].get(mode, "")
            if not graphs[variant].get(mode) or not path.is_file():
                raise ExportError(f"incomplete export directory, missing the {variant} {mode} graph ({path})")
        # every file this model reads must be the one the manifest was written with (not a file of
        # another export in a directory that mixes two, not truncated): one line naming it otherwise
        verify_files(directory, manifest, [CONFIG_NAME, *(graphs[variant][mode] for mode in MODES)])
        self.directory = directory
        self.variant = variant
        self.manifest = manifest
        try:
            self.config = DUETConfig.from_dict(json.loads(cfg_path.read_text()))
        except (ValueError, TypeError) as exc:
            raise ExportError(f"{cfg_path}: not a model config ({exc}); export again") from None
        self.sessions: dict[str, Any] = {}
        for mode in MODES:
            self.sessions[mode] = make_session(directory / graphs[variant][mode], threads)
        self._types = {
            mode: {i.name: _NUMPY_TYPES[i.type] for i in sess.get_inputs()} for mode, sess in self.sessions.items()
        }
        self._outputs = {mode: [o.name for o in sess.get_outputs()] for mode, sess in self.sessions.items()}
        self._objects = "obj_img_fts" in self._types["panorama"]

    # the parts of nn.Module the agent and the commands use
    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return iter(())

    def eval(self) -> "OnnxRuntimeDUET":
        return self

    def train(self, mode: bool = True) -> "OnnxRuntimeDUET":
        if mode:
            raise RuntimeError("an ONNX Runtime model runs inference only")
        return self

    def run(self, mode: str, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        """Run one graph on its named inputs (tensors or arrays); outputs as CPU tensors, in order."""
        feed = {}
        for name, dtype in self._types[mode].items():
            value = inputs[name]
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu().numpy()
            feed[name] = np.ascontiguousarray(value, dtype=dtype)
        return [torch.from_numpy(x) for x in self.sessions[mode].run(None, feed)]

    def precompute_text_kv(self, txt_embeds: torch.Tensor, txt_masks: torch.Tensor,
                           instr_embeds: torch.Tensor | None = None) -> OnnxTextKV:
        """As :meth:`DUET.precompute_text_kv`: the graph of a model with ``og_text_encoder`` also
        takes ``instr_embeds`` (B, og_text_size) and gives ``og_text``; the others ignore it."""
        feed = {"txt_embeds": txt_embeds}
        if "instr_embeds" in self._types["text_kv"]:
            if instr_embeds is None:  # DUET.grounding_text's error
                raise ValueError(f"this model grounds objects with the instructions' {self.config.og_text_encoder} "
                                 f"embeddings: give instr_embeds (B, {self.config.og_text_size}) with the text "
                                 "(minivln.features.embed)")
            feed["instr_embeds"] = instr_embeds
        outs = dict(zip(self._outputs["text_kv"], self.run("text_kv", feed)))
        return OnnxTextKV(outs["txt_kv"], txt_masks, outs.get("og_text"))

    def __call__(self, mode: str, batch: Mapping[str, Any], taps: bool = False) -> Any:
        if taps:
            raise RuntimeError("an ONNX Runtime model has no distillation taps")
        if mode == "language":
            return self.run("language", batch)[0]
        if mode == "panorama":
            has_objects = batch.get("obj_img_fts") is not None
            if has_objects and not self._objects:
                raise UnsupportedModelError("the exported panorama graph takes no object tokens")
            if self._objects and not has_objects:  # a model with objects, shown none
                b = batch["view_img_fts"].shape[0]
                batch = {**batch, "obj_img_fts": np.zeros((b, 0, self.config.obj_feat_size), np.float32),
                         "obj_lens": np.zeros(b, np.int64)}
            pano_embeds, pano_masks = self.run("panorama", batch)
            return pano_embeds, pano_masks
        if mode == "navigation":
            text = batch.get("txt_kv")
            if text is None:
                text = self.precompute_text_kv(batch["txt_embeds"], batch["txt_masks"], batch.get("instr_embeds"))
            if not isinstance(text, OnnxTextKV):
                raise TypeError(f"batch['txt_kv'] must come from this model's precompute_text_kv, "
                                f"got {type(text).__name__}")
            inputs = navigation_tensors(batch, text.txt_kv, text.txt_masks, self._objects, text.og_text)
            outs = dict(zip(self._outputs["navigation"], self.run("navigation", inputs)))
            if batch.get("vp_obj_masks") is None:  # as the torch model: no object scores without the masks
                outs["obj_logits"] = None
            return outs
        raise ValueError(f"unknown mode {mode!r} (expected language, panorama or navigation)")

    def __repr__(self) -> str:
        return f"OnnxRuntimeDUET({str(self.directory)!r}, variant={self.variant!r})"
