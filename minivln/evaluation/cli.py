"""``minivln eval``: score a leaderboard-format submission file (see ``docs/metrics.md``).

Prints a table (rates x 100, distances in metres) and, with ``--out FILE``, writes

* ``FILE``: a flat JSON object ``{metric name: value}`` with exactly the task's metric names, rates
  as fractions in [0, 1] and distances in metres;
* ``<FILE stem>.per_episode.json`` beside it: ``{instr_id: {metric name: value}}`` for every scored
  episode (success flags are 0.0 / 1.0).

Warnings (missing, unknown or repeated ids) go to stderr; a bad submission is one error line and
exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from minivln.data.datasets import TASKS
from minivln.paths import (
    atomic_write_text,
    check_writable_dir,
    refuse_overwriting_inputs,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="score a submission (R2R / REVERIE leaderboard format) against a split",
        description="Score a submission file against a split: SR, SPL, NE, oracle metrics, nDTW, SDTW, "
        "CLS (R2R) or SR, OSR, SPL, RGS, RGSPL, TL (REVERIE).",
    )
    p.add_argument("--task", required=True, choices=TASKS, help="which task's ids and metrics")
    p.add_argument("--split", required=True, help="split to score against (train, val_seen, val_unseen)")
    p.add_argument("--preds", required=True, help="submission JSON: a list of {instr_id, trajectory[, predObjId]}")
    p.add_argument("--data-dir", default=None, help="data directory (default: $MINIVLN_DATA)")
    p.add_argument(
        "--out",
        default=None,
        help="write the flat metrics JSON here, and per-episode values to <stem>.per_episode.json beside it",
    )
    p.add_argument("--strict", action="store_true", help="require every instruction id of the split")
    p.add_argument(
        "--spl-convention",
        choices=("release", "duet"),
        default="release",
        help="SPL reference length: 'release' = shortest distance start->goal (default, official "
        "evaluators); 'duet' = annotated path length with the denominator floored at 0.01",
    )
    p.add_argument(
        "--allow-jumps",
        action="store_true",
        help="accept moves between non-adjacent viewpoints (scored by shortest distance, as DUET does)",
    )
    p.add_argument(
        "--collapse-repeats",
        action="store_true",
        help="drop consecutive repeated viewpoints before scoring (changes nDTW/SDTW only)",
    )
    p.set_defaults(func=_eval)


def per_episode_path(out: str | Path) -> Path:
    """Where the per-episode values go for a metrics file ``out``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.per_episode.json")


def format_table(summary: dict[str, float], n_scored: int, title: str) -> str:
    """A two-column text table: rates x 100 with 2 decimals, distances in metres."""
    from minivln.evaluation.metrics import RATE_METRICS

    lines = [f"{title}  ({n_scored} episodes scored)"]
    width = max(len(k) for k in summary)
    for name, value in summary.items():
        if value is None:  # a share of nothing (e.g. RGS|SR without a success)
            shown = f"{'-':>7}"
        else:
            shown = f"{100 * value:7.2f}" if name in RATE_METRICS else f"{value:7.2f} m"
        lines.append(f"  {name:<{width}}  {shown}")
    return "\n".join(lines)


def _eval(args: argparse.Namespace) -> int:
    from minivln.evaluation.evaluator import Evaluator, load_submission

    if args.out:  # before any work: an output that is the input, or that cannot be written
        refuse_overwriting_inputs(args.out, {"--preds": args.preds}, "--out")
        refuse_overwriting_inputs(per_episode_path(args.out), {"--preds": args.preds}, "the per-episode file of --out")
        check_writable_dir(Path(args.out).parent, "output directory")
    preds = load_submission(args.preds)
    evaluator = Evaluator(
        args.task,
        args.split,
        args.data_dir,
        spl_convention=args.spl_convention,
        check_edges=not args.allow_jumps,
        collapse_repeats=args.collapse_repeats,
    )
    result = evaluator.evaluate(preds, strict=args.strict, source=str(args.preds))
    for line in result.report.warnings():
        print(f"minivln: warning: {line}", file=sys.stderr)
    print(format_table(result.summary, len(result.per_episode), f"{args.task} {args.split}"))
    if args.out:
        atomic_write_text(args.out, json.dumps(result.summary, indent=2) + "\n")
        side = per_episode_path(args.out)
        atomic_write_text(side, json.dumps(result.per_episode, indent=1) + "\n")
        print(f"wrote {args.out} and {side}")
    return 0
