"""The paper-scale recipes (``r2r-scalevln-table3``: a ScaleVLN teacher on 512-d CLIP views;
``reverie-duet-table3``: a DUET teacher with objects): each resolves its inputs, plans and passes the
pre-flight on a release folder laid out as ScaleVLN's / DUET's (small files in their exact formats, teachers
at the paper's size stored as broadcast zeros), holds the paper's budgets, and its distilled runs train a few
iterations at the paper's dimensions on CPU (stage 1 then stage 2, the student fed the teacher's features).
The guide's commands (docs/guide-gpu.md) are these."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from cli_checks import one_error_line, run_cli
from duet_release import (
    hm3d_items,
    hm3d_lines,
    r2r_items,
    r2r_lines,
    write_finetune_checkpoint,
    write_hm3d_house,
    write_json,
    write_jsonl,
    write_pretrain_checkpoint,
    write_view_features,
)

from minivln.config import ConfigError, load_config
from minivln.data.datasets import load_episodes
from minivln.data.graph import Graphs
from minivln.data.reverie import ReverieGoals
from minivln.data.tokenizer import get_tokenizer
from minivln.experiment import Job, execute, load_recipe, parse_gpus, plan, repo_root
from minivln.model.checkpoint import read_agent_config
from minivln.model.registry import get_config
from minivln.training.finetune import FinetuneConfig
from minivln.training.pretrain import PretrainConfig

R2R_RECIPE, REVERIE_RECIPE = "r2r-scalevln-table3", "reverie-duet-table3"


def _reverie_lines(data: Path, split: str) -> list[dict]:
    """REVERIE episodes -> DUET's pretraining lines (``instr_id`` ``<path_id>_<objId>_<k>``, ``pos_vps``)."""
    graphs, tok = Graphs(data), get_tokenizer()
    goals = ReverieGoals(data, graphs)
    return [{"instr_id": ep.instr_id, "scan": ep.scan, "path": list(ep.path), "heading": ep.heading,
             "pos_vps": sorted(goals.episode_goals(ep)), "instr_encoding": tok.encode(ep.instruction)}
            for ep in load_episodes("reverie", split, data)]


def _write_objects(path: Path, data: Path, dim: int = 768) -> Path:
    """DUET's REVERIE object file (``obj.avg.top3.min80_vit_base_patch16_224_imagenet.hdf5``): per
    ``{scan}_{viewpoint}`` a (K, D) dataset of the BBox file's objects with attributes ``obj_ids``,
    ``directions`` (heading, elevation of the view the box is in), ``sizes`` and ``bboxes``."""
    rng = np.random.default_rng(2)
    with h5py.File(path, "w") as f:
        for bbox_file in sorted((data / "REVERIE" / "BBox").glob("*.json")):
            for vp, objs in json.loads(bbox_file.read_text()).items():
                if not objs:
                    continue
                scan = bbox_file.stem[: -len(vp) - 1]
                ids = sorted(objs, key=int)
                views = [objs[o]["visible_pos"][0] for o in ids]
                boxes = np.array([objs[o]["bbox2d"][0] for o in ids], np.float32)
                ds = f.create_dataset(f"{scan}_{vp}", data=rng.standard_normal((len(ids), dim)).astype(np.float32))
                ds.attrs["obj_ids"] = np.array([int(o) for o in ids], np.int64)
                ds.attrs["directions"] = np.array([[np.radians((v % 12) * 30), np.radians((v // 12 - 1) * 30)]
                                                   for v in views], np.float32)
                ds.attrs["sizes"] = boxes[:, 2:4]
                ds.attrs["bboxes"] = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:4]], axis=1)
    return path


@pytest.fixture(scope="module")
def release(small_toy, tmp_path_factory) -> tuple[Path, Path, Path]:
    """``(data_dir, DATASETS, REVERIE pretraining teacher)``: the small toy world as MiniVLN's data
    directory, and a ``datasets/`` folder as ScaleVLN's and DUET's releases lay it out."""
    data, _ = small_toy
    root = tmp_path_factory.mktemp("release")
    ds = root / "datasets"
    items = {s: json.loads((data / "R2R" / f"R2R_{s}.json").read_text()) for s in ("train", "val_seen", "val_unseen")}
    pre = ds / "R2R" / "annotations" / "pretrain_map"
    pre.mkdir(parents=True)
    for s, its in items.items():
        write_jsonl(pre / f"R2R_{s}_enc.jsonl", r2r_lines(its))
    write_jsonl(pre / "R2R_prevalent_aug_train_enc.jsonl", r2r_lines(items["train"], with_text=False))
    write_jsonl(pre / "R2R_hm3d_aug_envdrop_generated_enc.jsonl", hm3d_lines(4))
    write_jsonl(pre / "R2R_gibson_aug_envdrop_generated_enc.jsonl", hm3d_lines(2))
    write_json(ds / "R2R" / "annotations" / "R2R_scalevln_ft_aug_enc.json", hm3d_items(2) + r2r_items(items["train"][:2]))
    conn = ds / "R2R" / "connectivity"  # ScaleVLN's: the Matterport3D houses and the generated ones together
    shutil.copytree(data / "connectivity", conn)
    write_hm3d_house(conn)
    feats = ds / "R2R" / "features"
    feats.mkdir()
    write_view_features(feats / "clip_vit-b16_mp3d_hm3d_gibson.hdf5", data, 512, [conn])
    write_view_features(feats / "pth_vit_base_patch16_224_imagenet.hdf5", data, 768, logits=True)
    models = ds / "R2R" / "trained_models"
    (models / "pretrain").mkdir(parents=True)
    (models / "finetune").mkdir()
    write_pretrain_checkpoint(models / "pretrain" / "duet_vit-b16_model_step_140000.pt", "scalevln-r2r")
    write_finetune_checkpoint(models / "finetune" / "duet_vit-b16_ft_best_val_unseen", "scalevln-r2r")

    rev = ds / "REVERIE" / "annotations" / "pretrain"
    rev.mkdir(parents=True)
    for s in ("train", "val_seen", "val_unseen"):
        write_jsonl(rev / f"REVERIE_{s}_enc.jsonl", _reverie_lines(data, s))
    write_jsonl(rev / "REVERIE_speaker_aug_enc.jsonl", _reverie_lines(data, "train"))
    (ds / "REVERIE" / "features").mkdir()
    _write_objects(ds / "REVERIE" / "features" / "obj.avg.top3.min80_vit_base_patch16_224_imagenet.hdf5", data)
    (ds / "REVERIE" / "trained_models").mkdir()
    write_finetune_checkpoint(ds / "REVERIE" / "trained_models" / "best_val_unseen", "duet-reverie")
    rev_pre = write_pretrain_checkpoint(root / "model_step_100000.pt", "duet-reverie")
    return data, ds, rev_pre


def _inputs(recipe: str, release) -> list[str]:
    data, ds, rev_pre = release
    args = [f"inputs.datasets={ds}", f"data_dir={data}"]
    return args + ([f"inputs.teacher_pretrained={rev_pre}"] if recipe == REVERIE_RECIPE else [])


def _base(job) -> Path:
    return repo_root() / job.config


# ----------------------------------------------------------------------------------- plan


@pytest.mark.parametrize("recipe", [R2R_RECIPE, REVERIE_RECIPE])
def test_recipe_resolves_plans_and_passes_the_preflight(recipe, release, tmp_path, capsys):
    """``minivln experiment RECIPE --dry-run`` with the release folder: 6 runs and 6 rows planned, every
    input found and fitting (feature widths, teachers' shapes and tasks); the paper's budgets; the
    students see their teacher's features."""
    out = tmp_path / "exp"
    code, text, err = run_cli(["experiment", recipe, "--out", str(out), "--dry-run", *_inputs(recipe, release)],
                              capsys)
    assert code == 0, err
    assert "pre-flight: 6 runs, 6 rows checked, nothing missing" in text
    r2r = recipe == R2R_RECIPE
    steps, batch = (200_000, 16) if r2r else (20_000, 32)
    rec = load_recipe(recipe, _inputs(recipe, release))
    jobs = {j.name: j for j in plan(rec, out, repo_root())}
    for name, job in jobs.items():
        if not name.startswith("train:"):
            continue
        command = rec.runs[name.split(":", 1)[1]].command
        cfg = load_config(PretrainConfig if command == "pretrain" else FinetuneConfig, _base(job), job.overrides)
        assert (cfg.train.max_steps, cfg.batch_size, cfg.max_instr_len) == (steps, batch, 200), name
        assert cfg.model == ("minivln-scalevln-r2r" if r2r else "minivln-reverie") and not cfg.model_overrides
        assert get_config(cfg.model).image_feat_size == (512 if r2r else 768)
        if command == "finetune" and r2r:
            assert cfg.aug_times == 9 and cfg.aug_files and cfg.connectivity_dirs
        if cfg.teacher:
            teacher = read_agent_config(cfg.teacher)
            assert teacher.image_feat_size == (512 if r2r else 768) and teacher.hidden_size == 768
            assert teacher.use_objects == (not r2r)
    assert {j for j in jobs if j.startswith("score:")} and all("navigate" in j.argv for j in jobs.values()
                                                               if j.name.startswith("score:"))


def test_launcher_starts_the_training_runs_under_torchrun(release, tmp_path, capsys):
    code, text, err = run_cli(["experiment", R2R_RECIPE, "--out", str(tmp_path / "exp"), "--dry-run", "--jobs", "1",
                               "--launcher", "torchrun --standalone --nproc_per_node 4",
                               *_inputs(R2R_RECIPE, release)], capsys)
    assert code == 0, err
    commands = [line.strip() for line in text.splitlines() if "-m minivln.cli" in line]
    train = [c for c in commands if " pretrain " in c or " finetune " in c]
    assert len(train) == 6 and all(c.startswith("torchrun --standalone --nproc_per_node 4 -m minivln.cli ")
                                   for c in train)
    assert all(not c.startswith("torchrun") for c in commands if " navigate " in c)


def test_missing_inputs_and_files_are_named(release, tmp_path, capsys):
    data, ds, _ = release
    code, _, err = run_cli(["experiment", REVERIE_RECIPE, "--out", str(tmp_path / "a"), "--dry-run",
                            f"data_dir={data}"], capsys)
    assert code == 2
    one_error_line(err, "inputs.datasets=PATH", "inputs.teacher_pretrained=PATH")
    code, _, err = run_cli(["experiment", R2R_RECIPE, "--out", str(tmp_path / "b"), "--dry-run", f"data_dir={data}",
                            f"inputs.datasets={ds}", f"inputs.teacher_finetuned={ds}/nowhere"], capsys)
    assert code == 2
    assert f"teacher {ds}/nowhere does not exist (runs ft-both, ft-s2)" in err
    assert f"checkpoint {ds}/nowhere does not exist (row 'teacher')" in err


# ----------------------------------------------------------------------------------- a few iterations


#: what shrinks a recipe's run to a few iterations (the network and its inputs stay the paper's)
SHORT = {"pretrain": ["batch_size=2", "max_instr_len=40", "val_batches=1", "num_workers=0", "num_threads=1",
                      "train.max_steps=2", "train.log_every=1", "train.val_every=0", "train.ckpt_every=2",
                      "train.optim.warmup_steps=1"],
         "finetune": ["batch_size=2", "val_batch_size=4", "max_action_len=3", "max_instr_len=40", "num_threads=1",
                      "val_splits=[val_unseen]", "val_max_episodes=2", "aug_times=1", "train.max_steps=2",
                      "train.log_every=1", "train.val_every=0", "train.ckpt_every=2"]}


@pytest.mark.slow
@pytest.mark.parametrize("recipe,runs", [(R2R_RECIPE, ("pre-kd", "ft-both")),
                                         (REVERIE_RECIPE, ("rev-pre-kd", "rev-ft-both"))])
def test_two_stage_runs_train_at_paper_dimensions(recipe, runs, release, tmp_path, capsys, one_thread):
    """The recipe's two-stage runs as it plans them (stage 1 from the pretraining teacher, stage 2 from the
    fine-tuned one, both at 768 hidden), 2 iterations each at batch 2: the student is the paper's
    (hidden 312, layers 3/1/2) on its teacher's features."""
    out = tmp_path / "exp"
    rec = load_recipe(recipe, _inputs(recipe, release))
    jobs = {j.name: j for j in plan(rec, out, repo_root())}
    for run in runs:
        job = jobs[f"train:{run}"]
        argv = job.argv[job.argv.index("minivln.cli") + 1:]
        argv[argv.index("--config") + 1] = str(_base(job))
        command = rec.runs[run].command
        code, text, err = run_cli(argv + SHORT[command], capsys)
        assert code == 0, err
    student = read_agent_config(out / "runs" / runs[1])
    assert (student.hidden_size, student.num_l_layers, student.num_pano_layers, student.num_x_layers) == (312, 3, 1, 2)
    assert student.image_feat_size == (512 if recipe == R2R_RECIPE else 768)
    assert student.use_objects == (recipe == REVERIE_RECIPE)
    log = [json.loads(line) for line in (out / "runs" / runs[1] / "log.jsonl").read_text().splitlines()]
    assert any(k.startswith("kd/") or "kd_" in k for r in log for k in r), log[:2]


# ----------------------------------------------------------------------------------- the guide's commands


def _commands(page: Path, prefix: str) -> list[str]:
    """The commands of a page's ```bash blocks that start with ``prefix`` (continuation lines joined)."""
    text = page.read_text()
    commands = []
    for block in text.split("```bash\n")[1:]:
        body = block.split("```", 1)[0].replace("\\\n", " ")
        for line in body.splitlines():
            for part in line.split("&&"):
                part = part.split("  #", 1)[0].strip()
                if part.startswith(prefix):
                    commands.append(part)
    return commands


def test_the_guides_experiment_commands_plan(release, tmp_path, capsys, monkeypatch):
    """Every paper-scale ``minivln experiment`` command of docs/guide-gpu.md and the README, with the release folder
    and teachers where they say, plans and passes the pre-flight as a dry run."""
    data, ds, rev_pre = release
    monkeypatch.setenv("DATASETS", str(ds))
    monkeypatch.setenv("DUET_DATASETS", str(ds))
    monkeypatch.setenv("TEACHER_PRE", str(rev_pre))
    monkeypatch.setenv("MINIVLN_DATA", str(data))
    checked = 0
    for page in (repo_root() / "docs" / "guide-gpu.md", repo_root() / "README.md"):
        for n, cmd in enumerate(_commands(page, "minivln experiment")):
            if R2R_RECIPE not in cmd and REVERIE_RECIPE not in cmd:
                continue  # the README's other recipes: CPU scale, other files
            args = shlex.split(os.path.expandvars(cmd.replace("~/ScaleVLN/VLN-DUET/datasets", str(ds))))[1:]
            args[args.index("--out") + 1] = str(tmp_path / f"{page.stem}{n}")
            code, text, err = run_cli(args + ([] if "--dry-run" in args else ["--dry-run"]), capsys)
            assert code == 0, (page.name, cmd, err)
            assert "nothing missing" in text
            checked += 1
    assert checked >= 5


def test_gpu_slots_run_training_side_by_side_one_slot_each(tmp_path, capsys):
    """``--gpus 0,1``: at most two training runs at a time, each seeing only its own GPU; a freed slot
    goes to the next run; scorings take none."""
    record = tmp_path / "seen"
    record.mkdir()
    script = ("import os, sys, time, pathlib; p = pathlib.Path(sys.argv[1]); "
              "p.write_text(os.environ.get('CUDA_VISIBLE_DEVICES', '-') + ' ' + str(time.time())); time.sleep(1.0); "
              "p.write_text(p.read_text() + ' ' + str(time.time()))")
    jobs = [Job(f"train:{n}", deps, [sys.executable, "-c", script, str(record / n)], spec=n)
            for n, deps in (("a", []), ("b", []), ("c", []))]
    jobs.append(Job("score:a", ["train:a"], [sys.executable, "-c", script, str(record / "score")], spec="s"))
    assert execute(jobs, tmp_path / "exp", tmp_path, "abc", max_jobs=4, threads=1, gpus=parse_gpus("0,1"))
    seen = {n: (lambda f: (f[0], float(f[1]), float(f[2])))(
        (record / n).read_text().split()) for n in ("a", "b", "c", "score")}
    assert {seen["a"][0], seen["b"][0]} == {"0", "1"} and seen["c"][0] in ("0", "1") and seen["score"][0] == "-"
    first = min(("a", "b"), key=lambda n: seen[n][2])  # c started after a slot was freed
    assert seen["c"][1] >= seen[first][2] - 0.05
    assert parse_gpus("0+1,2+3") == ["0,1", "2,3"]
    with pytest.raises(ConfigError, match="--gpus"):
        parse_gpus("0;1")
