"""Paired differences between rows of a table (or between two submission files): the same episodes,
so the standard error of a difference is that of the per-episode differences (smaller than from the
two rows' own errors).

    python scripts/paired_rows.py docs/results/r2r_table3.json two-stage:none stage-1-only:none ...
    python scripts/paired_rows.py --files r2r val_unseen A/submission_val_unseen.json B/submission_val_unseen.json

For REVERIE (task reverie) the grounding metrics RGS and RGSPL are paired too.
"""

from __future__ import annotations

import json
import math
import sys

from minivln.evaluation.evaluator import Evaluator, load_submission
from minivln.experiment import slug


def paired(per_a: dict, per_b: dict, a: str, b: str) -> None:
    ids = sorted(per_a)
    if sorted(per_b) != ids:
        sys.exit(f"{a} and {b} do not hold the same episodes")
    first = per_a[ids[0]]
    for k in [k for k in ("sr", "spl", "rgs", "rgspl") if k in first]:  # REVERIE adds the grounding metrics
        d = [per_a[i][k] - per_b[i][k] for i in ids]
        m = sum(d) / len(d)
        se = math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d))
        print(f"{a} - {b} {k}: {m:+.4f} ± {se:.4f} ({m / se if se else float('nan'):+.1f} s.e.)")


def main() -> None:
    if sys.argv[1] == "--files":
        task, split, fa, fb = sys.argv[2:6]
        ev = Evaluator(task, split)
        paired(ev.score(load_submission(fa))[1], ev.score(load_submission(fb))[1], fa, fb)
        return
    table = json.load(open(sys.argv[1]))
    rows = {slug(r["name"]): r for r in table["rows"]}
    ev = Evaluator(table["task"], table["split"])
    per = {}
    for pair in sys.argv[2:]:
        a, b = pair.split(":")
        for name in (a, b):
            if name not in per:
                per[name] = ev.score(load_submission(rows[name]["submission"]))[1]
        paired(per[a], per[b], a, b)


if __name__ == "__main__":
    main()
