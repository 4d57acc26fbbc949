"""Two drivers on one experiment directory (``minivln experiment`` started once per free core, with
overlapping ``--only``): every job runs once, a job another driver or process holds is waited for,
and a claim left by a dead driver is taken over."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time

import pytest

from minivln.experiment import Job, Recipe, claim_job, execute, job_status

# each job appends its name to a shared file, slowly enough that the drivers overlap
APPEND = "import sys, time; time.sleep(float(sys.argv[3])); open(sys.argv[1], 'a').write(sys.argv[2] + '\\n')"


def _jobs(tmp_path, spec, seconds=0.3):
    ran = tmp_path / "ran.txt"
    return [Job(name, deps, [sys.executable, "-c", APPEND, str(ran), name, str(seconds)], spec=name)
            for name, deps in spec], ran


def test_two_drivers_with_the_same_jobs_run_each_job_once(tmp_path, capsys):
    jobs, ran = _jobs(tmp_path, [("train:a", []), ("train:b", ["train:a"]), ("train:c", []),
                                 ("score:b", ["train:b"]), ("score:c", ["train:c"])])
    out = tmp_path / "exp"
    results = []

    def driver():
        results.append(execute(list(jobs), out, tmp_path, "abc", max_jobs=1, threads=1, poll_s=0.05))
    threads = [threading.Thread(target=driver) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.02)
    for t in threads:
        t.join(60)
    assert results == [True, True]
    names = ran.read_text().split()
    assert sorted(names) == sorted(j.name for j in jobs)  # each once, none twice
    assert names.index("train:a") < names.index("train:b") < names.index("score:b")
    printed = capsys.readouterr().out
    assert "(by another driver)" in printed and "running elsewhere (claimed by process" in printed
    assert not any((out / "claims").glob("*/.lock"))  # every claim released


def test_a_claim_left_by_a_dead_driver_is_taken_over(tmp_path):
    jobs, ran = _jobs(tmp_path, [("train:a", [])], seconds=0)
    out = tmp_path / "exp"
    (out / "claims" / "train-a").mkdir(parents=True)
    dead = {"pid": 2**22 + 17, "host": socket.gethostname(), "since": "earlier", "process_start": None}
    (out / "claims" / "train-a" / ".lock").write_text(json.dumps(dead))
    with pytest.warns(UserWarning, match="taking over the lock"):
        assert execute(jobs, out, tmp_path, "abc", max_jobs=1, threads=1, poll_s=0.05)
    assert ran.read_text().split() == ["train:a"]


def test_a_run_another_process_writes_is_waited_for_not_started(tmp_path, capsys):
    """A training run started by hand (or by a driver from before claims) holds its run's lock: the
    driver waits for it, and starts it only once the lock is gone (here: its writer stopped early)."""
    jobs, ran = _jobs(tmp_path, [("train:a", [])], seconds=0)
    run_dir = tmp_path / "exp" / "runs" / "a"
    run_dir.mkdir(parents=True)
    live = {"pid": os.getpid(), "host": socket.gethostname(), "since": "now", "process_start": None}
    (run_dir / ".lock").write_text(json.dumps(live))
    job = Job("train:a", [], jobs[0].argv, run_dir=run_dir, spec="a")
    claim, who = claim_job(tmp_path / "exp", job)
    assert claim is None and who.startswith(f"its run is written by process {os.getpid()}")
    threading.Timer(0.5, (run_dir / ".lock").unlink).start()
    t0 = time.time()
    assert execute([job], tmp_path / "exp", tmp_path, "abc", max_jobs=1, threads=1, poll_s=0.05)
    assert time.time() - t0 >= 0.5 and ran.read_text().split() == ["train:a"]
    assert "waiting  train:a: running elsewhere (its run is written by process" in capsys.readouterr().out


def test_status_shows_a_job_another_driver_has_claimed_as_running(tmp_path):
    jobs, _ = _jobs(tmp_path, [("score:a", [])])
    out = tmp_path / "exp"
    claim, _ = claim_job(out, jobs[0])
    try:
        state, detail = job_status(Recipe(name="r"), out, jobs)[0][1:]
        assert state == "running" and detail.startswith(f"claimed by process {os.getpid()}")
        assert claim_job(out, jobs[0])[0] is None  # held: no second claim
    finally:
        claim.release()
    assert job_status(Recipe(name="r"), out, jobs)[0][1] == "pending"
