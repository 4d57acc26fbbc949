"""``minivln demo``: the zero-download main job on the built-in toy world.

It builds (or reuses) the seeded toy world and its stand-in visual features, runs agents in the
navigation environment on the toy val_unseen split, scores them with the official metrics and prints
a table.  Everything it writes goes under ``--out`` (default ``runs/demo``): the world, the features,
leaderboard submission files and ``metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from minivln.data.datasets import load_episodes
from minivln.data.graph import Graphs
from minivln.data.toyworld import ensure_toy_world
from minivln.env.env import (
    NavBatchEnv,
    evaluate_policy,
    expert_policy,
    make_random_policy,
    write_submission,
)
from minivln.evaluation.evaluator import Evaluator
from minivln.features.hdf5 import FeatureStore
from minivln.features.standin import build_standin
from minivln.paths import atomic_write_text

SHOWN = ("sr", "spl", "nav_error", "oracle_sr", "ndtw", "cls", "trajectory_length")
HEADERS = ("SR", "SPL", "NE (m)", "OSR", "nDTW", "CLS", "TL (m)")


def run_demo(out: str | Path = "runs/demo", seed: int = 0, split: str = "val_unseen", progress: bool = True) -> dict:
    out = Path(out)
    t0 = time.perf_counter()
    data_dir = ensure_toy_world(out / "toyworld", seed=seed)
    feats_path = out / "features" / "standin_views.hdf5"
    if not feats_path.is_file():
        build_standin(data_dir, feats_path, progress=progress)
    store = FeatureStore(feats_path)
    print(f"toy world: {data_dir}  ({time.perf_counter() - t0:.1f} s to build or reuse)")
    print(f"features:  {feats_path}  dim {store.dim}  {'STAND-IN (not image features)' if store.is_standin else ''}")

    episodes = load_episodes("r2r", split, data_dir)
    env = NavBatchEnv(episodes, Graphs(data_dir), batch_size=16, features=store)
    evaluator = Evaluator("r2r", split, data_dir)
    agents = {
        "expert (shortest path)": expert_policy,
        # STOP with probability 1/(k+1) at a viewpoint with k neighbours: the random agent picks
        # uniformly among the k moves and STOP
        "random walk": make_random_policy(seed, stop_prob="uniform"),
    }
    results: dict[str, dict] = {"features": "stand-in" if store.is_standin else "real", "split": split}
    for name, policy in agents.items():
        preds = evaluate_policy(env, policy, progress=False)
        slug = name.split()[0]
        write_submission(out / f"submission_{slug}.json", preds)
        summary, _ = evaluator.score(preds)
        results[slug] = summary
    atomic_write_text(out / "metrics.json", json.dumps(results, indent=2))

    print(f"\nR2R-style {split} of the toy world, {len(episodes)} instructions (rates in %):")
    print(f"{'agent':<24}" + "".join(f"{h:>9}" for h in HEADERS))
    for name in agents:
        m = results[name.split()[0]]
        cells = [f"{100 * m[k]:.2f}" if k in ("sr", "spl", "oracle_sr", "ndtw", "cls") else f"{m[k]:.2f}" for k in SHOWN]
        print(f"{name:<24}" + "".join(f"{c:>9}" for c in cells))
    print(f"\nwrote {out / 'metrics.json'} and the submissions; total {time.perf_counter() - t0:.1f} s")
    return results


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="zero-download demo: toy world, stand-in features, agents, official metrics")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="val_unseen", choices=["train", "val_seen", "val_unseen"])
    p.set_defaults(func=lambda a: run_demo(a.out, a.seed, a.split) and 0)
