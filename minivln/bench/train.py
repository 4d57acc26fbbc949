"""``minivln bench train``: training iterations per second of model presets, interleaved in one run.

One *iteration* is what the trainer does per optimizer step, minus logging and checkpoints:

* ``pretrain``: ``PretrainTask.next_batch(i)`` (state building + collation; each iteration's task,
  MLM / SAP / MRC, is drawn by the seeded mix) + forward + backward + gradient clipping + AdamW.
* ``finetune``: two environment batches, a teacher-forced rollout (x ``ml_weight``) and a sampled
  rollout (DUET's DAgger iteration, :class:`~minivln.training.finetune.FinetuneTask`) + backward +
  clipping + AdamW.

Every preset sees the same batches (same seeds), and the presets are interleaved (for each iteration
index, each preset runs one iteration, the order alternating) so that load from other jobs on a shared
machine affects them alike; we report the median seconds per iteration after ``--warmup`` untimed
iterations, and ratios to the first preset.  Each iteration is also split into its *data* part
(``next_batch`` and the copy to the device: what the trainer's ``num_workers`` can build ahead in
pretraining) and its *step* part (forward, backward, optimizer; in fine-tuning the rollouts and so
the agent's host work).  ``--precision bf16`` runs the forward under ``torch.autocast`` in bfloat16 as
the trainer does on a GPU (``train.precision``; on a CPU the trainer always runs fp32).  ``--compile``
compiles the transformer layers as ``train.compile`` does (:func:`~minivln.model.duet.compile_layers`);
the warm-up iterations then pay the compilation, and the report keeps their times (``warmup_s``).
``--count-ops`` runs one more, untimed, iteration per preset under a counting dispatch mode and
reports the aten operators it dispatched (forward, backward and optimizer; ``ops_per_it``), and those
left once the metadata-only ones (views, transposes, detaches) are set aside (``compute_ops_per_it``):
a device-independent proxy for the kernel launches that bound a small model's step on a GPU, which a
CPU can measure (on a CPU some operators decompose further than on CUDA, dropout and masked attention
among them).  ``--optimizer`` picks AdamW's kernels (the trainer's ``auto``: fused), ``--full-batch`` runs the
network on every sample at every step as the reference does (the agent's default runs the samples
still navigating only), ``--merge-rollouts`` runs DAgger's two rollouts as one batch: together they
reproduce the iteration before and after those changes in one process.  Fine-tuning
iterations of untrained models are the slowest kind: their sampled rollouts wander until
``max_action_len``.  On a GPU each preset's row also has ``step_extra_gb``: the most memory one of its
iterations allocated beyond what was resident before it (activations, gradients, AdamW's state on the
first step), the part of the memory per GPU that grows with the batch.  ``--memory`` measures it on a
CPU too (:func:`allocation_peak`: torch's profiler records every allocation and free of the CPU
allocator during the iteration, and the peak of what the iteration's own allocations held at once is
reported): there the previous iteration's gradients, freed as it starts, are not subtracted, so the CPU
figure holds the new gradients in full (the GPU's figure, measured against what was resident, does
not); ``step_extra_gb_all`` keeps every iteration's figure (warm-up first: the first iteration also
creates AdamW's moments; in pretraining ``iteration_tasks`` names the task each drew).  ``--teacher
PRESET`` trains each preset with that frozen preset as its stage-1 or stage-2 teacher.  The profiler
slows the iterations it watches: time without ``--memory``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import platform
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from minivln.distill.compat import check_teacher
from minivln.model.duet import compile_layers
from minivln.model.registry import create_model
from minivln.paths import atomic_write_text
from minivln.training.distributed import resolve_device, seed_everything
from minivln.training.finetune import (
    FinetuneConfig,
    build_model,
    make_task,
    prepare_data,
    stage2_loss_terms,
)
from minivln.training.pretrain import (
    PretrainConfig,
    PretrainTask,
    build_datasets,
    build_pretrainer,
    resolve_data,
    resolve_mix,
    resolve_objects,
    stage1_loss_terms,
    stage1_weights,
)
from minivln.training.pretrain_data import features_have_classes
from minivln.training.trainer import (
    OPTIM_IMPLEMENTATIONS,
    OptimConfig,
    _resolve_amp_dtype,
    _StepModule,
    freeze_teacher,
    make_optimizer,
    move_to,
    param_groups,
)

METADATA_OPS = frozenset({
    "aten.view", "aten._unsafe_view", "aten.t", "aten.transpose", "aten.permute", "aten.expand", "aten.select",
    "aten.slice", "aten.unsqueeze", "aten.squeeze", "aten.detach", "aten.alias", "aten.as_strided",
    "aten.lift_fresh", "aten.unbind", "aten.split", "aten.split_with_sizes", "aten.chunk", "aten.reshape",
    "aten.expand_as", "aten.view_as", "aten._reshape_alias", "aten.narrow", "aten.unfold", "aten.diagonal",
})
"""Operators that only make a new view of existing memory: no kernel runs for them on a GPU."""


class OpCounter(TorchDispatchMode):
    """Counts the aten operators dispatched while active (``with OpCounter() as c: ...``; ``c.counts``)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    def compute(self) -> Counter[str]:
        """The counts without the view-only operators (:data:`METADATA_OPS`)."""
        return _compute(self.counts)

    def summary(self, top: int = 12) -> dict[str, Any]:
        return _summary(self.counts, top)


def _compute(counts: Counter[str]) -> Counter[str]:
    return Counter({k: v for k, v in counts.items() if k not in METADATA_OPS})


def _summary(counts: Counter[str], top: int) -> dict[str, Any]:
    compute = _compute(counts)
    return {"ops_per_it": sum(counts.values()), "compute_ops_per_it": sum(compute.values()),
            "top_compute_ops": dict(compute.most_common(top))}


def split_summary(data: OpCounter, step: OpCounter, top: int = 12) -> dict[str, Any]:
    """An iteration's counts, whole (as :meth:`OpCounter.summary`) and split into its data part (the
    batch built and moved: host work that workers do ahead in pretraining) and its step part (forward,
    backward, optimiser; the rollouts in fine-tuning), which is what runs on the accelerator."""
    step_compute = step.compute()
    return {**_summary(data.counts + step.counts, top), "data_compute_ops_per_it": sum(data.compute().values()),
            "step_compute_ops_per_it": sum(step_compute.values()),
            "top_step_ops": dict(step_compute.most_common(top))}


MEMORY_METHODS = {
    "cuda": "torch.cuda.max_memory_allocated() during the iteration minus memory_allocated() before it",
    "cpu": "torch.profiler(profile_memory=True): peak of the bytes the iteration's own CPU allocations held "
           "at once (frees of tensors allocated before it, e.g. the previous gradients, not counted)",
}
"""How ``step_extra_gb`` is measured on each device type (the report's ``memory_method``)."""


def allocation_peak(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``fn()`` and the peak, in bytes, of the memory its own CPU allocations held at once: every
    allocation and free the profiler records, in time order, summed (a free of memory allocated
    before ``fn`` ran is not recorded, hence not subtracted)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        result = fn()
    sizes = [(e.start_time_ns, e.extra_fields.alloc_size) for e in _event_nodes(prof)
             if type(e.extra_fields).__name__ == "_ExtraFields_Allocation" and e.extra_fields.device.type == "cpu"]
    held = peak = 0
    for _, size in sorted(sizes, key=lambda x: x[0]):
        held += size
        peak = max(peak, held)
    return result, peak


def _event_nodes(prof: profile):
    """Every event the profiler recorded (its event tree, flattened)."""
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        yield node
        stack.extend(node.children)


DEFAULT_PRESETS = ("duet-r2r", "minivln-r2r")
PHASES = ("pretrain", "finetune")
PRECISIONS = ("fp32", "bf16")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _make_step(model: torch.nn.Module, task: Any, device: torch.device, lr: float = 1e-5,
               grad_clip: float = 40.0, precision: str = "fp32", compile: bool = False,
               optimizer: str = "auto", teacher: torch.nn.Module | None = None,
               loss_terms: Sequence[torch.nn.Module] = ()) -> Callable[[int], tuple[float, float]]:
    """One training iteration of ``model`` on ``task`` batch ``i`` (as the trainer runs it); returns
    the seconds of its data part and of its step part (the device synchronised after each).  With a
    ``teacher`` (frozen) and its distillation ``loss_terms``, the model and the terms are one module
    and the teacher runs on every batch, as the trainer's distillation step."""

    model.to(device).train()
    if compile:
        compile_layers(model)
    trained: torch.nn.Module = model
    if teacher is not None:
        trained = _StepModule(model, [t.to(device) for t in loss_terms], task, freeze_teacher(teacher.to(device)))
    opt = make_optimizer(param_groups(trained, 0.01), OptimConfig(lr=lr, implementation=optimizer))  # as the trainer
    amp = _resolve_amp_dtype(precision, device)

    def compute_loss(batch: Any) -> torch.Tensor:
        return task.compute(model, batch).loss if teacher is None else trained(batch)[0]

    def step(i: int, counters: tuple[OpCounter, OpCounter] | None = None) -> tuple[float, float]:
        """``counters``: (data, step) counters, each active around its part."""
        count_data, count_step = counters if counters else (contextlib.nullcontext(), contextlib.nullcontext())
        t0 = time.perf_counter()
        with count_data:
            batch = move_to(task.next_batch(i), device)
        _sync(device)
        t1 = time.perf_counter()
        with count_step:
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device.type, dtype=amp) if amp else contextlib.nullcontext():
                loss = compute_loss(batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained.parameters(), grad_clip)
            opt.step()
        _sync(device)
        return t1 - t0, time.perf_counter() - t1

    step.task = task  # type: ignore[attr-defined]  # what it runs (e.g. PretrainTask.task_of)
    return step


def pretrain_step(preset: str, data_dir: str, features: str, *, task: str = "r2r", batch_size: int = 8,
                  max_instr_len: int = 80, device: torch.device, seed: int = 0, precision: str = "fp32",
                  compile: bool = False, optimizer: str = "auto",
                  objects: str = "", teacher: str = "") -> Callable[[int], tuple[float, float]]:
    """``teacher``: a preset (random weights) distilled into ``preset`` as in stage 1, with the
    configuration's default terms (those of the paper-scale recipes)."""

    cfg = PretrainConfig(model=preset, task=task, data_dir=data_dir, features=features, val_splits=[],
                         batch_size=batch_size, max_instr_len=max_instr_len, objects=objects)
    cfg.train.seed = seed
    mix = resolve_mix(cfg)
    data, feats = resolve_data(cfg)
    if not features_have_classes(feats):
        mix["mrc"] = 0.0
    train_ds, _ = build_datasets(cfg, data, feats, with_classes=mix.get("mrc", 0.0) > 0,
                                 objects=resolve_objects(cfg, data))
    seed_everything(seed)
    model = build_pretrainer(cfg)
    teacher_net, terms = None, []
    if teacher:
        teacher_net = create_model(teacher)
        check_teacher(model.duet.config, teacher_net.config, stage=1, source=f"teacher {teacher}",
                      kd_terms=stage1_weights(cfg))
        terms = stage1_loss_terms(cfg, model.duet.config, teacher_net.config)
    return _make_step(model, PretrainTask(train_ds, batch_size, mix, seed=seed), device, precision=precision,
                      compile=compile, optimizer=optimizer, teacher=teacher_net, loss_terms=terms)


def finetune_step(preset: str, data_dir: str, features: str, *, task: str = "r2r", batch_size: int = 8,
                  max_instr_len: int = 80, max_action_len: int = 15, device: torch.device, seed: int = 0,
                  precision: str = "fp32", compile: bool = False, merge_rollouts: bool = False,
                  optimizer: str = "auto", full_batch: bool = False,
                  objects: str = "", teacher: str = "") -> Callable[[int], tuple[float, float]]:
    """``teacher``: a preset (random weights) distilled into ``preset`` as in stage 2, with the
    configuration's default terms (those of the paper-scale recipes)."""

    cfg = FinetuneConfig(model=preset, task=task, data_dir=data_dir, features=features, objects=objects,
                         batch_size=batch_size, max_instr_len=max_instr_len, max_action_len=max_action_len,
                         merge_rollouts=merge_rollouts)
    cfg.train.seed = seed
    seed_everything(seed)
    model = build_model(cfg)
    res = prepare_data(cfg, Path("."), model.config.image_feat_size, model.config.obj_feat_size)
    task = make_task(cfg, model, res)
    task.agent.compact = not full_batch
    teacher_net, terms = None, []
    if teacher:
        teacher_net = create_model(teacher)
        check_teacher(model.config, teacher_net.config, stage=2, source=f"teacher {teacher}")
        terms = stage2_loss_terms(cfg, model.config, teacher_net.config)
    return _make_step(model, task, device, lr=cfg.train.optim.lr, precision=precision, compile=compile,
                      optimizer=optimizer, teacher=teacher_net, loss_terms=terms)


def bench_train(presets: Sequence[str], phases: Sequence[str], data_dir: str, features: str, *,
                iters: int = 5, warmup: int = 1, device: str = "cpu", threads: int = 1, batch_size: int = 8,
                max_instr_len: int = 80, max_action_len: int = 15, seed: int = 0, quiet: bool = False,
                precision: str = "fp32", compile: bool = False, merge_rollouts: bool = False,
                optimizer: str = "auto", full_batch: bool = False, count_ops: bool = False,
                memory: bool = False, task: str = "r2r", objects: str = "",
                teacher: str = "") -> dict[str, Any]:
    """Time ``iters`` iterations per preset and phase (after ``warmup``); see the module docstring.
    ``memory``: on a CPU also measure each iteration's memory (:func:`allocation_peak`); a GPU always does.
    ``teacher``: every preset trains with this frozen preset as its stage-1 (pretraining) or stage-2
    (fine-tuning) teacher."""

    if iters < 1 or warmup < 0:
        raise ValueError("iters must be >= 1 and warmup >= 0")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    if threads > 0:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    report: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "batch_size": batch_size,
        "precision": precision if dev.type == "cuda" else "fp32", "max_instr_len": max_instr_len, "max_action_len": max_action_len, "iters": iters, "warmup": warmup,
        "compile": compile, "merge_rollouts": merge_rollouts, "optimizer": optimizer, "full_batch": full_batch,
        "count_ops": count_ops, "features": features, "task": task, "objects": objects,
        "teacher": teacher or None, "phases": {},
    }
    cpu_memory = memory and dev.type == "cpu"
    if dev.type == "cuda" or cpu_memory:
        report["memory_method"] = MEMORY_METHODS[dev.type]
    for phase in phases:
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
        make = pretrain_step if phase == "pretrain" else finetune_step
        kw = dict(batch_size=batch_size, max_instr_len=max_instr_len, device=dev, seed=seed, precision=precision,
                  compile=compile, optimizer=optimizer, task=task, objects=objects, teacher=teacher)
        if phase == "finetune":
            kw.update(max_action_len=max_action_len, merge_rollouts=merge_rollouts, full_batch=full_batch)
        steps = {p: make(p, data_dir, features, **kw) for p in presets}
        times: dict[str, list[float]] = {p: [] for p in presets}
        parts: dict[str, list[tuple[float, float]]] = {p: [] for p in presets}
        warm: dict[str, list[float]] = {p: [] for p in presets}
        extra: dict[str, int] = {p: 0 for p in presets}  # CUDA: peak bytes an iteration adds to what is resident
        extra_all: dict[str, list[float]] = {p: [] for p in presets}  # CPU (memory): every iteration's peak, GB
        for i in range(warmup + iters):
            order = list(presets) if i % 2 == 0 else list(reversed(presets))
            for p in order:
                _sync(dev)
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                    resident = torch.cuda.memory_allocated(dev)
                t0 = time.perf_counter()
                if cpu_memory:
                    (data_s, step_s), peak = allocation_peak(functools.partial(steps[p], i))
                    extra[p] = max(extra[p], peak)
                    extra_all[p].append(round(peak / 2**30, 3))
                else:
                    data_s, step_s = steps[p](i)
                dt = time.perf_counter() - t0
                if dev.type == "cuda":
                    extra[p] = max(extra[p], torch.cuda.max_memory_allocated(dev) - resident)
                if i >= warmup:
                    times[p].append(dt)
                    parts[p].append((data_s, step_s))
                else:
                    warm[p].append(round(dt, 4))
                if not quiet:
                    print(f"{phase} {p} iteration {i}{' (warm-up)' if i < warmup else ''}: {dt:.2f} s", flush=True)
        ops: dict[str, dict[str, Any]] = {}
        if count_ops:  # one more iteration per preset, untimed
            for p in presets:
                counters = (OpCounter(), OpCounter())
                steps[p](warmup + iters, counters)
                ops[p] = split_summary(*counters)
        # pretraining: the task each iteration drew (its memory depends on it), warm-up first
        drawn = {p: [steps[p].task.task_of(i) for i in range(warmup + iters)]
                 for p in presets if cpu_memory and hasattr(steps[p].task, "task_of")}
        del steps
        ref = statistics.median(times[presets[0]])
        report["phases"][phase] = {
            p: {"s_per_it": statistics.median(t), "it_s": 1.0 / statistics.median(t),
                "ratio_to_first": statistics.median(t) / ref, "all_s": [round(x, 4) for x in t],
                "data_s": statistics.median(d for d, _ in parts[p]),
                "step_s": statistics.median(s for _, s in parts[p]), "warmup_s": warm[p], **ops.get(p, {}),
                **({"step_extra_gb": round(extra[p] / 2**30, 3)} if dev.type == "cuda" or cpu_memory else {}),
                **({"step_extra_gb_all": extra_all[p]} if cpu_memory else {}),
                **({"iteration_tasks": drawn[p]} if p in drawn else {})}
            for p, t in times.items()
        }
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{report['date']}  {report['device']}  torch {report['torch']}  threads {report['threads']}  "
             f"batch {report['batch_size']}  {report.get('precision', 'fp32')}"
             f"{'  compiled' if report.get('compile') else ''}  median of {report['iters']} (after {report['warmup']} warm-up)"]
    for phase, rows in report["phases"].items():
        lines.append(f"{phase}:")
        for p, r in rows.items():
            lines.append(f"  {p:<16} {r['s_per_it']:8.3f} s/it  {r['it_s']:7.3f} it/s  "
                         f"x{r['ratio_to_first']:.2f} of the first  (data {r['data_s']:.3f} s + "
                         f"step {r['step_s']:.3f} s)"
                         + (f"  {r['compute_ops_per_it']} ops/it" if "compute_ops_per_it" in r else "")
                         + (f"  +{r['step_extra_gb']:.2f} GB at peak" if "step_extra_gb" in r else ""))
    return "\n".join(lines)


def add_parser(bench_sub: argparse._SubParsersAction) -> None:
    """``minivln bench train`` (registered by ``minivln bench``)."""
    t = bench_sub.add_parser(
        "train", help="training iterations/s (pretraining and fine-tuning) of model presets, interleaved",
        description=__doc__.split("\n\n")[0],
    )
    t.add_argument("--presets", nargs="+", default=list(DEFAULT_PRESETS))
    t.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    t.add_argument("--data-dir", default="", help="data directory (default: $MINIVLN_DATA)")
    t.add_argument("--features", required=True, help="view feature HDF5 (e.g. built by `minivln features build`)")
    t.add_argument("--task", choices=("r2r", "reverie"), default="r2r")
    t.add_argument("--objects", default="", help="REVERIE: object feature HDF5 (models with object tokens)")
    t.add_argument("--teacher", default="", metavar="PRESET",
                   help="train each preset with this frozen preset (random weights) as its teacher: stage 1 in "
                        "pretraining, stage 2 in fine-tuning, the configurations' default distillation terms")
    t.add_argument("--iters", type=int, default=5, help="timed iterations per preset and phase (median)")
    t.add_argument("--warmup", type=int, default=1)
    t.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    t.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: leave)")
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--max-instr-len", type=int, default=80)
    t.add_argument("--max-action-len", type=int, default=15)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="bf16: autocast as the trainer runs on a GPU (a CPU always runs fp32)")
    t.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer layers, as train.compile (warm-up pays the compilation)")
    t.add_argument("--merge-rollouts", action="store_true",
                   help="fine-tuning: DAgger's two rollouts as one batch (FinetuneConfig.merge_rollouts)")
    t.add_argument("--optimizer", choices=OPTIM_IMPLEMENTATIONS, default="auto",
                   help="AdamW's kernels (optim.implementation; torch's own default: foreach on CUDA, single on CPU)")
    t.add_argument("--full-batch", action="store_true",
                   help="fine-tuning: run the network on every sample at every step, as the reference "
                        "(DUETAgent(compact=False)); the default runs the samples still navigating only")
    t.add_argument("--count-ops", action="store_true",
                   help="also count the aten operators of one more (untimed) iteration: a proxy for GPU launches")
    t.add_argument("--memory", action="store_true",
                   help="CPU: also measure each iteration's memory beyond what was allocated before it "
                        "(step_extra_gb, under torch's profiler: slower iterations); a GPU always does")
    t.add_argument("--json", metavar="OUT", help="also write the report as JSON")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    report = bench_train(args.presets, args.phases, args.data_dir, args.features, iters=args.iters,
                         warmup=args.warmup, device=args.device, threads=args.threads,
                         batch_size=args.batch_size, max_instr_len=args.max_instr_len,
                         max_action_len=args.max_action_len, seed=args.seed, quiet=args.quiet,
                         precision=args.precision, compile=args.compile, merge_rollouts=args.merge_rollouts,
                         optimizer=args.optimizer, full_batch=args.full_batch, count_ops=args.count_ops,
                         memory=args.memory, task=args.task, objects=args.objects,
                         teacher=args.teacher)
    print(format_report(report))
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(report, indent=2) + "\n")
    return 0
