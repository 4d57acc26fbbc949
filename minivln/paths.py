"""Where data and caches live.

The data directory has the layout of the community releases (see ``docs/data.md``)::

    DATA/connectivity/<scan>_connectivity.json, scans.txt
    DATA/R2R/R2R_<split>.json
    DATA/REVERIE/REVERIE_<split>.json, DATA/REVERIE/BBox/<scan>_<viewpoint>.json

It is chosen by ``--data-dir``, else ``$MINIVLN_DATA``.  It may be read-only: everything we derive
(graph caches, features) goes to the cache directory, ``$MINIVLN_CACHE`` or ``~/.cache/minivln``.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from pathlib import Path


class DataError(RuntimeError):
    """A data file or directory is missing or malformed; the message names it."""


class WriteError(DataError, OSError):
    """Writing a file failed (read-only file system, disk full, no permission, ...); the message names
    the path and the cause on one line.  An ``OSError`` too, so code catching those still does."""

    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.54 KB"``, ``634465633`` -> ``"634 MB"`` (powers of 1000, 3 digits)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" or abs(n) >= 100 else f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free space for unprivileged writers on the file system of ``path`` (or of its nearest existing
    parent); ``None`` when it cannot be told."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def error_number(exc: BaseException) -> int | None:
    """The errno of an ``OSError``, or the one a library quotes in its message (safetensors: "os error
    28", HDF5: "errno = 28")."""
    code = getattr(exc, "errno", None)
    if isinstance(code, int):
        return code
    found = re.search(r"os error (\d+)|errno = (\d+)|\[Errno (\d+)\]", str(exc))
    if found:
        return int(next(g for g in found.groups() if g))
    return None


def describe_os_error(exc: BaseException, path: str | os.PathLike | None = None) -> str:
    """The cause of a failed write in words: ``"read-only file system"``, ``"no space left on device
    (12 KB left)"``, ``"permission denied"``, or the error's own text (with the space left)."""
    code = error_number(exc)
    free = free_bytes(path) if path is not None else None
    left = f" ({format_bytes(free)} left)" if free is not None else ""
    if code == errno.ENOSPC or (code is None and free is not None and free < 2**20):  # torch: "unexpected pos"
        return "no space left on device" + left
    if code == getattr(errno, "EDQUOT", None):
        return "disk quota exceeded" + left
    if code == errno.EROFS:
        return "read-only file system"
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[0].lower() + exc.strerror[1:]
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__) + left


def write_error(exc: BaseException, path: str | os.PathLike, what: str = "write") -> WriteError:
    """A :class:`WriteError` ``"cannot {what} {path}: {cause}"`` for an ``OSError`` (or a library's
    error that wraps one)."""
    return WriteError(f"cannot {what} {path}: {describe_os_error(exc, path)}", error_number(exc))


def check_writable_dir(path: str | os.PathLike, what: str = "output directory") -> Path:
    """Create ``path`` (and its parents) if needed and make sure a file can be written in it, before
    any long work whose results would go there; a :class:`WriteError` naming it otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise WriteError(f"{what} {path} exists and is not a directory") from None
    except OSError as exc:
        raise write_error(exc, path, f"create {what}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".minivln-write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise write_error(exc, path, f"write to {what}") from None
    return path


def check_free_space(path: str | os.PathLike, needed: int, what: str) -> None:
    """Raise a :class:`WriteError` when the file system of ``path`` has less than ``needed`` bytes
    free (``what`` says what needs them, e.g. ``"stand-in features for 10,567 viewpoints"``)."""
    free = free_bytes(path)
    if free is not None and free < needed:
        raise WriteError(f"not enough space for {path}: {what} need about {format_bytes(needed)}, "
                         f"{format_bytes(free)} left", errno.ENOSPC)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same file (the same inode when both exist, else the same
    absolute path)."""
    pa, pb = Path(a), Path(b)
    try:
        if pa.exists() and pb.exists():
            return os.path.samefile(pa, pb)
    except OSError:
        return False
    return pa.resolve() == pb.resolve()


def refuse_overwriting_inputs(output: str | os.PathLike, inputs: dict[str, str | os.PathLike | None],
                              flag: str = "--out") -> None:
    """A :class:`DataError` when the file ``output`` would be written over one of ``inputs``
    (``{"--preds": path, "the run's log": path}``; ``None`` entries are skipped)."""
    for name, src in inputs.items():
        if src is not None and same_file(output, src):
            raise DataError(f"{flag} {output} would overwrite {name} (an input): choose another output file")


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
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(f"cannot create the cache directory {path}: {describe_os_error(exc, path)} (set "
                         "MINIVLN_CACHE to a writable directory)", error_number(exc)) from exc
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: never a half-written file.

    A failure is a :class:`WriteError` naming ``path`` and the cause; the temporary file is removed
    and an existing ``path`` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:  # read-only, full, a directory in the way...: one line naming the file
        raise write_error(exc, path) from exc
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
