"""Hardening, second round (issue 22), tried as a new user would: one writer per run directory, no
silent non-finite values (configs, feature files), Ctrl-C during training.  Every refusal is one line
``minivln: error: ...`` with exit status 2 and nothing overwritten; Ctrl-C is one line and exit 130.

Tiny models on the toy regression of ``tests/test_trainer.py`` and the 3-house toy world of
``conftest.small_toy``.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SMALL_DUET as SMALL
from test_trainer import build  # the toy model and task (tests/ is on sys.path)

import minivln
from minivln.cli import main as cli_main
from minivln.training.checkpoint import (
    LOCK_FILE,
    RunLock,
    RunLockedError,
    _process_start,
)

REPO = Path(minivln.__file__).resolve().parents[1]  # the code under test


def _finetune_args(data, feats, steps: int = 2) -> list[str]:
    return ["model=duet-cpu", f"model_overrides={json.dumps(SMALL)}", f"data_dir={data}", f"features={feats}",
            "batch_size=2", "max_action_len=5", "max_instr_len=40", "val_splits=[val_unseen]",
            "val_max_episodes=2", "num_threads=1", f"train.max_steps={steps}", "train.log_every=1",
            "train.ckpt_every=1", "train.progress=false"]


def _one_error_line(err: str, *needles: str) -> str:
    """The single ``minivln: error:`` line of ``err`` (nothing else there: no traceback)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("minivln: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli_main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


# ----------------------------------------------------------------------------------- one writer


def _write_lock(run: Path, pid: int, host: str | None = None, since: str = "2026-01-02 03:04:05 +0000") -> bytes:
    """A lock file as another process would have left it."""
    run.mkdir(parents=True, exist_ok=True)
    raw = json.dumps({"pid": pid, "host": host or socket.gethostname(), "process_start": _process_start(pid),
                      "since": since, "token": "x", "command": "minivln finetune"}).encode()
    (run / LOCK_FILE).write_bytes(raw)
    return raw


@pytest.fixture
def live_pid():
    """The pid of a live process of this host (not this one)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.fixture
def dead_pid():
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_trainer_on_the_same_run_dir_is_refused(tmp_path, one_thread):
    run = tmp_path / "run"
    first = build(run, max_steps=2)
    lock = run / LOCK_FILE
    info = json.loads(lock.read_text())
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname() and info["since"]
    with pytest.raises(RunLockedError, match=r"another trainer of this process \(pid \d+, since 20"):
        build(run, max_steps=2)
    with pytest.raises(RunLockedError):
        build(run, max_steps=2, resume=True)
    assert json.loads(lock.read_text()) == info  # the holder's lock is untouched
    first.fit()
    first.close()
    assert not lock.exists()  # released on close
    # a refused start (the run has a checkpoint, no resume) leaves no lock behind either
    with pytest.raises(FileExistsError, match="resume"):
        build(run, max_steps=2)
    assert not lock.exists()
    again = build(run, max_steps=2, resume=True)
    assert lock.exists()
    del again  # dropped without close(): released when collected
    gc.collect()
    assert not lock.exists()


def test_a_live_holder_in_another_process_is_refused(tmp_path, live_pid, one_thread):
    run = tmp_path / "run"
    raw = _write_lock(run, live_pid)
    with pytest.raises(RunLockedError) as info:
        build(run, max_steps=2)
    msg = str(info.value)
    assert "\n" not in msg and f"process {live_pid} on {socket.gethostname()}" in msg
    assert "since 2026-01-02 03:04:05" in msg and str(run / LOCK_FILE) in msg
    assert (run / LOCK_FILE).read_bytes() == raw and sorted(p.name for p in run.iterdir()) == [LOCK_FILE]
    # a lock taken on another host cannot be checked: refused, saying how to clear it by hand
    _write_lock(run, live_pid, host="elsewhere")
    with pytest.raises(RunLockedError, match=r"on elsewhere.*if no process on elsewhere writes it any more, remove"):
        build(run, max_steps=2)


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, dead_pid, one_thread):
    run = tmp_path / "run"
    _write_lock(run, dead_pid)
    with pytest.warns(UserWarning, match=rf"taking over the lock of process {dead_pid} .*which is gone"):
        trainer = build(run, max_steps=2)
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    trainer.fit()
    trainer.close()
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".lock")) == []
    # a pid that now belongs to another process (its start time differs) is stale too
    pid = os.getppid()
    _write_lock(run, pid)
    lock = json.loads((run / LOCK_FILE).read_text())
    lock["process_start"] = "1"
    (run / LOCK_FILE).write_text(json.dumps(lock))
    if _process_start(pid) is not None:
        with pytest.warns(UserWarning, match="taking over"):
            RunLock(run).release()
    # an unreadable lock: being written right now (refused), or left behind long ago (taken over)
    (run / LOCK_FILE).write_bytes(b"")
    with pytest.raises(RunLockedError, match="a moment ago"):
        RunLock(run)
    old = time.time() - 3600
    os.utime(run / LOCK_FILE, (old, old))
    with pytest.warns(UserWarning, match="unreadable lock file"):
        RunLock(run).release()
    assert not (run / LOCK_FILE).exists()


def test_finetune_on_a_run_dir_in_use_is_one_line_and_writes_nothing(small_toy, tmp_path, live_pid, capsys,
                                                                      one_thread):
    data, feats = small_toy
    run = tmp_path / "run"
    assert cli_main(["finetune", "--out", str(run), *_finetune_args(data, feats, steps=1)]) == 0
    assert not (run / LOCK_FILE).exists()
    _write_lock(run, live_pid)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for argv in (["--resume", "train.max_steps=2"], _finetune_args(data, feats, steps=2),
                 ["--resume"]):
        code, _, err = _run(["finetune", "--out", str(run), *argv], capsys)
        assert code == 2
        _one_error_line(err, f"{run} is being written by another run", f"process {live_pid}", "since 2026-01-02")
        assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
