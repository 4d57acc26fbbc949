"""studies/reverie_teacher/v4/gate.py, written before the fourth REVERIE teacher is scored: it reproduces
the committed gate of the third teacher, says "ahead" only when every gap is 3 s.e. or more, and refuses a
teacher scored on part of the split."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("v4_gate", ROOT / "studies" / "reverie_teacher" / "v4" / "gate.py")
gate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gate)

TABLE3 = ROOT / "docs" / "results" / "reverie_prereg_table3.json"


def _sub(name: str) -> list[dict]:
    row = next(r for r in json.loads(TABLE3.read_text())["rows"] if r["name"] == name)
    return json.loads(gzip.open(ROOT / row["submission"]).read())


def _table(tmp: Path, preds: list[dict], name: str = "teacher") -> Path:
    gz = tmp / f"{name}.json.gz"
    gz.write_bytes(gzip.compress(json.dumps(preds).encode()))
    path = tmp / "teacher_table.json"
    path.write_text(json.dumps({"task": "reverie", "split": "val_unseen",
                                "rows": [{"name": name, "run": "x", "commit": "0" * 40, "submission": str(gz)}]}))
    return path


def test_the_third_teachers_gate_is_reproduced(real_data_dir, tmp_path):
    rec = gate.gate(str(TABLE3), str(TABLE3), data_dir=str(real_data_dir))
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
    best = []
    for k, pred in enumerate(subs[0]):
        i = pred["instr_id"]
        pick = max(range(3), key=lambda s: (per_ep[s][i]["rgs"], per_ep[s][i]["sr"]))
        best.append(subs[pick][k] if subs[pick][k]["instr_id"] == i else next(p for p in subs[pick] if p["instr_id"] == i))
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
    assert gate.main(["--teacher", str(TABLE3), "--students", str(TABLE3), "--data-dir", str(real_data_dir),
                      "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["command"].startswith("python studies/reverie_teacher/v4/gate.py --teacher")
    assert rec["teacher_run"] == "rev-teacher-v3" and rec["ahead"] is False
    assert "NOT ahead" in capsys.readouterr().out
