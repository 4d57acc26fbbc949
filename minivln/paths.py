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
import json
import math
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


# ------------------------------------------------------------------ temporaries and directory swaps
#
# A file or directory is written beside its target under ``.NAME.tmpPID`` (PID: the writer's process)
# and renamed into place when complete; a directory replaces the previous one with two renames
# (old -> ``.NAME.old``, new -> ``NAME``), then the old one is deleted.  A killed writer leaves its
# temporary behind, and a crash between the two renames leaves the old directory complete under
# ``.NAME.old`` with nothing at ``NAME``: :func:`remove_stale_temporaries` and
# :func:`recover_parked_dir` are how the next writer or reader tidies up.


def temporary_sibling(path: str | os.PathLike) -> Path:
    """``.NAME.tmpPID`` beside ``path``: where this process writes ``path`` before renaming it in."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def parked_sibling(path: str | os.PathLike) -> Path:
    """``.NAME.old`` beside ``path``: where :func:`swap_dir_into_place` parks the previous directory."""
    path = Path(path)
    return path.with_name(f".{path.name}.old")


def _process_running(pid: int) -> bool:
    """Whether process ``pid`` still runs (this process counts as not running: it is about to write
    the target itself, so its own leftovers are stale).  Outside POSIX: always True (keep the file)."""
    if pid == os.getpid():
        return False
    if os.name != "posix" or pid <= 0:
        return os.name != "posix"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it runs, under another user
        return True
    return True


def _process_started(pid: int) -> float | None:
    """When process ``pid`` started, in seconds since the epoch (Linux ``/proc``); None if unknown."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """The ``.NAME.tmpPID`` files or directories beside ``path`` whose process no longer runs (a
    killed or crashed writer of ``path``), or runs but started after the temporary was last written
    (its PID was reused, e.g. after a restart); those of a running writer are not listed."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.tmp(\d+)")
    try:
        entries = list(path.parent.iterdir())
    except OSError:  # no parent yet, or unreadable: nothing to clean
        return []
    stale = []
    for entry in entries:
        found = pattern.fullmatch(entry.name)
        if not found:
            continue
        pid = int(found.group(1))
        if _process_running(pid):
            started = _process_started(pid)
            try:
                written = entry.lstat().st_mtime
            except OSError:  # gone meanwhile
                continue
            if started is None or written >= started - 2:  # 2 s: the boot time is in whole seconds
                continue
        stale.append(entry)
    return sorted(stale)


def remove_path(path: str | os.PathLike) -> None:
    """Remove a file or a directory tree (nothing if it is not there)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove :func:`stale_temporaries` of ``path`` (call it before writing ``path``); returns them.
    A failure to remove one is a :class:`WriteError` naming it."""
    removed = []
    for entry in stale_temporaries(path):
        try:
            remove_path(entry)
        except OSError as exc:
            raise write_error(exc, entry, "remove the stale temporary") from exc
        removed.append(entry)
    return removed


def _rename(src: Path, dst: Path) -> None:
    """One rename (a separate function so that tests can interrupt a swap between its renames)."""
    os.rename(src, dst)


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def swap_dir_into_place(staging: str | os.PathLike, final: str | os.PathLike) -> None:
    """Replace the directory ``final`` by the complete directory ``staging`` (its sibling): ``final``
    -> :func:`parked_sibling`, ``staging`` -> ``final``, then the parked one is deleted.  At every
    instant the old complete directory or the new one is at ``final``, or (between the two renames)
    the old one is complete under ``.NAME.old``, which :func:`recover_parked_dir` moves back."""
    staging, final = Path(staging), Path(final)
    parked = parked_sibling(final)
    if parked.exists():
        remove_path(parked)
    if final.exists() or final.is_symlink():
        _rename(final, parked)
    _rename(staging, final)
    _fsync_dir(final.parent)
    try:  # the new directory is in place: an old one that resists is tidied by the next reader
        remove_path(parked)
    except OSError:
        pass


def recover_parked_dir(final: str | os.PathLike, complete, *, repair: bool = True) -> Path | None:
    """The complete directory at ``final`` (``complete(path)`` says whether one is), or ``None``.

    After a crash between the two renames of :func:`swap_dir_into_place` the previous directory is
    still complete under ``.NAME.old``: with ``repair`` it is moved back to ``final`` (whatever
    incomplete thing is there is removed) and ``final`` is returned; without, or when the move fails
    (a read-only file system), the parked path itself.  A parked directory beside a complete
    ``final`` is a leftover of a swap that completed: removed with ``repair``."""
    final = Path(final)
    parked = parked_sibling(final)
    if complete(final):
        if repair and parked.exists():
            try:
                remove_path(parked)
            except OSError:
                pass
        return final
    if not complete(parked):
        return None
    if not repair:
        return parked
    try:
        if final.exists() or final.is_symlink():
            remove_path(final)
        _rename(parked, final)
    except OSError:
        return parked
    return final


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: never a half-written file.

    A failure is a :class:`WriteError` naming ``path`` and the cause; the temporary file is removed
    and an existing ``path`` is left as it was."""
    path = Path(path)
    tmp = temporary_sibling(path)
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


def _strict(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def json_text(obj, indent: int | None = 1) -> str:
    """``obj`` as strict JSON text with a final newline: a NaN or infinite float (e.g. a standard error
    over a single seed) becomes ``null``, since bare ``NaN`` is not JSON and ``jq`` or
    ``JSON.parse`` reject the whole file."""
    return json.dumps(_strict(obj), indent=indent, allow_nan=False) + "\n"
