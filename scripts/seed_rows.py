"""Rows of a table over fine-tuning seeds: each group's values per seed, mean and standard deviation over
seeds, and the difference of two groups paired by seed (mean ± its standard error over seeds, next to
the mean of the per-episode standard errors). Over seeds is the error that decides a reading here:
one run's SR moves from seed to seed by more than the episodes' standard error.

    python scripts/seed_rows.py docs/results/r2r_table3_gap.json \
        "two-stage, continued teacher" none
    python scripts/seed_rows.py docs/results/r2r_table3_gap.json "two-stage, continued teacher" two-stage \
        --table-b docs/results/r2r_table3.json

A group is every row whose name is GROUP or "GROUP, seed N" (the tables' naming); rows pair by their
``seed`` field.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics


def group_rows(rows: list[dict], name: str) -> dict[int, dict]:
    out = {}
    for r in rows:
        if r["name"] == name or r["name"].startswith(name + ", seed "):
            out[int(r.get("seed") or 0)] = r
    if not out:
        raise SystemExit(f"no row named {name!r} (or {name!r}, seed N)")
    return out


def describe(name: str, by_seed: dict[int, dict], metrics: list[str]) -> None:
    for k in metrics:
        vals = [by_seed[s][k] for s in sorted(by_seed)]
        sd = statistics.stdev(vals) if len(vals) > 1 else float("nan")
        per = ", ".join(f"seed {s}: {by_seed[s][k]:.3f}" for s in sorted(by_seed))
        print(f"{name} {k}: {per}; mean {statistics.mean(vals):.3f}, SD over seeds {sd:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("table")
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--metrics", nargs="+", default=["sr", "spl"])
    ap.add_argument("--table-b", help="take group B from this table (e.g. the same recipe with another teacher)")
    args = ap.parse_args()
    rows = json.load(open(args.table))["rows"]
    a = group_rows(rows, args.a)
    b = group_rows(json.load(open(args.table_b))["rows"] if args.table_b else rows, args.b)
    describe(args.a, a, args.metrics)
    describe(args.b, b, args.metrics)
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise SystemExit("the two groups share no seed")
    for k in args.metrics:
        d = [a[s][k] - b[s][k] for s in seeds]
        m = statistics.mean(d)
        se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
        ep_se = statistics.mean(math.hypot(a[s].get(f"{k}_se", 0.0), b[s].get(f"{k}_se", 0.0)) for s in seeds)
        print(f"{args.a} - {args.b} {k}, paired by seed ({len(seeds)}): {m:+.3f} ± {se:.3f} over seeds "
              f"({m / se if se else float('nan'):+.1f} s.e.); per seed "
              + ", ".join(f"{x:+.3f}" for x in d) + f"; episodes' s.e. of one difference (unpaired) about {ep_se:.3f}")


if __name__ == "__main__":
    main()
