"""Draw the grounding probes' validation OG accuracy against steps (studies/reverie_grounding).

    python studies/reverie_grounding/plot_probes.py    # -> studies/reverie_grounding/og_probes.png

Reads the runs' logs kept in ``results/`` and the frozen-feature report ``frozen_probe.json`` (its
chance level and training-free MiniLM picker are drawn as reference lines).
"""

from __future__ import annotations

import json
from pathlib import Path

from minivln.training.logging import read_jsonl
from minivln.training.plot import new_figure, save_png

HERE = Path(__file__).resolve().parent
RUNS = (
    ("og-control", "student, DUET's OG head alone (from scratch)"),
    ("og-student-minilm", "student + og_text_encoder: minilm (from scratch)"),
    ("og-teacher-control", "teacher, DUET's OG head alone (from R2R pretraining)"),
    ("og-teacher-minilm", "teacher + og_text_encoder: minilm (from R2R pretraining)"),
)


def main() -> None:
    fig = new_figure(7.0, 4.4)
    ax = fig.add_subplot(1, 1, 1)
    for name, label in RUNS:
        val = [r for r in read_jsonl(HERE / "results" / f"{name}.jsonl") if r.get("kind") == "val"]
        ax.plot([r["step"] for r in val], [100 * r["val_unseen.og_acc"] for r in val], marker="o", label=label)
    frozen = json.loads((HERE / "frozen_probe.json").read_text())
    ax.axhline(100 * frozen["chance"], color="grey", ls=":", label="chance (1 / objects at the goal)")
    ax.axhline(100 * frozen["picker_minilm_cosine"], color="grey", ls="--",
               label="no training: MiniLM cosine with the object names")
    ax.set_xlabel("OG-only pretraining step (batch 32)")
    ax.set_ylabel("val_unseen OG accuracy (%)")
    ax.set_title("Object grounding at the goal, REVERIE, STAND-IN features (256 fixed val_unseen samples)", fontsize=8)
    ax.set_ylim(0, 80)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)
    print(save_png(fig, HERE / "og_probes.png", tight=True))


if __name__ == "__main__":
    main()
