"""Where a DAgger fine-tuning iteration spends its time: the network, or the agent around it.

Runs ``--iters`` iterations (teacher-forced + sampled rollout, backward) of a fine-tuning config on
real R2R and splits each into the network's forward calls (timed by hooks on the model), the
backward pass, and the rest, which is the agent's host work: map bookkeeping, input building,
environment moves, feature reads and expert labels.  ``agent_ms_per_episode`` is the agent's time
divided by the episodes of an iteration (two rollouts of ``batch_size``).

    python studies/compute_cost/agent_share.py --features FEATS.hdf5 [--config r2r-student-cpu] \\
        [--init RUN/pretrained] [--iters 5] [--json OUT] [--profile OUT.prof]

``--before CHECKOUT`` measures two versions of the package, paired: this script runs itself
``--rounds`` times under ``PYTHONPATH=CHECKOUT`` and as many times under this script's own
checkout, alternating (before, after, before, after, ...), so that both see the same load, and
reports each side's medians and the per-round ratios after / before::

    python studies/compute_cost/agent_share.py --features FEATS.hdf5 --init RUN/pretrained --iters 5 \\
        --before ../main --rounds 3 --json OUT.json
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from minivln.config import load_config
from minivln.training.distributed import seed_everything
from minivln.training.finetune import (
    FinetuneConfig,
    build_model,
    make_task,
    prepare_data,
)

REPO = Path(__file__).resolve().parents[2]  # the checkout: this file is studies/compute_cost/agent_share.py


def machine() -> str:
    """The CPU's model name as ``lscpu`` gives it (else the platform's processor string)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return f"{platform.machine()} {platform.processor()}".strip()
    name = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "")
    return f"{name}, {os.cpu_count()} cores" if name else platform.machine()


def commit(checkout: Path) -> str:
    """``git describe --always --dirty`` of a checkout ("unknown" outside git)."""
    try:
        return subprocess.run(["git", "-C", str(checkout), "describe", "--always", "--dirty"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def measure(args: argparse.Namespace) -> dict:
    """Time ``args.iters`` iterations (after one warm-up) in this process."""
    torch.set_num_threads(1)
    cfg = load_config(FinetuneConfig, args.config, [f"features={args.features}", f"init_checkpoint={args.init}"])
    seed_everything(0)
    model = build_model(cfg)
    res = prepare_data(cfg, Path("."), model.config.image_feat_size, model.config.obj_feat_size)
    task = make_task(cfg, model, res)
    clock: dict[str, float] = {"net": 0.0}
    starts: list[float] = []
    model.register_forward_pre_hook(lambda m, a: starts.append(time.perf_counter()))
    model.register_forward_hook(
        lambda m, a, o: clock.__setitem__("net", clock["net"] + time.perf_counter() - starts.pop()))
    rows = []
    prof = cProfile.Profile() if args.profile else None
    episodes = 0
    for i in range(args.iters + 1):  # the first one warms up
        clock["net"] = 0.0
        batch = task.next_batch(i)
        episodes = sum(len(eps) for eps in batch.values())
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
    if prof is not None:
        prof.dump_stats(args.profile)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    package = Path(sys.modules["minivln"].__file__).parent
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
            "load_average": os.getloadavg(), "torch": torch.__version__, "package": str(package.parent),
            "commit": commit(package),
            "config": args.config, "init": args.init, "iters": args.iters, "episodes_per_iter": episodes,
            "median_s": med, "agent_share": statistics.median(r["agent"] / r["total"] for r in rows),
            "agent_ms_per_episode": 1000 * med["agent"] / episodes, "all": rows}


def compare(args: argparse.Namespace) -> dict:
    """Paired runs of the ``--before`` checkout and this one, alternating, one process each."""
    sides = {"before": Path(args.before).resolve(), "after": REPO}
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    child = [sys.executable, str(Path(__file__).resolve()), "--features", args.features, "--config", args.config,
             "--init", args.init, "--iters", str(args.iters)]
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for side, checkout in sides.items():
                out = Path(tmp) / f"{side}{r}.json"
                env = dict(os.environ, PYTHONPATH=str(checkout))
                subprocess.run(child + ["--json", str(out)], env=env, check=True, stdout=subprocess.DEVNULL)
                runs[side].append(json.loads(out.read_text()))
                print(f"round {r} {side}: agent {runs[side][-1]['median_s']['agent']:.3f} s/it, "
                      f"share {runs[side][-1]['agent_share']:.3f}", flush=True)
    summary = {}
    for side, rs in runs.items():
        med = {k: statistics.median(r["median_s"][k] for r in rs) for k in rs[0]["median_s"]}
        summary[side] = {"commit": rs[0]["commit"], "package": rs[0]["package"], "median_s": med,
                         "agent_share": statistics.median(r["agent_share"] for r in rs),
                         "agent_ms_per_episode": statistics.median(r["agent_ms_per_episode"] for r in rs)}
    ratios = [a["median_s"]["agent"] / b["median_s"]["agent"] for a, b in zip(runs["after"], runs["before"])]
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
            "torch": torch.__version__, "config": args.config, "init": args.init, "iters": args.iters,
            "rounds": args.rounds, "summary": summary, "agent_ratio_after_over_before": ratios,
            "agent_ratio_median": statistics.median(ratios), "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--features", required=True)
    ap.add_argument("--config", default="r2r-student-cpu")
    ap.add_argument("--init", default="", help="initial weights (e.g. a pretraining run's pretrained/)")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--json", default="")
    ap.add_argument("--profile", default="", help="write a cProfile of the timed iterations' forward parts here")
    ap.add_argument("--before", default="", help="another checkout to measure against, paired (see above)")
    ap.add_argument("--rounds", type=int, default=3, help="with --before: runs of each checkout")
    args = ap.parse_args()
    if args.before:
        report = compare(args)
        print(json.dumps({k: report[k] for k in ("summary", "agent_ratio_after_over_before", "agent_ratio_median")},
                         indent=1))
    else:
        report = measure(args)
        print(json.dumps({k: report[k] for k in ("median_s", "agent_share", "agent_ms_per_episode")}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
