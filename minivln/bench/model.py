"""``minivln bench model``: CPU forward latency of teacher and student, one episode at a time.

Protocol (the reference point of the MiniVLN issue): a 60-token instruction and a 7-step episode;
``'language'`` runs once per episode (followed by
:meth:`~minivln.model.duet.DUET.precompute_text_kv`, the per-episode text key/value cache), then
``'panorama'`` and ``'navigation'`` once per step.

The per-step inputs are built by the real agent-side code: a seeded synthetic world (a corridor of
nodes with side branches and loops, random 36-view features, :class:`NodeObservation` objects) is walked
by :class:`~minivln.model.agent_inputs.MapNavigator` with prescribed moves, and the panorama and
navigation batches it builds are recorded once per model.  The walk gives 36-40 panorama tokens per
step and a global map of 4, 6, ..., 16 slots over the 7 steps.  The timed part replays those
recorded inputs through the network only (forward latency; the Python bookkeeping of the agent is
not timed, its cost is reported separately as ``agent_ms`` from one untimed-run measurement).

``--backend torch onnxruntime onnxruntime-int8`` times each preset on several runtimes (the ONNX
Runtime ones run the preset's network exported by :mod:`minivln.deploy`, to a temporary directory);
every (preset, backend) pair is one model of the interleaving, on the same recorded inputs.

All models are timed in one process and interleaved (for every repeat, every batch size, each model
runs one episode, the model order alternating between repeats), so that load from other jobs on a
shared machine affects them alike.  Numbers are medians over the repeats after warm-up episodes.
Presets have random weights; ``--checkpoint NAME=PATH`` adds trained models (see
:mod:`minivln.bench.common`); ``eval()`` mode, :func:`torch.inference_mode`, fp32 (or bf16 autocast).

``--episodes real`` times whole rollouts of the real agent on R2R instructions instead, every model
replaying the ground-truth paths, the agent's bookkeeping included and reported apart
(:mod:`minivln.bench.episodes`); this module's command line dispatches to it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from minivln.bench import episodes as real
from minivln.bench.common import (
    BACKEND_NAMES,
    LoadedModel,
    check_backends,
    check_skip,
    code_version,
    flop_counter,
    load_models,
    loadavg,
    machine_info,
    model_specs,
)
from minivln.config import ConfigError
from minivln.model.agent_inputs import MapNavigator
from minivln.model.duet import DUET
from minivln.model.graph_map import Candidate, Move, NodeObservation, view_direction
from minivln.paths import DataError, atomic_write_text, check_writable_dir

DEFAULT_PRESETS = ("duet-r2r", "minivln-r2r")
TEXT_LEN = 60
STEPS = 7
NUM_VIEWS = 36
MAX_EXTRA_VIEWS = 4  # candidates sharing a view add tokens: 36..40 panorama tokens


# ------------------------------------------------------------------------------- the world


@dataclass
class SyntheticWorld:
    """One sample's seeded world: nodes ``('n', t)`` on a corridor, ``('g', t)`` side branches.

    Node ``n_t`` (0 <= t <= steps) neighbours ``n_{t-1}``, ``n_{t+1}``, ``g_t`` and the older side
    branches ``g_{t-1}``, ``g_{t-2}`` (loops).  Walking the corridor gives a map of 4 + 2t slots at
    step t: [stop], the t+1 visited corridor nodes, and t+2 ghosts (the side branches seen so far
    plus the next corridor node).
    """

    positions: dict[Any, np.ndarray]
    features: dict[Any, np.ndarray]
    neighbours: dict[Any, list[Any]]
    views: dict[Any, dict[Any, int]]  # node -> neighbour -> view index it is seen in

    def observe(self, node: Any, view_index: int, heading: float, elevation: float) -> NodeObservation:
        cands = []
        for nb in self.neighbours[node]:
            point = self.views[node][nb]
            h, e = view_direction(point)
            cands.append(
                Candidate(nb, point, self.positions[nb], heading=h + 0.1, elevation=e - 0.05)
            )
        return NodeObservation(
            viewpoint=node, view_index=view_index, heading=heading, elevation=elevation,
            position=self.positions[node], view_features=self.features[node], candidates=cands,
        )

    def start(self) -> NodeObservation:
        return self.observe(("n", 0), 12, 0.0, 0.0)

    def move(self, move: Move) -> NodeObservation:
        return self.observe(move.target, move.view_index, move.heading, move.elevation)


def make_world(seed: int, steps: int = STEPS, feat_size: int = 768) -> SyntheticWorld:
    """A seeded :class:`SyntheticWorld` for an episode of ``steps`` steps."""
    rng = np.random.default_rng(seed)
    corridor = [("n", t) for t in range(steps + 1)]
    branches = [("g", t) for t in range(steps + 1)]
    positions: dict[Any, np.ndarray] = {}
    heading = rng.uniform(0, 2 * math.pi)
    pos = np.zeros(3)
    for t, node in enumerate(corridor):
        positions[node] = pos.copy()
        side = heading + rng.choice([-1, 1]) * rng.uniform(0.6, 1.6)
        r = rng.uniform(1.5, 3.0)
        offset = [r * math.sin(side), r * math.cos(side), rng.uniform(-0.3, 0.3)]
        positions[branches[t]] = pos + offset
        heading += rng.uniform(-0.5, 0.5)
        r = rng.uniform(2.0, 3.5)
        pos = pos + [r * math.sin(heading), r * math.cos(heading), rng.uniform(-0.2, 0.2)]
    neighbours: dict[Any, list[Any]] = {node: [] for node in positions}

    def link(a: Any, b: Any) -> None:
        if b not in neighbours[a]:
            neighbours[a].append(b)
            neighbours[b].append(a)

    for t in range(steps + 1):
        if t + 1 <= steps:
            link(corridor[t], corridor[t + 1])
        link(corridor[t], branches[t])
        for back in (1, 2):
            if t - back >= 0:
                link(corridor[t], branches[t - back])
    views: dict[Any, dict[Any, int]] = {}
    for node, nbs in neighbours.items():
        # distinct views for the first candidates, the last `extra` share a view with an earlier one
        extra = int(rng.integers(0, min(len(nbs) - 1, MAX_EXTRA_VIEWS) + 1))
        distinct = rng.choice(NUM_VIEWS, size=len(nbs) - extra, replace=False)
        chosen = list(distinct) + list(rng.choice(distinct, size=extra))
        views[node] = {nb: int(v) for nb, v in zip(nbs, chosen)}
    features = {
        node: rng.standard_normal((NUM_VIEWS, feat_size), dtype=np.float32) for node in positions
    }
    return SyntheticWorld(positions, features, neighbours, views)


# ------------------------------------------------------------------------- recorded episode


@dataclass
class EpisodeInputs:
    """The inputs of every network call of one episode, as the agent built them."""

    language: dict[str, torch.Tensor]
    panorama: list[dict[str, Any]]
    navigation: list[dict[str, Any]]
    agent_ms: float = 0.0  # agent-side input building of the recording run (one run)
    instr_embeds: torch.Tensor | None = None  # (B, D) for models with og_text_encoder (seeded, not a real encoding)

    @property
    def views_per_step(self) -> list[int]:
        return [int(p["loc_fts"].size(1)) for p in self.panorama]

    @property
    def slots_per_step(self) -> list[int]:
        return [int(n["gmap_masks"].size(1)) for n in self.navigation]


def text_inputs(batch_size: int, length: int = TEXT_LEN, seed: int = 0, vocab: int = 30522):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, min(vocab, 29000), (batch_size, length), generator=gen)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    return {"txt_ids": ids, "txt_masks": torch.ones(batch_size, length, dtype=torch.bool)}


@torch.no_grad()  # (not inference_mode: the recorded inputs stay usable with autograd)
def record_episode(
    model: DUET, batch_size: int, steps: int = STEPS, txt_len: int = TEXT_LEN, seed: int = 0
) -> EpisodeInputs:
    """Walk ``batch_size`` seeded worlds with :class:`MapNavigator` (prescribed moves along the
    corridor) and record every network input."""
    feat = model.config.image_feat_size
    worlds = [make_world(seed * 1000 + i, steps, feat) for i in range(batch_size)]
    lang = text_inputs(batch_size, txt_len, seed, model.config.vocab_size)
    nav = MapNavigator([w.start() for w in worlds], max_action_len=steps + 1)
    txt_embeds = model("language", lang)
    size = model.config.og_text_size
    instr = torch.randn(batch_size, size, generator=torch.Generator().manual_seed(seed)) if size else None
    text = {} if instr is None else {"instr_embeds": instr}
    panos, navs, agent_s = [], [], 0.0
    for t in range(steps):
        t0 = time.perf_counter()
        nav.begin_step(t)
        pano = nav.panorama_inputs()
        agent_s += time.perf_counter() - t0
        pano_in = pano.model_inputs()
        pano_embeds, pano_masks = model("panorama", pano_in)
        t0 = time.perf_counter()
        nav.absorb_panorama(pano, pano_embeds, pano_masks)
        batch = nav.navigation_inputs(pano, pano_embeds, pano_masks, txt_embeds, lang["txt_masks"])
        agent_s += time.perf_counter() - t0
        outs = model("navigation", {**batch.inputs, **text})
        t0 = time.perf_counter()
        nav.record_scores(outs["fused_logits"])
        panos.append(pano_in)
        nav_in = {k: v for k, v in batch.inputs.items() if k not in ("txt_embeds", "txt_masks")}
        navs.append(nav_in)
        if t < steps - 1:
            actions = [batch.gmap_vpids[i].index(("n", t + 1)) for i in range(batch_size)]
            moves = nav.act(t, actions, batch)
            nav.observe([w.move(m) for w, m in zip(worlds, moves)])
        agent_s += time.perf_counter() - t0
    return EpisodeInputs(lang, panos, navs, agent_ms=agent_s * 1e3, instr_embeds=instr)


@torch.inference_mode()
def run_episode(model: DUET, ep: EpisodeInputs, text_cache: bool = True) -> dict[str, float]:
    """One timed forward pass of the whole episode; seconds per part."""
    clock = time.perf_counter
    t0 = clock()
    txt_embeds = model("language", ep.language)
    txt_masks = ep.language["txt_masks"]
    instr = ep.instr_embeds
    text = (model.precompute_text_kv(txt_embeds, txt_masks, *([] if instr is None else [instr]))
            if text_cache else None)
    t1 = clock()
    pano_s = nav_s = 0.0
    for pano_in, nav_in in zip(ep.panorama, ep.navigation):
        a = clock()
        model("panorama", pano_in)
        b = clock()
        batch = dict(nav_in)
        if text is not None:
            batch["txt_kv"] = text
        else:
            batch["txt_embeds"], batch["txt_masks"], batch["instr_embeds"] = txt_embeds, txt_masks, instr
        model("navigation", batch)
        nav_s += clock() - b
        pano_s += b - a
    total = clock() - t0
    return {"episode": total, "language": t1 - t0, "panorama": pano_s, "navigation": nav_s}


# ---------------------------------------------------------------------------------- bench


@dataclass
class _Entry:
    row: LoadedModel
    batch_size: int
    episode: EpisodeInputs
    times: list[dict[str, float]] = field(default_factory=list)
    flops: float = 0.0

    @property
    def label(self) -> str:
        return self.row.label


def count_flops(model: DUET, ep: EpisodeInputs, text_cache: bool = True) -> float:
    """Floating-point operations of one episode (matrix products and attention, as counted by
    :class:`torch.utils.flop_counter.FlopCounterMode`; element-wise ops are not counted)."""
    with flop_counter() as counter:
        run_episode(model, ep, text_cache)
    return float(counter.get_total_flops())


def _median_ms(values: Sequence[float]) -> float:
    return statistics.median(values) * 1e3


def bench_models(
    presets: Sequence[str] = DEFAULT_PRESETS,
    batch_sizes: Sequence[int] = (1, 8),
    *,
    repeats: int = 7,
    warmup: int = 2,
    threads: int | None = 2,
    dtype: str = "fp32",
    steps: int = STEPS,
    txt_len: int = TEXT_LEN,
    seed: int = 0,
    text_cache: bool = True,
    log: Callable[[str], None] | None = None,
    model_factory: Callable[[str], DUET] | None = None,
    backends: Sequence[str] = ("torch",),
    checkpoints: Sequence[str] = (),
    reference: str | None = None,
    skip: Sequence[str] = (),
) -> dict[str, Any]:
    """Time one synthetic episode per (model, backend, batch size), interleaved; returns a JSON-able dict.

    The models are the ``presets`` (random weights) then the ``checkpoints`` (``NAME=PATH``, trained
    weights; see :mod:`minivln.bench.common`).  ``results`` rows hold medians (ms) of the episode, of
    one step (panorama + navigation, the episode minus language over ``steps``), and of each part;
    ``ratios`` compare the ``reference`` row (a label; default the first: first model on the first
    backend) with every other one (e.g. teacher / student, torch / onnxruntime) at each batch size.
    ``model_factory`` builds a preset from its name (default
    :func:`~minivln.model.registry.create_model`, random weights).  ``backends``: 'torch',
    'onnxruntime', 'onnxruntime-int8' (see :mod:`minivln.deploy.backends`; the FLOP count of an
    ONNX Runtime row is its torch network's).  ``skip``: row labels not to time.
    """

    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype must be fp32 or bf16, got {dtype!r}")
    specs = model_specs(presets, checkpoints, registered=model_factory is None)
    backends = check_backends(backends)
    if any(b != "torch" for b in backends) and dtype != "fp32":
        raise ValueError("bf16 autocast applies to the torch backend only")
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    say = log or (lambda msg: None)
    autocast = (
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == "bf16" else nullcontext
    )
    load_before = loadavg()
    try:
        with ExitStack() as stack:
            torch.manual_seed(seed)
            rows = load_models(specs, backends, stack, threads=threads or 0, factory=model_factory, skip=skip,
                               log=say)
            labels = [r.label for r in rows]
            reference = _check_reference(reference, labels)
            entries = []
            for bs in batch_sizes:
                for spec in specs:
                    mine = [r for r in rows if r.spec == spec]
                    if not mine:
                        continue
                    say(f"recording the {steps}-step episode of {spec.name} at batch {bs}")
                    with autocast():
                        ep = record_episode(mine[0].network, bs, steps, txt_len, seed)
                    flops = count_flops(mine[0].network, ep, text_cache)
                    entries += [_Entry(r, bs, ep, flops=flops) for r in mine]

            with torch.inference_mode(), autocast():
                for w in range(warmup):
                    for e in entries:
                        run_episode(e.row.runtime, e.episode, text_cache)
                for r in range(repeats):
                    order = entries if r % 2 == 0 else entries[::-1]
                    for e in order:
                        e.times.append(run_episode(e.row.runtime, e.episode, text_cache))
                    say(f"repeat {r + 1}/{repeats}: " + ", ".join(
                        f"{e.label}@{e.batch_size} {e.times[-1]['episode'] * 1e3:.1f} ms"
                        for e in entries
                    ))
    finally:
        torch.set_num_threads(old_threads)

    results = []
    for e in entries:
        steps_ms = [(t["episode"] - t["language"]) / steps for t in e.times]
        results.append({
            "preset": e.row.spec.name,  # the model's name (a preset or a --checkpoint NAME)
            "backend": e.row.backend,
            "label": e.label,
            "weights": e.row.spec.weights,
            "checkpoint": e.row.spec.describe()["checkpoint"],
            "batch_size": e.batch_size,
            "episode_ms": _median_ms([t["episode"] for t in e.times]),
            "step_ms": _median_ms(steps_ms),
            "language_ms": _median_ms([t["language"] for t in e.times]),
            "panorama_ms": _median_ms([t["panorama"] for t in e.times]) / steps,
            "navigation_ms": _median_ms([t["navigation"] for t in e.times]) / steps,
            # best repeat: the least disturbed by other jobs on a shared machine
            "episode_ms_min": min(t["episode"] for t in e.times) * 1e3,
            "step_ms_min": min(steps_ms) * 1e3,
            "episode_ms_all": [round(t["episode"] * 1e3, 3) for t in e.times],
            "gflop_per_episode": e.flops / 1e9,
            # achieved rate of the median episode (matrix products only in the numerator)
            "gflop_per_s": e.flops / 1e9 / statistics.median(t["episode"] for t in e.times),
            "agent_ms": e.episode.agent_ms,
            "views_per_step": e.episode.views_per_step,
            "slots_per_step": e.episode.slots_per_step,
        })
    ratios = []
    by_key = {(r["label"], r["batch_size"]): r for r in results}
    for bs in batch_sizes:
        for other in labels:
            if other == reference:
                continue
            a, b = by_key[(reference, bs)], by_key[(other, bs)]
            ratios.append({
                "batch_size": bs,
                "numerator": reference,
                "denominator": other,
                "episode_ratio": a["episode_ms"] / b["episode_ms"],
                "step_ratio": a["step_ms"] / b["step_ms"],
                # median over repeats of the per-repeat ratio (both models ran back to back)
                "paired_episode_ratio": statistics.median(
                    x / y for x, y in zip(a["episode_ms_all"], b["episode_ms_all"])
                ),
                "flop_ratio": a["gflop_per_episode"] / b["gflop_per_episode"],
            })
    return {
        "date": datetime.date.today().isoformat(),
        "code": code_version(),
        "machine": {**machine_info(threads or old_threads, backends),
                    # 1-minute load average before/after: > threads means other jobs were running
                    "loadavg_before": load_before, "loadavg_after": loadavg()},
        "settings": {
            "episodes": "synthetic",
            "presets": [s.name for s in specs if s.checkpoint is None],
            "models": [s.describe() for s in specs], "reference": reference,
            "batch_sizes": list(batch_sizes), "repeats": repeats,
            "warmup": warmup, "dtype": dtype, "steps": steps, "txt_len": txt_len, "seed": seed,
            "text_cache": text_cache,
            "weights": "random" if all(s.checkpoint is None for s in specs) else "per model",
            "mode": "eval + inference_mode", "backends": backends, "skip": list(skip),
        },
        "results": results,
        "ratios": ratios,
    }


def _check_reference(reference: str | None, labels: Sequence[str]) -> str:
    """The reference row's label (default: the first row); a :class:`DataError` if unknown."""
    if reference is None:
        return labels[0]
    if reference not in labels:
        raise DataError(f"--reference {reference!r} is not a row of this benchmark (rows: {', '.join(labels)})")
    return reference


def format_report(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    w = max([14] + [len(r.get("label", r["preset"])) for r in report["results"]])
    lines = [
        f"CPU {m['model_name']} ({m['logical_cpus']} logical CPUs), {m['threads']} threads, "
        f"torch {m['torch']}" + (f", onnxruntime {m['onnxruntime']}" if "onnxruntime" in m else "")
        + f"; avx512_bf16={m['avx512_bf16']} amx_bf16={m['amx_bf16']}; "
        f"load average {m['loadavg_before']} before, {m['loadavg_after']} after",
        f"{s['dtype']}, {s['txt_len']}-token instruction, {s['steps']}-step episode, "
        f"median of {s['repeats']} repeats after {s['warmup']} warm-up"
        + ("" if s["text_cache"] else ", NO text cache"),
        f"{'model':<{w}} {'batch':>5} {'episode ms':>11} {'(min)':>8} {'step ms':>9} {'lang ms':>8} "
        f"{'pano ms':>8} {'nav ms':>8} {'GFLOP':>6} {'GFLOP/s':>7}  views/step, slots/step",
    ]
    for r in report["results"]:
        lines.append(
            f"{r.get('label', r['preset']):<{w}} {r['batch_size']:>5} {r['episode_ms']:>11.1f} "
            f"{r['episode_ms_min']:>8.1f} {r['step_ms']:>9.2f} "
            f"{r['language_ms']:>8.2f} {r['panorama_ms']:>8.2f} {r['navigation_ms']:>8.2f} "
            f"{r['gflop_per_episode']:>6.2f} {r['gflop_per_s']:>7.1f}  "
            f"{min(r['views_per_step'])}-{max(r['views_per_step'])}, "
            f"{min(r['slots_per_step'])}-{max(r['slots_per_step'])}"
        )
    for q in report["ratios"]:
        lines.append(
            f"{q['numerator']} / {q['denominator']} at batch {q['batch_size']}: "
            f"episode {q['episode_ratio']:.2f}x (paired {q['paired_episode_ratio']:.2f}x), "
            f"step {q['step_ratio']:.2f}x; FLOP ratio {q['flop_ratio']:.2f}x"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ CLI


def add_parser(bench_sub: argparse._SubParsersAction) -> None:
    """``minivln bench model`` (registered by ``minivln bench``)."""
    m = bench_sub.add_parser(
        "model",
        help="per-episode CPU latency of models (presets, trained checkpoints) on each backend, interleaved",
        description=(
            "Time episodes of each model (presets with random weights, --checkpoint NAME=PATH with trained "
            "ones) on each backend at each batch size, interleaved in one process; report medians and ratios "
            "to the reference row.  --episodes synthetic (default): a 7-step episode (60-token instruction, "
            "36-40 views per step, a 4-16-slot map; inputs built by MapNavigator on a seeded synthetic "
            "world), the network's calls timed.  --episodes real: whole rollouts of the real agent on R2R "
            "instructions (real graphs, --features), every model replaying the ground-truth paths; the "
            "agent's bookkeeping included and reported apart."
        ),
    )
    m.add_argument("--presets", nargs="+", default=None,
                   help=f"model presets, random weights (default: {' '.join(DEFAULT_PRESETS)} when no "
                        "--checkpoint is given, else none)")
    m.add_argument("--checkpoint", "--checkpoints", dest="checkpoints", nargs="+", default=[],
                   metavar="NAME=PATH",
                   help="trained models: NAME=PATH with what `minivln navigate --checkpoint` takes (RUN/model, "
                        "a fine-tuning run, an export directory, a DUET checkpoint); timed after the presets")
    m.add_argument("--skip", nargs="+", default=[], metavar="LABEL",
                   help="rows not to time, e.g. duet-r2r:onnxruntime (a model's ONNX rows all skipped: no export)")
    m.add_argument("--reference", metavar="LABEL", default=None,
                   help="the row the ratios compare with (a model name, or NAME:BACKEND); default: the first row")
    m.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    m.add_argument("--repeats", type=int, default=None,
                   help="timed episodes (synthetic) / passes over the instructions (real) per model; median "
                        "(default 7 synthetic, 5 real)")
    m.add_argument("--warmup", type=int, default=None,
                   help="untimed episodes per model first (default 2 synthetic, 1 real)")
    m.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads (0: leave)")
    m.add_argument("--backend", "--backends", dest="backends", nargs="+", default=["torch"],
                   choices=list(BACKEND_NAMES),
                   help="runtimes to time each model on (ONNX Runtime: the model exported to ONNX, fp32 "
                        "or int8, or an export directory's graphs; needs the deploy extra); default torch")
    m.add_argument("--seed", type=int, default=0,
                   help="random weights of the presets; synthetic worlds / the draw of real instructions")
    m.add_argument("--episodes", choices=["synthetic", "real"], default="synthetic",
                   help="synthetic: the seeded synthetic world (network calls timed); real: R2R instructions "
                        "with the real agent (needs --features)")
    real_opts = m.add_argument_group("real episodes (--episodes real)")
    real_opts.add_argument("--data-dir", default=None, help="data directory (default: $MINIVLN_DATA or the usual places)")
    real_opts.add_argument("--features", default=None, help="view features (HDF5) covering the split's houses")
    real_opts.add_argument("--task", choices=["r2r", "reverie"], default="r2r",
                           help="r2r, or reverie (models with object tokens; needs --objects)")
    real_opts.add_argument("--objects", default=None, help="object features (HDF5), for --task reverie")
    real_opts.add_argument("--split", default="val_unseen", help="split of the task (default val_unseen)")
    real_opts.add_argument("--instructions", type=int, default=16,
                           help="instructions drawn (seeded) from the split; a multiple of every batch size")
    real_opts.add_argument("--max-action-len", type=int, default=15)
    real_opts.add_argument("--max-instr-len", type=int, default=200)
    syn = m.add_argument_group("synthetic episodes (--episodes synthetic)")
    syn.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                     help="bf16 = CPU autocast to bfloat16 (fast only with AMX/avx512_bf16)")
    syn.add_argument("--steps", type=int, default=STEPS)
    syn.add_argument("--txt-len", type=int, default=TEXT_LEN)
    syn.add_argument("--no-text-cache", action="store_true",
                     help="re-project the text keys/values at every step (as the reference does)")
    m.add_argument("--json", metavar="OUT", help="also write the full report as JSON")
    m.add_argument("--quiet", action="store_true", help="no progress lines")
    m.set_defaults(func=_bench_model)


def _bench_model(args: argparse.Namespace) -> int:
    def fail(msg: str) -> int:
        print(f"minivln bench model: error: {msg}", file=sys.stderr)
        return 2

    presets = args.presets if args.presets is not None else ([] if args.checkpoints else list(DEFAULT_PRESETS))
    real_mode = args.episodes == "real"
    repeats = args.repeats if args.repeats is not None else (5 if real_mode else 7)
    warmup = args.warmup if args.warmup is not None else (1 if real_mode else 2)
    if repeats < 1 or warmup < 0 or args.steps < 1 or any(b < 1 for b in args.batch_sizes):
        return fail("repeats, steps and batch sizes must be >= 1, warmup >= 0")
    if args.dtype != "fp32" and (real_mode or any(b != "torch" for b in args.backends)):
        return fail("--dtype bf16 applies to synthetic episodes on the torch backend only")
    if real_mode and not args.features:
        return fail("--episodes real needs --features (view features covering the split's houses)")
    if args.json:
        check_writable_dir(Path(args.json).parent, "output directory")
    try:
        specs = model_specs(presets, args.checkpoints)  # every input checked before any work
        if not specs:
            return fail("no model to time: give --presets and/or --checkpoint NAME=PATH")
        check_skip(specs, check_backends(args.backends), args.skip)
    except (DataError, ConfigError) as exc:
        return fail(str(exc))
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    common = dict(checkpoints=args.checkpoints, repeats=repeats, warmup=warmup, threads=args.threads or None,
                  seed=args.seed, backends=args.backends, reference=args.reference, skip=args.skip, log=log)
    if real_mode:
        report = real.bench_real(
            presets, args.batch_sizes, data_dir=args.data_dir, features=args.features, split=args.split,
            instructions=args.instructions, max_action_len=args.max_action_len,
            max_instr_len=args.max_instr_len, task=args.task, objects=args.objects, **common)
        print(real.format_report(report))
    else:
        report = bench_models(
            presets, args.batch_sizes, dtype=args.dtype, steps=args.steps, txt_len=args.txt_len,
            text_cache=not args.no_text_cache, **common)
        print(format_report(report))
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(report, indent=2) + "\n")
    return 0
