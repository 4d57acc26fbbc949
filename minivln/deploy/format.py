"""What an export directory is, shared by the exporter and the runtime: the manifest's name and
format version, the error for a directory that is not one, and an ONNX Runtime session for a graph.

onnx and onnxruntime are optional (``pip install -e '.[deploy]'``): they are imported only when a
session is made, after :func:`require_onnx` has said what to install.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from minivln.paths import DataError

MANIFEST = "export.json"
FORMAT_VERSION = 2
"""The newest format.  2: models with ``og_text_encoder``, whose ``text_kv`` graph also takes
``instr_embeds`` (the instructions' sentence embeddings) and gives ``og_text``, an input of every
``navigation`` call of the episode (see :mod:`minivln.model.tensor_modes`).  An export of any
other model is written as format 1, as before, so that older code still reads it."""
READ_VERSIONS = (1, 2)
"""The formats this code reads."""


class ExportError(DataError):
    """An export directory is missing, incomplete or of another format version (exit 2 on the CLI)."""


def require_onnx() -> None:
    """Raise :class:`ExportError` with the install hint when onnx / onnxruntime are missing."""
    missing = []
    for name in ("onnx", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportError(f"{' and '.join(missing)} not installed: pip install -e '.[deploy]'")


def make_session(path: str | Path, threads: int = 0) -> Any:
    """An ONNX Runtime CPU session for one graph; ``threads`` intra-op threads (0: ORT's default)."""
    require_onnx()
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = max(0, int(threads))
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
