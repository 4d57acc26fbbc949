"""Data commands: ``minivln download``, ``minivln graphs``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from minivln.data import download

    download.register(sub)
    p = sub.add_parser("graphs", help="build (and cache) the navigation graphs of every house")
    p.add_argument("--data-dir", default=None, help="data directory (default: $MINIVLN_DATA)")
    p.set_defaults(func=_graphs)


def _graphs(args: argparse.Namespace) -> int:
    import time

    from minivln.data.graph import Graphs

    t0 = time.perf_counter()
    houses = Graphs(args.data_dir).load_all(progress=True)
    n = sum(len(h) for h in houses.values())
    print(f"{len(houses)} houses, {n} included viewpoints, {time.perf_counter() - t0:.2f} s")
    return 0
