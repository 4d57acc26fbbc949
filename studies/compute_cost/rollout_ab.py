"""DAgger iterations and evaluation rollouts, the agent's ways against each other, interleaved in one
process: the reference's full batch at every step (``full``), only the samples still navigating
(``compact``, the default) and, for DAgger, the two rollouts of an iteration as one batch
(``compact+merged``, ``merge_rollouts``).  Seconds per iteration and the aten operations one
iteration dispatches (forward + backward + optimizer: what becomes kernel launches on a GPU).

    python studies/compute_cost/rollout_ab.py --features FEATS.hdf5 --presets minivln-cpu duet-cpu \
        --init minivln-cpu=RUN/model duet-cpu=../shared/teachers/duet-cpu-r2r-finetuned \
        --iters 5 --json docs/results/rollout_ab.json

Timings are ratios within one run (the same process; the order of the settings rotates every
iteration; every setting sees the same batches, its own copy of the model trains); the op counts do
not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from minivln.bench.train import _make_step
from minivln.data.datasets import load_episodes
from minivln.env.env import NavBatchEnv
from minivln.paths import atomic_write_text
from minivln.training.distributed import seed_everything
from minivln.training.finetune import (
    FinetuneConfig,
    build_model,
    make_task,
    prepare_data,
)

# aten ops that only relabel memory or allocate (no kernel on a GPU)
VIEWS = {"view", "_unsafe_view", "expand", "as_strided", "t", "transpose", "permute", "slice", "select",
         "unsqueeze", "squeeze", "detach", "alias", "split", "split_with_sizes", "unbind", "narrow",
         "reshape", "_reshape_alias", "lift_fresh", "empty", "empty_strided", "empty_like", "chunk",
         "unfold", "diagonal"}
SETTINGS = {"full": (False, False), "compact": (True, False), "compact+merged": (True, True)}


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def summary(times: list[float], ops: dict[str, int]) -> dict:
    return {"s_per_it": statistics.median(times), "all_s": [round(x, 3) for x in times],
            "aten_ops": sum(ops.values()), "compute_ops": sum(v for k, v in ops.items() if k not in VIEWS)}


def dagger(preset: str, args: argparse.Namespace) -> dict:
    steps = {}
    for name, (compact, merge) in SETTINGS.items():
        cfg = FinetuneConfig(model=preset, data_dir=args.data_dir, features=args.features,
                             batch_size=args.batch_size, max_instr_len=80, merge_rollouts=merge,
                             init_checkpoint=args.init.get(preset, ""))
        seed_everything(0)
        model = build_model(cfg)
        res = prepare_data(cfg, Path("."), model.config.image_feat_size, model.config.obj_feat_size)
        task = make_task(cfg, model, res)
        task.agent.compact = compact
        steps[name] = _make_step(model, task, torch.device("cpu"), lr=cfg.train.optim.lr)
    times: dict[str, list[float]] = {k: [] for k in steps}
    ops: dict[str, dict[str, int]] = {}
    names = list(steps)
    for i in range(args.iters + 2):  # 0: warm-up, 1: op count (not timed), then timed
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            t0 = time.perf_counter()
            if i == 1:
                with OpCounter() as c:
                    steps[name](i)
                ops[name] = dict(c.ops)
            else:
                steps[name](i)
            dt = time.perf_counter() - t0
            if i >= 2:
                times[name].append(dt)
            print(f"dagger {preset} {name} iteration {i}: {dt:.2f} s", flush=True)
    return {name: summary(times[name], ops[name]) for name in names}


def evaluation(preset: str, args: argparse.Namespace) -> dict:
    """Arg-max rollouts (no gradient) on the first ``--eval-episodes`` val_unseen instructions."""
    cfg = FinetuneConfig(model=preset, data_dir=args.data_dir, features=args.features, max_instr_len=80,
                         init_checkpoint=args.init.get(preset, ""))
    seed_everything(0)
    model = build_model(cfg).eval()
    res = prepare_data(cfg, Path("."), model.config.image_feat_size, model.config.obj_feat_size)
    agent = make_task(cfg, model, res).agent
    eps = load_episodes("r2r", "val_unseen", res.data_dir)[: args.eval_episodes]
    env = NavBatchEnv(eps, res.graphs, batch_size=args.eval_batch, features=res.features, max_steps=15)
    times: dict[str, list[float]] = {"full": [], "compact": []}
    results = {}
    for i in range(args.iters + 1):
        for name in (("full", "compact") if i % 2 == 0 else ("compact", "full")):
            agent.compact = name == "compact"
            t0 = time.perf_counter()
            with torch.no_grad():
                out = [r for b in env.iter_batches() for r in agent.rollout(env, b, "argmax").results]
            dt = time.perf_counter() - t0
            if i >= 1:
                times[name].append(dt)
            results[name] = out
            print(f"eval {preset} {name} pass {i}: {dt:.2f} s", flush=True)
    same = results["full"] == results["compact"]
    return {name: {"s_per_pass": statistics.median(t), "all_s": [round(x, 3) for x in t]}
            for name, t in times.items()} | {"same_trajectories": same, "episodes": len(eps)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", required=True)
    ap.add_argument("--data-dir", default="")
    ap.add_argument("--presets", nargs="+", default=["minivln-cpu", "duet-cpu"])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--eval-episodes", type=int, default=64)
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--init", nargs="*", default=[], metavar="PRESET=DIR",
                    help="start PRESET from these weights (a trained model: episodes end as a trained agent's do)")
    ap.add_argument("--json")
    args = ap.parse_args()
    args.init = dict(item.split("=", 1) for item in args.init)
    torch.set_num_threads(1)
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
              "torch": torch.__version__, "threads": 1, "batch_size": args.batch_size,
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True).stdout.strip(),
              "features": args.features, "init": args.init,
              "dagger": {}, "eval": {}}
    for preset in args.presets:
        report["dagger"][preset] = dagger(preset, args)
        report["eval"][preset] = evaluation(preset, args)
        print(json.dumps({"dagger": report["dagger"][preset], "eval": report["eval"][preset]}, indent=1),
              flush=True)
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
