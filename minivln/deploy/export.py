"""ONNX export of a DUET network: ``minivln export CHECKPOINT --out DIR``.

Writes the four tensor-only entry points of :mod:`minivln.model.tensor_modes` (``language``,
``text_kv`` -- the per-episode text key/value cache --, ``panorama``, ``navigation``) as ONNX graphs
with dynamic batch and sequence axes, an int8 variant of each (ONNX Runtime's dynamic quantization
of the linear layers' matrix products: int8 weights, activations quantized per call), and::

    DIR/config.json, DIR/model.safetensors   the exported weights (save_pretrained: DIR is also a
                                             checkpoint for the torch backend)
    DIR/fp32/<mode>.onnx, DIR/int8/<mode>.onnx
    DIR/export.json                          manifest: graphs, inputs/outputs and their dynamic axes,
                                             opset, exporter, versions, source, and the check below

After writing, every graph is run with ONNX Runtime on seeded inputs of two shapes (neither the
traced one) and compared with eager PyTorch (:func:`check_export`); the largest absolute
differences are recorded in the manifest (``check``), with the size and SHA-256 of every file
(``files``), which the runtime checks before it loads a graph.

The export is atomic: everything is written into a temporary sibling ``.DIR.tmpPID`` and swapped in
whole when complete (DIR -> ``.DIR.old``, the new one -> DIR, then the old one is deleted), so DIR
always holds either the previous complete export or the new one; a failure (a full disk) removes the
temporary and names DIR on one line.  A crash between the two renames leaves the previous export
complete under ``.DIR.old``, which the next export or read moves back
(:func:`~minivln.deploy.format.find_export`); temporaries of a killed export are removed by the
next one.  DIR must be new or empty, or (``overwrite``) an export directory, replaced whole:
a directory holding anything else is refused.

Exporter: the TorchScript-based one (``torch.onnx.export(..., dynamo=False)``, opset 17).  In
torch 2.13 the default is the ``torch.export``-based exporter (``dynamo=True``); it needs the extra
package ``onnxscript``, took 2-10 s per graph instead of 0.03-0.4 s, and failed on the navigation
graph (a view of the attention output under symbolic shapes, in its decomposition step); the
numbers are in docs/results.md ("Parity measured").
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minivln import __version__
from minivln.deploy.format import (  # noqa: F401 (re-exported)
    EXPORT_ENTRIES,
    FORMAT_VERSION,
    MANIFEST,
    ExportError,
    file_record,
    find_export,
    make_session,
    require_onnx,
)
from minivln.model.checkpoint import CONFIG_NAME, WEIGHTS_NAME, save_pretrained
from minivln.model.duet import DUET
from minivln.model.tensor_modes import (
    MODES,
    check_tensor_modes,
    dynamic_axes,
    mode_inputs,
    mode_outputs,
    navigation_tensors,
    tensor_modes,
    text_layers,
)
from minivln.paths import (
    WriteError,
    atomic_write_text,
    describe_os_error,
    error_number,
    free_bytes,
    remove_stale_temporaries,
    swap_dir_into_place,
    temporary_sibling,
    write_error,
)

OPSET = 17
VARIANTS = ("fp32", "int8")
# Shapes (batch, text tokens, panorama tokens, map slots) of the traced inputs and of the checks.
TRACE_SHAPE = (2, 9, 13, 6)
EXAMPLE_OBJECTS = 3  # object tokens among an example panorama's tokens, for models with objects
CHECK_SHAPES = ((3, 14, 17, 8), (1, 5, 11, 3))


# ------------------------------------------------------------------------------ example inputs


def example_batches(model: DUET, batch: int, text: int, pano: int, slots: int, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Seeded batch dicts of the network's three modes, as the agent builds them (node-id lists
    included) and chained through the eager model as the agent chains them (the navigation batch
    holds the language and panorama outputs), with padding in every sample after the first.

    ``pano`` panorama tokens, ``slots`` global map slots ([stop] included).  For a model with object
    tokens (REVERIE) the last :data:`EXAMPLE_OBJECTS` tokens are objects (fewer, or none, in the
    samples after the first), and the navigation batch marks them in ``vp_obj_masks``; for a model
    with ``og_text_encoder`` it also holds random ``instr_embeds`` (B, ``og_text_size``), drawn
    last (the other tensors are those of the same model without it)."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    n_obj = EXAMPLE_OBJECTS if cfg.use_objects else 0

    def lens(n: int, low: int) -> torch.Tensor:
        return torch.tensor([n] + [int(torch.randint(low, n + 1, (1,), generator=g)) for _ in range(batch - 1)])

    def masks(lengths: torch.Tensor, n: int) -> torch.Tensor:
        return torch.arange(n)[None] < lengths[:, None]

    txt_masks = masks(lens(text, 2), text)
    txt_ids = torch.randint(1, cfg.vocab_size, (batch, text), generator=g).masked_fill(~txt_masks, 0)
    view_lens = lens(pano - n_obj, 1)
    view_masks = masks(view_lens, pano - n_obj)
    slot_lens = lens(slots, 2)
    # node ids: slot j > 0 shows node j, slot 1 is the current node (visited); candidate row r > 0
    # (navigable) shows node r, so visited candidates, adjacent and non-adjacent ghosts all occur.
    gmap_vpids = [[None] + list(range(1, int(n))) for n in slot_lens]
    vp_cand_vpids = [[None] + list(range(1, min(int(n), int(v)) + 1)) for n, v in zip(slot_lens, view_lens)]
    n_cands = torch.tensor([len(c) - 1 for c in vp_cand_vpids])
    nav_types = (torch.arange(pano)[None] < n_cands[:, None]).long()
    language = {"txt_ids": txt_ids, "txt_masks": txt_masks}
    panorama = {
        "view_img_fts": torch.randn(batch, pano - n_obj, cfg.image_feat_size, generator=g) * view_masks[..., None],
        "loc_fts": torch.randn(batch, pano, cfg.angle_feat_size + cfg.obj_loc_size, generator=g),
        "nav_types": nav_types,
        "view_lens": view_lens,
    }
    if n_obj:  # objects follow each sample's views (packed), typed 2
        obj_lens = torch.tensor([n_obj] + [int(torch.randint(0, n_obj + 1, (1,), generator=g))
                                           for _ in range(batch - 1)])
        panorama["obj_img_fts"] = (torch.randn(batch, n_obj, cfg.obj_feat_size, generator=g)
                                   * masks(obj_lens, n_obj)[..., None])
        panorama["obj_lens"] = obj_lens
        j = torch.arange(pano)[None]
        is_obj = (j >= view_lens[:, None]) & (j < (view_lens + obj_lens)[:, None])
        nav_types = nav_types.masked_fill(is_obj, 2)
        panorama["nav_types"] = nav_types
    with torch.no_grad():
        txt_embeds = model("language", language)
        pano_embeds, pano_masks = model("panorama", panorama)

    gmap_masks = masks(slot_lens, slots)
    pos = cfg.angle_feat_size + 3
    visited = torch.zeros(batch, slots, dtype=torch.bool)
    visited[:, 1] = True
    if slots > 3:
        visited[:, 2] = torch.rand(batch, generator=g) < 0.5
    visited &= gmap_masks
    dists = torch.rand(batch, slots, slots, generator=g) * 10
    navigation = {
        "txt_embeds": txt_embeds,
        "txt_masks": txt_masks,
        "gmap_vpids": gmap_vpids,
        "gmap_img_embeds": torch.randn(batch, slots, cfg.hidden_size, generator=g) * gmap_masks[..., None],
        "gmap_step_ids": torch.randint(0, 8, (batch, slots), generator=g).masked_fill(~gmap_masks, 0),
        "gmap_pos_fts": torch.randn(batch, slots, pos, generator=g),
        "gmap_masks": gmap_masks,
        "gmap_pair_dists": (dists + dists.transpose(1, 2)) * (gmap_masks[:, None] & gmap_masks[:, :, None]),
        "gmap_visited_masks": visited,
        "vp_img_embeds": torch.cat([torch.zeros_like(pano_embeds[:, :1]), pano_embeds], 1),
        "vp_pos_fts": torch.randn(batch, pano + 1, 2 * pos, generator=g),
        "vp_masks": torch.cat([torch.ones(batch, 1, dtype=torch.bool), pano_masks], 1),
        "vp_nav_masks": torch.cat([torch.ones(batch, 1, dtype=torch.bool), nav_types == 1], 1),
        "vp_cand_vpids": vp_cand_vpids,
    }
    if n_obj:
        navigation["vp_obj_masks"] = torch.cat([torch.zeros(batch, 1, dtype=torch.bool), nav_types == 2], 1)
    if cfg.og_text_encoder:  # the instructions' sentence embeddings, an input of the text cache
        navigation["instr_embeds"] = torch.randn(batch, cfg.og_text_size, generator=g)
    return {"language": language, "panorama": panorama, "navigation": navigation}


def entry_inputs(model: DUET, batches: dict[str, dict[str, Any]]) -> dict[str, dict[str, torch.Tensor]]:
    """The tensor-only entry points' inputs (by mode, in :func:`mode_inputs` order) for
    :func:`example_batches`' batches; the text cache (and, for a model with ``og_text_encoder``, the
    grounding vector of its ``instr_embeds``) comes from the eager ``text_kv`` entry point."""
    nav = batches["navigation"]
    text_in = {name: nav[name] for name in mode_inputs(model, "text_kv")}
    with torch.no_grad():
        text = tensor_modes(model)["text_kv"](*text_in.values())
    txt_kv, og_text = text if isinstance(text, tuple) else (text, None)
    out = {
        "language": dict(batches["language"]),
        "text_kv": text_in,
        "panorama": dict(batches["panorama"]),
        "navigation": navigation_tensors(nav, txt_kv, nav["txt_masks"], model.config.use_objects, og_text),
    }
    for mode in MODES:
        assert tuple(out[mode]) == mode_inputs(model, mode), mode
    return out


# ------------------------------------------------------------------------------ export


def _export_graph(module: torch.nn.Module, mode: str, args: tuple, path: Path) -> None:
    names_in, names_out = list(mode_inputs(module.model, mode)), list(mode_outputs(module.model, mode))
    all_axes = dynamic_axes(module.model)
    axes = {n: all_axes[n] for n in names_in + names_out}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice, tracer notes
        torch.onnx.export(module, args, str(path), dynamo=False, input_names=names_in, output_names=names_out,
                          dynamic_axes=axes, opset_version=OPSET, do_constant_folding=True)


def quantize_int8(src: Path, dst: Path, per_channel: bool = False) -> None:
    """ONNX Runtime dynamic quantization of the matrix products with constant weights (the linear
    layers; attention's activation x activation products stay fp32): int8 weights, uint8 activations
    quantized per call."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process the graph: no change here (measured)
    try:
        # the quantizer writes helper files beside its output: in a folder beside dst (inside the
        # export's temporary directory, so that a killed export leaves nothing elsewhere)
        with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
            out = Path(tmp) / dst.name
            quantize_dynamic(src, out, op_types_to_quantize=["MatMul", "Gemm"], per_channel=per_channel,
                             weight_type=QuantType.QInt8)
            shutil.move(str(out), dst)
    finally:
        root.setLevel(level)


@dataclass
class ExportResult:
    directory: Path
    manifest: dict[str, Any]


def check_export_target(out: str | Path, *, overwrite: bool = False) -> Path:
    """Where an export to ``out`` will go, checked before any work (nothing is written): ``out`` must
    be new, an empty directory, or (``overwrite``) an export directory, which the export replaces
    whole; a directory holding anything an export does not write is refused even with
    ``overwrite`` (its files would be lost).  A swap cut short by a crash is repaired first (the
    previous export is moved back).  A symbolic link is followed.  Returns the target."""
    out = Path(os.path.abspath(out))  # "." or "x/..": the swap needs the directory's own name
    if out.is_symlink():
        out = out.resolve()
    try:
        find_export(out)
    except OSError as exc:
        raise write_error(exc, out, "repair the export") from None
    if not out.exists():
        return out
    if not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory: choose another output directory")
    entries = sorted(p.name for p in out.iterdir())
    foreign = [e for e in entries if e not in EXPORT_ENTRIES]
    if foreign:
        shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
        raise ExportError(f"{out} is not empty and not an export directory (it holds {shown}): an export "
                          "replaces its directory whole; choose another output directory")
    if entries and not overwrite:
        what = "an export" if MANIFEST in entries else "a checkpoint or part of an export"
        raise ExportError(f"{out} is not empty: it holds {what} (--overwrite to replace it)")
    return out


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` to disk (before the rename that publishes it)."""
    if os.name != "posix":
        return
    for dirpath, _, files in os.walk(root):
        for name in [*files, "."]:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _after_failure(staging: Path, out: Path) -> None:
    """An export failed (or was interrupted): remove its temporary directory and, when the failure
    hit between the two renames of the swap, move the previous export back (a separate function so
    that tests can leave everything as a killed process would)."""
    shutil.rmtree(staging, ignore_errors=True)
    try:
        find_export(out)
    except OSError:
        pass


def _is_write_failure(exc: BaseException, where: Path) -> bool:
    """Whether an exception of the exporter, the quantizer or safetensors reports a failed write
    (a full or read-only disk): an ``OSError``, an error quoting an errno, or any error with less
    than 1 MB left where the export goes."""
    if isinstance(exc, ExportError) or not isinstance(exc, Exception):
        return False
    if isinstance(exc, OSError) or error_number(exc) is not None:
        return True
    free = free_bytes(where)
    return free is not None and free < 2**20


def export_model(
    model: DUET,
    out: str | Path,
    *,
    source: str | None = None,
    int8: bool = True,
    per_channel: bool = False,
    check: bool = True,
    overwrite: bool = False,
) -> ExportResult:
    """Export ``model`` into the directory ``out`` (see the module docstring), atomically; returns its
    manifest.  ``out`` must be new or empty, or, with ``overwrite``, an export directory (replaced
    whole); see :func:`check_export_target`.  A failed write is one :class:`WriteError` line naming
    ``out``; ``out`` is then as it was."""
    require_onnx()
    check_tensor_modes(model)
    model = model.eval()
    out = check_export_target(out, overwrite=overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)  # a killed export's, and this process's own leftovers
    except OSError as exc:
        raise write_error(exc, out, "export to") from None
    staging = temporary_sibling(out)
    try:
        staging.mkdir()
        manifest = _write_export(model, staging, source=source, int8=int8, per_channel=per_channel, check=check)
        _fsync_tree(staging)
        swap_dir_into_place(staging, out)
    except BaseException as exc:
        _after_failure(staging, out)
        if not _is_write_failure(exc, out.parent):
            raise
        kept = ("the previous export is kept" if find_export(out, repair=False) is not None
                else "nothing was written")
        raise WriteError(f"cannot export to {out}: {describe_os_error(exc, out.parent)}; {kept}",
                         error_number(exc)) from exc
    return ExportResult(out, manifest)


def _write_export(model: DUET, out: Path, *, source: str | None, int8: bool, per_channel: bool,
                  check: bool) -> dict[str, Any]:
    """Write the export into the (new, empty) directory ``out``; the manifest last."""
    import onnx
    import onnxruntime

    variants = VARIANTS if int8 else VARIANTS[:1]
    for v in variants:
        (out / v).mkdir(parents=True, exist_ok=True)
    save_pretrained(model, out, metadata={"exported_from": str(source or "")})
    started = time.perf_counter()
    modes = tensor_modes(model)
    trace = entry_inputs(model, example_batches(model, *TRACE_SHAPE, seed=0))
    graphs: dict[str, dict[str, str]] = {v: {} for v in variants}
    for mode in MODES:
        path = out / "fp32" / f"{mode}.onnx"
        _export_graph(modes[mode], mode, tuple(trace[mode].values()), path)
        onnx.checker.check_model(str(path))
        graphs["fp32"][mode] = path.relative_to(out).as_posix()
        if int8:
            qpath = out / "int8" / f"{mode}.onnx"
            quantize_int8(path, qpath, per_channel=per_channel)
            graphs["int8"][mode] = qpath.relative_to(out).as_posix()
    n_global, n_local = text_layers(model)
    files = [CONFIG_NAME, WEIGHTS_NAME] + [rel for variant in graphs.values() for rel in variant.values()]
    manifest: dict[str, Any] = {
        # the grounding vector is new in format 2; any other model's export is still format 1
        "format_version": FORMAT_VERSION if model.config.og_text_encoder else 1,
        "model_type": "duet",
        "source": str(source) if source is not None else None,
        "minivln_version": __version__,
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "onnxruntime_version": onnxruntime.__version__,
        "exporter": "torch.onnx.export(dynamo=False)",
        "opset": OPSET,
        "export_seconds": round(time.perf_counter() - started, 2),
        "graphs": graphs,
        # size and SHA-256 of every file, checked by the runtime before it loads one (a directory
        # that mixes the files of two exports, a truncated or changed file, is refused)
        "files": {rel: file_record(out / rel) for rel in files},
        "inputs": {m: list(mode_inputs(model, m)) for m in MODES},
        "outputs": {m: list(mode_outputs(model, m)) for m in MODES},
        "objects": model.config.use_objects,
        "dynamic_axes": {n: {str(k): v for k, v in axes.items()} for n, axes in dynamic_axes(model).items()},
        "text_kv_layers": {"global": n_global, "local": n_local},
        "quantization": {"method": "onnxruntime.quantization.quantize_dynamic", "op_types": ["MatMul", "Gemm"],
                         "weight_type": "QInt8", "per_channel": per_channel} if int8 else None,
    }
    if check:
        manifest["check"] = check_export(model, out, graphs)
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def check_export(model: DUET, directory: Path, graphs: dict[str, dict[str, str]]) -> dict[str, Any]:
    """Largest |ONNX Runtime - eager| over every output of every graph, on the inputs of
    :data:`CHECK_SHAPES` (-inf positions must coincide: else the difference is inf)."""
    modes = tensor_modes(model.eval())
    inputs = [entry_inputs(model, example_batches(model, *shape, seed=1 + k))
              for k, shape in enumerate(CHECK_SHAPES)]
    report: dict[str, Any] = {"shapes": [list(s) for s in CHECK_SHAPES], "max_abs_diff": {}}
    for variant, files in graphs.items():
        diffs: dict[str, float] = {}
        for mode, rel in files.items():
            sess = make_session(directory / rel, threads=1)
            worst = 0.0
            for batch in inputs:
                with torch.no_grad():
                    ref = modes[mode](*batch[mode].values())
                ref = ref if isinstance(ref, tuple) else (ref,)
                got = sess.run(None, {k: v.numpy() for k, v in batch[mode].items()})
                for r, o in zip(ref, got):
                    worst = max(worst, max_abs_diff(r.numpy(), o))
            diffs[mode] = worst
        report["max_abs_diff"][variant] = diffs
    return report


def max_abs_diff(expected: np.ndarray, got: np.ndarray) -> float:
    """max |expected - got| over finite positions; inf when shapes or infinite positions differ."""
    expected, got = np.asarray(expected), np.asarray(got)
    if expected.shape != got.shape:
        return float("inf")
    if expected.dtype == bool or got.dtype == bool:
        return 0.0 if np.array_equal(expected, got) else float("inf")
    expected, got = expected.astype(np.float64), got.astype(np.float64)
    if not np.array_equal(np.isposinf(expected), np.isposinf(got)) or not np.array_equal(
        np.isneginf(expected), np.isneginf(got)
    ):
        return float("inf")
    if np.isnan(got).any():
        return float("inf")
    finite = np.isfinite(expected)
    return float(np.abs(expected[finite] - got[finite]).max()) if finite.any() else 0.0
