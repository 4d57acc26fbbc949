"""EXPLORATORY (issue 20, after the tables' teacher closed): does an agent's STOP probability single out
the goal viewpoints it visits?  Point 12 of this study's README inferred that the teacher's does not;
this measures it.

Runs a trained agent arg-max (``minivln navigate``'s loop) on a split's first N instructions and reads,
at the end of each episode, the STOP probability the agent recorded at every node it stood on
(softmax(fused)[0], the score its walk-back ranks nodes by) and whether that node is a goal viewpoint
of the episode.  Writes, per network: the mean STOP probability at goal and other nodes, the AUC
(probability that a goal node's score beats another node's, pooled over episodes), and, over the
episodes that stood on a goal and on another node, how often the highest-scoring node is a goal.

    python studies/reverie_teacher/stop_scores.py --checkpoint RUN/model --split val_seen \\
        --max-episodes 200 --features F --objects O --out OUT.json
"""

from __future__ import annotations

import json
import tempfile

import torch

from minivln.paths import atomic_write_text
from minivln.training.agent import DUETAgent
from minivln.training.navigate import navigate
from stop_bias import probe_parser  # this folder's sibling (scripts run by path)


def auc(pos: list[float], neg: list[float]) -> float:
    """P(a score from ``pos`` > one from ``neg``), ties counted half."""
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg)) if pos and neg else float("nan")


def main() -> None:
    args = probe_parser(__doc__).parse_args()
    torch.set_num_threads(1)
    episodes: list[list[tuple[float, bool]]] = []  # per episode: (stop probability, goal?) per node stood on
    finish = DUETAgent._finish

    def recording_finish(self, run, env):
        for i in range(len(run.eps)):
            goals = run.goal_sets[i]
            episodes.append([(rec.stop_prob, vp in goals) for vp, rec in run.nav.maps[i].stop_records.items()])
        return finish(self, run, env)
    DUETAgent._finish = recording_finish
    with tempfile.TemporaryDirectory() as tmp:
        res = navigate(args.checkpoint, "reverie", args.split, tmp, data_dir=args.data_dir, features=args.features,
                       objects=args.objects, batch_size=25, max_episodes=args.max_episodes)
    DUETAgent._finish = finish
    goal = [s for ep in episodes for s, g in ep if g]
    other = [s for ep in episodes for s, g in ep if not g]
    mixed = [ep for ep in episodes if any(g for _, g in ep) and not all(g for _, g in ep)]
    rec = {"checkpoint": args.checkpoint, "split": args.split, "first": args.max_episodes,
           "features": res["features"], "sr": res["metrics"]["sr"], "oracle_sr": res["metrics"]["oracle_sr"],
           "episodes": len(episodes), "nodes_goal": len(goal), "nodes_other": len(other),
           "mean_stop_goal": sum(goal) / max(1, len(goal)), "mean_stop_other": sum(other) / max(1, len(other)),
           "auc_goal_vs_other": auc(goal, other), "episodes_with_goal_and_other": len(mixed),
           "top_node_is_goal": sum(max(ep)[1] for ep in mixed) / max(1, len(mixed))}
    atomic_write_text(args.out, json.dumps(rec, indent=1) + "\n")
    print(json.dumps(rec))


if __name__ == "__main__":
    main()
