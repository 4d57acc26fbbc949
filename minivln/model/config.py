"""Configuration of the DUET navigation network (teacher and student share one class).

Field names follow the configuration of the reference implementation (``cshizhe/VLN-DUET``,
``map_nav_src``), so a config dict written by upstream code, or the ``config_json`` of the reference
fixture, can be read with :meth:`DUETConfig.from_dict`.  Agent-side switches that appear in those
dicts (``seed``, ``enc_full_graph``, ``act_visited_nodes``...) are not part of the network and are
ignored; a few upstream spellings are translated (see ``_ALIASES``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

FUSIONS = ("dynamic", "avg")

OG_TEXT_ENCODERS = {"minilm": 384}
"""Sentence encoders whose instruction embeddings ``og_text_encoder`` can take, with their sizes
(the encoders themselves live in :mod:`minivln.features.embed`)."""

# Upstream / HuggingFace spellings -> our field names.
_ALIASES = {
    "hidden_dropout_prob": "hidden_dropout",
    "attention_probs_dropout_prob": "attention_dropout",
}


@dataclass
class DUETConfig:
    """Every number that shapes the network.  Defaults are DUET's R2R fine-tuning setup."""

    # BERT text backbone (bert-base-uncased in DUET).
    vocab_size: int = 30522
    hidden_size: int = 768
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"  # exact (erf) GELU; the only activation DUET uses

    # Depth of each encoder.
    num_l_layers: int = 9  # text encoder (post-LN BERT layers)
    num_pano_layers: int = 2  # panorama encoder (pre-LN torch.nn.TransformerEncoderLayer)
    num_x_layers: int = 4  # cross-modal layers, per branch (global and local)

    # Inputs.
    image_feat_size: int = 768  # view feature size (ViT-B/16 ImageNet: 768, CLIP-B/16: 512)
    angle_feat_size: int = 4  # [sin h, cos h, sin e, cos e]
    obj_feat_size: int = 0  # 0 = no objects (R2R); REVERIE: 768
    obj_loc_size: int = 3  # box feature appended to the angle feature of each panorama token
    max_action_steps: int = 100  # rows of the global step embedding table

    # Navigation head.
    graph_sprels: bool = True  # graph-distance bias in the global self-attention
    fusion: str = "dynamic"  # 'dynamic' = learned gate, 'avg' = fixed 0.5
    # MiniVLN, not DUET (off for DUET/ScaleVLN checkpoints): object grounding gets a second, shallow
    # term, the dot product of each object token as the panorama encoder gives it with a linear map
    # (``og_text_proj``, zero at init) of the instruction's embedding by a frozen sentence encoder
    # whose space the object features share (``instr_embeds``, an input of the text cache).  "" = off;
    # "minilm" = all-MiniLM-L6-v2 (384-d), the space of the stand-in object features.  DUET's own
    # grounding path stays at chance in short runs; this one learns in minutes (studies/reverie_grounding).
    og_text_encoder: str = ""

    # Regularisation (identity in eval()).
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    feat_dropout: float = 0.4  # on raw view/object features in 'panorama' mode (agent wrapper)

    # LayerNorm eps inside the pano encoder's layers (torch default); its final norm uses layer_norm_eps.
    pano_layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.hidden_act != "gelu":
            raise ValueError(f"only hidden_act='gelu' is supported, got {self.hidden_act!r}")
        if self.og_text_encoder and self.og_text_encoder not in OG_TEXT_ENCODERS:
            raise ValueError(f"og_text_encoder must be '' or one of {sorted(OG_TEXT_ENCODERS)}, "
                             f"got {self.og_text_encoder!r}")
        if self.og_text_encoder and not self.use_objects:
            raise ValueError("og_text_encoder needs object inputs (obj_feat_size > 0)")
        for name in ("num_l_layers", "num_pano_layers", "num_x_layers", "obj_feat_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")

    # ----------------------------------------------------------------------------- derived sizes

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def use_objects(self) -> bool:
        return self.obj_feat_size > 0

    @property
    def og_text_size(self) -> int:
        """Size of ``instr_embeds`` (0 without ``og_text_encoder``)."""
        return OG_TEXT_ENCODERS.get(self.og_text_encoder, 0)

    @property
    def separate_obj_projection(self) -> bool:
        """Objects get their own ``obj_linear``/``obj_layer_norm`` only when sizes differ."""
        return self.use_objects and self.obj_feat_size != self.image_feat_size

    @property
    def pano_loc_size(self) -> int:
        """Size of ``loc_fts`` rows: angle feature + box (7 for DUET)."""
        return self.angle_feat_size + self.obj_loc_size

    @property
    def node_pos_size(self) -> int:
        """Size of ``gmap_pos_fts`` rows: angle feature + 3 distances (7 for DUET)."""
        return self.angle_feat_size + 3

    @property
    def vp_pos_size(self) -> int:
        """Size of ``vp_pos_fts`` rows: start-node and candidate features (14 for DUET)."""
        return 2 * self.angle_feat_size + 6

    # ----------------------------------------------------------------------------- (de)serialise

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DUETConfig":
        """Build from a dict, translating upstream names and ignoring non-network keys.

        Upstream's ``glocal_fuse=False`` maps to ``fusion='avg'`` when ``fusion`` is absent.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            key = _ALIASES.get(key, key)
            if key in names:
                kwargs[key] = value
        if "fusion" not in kwargs and d.get("glocal_fuse") is False:
            kwargs["fusion"] = "avg"
        if d.get("use_lang2visn_attn"):
            raise ValueError(
                "use_lang2visn_attn=True is the pre-training network (language-update branch); "
                "the navigation network has none"
            )
        return cls(**kwargs)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def replace(self, **changes: Any) -> "DUETConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
