"""Where the REVERIE rows lose: reaching the goal (oracle SR) against stopping there (SR / oracle SR).

Reads a table of ``minivln experiment`` (its rows' scores and gzipped submissions) and writes, per learned
row: SR, oracle SR (the trajectory passed a goal viewpoint), SR / oracle SR (how often it stops where
it could have, roughly: a success always passes a goal, so the ratio is at most 1), trajectory length,
and the mean number of viewpoint changes per trajectory.  No network is run; every figure comes from the table's files.

    python studies/reverie_teacher/stops.py --table docs/results/reverie_prereg_table3.json \
        --out studies/reverie_teacher/stops.json
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path


def moves(trajectory: list[list]) -> int:
    """Viewpoint changes along a submitted trajectory (``[[viewpoint, heading, elevation], ...]``)."""
    return sum(1 for a, b in zip(trajectory, trajectory[1:]) if a[0] != b[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", required=True, help="a table JSON written by minivln experiment")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    table = json.loads(Path(args.table).read_text())
    rows = {}
    for r in table["rows"]:
        if r.get("picker") or not r.get("run"):  # pickers walk their run's trajectories; random: no run
            continue
        sub = json.loads(gzip.open(r["submission"]).read())
        rows[r["name"]] = {
            "run": r["run"], "sr": round(r["sr"], 4), "oracle_sr": round(r["oracle_sr"], 4),
            "sr_over_oracle_sr": round(r["sr"] / r["oracle_sr"], 3),
            "trajectory_length": round(r["trajectory_length"], 2),
            "mean_moves": round(sum(moves(e["trajectory"]) for e in sub) / len(sub), 2),
            "episodes": len(sub)}
    out = {"table": args.table, "commit": table.get("commit"), "written": table.get("written"), "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
