"""Loading DUET / ScaleVLN checkpoints and saving our own.

Accepted inputs (a file path or an already loaded dict):

* DUET / ScaleVLN fine-tuning checkpoints: ``{'vln_bert': {'state_dict': {...}, ...}, 'critic': ...}``
  with keys ``'vln_bert.' + name`` and optionally a leading ``'module.'`` (DistributedDataParallel).
  The critic and optimizer states are ignored.
* Pre-training checkpoints: flat dicts of the pre-training model, backbone keys under ``'bert.'``,
  heads (``global_sap_head``, ``local_sap_head``, ``sap_fuse_linear``, ``og_head``) at top level.
  Pre-training-only tensors are dropped: the language-update branch of every cross-modal layer
  (``lang_self_att``, ``lang_inter``, ``lang_output``), ``mlm_head.*`` and ``image_classifier.*``.
* Plain state dicts with our names (= the DUET names), e.g. ``model.state_dict()``.
* Our own format (:func:`save_pretrained`): a directory with ``model.safetensors`` (plain names)
  and ``config.json`` (the :class:`DUETConfig` fields), readable without this code.

Loading is strict: :class:`CheckpointError` lists every missing key, unexpected key and shape
mismatch at once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from minivln.model.config import DUETConfig
from minivln.model.duet import DUET
from minivln.paths import DataError

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

FINETUNE_PREFIX = "vln_bert."
PRETRAIN_PREFIX = "bert."
DDP_PREFIX = "module."

# Tensors of the pre-training model that the navigation network does not have.
PRETRAIN_ONLY_PARTS = (".lang_self_att.", ".lang_inter.", ".lang_output.")
PRETRAIN_ONLY_PREFIXES = ("mlm_head.", "image_classifier.")
# Buffers some BERT implementations store; never parameters of ours.
IGNORED_KEYS = ("embeddings.position_ids",)


class CheckpointError(DataError):
    """A checkpoint is missing or does not fit the model; the message lists every problem (a
    :class:`~minivln.paths.DataError`, so the command line reports it and exits with 2)."""

    def __init__(
        self,
        missing: list[str] = (),  # type: ignore[assignment]
        unexpected: list[str] = (),  # type: ignore[assignment]
        mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = (),  # type: ignore[assignment]
        message: str | None = None,
    ) -> None:
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)
        if message is None:
            lines = [
                f"checkpoint does not match the model: {len(self.missing)} missing, "
                f"{len(self.unexpected)} unexpected, {len(self.mismatched)} shape mismatches"
            ]
            lines += [f"  missing key: {k}" for k in self.missing]
            lines += [f"  unexpected key: {k}" for k in self.unexpected]
            lines += [
                f"  shape mismatch: {k}: checkpoint {list(c)} vs model {list(m)}"
                for k, c, m in self.mismatched
            ]
            message = "\n".join(lines)
        super().__init__(message)


# ============================================================================ reading files


def read_checkpoint(path: str | os.PathLike) -> Mapping[str, Any]:
    """Load a checkpoint file (``.safetensors``, or a torch pickle read with ``weights_only``)."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.exists():
        raise CheckpointError(message=f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _strip(key: str, prefix: str) -> str:
    return key[len(prefix) :] if key.startswith(prefix) else key


def navigation_state_dict(ckpt: Mapping[str, Any]) -> tuple[dict[str, Tensor], str]:
    """Normalise any accepted checkpoint dict to our parameter names.

    Returns ``(state_dict, kind)`` with kind ``'finetune'``, ``'pretrain'`` or ``'plain'``.
    Nothing is checked against a model here (see :func:`check_state_dict`).
    """
    sd: Mapping[str, Any] = ckpt
    if isinstance(ckpt.get("vln_bert"), Mapping):
        inner = ckpt["vln_bert"]
        sd = inner["state_dict"] if isinstance(inner.get("state_dict"), Mapping) else inner
    elif isinstance(ckpt.get("state_dict"), Mapping):
        sd = ckpt["state_dict"]
    tensors = {_strip(k, DDP_PREFIX): v for k, v in sd.items() if isinstance(v, Tensor)}

    if tensors and all(k.startswith(FINETUNE_PREFIX) for k in tensors):
        kind = "finetune"
        out = {_strip(k, FINETUNE_PREFIX): v for k, v in tensors.items()}
    elif any(k.startswith(PRETRAIN_PREFIX) for k in tensors):
        kind = "pretrain"
        out = {}
        for k, v in tensors.items():
            name = _strip(k, PRETRAIN_PREFIX)
            if name.startswith(PRETRAIN_ONLY_PREFIXES) or any(p in name for p in PRETRAIN_ONLY_PARTS):
                continue
            out[name] = v
    else:
        kind = "plain"
        out = dict(tensors)
    for k in IGNORED_KEYS:
        out.pop(k, None)
    return out, kind


def check_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Raise one :class:`CheckpointError` listing every missing/unexpected key and shape mismatch."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = sorted(k for k in state_dict if k not in expected)
    mismatched = [
        (k, tuple(state_dict[k].shape), tuple(expected[k].shape))
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        raise CheckpointError(missing, unexpected, mismatched)


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """:func:`check_state_dict`, then copy the tensors into ``model`` (cast to its dtypes)."""
    check_state_dict(model, state_dict)
    model.load_state_dict(dict(state_dict), strict=True)


def load_weights(model: DUET, source: str | os.PathLike | Mapping[str, Any], fresh: Sequence[str] = (),
                 report: list[str] | None = None) -> str:
    """Load a DUET/ScaleVLN fine-tuning, pre-training or plain checkpoint into ``model``.

    ``source`` is a file path, a directory written by :func:`save_pretrained`, or a loaded dict.
    Returns the detected kind (``'finetune'``, ``'pretrain'``, ``'plain'``).  Loading is strict,
    except that parameters whose names start with one of ``fresh`` (e.g. ``"og_head"`` when a
    REVERIE model starts from R2R weights) may be missing from the checkpoint: they keep ``model``'s
    own initialisation, and their names are appended to ``report``.
    """
    ckpt = source if isinstance(source, Mapping) else read_checkpoint(source)
    state_dict, kind = navigation_state_dict(ckpt)
    if fresh:
        state_dict = dict(state_dict)
        for name, value in model.state_dict().items():
            if name not in state_dict and name.startswith(tuple(fresh)):
                state_dict[name] = value
                if report is not None:
                    report.append(name)
    load_state_dict_strict(model, state_dict)
    return kind


# ============================================================================ inferring a config


def infer_config(state_dict: Mapping[str, Tensor], **overrides: Any) -> DUETConfig:
    """Read the architecture off a (normalised) state dict.

    Sizes, depths, feature sizes, step-table size, graph bias and fusion are inferred; the number
    of attention heads cannot be (it does not change any shape) and defaults to ``hidden // 64``
    (12 for DUET) unless given in ``overrides``.
    """

    def count(prefix: str) -> int:
        idx = {k[len(prefix) :].split(".")[0] for k in state_dict if k.startswith(prefix)}
        return len(idx)

    hidden = state_dict["embeddings.word_embeddings.weight"].shape[1]
    angle = state_dict["global_encoder.gmap_pos_embeddings.0.weight"].shape[1] - 3
    image = state_dict["img_embeddings.img_linear.weight"].shape[1]
    if "og_head.net.0.weight" in state_dict:
        obj_w = state_dict.get("img_embeddings.obj_linear.weight")
        obj = obj_w.shape[1] if obj_w is not None else image
    else:
        obj = 0
    cfg: dict[str, Any] = dict(
        vocab_size=state_dict["embeddings.word_embeddings.weight"].shape[0],
        hidden_size=hidden,
        num_attention_heads=max(1, hidden // 64),
        intermediate_size=state_dict["lang_encoder.layer.0.intermediate.dense.weight"].shape[0]
        if "lang_encoder.layer.0.intermediate.dense.weight" in state_dict
        else state_dict["global_encoder.encoder.x_layers.0.visn_inter.dense.weight"].shape[0],
        max_position_embeddings=state_dict["embeddings.position_embeddings.weight"].shape[0],
        type_vocab_size=state_dict["embeddings.token_type_embeddings.weight"].shape[0],
        num_l_layers=count("lang_encoder.layer."),
        num_pano_layers=count("img_embeddings.pano_encoder.layers."),
        num_x_layers=count("global_encoder.encoder.x_layers."),
        image_feat_size=image,
        angle_feat_size=angle,
        obj_feat_size=obj,
        obj_loc_size=state_dict["img_embeddings.loc_linear.weight"].shape[1] - angle,
        max_action_steps=state_dict["global_encoder.gmap_step_embeddings.weight"].shape[0],
        graph_sprels="global_encoder.sprel_linear.weight" in state_dict,
        fusion="dynamic" if "sap_fuse_linear.net.0.weight" in state_dict else "avg",
    )
    cfg.update(overrides)
    return DUETConfig(**cfg)


def load_duet(
    source: str | os.PathLike | Mapping[str, Any], config: DUETConfig | None = None, **overrides: Any
) -> DUET:
    """Build a DUET for a checkpoint (config inferred from its shapes unless given) and load it."""
    ckpt = source if isinstance(source, Mapping) else read_checkpoint(source)
    state_dict, _ = navigation_state_dict(ckpt)
    if config is None:
        config = infer_config(state_dict, **overrides)
    elif overrides:
        config = config.replace(**overrides)
    model = DUET(config)
    load_state_dict_strict(model, state_dict)
    return model


# ============================================================================ our own format


def save_pretrained(
    model: DUET, directory: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``model.safetensors`` (DUET parameter names) and ``config.json`` into ``directory``."""
    from safetensors.torch import save_file

    from minivln import __version__

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": "pt", "model_type": "duet", "minivln_version": __version__}
    meta.update(metadata or {})
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata=meta)
    config = {"model_type": "duet", "minivln_version": __version__, **model.config.to_dict()}
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def load_pretrained(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> DUET:
    """Inverse of :func:`save_pretrained`: rebuild the model from ``config.json`` and load weights."""
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for p in (cfg_path, weights_path):
        if not p.exists():
            raise CheckpointError(message=f"not a saved model directory, missing {p}")
    config = DUETConfig.from_dict(json.loads(cfg_path.read_text()))
    model = DUET(config)
    load_state_dict_strict(model, load_file(str(weights_path), device=str(map_location)))
    return model.to(map_location)


def save_duet_checkpoint(model: DUET, path: str | os.PathLike) -> Path:
    """Write a checkpoint in the upstream agent's format (``{'vln_bert': {'state_dict': ...}}``).

    The upstream DUET/ScaleVLN code can resume from it (its optimizer state is absent).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {FINETUNE_PREFIX + k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"vln_bert": {"epoch": 0, "state_dict": sd}}, path)
    return path


def load_agent_model(checkpoint: str | Path):
    """The DUET network of a checkpoint (see the module docstring), in eval mode."""
    path = Path(checkpoint)
    if (path / "model" / CONFIG_NAME).exists():
        path = path / "model"
    model = load_pretrained(path) if (path / CONFIG_NAME).exists() else load_duet(path)
    return model.eval()
