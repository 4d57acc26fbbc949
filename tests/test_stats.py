"""The pre-registered tables' statistics (minivln.evaluation.stats) and their place in a table's JSON."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml
from scipy import special as scipy_special
from scipy import stats as scipy_stats

from minivln.data.datasets import load_episodes
from minivln.evaluation.stats import (
    arm_summary,
    arms,
    betainc,
    compare_over_seeds,
    gap_over_episodes,
    holm,
    t_test,
    t_two_sided_p,
)
from minivln.experiment import load_recipe, summary_table, write_table


def test_t_test_is_scipys_one_sample_test():
    diffs = [0.031, 0.012, 0.047, -0.004, 0.026, 0.018]
    ours, ref = t_test(diffs), scipy_stats.ttest_1samp(diffs, 0.0)
    assert ours["t"] == pytest.approx(ref.statistic) and ours["p"] == pytest.approx(ref.pvalue)
    assert ours["df"] == 5 and ours["se"] == pytest.approx(scipy_stats.sem(diffs))
    assert math.isnan(t_test([0.1])["p"]) and t_test([0.1, 0.1])["p"] == 0.0 and t_test([0.0, 0.0])["p"] == 1.0


def test_t_p_values_are_scipys_without_scipy():
    """The p-values come from our incomplete beta function (scipy is only in the test extra)."""
    for df in [*range(1, 60), 99, 500, 1000]:
        for t in (0.0, 0.01, 0.1, 0.5, 1.0, 1.96, 2.5, 3.0, 5.0, 8.0, 20.0, 100.0):
            ref = 2 * scipy_stats.t.sf(t, df)
            assert t_two_sided_p(t, df) == pytest.approx(ref, rel=1e-9, abs=1e-300), (df, t)
            assert t_two_sided_p(-t, df) == t_two_sided_p(t, df)
    # one degree of freedom is Cauchy's: p = 1 - 2 atan(t) / pi, also for a t scipy rounds
    assert t_two_sided_p(1e-8, 1) == pytest.approx(1 - 2 * math.atan(1e-8) / math.pi, rel=1e-15)
    assert t_two_sided_p(math.inf, 3) == 0.0


def test_betainc_is_scipys():
    rng = np.random.default_rng(0)
    for _ in range(3000):
        a, b, x = math.exp(rng.uniform(-3, 6)), math.exp(rng.uniform(-3, 6)), rng.random()
        ref = scipy_special.betainc(a, b, x)
        if ref > 1e-280:  # below, scipy's and ours are subnormal numbers
            assert betainc(a, b, x) == pytest.approx(ref, rel=1e-10), (a, b, x)
    assert betainc(2.0, 3.0, 0.0) == 0.0 and betainc(2.0, 3.0, 1.0) == 1.0


def test_holm_by_hand():
    # sorted 0.01, 0.02, 0.04, 0.30 -> 4*0.01, 3*0.02, max(prev, 2*0.04), max(prev, 0.30)
    assert holm([0.04, 0.01, 0.30, 0.02]) == pytest.approx([0.08, 0.04, 0.30, 0.06])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    out = holm([float("nan"), 0.02])
    assert math.isnan(out[0]) and out[1] == pytest.approx(0.02)  # NaN neither counted nor adjusted


def _rows(values):
    return [{"name": f"{arm}, seed {s}", "sr": v} for arm, vs in values.items() for s, v in enumerate(vs)] \
        + [{"name": "teacher", "sr": 0.5}]


def test_comparisons_pair_by_seed_over_the_seeds_both_arms_have_and_holm_correct_the_group():
    rows = _rows({"two-stage": [0.40, 0.42, 0.41, 0.43, 0.44, 0.39], "none": [0.36, 0.37, 0.38, 0.36],
                  "stage 1 only": [0.37, 0.38, 0.40, 0.41]})
    assert set(arms(rows)) == {"two-stage", "none", "stage 1 only"}  # "teacher" is no arm
    res = compare_over_seeds(rows, [("two-stage", "none"), ("stage 1 only", "none")], ["sr"], alpha=0.05)
    first = res[0]
    assert first["seeds"] == [0, 1, 2, 3] and first["diffs"] == pytest.approx([0.04, 0.05, 0.03, 0.07])
    assert first["p"] == pytest.approx(scipy_stats.ttest_1samp(first["diffs"], 0).pvalue)
    assert [r["p_holm"] for r in res] == pytest.approx(holm([r["p"] for r in res]))
    assert first["verdict"] == "two-stage > none"
    flipped = compare_over_seeds(rows, [("none", "two-stage")], ["sr"], alpha=0.05)[0]
    assert flipped["verdict"] == "none < two-stage"
    assert compare_over_seeds(rows, [("two-stage", "none")], ["sr"], alpha=1e-9)[0]["verdict"] == "no difference shown"
    with pytest.raises(KeyError, match="stage 2 only"):
        compare_over_seeds(rows, [("stage 2 only", "none")], ["sr"])
    summary = arm_summary(rows, ["sr"])["none"]["sr"]
    assert summary["mean"] == pytest.approx(0.3675) and summary["sd"] == pytest.approx(0.0095742710775634)


def test_an_arm_a_rule_stopped_stays_in_the_holm_family_as_not_run():
    """A stopped arm (a gate not passed, a retired run) gives "not run" tests that still count in the
    group's Holm family (as p = 1): the test that ran is corrected for the planned family, not fewer."""
    rows = _rows({"stage 1 only": [0.40, 0.42, 0.45], "none": [0.36, 0.37, 0.38]})
    pairs = [("two-stage", "stage 1 only"), ("two-stage", "stage 2 only"), ("stage 1 only", "none"),
             ("stage 2 only", "none")]
    why = "gate 'teacher ahead' not passed"
    res = compare_over_seeds(rows, pairs, ["sr"], alpha=0.05, not_run={"two-stage": why, "stage 2 only": why})
    ran = [r for r in res if "not_run" not in r]
    assert [(r["a"], r["b"]) for r in ran] == [("stage 1 only", "none")]
    assert ran[0]["p_holm"] == pytest.approx(min(1.0, 4 * ran[0]["p"]))  # a family of four, not one
    stopped = [r for r in res if "not_run" in r]
    assert len(stopped) == 3 and all(r["not_run"] == why and r["verdict"] == "not run" for r in stopped)
    assert all("p_holm" not in r for r in stopped)
    alone = compare_over_seeds(rows, [("stage 1 only", "none")], ["sr"], alpha=0.05)[0]
    assert alone["p_holm"] == pytest.approx(alone["p"]) and alone["p"] < ran[0]["p_holm"]
    with pytest.raises(KeyError, match="two-stage"):  # without the rule's reason a missing arm is an error
        compare_over_seeds(rows, pairs, ["sr"])


def test_gap_over_episodes_is_paired():
    a = {"1": {"sr": 1.0}, "2": {"sr": 1.0}, "3": {"sr": 0.0}, "4": {"sr": 1.0}}
    b = {"1": {"sr": 0.0}, "2": {"sr": 1.0}, "3": {"sr": 0.0}, "4": {"sr": 0.0}}
    g = gap_over_episodes(a, b, "sr")
    assert g["mean"] == 0.5 and g["se"] == pytest.approx(scipy_stats.sem([1, 0, 0, 1]))
    assert g["in_se"] == pytest.approx(g["mean"] / g["se"])
    with pytest.raises(ValueError, match="different episodes"):
        gap_over_episodes(a, {"1": {"sr": 0.0}}, "sr")


def test_a_table_carries_its_comparisons_and_its_summary(small_toy, tmp_path):
    """Rows given as scored submissions (checkpoint rows): the table's JSON gets the recipe's tests and
    the summary table its arms' means and their share of the reference row."""
    data, feats = small_toy
    eps = load_episodes("r2r", "val_unseen", data)
    good = [{"instr_id": ep.instr_id, "trajectory": [[vp, 0.0, 0.0] for vp in ep.path]} for ep in eps]
    bad = [{"instr_id": ep.instr_id, "trajectory": [[ep.path[0], 0.0, 0.0]]} for ep in eps]
    plan = {"teacher": good, "kd, seed 0": good, "kd, seed 1": good, "alone, seed 0": bad, "alone, seed 1": good}
    rows = []
    for name, sub in plan.items():
        key = name.replace(", ", "-").replace(" ", "-")
        d = tmp_path / "out" / "scores" / f"ckpt-{key}"
        d.mkdir(parents=True)
        (d / "submission_val_unseen.json").write_text(json.dumps(sub))
        rows.append({"name": name, "checkpoint": f"x/{key}"})
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(yaml.safe_dump({
        "name": "t", "data_dir": str(data), "features": str(feats), "results": str(tmp_path / "t.json"),
        "submissions": str(tmp_path / "subs"), "rows": rows,
        "comparisons": [{"name": "primary", "pairs": [["kd", "alone"]], "metrics": ["sr"], "alpha": 0.05},
                        {"name": "ahead", "over": "episodes", "pairs": [["teacher", "alone"]], "metrics": ["sr"]},
                        {"name": "later", "pairs": [["kd", "stage 2 only"]]}],
        "summary": {"results": str(tmp_path / "t2.json"), "entries": ["teacher", "kd", "alone", "missing"],
                    "reference": "teacher", "metrics": ["sr"]}}))
    table = write_table(load_recipe(str(recipe_path)), tmp_path / "out", "abc")
    primary, ahead, later = table["comparisons"]
    assert primary["tests"][0]["diffs"] == [1.0, 0.0] and primary["tests"][0]["mean"] == 0.5
    assert primary["tests"][0]["verdict"] == "no difference shown" and "pending" not in primary

    # a seed the recipe lists for both arms but nobody scored yet: the tests are interim, with no
    # verdict until it is in; a seed only one arm lists is not paired, so it does not hold the verdict
    spec = yaml.safe_load(recipe_path.read_text())
    spec["rows"].append({"name": "alone, seed 2", "checkpoint": "x/alone-seed-2"})
    recipe_path.write_text(yaml.safe_dump(spec))
    unpaired = write_table(load_recipe(str(recipe_path)), tmp_path / "out", "abc")["comparisons"][0]
    assert unpaired["tests"][0]["verdict"] == "no difference shown" and "pending" not in unpaired
    spec["rows"].append({"name": "kd, seed 2", "checkpoint": "x/kd-seed-2"})
    recipe_path.write_text(yaml.safe_dump(spec))
    interim = write_table(load_recipe(str(recipe_path)), tmp_path / "out", "abc")["comparisons"][0]
    assert interim["tests"][0]["diffs"] == [1.0, 0.0] and "verdict" not in interim["tests"][0]
    assert interim["pending"].endswith("2 pre-registered rows not scored yet (kd, seed 2, alone, seed 2)")
    del spec["rows"][-2:]
    recipe_path.write_text(yaml.safe_dump(spec))
    table = write_table(load_recipe(str(recipe_path)), tmp_path / "out", "abc")
    assert [g["b"] for g in ahead["gaps"]] == ["alone, seed 0", "alone, seed 1"]
    assert ahead["gaps"][0]["mean"] == 1.0 and ahead["gaps"][1]["mean"] == 0.0
    assert "stage 2 only" in later["pending"]
    assert table["arms"]["alone"]["sr"]["mean"] == 0.5
    t2 = json.loads((tmp_path / "t2.json").read_text())
    entries = {e["name"]: e for e in t2["entries"]}
    assert entries["alone"]["share_of_reference"]["sr"] == 0.5 and entries["kd"]["sr"] == 1.0
    assert entries["missing"] == {"name": "missing", "pending": True} and not t2["complete"]
    # an arm's parameters come from any seed whose weights are on this machine, not only its first
    rows = [{k: v for k, v in r.items() if k != "parameters"} for r in table["rows"]]
    next(r for r in rows if r["name"] == "alone, seed 1")["parameters"] = 7
    t2 = summary_table(load_recipe(str(recipe_path)), {**table, "rows": rows})
    assert {e["name"]: e for e in t2["entries"]}["alone"]["parameters"] == 7


def test_count_parameters_reads_the_safetensors_header(tmp_path):
    import torch
    from safetensors.torch import save_file

    from minivln.experiment import count_parameters

    save_file({"a": torch.zeros(3, 4), "b": torch.zeros(5)}, str(tmp_path / "model.safetensors"))
    assert count_parameters(tmp_path / "model.safetensors") == 17
