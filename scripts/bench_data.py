"""Time the data layer: graph build (cold and cached) and the expert over R2R val_unseen.

    python scripts/bench_data.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from datetime import date


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default=os.environ.get("MINIVLN_DATA", "../shared/data"))
    args = ap.parse_args()
    os.environ["MINIVLN_CACHE"] = tempfile.mkdtemp(prefix="minivln-bench-")

    from minivln.data import graph
    from minivln.data.datasets import load_episodes
    from minivln.env.env import (
        NavBatchEnv,
        evaluate_policy,
        expert_policy,
        make_random_policy,
    )

    t = time.perf_counter()
    houses = graph.Graphs(args.data_dir).load_all()
    cold = time.perf_counter() - t
    graph._load_house_cached.cache_clear()
    t = time.perf_counter()
    graphs = graph.Graphs(args.data_dir)
    graphs.load_all()
    cached = time.perf_counter() - t
    eps = load_episodes("r2r", "val_unseen", args.data_dir)
    env = NavBatchEnv(eps, graphs, batch_size=64)
    t = time.perf_counter()
    evaluate_policy(env, expert_policy)
    expert = time.perf_counter() - t
    t = time.perf_counter()
    evaluate_policy(env, make_random_policy(0))
    rand = time.perf_counter() - t
    print(f"date {date.today()}  machine {platform.machine()} {os.cpu_count()} cpus  python {platform.python_version()}")
    print(f"graphs: {len(houses)} houses, {sum(len(h) for h in houses.values())} viewpoints")
    print(f"graph build cold   {cold:6.2f} s")
    print(f"graph build cached {cached:6.2f} s")
    print(f"expert, {len(eps)} val_unseen episodes   {expert:6.2f} s")
    print(f"random walk (15 steps), same episodes  {rand:6.2f} s")


if __name__ == "__main__":
    main()
