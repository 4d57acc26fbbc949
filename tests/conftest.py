"""Shared pytest fixtures.

Real-data tests read ``$MINIVLN_DATA`` or ``../shared/data`` beside the repository root (the parity
tests: ``../shared/reference``, or ``reference/`` beside the data directory); they are
marked ``realdata`` and skipped (with the reason) when neither exists, unless
``MINIVLN_REQUIRE_DATA=1`` (set by ``.ci/run``), which turns a missing data or reference directory
into a failure so that CI can never pass by skipping them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _real_data_dir() -> Path | None:
    env = os.environ.get("MINIVLN_DATA")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data"]:
        if (cand / "connectivity").is_dir():
            return cand
    return None


def _reference_dir() -> Path | None:
    """``../shared/reference``, else ``reference/`` beside the real data directory (the same
    ``shared/`` layout, e.g. for a git worktree that lives elsewhere)."""
    cands = [REPO.parent / "shared" / "reference"]
    data = _real_data_dir()
    if data is not None:
        cands.append(data.parent / "reference")
    return next((c for c in cands if c.is_dir()), None)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Every test session gets its own cache directory (graphs, features)."""
    old = os.environ.get("MINIVLN_CACHE")
    os.environ["MINIVLN_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("MINIVLN_CACHE", None)
    else:
        os.environ["MINIVLN_CACHE"] = old


def _missing(reason: str) -> None:
    if os.environ.get("MINIVLN_REQUIRE_DATA") == "1":
        pytest.fail(f"{reason} and MINIVLN_REQUIRE_DATA=1")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    d = _real_data_dir()
    if d is None:
        _missing("real data not found (set MINIVLN_DATA or put it at ../shared/data)")
    return d


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    d = _reference_dir()
    if d is None:
        _missing("reference fixtures not found at ../shared/reference")
    return d


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is faster and avoids spin-waiting on a shared 2-core box."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def fixture(reference_dir):
    """The reference DUET episode (``duet_fixture_r2r.npz``), decoded."""
    from minivln.model.fixture import load_fixture

    return load_fixture(reference_dir / "duet_fixture_r2r.npz")


#: width of the random view features of :func:`small_toy` (tiny test models use image_feat_size=16)
SMALL_TOY_DIM = 16

#: ``model_overrides`` of the tiny ``duet-cpu`` network the command-line tests train on :func:`small_toy`
SMALL_DUET = {"hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32, "num_l_layers": 1,
              "num_pano_layers": 1, "num_x_layers": 1, "image_feat_size": SMALL_TOY_DIM}


@pytest.fixture(scope="session")
def small_toy(tmp_path_factory):
    """A 3-house toy world and a seeded random 16-d feature file: ``(data_dir, features_path)``."""
    import numpy as np

    from minivln.data.graph import Graphs
    from minivln.data.toyworld import ToyWorldConfig, ensure_toy_world
    from minivln.features.hdf5 import FeatureWriter

    root = tmp_path_factory.mktemp("small_toy")
    cfg = ToyWorldConfig(n_houses=3, r2r_train=12, r2r_val_seen=3, r2r_val_unseen=3, r2r_test=2,
                         reverie_train=3, reverie_val_seen=1, reverie_val_unseen=1, reverie_test=1)
    data = ensure_toy_world(root / "data", 0, cfg)
    feats = root / "feats.h5"
    rng = np.random.default_rng(0)
    with FeatureWriter(feats, dim=SMALL_TOY_DIM, standin=True, description="random test features",
                       dtype="float32") as w:
        graphs = Graphs(data)
        for scan in graphs.scans():
            for vp in graphs[scan].vp_ids:
                w.add(scan, vp, rng.standard_normal((36, SMALL_TOY_DIM)).astype(np.float32))
    return data, feats
