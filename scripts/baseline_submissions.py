#!/usr/bin/env python
"""Write reference submissions for a split, to sanity-check ``minivln eval`` (see docs/metrics.md).

For every instruction of ``--task``/``--split`` it writes, into ``--out-dir``:

* ``gt.json``: the annotated path itself;
* ``shortest.json``: a shortest path from the start to the annotated goal;
* ``stay.json``: the start viewpoint only (the agent stops at once);
* ``random<N>.json``: a random walk of ``--steps`` moves (default 5), each to a uniformly chosen
  graph neighbour (going back allowed), seeded per instruction by ``--seed`` and the instr_id, so
  the file does not depend on the order of the split.

Headings follow the simulator convention (radians from +y, clockwise): the start heading of the
episode, then the direction of each move.  REVERIE files carry ``predObjId``: the target for
``gt.json``, -1 (no object) for the others.

    python scripts/baseline_submissions.py --task r2r --split val_unseen --data-dir ../shared/data --out-dir /tmp/subs
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from minivln.data.datasets import TASKS, Episode, load_episodes
from minivln.data.graph import House, load_house
from minivln.geometry import direction
from minivln.paths import atomic_write_text


def to_trajectory(house: House, viewpoints: list[str], start_heading: float) -> list[list]:
    """``[[vp, heading, elevation], ...]`` facing along each move (the start keeps its heading)."""
    traj = [[viewpoints[0], float(start_heading), 0.0]]
    for a, b in zip(viewpoints[:-1], viewpoints[1:]):
        if a == b:
            traj.append([b, traj[-1][1], traj[-1][2]])
        else:
            heading, elevation, _ = direction(house.position(a), house.position(b))
            traj.append([b, heading, elevation])
    return traj


def random_walk(house: House, start: str, steps: int, rng: random.Random) -> list[str]:
    """``steps`` moves, each to a uniformly drawn neighbour (stops early at a dead end)."""
    path = [start]
    for _ in range(steps):
        options = house.neighbors(path[-1])
        if not options:
            break
        path.append(rng.choice(options))
    return path


def build(episodes: list[Episode], data_dir: Path, steps: int, seed: int) -> dict[str, list[dict]]:
    subs: dict[str, list[dict]] = {"gt": [], "shortest": [], "stay": [], f"random{steps}": []}
    for ep in episodes:
        house = load_house(ep.scan, data_dir)
        walks = {
            "gt": list(ep.path),
            "shortest": house.shortest_path(ep.start, ep.goal),
            "stay": [ep.start],
            f"random{steps}": random_walk(house, ep.start, steps, random.Random(f"{seed}:{ep.instr_id}")),
        }
        for name, vps in walks.items():
            item: dict = {"instr_id": ep.instr_id, "trajectory": to_trajectory(house, vps, ep.heading)}
            if ep.task == "reverie":
                item["predObjId"] = int(ep.obj_id) if name == "gt" and ep.obj_id is not None else -1
            subs[name].append(item)
    return subs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=TASKS, default="r2r")
    p.add_argument("--split", default="val_unseen")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--steps", type=int, default=5, help="moves of the random walk")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    data_dir = Path(args.data_dir)
    episodes = load_episodes(args.task, args.split, data_dir)
    out = Path(args.out_dir)
    for name, items in build(episodes, data_dir, args.steps, args.seed).items():
        atomic_write_text(out / f"{name}.json", json.dumps(items) + "\n")
        print(f"{out / (name + '.json')}: {len(items)} items")
    return 0


if __name__ == "__main__":
    sys.exit(main())
