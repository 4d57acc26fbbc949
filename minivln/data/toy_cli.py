"""Toy-world command: ``minivln toy build --out DIR [--seed N] [--houses N] [--force]``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "toy",
        help="generate the toy world (small seeded houses in the real data formats)",
        description="Generate the toy world: small two-floor houses written as a data directory "
        "with the layout and formats of the real R2R/REVERIE releases (docs/toyworld.md).",
    )
    actions = p.add_subparsers(dest="toy_action", metavar="ACTION")
    b = actions.add_parser("build", help="write a toy data directory")
    b.add_argument("--out", required=True, help="directory to create (use it as --data-dir)")
    b.add_argument("--seed", type=int, default=0, help="random seed (default 0); same seed, same bytes")
    b.add_argument("--houses", type=int, default=None, help="number of houses (default 8, at least 3)")
    b.add_argument("--force", action="store_true", help="replace DIR if it exists")
    b.set_defaults(func=_build)
    p.set_defaults(func=lambda args: _usage(p))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _build(args: argparse.Namespace) -> int:
    import sys
    import time

    from minivln.data.toyworld import ToyWorldConfig, build_toy_world, read_manifest

    if args.houses is not None and args.houses < 3:
        print("minivln toy build: error: --houses must be at least 3 (train, val_unseen and test houses)",
              file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        out = build_toy_world(args.out, seed=args.seed, n_houses=args.houses, config=ToyWorldConfig(),
                              overwrite=args.force)
    except FileExistsError as exc:
        print(f"minivln toy build: error: {exc}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - t0
    man = read_manifest(out) or {}
    houses = man.get("houses", {})
    n_houses = len({s for scans in houses.values() for s in scans})
    print(f"toy world (seed {args.seed}) written to {out} in {elapsed:.2f} s")
    print(f"  {n_houses} houses, {man.get('included_viewpoints')} included viewpoints "
          f"(+{man.get('viewpoints', 0) - man.get('included_viewpoints', 0)} not included), "
          f"{man.get('objects')} objects")
    for split in ("train", "val_seen", "val_unseen", "test"):
        r2r, rev = man["r2r"][split], man["reverie"][split]
        print(f"  {split:<10} houses {len(houses.get(split, [])):>2}   "
              f"R2R {r2r['paths']:>4} paths / {r2r['instructions']:>4} instructions   "
              f"REVERIE {rev['paths']:>4} paths / {rev['instructions']:>4} instructions")
    print("  files: connectivity/ (+scans.txt), R2R/, REVERIE/ (+BBox/), toyworld.json")
    print(f"  use it with --data-dir {out}  (or MINIVLN_DATA={out})")
    return 0
