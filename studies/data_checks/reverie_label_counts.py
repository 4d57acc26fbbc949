"""Count the REVERIE "nearest goal" pretraining labels against the plain next-path-node labels.

Every prefix state of every third REVERIE instruction of a split is built with the pretraining code
(``minivln.training.pretrain_data.build_state`` with the goal set of
``minivln.data.reverie.ReverieGoals.episode_goals``) and its SAP label compared with the R2R-style
label (the next path node, STOP at the end of the path).  Also counts the annotated paths that end
at a viewpoint from which the target is not visible.  docs/training.md quotes the output.

    python studies/data_checks/reverie_label_counts.py --data-dir ../shared/data [--split val_seen] [--every 3]
"""

from __future__ import annotations

import argparse
import os

import numpy as np


class _NoFeatures:
    """build_state needs view features for its observations; the labels do not depend on them."""

    def get(self, scan: str, vp: str) -> np.ndarray:
        return np.zeros((36, 1), np.float32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default=os.environ.get("MINIVLN_DATA", "../shared/data"))
    ap.add_argument("--split", default="val_seen")
    ap.add_argument("--every", type=int, default=3, help="every N-th instruction (default 3)")
    args = ap.parse_args()

    from minivln.data.datasets import load_episodes
    from minivln.data.graph import Graphs
    from minivln.data.reverie import ReverieGoals
    from minivln.training.pretrain_data import build_state

    graphs = Graphs(args.data_dir)
    goals = ReverieGoals(args.data_dir, graphs)
    episodes = load_episodes("reverie", args.split, args.data_dir)
    feats = _NoFeatures()
    same = early_stop = other = final_move = 0
    for ep in episodes[:: args.every]:
        house, ep_goals = graphs[ep.scan], goals.episode_goals(ep)
        for t in range(len(ep.path)):
            state = build_state(ep, t, house, feats, [101, 102], goals=ep_goals)
            plain = ep.path[t + 1] if t + 1 < len(ep.path) else None
            if state.next_vp == plain:
                same += 1
            elif plain is None:
                final_move += 1
            elif state.next_vp is None:
                early_stop += 1
            else:
                other += 1
    total = same + early_stop + other + final_move
    print(f"REVERIE {args.split}, one instruction in {args.every}: {total} prefix states")
    print(f"  label = next path node (STOP at the end): {same} ({100 * same / max(total, 1):.0f} %)")
    print(f"  early STOP (a goal viewpoint before the end):  {early_stop}")
    print(f"  another node:                               {other}")
    print(f"  final state labelled as a move, not STOP:   {final_move}")
    paths: dict[str, object] = {}
    for ep in episodes:
        paths.setdefault(ep.instr_id.rsplit("_", 1)[0], ep)
    unseen_end = sum(1 for ep in paths.values() if not goals.is_goal(ep, ep.goal))
    print(f"  annotated paths ending where the target is not visible: {unseen_end} of {len(paths)} "
          f"{args.split} items (path + target)")


if __name__ == "__main__":
    main()
