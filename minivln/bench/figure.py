"""``minivln bench figure``: success rate against latency per episode (the paper's Fig. 1), as a PNG.

    minivln bench figure --bench BENCH.json \\
        --point teacher duet-r2r TEACHER/metrics_val_unseen.json \\
        --point "distilled student (int8)" distilled:onnxruntime-int8 NAV_INT8/metrics_val_unseen.json \\
        --out docs/img/fig1_sr_latency.png

Each ``--point LABEL ROW SCORE`` is one marker: x = the median episode time of row ``ROW`` (a row label
of the ``minivln bench model`` report, at ``--batch-size``), y = the success rate in ``SCORE``: a
metrics file (``metrics_<split>.json`` of ``minivln navigate`` / ``minivln eval``, any JSON object
with ``sr``) or one row of a results table (``docs/results/r2r_table3.json#none``: the row whose
``name`` or ``run`` is after the ``#``).  Points given the same LABEL are one marker (e.g. the seeds of
one recipe): their mean SR, with a bar of its standard error over them, at the median of their episode
times; the label says how many.  The x axis is logarithmic.  The title names the split and
the kind of view features of the scores (stand-in or real), the subtitle the machine, threads,
batch size, date and commit of the latency report.  A row timed with random weights (a preset) is
marked so: its latency is the architecture's, its score comes from the score file given.  Scores
of different splits, or on different numbers of instructions (``instructions`` of a metrics file,
``episodes`` of a table row), are refused.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any, Sequence

from minivln.bench.common import read_bench_report, read_json_input
from minivln.paths import DataError, check_writable_dir, refuse_overwriting_inputs
from minivln.training.plot import new_figure, require_matplotlib, save_png


def read_score(spec: str) -> dict[str, Any]:
    """``FILE`` or ``FILE#ROW``: ``{"sr", "split", "features", "source"}``; a :class:`DataError` when
    the file, the row or its ``sr`` is missing."""
    file, _, row = spec.partition("#")
    path = Path(file)
    data = read_json_input(path, "score file ", "a metrics_<split>.json or a results table")
    if not isinstance(data, dict):
        raise DataError(f"score file {path}: expected a JSON object")
    entry = data
    if row:
        rows = data.get("rows")
        if not isinstance(rows, list):
            raise DataError(f"score file {path} has no 'rows' to pick {row!r} from")
        found = [r for r in rows if isinstance(r, dict) and row in (r.get("name"), r.get("run"))]
        if not found:
            names = ", ".join(str(r.get("name")) for r in rows if isinstance(r, dict))
            raise DataError(f"score file {path} has no row {row!r} (rows: {names})")
        entry = found[0]
    sr = entry.get("sr")
    if not isinstance(sr, (int, float)) or isinstance(sr, bool) or not 0 <= sr <= 1:
        raise DataError(f"score {spec}: no success rate 'sr' in [0, 1]" + ("" if row else
                        " (a results table needs FILE#ROW)"))
    count = entry.get("instructions", entry.get("episodes"))
    return {"sr": float(sr), "split": entry.get("split", data.get("split")),
            "features": entry.get("features", data.get("features")),
            "instructions": int(count) if isinstance(count, int) and not isinstance(count, bool) else None,
            "source": spec}


def figure_points(bench: dict[str, Any], points: Sequence[Sequence[str]], batch_size: int) -> list[dict[str, Any]]:
    """The points to draw (label, row, x ms, SR, weights); a :class:`DataError` for a row that is not
    in the report at ``batch_size``."""
    rows = {r["label"]: r for r in bench["results"] if r["batch_size"] == batch_size}
    if not rows:
        sizes = sorted({r["batch_size"] for r in bench["results"]})
        raise DataError(f"the latency report has no rows at batch size {batch_size} (it has: {sizes})")
    out = []
    for label, row, score in points:
        if row not in rows:
            raise DataError(f"--point {label!r}: row {row!r} is not in the latency report at batch {batch_size} "
                            f"(rows: {', '.join(rows)})")
        s = read_score(score)
        out.append({"label": label, "row": row, "episode_ms": rows[row]["episode_ms"], **s,
                    "weights": rows[row].get("weights", bench.get("settings", {}).get("weights"))})
    splits = sorted({str(p["split"]) for p in out if p["split"]})
    if len(splits) > 1:
        raise DataError(f"the scores are of different splits ({', '.join(splits)}); one figure, one split")
    counts = sorted({p["instructions"] for p in out if p["instructions"] is not None})
    if len(counts) > 1:
        raise DataError(f"the scores are on different numbers of instructions ({', '.join(map(str, counts))}; "
                        "e.g. a navigate --max-episodes run): score every point on the whole split")
    return group_points(out)


def group_points(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Points of the same label as one (in the order of their first appearance): mean ``sr``,
    ``sr_se`` its standard error over them, ``episode_ms`` their median, ``n`` how many, ``rows``."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        groups.setdefault(p["label"], []).append(p)
    out = []
    for label, members in groups.items():
        if len(members) == 1:
            out.append({**members[0], "n": 1, "sr_se": None, "rows": [members[0]["row"]]})
            continue
        srs = [m["sr"] for m in members]
        weights = {m["weights"] for m in members}
        out.append({**members[0], "sr": statistics.mean(srs),
                    "sr_se": statistics.stdev(srs) / len(srs) ** 0.5,
                    "episode_ms": statistics.median(m["episode_ms"] for m in members), "n": len(members),
                    "rows": [m["row"] for m in members], "source": [m["source"] for m in members],
                    "weights": weights.pop() if len(weights) == 1 else "mixed"})
    return out


def _label_heights(points: list[dict[str, Any]], gap: float) -> list[float]:
    """The height (SR %) of each point's label: its own, except that labels of points at about the same
    latency (within a factor 1.7: a label reaches about that far right) are pushed apart to at least
    ``gap``, highest first, keeping their order."""
    ys = [100 * p["sr"] for p in points]
    out = list(ys)
    order = sorted(range(len(points)), key=lambda i: points[i]["episode_ms"])
    clusters: list[list[int]] = []
    for i in order:
        if clusters and points[i]["episode_ms"] <= 1.7 * points[clusters[-1][0]]["episode_ms"]:
            clusters[-1].append(i)
        else:
            clusters.append([i])
    for cluster in clusters:
        ranked = sorted(cluster, key=lambda i: -ys[i])
        centre = statistics.mean(ys[i] for i in ranked)
        span = gap * (len(ranked) - 1)
        start = max(centre + span / 2, ys[ranked[0]])  # the highest label no lower than its point
        for k, i in enumerate(ranked):
            out[i] = start - k * gap if len(ranked) > 1 else ys[i]
    return out


def draw(bench: dict[str, Any], points: list[dict[str, Any]], batch_size: int, out: str | Path) -> Path:
    """Draw the figure (see the module docstring) to ``out``."""
    m, s, code = bench.get("machine", {}), bench.get("settings", {}), bench.get("code") or {}
    splits = sorted({str(p["split"]) for p in points if p["split"]})
    kinds = sorted({str(p["features"]) for p in points if p["features"]})
    fig = new_figure(7.0, 4.8)
    from matplotlib.ticker import FuncFormatter  # the optional plot extra: new_figure says how to install it

    ax = fig.add_subplot(1, 1, 1)
    markers = "osD^vP*Xh"
    top = max(100 * p["sr"] for p in points)
    y_max = max(10.0, top * 1.25)
    label_y = _label_heights(points, gap=0.075 * y_max)
    for i, p in enumerate(points):
        name = p["label"] + (f" (mean of {p['n']})" if p["n"] > 1 else "")
        ax.scatter([p["episode_ms"]], [100 * p["sr"]], s=60, marker=markers[i % len(markers)], zorder=3,
                   label=name + (" (latency: random weights)" if p["weights"] == "random" else ""))
        if p["sr_se"]:
            ax.errorbar([p["episode_ms"]], [100 * p["sr"]], yerr=[100 * p["sr_se"]], fmt="none", ecolor="0.3",
                        capsize=3, lw=1, zorder=2)
        ax.annotate(f"{name}\n{100 * p['sr']:.1f}%"
                    + (f" ± {100 * p['sr_se']:.1f}" if p["sr_se"] else "") + f", {p['episode_ms']:.0f} ms",
                    (p["episode_ms"], 100 * p["sr"]),
                    xytext=(p["episode_ms"] * 1.12, label_y[i]), textcoords="data", fontsize=7, va="center",
                    arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.5"} if abs(label_y[i] - 100 * p["sr"]) > 0.5
                    else None)
    ax.set_xscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
    xs = [p["episode_ms"] for p in points]
    ax.set_xlim(min(xs) / 1.8, max(xs) * 2.5)
    ax.set_ylim(0, y_max)
    episodes = s.get("episodes", "synthetic")
    ax.set_xlabel(f"latency per episode (ms, log scale; median, {episodes} episodes, batch {batch_size})")
    ax.set_ylabel("SR (success rate, %)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")
    split = "/".join(splits) or "?"
    feats = "/".join(kinds) or "unknown"
    commit = (code.get("commit") or "unknown")[:10] + (" (dirty)" if code.get("dirty") else "")
    fig.suptitle(f"R2R {split}: success rate vs CPU latency ({feats} features)", fontsize=11)
    ax.set_title(f"{m.get('model_name', '?')}, {m.get('threads', '?')} thread(s); latency measured "
                 f"{bench.get('date', '?')}, commit {commit}", fontsize=7)
    fig.tight_layout()
    return save_png(fig, out)


def add_parser(bench_sub: argparse._SubParsersAction) -> None:
    """``minivln bench figure`` (registered by ``minivln bench``)."""
    f = bench_sub.add_parser(
        "figure", help="success rate vs latency per episode (Fig. 1) from a bench model report and score files",
        description="Draw SR against the median episode time (log x axis): one point per --point LABEL ROW "
                    "SCORE, ROW a row label of the `bench model --json` report, SCORE a metrics JSON "
                    "(with 'sr') or TABLE.json#ROWNAME.")
    f.add_argument("--bench", required=True, metavar="BENCH.json", help="a `minivln bench model --json` report")
    f.add_argument("--point", nargs=3, action="append", required=True, metavar=("LABEL", "ROW", "SCORE"),
                   help="a point: its legend LABEL, the ROW of the report timed, the SCORE file (repeat)")
    f.add_argument("--batch-size", type=int, default=1, help="the report's rows at this batch size (default 1)")
    f.add_argument("--out", required=True, help="output PNG")
    f.set_defaults(func=_figure)


def _figure(args: argparse.Namespace) -> int:
    require_matplotlib()
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise DataError(f"--out {out}: the figure is written as PNG, name it *.png")
    refuse_overwriting_inputs(out, {"--bench": args.bench, **{f"--point {p[0]!r}": p[2].partition("#")[0]
                                                             for p in args.point}})
    bench = read_bench_report(args.bench)
    points = figure_points(bench, args.point, args.batch_size)
    check_writable_dir(out.parent, "output directory")
    print(draw(bench, points, args.batch_size, out))
    return 0
