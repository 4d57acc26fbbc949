"""What an export directory is, shared by the exporter and the runtime: the manifest's name and
format version, the error for a directory that is not one, where a complete one is (:func:`find_export`,
which repairs an export swap cut short), the size and SHA-256 of every file recorded in the manifest
and checked at load (:func:`verify_files`), and an ONNX Runtime session for a graph.

onnx and onnxruntime are optional (``pip install -e '.[deploy]'``): they are imported only when a
session is made, after :func:`require_onnx` has said what to install.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterable, Mapping

from minivln.paths import DataError, recover_parked_dir

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


EXPORT_ENTRIES = ("config.json", "model.safetensors", MANIFEST, "fp32", "int8")
"""What an export directory holds (anything else in it is not ours: ``minivln export --overwrite``
refuses to replace such a directory)."""


def is_complete_export(path: str | Path) -> bool:
    """Whether ``path`` holds a manifest (the exporter writes it last, into the directory it then
    swaps in whole)."""
    return (Path(path) / MANIFEST).is_file()


def find_export(path: str | Path, *, repair: bool = True) -> Path | None:
    """The complete export directory at ``path``, or ``None``.  After a crash between the two renames
    that swap a new export in, the previous export is still complete under ``.NAME.old``: with
    ``repair`` it is moved back to ``path`` (see :func:`minivln.paths.recover_parked_dir`)."""
    return recover_parked_dir(path, is_complete_export, repair=repair)


def file_record(path: str | Path) -> dict[str, Any]:
    """``{"bytes": size, "sha256": hex digest}`` of a file, as the manifest records it."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": digest.hexdigest()}


def verify_files(directory: str | Path, manifest: Mapping[str, Any], names: Iterable[str]) -> None:
    """Check the files ``names`` (relative to ``directory``) against the sizes and SHA-256 digests of
    the manifest's ``files``: one :class:`ExportError` line naming the first that differs (a file of
    another export, a truncated or changed one).  A manifest without ``files`` (written before they
    were recorded) is not checked."""
    directory = Path(directory)
    records = manifest.get("files")
    if records is None:
        return
    if not isinstance(records, Mapping):
        raise ExportError(f"{directory / MANIFEST}: 'files' is not a mapping of file names; export again")
    for name in names:
        path = directory / name
        expected = records.get(name)
        if not isinstance(expected, Mapping):
            raise ExportError(f"{path}: not listed in {directory / MANIFEST} (its files: "
                              f"{', '.join(sorted(records)) or 'none'}); export again")
        if not path.is_file():
            raise ExportError(f"incomplete export directory, missing {path}; export again")
        size, want = path.stat().st_size, expected.get("bytes")
        if size != want:
            what = f"{size:,} bytes, the manifest says {want:,}" if isinstance(want, int) else f"{size:,} bytes"
        elif file_record(path)["sha256"] != expected.get("sha256"):
            what = "same size, another SHA-256"
        else:
            continue
        raise ExportError(f"{path} does not match {directory / MANIFEST} ({what}): a file of another "
                          f"export, truncated or changed; export again")


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
    path = Path(path)
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT's own exception types (InvalidProtobuf, InvalidArgument, Fail...)
        if not path.is_file():
            raise ExportError(f"missing ONNX graph {path}; export again") from None
        size = path.stat().st_size
        if size == 0:
            raise ExportError(f"{path} is empty (0 bytes), not an ONNX graph; export again") from None
        text = str(exc).strip().splitlines()
        cause = text[0] if text else type(exc).__name__
        cause = cause.split(" failed:", 1)[-1].strip() if " failed:" in cause else cause
        raise ExportError(f"{path} ({size:,} bytes) is not a valid ONNX graph, truncated or damaged? "
                          f"ONNX Runtime: {cause}; export again") from None
