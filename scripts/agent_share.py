"""Where a DAgger fine-tuning iteration spends its time: the network, or the agent around it.

Runs ``--iters`` iterations (teacher-forced + sampled rollout, backward) of a fine-tuning config on
real R2R and splits each into the network's forward calls (timed by hooks on the model), the
backward pass, and the rest, which is the agent's host work: map bookkeeping, input building,
environment moves, feature reads and expert labels.

    python scripts/agent_share.py --features FEATS.hdf5 [--config r2r-student-cpu] \\
        [--init RUN/pretrained] [--iters 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from minivln.config import load_config
from minivln.training.distributed import seed_everything
from minivln.training.finetune import FinetuneConfig, build_model, make_task, prepare_data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--features", required=True)
    ap.add_argument("--config", default="r2r-student-cpu")
    ap.add_argument("--init", default="", help="initial weights (e.g. a pretraining run's pretrained/)")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--json", default="")
    ap.add_argument("--profile", default="", help="write a cProfile of the timed iterations' forward parts here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(FinetuneConfig, args.config, [f"features={args.features}", f"init_checkpoint={args.init}"])
    seed_everything(0)
    model = build_model(cfg)
    res = prepare_data(cfg, Path("."), model.config.image_feat_size, model.config.obj_feat_size)
    task = make_task(cfg, model, res)
    clock: dict[str, float] = {"net": 0.0}
    starts: list[float] = []
    model.register_forward_pre_hook(lambda m, a: starts.append(time.perf_counter()))
    model.register_forward_hook(lambda m, a, o: clock.__setitem__("net", clock["net"] + time.perf_counter() - starts.pop()))
    rows = []
    prof = cProfile.Profile() if args.profile else None
    for i in range(args.iters + 1):  # the first one warms up
        clock["net"] = 0.0
        batch = task.next_batch(i)
        if prof is not None and i:
            prof.enable()
        t0 = time.perf_counter()
        out = task.compute(model, batch)
        t1 = time.perf_counter()
        if prof is not None:
            prof.disable()
        out.loss.backward()
        t2 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        if i:
            rows.append({"total": t2 - t0, "network_forward": clock["net"], "backward": t2 - t1,
                         "agent": (t1 - t0) - clock["net"]})
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    share = statistics.median(r["agent"] / r["total"] for r in rows)
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": f"{platform.machine()} {platform.processor()}".strip(), "torch": torch.__version__,
              "config": args.config, "init": args.init, "iters": args.iters, "median_s": med,
              "agent_share": share, "all": rows}
    print(json.dumps({"median_s": med, "agent_share": share}, indent=1))
    if prof is not None:
        prof.dump_stats(args.profile)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
