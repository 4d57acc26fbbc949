"""Paired differences between rows of a table: the same episodes, so the standard error of a
difference is that of the per-episode differences (smaller than from the two rows' own errors).

    python scripts/paired_rows.py docs/results/r2r_table3.json two-stage:none stage-1-only:none ...
"""

from __future__ import annotations

import json
import math
import sys

from minivln.evaluation.evaluator import Evaluator, load_submission
from minivln.experiment import slug


def main() -> None:
    table = json.load(open(sys.argv[1]))
    rows = {slug(r["name"]): r for r in table["rows"]}
    ev = Evaluator(table["task"], table["split"])
    per = {}
    for pair in sys.argv[2:]:
        a, b = pair.split(":")
        for name in (a, b):
            if name not in per:
                per[name] = ev.score(load_submission(rows[name]["submission"]))[1]
        ids = sorted(per[a])
        for k in ("sr", "spl"):
            d = [per[a][i][k] - per[b][i][k] for i in ids]
            m = sum(d) / len(d)
            se = math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d))
            print(f"{a} - {b} {k}: {m:+.3f} ± {se:.3f} ({m / se:+.1f} s.e.)")


if __name__ == "__main__":
    main()
