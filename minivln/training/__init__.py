"""Training: the shared loop (:class:`Trainer`), checkpoints, logs, DDP helpers, ``minivln plot``.

Names are imported lazily so that ``minivln plot`` (whose module lives in this package) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Trainer": "minivln.training.trainer",
    "TrainConfig": "minivln.training.trainer",
    "OptimConfig": "minivln.training.trainer",
    "Task": "minivln.training.trainer",
    "TaskOutput": "minivln.training.trainer",
    "LossTerm": "minivln.training.trainer",
    "freeze_teacher": "minivln.training.trainer",
    "GlobalBatchSampler": "minivln.training.distributed",
    "init_distributed": "minivln.training.distributed",
    "seed_everything": "minivln.training.distributed",
    "load_checkpoint": "minivln.training.checkpoint",
    "plot_run": "minivln.training.plot",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'minivln.training' has no attribute {name!r}")
