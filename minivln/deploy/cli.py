"""``minivln export`` and ``minivln navigate`` (the agent on a chosen backend): the command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

EXPORT_HELP = "export a checkpoint's network to ONNX (fp32 + int8 graphs) for ONNX Runtime"
NAVIGATE_HELP = "run a trained agent on a split; write the submission (+ metrics)"


def register(sub: argparse._SubParsersAction) -> None:
    from minivln.deploy import export as export_module
    from minivln.deploy.backends import BACKENDS

    p = sub.add_parser("export", help=EXPORT_HELP, description=export_module.__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="RUN/model, a finetune run dir, or a DUET checkpoint")
    p.add_argument("--out", required=True,
                   help="output directory (new or empty; with --overwrite an export directory, replaced whole)")
    p.add_argument("--no-int8", dest="int8", action="store_false", help="skip the int8 variant")
    p.add_argument("--per-channel", action="store_true", help="int8: one weight scale per output channel")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the ONNX Runtime vs PyTorch comparison after writing")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the export in --out (atomically: the old one stays until the new one is "
                        "complete)")
    p.set_defaults(func=_export_main)

    from minivln.training import navigate as navigate_module

    p = sub.add_parser("navigate", help=NAVIGATE_HELP, description=navigate_module.__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="RUN/model, a finetune run dir, a DUET checkpoint, or a `minivln export` directory")
    p.add_argument("--task", default="r2r", choices=("r2r", "reverie"))
    p.add_argument("--split", required=True)
    p.add_argument("--data-dir", default=None, help="data directory (default: the run's, else $MINIVLN_DATA)")
    p.add_argument("--features", default=None, help="view features HDF5 (default: the run's)")
    p.add_argument("--objects", default=None, help="REVERIE object features HDF5 (default: the run's)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--backend", default="torch", choices=tuple(BACKENDS),
                   help="runtime of the network: eager PyTorch (default) or ONNX Runtime fp32 / int8 (an "
                        "export directory's graphs; any other checkpoint is exported first, to a temporary "
                        "directory)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads of torch / ONNX Runtime (0 = default)")
    p.add_argument("--max-episodes", type=int, default=0,
                   help="only the split's first N instructions (0 = all); the metrics are theirs")
    p.add_argument("--compare", action="store_true",
                   help="also run eager PyTorch on every call with the same inputs (the agent follows it) and "
                        "write the largest differences to OUT/compare_<split>.json")
    p.set_defaults(func=_navigate_main)


def _export_main(args: argparse.Namespace) -> int:
    from minivln.deploy.export import check_export_target, export_model
    from minivln.model.checkpoint import load_agent_model

    out = check_export_target(args.out, overwrite=args.overwrite)  # before any work; nothing written
    model = load_agent_model(args.checkpoint)
    res = export_model(model, out, source=str(args.checkpoint), int8=args.int8, per_channel=args.per_channel,
                       check=args.check, overwrite=args.overwrite)
    m = res.manifest
    print(f"exported {args.checkpoint} -> {out} ({m['export_seconds']} s, opset {m['opset']})")
    for variant, graphs in m["graphs"].items():
        print(f"  {variant}: " + ", ".join(graphs.values()))
    if "check" in m:
        for variant, diffs in m["check"]["max_abs_diff"].items():
            print(f"  max |onnxruntime - torch| {variant}: " + json.dumps({k: float(f"{v:.3g}") for k, v in diffs.items()}))
    return 0


def _navigate_main(args: argparse.Namespace) -> int:
    import torch

    from minivln.config import ConfigError
    from minivln.deploy.backends import load_backend
    from minivln.deploy.compare import CompareModel
    from minivln.evaluation.metrics import (
        R2R_METRICS,
        REVERIE_METRICS,
        format_metrics,
        metrics_legend,
    )
    from minivln.model.checkpoint import load_agent_model
    from minivln.paths import atomic_write_text
    from minivln.training.navigate import navigate

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.compare and args.backend == "torch":
        raise ConfigError("navigate: --compare compares an ONNX Runtime backend with torch; choose one with --backend")
    backend = load_backend(args.backend, args.checkpoint, threads=args.threads)
    model = backend.model
    if args.compare:
        model = CompareModel(load_agent_model(args.checkpoint), backend.model)
    try:
        res = navigate(args.checkpoint, args.task, args.split, args.out, data_dir=args.data_dir,
                       features=args.features, objects=args.objects, batch_size=args.batch_size, progress=True,
                       model=model, backend=args.backend, defaults_from=backend.source,
                       max_episodes=args.max_episodes)
    finally:
        backend.close()
    print(f"submission: {res['submission']}")
    if res["metrics"] is not None:
        names = R2R_METRICS if args.task == "r2r" else REVERIE_METRICS
        features = "STAND-IN features" if res["features"] == "stand-in" else "real features"
        if "object_features" in res:
            features += ", STAND-IN objects" if res["object_features"] == "stand-in" else ", real objects"
        backend = "" if args.backend == "torch" else f", backend {args.backend}"
        print(f"{args.split} ({res['episodes']:,} episodes, {features}{backend}): "
              f"{format_metrics(res['metrics'], names)}")
        print(f"({metrics_legend(names)})")
        print(f"metrics: {Path(args.out) / f'metrics_{args.split}.json'}")
    if args.compare:
        report = {"reference": "torch", "candidate": args.backend, "checkpoint": str(args.checkpoint),
                  "split": args.split, **model.report()}
        path = Path(args.out) / f"compare_{args.split}.json"
        atomic_write_text(path, json.dumps(report, indent=2) + "\n")
        print(f"max |{args.backend} - torch| over {sum(report['calls'].values())} calls: {report['max']:.3g} "
              f"(written to {path})")
    return 0
