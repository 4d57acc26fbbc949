"""A hand-made 5-viewpoint house, written in the real connectivity format, for unit tests.

    a(0,0) -- b(2,0) -- c(4,0) -- d(4,3)
               \\
                e(2,-2)        f: not included (must be ignored)
"""

from __future__ import annotations

import json
from pathlib import Path

POS = {"a": (0, 0, 1.5), "b": (2, 0, 1.5), "c": (4, 0, 1.5), "d": (4, 3, 1.5), "e": (2, -2, 1.5), "f": (9, 9, 1.5)}
EDGES = [("a", "b"), ("b", "c"), ("c", "d"), ("b", "e"), ("e", "f")]
SCAN = "tinyscan"


def write_tiny_data(root: Path) -> Path:
    names = list(POS)
    entries = []
    for n in names:
        x, y, z = POS[n]
        unob = [(n, m) in EDGES for m in names]  # one direction only: the graph must symmetrise
        entries.append({
            "image_id": n,
            "pose": [1, 0, 0, x, 0, 1, 0, y, 0, 0, 1, z, 0, 0, 0, 1],
            "included": n != "f",
            "visible": [m != n for m in names],
            "unobstructed": unob,
            "height": 1.5,
        })
    (root / "connectivity").mkdir(parents=True, exist_ok=True)
    (root / "connectivity" / f"{SCAN}_connectivity.json").write_text(json.dumps(entries))
    (root / "connectivity" / "scans.txt").write_text(SCAN + "\n")
    (root / "R2R").mkdir(exist_ok=True)
    item = {"path_id": 7, "scan": SCAN, "path": ["a", "b", "c", "d"], "heading": 1.5707963,
            "distance": 7.0, "instructions": ["go east then north", "walk to d"]}
    for split in ("train", "val_seen", "val_unseen"):
        (root / "R2R" / f"R2R_{split}.json").write_text(json.dumps([item]))
    return root
