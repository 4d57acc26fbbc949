"""``minivln plot RUN_DIR``: training-loss and validation curves of a run, as ``RUN/curves.png``.

Reads ``RUN/log.jsonl`` (see :mod:`minivln.training.logging`).  The first panel shows every training
key starting with ``loss``; then one panel per validation metric the run logged (fine-tuning: SR,
SPL, oracle SR, navigation error, nDTW, REVERIE's RGS/RGSPL; pretraining: SAP/MLM/MRC/OG accuracy),
a line with markers per split, rates in percent.
"""

from __future__ import annotations

import argparse
import io
import os
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from minivln.paths import (
    DataError,
    atomic_write_bytes,
    check_writable_dir,
    refuse_overwriting_inputs,
)
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


#: validation metrics drawn, in this order (one panel each, a line per split), when a run logs them
VAL_METRICS = ("sr", "spl", "oracle_sr", "nav_error", "ndtw", "rgs", "rgspl",
               "sap_fused_acc", "mlm_acc", "mrc_acc", "og_acc")
NAMES = {"sr": "SR (success rate)", "spl": "SPL (success weighted by path length)", "oracle_sr": "oracle SR",
         "nav_error": "navigation error (m)", "ndtw": "nDTW", "rgs": "RGS (remote grounding success)",
         "rgspl": "RGSPL", "sap_fused_acc": "SAP accuracy (fused)", "mlm_acc": "MLM accuracy",
         "mrc_acc": "MRC accuracy", "og_acc": "OG accuracy"}
RATES = {"sr", "spl", "oracle_sr", "ndtw", "rgs", "rgspl", "sap_fused_acc", "mlm_acc", "mrc_acc", "og_acc"}


def new_figure(width: float, height: float) -> Figure:
    """A matplotlib figure on the Agg canvas (no display needed), at the project's 110 dpi."""
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: str | os.PathLike, *, tight: bool = False) -> Path:
    """Write ``fig`` as a PNG, atomically (the folder is made if missing); ``tight`` trims the margins."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight" if tight else None)
    atomic_write_bytes(path, buf.getvalue())
    return path


def validation_metrics(val_records: list[dict]) -> list[str]:
    """The :data:`VAL_METRICS` that some validation record logs (``<split>.<metric>`` keys), in order."""
    logged = {k.split(".", 1)[1] for r in val_records for k in r if "." in k}
    return [m for m in VAL_METRICS if m in logged]


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Draw the curves of ``run_dir`` to ``out`` (default ``run_dir/curves.png``); returns the path.

    Panels: the training losses (log scale when positive), then one panel per validation metric of
    :data:`VAL_METRICS` that the run logged, a line with markers per split; rates in percent on a
    0-based axis, so that a run that validated once or twice still reads."""
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
    metrics = validation_metrics(val)
    n = 1 + max(1, len(metrics))
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig = new_figure(4.2 * cols, 3.4 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    ax_loss = axes[0]
    for k, (xs, ys) in sorted(losses.items()):
        ax_loss.plot(xs, ys, label=k, linewidth=2.0 if k == "loss" else 1.0)
    ax_loss.set(title="training loss", xlabel="step")
    if losses and all(y > 0 for _, ys in losses.values() for y in ys):
        ax_loss.set_yscale("log")
    if losses:
        ax_loss.legend(fontsize=7)
        ax_loss.grid(alpha=0.3)
    else:
        ax_loss.text(0.5, 0.5, "no training records", ha="center", va="center", transform=ax_loss.transAxes)
    steps = [int(r["step"]) for r in val] + [int(r["step"]) for r in train]
    span = (min(steps), max(steps)) if steps else (0, 1)
    pad = max(1.0, 0.05 * (span[1] - span[0]))
    for ax, metric in zip(axes[1:], metrics):
        series = _series(val, lambda k, m=metric: "." in k and k.split(".", 1)[1] == m)
        top = 0.0
        for k, (xs, ys) in sorted(series.items()):
            scale = 100.0 if metric in RATES else 1.0
            ys = [y * scale for y in ys]
            top = max(top, max(ys))
            ax.plot(xs, ys, marker="o", markersize=4, label=k.split(".", 1)[0])
            ax.annotate(f"{ys[-1]:.1f}", (xs[-1], ys[-1]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set(title=NAMES[metric] + (" (%)" if metric in RATES else ""), xlabel="step")
        ax.set_xlim(span[0] - pad, span[1] + pad)
        ax.set_ylim(0, top * 1.15 if top > 0 else 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if not metrics:
        axes[1].text(0.5, 0.5, "no validation records", ha="center", va="center", transform=axes[1].transAxes)
    for ax in axes[1 + max(1, len(metrics)):]:
        ax.set_visible(False)
    fig.suptitle(run.resolve().name)
    fig.tight_layout()
    return save_png(fig, target)
