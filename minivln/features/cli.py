"""Feature commands: ``minivln features build | probe | info``."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("features", help="stand-in view/object features: build, probe, inspect")
    fsub = p.add_subparsers(dest="features_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    b = fsub.add_parser("build", help="build STAND-IN features from the BBox annotations and graphs")
    b.add_argument("--data-dir", default=None, help="data directory (default: $MINIVLN_DATA)")
    b.add_argument("--out", required=True, help="view feature file to write (HDF5)")
    b.add_argument("--objects-out", default=None, help="also write REVERIE object features here (HDF5)")
    b.add_argument("--scans", nargs="+", default=None, help="only these houses (default: all)")
    b.add_argument("--dim", type=int, default=768, help="view feature width (default 768)")
    b.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    b.add_argument("--class-layout", choices=("separate", "concat", "none"), default="separate",
                   help="per-view 1000-class distribution: separate dataset (default), the community "
                        "768+1000 concatenation (as logits), or none")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=_build)

    q = fsub.add_parser("probe", help="next-step probe: how much signal do the features carry")
    q.add_argument("--data-dir", default=None, help="data directory (default: $MINIVLN_DATA)")
    q.add_argument("--features", default=None, help="stand-in feature file (omit: baselines only)")
    q.add_argument("--split", default="val_unseen")
    q.add_argument("--task", default="r2r", choices=("r2r",))
    q.add_argument("--no-baselines", action="store_true", help="skip the word-overlap baselines")
    q.add_argument("--limit", type=int, default=None, help="only the first N instructions")
    q.add_argument("--every", type=int, default=1, metavar="N",
                   help="only every N-th instruction (e.g. --split train --every 4: the subset the "
                        "stand-in weights were chosen on)")
    q.add_argument("--json", default=None, help="also write the report as JSON here")
    q.set_defaults(func=_probe)

    i = fsub.add_parser("info", help="describe a feature file (dim, stand-in or not, layout)")
    i.add_argument("file")
    i.add_argument("--objects", action="store_true", help="the file holds object features")
    i.set_defaults(func=_info)


def _build(args: argparse.Namespace) -> int:
    from minivln.features.standin import StandinConfig, build_standin

    summary = build_standin(
        args.data_dir, args.out, objects_out=args.objects_out, scans=args.scans,
        cfg=StandinConfig(dim=args.dim), dtype=args.dtype, class_layout=args.class_layout,
        progress=not args.no_progress,
    )
    print(f"wrote STAND-IN features (not from images) for {summary['viewpoints']} viewpoints of "
          f"{summary['houses']} houses to {summary['out']} in {summary['seconds']:.1f} s")
    if summary["objects_out"]:
        print(f"wrote STAND-IN object features for {summary['objects']} objects to {summary['objects_out']}")
    return 0


def _probe(args: argparse.Namespace) -> int:
    from minivln.features.probe import run_probe
    from minivln.paths import atomic_write_text

    report = run_probe(args.data_dir, args.features, split=args.split, task=args.task,
                       baselines=not args.no_baselines, limit=args.limit, every=args.every,
                       progress=sys.stderr.isatty())
    print("\n".join(report.lines()))
    if args.json:
        atomic_write_text(args.json, report.to_json())
    return 0


def _info(args: argparse.Namespace) -> int:
    from minivln.features.hdf5 import FeatureStore, ObjectFeatureStore

    store = ObjectFeatureStore(args.file) if args.objects else FeatureStore(args.file)
    with store:
        kind = "STAND-IN (not from images)" if store.is_standin else "real (no standin attribute)"
        print(f"{store.path}: {kind}")
        print(f"  dim {store.dim}, {sum(1 for _ in store.keys())} keys")
        if not args.objects:
            print(f"  class distributions: {store.class_layout}")
        if store.description:
            print(f"  {store.description}")
    return 0
