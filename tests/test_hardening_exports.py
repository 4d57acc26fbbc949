"""Hardening, second round (issue 22), in the style of ``test_hardening.py``: every fault is one line
``minivln: error: ...`` naming the file, exit status 2, nothing overwritten.

* atomic exports: ``minivln export`` builds the whole directory beside the target and swaps it in;
  a crash at any point (an exception, or a kill: nothing cleaned up) leaves the old complete export or
  the new one, repaired by the next read or export; a full disk keeps the old export; a refused
  pre-check leaves nothing; the runtime refuses a directory whose files do not match its manifest
  (sizes and SHA-256), and a truncated or empty graph is one line;
* ``minivln features build`` removes the temporaries that a killed build of its target left;
* a teacher that cannot teach the student (another task, feature width, or a layer map that does
  not divide) is one ConfigError line, before any training step.

Tiny models (hidden 16, one layer each) on the 3-house toy world of ``conftest.small_toy``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_checks import one_error_line as _one_error_line
from cli_checks import run_cli as _run
from cli_checks import tmpfs as _tmpfs
from conftest import SMALL_DUET as SMALL

import minivln
import minivln.paths as paths_mod
from minivln.cli import main as cli_main
from minivln.config import ConfigError
from minivln.distill.compat import check_teacher
from minivln.model.checkpoint import save_pretrained
from minivln.model.registry import create_model, get_config

REPO = Path(minivln.__file__).resolve().parents[1]


def _dead_pid() -> int:
    """The id of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}


# ===================================================================================== atomic exports


@pytest.fixture(scope="module")
def models(tmp_path_factory, one_thread):
    """Two tiny students A and B (other weights), saved as checkpoints ``A/`` and ``B/``."""
    pytest.importorskip("onnx", reason="onnx not installed (optional extra: pip install -e '.[deploy]')")
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed (optional extra)")
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for seed, name in enumerate("AB"):
        torch.manual_seed(seed)
        model = create_model("duet-cpu", **SMALL).eval()
        save_pretrained(model, root / name)
        out[name] = model
    return out, root


def _export(model, out: Path, source: str, **kw):
    from minivln.deploy.export import export_model

    return export_model(model, out, source=source, check=False, **kw)


def _siblings(out: Path) -> list[str]:
    """Whatever an export of ``out`` left beside it (temporaries, a parked old export)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _which_export(out: Path) -> str:
    """The source ('A' or 'B') of the complete, self-consistent export at ``out`` (both variants load,
    the weights match the manifest)."""
    from minivln.deploy.format import verify_files
    from minivln.deploy.runtime import OnnxRuntimeDUET, read_manifest

    manifest = read_manifest(out)
    for variant in ("fp32", "int8"):
        OnnxRuntimeDUET(out, variant, threads=1)
    verify_files(out, manifest, ["config.json", "model.safetensors"])
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "export.json", "fp32", "int8",
                                                      "model.safetensors"]
    return manifest["source"]


class _Killed(BaseException):
    """Stands for the process dying at that point."""


def _crash_at(point: str, out: Path, monkeypatch) -> None:
    """Make the export raise :class:`_Killed` at ``point``."""
    import minivln.deploy.export as export_mod

    def nth(func, n, *, when=lambda *a, **k: True):
        calls = {"n": 0}

        def wrapper(*args, **kwargs):
            if when(*args, **kwargs):
                calls["n"] += 1
                if calls["n"] == n:
                    raise _Killed(point)
            return func(*args, **kwargs)
        return wrapper

    if point == "graph":  # the third fp32 graph (panorama)
        monkeypatch.setattr(export_mod, "_export_graph", nth(export_mod._export_graph, 3))
    elif point == "quantize":  # the last int8 graph
        monkeypatch.setattr(export_mod, "quantize_int8", nth(export_mod.quantize_int8, 4))
    elif point == "weights":
        monkeypatch.setattr(export_mod, "save_pretrained", nth(export_mod.save_pretrained, 1))
    elif point == "manifest":
        monkeypatch.setattr(export_mod, "atomic_write_text", nth(export_mod.atomic_write_text, 1))
    elif point == "park":  # the first rename: the old export -> .E.old
        monkeypatch.setattr(paths_mod, "_rename", nth(paths_mod._rename, 1))
    elif point == "between":  # the second: the new one -> E (the old one is parked, E is missing)
        monkeypatch.setattr(paths_mod, "_rename", nth(paths_mod._rename, 2))
    elif point == "tidy":  # deleting the parked old export, the new one in place
        monkeypatch.setattr(paths_mod, "remove_path", nth(
            paths_mod.remove_path, 1, when=lambda p: Path(p).name == f".{out.name}.old" and out.exists()))
    else:
        raise AssertionError(point)


CRASH_POINTS = ("weights", "graph", "quantize", "manifest", "park", "between", "tidy")


@pytest.mark.parametrize("killed", [False, True], ids=["exception", "killed"])
@pytest.mark.parametrize("point", CRASH_POINTS)
def test_export_crash_at_any_point_leaves_the_old_or_the_new_export(point, killed, models, tmp_path, monkeypatch):
    """``export A --out E``, then ``export B --out E --overwrite`` dies at ``point``: E is A's complete
    export (B's once B's is in place), never a mixture; with a kill (nothing cleaned up) the next
    read repairs a swap cut short and the next export removes the temporaries."""
    import minivln.deploy.export as export_mod
    from minivln.deploy.runtime import is_export_dir

    nets, _ = models
    out = tmp_path / "E"
    _export(nets["A"], out, "A")
    with monkeypatch.context() as m:
        _crash_at(point, out, m)
        if killed:  # a killed process runs no clean-up
            m.setattr(export_mod, "_after_failure", lambda staging, out: None)
        with pytest.raises(_Killed):
            _export(nets["B"], out, "B", overwrite=True)
    expected = "B" if point == "tidy" else "A"
    if not killed:
        assert _siblings(out) == [], "an interrupted export cleans up after itself"
    assert is_export_dir(out)  # a read: repairs a swap cut short between its renames
    assert _which_export(out) == expected
    # the next export removes whatever the killed one left, and the same command works
    _export(nets["B"], out, "B", overwrite=True)
    assert _which_export(out) == "B" and _siblings(out) == []


def test_export_killed_between_the_renames_in_a_real_process(models, tmp_path):
    """A real process dies (``os._exit``, no clean-up) between the two renames: E is missing, the old
    export is parked; ``navigate``'s read puts it back, the next export removes the dead process's
    temporary."""
    from minivln.deploy.runtime import is_export_dir

    nets, root = models
    out = tmp_path / "E"
    _export(nets["A"], out, "A")
    script = f"""
import os, torch
import minivln.paths as p
from minivln.deploy.export import export_model
from minivln.model.checkpoint import load_agent_model
torch.set_num_threads(1)
real, calls = p._rename, []
def rename(src, dst):
    calls.append(dst)
    if len(calls) == 2:
        os._exit(9)
    real(src, dst)
p._rename = rename
export_model(load_agent_model({str(root / "B")!r}), {str(out)!r}, source="B", check=False, overwrite=True)
"""
    res = subprocess.run([sys.executable, "-c", script], env=_subprocess_env(), capture_output=True, text=True)
    assert res.returncode == 9, res.stderr
    left = _siblings(out)
    assert not out.exists() and f".{out.name}.old" in left and any(".tmp" in n for n in left), left
    assert is_export_dir(out) and _which_export(out) == "A"
    _export(nets["B"], out, "B", overwrite=True)
    assert _which_export(out) == "B" and _siblings(out) == []


def test_export_disk_full_keeps_the_old_export_and_the_command_works_again(models, tmp_path, monkeypatch, capsys):
    """An ENOSPC while a graph is written (injected: the file is half written, then the write fails):
    one line naming E and the cause, E is A's export, no temporary; once there is room, the same
    command works (it is not refused for a half-written directory)."""
    import minivln.deploy.export as export_mod

    _, root = models
    out = tmp_path / "E"
    assert cli_main(["export", str(root / "A"), "--out", str(out), "--no-check"]) == 0
    real = export_mod._export_graph

    def fills_up(module, mode, args, path):
        real(module, mode, args, path)
        if mode == "panorama":
            with open(path, "r+b") as f:
                f.truncate(path.stat().st_size // 2)
            raise OSError(errno.ENOSPC, "No space left on device")

    argv = ["export", str(root / "B"), "--out", str(out), "--overwrite", "--no-check"]
    with monkeypatch.context() as m:
        m.setattr(export_mod, "_export_graph", fills_up)
        code, _, err = _run(argv, capsys)
    assert code == 2
    _one_error_line(err, f"cannot export to {out}", "no space left on device", "the previous export is kept")
    assert _which_export(out) == str(root / "A") and _siblings(out) == []
    code, _, err = _run(argv, capsys)
    assert code == 0, err
    assert _which_export(out) == str(root / "B") and _siblings(out) == []


def test_export_on_a_really_full_disk(models, tmp_path, capsys):
    """A 10 MB tmpfs holds one export (about 6.5 MB) but not a second beside it: the overwrite fails
    with one line, the first export stays whole, nothing else is left."""
    _, root = models
    with _tmpfs(tmp_path / "small", "size=10m") as d:
        out = d / "E"
        assert cli_main(["export", str(root / "A"), "--out", str(out), "--no-check"]) == 0
        code, _, err = _run(["export", str(root / "B"), "--out", str(out), "--overwrite", "--no-check"], capsys)
        assert code == 2
        _one_error_line(err, f"cannot export to {out}", "no space left on device", "the previous export is kept")
        assert _which_export(out) == str(root / "A") and _siblings(out) == []


def test_a_refused_export_leaves_nothing_behind(models, tmp_path, capsys):
    from minivln.deploy.export import export_model
    from minivln.model.tensor_modes import UnsupportedModelError

    nets, root = models
    new = tmp_path / "new" / "E"
    code, _, err = _run(["export", str(tmp_path / "missing"), "--out", str(new)], capsys)
    assert code == 2 and "Traceback" not in err and not (tmp_path / "new").exists()
    with pytest.raises(UnsupportedModelError):
        export_model(torch.nn.Linear(2, 2), new)
    assert not (tmp_path / "new").exists()
    # a directory holding anything an export does not write is never replaced, even with --overwrite
    foreign = tmp_path / "run"
    foreign.mkdir()
    (foreign / "log.jsonl").write_text("precious\n")
    for extra in ([], ["--overwrite"]):
        code, _, err = _run(["export", str(root / "A"), "--out", str(foreign), *extra], capsys)
        assert code == 2
        _one_error_line(err, str(foreign), "log.jsonl", "not an export directory")
        assert sorted(p.name for p in foreign.iterdir()) == ["log.jsonl"] and _siblings(foreign) == []
    # an export without --overwrite, a file
    out = tmp_path / "E"
    assert cli_main(["export", str(root / "A"), "--out", str(out), "--no-check"]) == 0
    code, _, err = _run(["export", str(root / "B"), "--out", str(out)], capsys)
    assert code == 2
    _one_error_line(err, str(out), "--overwrite")
    assert _which_export(out) == str(root / "A") and _siblings(out) == []
    (tmp_path / "file").write_text("x")
    code, _, err = _run(["export", str(root / "A"), "--out", str(tmp_path / "file"), "--overwrite"], capsys)
    assert code == 2
    _one_error_line(err, str(tmp_path / "file"), "not a directory")


@pytest.fixture
def two_exports(models, tmp_path):
    nets, _ = models
    _export(nets["A"], tmp_path / "EA", "A")
    _export(nets["B"], tmp_path / "EB", "B")
    return tmp_path / "EA", tmp_path / "EB"


@pytest.mark.parametrize("backend", ["onnxruntime", "onnxruntime-int8", "torch"])
def test_a_directory_mixing_two_exports_is_refused_at_load(backend, two_exports, tmp_path, capsys):
    """A's export with one file of B's (what a half-done overwrite used to leave): navigate refuses it
    in one line naming the file, before any data is read."""
    ea, eb = two_exports
    mixed = tmp_path / "mixed"
    shutil.copytree(ea, mixed)
    name = {"onnxruntime": "fp32/language.onnx", "onnxruntime-int8": "int8/navigation.onnx",
            "torch": "model.safetensors"}[backend]
    shutil.copy(eb / name, mixed / name)
    code, _, err = _run(["navigate", "--checkpoint", str(mixed), "--split", "val_unseen", "--out",
                         str(tmp_path / "nav"), "--backend", backend], capsys)
    assert code == 2
    _one_error_line(err, str(mixed / name), "does not match", "export.json")
    assert not (tmp_path / "nav").exists()


def test_a_changed_graph_of_the_same_size_is_refused(two_exports):
    from minivln.deploy.format import ExportError
    from minivln.deploy.runtime import OnnxRuntimeDUET

    ea, _ = two_exports
    graph = ea / "fp32" / "panorama.onnx"
    data = bytearray(graph.read_bytes())
    data[-1] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(ExportError, match=r"panorama.onnx does not match .*same size, another SHA-256"):
        OnnxRuntimeDUET(ea, "fp32")
    OnnxRuntimeDUET(ea, "int8")  # the other variant's files are untouched


@pytest.mark.parametrize("how", ["truncated", "empty"])
@pytest.mark.parametrize("checksums", [True, False], ids=["manifest-with-files", "older-manifest"])
def test_truncated_or_empty_graphs_are_one_line(how, checksums, two_exports, tmp_path, capsys):
    """With the manifest's sizes and digests the size differs; an older manifest (no ``files``) gets to
    ONNX Runtime, whose refusal is one line naming the file too."""
    ea, _ = two_exports
    if not checksums:
        manifest = json.loads((ea / "export.json").read_text())
        del manifest["files"]
        (ea / "export.json").write_text(json.dumps(manifest))
    graph = ea / "fp32" / "navigation.onnx"
    with open(graph, "r+b") as f:
        f.truncate(graph.stat().st_size // 3 if how == "truncated" else 0)
    code, _, err = _run(["navigate", "--checkpoint", str(ea), "--split", "val_unseen", "--out",
                         str(tmp_path / "nav"), "--backend", "onnxruntime"], capsys)
    assert code == 2
    needle = "does not match" if checksums else ("is empty" if how == "empty" else "not a valid ONNX graph")
    _one_error_line(err, str(graph), needle)


# ============================================================================ features build


def test_features_build_removes_the_temporaries_of_a_killed_build(small_toy, tmp_path, capsys):
    """A build killed mid-write (SIGKILL, in a real process) leaves ``.views.h5.tmpPID``; the next build
    of the same target removes it, and one whose PID was taken since by a later process.  A temporary
    of a running process (a concurrent build) and those of other targets stay."""
    data, _ = small_toy
    out = tmp_path / "views.h5"
    script = f"""
import os, signal
from minivln.cli import main
from minivln.features.hdf5 import FeatureWriter
real, calls = FeatureWriter.add, []
def add(self, *a, **k):
    calls.append(1)
    if len(calls) == 20:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, *a, **k)
FeatureWriter.add = add
main(["features", "build", "--data-dir", {str(data)!r}, "--out", {str(out)!r}, "--no-progress"])
"""
    res = subprocess.run([sys.executable, "-c", script], env=_subprocess_env(), capture_output=True, text=True)
    assert res.returncode == -signal.SIGKILL, res.stderr
    (killed,) = [p.name for p in tmp_path.iterdir()]
    assert killed.startswith(".views.h5.tmp") and not out.exists()
    other = f".other.h5.tmp{_dead_pid()}"
    (tmp_path / ".views.h5.tmp1").write_bytes(b"a running build's")  # pid 1 runs
    (tmp_path / other).write_bytes(b"another target's")
    # a live pid, but its process started after the file was written (a child of ours: the parent's pid may
    # be 1 when the tests run orphaned, which would be the running build's above)
    later = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        reused = tmp_path / f".views.h5.tmp{later.pid}"
        reused.write_bytes(b"a killed build's, its pid taken since")
        os.utime(reused, (1e9, 1e9))
        code, _, err = _run(["features", "build", "--data-dir", str(data), "--out", str(out), "--no-progress"], capsys)
    finally:
        later.kill()
        later.wait()
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([other, ".views.h5.tmp1", "views.h5"])


# ============================================================================ teachers


STUDENT = get_config("duet-cpu", **SMALL)


@pytest.mark.parametrize("stage", [1, 2])
def test_a_teacher_of_another_task_is_refused(stage):
    reverie = STUDENT.replace(obj_feat_size=16)
    with pytest.raises(ConfigError, match=r"teacher T cannot teach this student in stage \d: it takes 16-d object "
                                          r"tokens \(student: no object tokens; an object-grounding \(REVERIE\) "
                                          r"teacher for a student without objects \(R2R\)\)"):
        check_teacher(STUDENT, reverie, stage=stage, source="teacher T")
    with pytest.raises(ConfigError, match=r"it takes no object tokens \(student: 16-d object tokens; a teacher "
                                          r"without objects \(R2R\) for an object-grounding \(REVERIE\) student\)"):
        check_teacher(reverie, STUDENT, stage=stage, source="teacher T")
    with pytest.raises(ConfigError, match=r"it takes 24-d object tokens \(student 16-d\)"):
        check_teacher(reverie, STUDENT.replace(obj_feat_size=24), stage=stage)
    check_teacher(reverie, reverie.replace(hidden_size=32, intermediate_size=64), stage=stage)


def test_a_teacher_of_another_feature_width_is_refused():
    for stage in (1, 2):
        with pytest.raises(ConfigError, match=r"view features 24-d \(student 16-d\)"):
            check_teacher(STUDENT, STUDENT.replace(image_feat_size=24), stage=stage)
    with pytest.raises(ConfigError, match=r"6-d angle features \(student 4-d\)"):
        check_teacher(STUDENT, STUDENT.replace(angle_feat_size=6), stage=1)
    check_teacher(STUDENT, STUDENT.replace(angle_feat_size=6), stage=2)  # stage 2: its own panorama inputs


def test_a_teacher_whose_layers_do_not_map_is_refused_in_stage_1():
    student = STUDENT.replace(num_l_layers=2, num_x_layers=2)
    teacher = STUDENT.replace(num_l_layers=3, num_x_layers=4, num_attention_heads=4, hidden_size=32,
                              intermediate_size=64)
    with pytest.raises(ConfigError) as info:
        check_teacher(student, teacher, stage=1, source="teacher T")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("teacher T cannot teach this student in stage 1: ")
    assert "it has 4 attention heads, the student 2" in msg
    assert "its text encoder has 3 layers, the student's 2" in msg and "multiple" in msg
    assert "global" not in msg and "pano" not in msg  # 4 / 2 and 1 / 1 map
    # the heads matter to the attentions only; the layer map to the attentions and hidden states
    with pytest.raises(ConfigError, match="text encoder") as info:
        check_teacher(student, teacher, stage=1, kd_terms={"att": 0})
    assert "heads" not in str(info.value)
    check_teacher(student, teacher, stage=1, kd_terms={"att": 0, "hid": 0.0, "emb": 1})
    check_teacher(student, teacher, stage=2)  # stage 2 maps no layers
    with pytest.raises(ConfigError, match="pano encoder has 0 layers, the student's 1"):
        check_teacher(STUDENT, STUDENT.replace(num_pano_layers=0), stage=1)


def _cli_args(data, feats, teacher: Path) -> list[str]:
    return ["model=duet-cpu", f"model_overrides={json.dumps(SMALL)}", f"data_dir={data}", f"features={feats}",
            f"teacher={teacher}", "batch_size=2", "max_action_len=5", "max_instr_len=40", "val_splits=[val_unseen]",
            "num_threads=1", "train.max_steps=2", "train.progress=false"]


def test_a_reverie_teacher_for_an_r2r_run_is_one_line_before_any_step(small_toy, tmp_path, capsys):
    data, feats = small_toy
    torch.manual_seed(1)
    teacher = save_pretrained(create_model("duet-cpu", **{**SMALL, "obj_feat_size": 16}), tmp_path / "reverie")
    for cmd in ("finetune", "pretrain"):
        args = _cli_args(data, feats, teacher)
        if cmd == "pretrain":
            args = [a for a in args if not a.startswith(("max_action_len", "val_splits"))] + ["val_batches=1"]
        code, _, err = _run([cmd, "--out", str(tmp_path / cmd), *args], capsys)
        assert code == 2
        _one_error_line(err, f"teacher {teacher} cannot teach", "16-d object tokens", "(REVERIE) teacher")
        assert not (tmp_path / cmd / "log.jsonl").exists()


def test_a_teacher_whose_layers_do_not_map_is_one_line_before_any_step(small_toy, tmp_path, capsys):
    """Stage 1 with a teacher of 4 heads for a 2-head student: was a ValueError traceback from the
    loss term (after the data had been read)."""
    data, feats = small_toy
    torch.manual_seed(1)
    teacher = save_pretrained(create_model("duet-cpu", **{**SMALL, "hidden_size": 32, "intermediate_size": 64,
                                                          "num_attention_heads": 4}), tmp_path / "t")
    args = [a for a in _cli_args(data, feats, teacher) if not a.startswith(("max_action_len", "val_splits"))]
    code, _, err = _run(["pretrain", "--out", str(tmp_path / "pt"), *args, "val_batches=1"], capsys)
    assert code == 2
    _one_error_line(err, f"teacher {teacher} cannot teach this student in stage 1", "4 attention heads")
    assert not (tmp_path / "pt" / "log.jsonl").exists()
