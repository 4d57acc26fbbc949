"""DAgger iterations with the two rollouts apart (as DUET) and merged into one batch (``merge_rollouts``):
seconds per iteration, interleaved in one process, and the aten operations each iteration dispatches
(forward + backward + optimizer), the count that becomes kernel launches on a GPU.

    python scripts/merge_rollouts_ab.py --features FEATS.hdf5 --presets minivln-cpu duet-cpu \
        --iters 4 --json docs/results/merge_rollouts_ab.json

Timings are ratios within one run (the same process, alternating A and B each iteration); the op
counts do not depend on the machine's load.
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

from minivln.bench.train import finetune_step
from minivln.paths import atomic_write_text

# aten ops that only relabel memory (no kernel on a GPU)
VIEWS = {"view", "_unsafe_view", "expand", "as_strided", "t", "transpose", "permute", "slice", "select",
         "unsqueeze", "squeeze", "detach", "alias", "split", "split_with_sizes", "unbind", "narrow",
         "reshape", "_reshape_alias", "lift_fresh", "empty", "empty_strided", "empty_like", "chunk",
         "unfold", "diagonal", "_to_copy_view", "clone_view", "lift_fresh_copy"}


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", required=True)
    ap.add_argument("--data-dir", default="")
    ap.add_argument("--presets", nargs="+", default=["minivln-cpu", "duet-cpu"])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
              "torch": torch.__version__, "threads": 1, "batch_size": args.batch_size,
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True).stdout.strip(),
              "features": args.features, "presets": {}}
    for preset in args.presets:
        steps = {m: finetune_step(preset, args.data_dir, args.features, batch_size=args.batch_size,
                                  device=torch.device("cpu"), merge_rollouts=m) for m in (False, True)}
        times: dict[bool, list[float]] = {False: [], True: []}
        counts: dict[bool, list[dict[str, int]]] = {False: [], True: []}
        for i in range(args.iters + 1):  # iteration 0 warms up, then the same batches for both
            for m in ((False, True) if i % 2 == 0 else (True, False)):
                if i == 1:  # count the ops of one iteration per setting (slower: not timed)
                    with OpCounter() as c:
                        steps[m](i)
                    counts[m].append(dict(c.ops))
                    continue
                t0 = time.perf_counter()
                steps[m](i)
                if i > 0:
                    times[m].append(time.perf_counter() - t0)
                print(f"{preset} merge={m} iteration {i}: {time.perf_counter() - t0:.2f} s", flush=True)
        row = {}
        for m in (False, True):
            ops = counts[m][0]
            row["merged" if m else "apart"] = {
                "s_per_it": statistics.median(times[m]), "all_s": [round(x, 3) for x in times[m]],
                "aten_ops": sum(ops.values()),
                "compute_ops": sum(v for k, v in ops.items() if k not in VIEWS),
                "top_ops": dict(collections.Counter(ops).most_common(12)),
            }
        a, b = row["apart"], row["merged"]
        row["time_ratio"] = b["s_per_it"] / a["s_per_it"]
        row["compute_op_ratio"] = b["compute_ops"] / a["compute_ops"]
        report["presets"][preset] = row
        print(f"{preset}: apart {a['s_per_it']:.2f} s, {a['compute_ops']} ops; merged {b['s_per_it']:.2f} s, "
              f"{b['compute_ops']} ops; time x{row['time_ratio']:.2f}, ops x{row['compute_op_ratio']:.2f}",
              flush=True)
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
