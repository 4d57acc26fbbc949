"""Size and speed of the default toy world (docs/toyworld.md, "Sizes and speed").

Times ``generate_toy_world`` (in memory) and ``build_toy_world`` (generate + write, into a temporary
directory that is removed afterwards), then sums the sizes of the files written, per part
(MB = 10^6 bytes of file contents).

    python studies/data_checks/toy_world_stats.py [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from datetime import date
from pathlib import Path


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from minivln.data.toyworld import build_toy_world, generate_toy_world, read_manifest

    t = time.perf_counter()
    generate_toy_world(args.seed)
    gen_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory(prefix="minivln-toy-stats-") as tmp:
        t = time.perf_counter()
        root = build_toy_world(Path(tmp) / "toy", seed=args.seed)
        build_s = time.perf_counter() - t
        man = read_manifest(root) or {}
        sizes = {
            "all files": _size(root),
            "REVERIE/BBox": _size(root / "REVERIE" / "BBox"),
            "connectivity": _size(root / "connectivity"),
            "R2R": _size(root / "R2R"),
            "REVERIE (without BBox)": _size(root / "REVERIE") - _size(root / "REVERIE" / "BBox"),
        }
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"toy world, seed {args.seed}, default ToyWorldConfig ({date.today()}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {load:.1f})")
    print(f"  {man.get('included_viewpoints')} included viewpoints "
          f"(+{man.get('viewpoints', 0) - man.get('included_viewpoints', 0)} left out), {man.get('objects')} objects")
    print(f"  generate (in memory): {gen_s:.2f} s")
    print(f"  generate and write:   {build_s:.2f} s")
    for name, n in sizes.items():
        print(f"  {name:<24} {n / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
