"""Backends: the runtimes a checkpoint's network can run on (``minivln navigate --backend``).

=====================  ===========================================================================
``torch``              eager PyTorch (:func:`~minivln.model.checkpoint.load_agent_model`)
``onnxruntime``        the exported fp32 graphs on ONNX Runtime (:class:`OnnxRuntimeDUET`)
``onnxruntime-int8``   the exported int8 graphs (dynamically quantized linear layers)
=====================  ===========================================================================

Every backend gives an object the agent drives like the torch model (``model(mode, batch)``,
``precompute_text_kv``, ``config``).  The ONNX Runtime backends read an export directory
(``minivln export``); given any other checkpoint they export it first into a temporary directory,
removed when the :class:`Backend` is closed or collected.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minivln.deploy.export import ExportError, export_model
from minivln.deploy.format import verify_files
from minivln.deploy.runtime import OnnxRuntimeDUET, is_export_dir, read_manifest
from minivln.model.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_agent_model

BACKENDS: dict[str, str] = {
    "torch": "eager PyTorch",
    "onnxruntime": "ONNX Runtime, fp32 graphs",
    "onnxruntime-int8": "ONNX Runtime, int8 graphs (dynamically quantized linear layers)",
}
ONNX_VARIANTS = {"onnxruntime": "fp32", "onnxruntime-int8": "int8"}


@dataclass
class Backend:
    """A loaded backend: ``model`` (drives like a DUET), where its graphs are, and the checkpoint
    whose run directory holds the defaults (data, features) of the run that trained it."""

    name: str
    model: Any
    checkpoint: Path
    export_dir: Path | None = None
    source: Path | None = None
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def load_backend(name: str, checkpoint: str | Path, *, threads: int = 0) -> Backend:
    """The network of ``checkpoint`` on backend ``name`` (see the module docstring)."""
    if name not in BACKENDS:
        raise ExportError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
    checkpoint = Path(checkpoint)
    source = checkpoint
    if is_export_dir(checkpoint):
        manifest = read_manifest(checkpoint)
        recorded = manifest.get("source")
        source = Path(recorded) if recorded and Path(recorded).exists() else checkpoint
        if name == "torch":  # the export's weights, as its manifest recorded them
            verify_files(checkpoint, manifest, [CONFIG_NAME, WEIGHTS_NAME])
    if name == "torch":
        return Backend(name, load_agent_model(checkpoint), checkpoint, source=source)
    variant = ONNX_VARIANTS[name]
    tmp = None
    export_dir = checkpoint
    if not is_export_dir(checkpoint):
        tmp = tempfile.TemporaryDirectory(prefix="minivln-export-")
        export_dir = Path(tmp.name)
        export_model(load_agent_model(checkpoint), export_dir, source=str(checkpoint), int8=variant == "int8",
                     check=False)
    model = OnnxRuntimeDUET(export_dir, variant, threads=threads)
    return Backend(name, model, checkpoint, export_dir=export_dir, source=source, _tmp=tmp)
