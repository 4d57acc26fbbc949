"""Hardening, second round (issue 22), tried as a new user would: one writer per run directory, no
silent non-finite values (configs, feature files), Ctrl-C during training.  Every refusal is one line
``minivln: error: ...`` with exit status 2 and nothing overwritten; Ctrl-C is one line and exit 130.

Tiny models on the toy regression of ``tests/test_trainer.py`` and the 3-house toy world of
``conftest.small_toy``.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from cli_checks import finetune_args as _finetune_args
from cli_checks import one_error_line as _one_error_line
from cli_checks import run_cli as _run
from conftest import SMALL_DUET
from test_trainer import (  # the toy (tests/ is on sys.path)
    MLP,
    HiddenMatch,
    RegressionTask,
    build,
    make_cfg,
)

import minivln
from minivln.cli import main as cli_main
from minivln.config import NONFINITE, ConfigError, load_config
from minivln.features.hdf5 import FeatureStore, ObjectFeatureStore
from minivln.paths import DataError
from minivln.training.checkpoint import (
    LOCK_FILE,
    RunLock,
    RunLockedError,
    load_checkpoint,
    process_start,
    read_meta,
)
from minivln.training.distributed import seed_everything
from minivln.training.finetune import FinetuneConfig
from minivln.training.logging import read_jsonl
from minivln.training.pretrain import PretrainConfig
from minivln.training.trainer import (
    OptimConfig,
    TrainConfig,
    Trainer,
    TrainingInterrupted,
    TrainingStopped,
)

REPO = Path(minivln.__file__).resolve().parents[1]  # the code under test


@pytest.fixture(scope="module")
def trained(small_toy, tmp_path_factory, one_thread):
    """A finished 1-step fine-tuning run (read-only for the tests: they copy it to change it)."""
    data, feats = small_toy
    run = tmp_path_factory.mktemp("trained") / "run"
    assert cli_main(["finetune", "--out", str(run), *_finetune_args(data, feats, steps=1)]) == 0
    return run


# ----------------------------------------------------------------------------------- one writer


def _write_lock(run: Path, pid: int, host: str | None = None, since: str = "2026-01-02 03:04:05 +0000") -> bytes:
    """A lock file as another process would have left it."""
    run.mkdir(parents=True, exist_ok=True)
    raw = json.dumps({"pid": pid, "host": host or socket.gethostname(), "process_start": process_start(pid),
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
    if process_start(pid) is not None:
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


def test_finetune_on_a_run_dir_in_use_is_one_line_and_writes_nothing(small_toy, trained, tmp_path, live_pid,
                                                                      capsys, one_thread):
    data, feats = small_toy
    run = tmp_path / "run"
    assert not (trained / LOCK_FILE).exists()  # released once the run finished
    shutil.copytree(trained, run)
    _write_lock(run, live_pid)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for argv in (["--resume", "train.max_steps=2"], _finetune_args(data, feats, steps=2),
                 ["--resume"]):
        code, _, err = _run(["finetune", "--out", str(run), *argv], capsys)
        assert code == 2
        _one_error_line(err, f"{run} is being written by another run", f"process {live_pid}", "since 2026-01-02")
        assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


# ----------------------------------------------------------------------------------- non-finite values


@pytest.mark.parametrize("override, key", [
    ("kd_weight=nan", "kd_weight"), ("kd_weight=inf", "kd_weight"), ("kd_weight=.inf", "kd_weight"),
    ("kd_weight=-.inf", "kd_weight"), ("train.optim.lr=nan", "train.optim.lr"),
    ("train.optim.lr=1e400", "train.optim.lr"), ("ml_weight=.nan", "ml_weight"),
    ("train.max_minutes=inf", "train.max_minutes"), ("kd_terms.fuse=nan", "kd_terms.fuse"),
    ("train.optim.betas=[0.9, .nan]", "train.optim.betas"),
    ("model_overrides={hidden_dropout: .nan}", "model_overrides.hidden_dropout"),
])
def test_non_finite_config_values_are_one_line_naming_the_key(override, key, tmp_path, capsys):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: -?(nan|inf) is not a finite number"):
        load_config(FinetuneConfig, None, [override])
    run = tmp_path / "run"
    code, _, err = _run(["finetune", "--out", str(run), override], capsys)
    assert code == 2
    _one_error_line(err, f"{key}: ", "not a finite number")
    assert not run.exists()


def test_non_finite_values_in_a_config_file_and_in_python(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("kd_weight: .nan\n")
    code, _, err = _run(["pretrain", "--config", str(cfg), "--out", str(tmp_path / "pt")], capsys)
    assert code == 2
    _one_error_line(err, "kd_weight: nan is not a finite number")
    with pytest.raises(ConfigError, match="mix.mrc: inf"):
        load_config(PretrainConfig, None, ["mix.mrc=inf"])
    load_config(PretrainConfig, None, ["mix.og=null", "kd_weight=0.5"])  # None and finite numbers are fine
    bad = TrainConfig(run_dir=str(tmp_path / "r"), optim=OptimConfig(lr=float("nan")))  # range checks pass NaN
    with pytest.raises(ConfigError, match="optim.lr: nan is not a finite number"):
        bad.check()

    @dataclasses.dataclass
    class WithBound:  # a field that gives infinity a meaning says so, and keeps it
        limit: float = dataclasses.field(default=1.0, metadata={NONFINITE: "inf: no limit"})
        scale: float = 1.0

    assert load_config(WithBound, None, ["limit=inf"]).limit == math.inf
    with pytest.raises(ConfigError, match="scale"):
        load_config(WithBound, None, ["scale=inf"])


@pytest.mark.parametrize("size", ["0", "-3"])
def test_navigate_batch_size_below_one_is_one_line(size, trained, tmp_path, capsys):
    out = tmp_path / "nav"
    code, _, err = _run(["navigate", "--checkpoint", str(trained), "--split", "val_unseen", "--out", str(out),
                         "--batch-size", size], capsys)
    assert code == 2
    _one_error_line(err, f"--batch-size must be a whole number >= 1, got {size}")
    assert not out.exists()


def _damaged_copy(src: Path, dst: Path, change) -> list[str]:
    """A copy of the feature file ``src`` with ``change(h5file, key)`` applied to every viewpoint key."""
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        keys = sorted(k for k in f if isinstance(f[k], h5py.Dataset))
        for key in keys:
            change(f, key)
    return keys


def _nan_in_view_3(f, key):
    data = f[key][()]
    data[3, 5] = np.nan
    f[key][...] = data


def test_view_features_with_nan_or_inf_are_refused_naming_file_and_key(small_toy, tmp_path, capsys, one_thread):
    data, feats = small_toy
    bad = tmp_path / "nan.h5"
    keys = _damaged_copy(feats, bad, _nan_in_view_3)
    store = FeatureStore(bad)
    scan, vp = keys[0].split("_", 1)
    with pytest.raises(DataError) as info:
        store.get(scan, vp)
    msg = str(info.value)
    assert "\n" not in msg and str(bad) in msg and repr(keys[0]) in msg and "1 non-finite values" in msg
    assert "in view(s) 3;" in msg
    inf = tmp_path / "inf.h5"
    _damaged_copy(feats, inf, lambda f, key: f[key].__setitem__((0, slice(None)), np.inf))
    with pytest.raises(DataError, match=r"16 non-finite values \(NaN or infinite\), in view\(s\) 0;"):
        FeatureStore(inf).get(scan, vp)
    # training on it: one line, not an agent that silently stops
    code, _, err = _run(["finetune", "--out", str(tmp_path / "run"), *_finetune_args(data, bad)], capsys)
    assert code == 2
    _one_error_line(err, str(bad), "non-finite values (NaN or infinite)", "in view(s) 3")


def test_a_feature_file_of_strings_is_one_line(small_toy, tmp_path, capsys, one_thread):
    data, feats = small_toy
    fixed = tmp_path / "fixed.h5"

    def to_strings(f, key):
        del f[key]
        f.create_dataset(key, data=np.full((36, 16), b"0.5", dtype="S3"))

    keys = _damaged_copy(feats, fixed, to_strings)
    scan, vp = keys[0].split("_", 1)
    with pytest.raises(DataError, match=rf"{re.escape(str(fixed))}: key '{keys[0]}' holds byte-string values"):
        FeatureStore(fixed).get(scan, vp)
    varlen = tmp_path / "varlen.h5"
    with h5py.File(varlen, "w") as f:
        f.create_dataset(keys[0], data=np.full((36, 16), "x", dtype=object), dtype=h5py.string_dtype())
    with pytest.raises(DataError, match=rf"key '{keys[0]}' holds object \(variable-length string\) values"):
        FeatureStore(varlen, expected_dim=16).get(scan, vp)
    code, _, err = _run(["finetune", "--out", str(tmp_path / "run"), *_finetune_args(data, fixed)], capsys)
    assert code == 2
    _one_error_line(err, str(fixed), "holds byte-string values", "not numbers")


def test_object_features_with_nan_or_strings_are_refused(tmp_path):
    path = tmp_path / "objs.h5"
    fts = np.ones((3, 16), np.float32)
    with h5py.File(path, "w") as f:
        for key, values, directions in (("s_ok", fts, np.zeros((3, 2))), ("s_nan", fts, np.zeros((3, 2))),
                                        ("s_dir", fts, np.zeros((3, 2))), ("s_str", None, None)):
            if values is None:
                f.create_dataset(key, data=np.full((3, 16), b"1", dtype="S1"))
                continue
            values = values.copy()
            if key == "s_nan":
                values[2, 0] = np.nan
            if key == "s_dir":
                directions = directions.copy()
                directions[1, 1] = np.inf
            ds = f.create_dataset(key, data=values)
            ds.attrs["obj_ids"] = np.array([b"7", b"8", b"9"])  # digit strings are ids, as before
            ds.attrs["directions"] = directions
        g = f.create_group("s_ids")
        g.create_dataset("fts", data=fts)
        g.create_dataset("obj_ids", data=np.array([1.0, np.nan, 3.0]))
    store = ObjectFeatureStore(path, expected_dim=16)
    assert list(store.get("s", "ok").obj_ids) == [7, 8, 9]
    with pytest.raises(DataError, match=r"objs.h5: key 's_nan' has 1 non-finite values .* in object\(s\) 2;"):
        store.get("s", "nan")
    with pytest.raises(DataError, match=r"key 's_dir' has 1 non-finite values of attribute 'directions' .* "
                                        r"in object\(s\) 1;"):
        store.get("s", "dir")
    with pytest.raises(DataError, match=r"key 's_str' holds byte-string values"):
        store.get("s", "str")
    with pytest.raises(DataError, match=r"key 's_ids' has 1 non-finite values of attribute 'obj_ids'"):
        store.get("s", "ids")


# ----------------------------------------------------------------------------------- Ctrl-C


class _Interrupting(RegressionTask):
    """The toy task, with a Ctrl-C arriving when micro-batch ``at`` is fetched."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    def next_batch(self, index: int):
        if index == self.at:
            raise KeyboardInterrupt
        return super().next_batch(index)


@pytest.mark.parametrize("at, message", [
    (6, r"interrupted after step 6; the last checkpoint is {latest} \(step 4\); continue it with --resume"),
    (1, r"interrupted after step 1, before the first checkpoint of {run}: nothing to resume"),
])
def test_ctrl_c_in_fit_names_the_last_checkpoint(at, message, tmp_path, one_thread):
    run = tmp_path / "run"
    seed_everything(0)
    trainer = Trainer(MLP(), _Interrupting(at), make_cfg(run, max_steps=10, ckpt_every=4))
    caught: BaseException | None = None
    try:
        trainer.fit()
    except KeyboardInterrupt as exc:  # (a bare one would abort pytest itself: caught here, checked below)
        caught = exc
    finally:
        trainer.close()
    assert isinstance(caught, TrainingInterrupted), repr(caught)  # still a KeyboardInterrupt for callers
    assert re.fullmatch(message.format(latest=re.escape(str(run / "latest")), run=re.escape(str(run))) + ".*",
                        str(caught)), str(caught)
    assert trainer.step == at and not (run / LOCK_FILE).exists() and not (run / ".latest.tmp").exists()


# ----------------------------------------------------------------------------------- SIGTERM


class _Terminating(RegressionTask):
    """The toy task, sending this process SIGTERM when each micro-batch in ``at`` is fetched (never with
    SIGTERM at its default action: that would end the test session instead of failing a test)."""

    def __init__(self, at: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.at = at

    def next_batch(self, index: int):
        if index in self.at:
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL, "fit() did not take SIGTERM"
            os.kill(os.getpid(), signal.SIGTERM)
        return super().next_batch(index)


def _sigterm_trainer(run: Path, at: tuple[int, ...] = (), steps: int = 10, **kw) -> Trainer:
    """What an exact resume must restore (a teacher with a loss term, dropout, accumulation, warm-up +
    cosine, a weight average), checkpoints every 3 steps."""
    seed_everything(0)
    model, teacher = MLP(), MLP(d_hidden=8, dropout=0.0)
    cfg = make_cfg(run, max_steps=steps, ckpt_every=3, grad_accum_steps=2, ema_decay=0.8, ema_start=4,
                   resume=(run / "latest").exists(), **kw)
    return Trainer(model, _Terminating(at), cfg, teacher=teacher, loss_terms=[HiddenMatch()])


def _fit_catching(trainer: Trainer) -> BaseException | None:
    try:
        trainer.fit()
    except KeyboardInterrupt as exc:  # (a bare one would abort pytest itself: caught here, checked by the caller)
        return exc
    finally:
        trainer.close()
    return None


def test_sigterm_finishes_the_step_checkpoints_it_and_resumes_bit_identical(tmp_path, one_thread):
    """SIGTERM in step 8 of 10 (checkpoints every 3): step 8 completes and is saved, fit() raises
    TrainingStopped naming it, SIGTERM's default action is back; the resume ends with the same bits and
    the same log as an unbroken run -- where a SIGTERM used to kill the process and lose steps 7-8."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert _fit_catching(_sigterm_trainer(straight)) is None
    caught = _fit_catching(_sigterm_trainer(stopped, at=(7 * 2 + 1,)))  # the 2nd micro-batch of step 8
    assert isinstance(caught, TrainingStopped) and isinstance(caught, TrainingInterrupted), repr(caught)
    assert caught.signum == signal.SIGTERM
    assert str(caught) == (f"stopped by SIGTERM after step 8; its checkpoint is {stopped / 'latest'} (step 8); "
                           "continue it with --resume")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert read_meta(stopped / "latest")["step"] == 8
    assert not (stopped / LOCK_FILE).exists() and not (stopped / ".latest.tmp").exists()
    assert read_jsonl(stopped / "log.jsonl")[-1] == {"kind": "stop", "step": 8, "reason": "SIGTERM"}

    assert _fit_catching(_sigterm_trainer(stopped)) is None  # the resume
    a, b = load_checkpoint(straight / "latest"), load_checkpoint(stopped / "latest")
    assert a.step == b.step == 10
    for name in ("model", "loss_terms"):
        sa, sb = getattr(a, name), getattr(b, name)
        assert sa.keys() == sb.keys() and sa
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{name}.{k} differs after the resume"
    ea, eb = load_checkpoint(straight / "ema", with_trainer=False), load_checkpoint(stopped / "ema", with_trainer=False)
    for k in ea.model:
        assert torch.equal(ea.model[k], eb.model[k]), f"ema {k} differs after the resume"
    ra = [r for r in read_jsonl(straight / "log.jsonl") if r["kind"] == "train"]
    rb = [r for r in read_jsonl(stopped / "log.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in rb] == [r["step"] for r in ra] == [2, 4, 6, 8, 10]
    assert [r["loss"] for r in rb] == [r["loss"] for r in ra]


def test_sigterm_in_the_last_step_still_stops_and_the_resume_has_nothing_left(tmp_path, one_thread):
    run = tmp_path / "run"
    caught = _fit_catching(_sigterm_trainer(run, at=(9 * 2,), steps=10))  # in step 10 of 10
    assert isinstance(caught, TrainingStopped), repr(caught)
    assert str(caught).startswith("stopped by SIGTERM after its last step (10); its checkpoint is ")
    assert read_meta(run / "latest")["step"] == 10
    logged = read_jsonl(run / "log.jsonl")
    trainer = _sigterm_trainer(run, steps=10)
    assert _fit_catching(trainer) is None and trainer.step == 10
    assert read_jsonl(run / "log.jsonl") == logged  # no step trained twice


class _TermThenCtrlC(_Terminating):
    """SIGTERM when micro-batch ``at`` is fetched, Ctrl-C at ``ctrl_c`` (raised here: a test session
    started in the background ignores SIGINT)."""

    def __init__(self, at: tuple[int, ...], ctrl_c: int) -> None:
        super().__init__(at)
        self.ctrl_c = ctrl_c

    def next_batch(self, index: int):
        if index == self.ctrl_c:
            raise KeyboardInterrupt
        return super().next_batch(index)


def test_more_sigterms_change_nothing_ctrl_c_stops_at_once_and_a_callers_handler_is_left_alone(tmp_path, one_thread):
    # a scheduler's SIGTERM to every process of the job, then the driver's own to its job: still one stop
    caught = _fit_catching(_sigterm_trainer(tmp_path / "twice", at=(7 * 2, 7 * 2 + 1)))  # both in step 8
    assert isinstance(caught, TrainingStopped) and str(caught).startswith("stopped by SIGTERM after step 8;")
    assert read_meta(tmp_path / "twice" / "latest")["step"] == 8

    seed_everything(0)  # Ctrl-C while a stop is pending: now, the last regular checkpoint named
    trainer = Trainer(MLP(), _TermThenCtrlC(at=(7 * 2,), ctrl_c=7 * 2 + 1),
                      make_cfg(tmp_path / "ctrl-c", max_steps=10, ckpt_every=3, grad_accum_steps=2))
    caught = _fit_catching(trainer)
    assert type(caught) is TrainingInterrupted, repr(caught)
    assert str(caught).startswith("interrupted after step 7; the last checkpoint is ")
    assert read_meta(tmp_path / "ctrl-c" / "latest")["step"] == 6
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

    seen = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        assert _fit_catching(_sigterm_trainer(tmp_path / "own", at=(3,), steps=4)) is None  # trained to the end
        assert seen == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, before)


def _until_logged(proc: subprocess.Popen, run: Path, step: int) -> None:
    """Wait until ``run``'s log has a training record of ``step`` or later (the process still alive)."""
    deadline = time.monotonic() + 300
    while not any(r.get("kind") == "train" and r.get("step", 0) >= step for r in read_jsonl(run / "log.jsonl")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"step {step} not logged after 300 s"
        time.sleep(0.2)


def _stopped_line(proc: subprocess.Popen, run: Path) -> int:
    """The stopped process's exit and its one line; returns the step it saved (the one it reached)."""
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    found = re.fullmatch(rf"minivln: stopped by SIGTERM after step (\d+); its checkpoint is "
                         rf"{re.escape(str(run / 'latest'))} \(step \1\); continue it with --resume", lines[0])
    assert found, lines[0]
    reached = max(r["step"] for r in read_jsonl(run / "log.jsonl") if r.get("kind") == "train")
    assert int(found[1]) == reached == read_meta(run / "latest")["step"]
    assert read_jsonl(run / "log.jsonl")[-1] == {"kind": "stop", "step": reached, "reason": "SIGTERM"}
    assert not (run / LOCK_FILE).exists() and not (run / ".latest.tmp").exists()
    return reached


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return env


def test_sigterm_during_finetune_saves_that_step_and_exits_143(small_toy, tmp_path, one_thread):
    """A real run in another process (as `minivln experiment` stops its jobs): one line naming the
    checkpoint of the step it reached, exit 128 + SIGTERM, the lock let go.  No regular checkpoint
    falls in the run (ckpt_every 100,000): the one there is the stop's."""
    data, feats = small_toy
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "minivln.cli", "finetune", "--out", str(run),
                             *_finetune_args(data, feats, steps=100_000), "train.ckpt_every=100000"],
                            cwd=REPO, env=_child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _until_logged(proc, run, 2)
        assert not (run / "latest").exists()
        proc.send_signal(signal.SIGTERM)
        assert _stopped_line(proc, run) >= 2
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_sigterm_to_a_pretraining_job_and_its_batch_workers_saves_the_step(small_toy, tmp_path, one_thread):
    """SIGTERM to every process of the job at once (as SLURM sends it, or ``kill -- -PGID``), batches built
    in two worker processes: the workers keep serving until the step is done, the step is saved, exit 143."""
    data, feats = small_toy
    run = tmp_path / "pt"
    args = ["pretrain", "--out", str(run), "model=duet-cpu", f"model_overrides={json.dumps(SMALL_DUET)}",
            f"data_dir={data}", f"features={feats}", "batch_size=2", "max_instr_len=40", "val_batches=1",
            "num_workers=2", "num_threads=1", "train.max_steps=100000", "train.log_every=1", "train.val_every=0",
            "train.ckpt_every=100000", "train.progress=false"]
    proc = subprocess.Popen([sys.executable, "-m", "minivln.cli", *args], cwd=REPO, env=_child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _until_logged(proc, run, 2)
        os.killpg(proc.pid, signal.SIGTERM)  # the trainer and its workers
        assert _stopped_line(proc, run) >= 2
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def test_ctrl_c_during_finetune_is_one_line_exit_130_and_resumes(small_toy, tmp_path, capsys, one_thread):
    """A real run in another process: a second writer is refused while it trains; SIGINT after its first
    checkpoint ends it with one line naming that checkpoint and exit 130; --resume continues it."""
    data, feats = small_toy
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    # SIGINT at its default in the child: a test session started in the background (nohup ... &) ignores
    # SIGINT, and a Python started with SIGINT ignored never raises KeyboardInterrupt
    proc = subprocess.Popen([sys.executable, "-m", "minivln.cli", "finetune", "--out", str(run),
                             *_finetune_args(data, feats, steps=100_000)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 300
        while not (run / "latest" / "meta.json").is_file():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.2)
        # meanwhile, a second writer (the same run resumed in this process) is refused
        code, _, err = _run(["finetune", "--out", str(run), "--resume"], capsys)
        assert code == 2
        _one_error_line(err, f"{run} is being written by another run", f"process {proc.pid} on", "since ")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    found = re.fullmatch(rf"minivln: interrupted after step (\d+); the last checkpoint is "
                         rf"{re.escape(str(run / 'latest'))} \(step (\d+)\); continue it with --resume", lines[0])
    assert found, lines[0]
    reached, saved = int(found[1]), int(found[2])
    assert 1 <= saved <= reached and read_meta(run / "latest")["step"] == saved
    assert not (run / LOCK_FILE).exists() and not (run / ".latest.tmp").exists()
    # --resume continues from that checkpoint: every step logged once
    with pytest.warns(UserWarning, match="max_steps differ"):
        code, _, err = _run(["finetune", "--out", str(run), "--resume", f"train.max_steps={saved + 1}"], capsys)
    assert code == 0, err
    steps = [r["step"] for r in read_jsonl(run / "log.jsonl") if r.get("kind") == "train"]
    assert steps == list(range(1, saved + 2))
    assert read_meta(run / "latest")["step"] == saved + 1 and (run / "metrics.json").is_file()
