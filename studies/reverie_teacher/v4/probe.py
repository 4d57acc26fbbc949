"""The step-600 rule of REVERIE's fourth teacher (docs/preregistration_reverie.md, "Teacher v4"): its
pretraining is stopped, and the design reported as failed, if at step 600 the val_unseen MLM accuracy is
<= 0.25, the OG accuracy < 0.50 or the SAP fused accuracy < 0.50.  Prints every validation so far beside
v3's at equal samples (v4 step s = v3 step 2s: batch 64 against 32) and the verdict.

    python studies/reverie_teacher/v4/probe.py --log RUN/log.jsonl [--out OUT.json]
    python studies/reverie_teacher/v4/probe.py --log RUN/log.jsonl --out OUT.json --watch --stop-pid PID
    python studies/reverie_teacher/v4/probe.py --log RUN/log.jsonl --speed-after 300 --speed-until 600

Exit status: 0 the rule passed, 3 it failed, 2 step 600 is not validated yet.  ``--watch`` waits for step
600, writes ``--out`` and, if the rule failed, sends SIGTERM to ``--stop-pid`` (the experiment driver,
which stops its run at a checkpoint); ``v4/sitting.sh`` does not start a driver once ``--out`` says failed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
STEP = 600
KEYS = ("mlm_acc", "og_acc", "sap_fused_acc")
#: the rule: (key, comparison that FAILS, threshold)
FAILS = {"mlm_acc": lambda v: v <= 0.25, "og_acc": lambda v: v < 0.50, "sap_fused_acc": lambda v: v < 0.50}
RULE = "stop if val_unseen mlm_acc <= 0.25, og_acc < 0.50 or sap_fused_acc < 0.50 at step 600"
V3 = "teacher v3 pretraining from scratch at lr 2.5e-4 (rev-teacher-v3-pre)"


def readings(log: Path) -> dict[int, dict[str, float]]:
    """``{step: {key: value}}`` of the ``"kind": "val"`` records of a pretraining ``log.jsonl``."""
    out: dict[int, dict[str, float]] = {}
    for line in log.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec.get("kind") == "val" and all(f"val_unseen.{k}" in rec for k in KEYS):
            out[int(rec["step"])] = {k: float(rec[f"val_unseen.{k}"]) for k in KEYS}
    return out


def seconds_per_step(log: Path, after: int, until: int | None = None) -> dict[str, float | int]:
    """Median, min and max of ``1 / it_s`` over the ``"kind": "train"`` records past step ``after`` and up to
    ``until`` (each record's rate covers the steps since the previous log)."""
    rates = sorted(1.0 / float(r["it_s"]) for r in map(json.loads, filter(str.strip, log.read_text().splitlines()))
                   if r.get("kind") == "train" and r.get("it_s") and after < int(r["step"]) <= (until or 1 << 62))
    if not rates:
        return {"after_step": after, "until_step": until, "records": 0}
    return {"after_step": after, "until_step": until, "records": len(rates), "median": statistics.median(rates), "min": rates[0],
            "max": rates[-1]}


def v3_course() -> dict[int, dict[str, float]]:
    d = json.loads((ROOT / "studies" / "reverie_teacher" / "diagnosis.json").read_text())
    return {int(v["step"]): {k: float(v[k]) for k in KEYS} for v in d[V3]["validation"]}


def verdict(vals: dict[int, dict[str, float]]) -> dict:
    """``{"verdict": "passed" | "failed" | "pending", "failed_on": [...], "at_600": {...}}``."""
    if STEP not in vals:
        return {"verdict": "pending", "rule": RULE}
    at = vals[STEP]
    failed = [k for k in KEYS if FAILS[k](at[k])]
    return {"verdict": "failed" if failed else "passed", "failed_on": failed, "at_600": at, "rule": RULE}


def report(log: Path) -> dict:
    vals, v3 = readings(log), v3_course()
    rows = [{"step": s, "samples": 64 * s, "v4": vals[s], "v3_at_equal_samples": v3.get(2 * s)} for s in sorted(vals)]
    return {"log": str(log), "written": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
            **verdict(vals), "readings": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--log", required=True, type=Path, help="RUN/log.jsonl of rev-teacher-v4-pre")
    p.add_argument("--out", type=Path, help="write the report here (JSON)")
    p.add_argument("--watch", action="store_true", help="wait until step 600 is validated")
    p.add_argument("--stop-pid", type=int, help="with --watch: SIGTERM this process if the rule fails")
    p.add_argument("--poll", type=float, default=60.0, help="seconds between reads with --watch")
    p.add_argument("--speed-after", type=int, help="also report seconds per step past this step (train records)")
    p.add_argument("--speed-until", type=int, help="with --speed-after: up to this step")
    args = p.parse_args(argv)
    while True:
        rep = report(args.log) if args.log.is_file() else {"verdict": "pending", "rule": RULE, "readings": []}
        if rep["verdict"] != "pending" or not args.watch:
            break
        if args.stop_pid and not _alive(args.stop_pid):
            print(f"process {args.stop_pid} has ended before step {STEP} was validated; nothing to watch")
            return 2
        time.sleep(args.poll)
    for r in rep["readings"]:
        v3 = r["v3_at_equal_samples"]
        print(f"step {r['step']:5d} ({r['samples']:6d} samples)  " + "  ".join(
            f"{k} {r['v4'][k]:.3f}" + (f" (v3 {v3[k]:.3f})" if v3 else "") for k in KEYS))
    print(f"step {STEP}: {rep['verdict']}" + (f" on {', '.join(rep['failed_on'])}" if rep.get("failed_on") else ""))
    if args.speed_after is not None and args.log.is_file():
        rep["seconds_per_step"] = sp = seconds_per_step(args.log, args.speed_after, args.speed_until)
        print(f"seconds per step, steps {args.speed_after + 1}-{args.speed_until or 'end'}: " + (
            f"median {sp['median']:.1f} ({sp['min']:.1f}-{sp['max']:.1f}) over {sp['records']} log records"
            if sp["records"] else "no train record"))
    if args.out:
        args.out.write_text(json.dumps(rep, indent=1) + "\n")
    if rep["verdict"] == "failed" and args.stop_pid and _alive(args.stop_pid):
        os.kill(args.stop_pid, signal.SIGTERM)
        print(f"sent SIGTERM to the driver {args.stop_pid}: the run stops at a checkpoint")
    return {"passed": 0, "failed": 3, "pending": 2}[rep["verdict"]]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


if __name__ == "__main__":
    raise SystemExit(main())
