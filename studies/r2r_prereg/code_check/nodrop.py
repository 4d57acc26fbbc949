"""Run a `minivln` command with every dropout off: ``F.dropout`` returns its input and
``F.scaled_dot_product_attention`` gets ``dropout_p=0`` (use with ``feat_dropout=0.0``).  Used by
``run.sh`` to tell a change in what training computes from a change in its random draws.

    PYTHONPATH=CODE python nodrop.py finetune --out RUN --config ... feat_dropout=0.0
"""
import sys

import torch.nn.functional as F

_sdpa = F.scaled_dot_product_attention


def _no_dropout(x, p=0.5, training=True, inplace=False):
    return x


def _sdpa_no_dropout(*args, **kwargs):
    kwargs["dropout_p"] = 0.0
    if len(args) > 4:  # (query, key, value, attn_mask, dropout_p, ...)
        args = args[:4] + (0.0,) + args[5:]
    return _sdpa(*args, **kwargs)


F.dropout = _no_dropout
F.scaled_dot_product_attention = _sdpa_no_dropout

from minivln.cli import main  # noqa: E402  (after the patch, so every module sees it)

sys.exit(main(sys.argv[1:]))
