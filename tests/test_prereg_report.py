"""studies/r2r_prereg/report.py: the pre-registered tables as markdown, the verdict worded from the
driver's tests, and no verdict (nor a silent pass) while rows are pending."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from minivln.evaluation.stats import compare_over_seeds

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("prereg_report", ROOT / "studies" / "r2r_prereg" / "report.py")
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)

SECONDARY = [("two-stage", "stage 1 only"), ("two-stage", "stage 2 only"), ("stage 1 only", "none"), ("stage 2 only", "none")]


def row(name: str, seed: int | None, sr: float, spl: float) -> dict:
    r = {"name": name if seed is None else f"{name}, seed {seed}", "sr": sr, "spl": spl, "oracle_sr": sr + 0.1,
         "nav_error": 7.5, "trajectory_length": 18.0, "ndtw": 0.4}
    if seed is not None:
        r |= {"seed": seed, "pretrain_seed": seed}
    return r


def table3(two_stage: list[float], none: list[float], pending: list[str] = ()) -> dict:
    rows = [row("two-stage", s, v, v - 0.1) for s, v in enumerate(two_stage)]
    rows += [row("none", s, v, v - 0.1) for s, v in enumerate(none)]
    rows += [row("stage 1 only", s, 0.33 + 0.01 * s, 0.24) for s in range(4)]
    rows += [row("stage 2 only", s, 0.31 - 0.01 * s, 0.22) for s in range(4)]
    rows += [row("teacher", None, 0.40, 0.31), row("random", None, 0.04, 0.02)]
    complete = not pending
    alpha = 0.05 if complete else 0.0  # the driver words a verdict only when every row is scored
    comparisons = [
        {"name": "primary", "tests": compare_over_seeds(rows, [("two-stage", "none")], ["sr"], alpha)},
        {"name": "secondary", "tests": compare_over_seeds(rows, SECONDARY, ["sr"], alpha)},
        {"name": "descriptive", "tests": compare_over_seeds(rows, [("two-stage", "none")], ["spl"])},
    ]
    return {"table": "Table III", "split": "val_unseen", "features": "stand-in", "commit": "0" * 40,
            "written": "2026-12-07 16:00:00", "complete": complete, "pending": list(pending),
            "rows": rows, "comparisons": comparisons}


def write(tmp: Path, **tables: dict) -> Path:
    for name, t in tables.items():
        (tmp / f"{name}.json").write_text(json.dumps(t))
    return tmp


def run(capsys, *argv: str) -> str:
    assert report.main(list(argv)) == 0
    return capsys.readouterr().out


def test_primary_supported_when_two_stage_is_ahead(tmp_path, capsys):
    d = write(tmp_path, r2r_prereg_table3=table3([0.39, 0.40, 0.36, 0.38, 0.37, 0.39], [0.32, 0.27, 0.35, 0.29, 0.30, 0.31]))
    out = run(capsys, "--results", str(d))
    primary = next(line for line in out.splitlines() if line.startswith("**Primary**"))
    assert "**supported**" in primary and "over 6 seeds" in primary and "df = 5" in primary
    assert "INTERIM" not in out
    # the arm's mean is the mean of its seeds' SR, in percent with its standard error over seeds
    assert "| **two-stage** (mean over seeds 0-5) | | **38.2 ± 0.6** |" in out
    assert "`r2r_prereg_table4.json`: not written yet." in out


def test_primary_not_supported_when_two_stage_is_behind_or_level(tmp_path, capsys):
    behind = table3([0.30, 0.29, 0.31, 0.30, 0.28, 0.30], [0.36, 0.35, 0.37, 0.36, 0.35, 0.36])
    test = behind["comparisons"][0]["tests"][0]
    assert test["p"] < 0.05 and test["mean"] < 0  # significant, but the other way: not the hypothesis
    out = run(capsys, "--results", str(write(tmp_path, r2r_prereg_table3=behind)))
    assert "**not supported**" in out
    level = table3([0.33, 0.31, 0.35, 0.30, 0.34, 0.32], [0.32, 0.33, 0.34, 0.31, 0.33, 0.33])
    out = run(capsys, "--results", str(write(tmp_path, r2r_prereg_table3=level)))
    assert "**not supported**" in out and "**supported**" not in out


def test_incomplete_table_refused_unless_interim_and_then_no_verdict(tmp_path, capsys):
    t = table3([0.39, 0.40, 0.36, 0.38], [0.32, 0.27, 0.35, 0.29], pending=["two-stage, seed 4", "none, seed 4"])
    d = write(tmp_path, r2r_prereg_table3=t)
    with pytest.raises(SystemExit, match="--interim"):
        report.main(["--results", str(d)])
    out = run(capsys, "--results", str(d), "--interim")
    assert out.startswith("> **INTERIM**")
    assert "supported" not in out and "no verdict (interim)" in out
    assert "| two-stage, seed 4 | | pending |" in out
    readme = run(capsys, "--results", str(d), "--interim", "--readme")
    assert readme.startswith("> **INTERIM**") and "mean of 4 seeds" in readme


def test_ablation_rows_and_paired_differences_on_both_splits(tmp_path, capsys):
    t3 = table3([0.39, 0.40, 0.36, 0.38, 0.37, 0.39], [0.32, 0.27, 0.35, 0.29, 0.30, 0.31])

    def table4(split: str, shift: float) -> dict:
        rows = [row("txt + pano + fuse", s, 0.38 + shift, 0.28) for s in range(3)]
        rows += [row("fuse alone", s, 0.34 + 0.01 * s + shift, 0.25) for s in range(3)]
        tests = compare_over_seeds(rows, [("fuse alone", "txt + pano + fuse")], ["sr", "spl"])
        return {"table": "Table IV", "split": split, "complete": True, "pending": [], "rows": rows,
                "comparisons": [{"name": "descriptive", "tests": tests}]}

    d = write(tmp_path, r2r_prereg_table3=t3, r2r_prereg_table4=table4("val_unseen", 0.0),
              r2r_prereg_table4_seen=table4("val_seen", 0.1))
    out = run(capsys, "--results", str(d))
    line = next(x for x in out.splitlines() if x.startswith("| fuse alone |"))
    # val_unseen SR 35.0 ± 0.6, Δ -3.0 ± 0.6; val_seen 45.0 ± 0.6, the same Δ
    assert line.startswith("| fuse alone | 0, 1, 2 | 35.0 ± 0.6 | 25.0 ± 0.0 | -3.0 ± 0.6 | 45.0 ± 0.6 | 25.0 ± 0.0 | -3.0 ± 0.6 |")
    ref = next(x for x in out.splitlines() if x.startswith("| txt + pano + fuse |"))
    assert ref.endswith("|  |") and "48.0" in ref


def test_interim_ablation_with_one_seed_reads_the_null_standard_error(tmp_path, capsys):
    # the driver writes a one-seed arm's standard error as JSON null (not NaN): an interim look must show the
    # difference without "±" rather than fail (it raised a TypeError on the real Table IV at seed 1)
    t3 = table3([0.39, 0.40, 0.36, 0.38, 0.37, 0.39], [0.32, 0.27, 0.35, 0.29, 0.30, 0.31])
    rows = [row("txt + pano + fuse", s, 0.38, 0.28) for s in range(2)] + [row("fuse alone", 0, 0.35, 0.25)]
    tests = compare_over_seeds(rows, [("fuse alone", "txt + pano + fuse")], ["sr"])
    for t in tests:
        t.update({k: None for k, v in t.items() if isinstance(v, float) and math.isnan(v)})
    t4 = {"table": "Table IV", "split": "val_unseen", "complete": False, "pending": ["fuse alone, seed 1"],
          "rows": rows, "comparisons": [{"name": "descriptive", "tests": tests}]}
    assert tests[0]["se"] is None
    out = run(capsys, "--results", str(write(tmp_path, r2r_prereg_table3=t3, r2r_prereg_table4=t4)), "--interim")
    line = next(x for x in out.splitlines() if x.startswith("| fuse alone |"))
    assert line == "| fuse alone | 0 | 35.0 | 25.0 | -3.0 |"
    assert out.startswith("> **INTERIM**") and "Pending on val_unseen (1): fuse alone, seed 1." in out
