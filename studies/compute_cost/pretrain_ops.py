"""Operators a pretraining iteration dispatches, per task (MLM, SAP, MRC), split into the data part
(the batch built and moved; pretraining workers build it ahead) and the step part (forward, backward,
clipping, AdamW), which is what an accelerator runs; the view-only operators set aside, as
``minivln bench train --count-ops`` does.  Counted on every one of ``--iters`` consecutive iterations
of the bench's seeded batches; per task, the last iteration of that task is reported, so that no
count holds the optimizer's one-time state (a parameter's first gradient) or a first call's set-up.

    python studies/compute_cost/pretrain_ops.py --features FEATS.hdf5 --presets duet-cpu minivln-cpu --batch-size 64 \
        --iters 9 --json docs/results/ops_count/pretrain-tasks-64.json
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch

from minivln.bench.common import code_version, machine_info
from minivln.bench.train import OpCounter, pretrain_step, split_summary
from minivln.paths import atomic_write_text, resolve_data_dir
from minivln.training.pretrain import PRETRAIN_TASKS


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", required=True)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--presets", nargs="+", default=["duet-cpu", "minivln-cpu"])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--iters", type=int, default=9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data_dir = str(resolve_data_dir(args.data_dir))
    report: dict = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "code": code_version(),
                    "machine": machine_info(args.threads, ["torch"]), "batch_size": args.batch_size, "iters": args.iters, "seed": args.seed,
                    "features": args.features, "presets": {}}
    for preset in args.presets:
        step = pretrain_step(preset, data_dir, args.features, batch_size=args.batch_size,
                             device=torch.device("cpu"), seed=args.seed)
        per_iter = []
        for i in range(args.iters):
            counters = (OpCounter(), OpCounter())
            step(i, counters)
            summary = split_summary(*counters)
            per_iter.append({"index": i, "task": step.task.task_of(i), **summary})
            print(f"{preset} iteration {i} ({per_iter[-1]['task']}): step {summary['step_compute_ops_per_it']} ops, "
                  f"data {summary['data_compute_ops_per_it']}", flush=True)
        report["presets"][preset] = per_iter
    report["last_of_each_task"] = {
        preset: {task: next((r for r in reversed(rows) if r["task"] == task), None) for task in PRETRAIN_TASKS}
        for preset, rows in report["presets"].items()}
    for preset, by_task in report["last_of_each_task"].items():
        for task, r in by_task.items():
            if r is not None:
                print(f"{preset:<12} {task}: step {r['step_compute_ops_per_it']:>6} non-view ops "
                      f"(iteration {r['index']}), data {r['data_compute_ops_per_it']}")
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
