"""studies/reverie_teacher/v4/gate.py and probe.py, written before the fourth REVERIE teacher is read: the
gate reproduces the committed gate of the third teacher, says "ahead" only when every gap is 3 s.e. or more,
and refuses a teacher scored on part of the split; the step-600 rule fails on each of its thresholds and
stops the driver when it fails."""

from __future__ import annotations

import gzip
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("v4_gate", ROOT / "studies" / "reverie_teacher" / "v4" / "gate.py")
gate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gate)
spec = importlib.util.spec_from_file_location("v4_probe", ROOT / "studies" / "reverie_teacher" / "v4" / "probe.py")
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)

TABLE3 = ROOT / "docs" / "results" / "reverie_prereg_table3.json"


def _sub(name: str) -> list[dict]:
    row = next(r for r in json.loads(TABLE3.read_text())["rows"] if r["name"] == name)
    return json.loads(gzip.open(ROOT / row["submission"]).read())


def _table(tmp: Path, preds: list[dict], name: str = "teacher") -> Path:
    gz = tmp / f"{name}.json.gz"
    gz.write_bytes(gzip.compress(json.dumps(preds).encode()))
    path = tmp / "teacher_table.json"
    path.write_text(json.dumps({"task": "reverie", "split": "val_unseen", "recipe": "reverie-teacher-v4",
                                "rows": [{"name": name, "run": "x", "commit": "0" * 40, "submission": str(gz)}]}))
    return path


def test_the_third_teachers_gate_is_reproduced(real_data_dir, tmp_path):
    rec = gate.gate(str(TABLE3), str(TABLE3), data_dir=str(real_data_dir), recipe="reverie-prereg-table3")
    committed = next(c for c in json.loads(TABLE3.read_text())["comparisons"] if c["name"] == "teacher ahead")
    assert len(rec["gaps"]) == len(committed["gaps"]) == 6
    for mine, theirs in zip(rec["gaps"], committed["gaps"]):
        assert (mine["b"], mine["metric"], mine["episodes"]) == (theirs["b"], theirs["metric"], 3433)
        assert mine["mean"] == pytest.approx(theirs["mean"], abs=1e-12)
        assert mine["se"] == pytest.approx(theirs["se"], rel=1e-9)
    # v3 was ahead of seed 1 only: not ahead (the committed reading)
    assert [g["passed"] for g in rec["gaps"]] == [False, False, True, True, False, False]
    assert rec["ahead"] is False


def test_ahead_only_when_every_gap_passes(real_data_dir, tmp_path):
    """A 'teacher' that takes, per instruction, a successful student's trajectory and object where one
    of the three seeds had one is ahead of each; the student of seed 1 itself is not."""
    from minivln.evaluation.evaluator import Evaluator

    subs = [_sub(f"none, seed {s}") for s in range(3)]
    ev = Evaluator("reverie", "val_unseen", real_data_dir)
    per_ep = [ev.score(s)[1] for s in subs]
    by_id = [{p["instr_id"]: p for p in sub} for sub in subs]
    best = []
    for i in by_id[0]:
        pick = max(range(3), key=lambda s: (per_ep[s][i]["rgs"], per_ep[s][i]["sr"]))
        best.append(by_id[pick][i])
    rec = gate.gate(str(_table(tmp_path, best)), str(TABLE3), data_dir=str(real_data_dir))
    assert rec["ahead"] is True and all(g["in_se"] >= 3 for g in rec["gaps"])

    rec = gate.gate(str(_table(tmp_path, subs[1])), str(TABLE3), data_dir=str(real_data_dir))
    assert rec["ahead"] is False
    own = [g for g in rec["gaps"] if g["b"] == "none, seed 1"]
    assert all(g["mean"] == 0 and not g["passed"] for g in own)


def test_a_teacher_scored_on_part_of_the_split_is_refused(real_data_dir, tmp_path):
    with pytest.raises(SystemExit, match="scores 300 of the split's 3433"):
        gate.gate(str(_table(tmp_path, _sub("none, seed 0")[:300])), str(TABLE3), data_dir=str(real_data_dir))


def test_cli_writes_the_record(real_data_dir, tmp_path, capsys):
    out = tmp_path / "gate.json"
    with pytest.raises(SystemExit, match="the table of recipe 'reverie-prereg-table3', not 'reverie-teacher-v4'"):
        gate.main(["--teacher", str(TABLE3), "--students", str(TABLE3), "--data-dir", str(real_data_dir),
                   "--out", str(out)])
    assert gate.main(["--teacher", str(TABLE3), "--students", str(TABLE3), "--data-dir", str(real_data_dir),
                      "--recipe", "reverie-prereg-table3", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["command"].startswith("python studies/reverie_teacher/v4/gate.py --teacher")
    assert rec["teacher_run"] == "rev-teacher-v3" and rec["ahead"] is False
    assert "NOT ahead" in capsys.readouterr().out


def _log(tmp: Path, at_600: dict | None, steps=(100, 200, 300)) -> Path:
    """A pretraining log.jsonl as the trainer writes it: train records and val records with flat keys."""
    lines = [{"kind": "train", "step": 10, "loss": 5.0}]
    vals = {s: {"mlm_acc": 0.2 + 0.0001 * s, "og_acc": 0.4, "sap_fused_acc": 0.55} for s in steps}
    if at_600 is not None:
        vals[600] = at_600
    for s, v in vals.items():
        lines.append({"kind": "val", "step": s, **{f"val_unseen.{k}": x for k, x in v.items()}, "val_unseen.og_loss": 1.0})
    path = tmp / "log.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


@pytest.mark.parametrize("at_600, verdict, failed_on", [
    (None, "pending", None),
    ({"mlm_acc": 0.318, "og_acc": 0.605, "sap_fused_acc": 0.605}, "passed", []),
    ({"mlm_acc": 0.251, "og_acc": 0.50, "sap_fused_acc": 0.50}, "passed", []),  # the boundaries pass
    ({"mlm_acc": 0.25, "og_acc": 0.60, "sap_fused_acc": 0.60}, "failed", ["mlm_acc"]),  # v2-like collapse
    ({"mlm_acc": 0.30, "og_acc": 0.499, "sap_fused_acc": 0.60}, "failed", ["og_acc"]),
    ({"mlm_acc": 0.30, "og_acc": 0.60, "sap_fused_acc": 0.49}, "failed", ["sap_fused_acc"]),
])
def test_the_step_600_rule(tmp_path, capsys, at_600, verdict, failed_on):
    out = tmp_path / "probe.json"
    code = probe.main(["--log", str(_log(tmp_path, at_600)), "--out", str(out)])
    rep = json.loads(out.read_text())
    assert rep["verdict"] == verdict and code == {"passed": 0, "failed": 3, "pending": 2}[verdict]
    if failed_on is not None:
        assert rep["failed_on"] == failed_on
    # each reading beside v3's at equal samples: v4 step s (batch 64) = v3 step 2s (batch 32)
    by_step = {r["step"]: r for r in rep["readings"]}
    assert by_step[100]["v3_at_equal_samples"]["mlm_acc"] == pytest.approx(0.2811)  # v3 step 200
    assert by_step[300]["v3_at_equal_samples"]["og_acc"] == pytest.approx(0.6055)  # v3 step 600
    assert f"step 600: {verdict}" in capsys.readouterr().out


def test_the_watcher_stops_the_driver_only_when_the_rule_fails(tmp_path):
    for at_600, alive in (({"mlm_acc": 0.21, "og_acc": 0.6, "sap_fused_acc": 0.6}, False),
                          ({"mlm_acc": 0.33, "og_acc": 0.6, "sap_fused_acc": 0.6}, True)):
        driver = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            log = _log(tmp_path, at_600)
            code = probe.main(["--log", str(log), "--out", str(tmp_path / "p.json"), "--watch",
                               "--stop-pid", str(driver.pid), "--poll", "0.1"])
            assert code == (0 if alive else 3)
            try:
                driver.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            assert (driver.poll() is None) == alive
        finally:
            driver.kill()
            driver.wait()


def test_seconds_per_step_from_the_logged_rates(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in (
        {"kind": "train", "step": 10, "it_s": 0.05}, {"kind": "train", "step": 310, "it_s": 0.1},
        {"kind": "val", "step": 400, "val_unseen.mlm_acc": 0.3}, {"kind": "train", "step": 320, "it_s": 0.125},
        {"kind": "train", "step": 330, "it_s": 0.0625})))
    sp = probe.seconds_per_step(log, 300)
    assert sp == {"after_step": 300, "until_step": None, "records": 3, "median": 10.0, "min": 8.0, "max": 16.0}
    assert probe.seconds_per_step(log, 300, 320)["records"] == 2
    assert probe.seconds_per_step(log, 400)["records"] == 0
    assert probe.main(["--log", str(log), "--speed-after", "300"]) == 2  # step 600 not validated: pending
    assert "median 10.0 (8.0-16.0) over 3 log records" in capsys.readouterr().out
