"""``minivln show``: one episode drawn top-down, as a PNG.

    minivln show --preds SUBMISSION.json[.gz] --instr-id ID --task r2r --split val_unseen --out EP.png
    minivln show --checkpoint RUN --instr-id ID --task r2r --split val_unseen --out EP.png [--features F]

The house's navigation graph (viewpoints at their camera positions, x/y in metres, the floors the
episode does not touch faded), the ground-truth path (green, from the start square to the goal star,
with the 3 m success radius), the agent's path (blue arrows) and its stop (a cross), and the
instruction as the title with the episode's official metrics.  With ``--checkpoint`` the agent is run
on that one instruction first (arg-max, as ``minivln navigate``).
"""

from __future__ import annotations

import argparse
import tempfile
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from minivln.data.datasets import Episode, load_episodes
from minivln.data.graph import Graphs, House
from minivln.evaluation.evaluator import Evaluator, load_submission
from minivln.evaluation.metrics import SUCCESS_DISTANCE
from minivln.paths import DataError, resolve_data_dir
from minivln.training.navigate import navigate
from minivln.training.plot import new_figure, require_matplotlib, save_png

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FLOOR_GAP = 1.5  # metres: viewpoints more than this above/below every path node are on another floor


def episode_trajectory(preds: list, instr_id: str) -> list[str]:
    """The viewpoints of ``instr_id``'s trajectory in a leaderboard submission (repeats collapsed)."""
    for p in preds:
        if isinstance(p, dict) and p.get("instr_id") == instr_id:
            vps = [step[0] if isinstance(step, (list, tuple)) else step for step in p["trajectory"]]
            return [v for i, v in enumerate(vps) if i == 0 or v != vps[i - 1]]
    raise DataError(f"the submission has no trajectory for instruction {instr_id!r}")


def draw_episode(house: House, episode: Episode, trajectory: list[str], metrics: dict[str, float]) -> Figure:
    """The top-down picture of one episode (see the module docstring)."""
    pos = house.positions
    on_path = [house.idx(v) for v in (*episode.path, *trajectory)]
    z = pos[on_path, 2]
    same_floor = np.any(np.abs(pos[:, 2][:, None] - z[None, :]) < FLOOR_GAP, axis=1)
    fig = new_figure(7.5, 7.5)
    from matplotlib.patches import (
        Circle,  # the optional plot extra: new_figure says how to install it
    )

    ax = fig.add_subplot(1, 1, 1)
    ii, jj = np.nonzero(np.triu(house.adjacency))
    for i, j in zip(ii, jj):
        both = same_floor[i] and same_floor[j]
        ax.plot(pos[[i, j], 0], pos[[i, j], 1], color="0.75" if both else "0.93", linewidth=0.8, zorder=1)
    ax.scatter(pos[same_floor, 0], pos[same_floor, 1], s=12, color="0.55", zorder=2, label="viewpoint")
    ax.scatter(pos[~same_floor, 0], pos[~same_floor, 1], s=8, color="0.9", zorder=1)
    gt = pos[[house.idx(v) for v in episode.path]]
    ax.plot(gt[:, 0], gt[:, 1], color="tab:green", linewidth=4, alpha=0.6, zorder=3, label="ground truth")
    goal = gt[-1]
    ax.add_patch(Circle((goal[0], goal[1]), SUCCESS_DISTANCE, fill=False, linestyle=":", color="tab:green",
                        zorder=3, label=f"success radius ({SUCCESS_DISTANCE:g} m)"))
    ax.scatter(*gt[0, :2], marker="s", s=120, color="tab:green", edgecolor="k", zorder=5, label="start")
    ax.scatter(*goal[:2], marker="*", s=260, color="tab:green", edgecolor="k", zorder=5, label="goal")
    tr = pos[[house.idx(v) for v in trajectory]]
    for a, b in zip(tr[:-1], tr[1:]):
        ax.annotate("", xy=b[:2], xytext=a[:2], zorder=4,
                    arrowprops={"arrowstyle": "->", "color": "tab:blue", "linewidth": 2})
    ax.plot([], [], color="tab:blue", linewidth=2, label="agent")
    ax.scatter(*tr[-1, :2], marker="X", s=160, color="tab:blue", edgecolor="k", zorder=6, label="agent's stop")
    ax.set_aspect("equal")
    xs, ys = pos[same_floor, 0], pos[same_floor, 1]
    pad = 2.0
    ax.set_xlim(xs.min() - pad, xs.max() + pad)
    ax.set_ylim(ys.min() - pad, ys.max() + pad)
    ax.set_xlabel("x (m)")
    ax.set_ylabel("y (m)")
    ax.grid(alpha=0.2)
    ax.legend(fontsize=7, loc="best")
    result = "success" if metrics.get("sr", 0) >= 0.5 else "failure"
    facts = (f"{episode.instr_id} in {episode.scan}: {result}, stopped {metrics['nav_error']:.1f} m from the goal, "
             f"path {metrics['trajectory_length']:.1f} m, SPL {metrics['spl']:.2f}")
    ax.set_title("\n".join(textwrap.wrap(episode.instruction, 90)) + "\n" + facts, fontsize=8)
    return fig


def show(task: str, split: str, instr_id: str, out: str | Path, *, preds: str | None = None,
         checkpoint: str | None = None, data_dir: str | None = None, features: str | None = None) -> Path:
    """Draw ``instr_id`` from a submission file or by running a checkpoint; returns the PNG path."""
    if (preds is None) == (checkpoint is None):
        raise DataError("show: give exactly one of --preds (a submission) and --checkpoint (an agent to run)")
    require_matplotlib()  # before the agent runs
    root = resolve_data_dir(data_dir)
    episodes = {e.instr_id: e for e in load_episodes(task, split, root)}
    if instr_id not in episodes:
        raise DataError(f"show: {task} {split} has no instruction {instr_id!r}")
    episode = episodes[instr_id]
    if checkpoint is not None:
        with tempfile.TemporaryDirectory() as tmp:
            res = navigate(checkpoint, task, split, tmp, data_dir=data_dir, features=features, instr_ids=[instr_id])
            entries = load_submission(res["submission"])
    else:
        entries = load_submission(preds)
    trajectory = episode_trajectory(entries, instr_id)
    metrics = Evaluator(task, split, root).score_episode(instr_id, trajectory)
    fig = draw_episode(Graphs(root)[episode.scan], episode, trajectory, metrics)
    return save_png(fig, out, tight=True)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("show", help="draw one episode top-down (graph, ground truth, agent's path) to a PNG",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--instr-id", required=True, help="the instruction, e.g. 4332_0")
    p.add_argument("--task", default="r2r", choices=("r2r", "reverie"))
    p.add_argument("--split", default="val_unseen")
    p.add_argument("--preds", default=None, help="a submission (.json or .json.gz) holding its trajectory")
    p.add_argument("--checkpoint", default=None, help="or an agent to run on it (RUN, RUN/model, a checkpoint)")
    p.add_argument("--data-dir", default=None, help="data directory (default: $MINIVLN_DATA)")
    p.add_argument("--features", default=None, help="view features for --checkpoint (default: the run's)")
    p.add_argument("--out", required=True, help="PNG to write")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    out = show(args.task, args.split, args.instr_id, args.out, preds=args.preds, checkpoint=args.checkpoint,
               data_dir=args.data_dir, features=args.features)
    print(out)
    return 0
