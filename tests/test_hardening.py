"""Bad input and a hostile environment, tried as a new user would: every fault is one line
``minivln: error: ...`` naming the file and the cause, exit status 2, nothing overwritten.

* a full disk: a tiny tmpfs where mounting is allowed (a real ENOSPC; skipped with the reason
  otherwise), and an ENOSPC injected at the write (monkeypatch) everywhere;
* a read-only directory: a read-only tmpfs where mounting is allowed, and an injected EROFS (the
  tests run as root, which ignores mode bits);
* truncated and garbage checkpoints, a checkpoint of another shape;
* unknown presets, invalid YAML, an output that is an input, a feature file lacking viewpoints;
* resuming from the run directory alone (its saved config), with and without changes.

Tiny models (hidden 16, one layer each) on the 3-house toy world of ``conftest.small_toy``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torch
import yaml
from cli_checks import finetune_args as _finetune_args
from cli_checks import one_error_line as _one_error_line
from cli_checks import run_cli as _run
from cli_checks import tmpfs as _tmpfs
from conftest import SMALL_DUET as SMALL
from safetensors.torch import load_file

import minivln
import minivln.features.hdf5 as hdf5_mod
import minivln.paths as paths_mod
import minivln.training.checkpoint as ckpt_mod
from minivln.cli import main as cli_main
from minivln.config import ConfigError, load_config, load_run_config
from minivln.features.hdf5 import FeatureStore, FeatureWriter
from minivln.model.checkpoint import CheckpointError, load_weights, save_pretrained
from minivln.model.registry import create_model
from minivln.training.finetune import FinetuneConfig
from minivln.training.logging import read_jsonl


@pytest.fixture(scope="module")
def trained(small_toy, tmp_path_factory, one_thread):
    """A finished 2-step fine-tuning run (read-only for the tests: they copy it to change it)."""
    data, feats = small_toy
    run = tmp_path_factory.mktemp("trained") / "run"
    assert cli_main(["finetune", "--out", str(run), *_finetune_args(data, feats)]) == 0
    return run


# ----------------------------------------------------------------------------------- file systems


@pytest.fixture
def full_dir(tmp_path):
    """A 1 MB file system: real ENOSPC."""
    with _tmpfs(tmp_path / "full", "size=1m") as d:
        yield d


@pytest.fixture
def readonly_dir(tmp_path):
    """A read-only file system: real EROFS (root ignores mode bits, not a read-only mount)."""
    with _tmpfs(tmp_path / "ro", "ro,size=1m") as d:
        yield d


@pytest.fixture(scope="module")
def standin_resources(small_toy):
    from minivln.features.standin import Resources

    return Resources(small_toy[0])


# ------------------------------------------------------------------------------------- disk full


def test_features_build_refuses_a_file_that_will_not_fit(small_toy, full_dir, capsys):
    data, _ = small_toy
    out = full_dir / "views.h5"
    out.write_bytes(b"previous output")
    code, _, err = _run(["features", "build", "--data-dir", str(data), "--out", str(out), "--no-progress"], capsys)
    assert code == 2
    _one_error_line(err, str(out), "need about", "MB left")
    assert out.read_bytes() == b"previous output" and sorted(p.name for p in full_dir.iterdir()) == ["views.h5"]


def test_features_build_disk_full_while_writing(small_toy, full_dir, standin_resources, monkeypatch):
    """The disk fills up mid-build (the size check passed): one error, no temporary file, no crash."""
    from minivln.features.standin import build_standin

    monkeypatch.setattr(FeatureWriter, "estimate_bytes", staticmethod(lambda *a, **k: 1))
    out = full_dir / "views.h5"
    out.write_bytes(b"previous output")
    with pytest.raises(paths_mod.WriteError) as info:
        build_standin(small_toy[0], out, res=standin_resources)
    msg = str(info.value)
    assert "\n" not in msg and str(out) in msg and "no space left on device" in msg and "left)" in msg
    assert out.read_bytes() == b"previous output" and sorted(p.name for p in full_dir.iterdir()) == ["views.h5"]


class _FillsUp:
    """A file object that takes ``room`` bytes, then fails with ENOSPC (an injected full disk)."""

    def __init__(self, f, room: int):
        self._f, self.room = f, room

    def write(self, data) -> int:
        n = len(memoryview(data).cast("B"))
        if self._f.tell() + n > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)


def test_feature_writer_injected_enospc(tmp_path, monkeypatch):
    real_init = hdf5_mod._GuardedFile.__init__

    def init(self, path):
        real_init(self, path)
        self._f = _FillsUp(self._f, 200_000)

    monkeypatch.setattr(hdf5_mod._GuardedFile, "__init__", init)
    out = tmp_path / "feats.h5"
    out.write_bytes(b"previous output")
    w = FeatureWriter(out, dim=768, standin=True, description="x", dtype="float32", expected_bytes=10**7)
    with pytest.raises(paths_mod.WriteError, match=r"no space left on device \(it needs about 10 MB, .* left\)"):
        for i in range(20):
            w.add("scan", f"vp{i}", torch.zeros(36, 768).numpy())
        w.close()
    assert out.read_bytes() == b"previous output" and sorted(p.name for p in tmp_path.iterdir()) == ["feats.h5"]


def test_a_failed_checkpoint_save_is_one_line_and_keeps_the_last_one(small_toy, tmp_path, monkeypatch, capsys,
                                                                        one_thread):
    data, feats = small_toy
    real_save = ckpt_mod.save_file
    calls = {"n": 0}

    def fills_up(tensors, path):  # the disk is full at the second checkpoint
        calls["n"] += 1
        if calls["n"] >= 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_save(tensors, path)

    monkeypatch.setattr(ckpt_mod, "save_file", fills_up)
    run = tmp_path / "run"
    code, _, err = _run(["finetune", "--out", str(run), *_finetune_args(data, feats, steps=3),
                         "train.best_metric="], capsys)
    assert code == 2
    _one_error_line(err, f"cannot write checkpoint {run / 'latest'}", "no space left on device",
                    "previous checkpoint (step 1) is kept")
    assert ckpt_mod.read_meta(run / "latest")["step"] == 1 and not (run / ".latest.tmp").exists()


def test_a_run_that_cannot_hold_its_checkpoints_stops_before_training(small_toy, full_dir, capsys):
    data, feats = small_toy
    run = full_dir / "run"
    code, _, err = _run(["finetune", "--out", str(run), *_finetune_args(data, feats)], capsys)
    assert code == 2
    _one_error_line(err, str(run), "checkpoints", "need about", "left")
    assert not (run / "log.jsonl").exists()


# ------------------------------------------------------------------------------------- read-only


def _commands(data, feats, trained: Path, out_dir: Path) -> dict[str, list[str]]:
    sub = trained / "submissions" / "val_unseen_step2.json"
    return {
        "eval": ["eval", "--task", "r2r", "--split", "val_unseen", "--data-dir", str(data), "--preds", str(sub),
                 "--out", str(out_dir / "metrics.json")],
        "finetune": ["finetune", "--out", str(out_dir / "run"), *_finetune_args(data, feats)],
        "navigate": ["navigate", "--checkpoint", str(trained), "--split", "val_unseen", "--out", str(out_dir / "nav")],
        "plot": ["plot", str(trained), "--out", str(out_dir / "curves.png")],
        "features build": ["features", "build", "--data-dir", str(data), "--out", str(out_dir / "v.h5"),
                           "--no-progress"],
        "toy build": ["toy", "build", "--out", str(out_dir / "toy")],
        "experiment": ["experiment", "r2r-table3", f"features={feats}", "--out", str(out_dir / "exp")],
    }


@pytest.mark.parametrize("command", ["eval", "finetune", "navigate", "plot", "features build", "toy build",
                                     "experiment"])
def test_read_only_output_is_one_line(command, small_toy, trained, readonly_dir, capsys):
    data, feats = small_toy
    code, _, err = _run(_commands(data, feats, trained, readonly_dir)[command], capsys)
    assert code == 2
    _one_error_line(err, str(readonly_dir), "read-only file system")


def _erofs(*args, **kwargs):
    raise OSError(errno.EROFS, "Read-only file system")


@pytest.mark.parametrize("command", ["eval", "finetune", "navigate", "plot", "features build", "experiment"])
def test_injected_read_only_output_is_one_line_before_any_work(command, small_toy, trained, tmp_path,
                                                                monkeypatch, capsys):
    data, feats = small_toy
    monkeypatch.setattr(paths_mod.tempfile, "mkstemp", _erofs)  # the probe of check_writable_dir
    code, _, err = _run(_commands(data, feats, trained, tmp_path)[command], capsys)
    assert code == 2
    _one_error_line(err, "read-only file system", str(tmp_path))
    assert not list(tmp_path.rglob("log.jsonl")) and not list(tmp_path.rglob("*.json"))


def test_atomic_write_failure_names_the_file(tmp_path, monkeypatch):
    target = tmp_path / "x.json"
    target.write_text("old")
    monkeypatch.setattr(paths_mod.os, "replace", _erofs)
    with pytest.raises(paths_mod.WriteError, match=r"cannot write .*x.json: read-only file system"):
        paths_mod.atomic_write_text(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["x.json"]


# ------------------------------------------------------------------------------------- checkpoints


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncated" else b"not a checkpoint" * 64)


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_damaged_weights_name_the_file(how, small_toy, trained, tmp_path, capsys):
    data, feats = small_toy
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    weights = run / "model" / "model.safetensors"
    _damage(weights, how)
    args = {
        "navigate": ["navigate", "--checkpoint", str(run), "--split", "val_unseen", "--out", str(tmp_path / "nav")],
        "teacher": ["finetune", "--out", str(tmp_path / "t"), *_finetune_args(data, feats), f"teacher={run}"],
        "init_checkpoint": ["finetune", "--out", str(tmp_path / "i"), *_finetune_args(data, feats),
                            f"init_checkpoint={run / 'model'}"],
        "pretrain init": ["pretrain", "--out", str(tmp_path / "p"), "model=duet-cpu",
                          f"model_overrides={json.dumps(SMALL)}", f"data_dir={data}", f"features={feats}",
                          f"init_checkpoint={weights}"],
    }
    for name, argv in args.items():
        code, _, err = _run(argv, capsys)
        assert code == 2, name
        _one_error_line(err, str(weights), "not a valid safetensors file")
    for new in ("nav", "t", "i", "p"):  # nothing was done
        assert not list((tmp_path / new).rglob("*.json*"))


@pytest.mark.parametrize("damaged", ["trainer.pt", "model.safetensors", "meta.json"])
def test_resume_from_a_damaged_latest_names_the_file(damaged, trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    _damage(run / "latest" / damaged, "truncated")
    before = (run / "log.jsonl").read_text()
    code, _, err = _run(["finetune", "--out", str(run), "--resume", "train.max_steps=4"], capsys)
    assert code == 2
    _one_error_line(err, f"cannot resume {run}", str(run / "latest" / damaged), "truncated or corrupt"
                    if damaged != "model.safetensors" else "not a valid safetensors file")
    assert (run / "log.jsonl").read_text() == before


def test_a_checkpoint_of_another_shape_is_summarised(trained, tmp_path):
    bigger = create_model("duet-cpu", **{**SMALL, "hidden_size": 32, "intermediate_size": 64, "num_l_layers": 2})
    with pytest.raises(CheckpointError) as info:
        load_weights(bigger, trained / "model")
    msg = str(info.value)
    assert "\n" not in msg and str(trained / "model") in msg
    assert "likely cause, checkpoint vs model: hidden 16 vs 32, FFN 32 vs 64, text layers 1 vs 2" in msg
    assert f"{len(info.value.missing)} missing" in msg and "more)" in msg and len(msg) < 1000
    assert len(info.value.mismatched) > 100  # every problem is still there, for whoever wants them
    assert info.value.details().count("\n") == len(info.value.missing) + len(info.value.mismatched) - 1


def test_wrong_teacher_shape_on_the_command_line_is_one_line(small_toy, tmp_path, capsys):
    data, feats = small_toy
    torch.manual_seed(0)
    ckpt = save_pretrained(create_model("duet-cpu", **{**SMALL, "hidden_size": 32}), tmp_path / "m32")
    code, _, err = _run(["finetune", "--out", str(tmp_path / "run"), *_finetune_args(data, feats),
                         f"init_checkpoint={ckpt}"], capsys)
    assert code == 2
    _one_error_line(err, str(ckpt), "hidden 32 vs 16", "shape mismatches")


# ------------------------------------------------------------------------------------- configs


def test_unknown_preset_suggests_the_nearest(small_toy, tmp_path, capsys):
    data, feats = small_toy
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: duet-cpuu\n")
    for cmd in ("finetune", "pretrain"):
        for argv in (["--config", str(cfg)], ["model=duet-cpuu"]):
            code, _, err = _run([cmd, "--out", str(tmp_path / cmd), *argv, f"data_dir={data}",
                                 f"features={feats}"], capsys)
            assert code == 2
            _one_error_line(err, "unknown model preset 'duet-cpuu'", "did you mean 'duet-cpu'")
            assert not (tmp_path / cmd).exists()
    code, _, err = _run(["finetune", "--out", str(tmp_path / "x"), f"data_dir={data}", f"features={feats}",
                         "model=duet-cpu", "model_overrides={hiden_size: 8}"], capsys)
    assert code == 2
    _one_error_line(err, "'hiden_size'", "did you mean 'hidden_size'")


def test_invalid_yaml_is_one_line_with_line_and_column(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: duet-cpu\ntrain:\n  max_steps: [1, 2\n  lr: 3\n")
    for argv in (["finetune", "--config", str(bad), "--out", str(tmp_path / "r")],
                 ["pretrain", "--config", str(bad), "--out", str(tmp_path / "r")],
                 ["experiment", str(bad), "--out", str(tmp_path / "e")]):
        code, _, err = _run(argv, capsys)
        assert code == 2
        _one_error_line(err, f"{bad}:4:5: invalid YAML")
    with pytest.raises(ConfigError, match=r"train.max_steps: '\[1,' is not a valid YAML value"):
        load_config(FinetuneConfig, None, ["train.max_steps=[1,"])
    (tmp_path / "c.yaml").write_text("train: {max_step: 3}\n")
    unknown = r"c.yaml: unknown config key\(s\) train.max_step \(did you mean train.max_steps\?\)"
    with pytest.raises(ConfigError, match=unknown):
        load_config(FinetuneConfig, tmp_path / "c.yaml")


def test_eval_refuses_to_write_over_its_input(small_toy, trained, tmp_path, capsys):
    data, _ = small_toy
    sub = tmp_path / "sub.json"
    shutil.copy(trained / "submissions" / "val_unseen_step2.json", sub)
    before = sub.read_bytes()
    for out in (sub, tmp_path / "." / "sub.json"):
        code, _, err = _run(["eval", "--task", "r2r", "--split", "val_unseen", "--data-dir", str(data),
                             "--preds", str(sub), "--out", str(out)], capsys)
        assert code == 2
        _one_error_line(err, "would overwrite --preds")
    # the per-episode file beside --out would be the input too
    side = tmp_path / "m.per_episode.json"
    shutil.copy(sub, side)
    code, _, err = _run(["eval", "--task", "r2r", "--split", "val_unseen", "--data-dir", str(data),
                         "--preds", str(side), "--out", str(tmp_path / "m.json")], capsys)
    assert code == 2 and "would overwrite --preds" in err
    assert sub.read_bytes() == before == side.read_bytes()
    code, _, err = _run(["plot", str(trained), "--out", str(trained / "log.jsonl")], capsys)
    assert code == 2 and "would overwrite the run's log" in err


def test_features_missing_for_a_split_fail_before_training(small_toy, tmp_path, capsys):
    data, feats = small_toy
    partial = tmp_path / "partial.h5"
    src = FeatureStore(feats)
    keys = sorted(src.keys())
    dropped = keys[::5]
    with FeatureWriter(partial, dim=16, standin=True, description="partial", dtype="float32") as w:
        for key in keys:
            if key not in dropped:
                scan, vp = key.split("_", 1)
                w.add(scan, vp, src.get(scan, vp))
    for argv in (["finetune", "--out", str(tmp_path / "ft"), *_finetune_args(data, partial)],
                 ["pretrain", "--out", str(tmp_path / "pt"), "model=duet-cpu", f"model_overrides={json.dumps(SMALL)}",
                  f"data_dir={data}", f"features={partial}"]):
        code, _, err = _run(argv, capsys)
        assert code == 2
        line = _one_error_line(err, str(partial), "lacks features for", "the r2r train split", "first missing: ")
        n = int(line.split("lacks features for ")[1].split(" ")[0])
        assert 0 < n <= len(dropped)
        assert not list(tmp_path.rglob("log.jsonl"))


# ------------------------------------------------------------------------------------- resume


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "latest" / "model.safetensors")


def test_resume_needs_only_the_run_directory_and_is_bit_identical(small_toy, tmp_path, capsys, one_thread):
    data, feats = small_toy
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert cli_main(["finetune", "--out", str(straight), *_finetune_args(data, feats, steps=3)]) == 0
    assert cli_main(["finetune", "--out", str(resumed), *_finetune_args(data, feats, steps=2)]) == 0
    # the run directory alone, extended by one step: the change is named in one line
    with pytest.warns(UserWarning, match="max_steps differ"):  # the trainer's word on the schedule
        code, out, _ = _run(["finetune", "--out", str(resumed), "--resume", "train.max_steps=3"], capsys)
    assert code == 0
    notes = [line for line in out.splitlines() if line.startswith("resuming")]
    assert notes == [f"resuming {resumed} with changes to its saved config {resumed / 'config.yaml'}: "
                     "train.max_steps 2 -> 3"]
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in read_jsonl(resumed / "log.jsonl") if r.get("kind") == "train"]
    assert steps == [1, 2, 3]
    assert yaml.safe_load((resumed / "config.yaml").read_text())["train"]["max_steps"] == 3
    # resuming a finished run with nothing changed: no note, nothing trained
    code, out, _ = _run(["finetune", "--out", str(resumed), "--resume"], capsys)
    assert code == 0 and "resuming" not in out
    assert all(torch.equal(b[k], v) for k, v in _weights(resumed).items())


def test_resume_with_the_config_and_overrides_again(small_toy, tmp_path, capsys, one_thread):
    """As the experiment runner does: the same --config and overrides are no change; a --config that
    disagrees with the saved run (the original overrides left out) is refused, not silently applied."""
    data, feats = small_toy
    args = [a for a in _finetune_args(data, feats) if not a.startswith("train.max_steps")]
    original = ["train.max_steps=2", "train.optim.lr=0.001"]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"train": {"max_steps": 130, "optim": {"lr": 0.5}}}))
    run = tmp_path / "run"
    assert cli_main(["finetune", "--config", str(cfg), "--out", str(run), *args, *original]) == 0
    code, out, _ = _run(["finetune", "--config", str(cfg), "--out", str(run), "--resume", *args, *original], capsys)
    assert code == 0 and "resuming" not in out
    code, _, err = _run(["finetune", "--config", str(cfg), "--out", str(run), "--resume", *args], capsys)
    assert code == 2
    _one_error_line(err, f"cannot resume {run}", "train.max_steps: 2 in the run, 130 in", "train.optim.lr: 0.001")
    # a value changed explicitly is applied and named
    cfg_changed, note = load_run_config(FinetuneConfig, run, cfg, [*args, "train.max_steps=2",
                                                                  "train.optim.lr=0.002"], resume=True)
    assert cfg_changed.train.optim.lr == 0.002 and note.endswith("train.optim.lr 0.001 -> 0.002")
    # a directory that never started cannot be resumed without a config
    with pytest.raises(ConfigError, match="config.yaml does not exist"):
        load_run_config(FinetuneConfig, tmp_path / "nowhere", None, [], resume=True)


def test_pretrain_resumes_from_the_run_directory(small_toy, tmp_path, capsys, one_thread):
    data, feats = small_toy
    run = tmp_path / "pt"
    args = ["model=duet-cpu", f"model_overrides={json.dumps(SMALL)}", f"data_dir={data}", f"features={feats}",
            "batch_size=2", "max_instr_len=40", "val_batches=0", "num_threads=1", "train.max_steps=1",
            "train.progress=false"]
    assert cli_main(["pretrain", "--out", str(run), *args]) == 0
    with pytest.warns(UserWarning, match="max_steps differ"):
        code, out, err = _run(["pretrain", "--out", str(run), "--resume", "train.max_steps=2"], capsys)
    assert code == 0, err
    assert "train.max_steps 1 -> 2" in out
    assert [r["step"] for r in read_jsonl(run / "log.jsonl") if r.get("kind") == "train"][-1] == 2


# ------------------------------------------------------------------------------------- output


def test_finetune_and_navigate_print_a_labelled_summary(small_toy, trained, tmp_path, capsys):
    data, feats = small_toy
    code, out, _ = _run(["finetune", "--out", str(trained), "--resume"], capsys)  # finished: summary only
    assert code == 0
    assert not any(line.startswith("{") for line in out.splitlines())  # no bare JSON
    assert "val_unseen (2 episodes, STAND-IN features)" in out and "SR " in out and "SPL " in out
    assert re.search(r"random walker \(val_unseen, \d+ episodes\): SR ", out)
    legend = [line for line in out.splitlines() if "SR = success rate" in line]
    assert len(legend) == 1
    labels = re.findall(r"(?:^\(|, )([A-Za-z]+) = ", legend[0])
    assert labels[:2] == ["SR", "SPL"] and len(labels) == len(set(labels))  # each spelled out once
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["features"] == "stand-in" and "sr" in metrics and "spl" in metrics["random"]
    code, out, _ = _run(["navigate", "--checkpoint", str(trained), "--split", "val_unseen",
                         "--out", str(tmp_path / "nav")], capsys)
    assert code == 0
    assert re.search(r"^val_unseen \(\d+ episodes, STAND-IN features\): SR \d", out, re.M)
    assert "SPL = success weighted by path length" in out
    assert json.loads((tmp_path / "nav" / "metrics_val_unseen.json").read_text())["features"] == "stand-in"


def test_experiment_bad_input_is_one_line(tmp_path, capsys):
    code, _, err = _run(["experiment", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "e")], capsys)
    assert code == 2
    _one_error_line(err, "recipe", "nope.yaml", "not found")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "pin.json").write_text('{"commit": ')
    code, _, err = _run(["experiment", "r2r-table3", "features=x.h5", "--out", str(tmp_path / "e"), "--dry-run"],
                        capsys)
    assert code == 2
    _one_error_line(err, "pin.json", "truncated or corrupt")


def test_warnings_are_one_line(small_toy, tmp_path):
    data, feats = small_toy
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"train": {"max_steps": 1}}))
    argv = ["finetune", "--config", str(cfg), "--out", str(tmp_path / "run"), "--resume",
            *[a for a in _finetune_args(data, feats) if not a.startswith("train.max_steps")]]
    repo = Path(minivln.__file__).resolve().parents[1]  # the code under test
    res = subprocess.run([sys.executable, "-m", "minivln.cli", *argv], capture_output=True, text=True, cwd=repo,
                         env={**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"})
    code, err = res.returncode, res.stderr
    assert code == 0, err
    warning = [line for line in err.splitlines() if "warning" in line]
    assert warning == [f"minivln: warning: resume: no checkpoint in {tmp_path / 'run'}; starting from step 0"]


def test_h5_files_written_through_the_guard_read_back(tmp_path):
    out = tmp_path / "f.h5"
    with FeatureWriter(out, dim=16, standin=False, description="d", class_layout="separate",
                       class_names=[f"c{i}" for i in range(1000)], dtype="float32") as w:
        w.add("s", "v", torch.ones(36, 16).numpy(), torch.full((36, 1000), 1e-3).numpy())
    with h5py.File(out) as f:
        assert f["s_v"].shape == (36, 16) and f["class_probs/s_v"].shape == (36, 1000)
    store = FeatureStore(out)
    assert store.get("s", "v").sum() == 36 * 16 and store.classes("s", "v").shape == (36, 1000)
    store.require(["s_v"], "x")
    with pytest.raises(hdf5_mod.MissingFeatureError, match=r"lacks features for 1 of the 2 viewpoints that x"):
        store.require(["s_v", "s_w"], "x")
