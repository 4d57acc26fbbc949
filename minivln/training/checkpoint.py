"""Training-state checkpoints: one directory per checkpoint, replaced atomically.

A checkpoint directory (``RUN/latest/`` or ``RUN/best/``) holds::

    model.safetensors       the model's state dict (tensors, CPU)
    loss_terms.safetensors  learnable loss-term parameters as "<term name>.<param>" (when there are any)
    trainer.pt              latest/ only: optimizer, scheduler, grad scaler, step, best metric, and per
                            rank the RNG states (Python, NumPy, torch, CUDA) and the task's position
    meta.json               step, kind, best metric, validation metrics, time; written last

Two savings keep a checkpoint near the size of its information, and are undone on reading, bit for bit:
tied weights (a pretraining head's decoder and the word embeddings) are stored once (the safetensors
header names the copies), and an optimizer state tensor whose rows are mostly zero (AdamW's moments of
the 30,522-row word-embedding table: only the rows of words seen in training have gradients) is stored
as its non-zero rows.

It is written into a hidden staging directory (``RUN/.latest.tmp``) and then swapped in with two
renames (old -> ``RUN/.latest.old``, staging -> ``RUN/latest``), so a crash at any moment leaves
either the previous checkpoint or the new one, never a mixture.  :func:`find_checkpoint` repairs the
one window in between (the old one parked under ``.latest.old``, nothing at ``latest``).

``trainer.pt`` is a pickle (RNG and task states are arbitrary Python objects): load only runs you
trust.  The weights themselves are in safetensors files, which are safe to load from anywhere.

One writer per run directory: :class:`RunLock` (``RUN/.lock``, taken by the trainer before it writes
anything) refuses a second one.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import random
import secrets
import shutil
import socket
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from minivln.model.checkpoint import (
    TIED_KEY,
    CheckpointError,
    read_safetensors,
    read_torch,
)
from minivln.paths import (
    WriteError,
    describe_os_error,
    error_number,
    recover_parked_dir,
    swap_dir_into_place,
    write_error,
)

LOCK_FILE = ".lock"
MODEL_FILE = "model.safetensors"
LOSS_TERMS_FILE = "loss_terms.safetensors"
TRAINER_FILE = "trainer.pt"
META_FILE = "meta.json"
FORMAT = "minivln-checkpoint/1"


@dataclass
class Checkpoint:
    """The contents of a checkpoint directory, tensors on CPU."""

    path: Path
    meta: dict[str, Any]
    model: dict[str, torch.Tensor]
    loss_terms: dict[str, torch.Tensor] = field(default_factory=dict)
    trainer: dict[str, Any] | None = None  # None for a weights-only checkpoint (best/)

    @property
    def step(self) -> int:
        return int(self.meta["step"])


# ----------------------------------------------------------------------------------------- RNG states


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and every CUDA device) generator states."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Undo :func:`capture_rng_state`: the next random draws repeat those after the capture."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ----------------------------------------------------------------------------------------- writing


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync on Windows
        return
    _fsync_file(path)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors refuses tensors that share memory: a tied weight (the same tensor under a second
    name) is stored once and named in the header (``minivln.tied``, undone by ``read_safetensors``);
    a view into a larger storage gets its own copy."""
    first: dict[tuple, str] = {}
    tied: dict[str, str] = {}
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.dtype)
        if key in first:
            tied[name] = first[key]
            continue
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        first[key] = name
        out[name] = t
    if tied:
        save_file(out, str(path), metadata={TIED_KEY: json.dumps(tied)})
    else:  # the file as before ties were stored once
        save_file(out, str(path))
    _fsync_file(path)


ZERO_ROWS = "minivln.zero_rows"  # in trainer.pt: a tensor stored as its non-zero rows (its shape here)


def _pack_rows(t: torch.Tensor) -> torch.Tensor | dict[str, Any]:
    """``t`` as ``{ZERO_ROWS: shape, "rows", "values"}`` when most of its rows are zero, bit for bit."""
    if t.ndim < 2 or len(t) < 64:
        return t
    nonzero = t.detach().contiguous().view(torch.uint8).reshape(len(t), -1).any(1)  # any bit set: -0.0 counts
    if 2 * int(nonzero.sum()) > len(t):
        return t
    rows = nonzero.nonzero().squeeze(1)
    return {ZERO_ROWS: list(t.shape), "rows": rows.cpu(), "values": t[rows].detach().cpu().clone()}


def _unpack_rows(v: Any) -> Any:
    if isinstance(v, dict) and ZERO_ROWS in v:
        full = v["values"].new_zeros(v[ZERO_ROWS])
        full[v["rows"]] = v["values"]
        return full
    return v


def _map_optimizer_state(trainer_state: dict[str, Any], fn) -> dict[str, Any]:
    """``trainer_state`` with ``fn`` applied to every value of the optimizer's per-parameter state
    (new dicts: the live optimizer is not touched)."""
    opt = trainer_state.get("optimizer")
    if not isinstance(opt, dict) or not isinstance(opt.get("state"), dict):
        return trainer_state
    state = {p: {k: fn(v) for k, v in s.items()} if isinstance(s, dict) else s for p, s in opt["state"].items()}
    return {**trainer_state, "optimizer": {**opt, "state": state}}


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model_state: dict[str, torch.Tensor],
    meta: dict[str, Any],
    loss_terms_state: dict[str, torch.Tensor] | None = None,
    trainer_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory at ``path`` atomically (replacing any previous one).

    ``meta`` must be JSON-serialisable and should contain ``step``; ``format`` and ``time`` are added.
    A failed write (read-only file system, disk full, ...) is a one-line
    :class:`~minivln.paths.WriteError` naming ``path``, the cause and the previous checkpoint, which is
    kept; the staging directory is removed.
    """
    final = Path(path)
    staging = final.with_name(f".{final.name}.tmp")
    try:
        _write_checkpoint(final, staging, model_state, meta, loss_terms_state, trainer_state)
    except (OSError, RuntimeError, SafetensorError) as exc:  # torch.save reports a failed write as a RuntimeError
        if isinstance(exc, RuntimeError) and not _is_write_failure(exc):
            raise
        shutil.rmtree(staging, ignore_errors=True)
        previous = find_checkpoint(final, repair=False)
        kept = (f"the previous checkpoint (step {read_meta(previous).get('step')}) is kept"
                if previous is not None else "no previous checkpoint")
        raise WriteError(f"cannot write checkpoint {final}: {describe_os_error(exc, final.parent)}; {kept}",
                         error_number(exc)) from exc
    return final


def _is_write_failure(exc: RuntimeError) -> bool:
    """Whether torch's RuntimeError reports a failed write (its stream writer's messages)."""
    text = str(exc)
    return "file write failed" in text or "PytorchStreamWriter" in text or "unexpected pos" in text


def _write_checkpoint(final: Path, staging: Path, model_state: dict[str, torch.Tensor], meta: dict[str, Any],
                      loss_terms_state: dict[str, torch.Tensor] | None,
                      trainer_state: dict[str, Any] | None) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    if staging.exists():
        shutil.rmtree(staging)  # left over from a crash
    staging.mkdir()
    try:
        _save_tensors(model_state, staging / MODEL_FILE)
        if loss_terms_state:
            _save_tensors(loss_terms_state, staging / LOSS_TERMS_FILE)
        if trainer_state is not None:
            packed = _map_optimizer_state(trainer_state, lambda v: _pack_rows(v) if torch.is_tensor(v) else v)
            torch.save(packed, staging / TRAINER_FILE)
            _fsync_file(staging / TRAINER_FILE)
        full_meta = {"format": FORMAT, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **meta}
        (staging / META_FILE).write_text(json.dumps(full_meta, indent=1, sort_keys=True))
        _fsync_file(staging / META_FILE)
        _fsync_dir(staging)
        swap_dir_into_place(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------- reading


def _complete(path: Path) -> bool:
    return (path / META_FILE).is_file() and (path / MODEL_FILE).is_file()


def find_checkpoint(path: str | os.PathLike, *, repair: bool = True) -> Path | None:
    """The complete checkpoint at ``path``, or ``None``.

    If a crash hit between the two renames of a swap, the previous checkpoint is still complete under
    ``.<name>.old``; with ``repair`` it is moved back to ``path`` (call it from one process only).
    """
    return recover_parked_dir(path, _complete, repair=repair)


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's ``meta.json``; a truncated or garbage one is a :class:`CheckpointError`."""
    f = Path(path) / META_FILE
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(message=f"{f} is truncated or corrupt (not valid JSON: {exc})") from None
    except OSError as exc:
        raise CheckpointError(message=f"cannot read {f}: {exc.strerror or exc}") from None
    if not isinstance(meta, dict) or "step" not in meta:
        raise CheckpointError(message=f"{f} is not a checkpoint's meta.json (no step)")
    return meta


def load_checkpoint(path: str | os.PathLike, *, with_trainer: bool = True) -> Checkpoint:
    """Read a checkpoint directory written by :func:`save_checkpoint` (tensors on CPU).  An incomplete
    directory or a truncated or garbage file is a one-line :class:`CheckpointError` naming the file."""
    p = Path(path)
    if not _complete(p):
        raise CheckpointError(message=f"{p} is not a complete checkpoint (no {META_FILE} or {MODEL_FILE})")
    meta = read_meta(p)
    loss_terms = read_safetensors(p / LOSS_TERMS_FILE) if (p / LOSS_TERMS_FILE).is_file() else {}
    trainer = None
    if with_trainer and (p / TRAINER_FILE).is_file():
        # our own pickle: it holds NumPy RNG arrays and arbitrary task state, so not weights_only
        trainer = read_torch(p / TRAINER_FILE, weights_only=False)
        if not isinstance(trainer, dict) or "step" not in trainer:
            raise CheckpointError(message=f"{p / TRAINER_FILE} is not a trainer state (no step)")
        trainer = _map_optimizer_state(trainer, _unpack_rows)
    return Checkpoint(path=p, meta=meta, model=read_safetensors(p / MODEL_FILE), loss_terms=loss_terms,
                      trainer=trainer)


# ----------------------------------------------------------------------------------------- one writer


class RunLockedError(FileExistsError):
    """Another process (or another open trainer of this process) writes the run directory."""


_HELD: dict[str, RunLock] = {}  # resolved lock path -> the lock this process holds there
_TAKING = threading.Lock()  # one thread of this process takes a lock at a time (else two threads could
# each read the other's fresh lock as "an earlier process of the same pid" and take it over)
_FRESH_S = 60.0  # an unreadable lock younger than this is being written by its taker, not left behind


def process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, ``/proc/PID/stat``); None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # after "pid (command)": field 3 on; starttime is field 22
    return fields[19] if len(fields) > 19 else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def process_alive(pid: int, start: str | None) -> bool:
    """Whether the process that wrote a lock (``pid``, started at ``start``) still runs on this host
    (a pid taken by another process since does not count)."""
    if not (pid > 0 and _pid_alive(pid)):
        return False
    return start is None or process_start(pid) in (None, start)


def lock_holder(run_dir: str | os.PathLike) -> str | None:
    """Who writes ``run_dir`` now, read from its lock without taking it: ``"process PID on HOST, since
    T"`` while that process lives (a lock of another host is taken as held), None without a lock or
    with a stale or unreadable one."""
    try:
        info = json.loads((Path(run_dir) / LOCK_FILE).read_bytes())
        pid, host, since = int(info["pid"]), str(info["host"]), str(info.get("since", "?"))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if host == socket.gethostname() and not process_alive(pid, info.get("process_start")):
        return None
    return f"process {pid} on {host}, since {since}"


class RunLock:
    """``RUN/.lock``: the run directory has one writer.

    The file is created with ``O_CREAT | O_EXCL`` (atomic: of two processes one gets it) and holds the
    holder's pid, host, process start and the time it was taken.  A second writer gets a
    :class:`RunLockedError` naming the holder.  A lock whose process is gone (not alive on this host,
    or its pid now another process) is stale: it is taken over with a warning.  A lock taken on
    another host cannot be checked and is always refused.  :meth:`release` removes the file (only if
    it is still this lock's); call it when done (the trainer does in ``close()``, and at exit).
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._key = str(self.path.resolve())
        self.pid = os.getpid()
        self.held = False
        self._content = b""
        self._acquire()

    # -- taking it ---------------------------------------------------------------------------------
    def _acquire(self) -> None:
        with _TAKING:
            self._acquire_unshared()

    def _acquire_unshared(self) -> None:
        for _ in range(5):  # a stale lock taken over by another process meanwhile: look again
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                raw = self._read()
                stale = self._judge(raw)  # raises RunLockedError while the holder lives
                if self._remove_stale(raw):
                    warnings.warn(f"{self.path}: taking over the lock of {stale}", stacklevel=6)
                continue
            except OSError as exc:
                raise write_error(exc, self.path, "create the lock file") from None
            self._content = json.dumps({
                "pid": self.pid, "host": socket.gethostname(), "process_start": process_start(self.pid),
                "since": time.strftime("%Y-%m-%d %H:%M:%S %z"), "token": secrets.token_hex(8),
                "command": " ".join(sys.argv)[:500],
            }).encode() + b"\n"
            try:
                os.write(fd, self._content)
                os.fsync(fd)
            except OSError as exc:
                os.close(fd)
                self.path.unlink(missing_ok=True)
                raise write_error(exc, self.path) from None
            os.close(fd)
            self.held = True
            _HELD[self._key] = self
            return
        raise RunLockedError(f"{self.run_dir}: cannot take {self.path}: other processes keep taking it")

    def _read(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None  # released meanwhile
        except OSError as exc:
            raise write_error(exc, self.path, "read the lock file") from None

    def _judge(self, raw: bytes | None) -> str:
        """Who held the stale lock ``raw`` (for the warning); a RunLockedError if it is not stale."""
        if raw is None:
            return "nobody"
        try:
            info = json.loads(raw)
            pid, host, since = int(info["pid"]), str(info["host"]), str(info.get("since", "?"))
        except (ValueError, KeyError, TypeError):
            try:
                age = time.time() - self.path.stat().st_mtime
            except OSError:
                return "nobody"
            if age < _FRESH_S:  # its taker is writing it right now
                raise RunLockedError(f"{self.run_dir} is being written by another run (it took {self.path} "
                                     "a moment ago): one writer per run directory") from None
            return "an unreadable lock file"
        holder = f"process {pid} on {host}, since {since}"
        if host != socket.gethostname():
            raise RunLockedError(
                f"{self.run_dir} is being written by another run ({holder}; {self.path}): one writer per run "
                f"directory; if no process on {host} writes it any more, remove {self.path}")
        if pid == os.getpid():
            if self._key in _HELD:
                gc.collect()  # a trainer dropped without close() releases its lock when collected
            if self._key in _HELD:
                raise RunLockedError(
                    f"{self.run_dir} is being written by another trainer of this process (pid {pid}, since "
                    f"{since}): close() it first; one writer per run directory")
            return f"{holder} (an earlier process of the same pid)"
        if process_alive(pid, info.get("process_start")):  # not when the pid belongs to another process now
            raise RunLockedError(
                f"{self.run_dir} is being written by another run ({holder}; {self.path}): one writer per run "
                "directory; wait for it to finish, or stop it first")
        return f"{holder}, which is gone"

    def _remove_stale(self, raw: bytes | None) -> bool:
        """Take the stale lock ``raw`` out of the way; False when someone else changed it meanwhile."""
        if raw is None:
            return False
        aside = self.path.with_name(f"{LOCK_FILE}.stale.{os.getpid()}")
        try:
            os.rename(self.path, aside)  # of two processes taking it over, one moves it
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise write_error(exc, self.path, "take over the stale lock") from None
        if aside.read_bytes() == raw:
            aside.unlink()
            return True
        with contextlib.suppress(OSError):  # a fresh lock, taken meanwhile: put it back
            os.link(aside, self.path)
        aside.unlink(missing_ok=True)
        return False

    # -- letting go --------------------------------------------------------------------------------
    def release(self) -> None:
        """Remove ``RUN/.lock`` if this lock still holds it (idempotent; a no-op in a forked child)."""
        if not self.held or os.getpid() != self.pid:
            return
        self.held = False
        if _HELD.get(self._key) is self:
            del _HELD[self._key]
        try:
            if self.path.read_bytes() == self._content:
                self.path.unlink()
        except OSError:
            pass
