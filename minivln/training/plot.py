"""``minivln plot RUN_DIR``: training-loss and validation curves of a run, as ``RUN/curves.png``.

Reads ``RUN/log.jsonl`` (see :mod:`minivln.training.logging`).  The first panel shows every training
key starting with ``loss``; then one panel per validation metric the run logged (fine-tuning: SR,
SPL, oracle SR, navigation error, nDTW, REVERIE's RGS/RGSPL; pretraining: SAP/MLM/MRC/OG accuracy),
a line with markers per split, rates in percent.

The PNG pictures (this command, ``minivln show``, ``bench figure``, an experiment's ``plots``) are drawn
with matplotlib, the optional ``plot`` extra: without it they stop with one line saying how to install
it (:func:`require_matplotlib`).  :func:`bars_svg` draws a results table's bars (the demo's picture)
as a small SVG file with no dependency.
"""

from __future__ import annotations

import argparse
import io
import os
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

from minivln.paths import (
    DataError,
    atomic_write_bytes,
    atomic_write_text,
    check_writable_dir,
    refuse_overwriting_inputs,
)
from minivln.training.logging import read_jsonl

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PLOT_EXTRA = "pip install -e '.[plot]' in the clone (or pip install matplotlib)"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="draw a run's loss and validation SR/SPL curves to RUN_DIR/curves.png")
    p.add_argument("run_dir", help="a run directory holding log.jsonl")
    p.add_argument("--out", default=None, help="output PNG (default: RUN_DIR/curves.png)")
    p.set_defaults(func=_plot)


def _plot(args: argparse.Namespace) -> int:
    require_matplotlib()
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


def require_matplotlib() -> None:
    """A :class:`DataError` with the install line when matplotlib (the ``plot`` extra) is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise DataError(f"drawing PNG pictures needs matplotlib, not installed (the optional 'plot' extra): "
                        f"{PLOT_EXTRA}") from None


def new_figure(width: float, height: float) -> Figure:
    """A matplotlib figure on the Agg canvas (no display needed), at the project's 110 dpi."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

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


# ------------------------------------------------------------------------------ SVG, no dependency

SR_COLOR, SPL_COLOR = "#1f77b4", "#ff7f0e"  # matplotlib's first two colours, as the PNG bars have


def bars_svg(table: dict[str, Any], path: str | os.PathLike) -> Path:
    """SR and SPL of every row of a results table (``minivln experiment``'s JSON: ``rows`` with ``name``,
    ``sr``, ``sr_se``, ``spl``, ``spl_se``, ``episodes``) as bars with +-1 standard error, in percent of
    episodes on a 0-100 axis, written as an SVG file (any browser shows it) without matplotlib."""
    rows = table["rows"]
    left, top, plot_h, slot, bar = 70, 58, 260, 110, 38
    width, height = max(left + slot * len(rows) + 20, 480), top + plot_h + 110

    def y(pct: float) -> float:  # the page's y of a percentage (0 at the bottom of the plot)
        return top + plot_h * (1 - min(max(pct, 0.0), 100.0) / 100)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2:.0f}" y="18" text-anchor="middle" font-size="12">{escape(str(table["table"]))}</text>',
           f'<text x="{width / 2:.0f}" y="34" text-anchor="middle">{escape(str(table["split"]))}, '
           f'{rows[0]["episodes"] if rows else 0} episodes, {escape(str(table["features"]))} features</text>']
    for pct in range(0, 101, 20):  # grid and axis labels
        out.append(f'<line x1="{left}" x2="{width - 20}" y1="{y(pct):.1f}" y2="{y(pct):.1f}" stroke="#ddd"/>'
                   f'<text x="{left - 6}" y="{y(pct) + 4:.1f}" text-anchor="end">{pct}</text>')
    out.append(f'<text transform="translate(16,{top + plot_h / 2:.0f}) rotate(-90)" text-anchor="middle">'
               '% of episodes (+-1 s.e.)</text>')
    for i, r in enumerate(rows):
        centre = left + slot * (i + 0.5)
        for off, key, color in ((-0.5, "sr", SR_COLOR), (0.5, "spl", SPL_COLOR)):
            value, se = 100 * r[key], 100 * (r.get(f"{key}_se") or 0.0)
            x = centre + off * (bar + 2) - bar / 2
            tip = f'{escape(str(r["name"]))}: {key.upper()} {value:.1f} +- {se:.1f}'  # shown on hover
            out.append(f'<rect x="{x:.1f}" y="{y(value):.1f}" width="{bar}" height="{y(0) - y(value):.1f}" '
                       f'fill="{color}"><title>{tip}</title></rect>')
            mid = x + bar / 2
            if se:
                lo, hi = y(value - se), y(value + se)
                out.append(f'<path d="M{mid:.1f},{lo:.1f}V{hi:.1f}M{mid - 4:.1f},{lo:.1f}h8M{mid - 4:.1f},{hi:.1f}h8" '
                           'stroke="black"/>')
            out.append(f'<text x="{mid:.1f}" y="{y(value + se) - 4:.1f}" text-anchor="middle" font-size="9">'
                       f'{value:.1f}</text>')
        out.append(f'<text transform="translate({centre + 20:.1f},{y(0) + 14:.1f}) rotate(-20)" text-anchor="end">'
                   f'{escape(str(r["name"]))}</text>')
    out.append(f'<line x1="{left}" x2="{width - 20}" y1="{y(0):.1f}" y2="{y(0):.1f}" stroke="black"/>')
    for k, (label, color) in enumerate((("SR (success rate)", SR_COLOR),
                                        ("SPL (success weighted by path length)", SPL_COLOR))):
        out.append(f'<rect x="{left + 8 + 150 * k}" y="{height - 26}" width="10" height="10" fill="{color}"/>'
                   f'<text x="{left + 22 + 150 * k}" y="{height - 17}">{label}</text>')
    out.append("</svg>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(out) + "\n")
    return path
