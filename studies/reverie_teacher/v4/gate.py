"""The gate of REVERIE's fourth teacher (docs/preregistration_reverie.md, "Teacher v4"): is the teacher
ahead of each committed student-alone row by at least 3 paired standard errors, in SR and in RGS?

Reads the teacher's row from its table (``minivln experiment reverie-teacher-v4 ... --table-only``) and the
rows "none, seed 0 / 1 / 2" from the pre-registered REVERIE Table III; scores every submission again with
the official evaluator (no network is run), pairs them over the instructions of the split, and writes the
differences, their paired standard errors and the verdict.  The same computation on rev-teacher-v3 gives
the committed gate of that table (tests/test_reverie_v4_gate.py checks it).

    python studies/reverie_teacher/v4/gate.py --teacher docs/results/reverie_teacher_v4.json \\
        --students docs/results/reverie_prereg_table3.json --out studies/reverie_teacher/v4/gate.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from minivln.evaluation.evaluator import Evaluator, load_submission
from minivln.evaluation.stats import gap_over_episodes

ROOT = Path(__file__).resolve().parents[3]
STUDENTS = ("none, seed 0", "none, seed 1", "none, seed 2")
METRICS = ("sr", "rgs")
MIN_SE = 3.0


def _row(table: dict, name: str, path: str) -> dict:
    for r in table["rows"]:
        if r["name"] == name:
            if not r.get("submission"):
                raise SystemExit(f"{path}: row {name!r} has no submission")
            return r
    raise SystemExit(f"{path}: no row named {name!r} (rows: {', '.join(r['name'] for r in table['rows'])})")


def _submission(row: dict) -> Path:
    p = Path(row["submission"])
    return p if p.is_absolute() else ROOT / p


def gate(teacher_table: str, students_table: str, teacher_row: str = "teacher",
         data_dir: str | None = None, recipe: str = "reverie-teacher-v4") -> dict:
    """The gate's record: per student row and metric the paired gap, its s.e. and the gap in s.e.; ``ahead``
    when every one of them is at least ``MIN_SE``."""
    t_tab = json.loads(Path(teacher_table).read_text())
    s_tab = json.loads(Path(students_table).read_text())
    for tab, path in ((t_tab, teacher_table), (s_tab, students_table)):
        if tab.get("task") != "reverie" or tab.get("split") != "val_unseen":
            raise SystemExit(f"{path}: a REVERIE val_unseen table is needed, found {tab.get('task')} {tab.get('split')}")
    if t_tab.get("recipe") != recipe:
        raise SystemExit(f"{teacher_table}: the table of recipe {t_tab.get('recipe')!r}, not {recipe!r}")
    evaluator = Evaluator("reverie", "val_unseen", data_dir)
    teacher = _row(t_tab, teacher_row, teacher_table)
    _, t_eps = evaluator.score(load_submission(_submission(teacher)))
    if len(t_eps) != len(evaluator.episodes):
        raise SystemExit(f"the teacher's submission scores {len(t_eps)} of the split's {len(evaluator.episodes)} "
                         "instructions: the gate reads all of them")
    gaps = []
    for name in STUDENTS:
        _, s_eps = evaluator.score(load_submission(_submission(_row(s_tab, name, students_table))))
        for metric in METRICS:
            g = gap_over_episodes(t_eps, s_eps, metric)
            gaps.append({"a": teacher_row, "b": name, **g, "passed": bool(g["in_se"] >= MIN_SE)})
    return {"teacher_table": teacher_table, "teacher_row": teacher_row, "teacher_run": teacher.get("run"),
            "teacher_commit": teacher.get("commit"), "students_table": students_table,
            "rule": f"teacher - each of {', '.join(STUDENTS)}, paired over all val_unseen instructions, "
                    f"at least {MIN_SE:g} paired standard errors in {' and '.join(METRICS)}",
            "gaps": gaps, "ahead": all(g["passed"] for g in gaps)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="the teacher's table (JSON of minivln experiment)")
    p.add_argument("--teacher-row", default="teacher")
    p.add_argument("--recipe", default="reverie-teacher-v4", help="the recipe the teacher's table must come from")
    p.add_argument("--students", required=True, help="the table with the rows 'none, seed 0/1/2'")
    p.add_argument("--data-dir", default=None, help="data directory (default: $MINIVLN_DATA)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    record = gate(args.teacher, args.students, args.teacher_row, args.data_dir, args.recipe)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    record = {"command": "python studies/reverie_teacher/v4/gate.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "commit": commit, "written": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S"), **record}
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    for g in record["gaps"]:
        print(f"{g['a']} - {g['b']}  {g['metric']}: {100 * g['mean']:+.1f} ± {100 * g['se']:.1f} points "
              f"({g['in_se']:+.1f} s.e.) {'ok' if g['passed'] else 'below 3 s.e.'}")
    print("ahead" if record["ahead"] else "NOT ahead", "->", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
