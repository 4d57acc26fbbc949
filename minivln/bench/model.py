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
Random weights, ``eval()`` mode, :func:`torch.inference_mode`, fp32 (or bf16 autocast).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from minivln.deploy.backends import ONNX_VARIANTS
from minivln.deploy.export import ExportError, export_model, require_onnx
from minivln.deploy.runtime import OnnxRuntimeDUET
from minivln.model.agent_inputs import MapNavigator
from minivln.model.duet import DUET
from minivln.model.graph_map import Candidate, Move, NodeObservation, view_direction
from minivln.model.registry import UnknownPresetError, create_model, get_preset

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
        outs = model("navigation", batch.inputs)
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
    return EpisodeInputs(lang, panos, navs, agent_ms=agent_s * 1e3)


@torch.inference_mode()
def run_episode(model: DUET, ep: EpisodeInputs, text_cache: bool = True) -> dict[str, float]:
    """One timed forward pass of the whole episode; seconds per part."""
    clock = time.perf_counter
    t0 = clock()
    txt_embeds = model("language", ep.language)
    txt_masks = ep.language["txt_masks"]
    text = model.precompute_text_kv(txt_embeds, txt_masks) if text_cache else None
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
            batch["txt_embeds"], batch["txt_masks"] = txt_embeds, txt_masks
        model("navigation", batch)
        nav_s += clock() - b
        pano_s += b - a
    total = clock() - t0
    return {"episode": total, "language": t1 - t0, "panorama": pano_s, "navigation": nav_s}


# -------------------------------------------------------------------------------- machine


def cpu_info() -> dict[str, Any]:
    """CPU model name and the bf16-relevant instruction-set flags of /proc/cpuinfo."""
    model_name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name":
                model_name = value.strip()
            elif key == "flags":
                flags = set(value.split())
    except OSError:
        pass
    return {
        "model_name": model_name,
        "logical_cpus": os.cpu_count(),
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
    }


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


# ---------------------------------------------------------------------------------- bench


@dataclass
class _Entry:
    preset: str
    batch_size: int
    model: DUET
    episode: EpisodeInputs
    times: list[dict[str, float]] = field(default_factory=list)
    flops: float = 0.0
    backend: str = "torch"

    @property
    def label(self) -> str:
        return self.preset if self.backend == "torch" else f"{self.preset}:{self.backend}"


def count_flops(model: DUET, ep: EpisodeInputs, text_cache: bool = True) -> float:
    """Floating-point operations of one episode (matrix products and attention, as counted by
    :class:`torch.utils.flop_counter.FlopCounterMode`; element-wise ops are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {}
    if hasattr(torch.ops.mkldnn, "_linear_pointwise"):  # the oneDNN path of wide layers
        mapping[torch.ops.mkldnn._linear_pointwise] = _onednn_linear_flops
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        run_episode(model, ep, text_cache)
    return float(counter.get_total_flops())


def _onednn_linear_flops(x_shape, w_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
    """2 * rows * in * out for ``mkldnn::_linear_pointwise`` (weight (out, in))."""
    return 2 * math.prod(x_shape[:-1]) * x_shape[-1] * w_shape[0]


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
) -> dict[str, Any]:
    """Time one episode per (preset, backend, batch size), interleaved; returns a JSON-able dict.

    ``results`` rows hold medians (ms) of the episode, of one step (panorama + navigation, the
    episode minus language over ``steps``), and of each part; ``ratios`` compare the first model
    (first preset on the first backend) with every other one (e.g. teacher / student, torch /
    onnxruntime) at each batch size.  ``model_factory`` builds a model from a name (default
    :func:`~minivln.model.registry.create_model`, random weights).  ``backends``: 'torch',
    'onnxruntime', 'onnxruntime-int8' (see :mod:`minivln.deploy.backends`; the FLOP count of an
    ONNX Runtime row is its torch network's).
    """

    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype must be fp32 or bf16, got {dtype!r}")
    backends = list(dict.fromkeys(backends)) or ["torch"]
    onnx_backends = [b for b in backends if b != "torch"]
    if onnx_backends and dtype != "fp32":
        raise ValueError("bf16 autocast applies to the torch backend only")
    exports: list[Any] = []
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    say = log or (lambda msg: None)
    autocast = (
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == "bf16" else nullcontext
    )
    load_before = _loadavg()
    try:
        torch.manual_seed(seed)
        factory = model_factory or create_model
        models = {name: factory(name).eval() for name in dict.fromkeys(presets)}
        runtimes: dict[tuple[str, str], Any] = {}
        for name in models:
            for backend in backends:
                runtimes[(name, backend)] = models[name] if backend == "torch" else None
            if onnx_backends:
                say(f"exporting {name} to ONNX")
                exports.append(_onnx_runtimes(models[name], onnx_backends, threads or 0))
                runtimes.update({(name, b): m for b, m in exports[-1][1].items()})
        entries = []
        for bs in batch_sizes:
            for name in presets:
                say(f"recording the {steps}-step episode of {name} at batch {bs}")
                with autocast():
                    ep = record_episode(models[name], bs, steps, txt_len, seed)
                flops = count_flops(models[name], ep, text_cache)
                for backend in backends:
                    entries.append(_Entry(name, bs, runtimes[(name, backend)], ep, flops=flops, backend=backend))

        with torch.inference_mode(), autocast():
            for w in range(warmup):
                for e in entries:
                    run_episode(e.model, e.episode, text_cache)
            for r in range(repeats):
                order = entries if r % 2 == 0 else entries[::-1]
                for e in order:
                    e.times.append(run_episode(e.model, e.episode, text_cache))
                say(f"repeat {r + 1}/{repeats}: " + ", ".join(
                    f"{e.label}@{e.batch_size} {e.times[-1]['episode'] * 1e3:.1f} ms"
                    for e in entries
                ))
    finally:
        torch.set_num_threads(old_threads)
        for tmp, _ in exports:
            tmp.cleanup()

    results = []
    for e in entries:
        steps_ms = [(t["episode"] - t["language"]) / steps for t in e.times]
        results.append({
            "preset": e.preset,
            "backend": e.backend,
            "label": e.label,
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
    labels = [e.label for e in entries if e.batch_size == batch_sizes[0]]  # model order (repeats kept)
    first = labels[0]
    for bs in batch_sizes:
        for other in labels[1:]:
            a, b = by_key[(first, bs)], by_key[(other, bs)]
            ratios.append({
                "batch_size": bs,
                "numerator": first,
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
        "machine": {**cpu_info(), "threads": threads or old_threads, "torch": torch.__version__,
                    **_onnxruntime_version(onnx_backends),
                    "python": platform.python_version(),
                    # 1-minute load average before/after: > threads means other jobs were running
                    "loadavg_before": load_before, "loadavg_after": _loadavg()},
        "settings": {
            "presets": list(presets), "batch_sizes": list(batch_sizes), "repeats": repeats,
            "warmup": warmup, "dtype": dtype, "steps": steps, "txt_len": txt_len, "seed": seed,
            "text_cache": text_cache, "weights": "random", "mode": "eval + inference_mode",
            "backends": backends,
        },
        "results": results,
        "ratios": ratios,
    }


def _onnx_runtimes(model: DUET, backends: Sequence[str], threads: int) -> tuple[Any, dict[str, Any]]:
    """``model`` exported to a temporary directory and loaded on each ONNX Runtime backend:
    ``(the TemporaryDirectory, {backend: model})``."""
    import tempfile


    tmp = tempfile.TemporaryDirectory(prefix="minivln-bench-")
    try:
        export_model(model, tmp.name, int8="onnxruntime-int8" in backends, check=False)
        runtimes = {b: OnnxRuntimeDUET(tmp.name, ONNX_VARIANTS[b], threads=threads) for b in backends}
    except BaseException:
        tmp.cleanup()
        raise
    return tmp, runtimes


def _onnxruntime_version(onnx_backends: Sequence[str]) -> dict[str, str]:
    if not onnx_backends:
        return {}
    import onnxruntime

    return {"onnxruntime": onnxruntime.__version__}


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
        help="per-step / per-episode CPU latency of model presets, interleaved in one run",
        description=(
            "Time a 7-step episode (60-token instruction, 36-40 views per step, a 4-16-slot map; "
            "inputs built by MapNavigator on a seeded synthetic world) of each preset at each "
            "batch size, interleaved, random weights, eval mode; report medians and the ratio."
        ),
    )
    m.add_argument("--presets", nargs="+", default=list(DEFAULT_PRESETS),
                   help="model presets (the first is the numerator of the ratios)")
    m.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    m.add_argument("--repeats", type=int, default=7, help="timed episodes per model (median)")
    m.add_argument("--warmup", type=int, default=2, help="untimed episodes per model first")
    m.add_argument("--threads", type=int, default=2, help="torch intra-op threads (0: leave)")
    m.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="bf16 = CPU autocast to bfloat16 (fast only with AMX/avx512_bf16)")
    m.add_argument("--steps", type=int, default=STEPS)
    m.add_argument("--txt-len", type=int, default=TEXT_LEN)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--no-text-cache", action="store_true",
                   help="re-project the text keys/values at every step (as the reference does)")
    m.add_argument("--backend", "--backends", dest="backends", nargs="+", default=["torch"],
                   choices=["torch", "onnxruntime", "onnxruntime-int8"],
                   help="runtimes to time each preset on (ONNX Runtime: the preset exported to ONNX, fp32 "
                        "or int8; needs the deploy extra); default torch")
    m.add_argument("--json", metavar="OUT", help="also write the full report as JSON")
    m.add_argument("--quiet", action="store_true", help="no progress lines")
    m.set_defaults(func=_bench_model)


def _bench_model(args: argparse.Namespace) -> int:
    try:
        for name in args.presets:
            get_preset(name)
    except UnknownPresetError as exc:
        print(f"minivln bench model: error: {exc}", file=sys.stderr)
        return 2
    if args.repeats < 1 or args.steps < 1 or any(b < 1 for b in args.batch_sizes):
        print("minivln bench model: error: repeats, steps and batch sizes must be >= 1",
              file=sys.stderr)
        return 2
    if args.dtype != "fp32" and any(b != "torch" for b in args.backends):
        print("minivln bench model: error: --dtype bf16 applies to the torch backend only", file=sys.stderr)
        return 2
    if any(b != "torch" for b in args.backends):

        try:
            require_onnx()
        except ExportError as exc:
            print(f"minivln bench model: error: {exc}", file=sys.stderr)
            return 2
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    report = bench_models(
        args.presets, args.batch_sizes, repeats=args.repeats, warmup=args.warmup,
        threads=args.threads or None, dtype=args.dtype, steps=args.steps, txt_len=args.txt_len,
        seed=args.seed, text_cache=not args.no_text_cache, log=log, backends=args.backends,
    )
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0
