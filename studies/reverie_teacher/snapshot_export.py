"""Export the navigation weights of a pretraining run's ``latest`` checkpoint, mid-run (issue 20's probes).

``minivln pretrain`` exports ``RUN/pretrained`` only when it finishes; a probe that fine-tunes from an
unfinished pretraining run reads its trainer checkpoint instead:

    python studies/reverie_teacher/snapshot_export.py RUN OUT    # then: finetune init_checkpoint=OUT

The checkpoint is copied first, so a run that writes ``latest`` meanwhile does not tear the read.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file

from minivln.config import load_config
from minivln.model.checkpoint import save_pretrained
from minivln.training.pretrain import PretrainConfig, build_pretrainer


def main(run: Path, out: Path) -> None:
    cfg = load_config(PretrainConfig, run / "config.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "model.safetensors"
        shutil.copy(run / "latest" / "model.safetensors", copy)
        state = load_file(copy)
    classes = state["image_classifier.net.3.weight"].shape[0]
    model = build_pretrainer(cfg, num_classes=classes)
    model.load_state_dict(state, strict=True)
    save_pretrained(model.duet, out, metadata={"source": f"snapshot of {run}/latest"})
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: snapshot_export.py RUN OUT")
    main(Path(sys.argv[1]), Path(sys.argv[2]))
