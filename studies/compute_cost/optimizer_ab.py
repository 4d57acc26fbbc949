"""AdamW's kernels against each other: one optimizer step over every parameter of a preset (random
gradients), per tensor (torch's CPU default), foreach and fused (``OptimConfig.implementation``).

    python studies/compute_cost/optimizer_ab.py --presets minivln-cpu duet-cpu --json docs/results/optimizer_ab.json

Median of ``--steps`` steps after 3 warm-up steps, one thread; the settings interleave step by step.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from minivln.model.registry import create_model
from minivln.paths import atomic_write_text
from minivln.training.trainer import OptimConfig, make_optimizer, param_groups

IMPLEMENTATIONS = ("single", "foreach", "fused")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["minivln-cpu", "duet-cpu"])
    ap.add_argument("--steps", type=int, default=11)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
              "torch": torch.__version__, "threads": 1,
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True).stdout.strip(), "presets": {}}
    for preset in args.presets:
        model = create_model(preset)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opts = {impl: make_optimizer(param_groups(model, 0.01), OptimConfig(lr=1e-4, implementation=impl))
                for impl in IMPLEMENTATIONS}
        times: dict[str, list[float]] = {impl: [] for impl in IMPLEMENTATIONS}
        for i in range(3 + args.steps):
            for impl, opt in opts.items():
                t0 = time.perf_counter()
                opt.step()
                if i >= 3:
                    times[impl].append(time.perf_counter() - t0)
        row = {impl: {"ms_per_step": 1e3 * statistics.median(t)} for impl, t in times.items()}
        row["parameters"] = sum(p.numel() for p in model.parameters())
        row["tensors"] = sum(1 for _ in model.parameters())
        report["presets"][preset] = row
        print(preset, {k: round(v["ms_per_step"], 1) for k, v in row.items() if isinstance(v, dict)}, flush=True)
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
