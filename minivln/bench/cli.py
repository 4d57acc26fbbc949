"""``minivln bench model|gemm|figure|train``: the benchmarks' command line."""

from __future__ import annotations

import argparse

from minivln.bench import figure, gemm, model, train


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmarks: model (latency per episode, teacher vs student), gemm (fp32 GFLOP/s), "
             "figure (SR vs latency), train (training iterations/s)",
        description="Benchmarks.",
    )
    bench_sub = p.add_subparsers(dest="bench_command", metavar="WHAT")
    model.add_parser(bench_sub)
    gemm.add_parser(bench_sub)
    figure.add_parser(bench_sub)
    train.add_parser(bench_sub)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
