"""``minivln demo``: the zero-download main job, the whole method on the built-in toy world.

1. builds (or reuses) the seeded toy world and its stand-in visual features;
2. scores the shortest-path expert and a random walker with the official metrics;
3. runs the ``demo`` experiment recipe (``configs/experiments/demo.yaml``, two processes at a time):
   a small DUET teacher pretrained and fine-tuned, the student distilled in two stages from it, and
   the same student trained alone;
4. prints their metrics side by side (each metric's name spelled out once) and draws the table;
5. exports the distilled student to ONNX (fp32 and int8, with the ``deploy`` extra) and times one
   episode of the teacher and of the student on each runtime.

Everything it writes goes under ``--out`` (default ``runs/demo``); a second call reuses what is done.
The numbers are small and use STAND-IN features: they show the pipeline, not the paper's results.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from minivln.bench.model import record_episode, run_episode
from minivln.data.datasets import load_episodes
from minivln.data.graph import Graphs
from minivln.data.toyworld import ensure_toy_world
from minivln.deploy.export import export_model, require_onnx
from minivln.deploy.runtime import OnnxRuntimeDUET
from minivln.env.env import (
    NavBatchEnv,
    evaluate_policy,
    expert_policy,
    make_random_policy,
    write_submission,
)
from minivln.evaluation.evaluator import Evaluator
from minivln.experiment import load_recipe, run_experiment
from minivln.features.hdf5 import FeatureStore
from minivln.features.standin import build_standin
from minivln.model.checkpoint import load_agent_model
from minivln.paths import DataError, atomic_write_text

SHOWN = ("sr", "spl", "nav_error", "oracle_sr", "ndtw", "cls", "trajectory_length")
HEADERS = ("SR", "SPL", "NE (m)", "OSR", "nDTW", "CLS", "TL (m)")


RATE_KEYS = {"sr", "spl", "oracle_sr", "ndtw", "cls"}
EXPLAINED = ("SR = success rate (stops within 3 m of the goal), SPL = success weighted by path length, "
             "NE = navigation error (m from the goal), OSR = oracle success rate (passed within 3 m), "
             "nDTW = normalised dynamic time warping (path fidelity), CLS = coverage weighted by length score, "
             "TL = trajectory length (m); rates in %")


def _metric_row(name: str, m: dict, width: int = 26) -> str:
    cells = [f"{100 * m[k]:.1f}" if k in RATE_KEYS else f"{m[k]:.2f}" for k in SHOWN]
    return f"{name:<{width}}" + "".join(f"{c:>9}" for c in cells)


def run_demo(out: str | Path = "runs/demo", seed: int = 0, split: str = "val_unseen", progress: bool = True,
             train: bool = True, jobs: int = 2) -> dict:
    """The pipeline end to end on the toy world (see the module docstring); returns what it measured."""
    out = Path(out).resolve()
    t0 = time.perf_counter()
    print("[1/5] toy world and its STAND-IN visual features", flush=True)
    data_dir = ensure_toy_world(out / "toyworld", seed=seed)
    feats_path = out / "features" / "standin_views.hdf5"
    if not feats_path.is_file():
        build_standin(data_dir, feats_path, progress=progress)
    store = FeatureStore(feats_path)
    print(f"      world {data_dir}, features {feats_path} ({store.dim}-d, "
          f"{'STAND-IN, not image features' if store.is_standin else 'real'}); {time.perf_counter() - t0:.0f} s")

    print("[2/5] reference agents in the environment: the shortest-path expert and a random walker", flush=True)
    episodes = load_episodes("r2r", split, data_dir)
    env = NavBatchEnv(episodes, Graphs(data_dir), batch_size=16, features=store)
    evaluator = Evaluator("r2r", split, data_dir)
    agents = {
        "expert (shortest path)": expert_policy,
        # STOP with probability 1/(k+1) at a viewpoint with k neighbours: the random agent picks
        # uniformly among the k moves and STOP
        "random walk": make_random_policy(seed, stop_prob="uniform"),
    }
    results: dict[str, Any] = {"features": "stand-in" if store.is_standin else "real", "split": split,
                               "instructions": len(episodes), "agents": {}}
    for name, policy in agents.items():
        preds = evaluate_policy(env, policy, progress=False)
        write_submission(out / f"submission_{name.split()[0]}.json", preds)
        results["agents"][name], _ = evaluator.score(preds)
    table = None
    if train:
        print(f"[3/5] training: a DUET teacher, the student distilled in two stages, the student alone "
              f"({jobs} processes at a time; each line is a run starting or finishing)", flush=True)
        recipe = load_recipe("demo", [f"data_dir={data_dir}", f"features={feats_path}",
                                      f"results={out / 'table.json'}", f"submissions={out / 'submissions'}",
                                      f"plots={out / 'table'}"])
        ok, table = run_experiment(recipe, out / "experiment", jobs=jobs, pin=False)
        if not ok:
            raise DataError(f"a training run of the demo failed: see {out / 'experiment' / 'logs'}")
        for row in table["rows"]:
            if row["name"] != "random":
                results["agents"][row["name"]] = {k: row[k] for k in SHOWN}
    print(f"\n[4/5] R2R-style {split} of the toy world, {len(episodes)} instructions, "
          f"{results['features'].upper()} features")
    print(EXPLAINED)
    print(f"{'agent':<26}" + "".join(f"{h:>9}" for h in HEADERS))
    for name, m in results["agents"].items():
        print(_metric_row(name, m))
    if table is not None:
        print(f"(pictures: {out / 'table_bars.png'}, {out / 'table_curves.png'})")
        results["speed"] = speed(out, progress)
    atomic_write_text(out / "metrics.json", json.dumps(results, indent=2))
    print(f"\nwrote {out / 'metrics.json'}; total {time.perf_counter() - t0:.0f} s")
    return results


def speed(out: Path, progress: bool = True, repeats: int = 7) -> dict[str, Any]:
    """[5/5]: export the distilled student to ONNX and time one episode (batch 1, one thread) of the
    teacher and the student on each runtime, interleaved; replays recorded inputs, so the agent's
    bookkeeping is not in these times."""
    runs = out / "experiment" / "runs"
    teacher, student = load_agent_model(runs / "teacher" / "model"), load_agent_model(runs / "student-kd" / "model")
    torch.set_num_threads(1)
    models: dict[str, Any] = {"teacher (PyTorch)": teacher, "student (PyTorch)": student}
    print("[5/5] deployment: the distilled student exported to ONNX (fp32 + int8), then one episode "
          "timed per model (batch 1, one thread)", flush=True)
    try:
        require_onnx()
    except DataError as exc:
        print(f"      export skipped: {exc}")
    else:
        export_dir = out / "export"
        if export_dir.exists():
            shutil.rmtree(export_dir)
        export_model(student, export_dir, source=str(runs / "student-kd" / "model"))
        for name, variant in (("student (ONNX Runtime)", "fp32"), ("student (ONNX Runtime int8)", "int8")):
            models[name] = OnnxRuntimeDUET(export_dir, variant, threads=1)
        print(f"      exported to {export_dir}")
    episodes = {"teacher (PyTorch)": record_episode(teacher, 1)}
    student_ep = record_episode(student, 1)
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(repeats + 1):  # the first round warms up
        order = list(models) if i % 2 == 0 else list(reversed(models))
        for name in order:
            ms = 1e3 * run_episode(models[name], episodes.get(name, student_ep))["episode"]
            if i:
                times[name].append(ms)
    med = {name: statistics.median(v) for name, v in times.items()}
    base = med["teacher (PyTorch)"]
    print(f"{'model':<30}{'ms / episode':>14}{'speed-up':>10}")
    for name, ms in med.items():
        print(f"{name:<30}{ms:>14.1f}{base / ms:>9.1f}x")
    return {"ms_per_episode": med, "speedup_vs_teacher": {k: base / v for k, v in med.items()},
            "repeats": repeats, "batch": 1, "threads": 1,
            "what": "one 7-step episode of recorded network inputs (agent bookkeeping excluded), median"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="zero-download demo: toy world, stand-in features, agents, official metrics")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="val_unseen", choices=["train", "val_seen", "val_unseen"])
    p.add_argument("--no-train", action="store_true", help="only the toy world and the reference agents (seconds)")
    p.add_argument("--jobs", type=int, default=2, help="training processes at a time")
    p.set_defaults(func=lambda a: run_demo(a.out, a.seed, a.split, train=not a.no_train, jobs=a.jobs) and 0)
