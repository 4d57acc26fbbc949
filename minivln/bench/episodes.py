"""``minivln bench model --episodes real``: whole episodes of real instructions, agent included.

The workload is ``instructions`` R2R instructions of a split (default val_unseen), drawn with a
seeded generator among those with a path, on the real navigation graphs and a view feature file
(the stand-in features here); with ``task='reverie'``, REVERIE instructions, and models with object
tokens, which then read an object feature file too (all of each visited viewpoint's objects, as
``minivln navigate`` gives them).  Every model replays the **same trajectories**: the agent
(:class:`~minivln.training.agent.DUETAgent`, feedback ``'path'``) follows each instruction's
ground-truth path, so models of different quality do the same work (same steps, same panorama
tokens, same map slots; checked, the run stops otherwise).  An episode is one rollout of the real
agent-side code, as ``minivln navigate`` runs it: environment steps, tokenization, map bookkeeping,
input building, and the network's calls ('language', the text key/value cache, then 'panorama' and
'navigation' at every step).  At batch size B a rollout runs B instructions together (the batch
ends when its longest path does); the ``instructions`` are split into consecutive groups of B.

Timing: the episode is the rollout's wall time; the network's share is the sum of its calls (each
timed by :class:`TimedNetwork` around ``model(mode, batch)`` / ``precompute_text_kv``); the agent's
share is the rest.  View features are read from the file once before timing (no disk reads are
timed).  Models are interleaved in one process: for every repeat, every batch size and every group,
each model runs that group, the order alternating; a row's time per repeat is its mean over the
groups, and the report gives medians over the repeats, after ``warmup`` untimed rollouts of the
first group (plus one untimed pass over all groups that checks the work and counts FLOPs).  Ratios
compare the reference row with every other row, also paired (median over repeats of the per-repeat
ratio).
"""

from __future__ import annotations

import datetime
import statistics
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from minivln.bench.common import (
    LoadedModel,
    check_backends,
    code_version,
    flop_counter,
    load_models,
    loadavg,
    machine_info,
    model_specs,
)
from minivln.data.datasets import Episode, load_episodes
from minivln.data.graph import Graphs
from minivln.env.env import NavBatchEnv, check_split_features
from minivln.features.hdf5 import FeatureStore, ObjectFeatureStore
from minivln.model.duet import DUET
from minivln.paths import DataError, resolve_data_dir
from minivln.training.agent import DUETAgent, text_cache

PARTS = ("language", "text_kv", "panorama", "navigation")


# ------------------------------------------------------------------------------- the pieces


class TimedNetwork:
    """A network (torch or ONNX Runtime) behind the agent's calling convention, each call timed.

    ``seconds[part]`` and ``calls[part]`` add up since :meth:`reset`; ``work`` records each call's
    input shapes (the work signature: equal signatures, equal work)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.config = model.config
        self.reset()

    def reset(self) -> None:
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self.calls = dict.fromkeys(PARTS, 0)
        self.work: list[tuple] = []

    @property
    def network_seconds(self) -> float:
        return sum(self.seconds.values())

    def parameters(self):
        return self.model.parameters()

    def __call__(self, mode: str, batch: dict[str, Any]) -> Any:
        t0 = time.perf_counter()
        out = self.model(mode, batch)
        self.seconds[mode] += time.perf_counter() - t0
        self.calls[mode] += 1
        if mode == "language":
            self.work.append((mode, tuple(batch["txt_ids"].shape)))
        elif mode == "panorama":
            objs = batch.get("obj_img_fts")
            self.work.append((mode, tuple(batch["view_img_fts"].shape), tuple(batch["loc_fts"].shape),
                              None if objs is None else tuple(objs.shape)))
        else:
            self.work.append((mode, tuple(batch["gmap_masks"].shape), tuple(batch["vp_masks"].shape)))
        return out

    def precompute_text_kv(self, txt_embeds: torch.Tensor, txt_masks: torch.Tensor,
                           instr_embeds: torch.Tensor | None = None) -> Any:
        t0 = time.perf_counter()
        out = text_cache(self.model, txt_embeds, txt_masks, instr_embeds)
        self.seconds["text_kv"] += time.perf_counter() - t0
        self.calls["text_kv"] += 1
        return out


class PreloadedFeatures:
    """The view features of given viewpoints, read once into memory (float32); any other viewpoint
    is read from the store on first use and kept."""

    def __init__(self, store: FeatureStore, keys: Sequence[tuple[str, str]]) -> None:
        self.store = store
        self.is_standin = store.is_standin
        self._cache: dict[tuple[str, str], np.ndarray] = {}
        for scan, vp in keys:
            self.get(scan, vp)

    def get(self, scan: str, viewpoint: str) -> np.ndarray:
        hit = self._cache.get((scan, viewpoint))
        if hit is None:
            hit = np.asarray(self.store.get(scan, viewpoint), dtype=np.float32)
            self._cache[(scan, viewpoint)] = hit
        return hit


def select_instructions(data_dir: str | Path | None, split: str, n: int, seed: int,
                        task: str = "r2r") -> list[Episode]:
    """``n`` instructions of ``task``'s ``split`` with a path, drawn without replacement (seeded)."""
    episodes = [e for e in load_episodes(task, split, data_dir) if len(e.path) > 1]
    if not 1 <= n <= len(episodes):
        raise DataError(f"--instructions must be between 1 and {len(episodes)} (the {task} {split} "
                        f"instructions with a path), got {n}")
    pick = np.random.default_rng(seed).choice(len(episodes), size=n, replace=False)
    return [episodes[int(i)] for i in pick]


@dataclass
class _Row:
    model: LoadedModel
    batch_size: int
    agent: DUETAgent
    net: TimedNetwork
    flops: float = 0.0  # per pass over all groups (the torch network's)
    work: list[list[tuple]] = field(default_factory=list)  # per group: the calls' input shapes
    steps: list[int] = field(default_factory=list)  # per group: navigation steps
    calls: dict[str, int] = field(default_factory=dict)  # per pass over all groups
    # per repeat, summed over the groups: episode / network seconds, seconds per part
    episode: list[float] = field(default_factory=list)
    network: list[float] = field(default_factory=list)
    parts: list[dict[str, float]] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.model.label


def _rollout(row: _Row, env: NavBatchEnv, group: list[Episode]) -> float:
    """One timed rollout of ``group``; its wall seconds (the network's are in ``row.net``)."""
    row.net.reset()
    t0 = time.perf_counter()
    row.agent.rollout(env, group, "path")
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------- bench


def bench_real(
    presets: Sequence[str] = (),
    batch_sizes: Sequence[int] = (1, 8),
    *,
    checkpoints: Sequence[str] = (),
    data_dir: str | Path | None = None,
    features: str | Path,
    split: str = "val_unseen",
    instructions: int = 16,
    repeats: int = 5,
    warmup: int = 1,
    threads: int | None = 2,
    seed: int = 0,
    backends: Sequence[str] = ("torch",),
    reference: str | None = None,
    skip: Sequence[str] = (),
    max_action_len: int = 15,
    max_instr_len: int = 200,
    task: str = "r2r",
    objects: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    model_factory: Callable[[str], DUET] | None = None,
) -> dict[str, Any]:
    """Time whole real episodes of every (model, backend) at every batch size (see the module
    docstring); returns a JSON-able report (``results`` rows, ``ratios``, ``settings``, ``machine``).
    ``skip``: row labels not to time (an ONNX Runtime row whose torch row is skipped has no FLOP count)."""
    say = log or (lambda msg: None)
    specs = model_specs(presets, checkpoints, registered=model_factory is None)
    if not specs:
        raise DataError("no model to time: give --presets and/or --checkpoint NAME=PATH")
    backends = check_backends(backends)
    if repeats < 1 or warmup < 0 or max_action_len < 1 or not batch_sizes or any(b < 1 for b in batch_sizes):
        raise DataError("repeats, batch sizes and max_action_len must be >= 1, warmup >= 0")
    bad = [b for b in batch_sizes if instructions % b]
    if bad:
        raise DataError(f"--instructions ({instructions}) must be a multiple of every batch size (not of {bad[0]})")
    if not Path(features).is_file():
        raise DataError(f"feature file {features} does not exist")
    if task not in ("r2r", "reverie"):
        raise DataError(f"task must be 'r2r' or 'reverie', got {task!r}")
    if (task == "reverie") != bool(objects):
        raise DataError("REVERIE episodes need --objects (object features, HDF5), and only they take it")
    if objects and not Path(objects).is_file():
        raise DataError(f"object feature file {objects} does not exist")
    root = resolve_data_dir(data_dir)
    chosen = select_instructions(root, split, instructions, seed, task)
    graphs = Graphs(root)
    store = FeatureStore(features)
    check_split_features(store, chosen, graphs, f"the {len(chosen)} chosen {task} {split} instructions")
    keys = [(e.scan, vp) for e in chosen for vp in e.path]
    say(f"reading the view{' and object' if objects else ''} features of {len(keys)} path viewpoints")
    feats = PreloadedFeatures(store, keys)
    obj_store = None
    if objects:  # its own cache holds every path viewpoint's objects, read before timing
        obj_store = ObjectFeatureStore(objects, cache_size=max(4096, len(keys)))
        for scan, vp in keys:
            obj_store.get(scan, vp)
    groups = {bs: [chosen[i:i + bs] for i in range(0, len(chosen), bs)] for bs in batch_sizes}
    envs = {bs: NavBatchEnv(chosen, graphs, batch_size=bs, features=feats, max_steps=max_action_len)
            for bs in batch_sizes}

    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    load_before = loadavg()
    try:
        with ExitStack() as stack:
            torch.manual_seed(seed)
            models = load_models(specs, backends, stack, threads=threads or 0, factory=model_factory,
                                 skip=skip, log=say)
            for m in models:
                if m.network.config.image_feat_size != store.dim:
                    raise DataError(f"{m.spec.name} takes {m.network.config.image_feat_size}-d view features, "
                                    f"{features} holds {store.dim}-d ones")
                if m.network.config.use_objects != (task == "reverie"):
                    raise DataError(f"{m.spec.name} is a model {'with' if m.network.config.use_objects else 'without'} "
                                    f"object tokens; {task} episodes need models "
                                    f"{'with' if task == 'reverie' else 'without'} them")
                if obj_store is not None and m.network.config.obj_feat_size != obj_store.dim:
                    raise DataError(f"{m.spec.name} takes {m.network.config.obj_feat_size}-d object features, "
                                    f"{objects} holds {obj_store.dim}-d ones")
            labels = [m.label for m in models]
            if reference is None:
                reference = labels[0]
            elif reference not in labels:
                raise DataError(f"--reference {reference!r} is not a row of this benchmark (rows: {', '.join(labels)})")
            rows = {bs: [] for bs in batch_sizes}
            for bs in batch_sizes:
                for m in models:
                    net = TimedNetwork(m.runtime)
                    agent = DUETAgent(net, max_action_len=max_action_len, max_instr_len=max_instr_len, features=feats,
                                      objects=obj_store)
                    rows[bs].append(_Row(m, bs, agent, net))

            with torch.inference_mode():
                for bs in batch_sizes:
                    for row in rows[bs]:
                        say(f"checking the work of {row.label} at batch {bs} ({len(groups[bs])} rollouts)")
                        _work_pass(row, envs[bs], groups[bs])
                    _check_same_work(rows[bs])
                    for w in range(warmup):
                        for row in rows[bs]:
                            _rollout(row, envs[bs], groups[bs][0])
                for r in range(repeats):
                    for bs in batch_sizes:
                        for row in rows[bs]:
                            row.episode.append(0.0)
                            row.network.append(0.0)
                            row.parts.append(dict.fromkeys(PARTS, 0.0))
                        for g, group in enumerate(groups[bs]):
                            order = rows[bs] if (r + g) % 2 == 0 else rows[bs][::-1]
                            for row in order:
                                row.episode[-1] += _rollout(row, envs[bs], group)
                                row.network[-1] += row.net.network_seconds
                                for part, sec in row.net.seconds.items():
                                    row.parts[-1][part] += sec
                    say(f"repeat {r + 1}/{repeats}: " + ", ".join(
                        f"{row.label}@{bs} {row.episode[-1] / len(groups[bs]) * 1e3:.1f} ms"
                        for bs in batch_sizes for row in rows[bs]))
    finally:
        torch.set_num_threads(old_threads)

    results = [_result(row, len(groups[row.batch_size])) for bs in batch_sizes for row in rows[bs]]
    return {
        "date": datetime.date.today().isoformat(),
        "code": code_version(),
        "machine": {**machine_info(threads or old_threads, backends),
                    "loadavg_before": load_before, "loadavg_after": loadavg()},
        "settings": {
            "episodes": "real", "task": task, "split": split, "data_dir": str(root), "features": str(features),
            "feature_kind": "stand-in" if store.is_standin else "real",
            **({"objects": str(objects), "object_kind": "stand-in" if obj_store.is_standin else "real"}
               if obj_store is not None else {}),
            "instructions": instructions, "instr_ids": [e.instr_id for e in chosen],
            "path_lengths": [len(e.path) for e in chosen],
            "trajectories": "ground-truth paths (agent feedback 'path'), the same for every model",
            "models": [s.describe() for s in specs], "backends": backends, "skip": list(skip), "reference": reference,
            "batch_sizes": list(batch_sizes), "repeats": repeats, "warmup": warmup, "seed": seed,
            "max_action_len": max_action_len, "max_instr_len": max_instr_len, "dtype": "fp32",
            "mode": "eval + inference_mode",
        },
        "results": results,
        "ratios": _ratios(results, labels, reference, batch_sizes),
    }


def _work_pass(row: _Row, env: NavBatchEnv, groups: list[list[Episode]]) -> None:
    """One untimed pass over all groups: the work signature and step count of each, the calls per
    mode, and (torch rows) the FLOPs."""
    calls = dict.fromkeys(PARTS, 0)
    counter = flop_counter() if row.model.backend == "torch" else ExitStack()
    with counter:
        for group in groups:
            row.net.reset()
            out = row.agent.rollout(env, group, "path")
            row.work.append(list(row.net.work))
            row.steps.append(int(out.metrics["steps"]))
            for part in PARTS:
                calls[part] += row.net.calls[part]
    row.calls = calls
    if row.model.backend == "torch":
        row.flops = float(counter.get_total_flops())


def _check_same_work(rows: list[_Row]) -> None:
    """Every row of a batch size made the same calls on the same shapes; the ONNX Runtime rows take
    the FLOP count of their torch network."""
    first = rows[0]
    for row in rows[1:]:
        if row.work != first.work or row.steps != first.steps:
            raise RuntimeError(f"{row.label} did not replay the work of {first.label} at batch {row.batch_size} "
                               "(the trajectories must be the same for every model)")
    flops = {row.model.spec: row.flops for row in rows if row.model.backend == "torch"}
    for row in rows:
        if row.model.backend != "torch":
            row.flops = flops.get(row.model.spec, 0.0)


def _median_ms(values: Sequence[float]) -> float:
    return statistics.median(values) * 1e3


def _result(row: _Row, n_groups: int) -> dict[str, Any]:
    per = n_groups  # the report is per rollout (one episode of batch_size instructions)
    episode = [x / per for x in row.episode]
    network = [x / per for x in row.network]
    agent = [e - n for e, n in zip(episode, network)]
    work = [call for group in row.work for call in group]
    pano = [c for c in work if c[0] == "panorama"]
    nav = [c for c in work if c[0] == "navigation"]
    lang = [c for c in work if c[0] == "language"]
    return {
        "label": row.label, "model": row.model.spec.name, "preset": row.model.spec.name,
        "backend": row.model.backend, "weights": row.model.spec.weights,
        "checkpoint": row.model.spec.describe()["checkpoint"], "batch_size": row.batch_size,
        "episode_ms": _median_ms(episode),
        "network_ms": _median_ms(network),
        "agent_ms": _median_ms(agent),
        "agent_share": statistics.median(a / e for a, e in zip(agent, episode)),
        **{f"{part}_ms": _median_ms([p[part] / per for p in row.parts]) for part in PARTS},
        "ms_per_instruction": _median_ms(episode) / row.batch_size,
        "episode_ms_min": min(episode) * 1e3,
        "episode_ms_all": [round(x * 1e3, 3) for x in episode],
        "network_ms_all": [round(x * 1e3, 3) for x in network],
        "agent_ms_all": [round(x * 1e3, 3) for x in agent],
        "rollouts_per_repeat": n_groups,
        "steps_per_episode": sum(row.steps) / n_groups,
        "calls_per_episode": {part: n / n_groups for part, n in row.calls.items()},
        "text_tokens_mean": float(np.mean([c[1][1] for c in lang])) if lang else 0.0,
        "views_per_step_mean": float(np.mean([c[1][1] for c in pano])) if pano else 0.0,
        "slots_per_step_mean": float(np.mean([c[1][1] for c in nav])) if nav else 0.0,
        "gflop_per_episode": row.flops / n_groups / 1e9,
        "gflop_per_s": row.flops / n_groups / 1e9 / statistics.median(network) if row.flops else 0.0,
    }


def _ratios(results: list[dict[str, Any]], labels: Sequence[str], reference: str,
            batch_sizes: Sequence[int]) -> list[dict[str, Any]]:
    by_key = {(r["label"], r["batch_size"]): r for r in results}
    out = []
    for bs in batch_sizes:
        a = by_key[(reference, bs)]
        for other in labels:
            if other == reference:
                continue
            b = by_key[(other, bs)]
            out.append({
                "batch_size": bs, "numerator": reference, "denominator": other,
                "episode_ratio": a["episode_ms"] / b["episode_ms"],
                # median over repeats of the per-repeat ratio (the two ran the same rollouts back to back)
                "paired_episode_ratio": statistics.median(
                    x / y for x, y in zip(a["episode_ms_all"], b["episode_ms_all"])),
                "network_ratio": a["network_ms"] / b["network_ms"],
                "paired_network_ratio": statistics.median(
                    x / y for x, y in zip(a["network_ms_all"], b["network_ms_all"])),
                "agent_ratio": a["agent_ms"] / b["agent_ms"],
                "flop_ratio": (a["gflop_per_episode"] / b["gflop_per_episode"]
                               if b["gflop_per_episode"] else None),
            })
    return out


def format_report(report: dict[str, Any]) -> str:
    """The printed table of a real-episode report."""
    m, s, code = report["machine"], report["settings"], report.get("code") or {}
    w = max([14] + [len(r["label"]) for r in report["results"]])
    commit = (code.get("commit") or "unknown")[:12] + (" (dirty)" if code.get("dirty") else "")
    lines = [
        f"CPU {m['model_name']} ({m['logical_cpus']} logical CPUs), {m['threads']} threads, torch {m['torch']}"
        + (f", onnxruntime {m['onnxruntime']}" if "onnxruntime" in m else "")
        + f"; load average {m['loadavg_before']} before, {m['loadavg_after']} after; {report['date']}, commit {commit}",
        f"{s['instructions']} {s.get('task', 'r2r').upper()} {s['split']} instructions ({s['feature_kind']} features"
        f"{', ' + s['object_kind'] + ' objects' if 'object_kind' in s else ''}), ground-truth "
        f"trajectories replayed by every model; per episode (a rollout of `batch` instructions), median of "
        f"{s['repeats']} repeats after {s['warmup']} warm-up",
        f"{'model':<{w}} {'batch':>5} {'episode ms':>11} {'(min)':>8} {'network':>8} {'agent':>8} {'agent%':>6} "
        f"{'lang+kv':>8} {'pano':>8} {'nav':>8} {'steps':>5} {'GFLOP':>6}",
    ]
    for r in report["results"]:
        lines.append(
            f"{r['label']:<{w}} {r['batch_size']:>5} {r['episode_ms']:>11.1f} {r['episode_ms_min']:>8.1f} "
            f"{r['network_ms']:>8.1f} {r['agent_ms']:>8.1f} {100 * r['agent_share']:>5.1f}% "
            f"{r['language_ms'] + r['text_kv_ms']:>8.2f} {r['panorama_ms']:>8.2f} {r['navigation_ms']:>8.2f} "
            f"{r['steps_per_episode']:>5.2f} {r['gflop_per_episode']:>6.2f}"
        )
    for q in report["ratios"]:
        flop = f"; FLOP ratio {q['flop_ratio']:.2f}x" if q["flop_ratio"] else ""
        lines.append(
            f"{q['numerator']} / {q['denominator']} at batch {q['batch_size']}: episode {q['episode_ratio']:.2f}x "
            f"(paired {q['paired_episode_ratio']:.2f}x), network {q['network_ratio']:.2f}x "
            f"(paired {q['paired_network_ratio']:.2f}x), agent {q['agent_ratio']:.2f}x{flop}"
        )
    return "\n".join(lines)
