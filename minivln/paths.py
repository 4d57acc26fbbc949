"""Where data and caches live.

The data directory has the layout of the community releases (see ``docs/data.md``)::

    DATA/connectivity/<scan>_connectivity.json, scans.txt
    DATA/R2R/R2R_<split>.json
    DATA/REVERIE/REVERIE_<split>.json, DATA/REVERIE/BBox/<scan>_<viewpoint>.json

It is chosen by ``--data-dir``, else ``$MINIVLN_DATA``.  It may be read-only: everything we derive
(graph caches, features) goes to the cache directory, ``$MINIVLN_CACHE`` or ``~/.cache/minivln``.
"""

from __future__ import annotations

import os
from pathlib import Path


class DataError(RuntimeError):
    """A data file or directory is missing or malformed; the message names it."""


def resolve_data_dir(data_dir: str | os.PathLike | None = None, *, must_exist: bool = True) -> Path:
    """Return the data directory from the argument, else ``$MINIVLN_DATA``."""
    chosen = data_dir if data_dir is not None else os.environ.get("MINIVLN_DATA")
    if chosen is None:
        raise DataError(
            "no data directory: pass --data-dir DIR or set MINIVLN_DATA "
            "(fill one with `minivln download --data-dir DIR`, or use the toy world: `minivln toy build`)"
        )
    path = Path(chosen).expanduser()
    if must_exist and not path.is_dir():
        raise DataError(f"data directory {path} does not exist")
    return path


def cache_dir(sub: str = "") -> Path:
    """A writable cache directory (``$MINIVLN_CACHE`` or ``~/.cache/minivln``), created on demand."""
    root = Path(os.environ.get("MINIVLN_CACHE", Path.home() / ".cache" / "minivln")).expanduser()
    path = root / sub if sub else root
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
