"""Run a trained agent (arg-max) on one split: ``minivln navigate``.

    minivln navigate --checkpoint RUN/model --task r2r --split val_unseen \\
        [--data-dir D] [--features F.h5] --out DIR
    minivln navigate --checkpoint RUN/model --task reverie --split val_unseen \\
        [--data-dir D] [--features F.h5] [--objects O.h5] --out DIR

``--checkpoint`` is a ``save_pretrained`` directory (``RUN/model`` of ``minivln finetune``), a
fine-tuning run directory (its ``model/`` is used; its data directory and features are the defaults
of ``--data-dir``/``--features``), or any checkpoint :func:`~minivln.model.checkpoint.load_duet`
reads.  Writes ``DIR/submission_<split>.json`` (leaderboard format) and, when the split has goals,
``DIR/metrics_<split>.json`` (the metrics of ``minivln eval``).  REVERIE needs a model with objects
and an object feature file (``--objects``; default: the run's); each submission entry carries
``predObjId``, the arg-max object recorded at the final viewpoint (-1 when it shows none).

The command line (with ``--backend torch|onnxruntime|onnxruntime-int8``) lives in
:mod:`minivln.deploy.cli`, which passes the chosen runtime's network as ``model``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from minivln.config import ConfigError, read_yaml
from minivln.data.datasets import load_episodes
from minivln.data.graph import Graphs
from minivln.env.env import NavBatchEnv, check_split_features, write_submission
from minivln.evaluation.evaluator import Evaluator
from minivln.features.hdf5 import FeatureStore, ObjectFeatureStore
from minivln.model.checkpoint import load_agent_model
from minivln.paths import (
    DataError,
    atomic_write_text,
    check_writable_dir,
    resolve_data_dir,
)
from minivln.training.agent import DUETAgent, run_agent


def _run_defaults(checkpoint: Path) -> dict[str, Any]:
    """data_dir / features / lengths recorded in a fine-tuning run's config.yaml, if any."""
    run = checkpoint.parent if checkpoint.name == "model" else checkpoint
    cfg_file = run / "config.yaml"
    if not cfg_file.exists():
        return {}
    cfg = read_yaml(cfg_file, "the run's config") or {}
    if not isinstance(cfg, dict):
        raise DataError(f"{cfg_file}: the top level must be a mapping (a run's saved config)")
    out: dict[str, Any] = {k: cfg[k] for k in ("max_action_len", "max_instr_len") if k in cfg}
    if cfg.get("data_dir") == "toy":
        out["data_dir"] = str(run / "toy_data")
        out["features"] = cfg.get("features") or str(run / "toy_features.h5")
        if cfg.get("task") == "reverie":
            out["objects"] = cfg.get("objects") or str(run / "toy_objects.h5")
    else:
        for key in ("data_dir", "features", "objects"):
            if cfg.get(key):
                out[key] = cfg[key]
    return out


def navigate(checkpoint: str | Path, task: str, split: str, out: str | Path, *, data_dir: str | None = None,
             features: str | None = None, objects: str | None = None, batch_size: int = 16,
             max_action_len: int | None = None, max_instr_len: int | None = None,
             progress: bool = False, model: Any | None = None, backend: str | None = None,
             defaults_from: str | Path | None = None, max_episodes: int = 0,
             instr_ids: list[str] | None = None) -> dict[str, Any]:
    """Run the agent over ``split``; returns ``{"submission": path, "metrics": summary or None}``.

    ``model``: the network to run, already loaded (anything the agent drives like a DUET, e.g. an
    ONNX Runtime session wrapper); default: :func:`load_agent_model` of ``checkpoint``.  ``backend``
    is recorded in the metrics file when given.  ``defaults_from``: the checkpoint whose run holds
    the defaults of the data directory, features and lengths (default: ``checkpoint``).
    ``max_episodes``: only the split's first N instructions (0 = all; the metrics are then theirs);
    ``instr_ids``: only these instructions.
    """

    if task not in ("r2r", "reverie"):
        raise DataError(f"navigate: task must be 'r2r' or 'reverie', got {task!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"navigate: --batch-size must be a whole number >= 1, got {batch_size!r}")
    out = check_writable_dir(out, "output directory")  # before loading anything
    defaults = _run_defaults(Path(defaults_from or checkpoint))
    data_dir = data_dir or defaults.get("data_dir")
    features = features or defaults.get("features")
    if not features:
        raise DataError("navigate: --features is required (view features, HDF5)")
    max_action_len = max_action_len or int(defaults.get("max_action_len", 15))
    max_instr_len = max_instr_len or int(defaults.get("max_instr_len", 200))
    root = resolve_data_dir(data_dir)
    if model is None:
        model = load_agent_model(checkpoint)
    obj_store = None
    if task == "reverie":
        if not model.config.use_objects:
            raise DataError(f"navigate: task reverie needs a model with objects (obj_feat_size > 0); "
                            f"{checkpoint} has none")
        objects = objects or defaults.get("objects")
        if not objects:
            raise DataError("navigate: --objects is required for REVERIE (object features, HDF5)")
        obj_store = ObjectFeatureStore(objects, expected_dim=model.config.obj_feat_size)
    store = FeatureStore(features, expected_dim=model.config.image_feat_size)
    episodes = load_episodes(task, split, root)
    if instr_ids is not None:
        wanted = set(instr_ids)
        episodes = [e for e in episodes if e.instr_id in wanted]
        missing = wanted - {e.instr_id for e in episodes}
        if missing:
            raise DataError(f"navigate: {task} {split} has no instruction {sorted(missing)[0]!r}")
    if max_episodes > 0:
        episodes = episodes[:max_episodes]
    graphs = Graphs(root)
    check_split_features(store, episodes, graphs, f"the {task} {split} split")
    env = NavBatchEnv(episodes, graphs, batch_size=batch_size, features=store, max_steps=max_action_len)
    agent = DUETAgent(model, max_action_len=max_action_len, max_instr_len=max_instr_len, features=store,
                      objects=obj_store)
    preds = run_agent(agent, env, progress=progress)
    sub_path = out / f"submission_{split}.json"
    write_submission(sub_path, preds)
    summary = None
    if split != "test" and any(len(e.path) > 1 for e in episodes):
        summary, _ = Evaluator(task, split, root).score(preds)
        record = {**summary, "features": "stand-in" if store.is_standin else "real",
                  "checkpoint": str(checkpoint), "split": split, "instructions": len(episodes)}
        if backend is not None:
            record["backend"] = backend
        if obj_store is not None:
            record.update({"task": task, "object_features": "stand-in" if obj_store.is_standin else "real"})
        atomic_write_text(out / f"metrics_{split}.json", json.dumps(record, indent=2) + "\n")
    res = {"submission": str(sub_path), "metrics": summary, "episodes": len(episodes),
           "features": "stand-in" if store.is_standin else "real"}
    if obj_store is not None:
        res["object_features"] = "stand-in" if obj_store.is_standin else "real"
    return res

