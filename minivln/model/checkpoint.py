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
import pickle
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from minivln import __version__
from minivln.model.config import OG_TEXT_ENCODERS, DUETConfig
from minivln.model.duet import DUET
from minivln.paths import DataError, atomic_write_text, write_error

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
    """A checkpoint is missing, unreadable or does not fit the model (a
    :class:`~minivln.paths.DataError`, so the command line reports it in one line and exits with 2).

    For a checkpoint that does not fit, ``missing``, ``unexpected`` and ``mismatched`` hold every
    problem; the message summarises them: the counts, the first few keys of each kind and, where the
    shapes tell it, the likely cause (e.g. ``hidden 256 vs 128``); :meth:`details` lists them all.
    """

    SHOWN = 3  # keys of each kind named in the message

    def __init__(
        self,
        missing: list[str] = (),  # type: ignore[assignment]
        unexpected: list[str] = (),  # type: ignore[assignment]
        mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = (),  # type: ignore[assignment]
        message: str | None = None,
        *,
        source: str | os.PathLike | None = None,
        cause: str = "",
    ) -> None:
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)
        self.source = str(source) if source is not None else None
        self.cause = cause
        if message is None:
            message = self._summary()
        super().__init__(message)

    def _summary(self) -> str:
        what = f"checkpoint {self.source}" if self.source else "checkpoint"
        parts = [f"{what} does not match the model: {len(self.missing)} missing, {len(self.unexpected)} "
                 f"unexpected, {len(self.mismatched)} shape mismatches"
                 + (f" (likely cause, checkpoint vs model: {self.cause})" if self.cause else "")]

        def first(items: list[str]) -> str:
            more = f" (+{len(items) - self.SHOWN} more)" if len(items) > self.SHOWN else ""
            return ", ".join(items[: self.SHOWN]) + more

        if self.missing:
            parts.append(f"missing keys: {first(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected keys: {first(self.unexpected)}")
        if self.mismatched:
            parts.append("shape mismatches: " + first(
                [f"{k} checkpoint {list(c)} vs model {list(m)}" for k, c, m in self.mismatched]))
        return "; ".join(parts)

    def details(self) -> str:
        """Every problem, one per line."""
        lines = [f"missing key: {k}" for k in self.missing]
        lines += [f"unexpected key: {k}" for k in self.unexpected]
        lines += [f"shape mismatch: {k}: checkpoint {list(c)} vs model {list(m)}" for k, c, m in self.mismatched]
        return "\n".join(lines)


# ============================================================================ reading files


def _cause(exc: BaseException) -> str:
    """The first line of an error's message, cut after its first sentence when that is long."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    if len(first) > 120 and ". " in first:
        first = first.split(". ", 1)[0]
    return first


#: safetensors header keys of the two space savings a minivln writer may use (:func:`expand_stored`)
TIED_KEY, ROWS_KEY = "minivln.tied", "minivln.rows"


def read_safetensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, Tensor]:
    """The tensors of a ``.safetensors`` file (tied and compact tables expanded: :func:`expand_stored`);
    a missing, truncated or garbage file is a one-line :class:`CheckpointError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(message=f"checkpoint not found: {path}")
    try:
        tensors = load_file(str(path), device=device)
        with safe_open(str(path), framework="pt") as f:
            return expand_stored(tensors, f.metadata() or {})
    except SafetensorError as exc:
        raise CheckpointError(message=f"{path} is not a valid safetensors file (truncated or corrupt?): "
                                      f"{_cause(exc)}") from None
    except OSError as exc:
        raise CheckpointError(message=f"cannot read {path}: {exc.strerror or _cause(exc)}") from None


def expand_stored(tensors: dict[str, Tensor], metadata: Mapping[str, str]) -> dict[str, Tensor]:
    """Undo what a safetensors header records of two space savings: ``minivln.tied``, JSON ``{name:
    source}``, a tied tensor stored once under its source's name (training checkpoints); ``minivln.rows``,
    JSON ``{"index": NAME, "rows": N, "keys": [...]}``, tables stored as only the rows that the tensor
    NAME lists, the other rows of the N zero (the demo's unpacked teacher)."""
    if ROWS_KEY in metadata:
        spec = json.loads(metadata[ROWS_KEY])
        index = tensors.pop(spec["index"]).long()
        for key in spec["keys"]:
            part = tensors[key]
            tensors[key] = part.new_zeros((spec["rows"], *part.shape[1:]))
            tensors[key][index] = part
    for name, source in json.loads(metadata.get(TIED_KEY, "{}")).items():
        tensors[name] = tensors[source].clone()
    return tensors


def stored_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor a ``.safetensors`` file gives :func:`read_safetensors` (tied and compact
    tables counted whole), read from its header alone."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    if ROWS_KEY in meta:
        spec = json.loads(meta[ROWS_KEY])
        shapes.pop(spec["index"])
        for key in spec["keys"]:
            shapes[key] = (spec["rows"], *shapes[key][1:])
    for name, source in json.loads(meta.get(TIED_KEY, "{}")).items():
        shapes[name] = shapes[source]
    return shapes


#: what a damaged torch pickle raises while loading (truncated zip, garbage, cut-off pickle stream)
TORCH_LOAD_ERRORS = (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile)


def read_torch(path: str | os.PathLike, *, weights_only: bool = True) -> Any:
    """``torch.load`` on CPU; a truncated or garbage file is a one-line :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(message=f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as exc:
        if weights_only and str(exc).startswith("Weights only load failed"):
            raise CheckpointError(message=f"{path} is not a torch checkpoint of tensors (garbage, or a pickle "
                                          "of other objects)") from None
        raise CheckpointError(message=f"{path} is truncated or corrupt: {_cause(exc)}") from None
    except TORCH_LOAD_ERRORS as exc:
        cause = _cause(exc) or "unexpected end of file"
        raise CheckpointError(message=f"{path} is truncated or corrupt (cannot be loaded: {cause})") from None


def read_checkpoint(path: str | os.PathLike) -> Mapping[str, Any]:
    """Load a checkpoint file (``.safetensors``, or a torch pickle read with ``weights_only``)."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.exists():
        raise CheckpointError(message=f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    ckpt = read_torch(path)
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(message=f"{path} holds a {type(ckpt).__name__}, not a state dict or checkpoint dict")
    return ckpt


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


def _architecture(sd: Mapping[str, Tensor]) -> dict[str, Any]:
    """What the shapes and names of a (normalised) DUET state dict tell of its architecture."""

    def dim(key: str, axis: int) -> int | None:
        t = sd.get(key)
        return int(t.shape[axis]) if t is not None and t.dim() > axis else None

    def count(prefix: str) -> int:
        return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})

    return {
        "hidden": dim("embeddings.word_embeddings.weight", 1),
        "vocabulary": dim("embeddings.word_embeddings.weight", 0),
        "FFN": dim("lang_encoder.layer.0.intermediate.dense.weight", 0),
        "view features": dim("img_embeddings.img_linear.weight", 1),
        "object features": dim("img_embeddings.obj_linear.weight", 1),
        "text layers": count("lang_encoder.layer."),
        "panorama layers": count("img_embeddings.pano_encoder.layers."),
        "cross-modal layers": count("global_encoder.encoder.x_layers."),
        "object head": "og_head.net.0.weight" in sd,
    }


def likely_cause(checkpoint: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> str:
    """``"hidden 256 vs 128, text layers 9 vs 3"`` (checkpoint vs model), or, when the known
    architecture fields agree, the most common pair of differing sizes among the shape mismatches."""
    a, b = _architecture(checkpoint), _architecture(expected)
    shown = {True: "yes", False: "no"}
    diffs = [f"{k} {shown.get(a[k], a[k]) if isinstance(a[k], bool) else a[k]} vs "
             f"{shown.get(b[k], b[k]) if isinstance(b[k], bool) else b[k]}"
             for k in a if a[k] != b[k] and a[k] is not None and b[k] is not None]
    if diffs:
        return ", ".join(diffs)
    pairs: dict[tuple[int, int], int] = {}
    for k, t in checkpoint.items():
        if k in expected and tuple(t.shape) != tuple(expected[k].shape) and t.dim() == expected[k].dim():
            for x, y in zip(t.shape, expected[k].shape):
                if x != y:
                    pairs[(int(x), int(y))] = pairs.get((int(x), int(y)), 0) + 1
    if pairs:
        (x, y), n = max(pairs.items(), key=lambda kv: kv[1])
        return f"a size {x} vs {y} in {n} tensors"
    return ""


def check_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor],
                     source: str | os.PathLike | None = None) -> None:
    """Raise one :class:`CheckpointError` summarising every missing/unexpected key and shape mismatch
    (``source`` names the checkpoint in the message)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = sorted(k for k in state_dict if k not in expected)
    mismatched = [
        (k, tuple(state_dict[k].shape), tuple(expected[k].shape))
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        raise CheckpointError(missing, unexpected, mismatched, source=source,
                              cause=likely_cause(state_dict, expected))


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, Tensor],
                           source: str | os.PathLike | None = None) -> None:
    """:func:`check_state_dict`, then copy the tensors into ``model`` (cast to its dtypes)."""
    check_state_dict(model, state_dict, source)
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
    load_state_dict_strict(model, state_dict, None if isinstance(source, Mapping) else source)
    return kind


# ============================================================================ inferring a config


def _og_text_encoder(state_dict: Mapping[str, Tensor]) -> str:
    """The ``og_text_encoder`` of a state dict, by the input size of its ``og_text_proj``."""
    weight = state_dict.get("og_text_proj.weight")
    if weight is None:
        return ""
    names = [name for name, size in OG_TEXT_ENCODERS.items() if size == weight.shape[1]]
    if len(names) != 1:
        raise CheckpointError(message=f"og_text_proj takes {weight.shape[1]}-d instruction embeddings: no known "
                                      f"sentence encoder ({OG_TEXT_ENCODERS}) has that size; give the config")
    return names[0]


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
        og_text_encoder=_og_text_encoder(state_dict),
    )
    cfg.update(overrides)
    return DUETConfig(**cfg)


def load_duet(
    source: str | os.PathLike | Mapping[str, Any], config: DUETConfig | None = None, **overrides: Any
) -> DUET:
    """Build a DUET for a checkpoint (config inferred from its shapes unless given) and load it."""
    ckpt = source if isinstance(source, Mapping) else read_checkpoint(source)
    name = None if isinstance(source, Mapping) else source
    state_dict, _ = navigation_state_dict(ckpt)
    if config is None:
        try:
            config = infer_config(state_dict, **overrides)
        except KeyError as exc:
            raise CheckpointError(message=f"{name or 'checkpoint'} is not a DUET checkpoint: it has no "
                                          f"{exc.args[0]} ({len(state_dict)} tensors)") from None
    elif overrides:
        config = config.replace(**overrides)
    model = DUET(config)
    load_state_dict_strict(model, state_dict, name)
    return model


# ============================================================================ our own format


def save_pretrained(
    model: DUET, directory: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``model.safetensors`` (DUET parameter names) and ``config.json`` into ``directory``.

    Each file is written beside its target and renamed into place; a failed write (read-only, disk
    full) is a one-line :class:`~minivln.paths.WriteError` and leaves the previous files as they were."""
    directory = Path(directory)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": "pt", "model_type": "duet", "minivln_version": __version__}
    meta.update(metadata or {})
    weights = directory / WEIGHTS_NAME
    tmp = directory / f".{WEIGHTS_NAME}.tmp{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, weights)
    except (OSError, SafetensorError) as exc:
        raise write_error(exc, weights) from exc
    finally:
        if tmp.exists():
            tmp.unlink()
    config = {"model_type": "duet", "minivln_version": __version__, **model.config.to_dict()}
    atomic_write_text(directory / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    return directory


def _read_config_json(cfg_path: Path) -> DUETConfig:
    try:
        return DUETConfig.from_dict(json.loads(cfg_path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(message=f"{cfg_path} is not valid JSON (truncated or corrupt?): {exc}") from None
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise CheckpointError(message=f"{cfg_path} is not a DUET config: {_cause(exc)}") from None
    except OSError as exc:
        raise CheckpointError(message=f"cannot read {cfg_path}: {exc.strerror or _cause(exc)}") from None


def load_pretrained(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> DUET:
    """Inverse of :func:`save_pretrained`: rebuild the model from ``config.json`` and load weights."""
    directory = Path(directory)
    cfg_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for p in (cfg_path, weights_path):
        if not p.exists():
            raise CheckpointError(message=f"not a saved model directory, missing {p}")
    model = DUET(_read_config_json(cfg_path))
    load_state_dict_strict(model, read_safetensors(weights_path, device=str(map_location)), weights_path)
    return model.to(map_location)


def save_duet_checkpoint(model: DUET, path: str | os.PathLike) -> Path:
    """Write a checkpoint in the upstream agent's format (``{'vln_bert': {'state_dict': ...}}``).

    The upstream DUET/ScaleVLN code can resume from it (its optimizer state is absent).
    """
    path = Path(path)
    sd = {FINETUNE_PREFIX + k: v.detach().cpu() for k, v in model.state_dict().items()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"vln_bert": {"epoch": 0, "state_dict": sd}}, path)
    except (OSError, RuntimeError) as exc:  # torch reports a failed write as a RuntimeError
        raise write_error(exc, path) from exc
    return path


def _agent_dir(checkpoint: str | Path) -> Path:
    """A run directory's exported ``RUN/model``, else ``checkpoint`` itself."""
    path = Path(checkpoint)
    return path / "model" if (path / "model" / CONFIG_NAME).exists() else path


def load_agent_model(checkpoint: str | Path):
    """The DUET network of a checkpoint (see the module docstring), in eval mode."""
    path = _agent_dir(checkpoint)
    model = load_pretrained(path) if (path / CONFIG_NAME).exists() else load_duet(path)
    return model.eval()


def read_agent_config(checkpoint: str | Path) -> DUETConfig:
    """The :class:`DUETConfig` of the network :func:`load_agent_model` would load, cheaply: the
    ``config.json`` of a saved model directory (or of ``RUN/model``), read without the weights; for a
    DUET checkpoint file, inferred from its tensor shapes (the tensors are read, no model is built).
    A missing or unreadable checkpoint is a one-line :class:`CheckpointError`."""
    path = _agent_dir(checkpoint)
    if (path / CONFIG_NAME).exists():
        return _read_config_json(path / CONFIG_NAME)
    state_dict, _ = navigation_state_dict(read_checkpoint(path))
    try:
        return infer_config(state_dict)
    except KeyError as exc:
        raise CheckpointError(message=f"{path} is not a DUET checkpoint: it has no {exc.args[0]} "
                                      f"({len(state_dict)} tensors)") from None
