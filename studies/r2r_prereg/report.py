"""The pre-registered R2R tables (docs/preregistration.md) as markdown: what the Results section of
that page, docs/distillation.md and the README show, written from the tables that ``minivln experiment``
keeps in docs/results, so that no number is copied by hand.

    python studies/r2r_prereg/report.py               # every table; refuses while one is incomplete
    python studies/r2r_prereg/report.py --interim     # what is scored so far, marked INTERIM, no verdict
    python studies/r2r_prereg/report.py --readme      # the README's short table (Table III only)

Table III: every row (per seed), each arm's mean ± standard error over its seeds, the references
(teacher, random walker), the pre-registered tests (§4: the primary, the four secondary ones with Holm's
correction, SPL with no threshold) and the student's share of the teacher.  Tables IV and V: each row's
mean ± s.e. over seeds on val_unseen and val_seen and its difference from the reference row paired by
seed (descriptive only, as §4 says).  Percentages of instructions throughout; a difference is in points.

The verdict is the driver's (``minivln/evaluation/stats.py``), which writes one only when every
pre-registered row is scored; this script only words it: the primary hypothesis (two-stage raises SR
over the student alone) is "supported" when the driver's verdict is "two-stage > none" (its two-sided
test has p below the threshold and the mean difference is positive), and "not supported" otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from minivln.evaluation.stats import arms, mean_se

ROOT = Path(__file__).resolve().parents[2]
# Table III's arms in the order the page shows them, and its two reference rows
TABLE3_ARMS = ["two-stage", "stage 2 only", "stage 1 only", "none"]
REFERENCES = {"teacher": "teacher (shared fine-tuned `duet-cpu`, 25.6M)", "random": "random walker"}
COLUMNS = [("sr", "SR"), ("spl", "SPL"), ("oracle_sr", "OSR"), ("nav_error", "NE (m)"),
           ("trajectory_length", "TL (m)"), ("ndtw", "nDTW")]
PERCENT = {"sr", "spl", "oracle_sr", "ndtw", "sdtw", "cls"}


class Incomplete(SystemExit):
    """A table has pending rows and ``--interim`` was not given."""


def load(results: Path, name: str) -> dict | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def fmt(metric: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{100 * value:.1f}" if metric in PERCENT else f"{value:.2f}"


def no_se(se: float | None) -> bool:
    """True when there is no standard error: NaN in memory, null in a table's JSON (one seed)."""
    return se is None or math.isnan(se)


def fmt_pm(mean: float, se: float | None) -> str:
    """``mean ± se`` in percent (se left out when there is none)."""
    if no_se(se):
        return f"{100 * mean:.1f}"
    return f"{100 * mean:.1f} ± {100 * se:.1f}"


def fmt_diff(mean: float, se: float | None) -> str:
    """A paired difference in points, ``+d ± se`` (se left out when there is none)."""
    return f"{100 * mean:+.1f}" if no_se(se) else f"{100 * mean:+.1f} ± {100 * se:.1f}"


def fmt_p(p: float | None) -> str:
    if p is None or math.isnan(p):
        return "n/a"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def arm_mean(rows: dict[int, dict], metric: str) -> tuple[float, float]:
    """Mean and standard error over seeds of ``metric`` (the driver's ``mean_se``)."""
    return mean_se([float(r[metric]) for r in rows.values() if r.get(metric) is not None])


def check_complete(table: dict, name: str, interim: bool) -> None:
    if table.get("pending") and not interim:
        raise Incomplete(f"{name}: {len(table['pending'])} pre-registered rows are not scored yet "
                         f"({', '.join(table['pending'][:4])}{', ...' if len(table['pending']) > 4 else ''}); "
                         "pass --interim for what is scored so far (no verdict)")


def provenance(table: dict, name: str) -> str:
    state = "complete" if table.get("complete") else f"INTERIM: {len(table.get('pending', []))} rows pending"
    return (f"`docs/results/{name}.json` ({state}; {table.get('features', '?')} features, {table['split']}, "
            f"runs pinned at {str(table.get('commit', '?'))[:7]}, written {table.get('written', '?')})")


def table3(t3: dict, t2: dict | None) -> list[str]:
    by_seed = arms(t3["rows"])
    out = [(f"**Table III** from {provenance(t3, 'r2r_prereg_table3')}, % of instructions; ± is the standard "
           "error over seeds for an arm's mean."), "",
           "| row | pretraining seed | " + " | ".join(c for _, c in COLUMNS) + " |",
           "|---|---:|" + "---:|" * len(COLUMNS)]
    for arm in TABLE3_ARMS + sorted(set(by_seed) - set(TABLE3_ARMS)):
        seeds = by_seed.get(arm, {})
        for seed in sorted(seeds):
            r = seeds[seed]
            out.append(f"| {r['name']} | {r.get('pretrain_seed', '')} | "
                       + " | ".join(fmt(k, r.get(k)) for k, _ in COLUMNS) + " |")
        if seeds:
            cells = [fmt_pm(*arm_mean(seeds, k)) if k in PERCENT else fmt(k, arm_mean(seeds, k)[0])
                     for k, _ in COLUMNS]
            span = f"seeds {min(seeds)}-{max(seeds)}" if len(seeds) > 1 else f"seed {min(seeds)}"
            out.append(f"| **{arm}** (mean over {span}) | | " + " | ".join(f"**{c}**" for c in cells) + " |")
    for row in t3["rows"]:
        if row["name"] in REFERENCES:
            out.append(f"| {REFERENCES[row['name']]} | | " + " | ".join(fmt(k, row.get(k)) for k, _ in COLUMNS) + " |")
    for pending in t3.get("pending", []):
        out.append(f"| {pending} | | pending |" + " |" * (len(COLUMNS) - 1))
    out += ["", *tests(t3), *share(t2)]
    return out


def primary_reading(test: dict) -> str:
    if "verdict" not in test:
        return "no verdict (interim)"
    supported = test["verdict"] == f"{test['a']} > {test['b']}"  # the driver's: p below alpha, a ahead
    return f"**{'supported' if supported else 'not supported'}** (threshold p < {test.get('alpha', 0.05)})"


def tests(t3: dict) -> list[str]:
    groups = {c["name"]: c for c in t3.get("comparisons", [])}
    out = []
    if "primary" in groups:
        for t in groups["primary"]["tests"]:
            seeds = t.get("seeds", [])
            out.append(f"**Primary** ({t['a']} − {t['b']}, {t['metric'].upper()}, paired by seed over "
                       f"{len(seeds)} seeds, two-sided t-test): {fmt_diff(t['mean'], t['se'])} points, "
                       f"t = {t['t']:.2f}, df = {t['df']}, p = {fmt_p(t['p'])}: {primary_reading(t)}.")
        out.append("")
    for name, title in (("secondary", "Secondary (Holm-corrected across the four)"),
                        ("descriptive", "SPL (reported, no threshold)")):
        if name not in groups:
            continue
        out += [f"**{title}**:", "", "| comparison | seeds | difference (points) | p | Holm p | reading |",
                "|---|---|---:|---:|---:|---|"]
        for t in groups[name]["tests"]:
            if "not_run" in t:
                out.append(f"| {t['a']} − {t['b']} ({t['metric'].upper()}) | | not run: {t['not_run']} | | | |")
                continue
            seeds = t["seeds"]
            span = f"{min(seeds)}-{max(seeds)}" if seeds else "none"
            reading = t.get("verdict", "" if name == "descriptive" else "no verdict (interim)")
            out.append(f"| {t['a']} − {t['b']} ({t['metric'].upper()}) | {span} | {fmt_diff(t['mean'], t['se'])} | "
                       f"{fmt_p(t['p'])} | {fmt_p(t.get('p_holm')) if name != 'descriptive' else ''} | {reading} |")
        out.append("")
    return out


def share(t2: dict | None) -> list[str]:
    if not t2:
        return []
    out = [("**The student's share of the teacher** (`docs/results/r2r_prereg_table2.json`, means over the seeds "
           "scored; parameters where the run's weights were on the machine that wrote the table):"), "",
           "| | parameters | SR | SPL | share of the teacher's SR | SPL | parameters |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for e in t2["entries"]:
        s = e.get("share_of_reference", {})
        params = f"{e['parameters'] / 1e6:.1f}M" if e.get("parameters") else ""
        sr = fmt_pm(e["sr"], e.get("sr_se_over_seeds", float("nan")))
        spl = fmt_pm(e["spl"], e.get("spl_se_over_seeds", float("nan")))
        out.append(f"| {e['name']} | {params} | {sr} | {spl} | "
                   + " | ".join(f"{100 * s[k]:.0f}%" if s.get(k) is not None else "" for k in ("sr", "spl", "parameters"))
                   + " |")
    return out + [""]


def ablation(unseen: dict, seen: dict | None, name: str, reference: str) -> list[str]:
    """Table IV or V: each arm's mean ± s.e. over seeds on both splits, and its paired difference from
    ``reference`` (the driver's descriptive comparisons on val_unseen; the same on val_seen)."""
    splits = [("val_unseen", unseen)] + ([("val_seen", seen)] if seen else [])
    arms_of = {split: arms(t["rows"]) for split, t in splits}
    diffs = {split: {(c["a"], c["metric"]): c for g in t.get("comparisons", []) for c in g["tests"] if c["b"] == reference}
             for split, t in splits}
    head = " | ".join(f"{s} SR | {s} SPL | Δ SR {s}" for s, _ in splits)
    out = [f"**{unseen['table']}** from {provenance(unseen, name)}"
           + (f" and {provenance(seen, name + '_seen')}" if seen else "")
           + ", % of instructions, mean ± s.e. over seeds; Δ: the difference from "
           f"**{reference}** paired by seed (points). Descriptive only.", "",
           f"| row | seeds | {head} |", "|---|---|" + "---:|" * (3 * len(splits))]
    order = [reference] + sorted(a for a in arms_of["val_unseen"] if a != reference)
    for arm in order:
        seeds = arms_of["val_unseen"].get(arm, {})
        cells = []
        for split, _ in splits:
            rows = arms_of[split].get(arm, {})
            d = diffs[split].get((arm, "sr"))
            cells += [fmt_pm(*arm_mean(rows, "sr")) if rows else "", fmt_pm(*arm_mean(rows, "spl")) if rows else "",
                      "" if arm == reference else fmt_diff(d["mean"], d["se"]) if d and d.get("seeds") else ""]
        span = ", ".join(str(s) for s in sorted(seeds))
        out.append(f"| {arm} | {span} | " + " | ".join(cells) + " |")
    for split, t in splits:
        if pending := t.get("pending", []):
            out.append(f"\nPending on {split} ({len(pending)}): {', '.join(pending)}.")
    return out + [""]


def readme(t3: dict, t2: dict | None) -> list[str]:
    """The README's short table: teacher, the two primary arms, their difference, the share."""
    by_seed = arms(t3["rows"])
    prim = next((t for g in t3.get("comparisons", []) if g["name"] == "primary" for t in g["tests"]), None)
    teacher = next((r for r in t3["rows"] if r["name"] == "teacher"), None)
    out = ["| R2R val_unseen, all 2,349 instructions | SR | SPL | paper (full scale) |", "|---|---:|---:|---|"]
    if teacher:
        out.append(f"| teacher (shared fine-tuned `duet-cpu`) | {fmt('sr', teacher['sr'])} | {fmt('spl', teacher['spl'])} | |")
    for arm, label, paper in (("two-stage", "student, two-stage distillation", "78.80 / 70.17"),
                              ("none", "student trained alone", "74.16 SR")):
        seeds = by_seed.get(arm, {})
        out.append(f"| {label} (mean of {len(seeds)} seeds, each its own pretraining) | "
                   f"{fmt_pm(*arm_mean(seeds, 'sr'))} | {fmt_pm(*arm_mean(seeds, 'spl'))} | {paper} |")
    if prim:
        spl = next((t for g in t3["comparisons"] if g["name"] == "descriptive" for t in g["tests"]
                    if (t["a"], t["b"]) == (prim["a"], prim["b"])), None)
        out.append(f"| two-stage − alone, paired by seed (p, pre-registered) | **{fmt_diff(prim['mean'], prim['se'])}** "
                   f"(p = {fmt_p(prim['p'])}) | {fmt_diff(spl['mean'], spl['se']) if spl else ''} | +4.6 SR |")
    if t2:
        two = next((e for e in t2["entries"] if e["name"] == "two-stage"), None)
        if two:
            out.append(f"| two-stage student's share of the teacher's SR | {100 * two['share_of_reference']['sr']:.0f}% | | 97% |")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=ROOT / "docs" / "results", help="where the tables are")
    ap.add_argument("--interim", action="store_true", help="write incomplete tables too, marked INTERIM (no verdict)")
    ap.add_argument("--readme", action="store_true", help="only the README's short table")
    args = ap.parse_args(argv)
    t3 = load(args.results, "r2r_prereg_table3")
    if t3 is None:
        raise SystemExit(f"no r2r_prereg_table3.json in {args.results}: run `minivln experiment r2r-prereg-table3 "
                         "--out DIR --table-only` first")
    check_complete(t3, "Table III", args.interim)
    t2 = load(args.results, "r2r_prereg_table2")
    used = [t3]
    out = readme(t3, t2) if args.readme else table3(t3, t2)
    if not args.readme:
        for name, reference in (("r2r_prereg_table4", "txt + pano + fuse"), ("r2r_prereg_table5", "KDWeight 0.1")):
            unseen, seen = load(args.results, name), load(args.results, name + "_seen")
            if unseen is None:
                out.append(f"`{name}.json`: not written yet.\n")
                continue
            for table, label in ((unseen, name), (seen, name + "_seen")):
                if table is not None:
                    check_complete(table, label, args.interim)
                    used.append(table)
            out += ablation(unseen, seen, name, reference)
    if any(t.get("pending") for t in used):
        out.insert(0, "> **INTERIM**: pre-registered rows are still pending; no verdict is read from these numbers.\n")
    print("\n".join(out).rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
