"""``minivln experiment``: recipes, the pinned checkout, a tiny grid end to end, resume, the table."""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
import yaml
from conftest import SMALL_DUET as SMALL

from minivln.cli import main as cli_main
from minivln.config import CONFIG_DIR, ConfigError, config_changes, load_config, to_dict
from minivln.data.datasets import load_episodes
from minivln.data.reverie import ReverieGoals
from minivln.evaluation.evaluator import Evaluator
from minivln.experiment import (
    PreflightError,
    Recipe,
    RowSpec,
    _abs,
    adopt_run,
    bar_metrics,
    checkpoint_bytes,
    find_recipe,
    job_status,
    load_recipe,
    load_record,
    pin_checkout,
    plan,
    preflight,
    random_submission,
    repo_root,
    run_experiment,
    save_record,
    score_key,
    slug,
    write_gz,
    weights_digest,
    write_table,
)
from minivln.features.hdf5 import FeatureWriter, ObjectFeatures, ObjectFeatureWriter
from minivln.model.checkpoint import save_pretrained
from minivln.model.config import DUETConfig
from minivln.model.registry import create_model, get_config

TEACHER = {**SMALL, "hidden_size": 32, "intermediate_size": 64, "num_l_layers": 3}


SHIPPED = sorted(p.stem for p in (CONFIG_DIR / "experiments").glob("*.yaml"))
#: the recipes that read a release folder (``inputs``): their pre-flight is checked with one laid out as the
#: release is, in tests/test_paper_recipes.py
WITH_INPUTS = {n for n in SHIPPED if yaml.safe_load((CONFIG_DIR / "experiments" / f"{n}.yaml").read_text()).get("inputs")}


def test_the_paper_tables_are_shipped():
    assert {"r2r-table3", "r2r-table4", "r2r-table5", "reverie-table3", "r2r-table3-gap",
            "reverie-table3-gap"} <= set(SHIPPED)


#: what every shipped recipe needs to load: the paper-scale ones' inputs (release folder, teachers) too
SHIPPED_OVERRIDES = ["features=x.hdf5", "inputs.datasets=/datasets", "inputs.teacher_pretrained=/teacher.pt"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipes_load_and_plan(name, tmp_path):
    recipe = load_recipe(name, SHIPPED_OVERRIDES)
    jobs = plan(recipe, tmp_path, tmp_path / "code")
    names = [j.name for j in jobs]
    assert len(names) == len(set(names))
    for j in jobs:  # dependencies come first
        assert all(names.index(d) < names.index(j.name) for d in j.deps), j
    assert {f"score:{score_key(r, recipe.split)}" for r in recipe.rows
            if not r.random and r.weights != "undecided"} <= set(names)


def test_no_shipped_config_or_recipe_selects_on_val_unseen_by_default(tmp_path):
    """The tables report val_unseen: a run that picked its checkpoint by val_unseen would be tuned on
    the split it is scored on.  Fine-tuning's default, every shipped config and every fine-tuning run
    of every shipped recipe keep the last checkpoint (or select on another split)."""
    from minivln.config import load_config
    from minivln.training.finetune import FinetuneConfig

    assert FinetuneConfig().train.best_metric == ""
    checked = 0
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        if "val_splits" in raw and "ml_weight" in raw:  # a fine-tuning config
            cfg = load_config(FinetuneConfig, path)
            assert not cfg.train.best_metric.startswith("val_unseen"), path.name
            checked += 1
    assert checked >= 5
    for name in SHIPPED:
        recipe = load_recipe(name, SHIPPED_OVERRIDES)
        teachers = {spec.teacher_run for spec in recipe.runs.values()} - {""}
        for job in plan(recipe, tmp_path, tmp_path / "code"):
            if job.name.startswith("train:") and job.argv[3] == "finetune":
                cfg = load_config(FinetuneConfig, repo_root() / job.config if job.config else None, job.overrides)
                assert not cfg.train.best_metric.startswith("val_unseen"), (name, job.name)
                # the pre-registered tables' students score their last weights: no selection at all (a
                # teacher, e.g. REVERIE's fourth, may choose its checkpoint on val_seen)
                if "prereg" in name and job.name.split(":", 1)[1] not in teachers:
                    assert cfg.train.best_metric == "", (name, job.name)
                checked += 1
    assert checked > 30


def test_a_teacher_run_is_trained_before_its_students(tmp_path):
    jobs = {j.name: j for j in plan(load_recipe("reverie-table3", ["features=x"]), tmp_path, tmp_path)}
    assert jobs["train:rev-s2"].deps == ["train:pre-plain", "train:rev-teacher"]
    assert f"teacher={tmp_path / 'runs' / 'rev-teacher' / 'model'}" in jobs["train:rev-s2"].argv
    assert "init_fresh=[\"og_head\"]" in jobs["train:rev-none"].argv


def test_the_gap_tables_reuse_table_3s_runs_and_continue_its_teachers(tmp_path):
    for base, gap, teacher, shared in (("r2r-table3", "r2r-table3-gap", None, ["ft-none", "pre-kd"]),
                                       ("reverie-table3", "reverie-table3-gap", "rev-teacher", ["rev-none"])):
        spec = {j.name: j.spec for j in plan(load_recipe(base, ["features=x"]), tmp_path, tmp_path)}
        jobs = {j.name: j for j in plan(load_recipe(gap, ["features=x"]), tmp_path, tmp_path)}
        for run in shared:  # the same run, so it is trained once for both tables
            assert jobs[f"train:{run}"].spec == spec[f"train:{run}"]
        if teacher:  # the continued teacher starts from the base table's teacher
            assert jobs["train:rev-teacher-cont"].deps == [f"train:{teacher}"]
            assert f"init_checkpoint={tmp_path / 'runs' / teacher / 'model'}" in jobs["train:rev-teacher-cont"].argv
            assert f"teacher={tmp_path / 'runs' / 'rev-teacher-cont' / 'model'}" in jobs["train:rev-s2-t2"].argv
        runs = [r.run for r in load_recipe(gap, ["features=x"]).rows if r.run]
        specs = [json.dumps(jobs[f"train:{r}"].spec, sort_keys=True) for r in runs]
        assert len(set(specs)) == len(runs)  # no two rows train the same thing (e.g. a seed left out)


def test_a_val_seen_table_scores_its_runs_again_on_val_seen(tmp_path):
    """A -seen table shares its runs with the val_unseen one but not its scorings: before, both made
    job score:RUN with one done mark, and the second split's table never got its scores."""
    unseen = {"name": "t", "runs": {"ft": {"command": "finetune"}}, "rows": [{"name": "a", "run": "ft"}]}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(unseen))
    seen = {"name": "t-seen", "split": "val_seen", "include": ["t.yaml"], "rows": [{"name": "a", "run": "ft"}]}
    (tmp_path / "t-seen.yaml").write_text(yaml.safe_dump(seen))
    a = {j.name: j for j in plan(load_recipe(str(tmp_path / "t.yaml")), tmp_path, tmp_path)}
    b = {j.name: j for j in plan(load_recipe(str(tmp_path / "t-seen.yaml")), tmp_path, tmp_path)}
    assert a["train:ft"].spec == b["train:ft"].spec  # the same run, trained once
    assert set(a) == {"train:ft", "score:ft"} and set(b) == {"train:ft", "score:ft@val_seen"}
    job = b["score:ft@val_seen"]
    assert job.argv[job.argv.index("--split") + 1] == "val_seen"
    assert job.argv[job.argv.index("--out") + 1] == str(tmp_path / "scores" / "ft@val_seen")


R2R_PREREG_TABLES = ("r2r-prereg-table3", "r2r-prereg-table4", "r2r-prereg-table4-seen", "r2r-prereg-table5",
                     "r2r-prereg-table5-seen")


def test_r2r_prereg_rows_score_one_kind_of_weights_and_nothing_before_the_pilot_decides(tmp_path):
    """docs/preregistration.md §3: every student row of Tables III-V scores the same weights (last or
    average), set in one commit once the pilot has decided; until then ('undecided') their runs train
    but no scoring is planned, so no table number can exist before the decision.  The teacher row keeps
    its last weights (its run keeps no average)."""
    kinds = set()
    for name in R2R_PREREG_TABLES:
        recipe = load_recipe(name, ["features=x"])
        students = [r for r in recipe.rows if r.run and r.run.startswith("ft-")]
        assert students and all(r.weights == students[0].weights for r in students), name
        kinds.add(students[0].weights)
        jobs = [j.name for j in plan(recipe, tmp_path, tmp_path)]
        assert {f"train:{r.run}" for r in students} <= set(jobs)
        if students[0].weights == "undecided":
            assert not [j for j in jobs if j.startswith("score:ft-")], name
        else:  # decided: every student row is scored, on the recipe's split
            assert {f"score:{score_key(r, recipe.split)}" for r in students} <= set(jobs), name
    assert len(kinds) == 1 and kinds <= {"undecided", "model", "model-ema"}
    # the pilot decided (docs/preregistration.md, note of 2026-12-07): the last weights
    assert kinds == {"model"}
    with pytest.raises(ConfigError, match="undecided, so there is nothing to score"):
        score_key(RowSpec(name="none, seed 0", run="ft-none-s0", weights="undecided"))


def test_r2r_prereg_stage_2_learns_from_one_teacher_that_survives_a_machine_change(tmp_path):
    """docs/preregistration.md, amendment of 2026-12-07: every stage-2 run of Tables III-V (and their
    val_seen twins) learns from the same teacher, the shared fine-tuned duet-cpu (a file under
    ../shared, not a run of the experiment directory, whose weights a new machine would lack), and the
    tables' teacher row scores that same file."""
    shared = str(repo_root().parent / "shared" / "teachers" / "duet-cpu-r2r-finetuned")
    stage2 = 0
    for name in R2R_PREREG_TABLES:
        recipe = load_recipe(name, ["features=x"])
        assert "teacher-cont" not in recipe.runs, name
        for job in plan(recipe, tmp_path, tmp_path):
            if job.name.startswith("train:ft-"):
                teachers = [a.split("=", 1)[1] for a in job.argv if a.startswith("teacher=")]
                assert teachers in ([], [shared]), (name, job.name, teachers)
                assert not job.deps or all(d.startswith("train:pre-") for d in job.deps), (name, job.name)
                stage2 += bool(teachers)
        teacher_rows = [r for r in recipe.rows if r.checkpoint]
        assert all(str(_abs(r.checkpoint, repo_root())) == shared for r in teacher_rows), name
    # the runs each recipe's rows need: Table III two-stage x 6 + stage 2 only x 4; Table IV (and its val_seen
    # twin) two-stage seeds 0-2 + 4 term sets x 3 seeds; Table V (and twin) two-stage 0-2 + 2 KD weights x 3
    assert stage2 == 10 + 2 * (3 + 12) + 2 * (3 + 6)


def test_tables_4_and_5_reuse_table_3s_two_stage_run(tmp_path):
    t3, t4, t5 = (load_recipe(n, ["features=x"]) for n in ("r2r-table3", "r2r-table4", "r2r-table5"))
    spec = {j.name: j.spec for j in plan(t3, tmp_path, tmp_path)}
    for other in (t4, t5):
        jobs = {j.name: j.spec for j in plan(other, tmp_path, tmp_path)}
        assert jobs["train:ft-both"] == spec["train:ft-both"] and jobs["train:pre-kd"] == spec["train:pre-kd"]


def test_bad_recipes_are_config_errors(tmp_path):
    def write(d):
        p = tmp_path / "r.yaml"
        p.write_text(yaml.safe_dump(d))
        return str(p)

    base = {"name": "x", "runs": {"a": {"command": "finetune"}}, "rows": [{"name": "a", "run": "a"}]}
    load_recipe(write(base))
    with pytest.raises(ConfigError, match="unknown config key"):
        load_recipe(write({**base, "rnus": {}}))
    with pytest.raises(ConfigError, match="runs.a"):
        load_recipe(write({**base, "runs": {"a": {"comand": "finetune"}}}))
    with pytest.raises(ConfigError, match="exactly one of"):
        load_recipe(write({**base, "rows": [{"name": "a", "run": "a", "random": True}]}))
    with pytest.raises(ConfigError, match="init names no run"):
        load_recipe(write({**base, "runs": {"a": {"command": "finetune", "init": "b"}}}))
    with pytest.raises(ConfigError, match="command must be"):
        load_recipe(write({**base, "runs": {"a": {"command": "train"}}}))
    with pytest.raises(ConfigError, match="weights must be"):
        load_recipe(write({**base, "rows": [{"name": "a", "run": "a", "weights": "best"}]}))
    with pytest.raises(ConfigError, match="weights must be"):
        load_recipe(write({**base, "rows": [{"name": "a", "random": True, "weights": "model-ema"}]}))
    # a row of a run's weight average scores RUN/model-ema, apart from the run's own row
    both = load_recipe(write({**base, "rows": [{"name": "a", "run": "a"},
                                               {"name": "a, averaged", "run": "a", "weights": "model-ema"}]}))
    jobs = {j.name: j for j in plan(both, tmp_path, tmp_path / "code")}
    assert str(tmp_path / "runs" / "a" / "model-ema") in jobs["score:a-ema"].argv
    assert str(tmp_path / "runs" / "a" / "model") in jobs["score:a"].argv
    with pytest.raises(ConfigError, match="not found"):
        find_recipe("no-such-recipe")
    # an included recipe's run of the same name must be the same run
    inc = tmp_path / "inc.yaml"
    inc.write_text(yaml.safe_dump({**base, "runs": {"a": {"command": "finetune", "overrides": {"kd_weight": 1}}}}))
    with pytest.raises(ConfigError, match="differs from the included"):
        load_recipe(write({**base, "include": [str(inc)]}))


def _git(*args, cwd):
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=cwd, check=True,
                   capture_output=True)


def _one_commit_repo(tmp_path):
    """A repository with one commit: minivln/v.py saying V = 1."""
    repo = tmp_path / "repo"
    (repo / "minivln").mkdir(parents=True)
    (repo / "minivln" / "v.py").write_text("V = 1\n")
    _git("init", "-q", cwd=repo)
    _git("add", "-A", cwd=repo)
    _git("commit", "-qm", "one", cwd=repo)
    return repo


def test_pin_checkout_freezes_the_code(tmp_path):
    repo = _one_commit_repo(tmp_path)
    first = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    (repo / "minivln" / "v.py").write_text("V = 2\n")  # uncommitted: refused
    with pytest.raises(ConfigError, match="uncommitted"):
        pin_checkout(tmp_path / "exp", None, root=repo)
    _git("commit", "-qam", "two", cwd=repo)
    out = tmp_path / "exp"
    sha, code = pin_checkout(out, first, root=repo)
    assert sha == first and (code / "minivln" / "v.py").read_text() == "V = 1\n"
    # later calls keep the pinned commit, whatever lands meanwhile; another commit is refused
    assert pin_checkout(out, None, root=repo) == (first, code)
    with pytest.raises(ConfigError, match="pinned to"):
        pin_checkout(out, "HEAD", root=repo)
    assert not (out / "shared").exists()  # the repository has no ../shared: nothing linked


def test_two_drivers_pinning_a_new_directory_at_once_pin_it_once(tmp_path):
    """Two drivers started together on a new --out: one pins (one worktree), the other waits and uses it."""
    import threading

    repo = _one_commit_repo(tmp_path)
    out, got, errors = tmp_path / "exp", [], []
    barrier = threading.Barrier(3)

    def pin():
        barrier.wait()
        try:
            got.append(pin_checkout(out, None, root=repo))
        except Exception as exc:  # noqa: BLE001 -- reported below
            errors.append(exc)
    threads = [threading.Thread(target=pin) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(got) == 3 and len(set(got)) == 1
    listed = subprocess.run(["git", "worktree", "list"], cwd=repo, capture_output=True, text=True).stdout
    assert len(listed.splitlines()) == 2  # the repository and the one pinned checkout


def test_pinned_checkout_sees_the_repositorys_shared_folder(tmp_path):
    """Configs name the shared teachers as ../shared/...: from the pinned checkout (the jobs' working
    directory) that must be the repository's ../shared, also for a pin made before the link existed."""
    repo = _one_commit_repo(tmp_path)
    (tmp_path / "shared" / "teachers").mkdir(parents=True)
    out = tmp_path / "runs" / "exp"
    _, code = pin_checkout(out, None, root=repo)
    assert (code / ".." / "shared" / "teachers").resolve() == (tmp_path / "shared" / "teachers").resolve()
    (out / "shared").unlink()  # an experiment pinned by an older version: linked on the next call
    pin_checkout(out, None, root=repo)
    assert (code / ".." / "shared" / "teachers").is_dir()


def test_tiny_grid_end_to_end_resumes_and_rescores(small_toy, tmp_path):
    data, feats = small_toy
    torch.manual_seed(1)
    teacher = save_pretrained(create_model("duet-cpu", **TEACHER), tmp_path / "teacher")
    common = {"model": "duet-cpu", "model_overrides": SMALL, "max_instr_len": 40,
              "train": {"max_steps": 2, "log_every": 1, "ckpt_every": 1, "progress": False}}
    ft = {**common, "batch_size": 2, "max_action_len": 5, "val_splits": ["val_unseen"], "val_max_episodes": 2,
          "train": {**common["train"], "best_metric": "", "val_every": 0}}
    recipe = {
        "name": "tiny", "table": "tiny grid", "data_dir": str(data), "features": str(feats),
        "results": str(tmp_path / "table.json"), "submissions": str(tmp_path / "subs"), "max_action_len": 5,
        "plots": str(tmp_path / "img" / "tiny"),
        "runs": {
            "pre": {"command": "pretrain", "overrides": {**common, "batch_size": 2, "val_batches": 0}},
            "pre-kd": {"command": "pretrain", "teacher_run": "tpre",
                       "overrides": {**common, "batch_size": 2, "val_batches": 0}},
            "tpre": {"command": "pretrain", "overrides": {**common, "model_overrides": TEACHER, "batch_size": 2,
                                                           "val_batches": 0}},
            "plain": {"command": "finetune", "init": "pre", "overrides": ft},
            "s1": {"command": "finetune", "init": "pre-kd", "overrides": ft},
            "kd": {"command": "finetune", "init": "pre",
                   "overrides": {**ft, "teacher": str(teacher), "kd_terms": {"txt": 0}}},
        },
        "rows": [{"name": "none", "run": "plain"}, {"name": "two stage", "run": "kd", "stage2": True},
                 {"name": "teacher", "checkpoint": str(teacher)}, {"name": "random", "random": True},
                 {"name": "stage 1", "run": "s1", "stage1": True}],
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "exp"
    ok, table = run_experiment(load_recipe(str(path)), out, jobs=2, pin=False)
    assert ok and table["complete"] and [r["name"] for r in table["rows"]] == ["none", "two stage", "teacher", "random",
                                                                              "stage 1"]
    s1_row = table["rows"][4]  # a stage-1 row names its stage-1 teacher, the run and the commit it was trained at
    assert s1_row["stage1_teacher_run"] == "tpre" and s1_row["stage1_teacher_commit"] == table["commit"]
    assert s1_row["stage1_teacher"].endswith("tpre/pretrained") and "stage1_teacher" not in table["rows"][0]
    kd_row = table["rows"][1]
    # a given teacher has no commit here: its weights are named by digest, as a row's and as a stage-2 teacher
    assert table["rows"][2]["weights_sha256"] == kd_row["teacher_sha256"] == weights_digest(teacher) is not None
    assert "teacher_sha256" not in table["rows"][0] and s1_row["stage1_teacher_sha256"] == weights_digest(
        out / "runs" / "tpre" / "pretrained")
    assert kd_row["terms"] == ["pano", "fuse"] and kd_row["kd_weight"] == 0.1 and kd_row["steps"] == 2
    # the run each row started from, with its seed and commit (issue 21: a pretraining run per seed)
    assert kd_row["pretrain_run"] == "pre" and kd_row["pretrain_seed"] == 0
    assert kd_row["pretrain_commit"] == kd_row["commit"] == table["commit"]
    # which weights each run's row scored (issue 21: the last iteration's unless a recipe says otherwise)
    assert [r.get("weights") for r in table["rows"]] == ["model", "model", None, None, "model"]
    for row in table["rows"]:
        assert row["episodes"] == 9 and 0 <= row["sr"] <= 1 and row["sr_se"] >= 0
        # every number can be re-scored from the gzipped submission with minivln eval
        gz = tmp_path / "subs" / f"{slug(row['name'])}.json.gz"
        assert row["submission"] == str(gz)
        assert json.loads(gzip.decompress(gz.read_bytes()))
        scored = tmp_path / "scored.json"
        assert cli_main(["eval", "--task", "r2r", "--split", "val_unseen", "--data-dir", str(data),
                         "--preds", str(gz), "--out", str(scored)]) == 0
        assert json.loads(scored.read_text())["sr"] == pytest.approx(row["sr"])
        assert json.loads(scored.read_text())["spl"] == pytest.approx(row["spl"])
    assert json.loads((tmp_path / "table.json").read_text())["rows"] == table["rows"]
    # --table-only on a finished directory needs no feature file: the scorings say which features they used
    bare = tmp_path / "bare.yaml"
    bare.write_text(yaml.safe_dump({k: v for k, v in recipe.items() if k != "features"}))
    again = write_table(load_recipe(str(bare)), out, table["commit"])
    assert again["features"] == table["features"] and again["rows"] == table["rows"]
    with pytest.raises(ConfigError, match="give features=FILE"):  # nothing scored there says it
        write_table(load_recipe(str(bare)), tmp_path / "nothing-scored", table["commit"])
    # the pre-flight's room per run is a lower bound of what each run left on disk
    for run, export in (("pre", "pretrained"), ("plain", "model"), ("kd", "model")):
        cfg = DUETConfig.from_dict(json.loads((out / "runs" / run / export / "config.json").read_text()))
        left = sum(f.stat().st_size for f in (out / "runs" / run).rglob("*") if f.is_file())
        assert 0 < checkpoint_bytes(cfg, {}) <= left, run
    assert [k for k, _ in bar_metrics(table["rows"])] == ["sr", "spl"]  # R2R: no grounding rates
    for pic in ("tiny_bars.png", "tiny_curves.png"):
        assert (tmp_path / "img" / pic).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # resume: an interrupted run (its done mark gone, its checkpoint kept) continues, the rest is skipped
    (out / "done" / "train-kd.json").unlink()
    (out / "done" / "score-kd.json").unlink()
    ok, again = run_experiment(load_recipe(str(path)), out, jobs=2, pin=False)
    assert ok and again["rows"] == table["rows"]
    log = (out / "logs" / "train-kd.log").read_text()
    assert log.count("=== ") == 2 and " --resume --out " in log.split("=== ")[-1]
    assert (out / "logs" / "train-plain.log").read_text().count("=== ") == 1
    # a recipe changed under a finished run is refused, not silently mixed
    recipe["runs"]["plain"]["overrides"]["ml_weight"] = 0.5
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConfigError, match="another spec"):
        run_experiment(load_recipe(str(path)), out, jobs=2, pin=False)


def test_a_run_trained_outside_the_driver_is_adopted_only_when_it_is_the_recipes_run(small_toy, tmp_path):
    data, feats = small_toy
    ft = {"model": "duet-cpu", "model_overrides": SMALL, "max_instr_len": 40, "batch_size": 2, "max_action_len": 5,
          "val_splits": ["val_unseen"], "val_max_episodes": 2,
          "train": {"max_steps": 1, "log_every": 1, "ckpt_every": 1, "progress": False, "best_metric": "",
                    "val_every": 0}}
    recipe = {"name": "tiny", "table": "tiny", "data_dir": str(data), "features": str(feats),
              "results": str(tmp_path / "table.json"), "submissions": str(tmp_path / "subs"), "max_action_len": 5,
              "runs": {"a": {"command": "finetune", "overrides": ft}}, "rows": [{"name": "a", "run": "a"}]}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    rec = load_recipe(str(path))
    out = tmp_path / "exp"
    job = next(j for j in plan(rec, out, tmp_path) if j.name == "train:a")

    def train(src, *extra):  # the recipe's run, trained by hand
        assert cli_main(["finetune", "--out", str(src), *job.overrides, *extra]) == 0
        return src

    with pytest.raises(ConfigError, match="not a finished run"):
        adopt_run(rec, out, "a", tmp_path / "nothing", commit="HEAD")
    other = train(tmp_path / "other", "train.seed=5")
    with pytest.raises(ConfigError, match="train.seed: recipe 0, run 5"):
        adopt_run(rec, out, "a", other, commit="HEAD")
    src = train(tmp_path / "by-hand")
    with pytest.raises(ConfigError, match="no commit"):
        adopt_run(rec, out, "a", src, commit="no-such-ref")
    done = adopt_run(rec, out, "a", src, commit="HEAD~1", note="trained by hand")
    assert done["note"] == "trained by hand" and (out / "runs" / "a" / "model").is_dir()
    # trained by hand: the mark says when its weights were written, not the adoption time as training's end,
    # and keeps the recipe's command apart from the unknown one the run ran
    assert done["finished"] <= done["adopted"] and "argv" not in done and "--out" in done["recipe_argv"]
    with pytest.raises(ConfigError, match="exists already"):
        adopt_run(rec, out, "a", src, commit="HEAD")
    # trained by another driver: the mark keeps that driver's command and time, and its commit must agree
    driven = tmp_path / "other-exp" / "runs" / "a"
    shutil.copytree(src, driven)
    (tmp_path / "other-exp" / "done").mkdir()
    argv = ["python", "-m", "minivln.cli", "finetune", "--out", str(driven)]
    (tmp_path / "other-exp" / "done" / "train-a.json").write_text(json.dumps(
        {"commit": done["commit"], "finished": "2026-12-06 14:01:20", "seconds": 60.0, "argv": argv}))
    with pytest.raises(ConfigError, match="was trained at"):
        adopt_run(rec, tmp_path / "exp2", "a", driven, commit="HEAD")
    again = adopt_run(rec, tmp_path / "exp2", "a", driven, commit="HEAD~1")
    assert again["argv"] == argv and again["finished"] == "2026-12-06 14:01:20" and again["seconds"] == 60.0
    assert "recipe_argv" not in again and again["adopted_from"] == str(driven)
    # the driver takes it as done: it scores it, and trains nothing
    ok, table = run_experiment(rec, out, jobs=1, pin=False)
    assert ok and table["rows"][0]["episodes"] == 9
    assert table["rows"][0]["commit"] == done["commit"] != table["commit"]  # the commit it was trained at
    assert not (out / "logs" / "train-a.log").exists() and (out / "logs" / "score-a.log").exists()


def test_an_adopted_run_keeps_the_command_and_time_its_own_driver_recorded(tmp_path):
    from minivln.experiment import _source_mark

    src = tmp_path / "other-exp" / "runs" / "t"
    src.mkdir(parents=True)
    assert _source_mark(src) is None  # no driver trained it
    (tmp_path / "other-exp" / "done").mkdir()
    mark = tmp_path / "other-exp" / "done" / "train-t.json"
    rec = {"finished": "2026-12-06 14:01:20", "seconds": 60.0, "argv": ["python", "-m", "minivln.cli", "finetune",
                                                                       "--out", str(src)]}
    mark.write_text(json.dumps(rec))
    assert _source_mark(src) == rec
    mark.write_text(json.dumps({**rec, "argv": ["finetune", "--out", str(tmp_path / "elsewhere")]}))
    assert _source_mark(src) is None  # a mark for another directory of that name is not this run's
    adopted = {"adopted_from": "/elsewhere/t", "finished": "2026-12-06 14:01:20", "recipe_argv": ["finetune"]}
    mark.write_text(json.dumps(adopted))
    assert _source_mark(src) == adopted  # a run adopted there: its adoption's mark describes it


def test_random_walker_of_a_reverie_table_picks_a_visible_object(small_toy):
    """The random row of a REVERIE table draws its object among those visible where it stops (-1
    where none is), the same draw every time, and scores."""
    data, _ = small_toy
    recipe = Recipe(name="t", task="reverie", split="val_unseen", data_dir=str(data))
    subs = random_submission(recipe)
    goals = ReverieGoals(data)
    scans = {ep.instr_id: ep.scan for ep in load_episodes("reverie", "val_unseen", data)}
    picked = 0
    for item in subs:
        visible = {int(x) for x in goals.visible_objects(scans[item["instr_id"]], item["trajectory"][-1][0])}
        assert item["predObjId"] in visible if visible else item["predObjId"] == -1
        picked += item["predObjId"] != -1
    assert picked > 0
    assert random_submission(recipe) == subs
    metrics = Evaluator("reverie", "val_unseen", data).score(subs)[0]
    assert 0.0 <= metrics["rgs"] <= metrics["sr"]


# ------------------------------------------------------------------------------------------ pre-flight


def _tiny_recipe(tmp_path, data, feats, runs, rows):
    """A recipe on the small toy world (2-step runs of the tiny network), written to tmp_path/r.yaml."""
    recipe = {"name": "tiny", "table": "tiny", "data_dir": str(data), "features": str(feats),
              "results": str(tmp_path / "table.json"), "submissions": str(tmp_path / "subs"),
              "max_action_len": 5, "runs": runs, "rows": rows}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def _pre(**extra):
    return {"model": "duet-cpu", "model_overrides": SMALL, "max_instr_len": 40, "batch_size": 2, "val_batches": 0,
            "train": {"max_steps": 2, "progress": False}, **extra}


def _ft(**extra):
    return {"model": "duet-cpu", "model_overrides": SMALL, "max_instr_len": 40, "batch_size": 2,
            "max_action_len": 5, "val_splits": [], "train": {"max_steps": 2, "progress": False}, **extra}


def _problem_lines(err):
    """The problems of a refused pre-flight, one per line (after the 'minivln: error:' head line)."""
    lines = err.strip().splitlines()
    assert lines[0].startswith("minivln: error: pre-flight: ") and "nothing started" in lines[0]
    return [ln.strip() for ln in lines[1:]]


def test_preflight_lists_every_missing_or_misfit_input_at_once(small_toy, tmp_path, capsys):
    """A missing teacher, missing features, a teacher and features of another width, a missing
    checkpoint: --dry-run names each on its own line and exits 2; a real run refuses with the same lines
    and starts nothing."""
    data, feats = small_toy
    torch.manual_seed(0)
    wide = save_pretrained(create_model("duet-cpu", **{**TEACHER, "image_feat_size": 32}), tmp_path / "wide")
    runs = {
        "pre": {"command": "pretrain", "overrides": _pre(teacher=str(tmp_path / "no-teacher"))},
        "ft": {"command": "finetune", "init": "pre", "overrides": _ft(teacher=str(wide))},
        "elsewhere": {"command": "finetune", "overrides": _ft(features=str(tmp_path / "no-feats.h5"))},
        "wider": {"command": "finetune", "overrides": _ft(model_overrides={**SMALL, "image_feat_size": 32})},
    }
    rows = [{"name": "ft", "run": "ft"}, {"name": "elsewhere", "run": "elsewhere"}, {"name": "wider", "run": "wider"},
            {"name": "teacher", "checkpoint": str(tmp_path / "no-ckpt")}]
    path = _tiny_recipe(tmp_path, data, feats, runs, rows)
    out = tmp_path / "exp"
    assert cli_main(["experiment", path, "--out", str(out), "--dry-run"]) == 2
    printed, err = capsys.readouterr()
    assert "train:ft  after train:pre" in printed  # the plan is still shown
    lines = _problem_lines(err)
    expected = [
        f"teacher {tmp_path / 'no-teacher'} does not exist (run pre)",
        f"teacher {wide} cannot teach this student in stage 2: it takes view features 32-d (student 16-d)",
        f"features {tmp_path / 'no-feats.h5'} does not exist (run elsewhere)",
        f"features {feats} hold 16-d view features, the network's image_feat_size is 32 (run wider; row 'wider')",
        f"checkpoint {tmp_path / 'no-ckpt'} does not exist (row 'teacher')",
    ]
    assert len(lines) == len(expected), lines
    for want in expected:
        assert sum(want in ln for ln in lines) == 1, (want, lines)
    assert "2 problems" not in err and "5 problems" in err
    # the real run: the same lines, before the pin and any job
    with pytest.raises(PreflightError) as caught:
        run_experiment(load_recipe(path), out, jobs=1, pin=False)
    assert caught.value.problems == lines
    assert not (out / "logs").exists() and not (out / "runs").exists() and not (out / "pin.json").exists()


def test_preflight_accepts_a_teacher_trained_by_the_recipe_and_checks_it_against_its_student(
        small_toy, tmp_path, capsys):
    """teacher_run names a run that does not exist yet: fine, and checked with the network that run
    will train (stage 1 for pretraining, stage 2 for fine-tuning)."""
    data, feats = small_toy
    teacher_arch = {"model_overrides": TEACHER}
    runs = {
        "t-pre": {"command": "pretrain", "overrides": _pre(**teacher_arch)},
        "t": {"command": "finetune", "init": "t-pre", "overrides": _ft(**teacher_arch)},
        "s-pre": {"command": "pretrain", "teacher_run": "t-pre", "overrides": _pre()},
        "s": {"command": "finetune", "init": "s-pre", "teacher_run": "t", "overrides": _ft()},
    }
    rows = [{"name": "teacher", "run": "t"}, {"name": "student", "run": "s"}, {"name": "random", "random": True}]
    path = _tiny_recipe(tmp_path, data, feats, runs, rows)
    assert cli_main(["experiment", path, "--out", str(tmp_path / "exp"), "--dry-run"]) == 0
    printed, _ = capsys.readouterr()
    assert "pre-flight: 4 runs, 3 rows checked, nothing missing" in printed
    # a pretraining teacher with other attention heads cannot teach stage 1's attention term
    runs["t-pre"]["overrides"]["model_overrides"] = {**TEACHER, "num_attention_heads": 4}
    path = _tiny_recipe(tmp_path, data, feats, runs, rows)
    assert cli_main(["experiment", path, "--out", str(tmp_path / "exp"), "--dry-run"]) == 2
    lines = _problem_lines(capsys.readouterr()[1])
    assert len(lines) == 1 and lines[0].startswith("teacher_run t-pre") and "stage 1" in lines[0]
    assert "4 attention heads" in lines[0] and lines[0].endswith("(run s-pre)")


def test_preflight_wants_room_for_the_pending_checkpoints(small_toy, tmp_path, monkeypatch):
    data, feats = small_toy
    path = _tiny_recipe(tmp_path, data, feats, {"a": {"command": "finetune", "overrides": _ft()}},
                        [{"name": "a", "run": "a"}])
    out = tmp_path / "exp"
    summary = preflight(load_recipe(path), out)
    assert summary.startswith("pre-flight: 1 run, 1 row checked, nothing missing (their checkpoints need ")
    monkeypatch.setattr("minivln.paths.free_bytes", lambda p: 1000)
    with pytest.raises(PreflightError) as caught:
        preflight(load_recipe(path), out)
    assert len(caught.value.problems) == 1 and "not enough space" in caught.value.problems[0]
    assert "of 1 run left" in caught.value.problems[0] and "1 KB left" in caught.value.problems[0]


def _features_file(path, dim, objects=False):
    if objects:
        k = 2
        with ObjectFeatureWriter(path, dim=dim, standin=True, description="test", dtype="float16") as w:
            w.add("scan", "vp", ObjectFeatures(np.zeros((k, dim)), np.arange(k), np.zeros((k, 2)), np.ones((k, 2)),
                                               np.zeros((k, 4)), np.arange(k), None))
    else:
        with FeatureWriter(path, dim=dim, standin=True, description="test", dtype="float16") as w:
            w.add("scan", "vp", np.zeros((36, dim)))
    return path


@pytest.mark.parametrize("name", sorted(set(SHIPPED) - WITH_INPUTS))
def test_shipped_recipes_pass_the_preflight_given_their_inputs(name, tmp_path, monkeypatch):
    """Every shipped recipe, given feature files of the widths its networks read and the shared teachers
    it names (here: tmp stand-ins with the shared teachers' config, so that the test does not depend
    on the ../shared of the machine), passes the pre-flight; without the teachers it names them."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "configs").symlink_to(CONFIG_DIR, target_is_directory=True)
    monkeypatch.setattr("minivln.experiment.repo_root", lambda: repo)
    monkeypatch.setattr("minivln.paths.free_bytes", lambda p: 2**50)
    (tmp_path / "data").mkdir()
    args = [f"features={_features_file(tmp_path / 'v.h5', 768)}", f"data_dir={tmp_path / 'data'}"]
    if name.startswith("reverie"):
        args.append(f"objects={_features_file(tmp_path / 'o.h5', 768, objects=True)}")
    recipe = load_recipe(name, args)
    try:
        summary = preflight(recipe, tmp_path / "exp")
        shared = []
    except PreflightError as exc:  # only the shared teachers, which this tmp repository lacks
        shared = exc.problems
        assert all(p.split()[1].startswith(str(tmp_path.resolve() / "shared" / "teachers"))
                   and "does not exist" in p for p in shared), shared
        teacher = {"model_type": "duet", **get_config("duet-cpu", feat_dropout=0.0).to_dict()}
        for p in shared:
            folder = tmp_path / "shared" / "teachers" / p.split()[1].rsplit("/", 1)[-1]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "config.json").write_text(json.dumps(teacher))
        summary = preflight(recipe, tmp_path / "exp")
    n_runs = sum(1 for j in plan(recipe, tmp_path, tmp_path) if j.name.startswith("train:"))
    undecided = sum(1 for r in recipe.rows if r.weights == "undecided")
    assert re.match(rf"pre-flight: {n_runs} runs?, {len(recipe.rows) - undecided} rows? checked, nothing missing", summary)
    assert (f"{undecided} rows with weights undecided" in summary) == bool(undecided)
    if any(v.get("teacher") for r in recipe.runs.values() for v in [r.overrides]):
        assert shared  # a recipe naming a shared teacher is refused where it is missing


def test_listed_order_runs_the_recipes_runs_as_written_and_scores_each_when_trained(tmp_path):
    """``order: listed`` (the REVERIE pre-registration's): seed 0's student alone is trained and
    scored before any distillation run, though the teacher-first default would start those first."""
    recipe = load_recipe("reverie-prereg-table3", ["features=x"])
    names = [j.name for j in plan(recipe, tmp_path, tmp_path)]
    assert names[:7] == ["train:rev-teacher-v3-pre", "train:rev-teacher-v3", "score:rev-teacher-v3", "train:rev-pre-plain-s0",
                         "train:rev-ft-none-s0", "score:rev-ft-none-s0", "train:rev-pre-kd-s0"]
    assert names.index("score:rev-ft-both-s0") < names.index("train:rev-pre-plain-s1")
    default = [j.name for j in plan(load_recipe("reverie-prereg-table3", ["features=x", "order=teacher-first"]),
                                    tmp_path, tmp_path)]
    assert sorted(default) == sorted(names) and default.index("train:rev-ft-none-s0") > default.index(
        "train:rev-ft-both-s0")


def test_the_reverie_contingency_table_changes_the_stage_2_teacher_and_nothing_else(tmp_path):
    """reverie-prereg-table3-cont (pre-registered before the gate was read): the same rows, seeds and
    statistics as reverie-prereg-table3, the runs without stage 2 shared (same spec, trained once), the
    stage-2 runs the same configuration with the continued teacher, held by the same gate."""
    base, cont = (load_recipe(n, ["features=x"]) for n in ("reverie-prereg-table3", "reverie-prereg-table3-cont"))
    spec = {j.name: j.spec for j in plan(base, tmp_path, tmp_path)}
    jobs = {j.name: j for j in plan(cont, tmp_path, tmp_path)}
    base_runs = {r.name: r.run for r in base.rows}
    assert [r.name for r in cont.rows] == [r.name for r in base.rows]
    for row in cont.rows:
        if row.random:
            continue
        if row.name.startswith(("stage 2", "two-stage")):
            assert row.run == base_runs[row.name].replace("-s2-", "-s2c-").replace("-both-", "-bothc-")
            b, c = base.runs[base_runs[row.name]], cont.runs[row.run]
            assert (b.config, b.init, b.overrides) == (c.config, c.init, c.overrides)
            assert c.teacher_run == "rev-teacher-v3-cont"
            assert f"teacher={tmp_path / 'runs' / 'rev-teacher-v3-cont' / 'model'}" in jobs[f"train:{row.run}"].argv
        elif "teacher" in row.name:
            assert row.run == "rev-teacher-v3-cont"
        else:  # none, stage 1 only and their pickers: the base table's runs, trained once for both
            assert row.run == base_runs[row.name] and jobs[f"train:{row.run}"].spec == spec[f"train:{row.run}"]
    assert [to_dict(c) for c in cont.comparisons] == [to_dict(c) for c in base.comparisons]
    (gate,) = cont.gates
    assert gate.runs == ["rev-ft-s2c-*", "rev-ft-bothc-*"] and gate.rows == base.gates[0].rows and gate.min_se == 3.0
    assert "score:rev-teacher-v3-cont" in jobs["train:rev-ft-bothc-s2"].deps
    assert cont.results != base.results and cont.summary.results != base.summary.results


def test_reverie_teacher_v4_changes_only_the_pretraining_budget_and_the_checkpoint_choice(tmp_path):
    """Pre-registered (docs/preregistration_reverie.md, "Teacher v4"): v3's design with four times the
    pretraining samples (2,400 steps at batch 64 against 1,200 at 32) and the fine-tuning checkpoint chosen
    by SR on val_seen; nothing else, and no val_unseen instruction chooses the weights."""
    from minivln.training.finetune import FinetuneConfig
    from minivln.training.pretrain import PretrainConfig

    def configs(name, pre, ft):
        jobs = {j.name: j for j in plan(load_recipe(name, ["features=x"]), tmp_path / name, tmp_path / name)}
        return (load_config(PretrainConfig, repo_root() / jobs[pre].config, jobs[pre].overrides),
                load_config(FinetuneConfig, repo_root() / jobs[ft].config, jobs[ft].overrides))

    v3_pre, v3 = configs("reverie-teacher-v3", "train:rev-teacher-v3-pre", "train:rev-teacher-v3")
    v4_pre, v4 = configs("reverie-teacher-v4", "train:rev-teacher-v4-pre", "train:rev-teacher-v4")
    ignore = ("train.run_dir", "init_checkpoint")
    assert set(config_changes(v3_pre, v4_pre, ignore=ignore)) == {"batch_size", "val_batches", "train.max_steps"}
    assert v4_pre.batch_size * v4_pre.train.max_steps == 4 * v3_pre.batch_size * v3_pre.train.max_steps
    assert v4_pre.batch_size * v4_pre.val_batches == v3_pre.batch_size * v3_pre.val_batches  # 256 samples
    assert v4_pre.init_checkpoint == "" and v4_pre.train.optim.lr == pytest.approx(2.5e-4)
    assert set(config_changes(v3, v4, ignore=ignore)) == {"val_splits", "train.val_every", "train.best_metric"}
    assert v4.train.best_metric == "val_seen.sr" and v4.val_max_episodes == 300
    assert v4.val_splits == ["val_seen", "val_unseen"] and v4.train.val_every == 100  # ten readings of each
    assert (v4_pre.batch_size, v4_pre.train.max_steps, v4_pre.val_batches) == (64, 2400, 4)
    assert v4.init_checkpoint.endswith("rev-teacher-v4-pre/pretrained")


def test_reverie_table3_with_teacher_v4_is_the_first_table_with_the_fourth_teacher(tmp_path):
    """Pre-registered (docs/preregistration_reverie.md, "Table III with teacher v4"): every student run of
    reverie-prereg-table3 again, same config, overrides, seeds and order, its teachers v4's; the same
    rows, tests and summary; no in-recipe gate (the v4 gate decides whether the table runs)."""
    first, again = load_recipe("reverie-prereg-table3", ["features=x"]), load_recipe("reverie-prereg-table3-v4", ["features=x"])
    students = [n for n in first.runs if not n.startswith("rev-teacher")]
    assert [n for n in again.runs if not n.startswith("rev-teacher")] == students and len(students) == 18
    swap = {"rev-teacher-v3-pre": "rev-teacher-v4-pre", "rev-teacher-v3": "rev-teacher-v4", "": ""}
    for n in students:
        a, b = first.runs[n], again.runs[n]
        assert (b.command, b.config, b.init, b.overrides) == (a.command, a.config, a.init, a.overrides), n
        assert b.teacher_run == swap[a.teacher_run], n
    assert {"rev-teacher-v4-pre", "rev-teacher-v4"} <= set(again.runs) and "rev-teacher-v3" not in again.runs
    strip = lambda rows: [(r.name, r.run.replace("v3", "v4"), r.picker, r.stage1, r.stage2) for r in rows]  # noqa: E731
    assert strip(again.rows)[:17] == strip(first.rows)[:17]
    assert [c.name for c in again.comparisons] == [c.name for c in first.comparisons]
    assert all((c.pairs, c.metrics, c.alpha) == (d.pairs, d.metrics, d.alpha) for c, d in zip(again.comparisons, first.comparisons))
    assert again.gates == [] and first.gates
    assert again.results != first.results and again.summary.results != first.summary.results


def test_reverie_prereg_rows_are_seeded_pretrained_per_seed_and_distil_from_the_reverie_teacher(tmp_path):
    """Amended before any distillation run (docs/preregistration_reverie.md, Notes): both stages distil
    from the third teacher (recipe reverie-teacher-v3), whose fine-tuning is the students' own."""
    recipe = load_recipe("reverie-prereg-table3", ["features=x"])
    jobs = {j.name: j for j in plan(recipe, tmp_path, tmp_path)}
    for s in (0, 1, 2):
        for arm, pre, teacher in (("none", "plain", None), ("s1", "kd", None), ("s2", "plain", "rev-teacher-v3"),
                                  ("both", "kd", "rev-teacher-v3")):
            argv = jobs[f"train:rev-ft-{arm}-s{s}"].argv
            assert f"train.seed={s}" in argv and "train.best_metric=" in argv
            assert f"init_checkpoint={tmp_path / 'runs' / f'rev-pre-{pre}-s{s}' / 'pretrained'}" in argv
            assert any(a.startswith("teacher=") for a in argv) == bool(teacher)
            if teacher:
                assert f"teacher={tmp_path / 'runs' / teacher / 'model'}" in argv
        kd = jobs[f"train:rev-pre-kd-s{s}"].argv
        assert f"train.seed={s}" in kd and f"teacher={tmp_path / 'runs' / 'rev-teacher-v3-pre' / 'pretrained'}" in kd
        assert f"train.seed={s}" in jobs[f"train:rev-pre-plain-s{s}"].argv
    # §2: the stage-2 and two-stage runs wait for the teacher-ahead check on the teacher and seed 0's none
    for name in jobs:
        gated = name.startswith(("train:rev-ft-s2-", "train:rev-ft-both-"))
        assert ("score:rev-teacher-v3" in jobs[name].deps and "score:rev-ft-none-s0" in jobs[name].deps) == gated
    pickers = [r for r in recipe.rows if r.picker]
    assert {r.run for r in pickers} == {"rev-ft-none-s0", "rev-ft-none-s1", "rev-ft-none-s2", "rev-teacher-v3"}
    # the teacher is fine-tuned exactly as the students are, the network aside
    from minivln.training.finetune import FinetuneConfig

    student, teacher = (load_config(FinetuneConfig, repo_root() / jobs[j].config, jobs[j].overrides)
                        for j in ("train:rev-ft-none-s0", "train:rev-teacher-v3"))
    changes = config_changes(student, teacher, ignore=("train.run_dir", "init_checkpoint"))
    assert set(changes) == {"model"}, changes
    # its pretraining: from scratch at the teacher config's own 2.5e-4 (at 5e-4 the second teacher's MLM collapsed)
    from minivln.training.pretrain import PretrainConfig

    pre = load_config(PretrainConfig, repo_root() / jobs["train:rev-teacher-v3-pre"].config,
                      jobs["train:rev-teacher-v3-pre"].overrides)
    assert pre.init_checkpoint == "" and pre.train.optim.lr == pytest.approx(2.5e-4) and pre.model == "duet-cpu-reverie"


def test_a_picker_row_needs_a_reverie_run(tmp_path):
    p = tmp_path / "r.yaml"
    base = {"name": "x", "task": "reverie", "runs": {"a": {"command": "finetune"}}}
    for rows, task in (([{"name": "a", "run": "a", "picker": "nearest"}], "reverie"),
                       ([{"name": "a", "random": True, "picker": "name-overlap"}], "reverie"),
                       ([{"name": "a", "run": "a", "picker": "name-overlap"}], "r2r")):
        p.write_text(yaml.safe_dump({**base, "task": task, "rows": rows}))
        with pytest.raises(ConfigError, match="picker"):
            load_recipe(str(p))
    p.write_text(yaml.safe_dump({**base, "rows": [{"name": "a", "run": "a"}, {"name": "b", "run": "a",
                                                                               "picker": "name-overlap"}]}))
    jobs = [j.name for j in plan(load_recipe(str(p)), tmp_path, tmp_path)]
    assert jobs.count("score:a") == 1  # the reference row re-uses the run's scoring


def test_a_record_lets_another_machine_go_on_without_training_or_scoring_twice(small_toy, tmp_path, capsys):
    """--save-record keeps what an experiment directory knows but its weights; --load-record puts it in a
    new directory, where a finished run a pending job needs is trained again (its earlier record kept as
    lost-N), through a chain of lost runs and with --only, unless it was scored -- by any recipe sharing
    the directory -- in which case what needs it is held (issue 21: the machine changed)."""
    data, feats = small_toy
    runs = {"pre": {"command": "pretrain", "overrides": _pre()},
            "a": {"command": "finetune", "init": "pre", "overrides": _ft()},
            "m": {"command": "finetune", "init": "pre", "overrides": _ft(ml_weight=0.3)}}
    (tmp_path / "1").mkdir()
    first = _tiny_recipe(tmp_path / "1", data, feats, runs, [{"name": "A", "run": "a"}, {"name": "M", "run": "m"}])
    out, record = tmp_path / "exp", tmp_path / "record"
    out.mkdir()
    (out / "pin.json").write_text(json.dumps({"commit": "unpinned"}))  # run_experiment(pin=False) pins nothing
    ok, table = run_experiment(load_recipe(first), out, jobs=1, pin=False, only=["train:*", "score:a"])
    assert ok and table["pending"] == ["M"]  # m trained, not scored
    pre_digest = json.loads((out / "done" / "train-pre.json").read_text())["weights_sha256"]
    a_mark = json.loads((out / "done" / "train-a.json").read_text())
    assert a_mark["init_sha256"] == pre_digest and len(pre_digest) == 16 and a_mark["weights_sha256"] != pre_digest
    assert table["rows"][0]["pretrain_weights"] == pre_digest  # the row says which pretraining weights
    (out / "runs" / "unfinished").mkdir()
    (out / "runs" / "unfinished" / "config.yaml").write_text("a: 1\n")
    big = [{"instr_id": str(i), "trajectory": [["v", 0.0, 0.0]] * 3} for i in range(2000)]
    (out / "scores" / "a" / "extra.json").write_text(json.dumps(big, indent=1))  # over 64 KB: gzipped
    assert cli_main(["experiment", first, "--out", str(out), "--save-record", str(record)]) == 0
    kept = {str(f.relative_to(record)) for f in record.rglob("*") if f.is_file()}
    assert "done/train-a.json" in kept and "runs/a/config.yaml" in kept and "runs/a/log.jsonl" in kept
    assert "scores/a/submission_val_unseen.json" in kept and "scores/a/extra.json.gz" in kept
    write_gz(tmp_path / "table-copy.json.gz", big)  # as a table writes it: one git blob with the record's copy
    assert (record / "scores" / "a" / "extra.json.gz").read_bytes() == (tmp_path / "table-copy.json.gz").read_bytes()
    assert not [k for k in kept if "unfinished" in k or k.endswith((".safetensors", ".pt"))]
    assert not [k for k in kept if k.startswith("runs/") and k.count("/") > 2]  # no checkpoint, no weights
    digests = json.loads((record / "record.json").read_text())["weights_sha256"]
    assert digests == {"pre/pretrained": pre_digest, "a/model": a_mark["weights_sha256"],
                       "m/model": json.loads((out / "done" / "train-m.json").read_text())["weights_sha256"]}

    # another machine: the record, no weights
    runs2 = {**runs, "b": {"command": "finetune", "init": "pre", "overrides": _ft(ml_weight=0.5)},
             "c": {"command": "finetune", "init": "a", "overrides": _ft()},
             "leaf": {"command": "finetune", "init": "m", "overrides": _ft()}}
    (tmp_path / "2").mkdir()  # a recipe that does not score a itself: a's scoring is another recipe's
    second = _tiny_recipe(tmp_path / "2", data, feats, runs2, [{"name": "B", "run": "b"}, {"name": "C", "run": "c"},
                                                               {"name": "L", "run": "leaf"}])
    new = tmp_path / "new"
    assert cli_main(["experiment", second, "--out", str(new), "--load-record", str(record)]) == 0
    assert not list(new.rglob("*.safetensors"))
    assert json.loads((new / "scores" / "a" / "extra.json").read_text()) == big
    status = {n: (s, d) for n, s, d in job_status(load_recipe(second), new, plan(load_recipe(second), new, new))}
    assert "not on this machine" in status["train:a"][1] and "not on this machine" in status["train:m"][1]
    capsys.readouterr()
    # --only the leaf of a chain of two lost, unscored runs: both trained again, then the leaf
    ok, _ = run_experiment(load_recipe(second), new, jobs=1, pin=False, only=["train:leaf", "score:leaf"])
    assert ok and (new / "done" / "score-leaf.json").is_file()
    for run in ("pre", "m"):  # the first record of each kept as lost-1
        assert (new / "done" / f"train-{run}.lost-1.json").is_file() and (new / "runs" / f"{run}.lost-1").is_dir()
    assert json.loads((new / "done" / "train-pre.lost-1.json").read_text())["weights_sha256"] == pre_digest
    ok, table2 = run_experiment(load_recipe(second), new, jobs=1, pin=False)
    printed = capsys.readouterr().out
    assert ok and table2["pending"] == ["C"]  # a was scored: not trained again, so c, which needs it, is held
    assert "held     train:c: a's weights are not on this machine and it was scored (score:a)" in printed
    assert not (new / "done" / "train-a.lost-1.json").exists() and not (new / "runs" / "a" / "model").exists()
    assert not (new / "done" / "train-pre.lost-2.json").exists()  # trained again once, then there
    rows = {r["name"]: r for r in table2["rows"]}
    assert rows["B"]["pretrain_weights"] == json.loads((new / "done" / "train-pre.json").read_text())["weights_sha256"]

    # a record never overwrites work, and is checked against its manifest
    (new / "runs" / "a" / "config.yaml").write_text("changed: 1\n")
    with pytest.raises(ConfigError, match=r"other versions of .*runs/a/config\.yaml"):
        load_record(record, new)
    (record / "runs" / "a" / "config.yaml").write_text("tampered: 1\n")
    with pytest.raises(ConfigError, match=r"runs/a/config\.yaml \(not what was saved\)"):
        load_record(record, tmp_path / "third")
    manifest = json.loads((record / "record.json").read_text())
    manifest["files"]["../escape.json"] = {"stored": "../escape.json", "sha256": "0"}
    (record / "record.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="not a file of an experiment directory"):
        load_record(record, tmp_path / "third")
    with pytest.raises(ConfigError, match="no experiment directory"):
        save_record(tmp_path / "nothing", tmp_path / "r2")
