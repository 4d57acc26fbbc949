"""Collect the REVERIE teacher diagnosis (issue 20) from its runs' logs into one JSON.

Every figure is read from a run's own ``log.jsonl`` (validation records) or from a ``minivln navigate``
metrics file; the runs and their commands are listed in this folder's README.

    python studies/reverie_teacher/collect.py --runs RUNS.json --out studies/reverie_teacher/diagnosis.json

``RUNS.json`` maps a label to ``{"log": PATH}`` (validation records of a training run) or
``{"metrics": PATH}`` (a navigate metrics file), plus ``"command"`` and ``"commit"`` for the record.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

KEEP = ("sr", "spl", "oracle_sr", "rgs", "rgspl", "grounded_share", "trajectory_length",
        "og_acc", "sap_fused_acc", "mlm_acc", "mrc_acc")


def validations(log: Path) -> list[dict]:
    """The validation records of a run's log, with the split prefix dropped and only :data:`KEEP`."""
    out = []
    for line in log.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") != "val":
            continue
        vals = {k.split(".", 1)[1]: v for k, v in rec.items() if "." in k and k.split(".", 1)[1] in KEEP}
        out.append({"step": rec["step"], **{k: round(v, 4) for k, v in vals.items() if v is not None}})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", required=True, help="JSON: label -> {log|metrics, command, commit}")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    runs = json.loads(Path(args.runs).read_text())
    result = {}
    for label, spec in runs.items():
        rec = {k: spec[k] for k in ("command", "commit", "note") if k in spec}
        if "log" in spec:
            rec["validation"] = validations(Path(spec["log"]))
        else:
            m = json.loads(Path(spec["metrics"]).read_text())
            rec["metrics"] = {k: round(m[k], 4) for k in KEEP if m.get(k) is not None}
            rec["instructions"] = m.get("instructions")
        result[label] = rec
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
