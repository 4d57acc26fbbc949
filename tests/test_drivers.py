"""Several drivers on one experiment directory (``minivln experiment`` started once per free core or
machine, with overlapping ``--only``): every job runs once, a job another driver or process holds is
waited for, a failure is not retried by the other driver, GPU slots are shared, a dead driver's claim
is taken over only once its job's process has ended, and stopping a driver stops its jobs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from minivln.experiment import Job, Recipe, claim_job, execute, failed_since, job_status
from minivln.training.checkpoint import RunLock, RunLockedError

# a job: sleep, append "NAME START END GPUS" to a shared file, exit with the given code
JOB = ("import os, sys, time; t = time.time(); time.sleep(float(sys.argv[3])); "
       "open(sys.argv[1], 'a').write(f\"{sys.argv[2]} {t:.3f} {time.time():.3f} "
       "{os.environ.get('CUDA_VISIBLE_DEVICES', '-')}\\n\"); sys.exit(int(sys.argv[4]))")

DRIVER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from minivln.experiment import Job, execute
    spec = json.loads(Path(sys.argv[1]).read_text())
    jobs = [Job(n, d, a, spec=n) for n, d, a in spec["jobs"]]
    ok = execute(jobs, Path(spec["out"]), Path(spec["code"]), "abc", max_jobs=1, threads=1,
                 gpus=spec.get("gpus"), poll_s=0.05)
    sys.exit(0 if ok else 1)
""")


def _spec(tmp_path, jobs, seconds=0.3, fail=(), **extra):
    ran = tmp_path / "ran.txt"
    spec = {"out": str(tmp_path / "exp"), "code": str(tmp_path), **extra,
            "jobs": [[n, d, [sys.executable, "-c", JOB, str(ran), n, str(seconds), "1" if n in fail else "0"]]
                     for n, d in jobs]}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    (tmp_path / "driver.py").write_text(DRIVER)
    return path, ran


def _drivers(tmp_path, spec, n=2):
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(spec)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(n)]
    return [(p.wait(120), p.stdout.read()) for p in procs]


def _ran(ran):
    return [line.split() for line in ran.read_text().splitlines()]


def test_two_driver_processes_with_the_same_jobs_run_each_job_once(tmp_path):
    names = [("train:a", []), ("train:b", ["train:a"]), ("train:c", []), ("score:b", ["train:b"]),
             ("score:c", ["train:c"])]
    spec, ran = _spec(tmp_path, names)
    results = _drivers(tmp_path, spec)
    assert [rc for rc, _ in results] == [0, 0], results
    order = [r[0] for r in _ran(ran)]
    assert sorted(order) == sorted(n for n, _ in names)  # each once, none twice
    assert order.index("train:a") < order.index("train:b") < order.index("score:b")
    printed = "".join(text for _, text in results)
    assert "(by another driver)" in printed and "running elsewhere (claimed by process" in printed
    assert not list((tmp_path / "exp" / "claims").glob("*/.lock"))  # every claim released


def test_a_job_that_fails_in_one_driver_is_not_run_again_by_the_other(tmp_path):
    spec, ran = _spec(tmp_path, [("train:a", []), ("train:b", ["train:a"])], fail={"train:a"})
    results = _drivers(tmp_path, spec)
    assert [rc for rc, _ in results] == [1, 1]
    assert [r[0] for r in _ran(ran)] == ["train:a"]  # once; and b, which needs it, never
    printed = "".join(text for _, text in results)
    assert "FAILED   train:a (exit 1)" in printed and "FAILED   train:a in another driver at" in printed
    assert printed.count("skipped  train:b: a run it needs failed") == 2
    # a driver started after the failure tries again (as a resume does)
    job = Job("train:a", [], [], spec="train:a")
    assert failed_since(tmp_path / "exp", job, 0.0) is not None
    assert failed_since(tmp_path / "exp", job, time.time() + 1) is None


def test_drivers_sharing_one_gpu_slot_never_train_on_it_at_once(tmp_path):
    spec, ran = _spec(tmp_path, [("train:a", []), ("train:b", []), ("train:c", [])], seconds=0.4, gpus=["0"])
    assert [rc for rc, _ in _drivers(tmp_path, spec)] == [0, 0]
    spans = sorted((float(t0), float(t1), gpu) for _, t0, t1, gpu in _ran(ran))
    assert len(spans) == 3 and {gpu for *_, gpu in spans} == {"0"}
    assert all(b[0] >= a[1] for a, b in zip(spans, spans[1:]))  # one at a time on GPU 0


def test_a_dead_drivers_claim_waits_for_its_job_and_is_then_taken_over(tmp_path):
    out = tmp_path / "exp"
    job = Job("score:a", [], [], spec="a")
    d = out / "claims" / "score-a"
    d.mkdir(parents=True)
    dead = {"pid": 2**22 + 17, "host": socket.gethostname(), "since": "earlier", "process_start": None}
    (d / ".lock").write_text(json.dumps(dead))
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (d / "child.json").write_text(json.dumps({"pid": orphan.pid, "host": socket.gethostname()}))
        with pytest.warns(UserWarning, match="taking over the lock"):
            claim, who = claim_job(out, job)
        assert claim is None and who == f"its process {orphan.pid}, whose driver is gone, still runs"
        assert job_status(Recipe(name="r"), out, [job])[0][1:] == ("running", who)
    finally:
        orphan.kill()
        orphan.wait()
    claim, who = claim_job(out, job)
    assert claim is not None and who == "" and not (d / "child.json").exists()
    claim.release()


def test_a_run_another_process_writes_is_waited_for_not_started(tmp_path, capsys):
    """A training run started by hand (or by a driver from before claims) holds its run's lock: the
    driver waits for it, and starts it only once the lock is gone (here: its writer stopped early)."""
    spec, ran = _spec(tmp_path, [("train:a", [])], seconds=0)
    argv = json.loads(spec.read_text())["jobs"][0][2]
    run_dir = tmp_path / "exp" / "runs" / "a"
    run_dir.mkdir(parents=True)
    live = {"pid": os.getpid(), "host": socket.gethostname(), "since": "now", "process_start": None}
    (run_dir / ".lock").write_text(json.dumps(live))
    job = Job("train:a", [], argv, run_dir=run_dir, spec="a")
    claim, who = claim_job(tmp_path / "exp", job)
    assert claim is None and who.startswith(f"its run is written by process {os.getpid()}")
    threading.Timer(0.5, (run_dir / ".lock").unlink).start()
    t0 = time.time()
    assert execute([job], tmp_path / "exp", tmp_path, "abc", max_jobs=1, threads=1, poll_s=0.05)
    assert time.time() - t0 >= 0.5 and [r[0] for r in _ran(ran)] == ["train:a"]
    assert "waiting  train:a: running elsewhere (its run is written by process" in capsys.readouterr().out


def test_stopping_a_driver_stops_its_jobs_and_lets_go_of_their_claims(tmp_path):
    spec, ran = _spec(tmp_path, [("train:a", [])], seconds=60)
    driver = subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(spec)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    child = tmp_path / "exp" / "claims" / "train-a" / "child.json"
    deadline = time.time() + 30
    while not child.exists() and time.time() < deadline:
        time.sleep(0.05)
    pid = json.loads(child.read_text())["pid"]
    driver.send_signal(signal.SIGTERM)
    assert driver.wait(30) == 128 + signal.SIGTERM
    assert "stopped  train:a (resumes from its last checkpoint)" in driver.stdout.read()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the job's process is gone with its driver
    assert not child.exists() and not (child.parent / ".lock").exists()
    assert not (tmp_path / "exp" / "done" / "train-a.json").exists() and not ran.exists()


def test_threads_of_one_process_cannot_both_take_a_lock(tmp_path):
    """Two threads taking the same lock at once: exactly one gets it (each used to read the other's
    fresh lock as left by an earlier process of the same pid, and take it over)."""
    for i in range(30):
        d = tmp_path / str(i)
        d.mkdir()
        barrier, got = threading.Barrier(4), []

        def take():
            barrier.wait()
            try:
                got.append(RunLock(d))
            except RunLockedError:
                pass
        threads = [threading.Thread(target=take) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(got) == 1, f"try {i}: {len(got)} threads hold the lock"
        got[0].release()


def test_status_shows_a_job_another_driver_has_claimed_as_running(tmp_path):
    job = Job("score:a", [], [], spec="a")
    out = tmp_path / "exp"
    claim, _ = claim_job(out, job)
    try:
        state, detail = job_status(Recipe(name="r"), out, [job])[0][1:]
        assert state == "running" and detail.startswith(f"claimed by process {os.getpid()}")
        assert claim_job(out, job)[0] is None  # held: no second claim
    finally:
        claim.release()
    assert job_status(Recipe(name="r"), out, [job])[0][1] == "pending"


def test_a_job_whose_need_no_driver_runs_fails_instead_of_waiting_forever(tmp_path, capsys):
    """A job needing one that is neither done nor among the driver's jobs could never start: it fails
    with one line naming what it needs, and the driver returns (before, it waited forever)."""
    job = Job("score:b", ["train:a"], [sys.executable, "-c", "pass"], spec="b")
    (tmp_path / "exp").mkdir()
    assert not execute([job], tmp_path / "exp", tmp_path, "abc", max_jobs=1, threads=1, poll_s=0.05)
    assert "FAILED   score:b: needs train:a, which this driver neither runs nor finds done" in capsys.readouterr().out


def test_stopping_its_jobs_the_driver_ignores_further_sigterms(tmp_path, capsys):
    """A scheduler signals every process of the job: the driver, stopping its jobs after its own SIGTERM,
    must not be ended by the next one before they have saved (it waits up to 60 s for them)."""
    from minivln.experiment import _stop_jobs

    # the job: on SIGTERM it signals the driver (this process) again, takes a moment (its last step), exits
    script = ("import os, signal, sys, time\n"
              "def stop(*_):\n"
              "    os.kill(os.getppid(), signal.SIGTERM); time.sleep(0.5); sys.exit(143)\n"
              "signal.signal(signal.SIGTERM, stop)\n"
              "print('ready', flush=True)\n"
              "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    proc._minivln_log = open(os.devnull, "w")  # type: ignore[attr-defined]  (as execute() opens it)
    assert proc.stdout.readline().strip() == "ready"
    seen = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        _stop_jobs({"train:a": (Job("train:a", [], []), proc)}, wait_s=30)
        assert proc.returncode == 143 and seen == []  # the job's SIGTERM to the driver came and was ignored
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN  # the driver's own handler is back
    finally:
        signal.signal(signal.SIGTERM, before)
        if proc.poll() is None:
            proc.kill()
    assert "stopped  train:a (resumes from its last checkpoint)" in capsys.readouterr().out
