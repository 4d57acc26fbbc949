"""The DUET navigation network (teacher and MiniVLN student), presets and checkpoints.

>>> from minivln.model import create_model
>>> model = create_model("minivln-r2r").eval()
>>> txt_embeds = model("language", {"txt_ids": ids, "txt_masks": masks})

See ``docs/model.md``.
"""

from minivln.model.checkpoint import (
    CheckpointError,
    load_duet,
    load_pretrained,
    load_weights,
    save_duet_checkpoint,
    save_pretrained,
)
from minivln.model.config import DUETConfig
from minivln.model.duet import DUET, TextKV
from minivln.model.registry import (
    count_parameters,
    create_model,
    get_config,
    list_models,
)

__all__ = [
    "DUET",
    "DUETConfig",
    "TextKV",
    "CheckpointError",
    "create_model",
    "get_config",
    "list_models",
    "count_parameters",
    "load_weights",
    "load_duet",
    "load_pretrained",
    "save_pretrained",
    "save_duet_checkpoint",
]
