"""Is a model short of training, or capped by its features?  Score it on seen and unseen instructions.

For each checkpoint, the arg-max agent runs on the first N instructions of ``train`` (houses and
paths it was trained on), ``val_seen`` (trained houses, new paths) and ``val_unseen`` (new houses) and
the official metrics are printed side by side.  Reading: train SR far above val_unseen SR means the
model fits what it saw but does not transfer (features that do not generalise, or over-fitting);
train SR about as low as val_unseen means it is short of training or capacity.

    python studies/cpu_scale_training/train_vs_val.py --features FEATS.hdf5 --episodes 300 \\
        ../shared/teachers/duet-cpu-r2r-finetuned runs/r2r-distill/runs/ft-none/model [--json OUT]
    python studies/cpu_scale_training/train_vs_val.py --task reverie --features FEATS.hdf5 \\
        --objects OBJS.hdf5 RUN/model ...

For REVERIE the grounding metrics (RGS, RGSPL) are printed too.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import tempfile
from pathlib import Path

import torch

from minivln.data.datasets import load_episodes
from minivln.paths import resolve_data_dir
from minivln.training.navigate import navigate

SPLITS = ("train", "val_seen", "val_unseen")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--features", required=True)
    ap.add_argument("--task", choices=["r2r", "reverie"], default="r2r")
    ap.add_argument("--objects", default=None, help="object features (HDF5), for --task reverie")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--episodes", type=int, default=300, help="the first N instructions of each split")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    root = resolve_data_dir(args.data_dir)
    ids = {s: [e.instr_id for e in load_episodes(args.task, s, root)[: args.episodes]] for s in SPLITS}
    keys = ("sr", "spl", "oracle_sr") + (("rgs", "rgspl") if args.task == "reverie" else ("nav_error",))
    report: dict = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                    "machine": f"{platform.machine()} {platform.processor()}".strip(), "torch": torch.__version__,
                    "task": args.task, "features": args.features, "objects": args.objects,
                    "episodes_per_split": args.episodes, "models": {}}
    for ckpt in args.checkpoints:
        row = {}
        for split in SPLITS:
            with tempfile.TemporaryDirectory() as tmp:
                res = navigate(ckpt, args.task, split, tmp, data_dir=args.data_dir, features=args.features,
                               objects=args.objects, batch_size=30, instr_ids=ids[split])
            row[split] = {k: res["metrics"][k] for k in keys}
            print(f"{ckpt} {split}: " + "  ".join(f"{k} {v:.3f}" for k, v in row[split].items()), flush=True)
        report["models"][ckpt] = row
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
