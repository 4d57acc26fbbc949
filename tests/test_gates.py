"""A recipe's gates: runs held until a pre-registered check passes (issue 20: the REVERIE stage-2 runs
wait until the teacher is ahead of the student trained alone)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from conftest import SMALL_DUET  # tests/ is on sys.path

from minivln.config import ConfigError
from minivln.data.datasets import load_episodes
from minivln.experiment import (Job, execute, format_table, gate_check, gate_keeper, gates_of, job_status,
                                load_recipe, not_run_reason, plan, preflight, retire_run, select_jobs, write_table)


def _recipe(tmp_path, data, feats, gate):
    ft = {"model": "duet-cpu", "train": {"max_steps": 2}}
    recipe = {
        "name": "gated", "data_dir": str(data), "features": str(feats), "results": str(tmp_path / "t.json"),
        "submissions": str(tmp_path / "subs"),
        "runs": {"t": {"command": "finetune", "overrides": ft}, "n": {"command": "finetune", "overrides": ft},
                 "kd": {"command": "finetune", "teacher_run": "t", "overrides": ft}},
        "rows": [{"name": "teacher", "run": "t"}, {"name": "none, seed 0", "run": "n"},
                 {"name": "stage 2, seed 0", "run": "kd"}],
        "comparisons": [{"name": "teacher ahead", "over": "episodes", "pairs": [["teacher", "none"]],
                         "metrics": ["sr"]}],
        "gates": [gate],
    }
    path = tmp_path / "gated.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


GATE = {"name": "teacher ahead", "runs": ["kd*"], "rows": ["teacher", "none, seed 0"],
        "comparison": "teacher ahead", "min_se": 3.0}


def _write_scores(out, key, episodes, succeed):
    """A submission that walks the annotated path of the episodes in ``succeed`` and stays put elsewhere."""
    entries = [{"instr_id": e.instr_id,
                "trajectory": [[vp, 0.0, 0.0] for vp in (e.path if e.instr_id in succeed else e.path[:1])]}
               for e in episodes]
    d = out / "scores" / key
    d.mkdir(parents=True)
    (d / "submission_val_unseen.json").write_text(json.dumps(entries))


def test_gated_runs_wait_for_the_scorings_the_gate_reads(small_toy, tmp_path):
    recipe = load_recipe(_recipe(tmp_path, *small_toy, GATE))
    jobs = {j.name: j for j in plan(recipe, tmp_path / "exp", tmp_path)}
    assert jobs["train:kd"].deps == ["train:t", "score:t", "score:n"]
    assert jobs["train:n"].deps == [] and [g.name for g in gates_of(recipe, "kd")] == ["teacher ahead"]
    assert gates_of(recipe, "t") == []


@pytest.mark.parametrize("bad, match", [
    ({"comparison": "nope"}, "comparison must name"),
    ({"rows": ["teacher", "none, seed 9"]}, "rows must list"),
    ({"runs": ["zz*"]}, "every pattern of runs"),
    ({"min_se": 0}, "min_se must be positive"),
])
def test_a_gate_that_cannot_be_read_is_refused(small_toy, tmp_path, bad, match):
    with pytest.raises(ConfigError, match=match):
        load_recipe(_recipe(tmp_path, *small_toy, {**GATE, **bad}))


def test_the_gate_reads_the_paired_gap_in_standard_errors(small_toy, tmp_path):
    data, feats = small_toy
    episodes = list(load_episodes("r2r", "val_unseen", data))
    assert len(episodes) == 9
    out = tmp_path / "exp"
    _write_scores(out, "t", episodes, {e.instr_id for e in episodes})  # the teacher succeeds everywhere
    _write_scores(out, "n", episodes, {e.instr_id for e in episodes[:3]})  # the student on 3 of 9
    # gap 6/9 = 0.667, paired sd 0.5, se 0.5 / 3: 4.0 standard errors
    passed, why = gate_check(load_recipe(_recipe(tmp_path, data, feats, GATE)), out,
                             load_recipe(_recipe(tmp_path, data, feats, GATE)).gates[0])
    assert passed and "teacher - none, seed 0 sr +0.6667 (4.0 se)" in why
    recipe = load_recipe(_recipe(tmp_path, data, feats, {**GATE, "min_se": 5.0}))
    passed, why = gate_check(recipe, out, recipe.gates[0])
    assert not passed and "NOT passed" in why
    # the driver's hook: the held run gets the reason, the others go; the verdict is kept in OUT/gates
    hold = gate_keeper(recipe, out)
    assert hold(Job("train:kd", [], [])) == why and hold(Job("train:n", [], [])) is None
    assert hold(Job("score:kd", [], [])) is None
    verdict = json.loads((out / "gates" / "teacher-ahead.json").read_text())
    assert verdict["passed"] is False and verdict["why"] == why and verdict["min_se"] == 5.0
    assert verdict["runs"] == {"teacher": "t", "none, seed 0": "n"}
    # a second reading (another driver call) is appended to the history, the first kept
    gate_keeper(recipe, out)(Job("train:kd", [], []))
    history = (out / "gates" / "teacher-ahead.history.jsonl").read_text().splitlines()
    assert len(history) == 2 and all(json.loads(line)["why"] == why for line in history)


def test_a_submission_missing_instructions_does_not_pass_the_gate(small_toy, tmp_path):
    """The gate reads whole splits: a teacher scored on part of it fails, whatever its numbers."""
    data, feats = small_toy
    episodes = list(load_episodes("r2r", "val_unseen", data))
    out = tmp_path / "exp"
    _write_scores(out, "t", episodes[:8], {e.instr_id for e in episodes})  # 8 of 9, all reached
    _write_scores(out, "n", episodes, {e.instr_id for e in episodes[:3]})
    recipe = load_recipe(_recipe(tmp_path, data, feats, {**GATE, "min_se": 1.0}))
    passed, why = gate_check(recipe, out, recipe.gates[0])
    assert not passed and "row 'teacher' is not a whole val_unseen submission" in why
    _write_scores(tmp_path / "exp2", "t", episodes, {e.instr_id for e in episodes})
    _write_scores(tmp_path / "exp2", "n", episodes, {e.instr_id for e in episodes[:3]})
    assert gate_check(recipe, tmp_path / "exp2", recipe.gates[0])[0]  # the same, whole: passes


def test_a_held_job_and_what_needs_it_do_not_start_and_are_no_failure(tmp_path, capsys):
    mark = tmp_path / "ran"
    mark.mkdir()
    script = "import pathlib, sys; pathlib.Path(sys.argv[1]).touch()"
    jobs = [Job(f"train:{n}", deps, [sys.executable, "-c", script, str(mark / n)], spec=n)
            for n, deps in (("a", []), ("b", ["train:a"]), ("c", ["train:b"]))]
    asked = []

    def hold(job):
        asked.append(job.name)
        return "gate 'g' NOT passed" if job.name == "train:b" else None
    assert execute(jobs, tmp_path / "exp", tmp_path, "abc", max_jobs=2, threads=1, hold=hold)
    assert sorted(p.name for p in mark.iterdir()) == ["a"]
    printed = capsys.readouterr().out
    assert "held     train:b: gate 'g' NOT passed" in printed and "held     train:c: a run it needs is held" in printed
    assert asked == ["train:a", "train:b"]  # a job behind a held one is not asked about
    assert not (tmp_path / "exp" / "done" / "train-b.json").exists()


def test_only_runs_the_selected_jobs_behind_their_finished_needs(tmp_path, capsys):
    """``minivln experiment --only``: a second driver on a free core runs the jobs it names, counts
    the finished ones they need as done, refuses those it could never start, and still asks the gates."""
    mark = tmp_path / "ran"
    mark.mkdir()
    script = "import pathlib, sys; pathlib.Path(sys.argv[1]).touch()"
    jobs = [Job(f"{kind}:{n}", deps, [sys.executable, "-c", script, str(mark / f"{kind}-{n}")], spec=f"{kind}{n}")
            for kind, n, deps in (("train", "pre-s1", []), ("train", "ft-s1", ["train:pre-s1"]),
                                  ("score", "ft-s1", ["train:ft-s1"]), ("train", "pre-s2", []),
                                  ("train", "ft-s2", ["train:pre-s2"]))]
    out = tmp_path / "exp"
    with pytest.raises(ConfigError, match="neither done nor selected: train:ft-s1 needs train:pre-s1$"):
        select_jobs(jobs, ["*:ft-s1"], out)
    with pytest.raises(ConfigError, match="nope names no job"):
        select_jobs(jobs, ["train:pre-s1", "nope"], out)
    assert execute(select_jobs(jobs, ["train:pre-s1"], out), out, tmp_path, "abc", max_jobs=1, threads=1)
    chosen = select_jobs(jobs, ["*:ft-s1"], out)  # pre-s1 is done now: it comes along, counted done
    assert [j.name for j in chosen] == ["train:pre-s1", "train:ft-s1", "score:ft-s1"]
    asked = []

    def hold(job):
        asked.append(job.name)
        return None
    assert execute(chosen, out, tmp_path, "abc", max_jobs=1, threads=1, hold=hold)
    assert sorted(p.name for p in mark.iterdir()) == ["score-ft-s1", "train-ft-s1", "train-pre-s1"]
    assert asked == ["train:ft-s1", "score:ft-s1"]  # the gate keeper is asked for each job it starts
    assert "done     train:pre-s1" in capsys.readouterr().out


def test_status_says_where_each_job_stands_without_starting_anything(tmp_path):
    """``minivln experiment --status``: done (when), running (a live lock: its step), stopped (a
    checkpoint to resume), held (a gate read and failed), waiting (for its needs), pending."""
    import os
    import socket

    from minivln.experiment import GateSpec, Recipe, RunSpec, format_status, job_status
    from minivln.training.checkpoint import lock_holder

    out = tmp_path / "exp"
    runs = out / "runs"
    script = "pass"
    jobs = [Job(f"train:{n}", deps, [sys.executable, "-c", script], run_dir=runs / n, spec=n)
            for n, deps in (("a", []), ("b", []), ("c", []), ("d", ["train:b"]), ("e", []), ("f", []))]
    assert execute(jobs[:1], out, tmp_path, "abc", max_jobs=1, threads=1)  # a: done
    (runs / "b" / "latest").mkdir(parents=True)  # b: stopped at a checkpoint
    (runs / "b" / "latest" / "meta.json").write_text(json.dumps({"step": 25}))
    (runs / "b" / "config.yaml").write_text(yaml.safe_dump({"train": {"max_steps": 100}}))
    (runs / "c").mkdir(parents=True)  # c: this process holds its lock, and it has logged step 40
    (runs / "c" / "log.jsonl").write_text(json.dumps({"kind": "train", "step": 40}) + "\n")
    lock = {"pid": os.getpid(), "host": socket.gethostname(), "since": "now", "process_start": None}
    (runs / "c" / ".lock").write_text(json.dumps(lock))
    (runs / "f").mkdir(parents=True)  # f: a lock left by a process that is gone: not running
    (runs / "f" / ".lock").write_text(json.dumps({**lock, "pid": 2**22 + 17}))
    assert lock_holder(runs / "c").startswith(f"process {os.getpid()} on") and lock_holder(runs / "f") is None
    (out / "gates").mkdir()
    (out / "gates" / "g.json").write_text(json.dumps({"gate": "g", "passed": False, "runs": {}}))
    recipe = Recipe(name="r", runs={"e": RunSpec(command="finetune")},
                    gates=[GateSpec(name="g", runs=["e"], rows=["x"], comparison="y")])
    status = {name: (state, detail) for name, state, detail in job_status(recipe, out, jobs)}
    assert status["train:a"][0] == "done"
    assert status["train:b"] == ("stopped", "resumes from step 25/100")
    assert status["train:c"][0] == "running" and status["train:c"][1].startswith("step 40, process")
    assert status["train:d"] == ("waiting", "for train:b")
    assert status["train:e"][0] == "held" and "gate 'g' not passed" in status["train:e"][1]
    assert status["train:f"] == ("pending", "")
    assert format_status(job_status(recipe, out, jobs)).splitlines()[-1] == \
        "1 done, 1 stopped, 1 running, 1 waiting, 1 held, 1 pending"


def test_status_times_a_resumed_run_over_all_its_processes(tmp_path):
    """A done mark times the process that finished the run; ``--status`` sums the training time that
    every process logged when the log shows the run was resumed (each process restarts ``time``)."""
    from minivln.experiment import Recipe, _logged_starts, job_status

    out = tmp_path / "exp"
    job = Job("train:a", [], [sys.executable, "-c", "pass"], run_dir=out / "runs" / "a", spec="a")
    assert execute([job], out, tmp_path, "abc", max_jobs=1, threads=1)
    # as the trainer writes it: each process logs its own elapsed time and its rate since its previous log;
    # a resumed process's log keeps the steps up to the checkpoint it resumes from
    log = [{"kind": "train", "step": 20, "time": 60.0, "it_s": 20 / 60},  # process 1 (checkpoint at 25)
           {"kind": "train", "step": 40, "time": 70.0, "it_s": 15 / 70},  # process 2, from 25: slow to start,
           {"kind": "train", "step": 60, "time": 600.0, "it_s": 20 / 530},  # its clock already past the first's
           {"kind": "val", "step": 60},
           {"kind": "train", "step": 80, "time": 20.0, "it_s": 5 / 20}]  # process 3, from 75
    (out / "runs" / "a").mkdir(parents=True)
    (out / "runs" / "a" / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    assert _logged_starts(out / "runs" / "a") == pytest.approx((680.0, 3))
    detail = job_status(Recipe(name="r"), out, [job])[0][2]
    assert detail.endswith(", 11 min of training logged by 3 processes (resumed)")
    one = [{"kind": "train", "step": 20, "time": 60.0, "it_s": 20 / 60},
           {"kind": "train", "step": 40, "time": 600.0, "it_s": 20 / 540}]
    (out / "runs" / "a" / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in one))
    assert _logged_starts(out / "runs" / "a") == pytest.approx((600.0, 1))
    assert "logged" not in job_status(Recipe(name="r"), out, [job])[0][2]  # one process: the mark's own time


def test_status_gives_a_running_run_the_minutes_left_at_its_current_process_rate(tmp_path):
    """``running  step 180/1000, ~41 min left, process ...``: the steps left at the rate of the process
    now training (its first to last record, validations included), not the earlier processes'."""
    import os
    import socket

    from minivln.experiment import Recipe, _minutes_left, job_status

    run = tmp_path / "exp" / "runs" / "a"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"train": {"max_steps": 1000}}))
    log = [{"kind": "train", "step": 20, "time": 10.0, "it_s": 2.0},  # process 1: fast (a quiet machine)
           {"kind": "train", "step": 40, "time": 20.0, "it_s": 2.0},
           {"kind": "train", "step": 80, "time": 20.0, "it_s": 0.25},  # process 2, resumed from 75
           {"kind": "val", "step": 100},
           {"kind": "train", "step": 180, "time": 320.0, "it_s": 100 / 300}]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    assert _minutes_left(run, 1000) == ", ~41 min left"  # 820 steps at 100 per 300 s
    lock = {"pid": os.getpid(), "host": socket.gethostname(), "since": "now", "process_start": None}
    (run / ".lock").write_text(json.dumps(lock))
    job = Job("train:a", [], [sys.executable, "-c", "pass"], run_dir=run, spec="a")
    assert job_status(Recipe(name="r"), tmp_path / "exp", [job])[0][1:] == \
        ("running", f"step 180/1000, ~41 min left, process {os.getpid()} on {socket.gethostname()}, since now")
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log[:3]))  # one record of process 2
    assert _minutes_left(run, 1000) == "" and _minutes_left(run, None) == ""


def test_the_preflight_line_says_what_only_selects(small_toy, tmp_path):
    """Under ``--only`` the pre-flight still checks the whole recipe, and its line says so with the
    number of jobs left that the patterns select."""
    path = Path(_recipe(tmp_path, *small_toy, GATE))
    spec = yaml.safe_load(path.read_text())
    for run in spec["runs"].values():  # a network the toy's 16-d features fit
        run["overrides"]["model_overrides"] = SMALL_DUET
    path.write_text(yaml.safe_dump(spec))
    recipe = load_recipe(str(path))
    out = tmp_path / "exp"
    whole = preflight(recipe, out, code=tmp_path)
    assert whole.startswith("pre-flight: 3 runs, 3 rows checked") and "--only" not in whole
    line = preflight(recipe, out, code=tmp_path, only=["*:n"])
    assert line.startswith(whole.rstrip(")").split(" (")[0])
    assert "the whole recipe checked; --only selects 2 of its 6 jobs left" in line


def _two_arm_recipe(tmp_path, data, feats, name="gated", teacher="t"):
    """The gated recipe with two seeds per arm, an over-seeds group and a summary (Table II)."""
    ft = {"model": "duet-cpu", "train": {"max_steps": 2}}
    runs = {teacher: {"command": "finetune", "overrides": ft}}
    rows = [{"name": "teacher", "run": teacher}]
    for s in (0, 1):
        runs[f"n{s}"] = {"command": "finetune", "overrides": ft}
        runs[f"kd{s}"] = {"command": "finetune", "teacher_run": teacher, "overrides": ft}
        rows += [{"name": f"none, seed {s}", "run": f"n{s}"}, {"name": f"stage 2, seed {s}", "run": f"kd{s}"}]
    spec = {"name": name, "data_dir": str(data), "features": str(feats), "results": str(tmp_path / f"{name}.json"),
            "submissions": str(tmp_path / f"subs-{name}"), "runs": runs, "rows": rows,
            "comparisons": [{"name": "teacher ahead", "over": "episodes", "pairs": [["teacher", "none"]],
                             "metrics": ["sr"]},
                            {"name": "secondary", "pairs": [["stage 2", "none"], ["none", "stage 2"]],
                             "metrics": ["sr"], "alpha": 0.05}],
            "gates": [{**GATE, "runs": ["kd*"]}],
            "summary": {"results": str(tmp_path / f"{name}-t2.json"), "entries": ["teacher", "stage 2", "none"],
                        "reference": "teacher", "metrics": ["sr"]}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return load_recipe(str(path))


def test_rows_a_gate_stopped_are_reported_not_run_and_the_table_is_complete_without_them(small_toy, tmp_path):
    """A gate read and not passed stops its runs for good in that recipe: their rows are "not run" with
    the reading (not "pending"), their tests "not run", Table II says so, and the table is complete once
    every other row is scored."""
    data, feats = small_toy
    episodes = list(load_episodes("r2r", "val_unseen", data))
    out = tmp_path / "exp"
    _write_scores(out, "t", episodes, {e.instr_id for e in episodes[:1]})  # the teacher behind the student
    for s in (0, 1):
        _write_scores(out, f"n{s}", episodes, {e.instr_id for e in episodes[:3 + s]})
    recipe = _two_arm_recipe(tmp_path, data, feats)
    before = write_table(recipe, out, "abc")  # the gate not read yet: the gated rows are pending
    assert before["pending"] == ["stage 2, seed 0", "stage 2, seed 1"] and before["not_run"] == {}
    assert not before["complete"]
    assert "NOT passed" in gate_keeper(recipe, out)(Job("train:kd0", [], []))
    assert "-0.2222 (-1.5 se)" in json.loads((out / "gates" / "teacher-ahead.json").read_text())["why"]
    table = write_table(recipe, out, "abc")
    assert table["pending"] == [] and table["complete"] and set(table["not_run"]) == {"stage 2, seed 0",
                                                                                      "stage 2, seed 1"}
    why = table["not_run"]["stage 2, seed 0"]
    assert why.startswith("gate 'teacher ahead' not passed (read 20") and why == not_run_reason(recipe, out, "kd1")
    assert not_run_reason(recipe, out, "n0") is None
    assert f"not run: stage 2, seed 0: {why}" in format_table(table)
    ahead, secondary = table["comparisons"]
    assert [g["b"] for g in ahead["gaps"]] == ["none, seed 0", "none, seed 1"] and "pending" not in ahead
    assert "pending" not in secondary and [t["verdict"] for t in secondary["tests"]] == ["not run", "not run"]
    entries = {e["name"]: e for e in json.loads((tmp_path / "gated-t2.json").read_text())["entries"]}
    assert entries["stage 2"] == {"name": "stage 2", "not_run": why} and entries["none"]["sr"] == pytest.approx(3.5 / 9)


def test_a_recipe_reads_only_its_own_gate_verdict(small_toy, tmp_path):
    """Two recipes in one directory with gates of the same name reading other runs (a continued
    teacher): each table follows its own reading, kept in the history, whatever was read last; a run
    that has finished is never "not run"."""
    data, feats = small_toy
    episodes = list(load_episodes("r2r", "val_unseen", data))
    out = tmp_path / "exp"
    _write_scores(out, "t", episodes, {e.instr_id for e in episodes[:1]})  # first teacher: behind
    _write_scores(out, "tc", episodes, {e.instr_id for e in episodes})  # continued teacher: far ahead
    for s in (0, 1):
        _write_scores(out, f"n{s}", episodes, {e.instr_id for e in episodes[:3 + s]})
    first = _two_arm_recipe(tmp_path, data, feats)
    cont = _two_arm_recipe(tmp_path, data, feats, name="cont", teacher="tc")
    assert gate_keeper(first, out)(Job("train:kd0", [], [])) is not None
    assert set(write_table(cont, out, "abc")["pending"]) == {"stage 2, seed 0", "stage 2, seed 1"}  # not read
    assert gate_keeper(cont, out)(Job("train:kd0", [], [])) is None  # passed, read last
    assert write_table(first, out, "abc")["not_run"].keys() == {"stage 2, seed 0", "stage 2, seed 1"}
    assert write_table(cont, out, "abc")["not_run"] == {}
    jobs = [j for j in plan(first, out, tmp_path) if j.name in ("train:kd0", "score:kd0")]
    assert [state for _, state, _ in job_status(first, out, jobs)] == ["held", "held"]
    (out / "done").mkdir()
    (out / "done" / "train-kd0.json").write_text(json.dumps({"spec": jobs[0].spec}))
    assert not_run_reason(first, out, "kd0") is None and not_run_reason(first, out, "kd1") is not None


def test_a_retired_run_is_never_resumed_and_what_needs_it_is_not_run(small_toy, tmp_path):
    """``minivln experiment --retire RUN --why ...``: a pre-registered stop (e.g. futility) marks the run;
    the driver holds it and what needs it, --status says so, its rows are not run."""
    data, feats = small_toy
    episodes = list(load_episodes("r2r", "val_unseen", data))
    recipe = _two_arm_recipe(tmp_path, data, feats)
    out = tmp_path / "exp"
    why = "futility stop: SR below 0.153 at 1,250 and 1,500"
    with pytest.raises(ConfigError, match="no pin.json"):
        retire_run(recipe, out, "t", why)
    out.mkdir()
    (out / "pin.json").write_text("{}")
    with pytest.raises(ConfigError, match="needs --why"):
        retire_run(recipe, out, "t", " ")
    with pytest.raises(ConfigError, match="no run 'zz' to retire"):
        retire_run(recipe, out, "zz", why)
    jobs = {j.name: j for j in plan(recipe, out, tmp_path)}
    (out / "done").mkdir()
    (out / "done" / "train-n0.json").write_text(json.dumps({"spec": jobs["train:n0"].spec}))
    with pytest.raises(ConfigError, match="'n0' has finished"):
        retire_run(recipe, out, "n0", why)
    assert retire_run(recipe, out, "t", why)["checkpoint_step"] is None
    with pytest.raises(ConfigError, match="retired already"):
        retire_run(recipe, out, "t", "another reason")
    assert gate_keeper(recipe, out)(Job("train:t", [], [])) == f"retired: {why}"
    assert not (out / "gates").exists()  # a retired run is held before any gate is read
    assert not_run_reason(recipe, out, "kd0") == f"run 't' retired: {why}"  # kd0 distils from t
    picked = [jobs[n] for n in ("train:t", "train:kd0", "score:kd0", "train:n0", "train:n1")]
    states = {n: (state, detail) for n, state, detail in job_status(recipe, out, picked)}
    assert states["train:t"][0] == "retired" and states["train:t"][1].startswith("futility stop")
    assert states["train:kd0"] == ("held", f"run 't' retired: {why}") and states["score:kd0"][0] == "held"
    assert states["train:n0"][0] == "done" and states["train:n1"][0] == "pending"
    for s in (0, 1):
        _write_scores(out, f"n{s}", episodes, {e.instr_id for e in episodes[:3 + s]})
    table = write_table(recipe, out, "abc")  # the teacher and both stage-2 rows stopped, the rest scored
    assert set(table["not_run"]) == {"teacher", "stage 2, seed 0", "stage 2, seed 1"} and table["complete"]
    assert table["comparisons"][0]["not_run"] == ["teacher - none, seed 0", "teacher - none, seed 1"]


def test_a_row_stopped_beside_scored_seeds_of_its_arm_withholds_the_verdict(small_toy, tmp_path):
    """One seed of an arm stopped, the other scored: no verdict on fewer seeds than planned."""
    data, feats = small_toy
    episodes = list(load_episodes("r2r", "val_unseen", data))
    recipe = _two_arm_recipe(tmp_path, data, feats)
    out = tmp_path / "exp"
    out.mkdir()
    (out / "pin.json").write_text("{}")
    for key in ("t", "n0", "n1", "kd0"):
        _write_scores(out, key, episodes, {e.instr_id for e in episodes[:3]})
    retire_run(recipe, out, "kd1", "crashed past repair")
    secondary = write_table(recipe, out, "abc")["comparisons"][1]
    assert secondary["pending"] == "no verdict: 1 pre-registered row of arms that ran were not run (stage 2, seed 1)"
    assert all("verdict" not in t for t in secondary["tests"])


def test_the_retire_command_line(small_toy, tmp_path, capsys):
    """--retire needs no features (marks only), --why goes with it, and it is one mode at a time."""
    from minivln.cli import main

    recipe = _recipe(tmp_path, *small_toy, GATE)
    spec = yaml.safe_load(Path(recipe).read_text())
    del spec["features"]
    Path(recipe).write_text(yaml.safe_dump(spec))
    out = tmp_path / "exp"
    out.mkdir()
    (out / "pin.json").write_text("{}")
    assert main(["experiment", recipe, "--out", str(out), "--retire", "t", "--why", "futility"]) == 0
    assert "retired t in" in capsys.readouterr().out and (out / "retired" / "t.json").exists()
    for argv, msg in ((["--why", "x"], "--why goes with --retire"),
                      (["--retire", "n", "--status"], "--retire and --status do different things"),
                      (["--retire", "", "--why", "x"], "no run '' to retire")):
        assert main(["experiment", recipe, "--out", str(out), *argv]) != 0
        assert msg in capsys.readouterr().err
    # --status reads marks and logs only: no features needed either; a real run still needs them
    assert main(["experiment", recipe, "--out", str(out), "--status"]) == 0
    assert "train:t" in capsys.readouterr().out
    assert main(["experiment", recipe, "--out", str(out), "--dry-run"]) != 0
    assert "needs features=FILE" in capsys.readouterr().err


def test_a_reverie_table_prints_each_rows_grounded_share():
    """REVERIE tables print RGS|SR beside the rates (a row without a success: '-'); R2R tables do not."""
    row = {"episodes": 10, **{k: 0.5 for k in ("sr", "spl", "rgs", "rgspl")},
           **{f"{k}_se": 0.1 for k in ("sr", "spl", "rgs", "rgspl")}}
    table = {"table": "T", "features": "stand-in", "split": "val_unseen", "pending": [], "not_run": {},
             "rows": [{**row, "name": "a", "grounded_share": 0.6176}, {**row, "name": "b", "grounded_share": None}]}
    lines = format_table(table).splitlines()
    assert lines[1].endswith("RGS|SR") and lines[2].endswith(" 61.8%") and lines[3].endswith(" -")
    r2r = {**table, "rows": [{k: v for k, v in r.items() if not k.startswith(("rgs", "grounded"))}
                             for r in table["rows"]]}
    assert "RGS" not in format_table(r2r)
