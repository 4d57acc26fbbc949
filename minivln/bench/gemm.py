"""``minivln bench gemm``: this machine's fp32 matrix-product rate (GFLOP/s), the physical bound for context.

``torch.mm`` of two random square fp32 matrices (n x n, 2 n^3 floating-point operations) at each
size and thread count: after a warm-up, the number of products per timing is chosen so that one
timing lasts about ``--min-time`` seconds, and each (size, threads) pair is timed ``--repeats`` times;
the report gives the best and the median rate, and the peak (best over the sizes) per thread count.

With ``--bench BENCH.json`` (a report of ``minivln bench model``) it also prints each row's
FLOP-bound episode time: its GFLOP per episode (matrix products and attention) at the peak rate of
the thread count that row ran with, the time that episode could not beat on this machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from minivln.bench.common import code_version, loadavg, machine_info, read_bench_report
from minivln.paths import DataError, atomic_write_text, check_writable_dir

DEFAULT_SIZES = (256, 512, 1024, 2048)


def _time_mm(n: int, repeats: int, min_time: float, gen: torch.Generator) -> tuple[list[float], int]:
    """GFLOP/s of ``repeats`` timings of k products (k chosen for ~min_time per timing), and k."""
    a = torch.randn(n, n, generator=gen)
    b = torch.randn(n, n, generator=gen)
    c = torch.empty(n, n)
    torch.mm(a, b, out=c)  # warm-up (first-call setup, caches)
    t0 = time.perf_counter()
    torch.mm(a, b, out=c)
    once = max(time.perf_counter() - t0, 1e-6)
    k = max(1, int(min_time / once))
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(k):
            torch.mm(a, b, out=c)
        rates.append(2.0 * n ** 3 * k / (time.perf_counter() - t0) / 1e9)
    return rates, k


def bench_gemm(sizes: Sequence[int] = DEFAULT_SIZES, threads: Sequence[int] = (1, 2), *, repeats: int = 5,
               min_time: float = 0.2, seed: int = 0,
               log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """fp32 ``torch.mm`` rates at every (threads, size); returns a JSON-able report."""
    if not sizes or any(n < 1 for n in sizes) or not threads or any(t < 1 for t in threads):
        raise DataError("sizes and thread counts must be >= 1")
    if repeats < 1 or min_time <= 0:
        raise DataError("--repeats must be >= 1 and --min-time > 0")
    say = log or (lambda msg: None)
    gen = torch.Generator().manual_seed(seed)
    old = torch.get_num_threads()
    load_before = loadavg()
    rows = []
    try:
        with torch.inference_mode():
            for t in threads:
                torch.set_num_threads(t)
                for n in sizes:
                    rates, k = _time_mm(n, repeats, min_time, gen)
                    rows.append({"threads": t, "size": n, "products_per_timing": k,
                                 "gflop_per_s_best": max(rates), "gflop_per_s_median": statistics.median(rates),
                                 "gflop_per_s_all": [round(r, 2) for r in rates]})
                    say(f"{t} thread(s), {n} x {n}: best {max(rates):.1f} GFLOP/s")
    finally:
        torch.set_num_threads(old)
    peak = {str(t): max(r["gflop_per_s_best"] for r in rows if r["threads"] == t) for t in threads}
    return {
        "date": datetime.date.today().isoformat(),
        "code": code_version(),
        "machine": {**machine_info(old, ["torch"]), "loadavg_before": load_before, "loadavg_after": loadavg()},
        "settings": {"op": "torch.mm, fp32, square", "sizes": list(sizes), "threads": list(threads),
                     "repeats": repeats, "min_time_s": min_time, "seed": seed},
        "results": rows,
        "peak_gflop_per_s": peak,
    }


def flop_bounds(gemm: dict[str, Any], bench: dict[str, Any]) -> list[dict[str, Any]]:
    """Each row of a ``bench model`` report with its FLOP-bound episode time at the GEMM peak of
    the thread count it ran with (None when that thread count was not measured)."""
    threads = str(bench.get("machine", {}).get("threads"))
    peak = gemm["peak_gflop_per_s"].get(threads)
    out = []
    for r in bench.get("results", []):
        gflop = r.get("gflop_per_episode") or 0.0
        out.append({"label": r["label"], "batch_size": r["batch_size"], "episode_ms": r["episode_ms"],
                    "gflop_per_episode": gflop, "threads": int(threads) if threads.isdigit() else None,
                    "peak_gflop_per_s": peak,
                    "bound_ms": gflop / peak * 1e3 if peak and gflop else None})
    return out


def format_report(report: dict[str, Any], bounds: list[dict[str, Any]] | None = None) -> str:
    m, code = report["machine"], report.get("code") or {}
    commit = (code.get("commit") or "unknown")[:12] + (" (dirty)" if code.get("dirty") else "")
    lines = [f"CPU {m['model_name']} ({m['logical_cpus']} logical CPUs), torch {m['torch']}; load average "
             f"{m['loadavg_before']} before, {m['loadavg_after']} after; {report['date']}, commit {commit}",
             "fp32 torch.mm, square matrices: GFLOP/s (best, median)",
             f"{'threads':>7} {'size':>6} {'best':>8} {'median':>8}"]
    for r in report["results"]:
        lines.append(f"{r['threads']:>7} {r['size']:>6} {r['gflop_per_s_best']:>8.1f} {r['gflop_per_s_median']:>8.1f}")
    lines.append("peak: " + ", ".join(f"{t} thread(s) {p:.1f} GFLOP/s" for t, p in report["peak_gflop_per_s"].items()))
    for b in bounds or []:
        bound = f"{b['bound_ms']:.1f} ms" if b["bound_ms"] is not None else "n/a (thread count not measured)"
        lines.append(f"{b['label']} at batch {b['batch_size']}: {b['gflop_per_episode']:.2f} GFLOP per episode, "
                     f"FLOP bound {bound} at {b['threads']} thread(s); measured {b['episode_ms']:.1f} ms")
    return "\n".join(lines)


def add_parser(bench_sub: argparse._SubParsersAction) -> None:
    """``minivln bench gemm`` (registered by ``minivln bench``)."""
    g = bench_sub.add_parser(
        "gemm", help="this machine's fp32 matrix-product rate (GFLOP/s), the bound for the latency numbers",
        description="Time fp32 torch.mm of square matrices at each size and thread count; report GFLOP/s "
                    "(best and median of the repeats) and the peak per thread count.")
    g.add_argument("--sizes", nargs="+", type=int, default=list(DEFAULT_SIZES))
    g.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    g.add_argument("--repeats", type=int, default=5)
    g.add_argument("--min-time", type=float, default=0.2, help="seconds per timing (products are repeated)")
    g.add_argument("--bench", metavar="BENCH.json", default=None,
                   help="a `bench model` report: print each row's FLOP-bound episode time at the peak")
    g.add_argument("--json", metavar="OUT", help="also write the report as JSON")
    g.add_argument("--quiet", action="store_true", help="no progress lines")
    g.set_defaults(func=_bench_gemm)


def _bench_gemm(args: argparse.Namespace) -> int:
    bench = read_bench_report(args.bench) if args.bench else None  # bad input before any work
    if args.json:
        check_writable_dir(Path(args.json).parent, "output directory")
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    report = bench_gemm(args.sizes, args.threads, repeats=args.repeats, min_time=args.min_time, log=log)
    bounds = flop_bounds(report, bench) if bench is not None else None
    if bounds is not None:
        report["flop_bounds"] = {"bench": str(args.bench), "rows": bounds}
    print(format_report(report, bounds))
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(report, indent=2) + "\n")
    return 0

