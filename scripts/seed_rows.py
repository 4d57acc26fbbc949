"""Rows of a table over fine-tuning seeds: each group's values per seed, mean and standard deviation over
seeds, and the difference of two groups paired by seed (mean ± its standard error over seeds, next to
the mean of the per-episode standard errors). Over seeds is the error that decides a reading here:
one run's SR moves from seed to seed by more than the episodes' standard error.

    python scripts/seed_rows.py docs/results/r2r_table3_gap.json \
        "two-stage, continued teacher" none
    python scripts/seed_rows.py docs/results/r2r_table3_gap.json "two-stage, continued teacher" two-stage \
        --table-b docs/results/r2r_table3.json

A group is every row whose name is GROUP or "GROUP, seed N" (the tables' naming); rows pair by their
``seed`` field.  ``--plot OUT.png`` draws the pairs: one line per seed from group B to group A, the
means with their standard error over seeds, and ``--ref`` rows (e.g. the teacher) as horizontal lines.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import textwrap
from pathlib import Path

from minivln.training.plot import new_figure, save_png


def group_rows(rows: list[dict], name: str) -> dict[int, dict]:
    out = {}
    for r in rows:
        if r["name"] == name or r["name"].startswith(name + ", seed "):
            out[int(r.get("seed") or 0)] = r
    if not out:
        raise SystemExit(f"no row named {name!r} (or {name!r}, seed N)")
    return out


def mean_se(values: list[float]) -> tuple[float, float]:
    """The mean and its standard error over the values (NaN for one value)."""
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return statistics.mean(values), se


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
    ap.add_argument("--plot", help="write a picture of the pairs here (PNG)")
    ap.add_argument("--ref", nargs="*", default=[], help="rows drawn as horizontal lines in the picture")
    args = ap.parse_args()
    table = json.load(open(args.table))
    rows = table["rows"]
    a = group_rows(rows, args.a)
    b = group_rows(json.load(open(args.table_b))["rows"] if args.table_b else rows, args.b)
    describe(args.a, a, args.metrics)
    describe(args.b, b, args.metrics)
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise SystemExit("the two groups share no seed")
    for k in args.metrics:
        d = [a[s][k] - b[s][k] for s in seeds]
        m, se = mean_se(d)
        ep_se = statistics.mean(math.hypot(a[s].get(f"{k}_se", 0.0), b[s].get(f"{k}_se", 0.0)) for s in seeds)
        print(f"{args.a} - {args.b} {k}, paired by seed ({len(seeds)}): {m:+.3f} ± {se:.3f} over seeds "
              f"({m / se if se else float('nan'):+.1f} s.e.); per seed "
              + ", ".join(f"{x:+.3f}" for x in d) + f"; episodes' s.e. of one difference (unpaired) about {ep_se:.3f}")
    if args.plot:
        by_name = {r["name"]: r for r in rows}
        missing = [name for name in args.ref if name not in by_name]
        if missing:
            raise SystemExit(f"--ref: no row named {', '.join(map(repr, missing))} in {args.table}")
        refs = {name: by_name[name] for name in args.ref}
        plot_pairs(Path(args.plot), args.a, args.b, a, b, seeds, args.metrics, refs,
                   title=f"{table.get('table') or Path(args.table).stem}: paired by seed")
        print(f"wrote {args.plot}")


def plot_pairs(out: Path, name_a: str, name_b: str, a: dict[int, dict], b: dict[int, dict], seeds: list[int],
               metrics: list[str], refs: dict[str, dict], title: str) -> None:
    """One panel per metric: group B at x=0 and group A at x=1, a line per seed joining its two runs,
    each group's mean ± standard error over seeds, and reference rows as dashed lines."""
    fig = new_figure(4.2 * len(metrics), 4.6)
    axes = fig.subplots(1, len(metrics), squeeze=False)
    for ax, k in zip(axes[0], metrics):
        span = max(100 * max(g[s][k] for g in (a, b) for s in seeds) - 100 * min(g[s][k] for g in (a, b) for s in seeds), 1.0)
        label_y = -math.inf
        for s in sorted(seeds, key=lambda s: a[s][k]):
            va, vb = 100 * a[s][k], 100 * b[s][k]
            ax.plot([0, 1], [vb, va], "-o", color="tab:green" if va > vb else "tab:red", alpha=0.7, lw=1.2, ms=4)
            label_y = max(va, label_y + 0.045 * span)  # labels of close values stacked, not overlapping
            ax.annotate(f"seed {s}", (1, va), xytext=(1.07, label_y), textcoords="data", fontsize=7, va="center")
        for x, group in ((0, b), (1, a)):
            m, se = mean_se([100 * group[s][k] for s in seeds])
            xm = 1.42 if x else -0.15  # group A's mean right of the seeds' labels
            ax.errorbar([xm], [m], yerr=[0.0 if math.isnan(se) else se], fmt="D", color="black", capsize=4, ms=6)
            ax.annotate(f"mean {m:.1f}", (xm, m), xytext=(8 if x else -8, 0),
                        textcoords="offset points", fontsize=8, va="center", ha="left" if x else "right")
        for j, (name, r) in enumerate(refs.items()):
            ax.axhline(100 * r[k], ls="--", lw=1, color=f"C{j}", label=f"{name} {100 * r[k]:.1f}")
        m_d, se_d = mean_se([100 * (a[s][k] - b[s][k]) for s in seeds])
        ax.set_title(f"{k.upper()}: {name_a} - {name_b} = {m_d:+.1f} ± {se_d:.1f}\n"
                     f"(points, paired over {len(seeds)} seeds)", fontsize=9)
        ax.set_xticks([0, 1], [name_b, name_a], fontsize=8)
        ax.set_xlim(-0.7, 2.0)
        ax.set_ylabel(f"{k.upper()} (% of episodes)")
        ax.grid(axis="y", alpha=0.3)
        if refs:
            ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(textwrap.fill(title, width=int(13 * 4.2 * len(metrics))), fontsize=10)  # ~13 characters an inch at 10 pt
    fig.tight_layout()
    save_png(fig, out)


if __name__ == "__main__":
    main()
