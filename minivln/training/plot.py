"""``minivln plot RUN_DIR``: training-loss and validation SR/SPL curves of a run, as ``RUN/curves.png``.

Reads ``RUN/log.jsonl`` (see :mod:`minivln.training.logging`).  The left panel shows every training
key starting with ``loss``; the right one every validation key ending in ``sr`` or ``spl`` (e.g.
``val_unseen.sr``, ``val_seen.spl``, ``val_unseen.osr``), in percent when they are fractions.
"""

from __future__ import annotations

import argparse
import io
import os
from pathlib import Path

from minivln.paths import DataError, atomic_write_bytes, check_writable_dir, refuse_overwriting_inputs
from minivln.training.logging import read_jsonl


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="draw a run's loss and validation SR/SPL curves to RUN_DIR/curves.png")
    p.add_argument("run_dir", help="a run directory holding log.jsonl")
    p.add_argument("--out", default=None, help="output PNG (default: RUN_DIR/curves.png)")
    p.set_defaults(func=_plot)


def _plot(args: argparse.Namespace) -> int:
    out = plot_run(args.run_dir, args.out)
    print(out)
    return 0


def _series(records: list[dict], keep) -> dict[str, tuple[list[int], list[float]]]:
    series: dict[str, tuple[list[int], list[float]]] = {}
    for r in records:
        for k, v in r.items():
            if keep(k) and isinstance(v, (int, float)) and not isinstance(v, bool):
                xs, ys = series.setdefault(k, ([], []))
                xs.append(int(r["step"]))
                ys.append(float(v))
    return series


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Draw the curves of ``run_dir`` to ``out`` (default ``run_dir/curves.png``); returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure


    run = Path(run_dir)
    log = run / "log.jsonl"
    target = Path(out) if out is not None else run / "curves.png"
    refuse_overwriting_inputs(target, {"the run's log": log})
    records = read_jsonl(log)
    if not records:
        raise DataError(f"{log} does not exist or holds no records")
    check_writable_dir(target.parent, "output directory")
    train = [r for r in records if r.get("kind", "train") == "train" and "step" in r]
    val = [r for r in records if r.get("kind") == "val" and "step" in r]
    losses = _series(train, lambda k: k.startswith("loss"))
    rates = _series(val, lambda k: k.lower().endswith(("sr", "spl")))

    fig = Figure(figsize=(11, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax_loss, ax_val = fig.subplots(1, 2)
    for k, (xs, ys) in sorted(losses.items()):
        ax_loss.plot(xs, ys, label=k, linewidth=2.0 if k == "loss" else 1.0)
    ax_loss.set(title="training loss", xlabel="step", ylabel="loss")
    if losses and all(y > 0 for _, ys in losses.values() for y in ys):
        ax_loss.set_yscale("log")
    for k, (xs, ys) in sorted(rates.items()):
        scale = 100.0 if all(0.0 <= y <= 1.0 for y in ys) else 1.0
        ax_val.plot(xs, [y * scale for y in ys], marker="o", markersize=3, label=k)
    ax_val.set(title="validation", xlabel="step", ylabel="SR / SPL (%)")
    for ax, items in ((ax_loss, losses), (ax_val, rates)):
        if items:
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        else:
            ax.text(0.5, 0.5, "no records", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(run.resolve().name)
    fig.tight_layout()

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(target, buf.getvalue())
    return target
