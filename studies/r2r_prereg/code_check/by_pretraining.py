"""The student alone's SR grouped by the pretraining seed its fine-tuning started from (exploratory).

The earlier Table III's "none" rows (`docs/results/r2r_table3_gap.json`) all started from one plain
pretraining run, seed 0; each pre-registered row (`r2r_prereg_table3.json`) and each pilot run
(`r2r_prereg_pilot.json`, last weights) from its own, seed = its seed.

    python studies/r2r_prereg/code_check/by_pretraining.py
"""
import json
from pathlib import Path
from statistics import mean

RESULTS = Path(__file__).resolve().parents[3] / "docs" / "results"


def rows(name: str) -> list[dict]:
    return json.loads((RESULTS / name).read_text())["rows"]


earlier = [r["sr"] for r in rows("r2r_table3_gap.json") if r["name"].split(",")[0] == "none"]
prereg = {r["pretrain_seed"]: r["sr"] for r in rows("r2r_prereg_table3.json") if r["name"].startswith("none, seed")}
pilot = {int(r["name"].rsplit(" ", 1)[1]): r["sr"] for r in rows("r2r_prereg_pilot.json")
         if r["name"].startswith("none, last, seed")}
seed0 = earlier + [prereg[0]]
others = [sr for s, sr in prereg.items() if s != 0] + list(pilot.values())
for label, values in (("from pretraining seed 0 (earlier six + pre-registered seed 0)", seed0),
                      (f"from {len(others)} other pretraining seeds (pre-registered 1-5, pilot 100-102)", others)):
    print(f"{label}: {len(values)} runs, SR {100 * min(values):.1f}-{100 * max(values):.1f}, mean {100 * mean(values):.1f}")
