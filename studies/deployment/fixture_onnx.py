"""A reference fixture's recorded calls through the model's exported ONNX graphs: the largest
|ONNX Runtime - recorded| per output over all calls, for fp32 and int8, with the rules of
``minivln parity`` (valid rows only; -inf positions must coincide, else the difference is inf).

    python studies/deployment/fixture_onnx.py ../shared/reference/duet_fixture_reverie.npz [--json OUT]

The fixture's model is built from the fixture (its config and weights), exported to a temporary
directory and run with one ONNX Runtime thread.  ``tests/test_deploy.py`` asserts the fp32 rows of
the R2R and the REVERIE fixtures within 1e-4.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import tempfile
from pathlib import Path

import onnxruntime
import torch

from minivln.deploy.export import export_model
from minivln.deploy.runtime import OnnxRuntimeDUET
from minivln.model.fixture import load_fixture, run_fixture


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("fixture", help="a reference fixture (.npz), e.g. duet_fixture_reverie.npz")
    ap.add_argument("--atol", type=float, default=1e-4)
    ap.add_argument("--json", help="also write the report here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    fx = load_fixture(args.fixture)
    report = {"fixture": str(args.fixture), "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "onnxruntime": onnxruntime.__version__, "atol": args.atol, "calls": len(fx.calls), "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        export_model(fx.build_model(), Path(tmp) / "fx", check=False)
        for variant in ("fp32", "int8"):
            checks = run_fixture(OnnxRuntimeDUET(Path(tmp) / "fx", variant, threads=1), fx, atol=args.atol)
            worst: dict[str, float] = {}
            for per_call in checks.values():
                for c in per_call:
                    worst[c.name] = max(worst.get(c.name, 0.0), c.max_abs_diff if c.inf_positions_match else float("inf"))
            ok = all(c.ok for per_call in checks.values() for c in per_call)
            report["variants"][variant] = {"all_within_atol": ok, "max_abs_diff": worst}
            print(f"{variant}: all within {args.atol:g}: {'yes' if ok else 'no'}; "
                  + ", ".join(f"{k} {v:.2g}" for k, v in sorted(worst.items())))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
