"""Sanity check of the stand-in's room cue (docs/features.md, "room cue").

Over all houses of the data directory, with the default ``StandinConfig``: for the viewpoints whose
BBox file lists a given object, how often is the expected room the most likely one of the room
distribution the stand-in infers (``minivln.features.standin.room_distributions``, with the object
weights ``house_parts`` uses)?

    python studies/data_checks/room_cue_check.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import os

import numpy as np

CHECKS = {  # object name -> rooms that count as right
    "bed": ("bedroom",),
    "toilet": ("bathroom", "toilet"),
    "oven": ("kitchen",),
    "stair": ("stairs",),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default=os.environ.get("MINIVLN_DATA", "../shared/data"))
    args = ap.parse_args()

    from minivln.data.graph import list_scans, load_house
    from minivln.features.standin import (
        IMAGE_H,
        IMAGE_W,
        ROOM_WORDS,
        Resources,
        StandinConfig,
        load_house_objects,
        room_distributions,
    )

    cfg = StandinConfig()
    res = Resources(args.data_dir)
    hits: dict[str, list[bool]] = {name: [] for name in CHECKS}
    scans = list_scans(args.data_dir)
    for scan in scans:
        house = load_house(scan, args.data_dir)
        objs = load_house_objects(house, args.data_dir)
        weight = np.zeros((len(house), len(objs.names)), np.float32)  # as in house_parts
        for ob in objs.observations:
            area = ob.box[2] * ob.box[3] / (IMAGE_W * IMAGE_H)
            weight[ob.vp, ob.obj] += max(area, 1e-4) ** cfg.area_power
        rooms = room_distributions(house, objs, res, cfg, weight)
        for i in range(len(house)):
            names = set(objs.vp_names(i))
            top = ROOM_WORDS[int(rooms[i].argmax())]
            for name, expected in CHECKS.items():
                if name in names:
                    hits[name].append(top in expected)
    print(f"room cue, most likely room, {len(scans)} houses (default StandinConfig):")
    for name, expected in CHECKS.items():
        h = hits[name]
        print(f"  viewpoints listing {name!r:<8} -> {'/'.join(expected):<15} {100 * np.mean(h):3.0f}%  "
              f"({sum(h)} of {len(h)})")


if __name__ == "__main__":
    main()
