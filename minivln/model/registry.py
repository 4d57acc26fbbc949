"""Named model presets, timm style: ``create_model('minivln-r2r')``, ``list_models()``.

The registry is the single source of the architectures used in the project.  Exact parameter
counts (``minivln params NAME``) are listed in ``docs/model.md`` and checked by the tests for the
DUET teachers (180,489,221 for R2R, 181,082,118 for REVERIE).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from minivln.config import ConfigError
from minivln.model.config import DUETConfig
from minivln.model.duet import DUET


@dataclass(frozen=True)
class Preset:
    name: str
    config: DUETConfig
    description: str


_PRESETS: dict[str, Preset] = {}


def register_preset(name: str, config: DUETConfig, description: str) -> Preset:
    """Add a named configuration to the registry (names are unique)."""
    if name in _PRESETS:
        raise ValueError(f"preset {name!r} is already registered")
    preset = Preset(name, config, description)
    _PRESETS[name] = preset
    return preset


class UnknownPresetError(KeyError, ConfigError):
    """Raised for a name that is not in the registry; the message suggests the nearest names and lists
    the available ones.  A :class:`~minivln.config.ConfigError` too: the command line reports a preset
    named in a config or override as one line (exit 2)."""

    def __str__(self) -> str:  # KeyError would print the repr of its argument
        return str(self.args[0])


def unknown_preset_message(name: str) -> str:
    names = {n.lower(): n for n in list_models()}
    near = [names[n] for n in difflib.get_close_matches(str(name).lower(), list(names), n=3, cutoff=0.5)]
    shown = [repr(n) for n in near]
    hint = f"did you mean {', '.join(shown[:-1]) + ' or ' if len(shown) > 1 else ''}{shown[-1]}? " if near else ""
    return f"unknown model preset {name!r}; {hint}available: {', '.join(list_models())}"


def get_preset(name: str) -> Preset:
    try:
        return _PRESETS[name]
    except (KeyError, TypeError):
        raise UnknownPresetError(unknown_preset_message(name)) from None


def list_models() -> list[str]:
    """Registered preset names, in registration order (teachers first)."""
    return list(_PRESETS)


def get_config(name: str, **overrides: Any) -> DUETConfig:
    """The preset's config with some fields replaced (e.g. ``hidden_dropout=0.0``); an unknown field or
    an invalid value is a :class:`~minivln.config.ConfigError` naming it."""
    base = get_preset(name).config
    fields = [f.name for f in dataclasses.fields(base)]
    unknown = [k for k in overrides if k not in fields]
    if unknown:
        near = {k: difflib.get_close_matches(k, fields, n=2) for k in unknown}
        shown = ", ".join(f"{k!r}" + (f" (did you mean {' or '.join(repr(n) for n in near[k])}?)" if near[k] else "")
                          for k in unknown)
        raise ConfigError(f"model_overrides: {shown} not a DUETConfig field of {name!r}; "
                          f"fields: {', '.join(fields)}")
    try:
        return base.replace(**overrides)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model {name!r} with model_overrides {overrides}: {exc}") from None


def create_model(name: str, device: str | torch.device | None = None, **overrides: Any) -> DUET:
    """Build a freshly initialised model from a preset (``overrides`` change config fields).

    ``device='meta'`` builds it without allocating memory (for counting parameters).
    """
    config = get_config(name, **overrides)
    if device is None:
        return DUET(config)
    with torch.device(device):
        return DUET(config)


# ============================================================================ parameter counts

# Parts reported by ``minivln params``, in display order, as prefixes of parameter names (the
# longest matching prefix wins, so the panorama encoder is not counted under the embeddings).
PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("embeddings", ("embeddings.", "img_embeddings.")),
    ("text encoder", ("lang_encoder.",)),
    ("panorama encoder", ("img_embeddings.pano_encoder.",)),
    ("global (coarse) encoder", ("global_encoder.",)),
    ("local (fine) encoder", ("local_encoder.",)),
    ("heads", ("global_sap_head.", "local_sap_head.", "sap_fuse_linear.", "og_head.")),
)


def part_of(param_name: str) -> str:
    """The :data:`PARTS` entry a parameter belongs to."""
    best, best_len = None, -1
    for part, prefixes in PARTS:
        for prefix in prefixes:
            if param_name.startswith(prefix) and len(prefix) > best_len:
                best, best_len = part, len(prefix)
    if best is None:
        raise ValueError(f"parameter {param_name} belongs to no part")
    return best


def count_parameters(model: nn.Module) -> dict[str, Any]:
    """Total, per part (:data:`PARTS`) and per top-level module parameter counts."""
    parts = {name: 0 for name, _ in PARTS}
    top: dict[str, int] = {}
    for key, p in model.named_parameters():
        parts[part_of(key)] += p.numel()
        module = key.split(".")[0]
        top[module] = top.get(module, 0) + p.numel()
    return {"total": sum(parts.values()), "parts": parts, "by_top_module": top}


def preset_parameters(name: str, **overrides: Any) -> dict[str, Any]:
    """:func:`count_parameters` of a preset, built on the meta device (fast, no memory)."""
    return count_parameters(create_model(name, device="meta", **overrides))


# ============================================================================ the presets

_TEACHER = DUETConfig()  # DUET R2R: bert-base, layers 9/2/4, ViT-B/16 768-d views

register_preset(
    "duet-r2r", _TEACHER,
    "DUET teacher, R2R (bert-base, layers 9/2/4, 768-d ViT-B/16 views)",
)
register_preset(
    "duet-reverie", _TEACHER.replace(obj_feat_size=768),
    "DUET teacher, REVERIE (as duet-r2r + 768-d objects, og_head)",
)
register_preset(
    "scalevln-r2r", _TEACHER.replace(image_feat_size=512),
    "ScaleVLN teacher, R2R, CLIP ViT-B/16 512-d views",
)
register_preset(
    "scalevln-r2r-h14", _TEACHER.replace(image_feat_size=1024),
    "ScaleVLN teacher, R2R, CLIP ViT-H/14 1024-d views",
)
register_preset(
    "scalevln-reverie", _TEACHER.replace(image_feat_size=1024, obj_feat_size=768),
    "ScaleVLN teacher, REVERIE, 1024-d views + 768-d objects (separate obj_linear)",
)

_STUDENT = _TEACHER.replace(
    hidden_size=312, num_attention_heads=12, intermediate_size=1200,
    num_l_layers=3, num_pano_layers=1, num_x_layers=2,
)  # fmt: skip
register_preset(
    "minivln-r2r", _STUDENT,
    "MiniVLN student, R2R (hidden 312, 12 heads, FFN 1200, layers 3/1/2)",
)
register_preset(
    "minivln-reverie", _STUDENT.replace(obj_feat_size=768),
    "MiniVLN student, REVERIE (as minivln-r2r + 768-d objects, og_head)",
)
register_preset(
    "minivln-scalevln-r2r", _STUDENT.replace(image_feat_size=512),
    "MiniVLN student of scalevln-r2r, R2R, its 512-d CLIP ViT-B/16 views",
)

# Scaled-down pair for experiments on a 2-core CPU: same depths as the full teacher/student.
register_preset(
    "duet-cpu",
    _TEACHER.replace(hidden_size=256, num_attention_heads=4, intermediate_size=1024),
    "CPU-scale teacher (hidden 256, 4 heads, FFN 1024, layers 9/2/4, 768-d views)",
)
register_preset(
    "minivln-cpu",
    _STUDENT.replace(hidden_size=128, num_attention_heads=4, intermediate_size=512),
    "CPU-scale student (hidden 128, 4 heads, FFN 512, layers 3/1/2, 768-d views)",
)
register_preset(
    "duet-cpu-reverie",
    get_config("duet-cpu", obj_feat_size=768),
    "CPU-scale teacher, REVERIE (as duet-cpu + 768-d objects, og_head)",
)
register_preset(
    "minivln-cpu-reverie",
    get_config("minivln-cpu", obj_feat_size=768),
    "CPU-scale student, REVERIE (as minivln-cpu + 768-d objects, og_head)",
)
