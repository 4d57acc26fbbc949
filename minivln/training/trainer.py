"""The one training loop, shared by pretraining, fine-tuning and distillation.

The trainer knows nothing about VLN.  What differs between uses plugs in from outside:

* a **task** (:class:`Task`) makes batches (``next_batch``) and turns a model and a batch into a loss
  (``compute`` -> :class:`TaskOutput`), optionally also running a frozen teacher;
* a **teacher** (any ``nn.Module``) is put in eval mode, frozen and moved to the device, and every call
  into it runs with gradients off;
* **loss terms** (:class:`LossTerm`) are small modules, possibly with learnable parameters (e.g. a
  projection from student to teacher width), that add ``weight * term(student outputs, teacher
  outputs, batch)`` to the task's loss.  Their parameters are optimised and checkpointed with the model.

The loop itself: AdamW (no weight decay on biases and norm weights), linear warm-up then linear or
cosine decay, gradient accumulation, gradient-norm clipping, mixed precision on GPU, DDP under
``torchrun``, a validation hook with best-checkpoint keeping, atomic checkpoints with exact resume,
JSONL logs and a progress bar.  See ``docs/training.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import os
import signal
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from tqdm import tqdm

from minivln.config import ConfigError, check_finite, save_config
from minivln.distill.losses import LossTerm  # noqa: F401 - re-exported: the trainer's plug-in interface
from minivln.model.checkpoint import CheckpointError, load_state_dict_strict
from minivln.model.duet import compile_layers
from minivln.paths import check_free_space, check_writable_dir, format_bytes
from minivln.training import distributed as D
from minivln.training.checkpoint import (
    TRAINER_FILE,
    RunLock,
    capture_rng_state,
    find_checkpoint,
    load_checkpoint,
    read_meta,
    restore_rng_state,
    save_checkpoint,
)
from minivln.training.logging import JsonlLogger, format_record

# ----------------------------------------------------------------------------------------- config


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01  # not applied to biases and norm weights (parameters with < 2 dims)
    schedule: str = "linear"  # after warm-up: "linear" | "cosine" decay to min_lr_ratio * lr, or "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    implementation: str = "auto"  # AdamW's kernels: "auto" (fused where every parameter is on a CPU or a
    #                     CUDA device, else torch's default), "fused", "foreach", "single" (a loop per tensor)


@dataclass
class TrainConfig:
    """Everything the loop needs; embed it in a larger experiment config as e.g. ``train:``."""

    run_dir: str = "runs/train"
    max_steps: int = 1000  # optimizer steps
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    seed: int = 0
    deterministic: bool = False  # torch.use_deterministic_algorithms(True)
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:1"
    precision: str = "auto"  # "auto" (bf16 if supported, else fp16, on GPU) | "fp32" | "bf16" | "fp16"; CPU: fp32
    log_every: int = 10
    val_every: int = 0  # 0: no periodic validation (a validate hook still runs after the last step)
    ckpt_every: int = 500  # latest/ is also written after the last step
    max_minutes: float = 0.0  # wall-clock budget of this process; >0: stop (validate + save) once exceeded
    best_metric: str = ""  # a validation key such as "val_unseen.spl"; "" keeps no best/ checkpoint
    best_mode: str = "max"  # "max" | "min"
    resume: bool = False  # continue from RUN/latest if it exists
    progress: bool = True  # tqdm bar on a terminal, a printed line per log step otherwise
    find_unused_parameters: bool = False  # DDP: set when some parameters get no gradient in a step
    compile: bool = False  # torch.compile the model's transformer layers (GPU; see compile_layers)
    ema_decay: float = 0.0  # >0: also keep an exponential moving average of the weights, updated after
    #                         every optimizer step from step ema_start on (checkpointed; RUN/ema/ at each save)
    ema_start: int = 0
    optim: OptimConfig = field(default_factory=OptimConfig)

    def check(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field."""
        check_finite(self)  # a NaN passes every range check below
        o = self.optim
        if self.max_steps < 1:
            raise ConfigError(f"max_steps: must be >= 1, got {self.max_steps}")
        if self.grad_accum_steps < 1:
            raise ConfigError(f"grad_accum_steps: must be >= 1, got {self.grad_accum_steps}")
        for name in ("log_every", "val_every", "ckpt_every", "max_minutes", "ema_start"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay: must be in [0, 1) (0 = off), got {self.ema_decay}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"precision: expected auto/fp32/bf16/fp16, got {self.precision!r}")
        if self.best_mode not in ("max", "min"):
            raise ConfigError(f"best_mode: expected max or min, got {self.best_mode!r}")
        if o.schedule not in ("linear", "cosine", "constant"):
            raise ConfigError(f"optim.schedule: expected linear/cosine/constant, got {o.schedule!r}")
        if o.lr <= 0 or o.warmup_steps < 0 or not 0.0 <= o.min_lr_ratio <= 1.0 or o.grad_clip < 0:
            raise ConfigError("optim: need lr > 0, warmup_steps >= 0, 0 <= min_lr_ratio <= 1, grad_clip >= 0")
        if o.implementation not in OPTIM_IMPLEMENTATIONS:
            raise ConfigError(f"optim.implementation: one of {OPTIM_IMPLEMENTATIONS}, got {o.implementation!r}")


# ----------------------------------------------------------------------------------------- plug-ins


@dataclass
class TaskOutput:
    """What a task's ``compute`` returns for one (micro-)batch.

    ``loss``: scalar tensor, the mean over this rank's batch (DDP then averages over ranks).
    ``metrics``: named scalars to log, e.g. ``{"loss/mlm": ..., "acc/sap": ...}`` (averaged over steps).
    ``outputs``: student outputs the loss terms read (e.g. ``{"hidden": h, "logits": z}``).
    ``teacher_outputs``: the teacher's counterparts, ``None`` without a teacher (detached for the terms).
    """

    loss: torch.Tensor
    metrics: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    teacher_outputs: dict[str, Any] | None = None


@runtime_checkable
class Task(Protocol):
    """Makes batches and computes a model's loss on them.

    ``next_batch(index)`` is called with the global micro-batch index ``step * grad_accum_steps + i``
    (0-based); it returns this rank's share of that batch (see
    :class:`~minivln.training.distributed.GlobalBatchSampler`).  Tensors in a returned tensor / list /
    tuple / dict are moved to the device by the trainer.

    ``compute(model, batch, teacher)`` runs under autocast and, in training, with gradients on; the
    ``teacher`` (or ``None``) is frozen and runs without gradients whatever the caller does.

    Optional, for exact resume: ``state_dict() -> dict`` and ``load_state_dict(dict)`` giving the
    task's position (e.g. its sampler's) and any private random generator.  Without them a resumed
    run replays batches from the task's fresh state.
    """

    def next_batch(self, index: int) -> Any: ...

    def compute(self, model: nn.Module, batch: Any, teacher: nn.Module | None = None) -> TaskOutput: ...


ValidateFn = Callable[[nn.Module], Mapping[str, Any]]


# ----------------------------------------------------------------------------------------- helpers


def freeze_teacher(teacher: nn.Module) -> nn.Module:
    """Eval mode, ``requires_grad=False``, and gradients switched off inside every call of it or of its
    submodules (forward hooks), so no autograd graph is ever built through the teacher."""
    teacher.eval()
    teacher.requires_grad_(False)
    if getattr(teacher, "_minivln_frozen", False):
        return teacher
    saved: list[bool] = []

    def enter(module: nn.Module, args: Any) -> None:
        saved.append(torch.is_grad_enabled())
        torch.set_grad_enabled(False)

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        torch.set_grad_enabled(saved.pop())

    for m in teacher.modules():
        m.register_forward_pre_hook(enter)
        m.register_forward_hook(leave, always_call=True)
    teacher._minivln_frozen = True  # type: ignore[attr-defined]
    return teacher


TEACHER_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def teacher_autocast(teacher: nn.Module, dtype: str = "bf16") -> nn.Module:
    """Run every call of ``teacher`` under ``torch.autocast`` in ``dtype`` (on the device of its
    parameters) and hand back float32 tensors, so that the student and the losses see the teacher's
    outputs in full precision.  ``"fp32"`` leaves the teacher as it is.  On a CPU with AMX
    (``amx_bf16``) bf16 matrix products are several times faster; check the teacher's action
    distribution against fp32 before relying on it (``studies/compute_cost/kd_step_ratio.py`` does both)."""
    if dtype not in TEACHER_DTYPES:
        raise ValueError(f"teacher dtype: one of {sorted(TEACHER_DTYPES)}, got {dtype!r}")
    if TEACHER_DTYPES[dtype] is None or getattr(teacher, "_minivln_autocast", None) == dtype:
        return teacher
    contexts: list[contextlib.AbstractContextManager] = []

    def enter(module: nn.Module, args: Any) -> None:
        device = next(module.parameters()).device.type
        ctx = torch.autocast(device_type=device, dtype=TEACHER_DTYPES[dtype])
        ctx.__enter__()
        contexts.append(ctx)

    def leave(module: nn.Module, args: Any, output: Any) -> Any:
        contexts.pop().__exit__(None, None, None)
        return _to_float32(output)

    teacher.register_forward_pre_hook(enter)
    teacher.register_forward_hook(leave, always_call=True)
    teacher._minivln_autocast = dtype  # type: ignore[attr-defined]
    return teacher


def _to_float32(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() and obj.dtype != torch.float32 else obj
    if isinstance(obj, dict):
        return {k: _to_float32(v) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_to_float32(v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_float32(v) for v in obj)
    return obj


def move_to(obj: Any, device: torch.device) -> Any:
    """Tensors inside (nested) dicts, lists and tuples moved to ``device``; anything else unchanged."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: move_to(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(move_to(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(move_to(v, device) for v in obj)
    return obj


def _detach(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, dict):
        return {k: _detach(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_detach(v) for v in obj)
    return obj


OPTIM_IMPLEMENTATIONS = ("auto", "fused", "foreach", "single")


def make_optimizer(groups: list[dict[str, Any]], o: OptimConfig) -> torch.optim.AdamW:
    """AdamW over ``groups`` with ``o``'s settings and kernels (``o.implementation``).

    "auto" picks the fused kernels when every parameter lives on a CPU or a CUDA device: one pass
    per step instead of about ten operations per tensor (the same update up to rounding; measured in
    ``docs/results.md``, "AdamW's kernels").
    """
    kw: dict[str, Any] = {}
    impl = o.implementation
    if impl == "auto":
        devices = {p.device.type for g in groups for p in g["params"]}
        impl = "fused" if devices and devices <= {"cpu", "cuda"} else "default"
    if impl == "fused":
        kw["fused"] = True
    elif impl in ("foreach", "single"):
        kw["foreach"] = impl == "foreach"
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, **kw)


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: matrices/embeddings (decayed) and 1-d parameters, i.e. biases and norm
    weights (not decayed).  Frozen and shared parameters are handled (each appears once)."""
    decay, no_decay, seen = [], [], set()
    for p in module.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class WarmupDecay:
    """Learning-rate factor for step ``s``: linear warm-up to 1 over ``warmup_steps``, then linear or
    cosine decay to ``min_ratio`` at ``total_steps`` (or constant).  Picklable, for ``LambdaLR``."""

    def __init__(self, warmup_steps: int, total_steps: int, schedule: str = "linear", min_ratio: float = 0.0) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.schedule = schedule
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        if self.schedule == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            shape = 1.0 - progress
        return self.min_ratio + (1.0 - self.min_ratio) * shape


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"val_unseen": {"sr": 0.4}}`` -> ``{"val_unseen.sr": 0.4}``; non-numbers are dropped."""
    flat: dict[str, float] = {}
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            flat.update(flatten_metrics(v, key + "."))
        elif isinstance(v, torch.Tensor) and v.numel() == 1:
            flat[key] = float(v.item())
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            flat[key] = float(v)
    return flat


def _resolve_amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or ``None`` for full fp32 (always on CPU)."""
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


class _StepModule(nn.Module):
    """Model + loss terms as one module, so that DDP synchronises the gradients of both.

    Its forward is one micro-batch: the task's loss plus the weighted loss terms.  The task and the
    teacher are plain attributes, not submodules: they are neither synchronised nor saved.
    """

    def __init__(self, model: nn.Module, loss_terms: Sequence[LossTerm], task: Task, teacher: nn.Module | None):
        super().__init__()
        self.model = model
        self.loss_terms = nn.ModuleList(loss_terms)
        self.__dict__["task"] = task
        self.__dict__["teacher"] = teacher

    def forward(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.task.compute(self.model, batch, self.teacher)
        if not isinstance(out, TaskOutput):
            raise TypeError(f"{type(self.task).__name__}.compute must return a TaskOutput, got {type(out).__name__}")
        total = out.loss
        logs: dict[str, torch.Tensor] = {}
        if len(self.loss_terms):
            logs["loss/task"] = out.loss.detach()
            teacher_outputs = _detach(out.teacher_outputs)
            for term in self.loss_terms:
                value = term(out.outputs, teacher_outputs, batch)
                total = total + term.weight * value
                logs[f"loss/{term.name}"] = value.detach()
        for k, v in out.metrics.items():
            logs[k] = v.detach() if isinstance(v, torch.Tensor) else torch.tensor(float(v))
        logs["loss"] = total.detach()
        return total, logs


class _Window:
    """Running sums of logged scalars between two log records.

    Each key is averaged over the steps that logged it (a task mixing several objectives logs each
    objective's metrics only on its own steps).
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, logs: Mapping[str, torch.Tensor]) -> None:
        for k, v in logs.items():
            v = v.detach().float().reshape(())
            self.sums[k] = self.sums[k] + v.to(self.sums[k].device) if k in self.sums else v.clone()
            self.counts[k] = self.counts.get(k, 0) + 1

    def means(self) -> dict[str, float]:
        """Averages over the window and over ranks (one all-reduce for all keys)."""
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        dev = next(iter(self.sums.values())).device
        counts = torch.tensor([self.counts[k] for k in keys], dtype=torch.float32, device=dev)
        packed = torch.stack([self.sums[k].to(dev) for k in keys]) / counts
        packed = D.all_reduce_mean(packed).cpu().tolist()
        self.sums, self.counts = {}, {}
        return dict(zip(keys, packed))


# ----------------------------------------------------------------------------------------- trainer


class WeightAverage:
    """An exponential moving average of a model's floating-point weights (fp32 copies):
    ``avg = decay * avg + (1 - decay) * w`` after each update; ``restart=True`` sets ``avg = w``.
    Buffers that are not floating point (e.g. step counters) are taken as they are when read out."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.avg: dict[str, torch.Tensor] = {k: v.detach().float().clone() for k, v in model.state_dict().items()
                                             if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module, restart: bool = False) -> None:
        current = model.state_dict()
        for k, a in self.avg.items():
            if restart:
                a.copy_(current[k])
            else:
                a.lerp_(current[k].float(), 1.0 - self.decay)
        self.updates = 1 if restart else self.updates + 1

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """A state dict for ``model``: the averages in each weight's own dtype, other entries as they are."""
        return {k: self.avg[k].to(v.dtype) if k in self.avg else v for k, v in model.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "avg": self.avg}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if set(state["avg"]) != set(self.avg):
            raise CheckpointError(message="the checkpoint's weight average is of another model")
        self.updates = int(state["updates"])
        for k, a in self.avg.items():
            a.copy_(state["avg"][k])


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped :meth:`Trainer.fit`; the message names the step reached and the last
    checkpoint, from which ``resume`` continues (checkpoint writes are atomic: an interrupted save
    leaves the previous one)."""


class TrainingStopped(TrainingInterrupted):
    """SIGTERM stopped :meth:`Trainer.fit` at the end of a step, after writing that step's checkpoint
    (``signum`` is the signal; the CLI exits with 128 + it, as a shell reports a signal)."""

    def __init__(self, message: str, signum: int = signal.SIGTERM) -> None:
        super().__init__(message)
        self.signum = int(signum)


class _StopOnSigterm:
    """While :meth:`Trainer.fit` runs, SIGTERM (a scheduler preempting the job, ``minivln experiment``
    stopping the jobs it started, ``kill``) asks the loop to stop at the end of the step under way
    instead of killing the process between checkpoints; more SIGTERMs change nothing (Ctrl-C or SIGKILL
    stop at once).  Installed only in the main thread and only over the default action (a handler the
    caller set, or SIG_IGN, is left alone)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._installed = False

    def __enter__(self) -> _StopOnSigterm:
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            self._installed = False

    def _handle(self, signum: int, frame: object) -> None:
        # only the first counts: a scheduler's SIGTERM to every process of the job is often followed at once by
        # the driver's own to its job, and neither means "now" (that is Ctrl-C's, or SIGKILL's)
        if self.signum is None:
            self.signum = signum

    def requested(self, dist: D.DistInfo) -> bool:
        """Whether a stop was asked for; under DDP, on any rank (every rank then stops at this step)."""
        flag = self.signum is not None
        if dist.enabled:
            t = torch.tensor([float(flag)], device=dist.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flag = bool(t.item())
        return flag


class Trainer:
    """Train ``model`` on ``task`` (see the module docstring and ``docs/training.md``).

    Args:
        model: the student; moved to the device and trained.  Build it before creating the trainer
            (under ``seed_everything(cfg.seed)`` for reproducible initial weights).
        task: a :class:`Task`.
        cfg: a :class:`TrainConfig`.
        teacher: an optional frozen model handed to ``task.compute``.
        loss_terms: extra :class:`LossTerm` modules (unique names).
        validate: ``validate(model) -> metrics`` (nested dicts allowed; flattened with dots), called
            on rank 0 in eval mode without gradients, every ``cfg.val_every`` steps and after the last.
        run_config: what to save as ``RUN/config.yaml`` (the whole experiment config); default ``cfg``.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        cfg: TrainConfig,
        *,
        teacher: nn.Module | None = None,
        loss_terms: Sequence[LossTerm] = (),
        validate: ValidateFn | None = None,
        run_config: Any = None,
    ) -> None:
        cfg.check()
        names = [t.name for t in loss_terms]
        if len(set(names)) != len(names):
            raise ValueError(f"loss term names must be unique, got {names}")
        self.cfg = cfg
        self.task = task
        self.validate_fn = validate
        self.dist = D.init_distributed(cfg.device)
        self.device = self.dist.device
        self.run_dir = Path(cfg.run_dir)
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        D.seed_everything(cfg.seed, self.dist.rank)

        self.model = model.to(self.device)
        if cfg.compile:
            if not hasattr(torch.compiler, "set_stance"):
                raise ConfigError(f"compile: needs torch >= 2.6 (this is {torch.__version__})")
            compile_layers(self.model)
        self.teacher = freeze_teacher(teacher.to(self.device)) if teacher is not None else None
        self.loss_terms = nn.ModuleList(loss_terms).to(self.device)
        self._step_module = _StepModule(self.model, list(self.loss_terms), task, self.teacher)
        self._train_module: nn.Module = self._step_module
        if self.dist.enabled:
            self._train_module = nn.parallel.DistributedDataParallel(
                self._step_module,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=cfg.find_unused_parameters,
            )

        self.optimizer = make_optimizer(param_groups(self._step_module, cfg.optim.weight_decay), cfg.optim)
        self.scheduler = self._make_scheduler()
        self.amp_dtype = _resolve_amp_dtype(cfg.precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

        self.step = 0
        self.ema = WeightAverage(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.best: dict[str, Any] | None = None  # {"metric", "value", "step"}
        self.last_val: dict[str, float] = {}

        self._take_run_dir()
        try:
            resumed = self._resume() if cfg.resume else False
            if not resumed and find_checkpoint(self.run_dir / "latest", repair=False):
                raise FileExistsError(
                    f"{self.run_dir} already holds a checkpoint: pass resume=true to continue it, "
                    "or choose another run_dir"
                )
            if self.dist.is_main:
                self._check_free_space()
            if self.dist.is_main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                save_config(run_config if run_config is not None else cfg, self.run_dir / "config.yaml")
            self.logger = JsonlLogger(
                self.run_dir / "log.jsonl", resume_step=self.step if resumed else None, enabled=self.dist.is_main
            )
        except BaseException:
            self.release_lock()
            raise

    def _take_run_dir(self) -> None:
        """Before any write: the run directory must take files, and have no other writer (rank 0 takes
        ``RUN/.lock``, held until :meth:`close` or :meth:`release_lock`, else until this trainer is
        collected or the process exits).  Under DDP every rank stops with rank 0's reason."""
        self._lock: RunLock | None = None
        self._unlock: Callable[[], Any] = lambda: None
        error: Exception | None = None
        if self.dist.is_main:  # before any work: a run that cannot save its checkpoints fails now
            try:
                check_writable_dir(self.run_dir, "run directory")
                self._lock = RunLock(self.run_dir)
            except Exception as exc:
                error = exc
        if self.dist.enabled:
            error = D.broadcast_object(error)
        if error is not None:
            raise error
        if self._lock is not None:
            self._unlock = weakref.finalize(self, self._lock.release)  # also runs at exit

    def release_lock(self) -> None:
        """Let go of ``RUN/.lock`` (:meth:`close` does, unless told to keep it); idempotent."""
        self._unlock()

    # ------------------------------------------------------------------------------------- loop

    def fit(self) -> dict[str, float]:
        """Train until ``cfg.max_steps`` (or until ``cfg.max_minutes`` of wall time have passed in this
        process: that step is then treated as the last one, validated and saved, and a ``kind: "stop"``
        record is logged); returns the last training log record.  Ctrl-C raises
        :class:`TrainingInterrupted` naming the last checkpoint.  SIGTERM lets the step under way finish
        (with its validation, if one is due), writes a checkpoint of it, logs a ``kind: "stop"`` record and
        raises :class:`TrainingStopped` (also after the last step); a resume continues from there with the
        weights, optimizer and random streams of an unbroken run."""
        cfg = self.cfg
        show_bar = cfg.progress and self.dist.is_main and sys.stderr.isatty()
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not show_bar, dynamic_ncols=True,
                   desc=self.run_dir.name)
        window = _Window()
        last_record: dict[str, float] = {}
        t_start = t_last = time.perf_counter()
        steps_since_log = 0
        stop = _StopOnSigterm()
        try:
            with stop:
                while self.step < cfg.max_steps:
                    window.add(self._train_step())
                    self.step += 1
                    steps_since_log += 1
                    bar.update(1)
                    final = self.step == cfg.max_steps
                    if cfg.max_minutes and not final and self._out_of_time(t_start):
                        final = True
                        self.logger.log({"kind": "stop", "step": self.step, "reason": "max_minutes",
                                         "max_minutes": cfg.max_minutes})
                    if (cfg.log_every and self.step % cfg.log_every == 0) or final:
                        now = time.perf_counter()
                        last_record = {"kind": "train", "step": self.step, **window.means(),
                                       "it_s": steps_since_log / max(now - t_last, 1e-9), "time": now - t_start}
                        t_last, steps_since_log = now, 0
                        self.logger.log(last_record)
                        self._check_finite(last_record)
                        if show_bar:
                            bar.set_postfix_str(format_record(last_record).split(" | ", 1)[-1])
                        elif cfg.progress and self.dist.is_main:
                            print(format_record(last_record), flush=True)
                    if self.validate_fn is not None and ((cfg.val_every and self.step % cfg.val_every == 0) or final):
                        self.validate()
                    saved = bool(cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or final
                    if saved:
                        self.save()
                    if stop.requested(self.dist):  # SIGTERM (on any rank): this step's checkpoint, then stop
                        if not saved:
                            self.save()
                        signum = stop.signum or signal.SIGTERM  # (under DDP it may have come to another rank)
                        self.logger.log({"kind": "stop", "step": self.step, "reason": signal.Signals(signum).name})
                        where = f"its last step ({self.step})" if final else f"step {self.step}"
                        raise TrainingStopped(self._stopped(signum, where), signum)
                    if final:
                        break
        except TrainingStopped:
            raise
        except KeyboardInterrupt:
            raise TrainingInterrupted(self._interrupted()) from None
        finally:
            bar.close()
        return last_record

    def _stopped(self, signum: int, where: str) -> str:
        """What a SIGTERM in :meth:`fit` left: the checkpoint of the step it stopped after."""
        return (f"stopped by {signal.Signals(signum).name} after {where}; its checkpoint is {self.run_dir / 'latest'} "
                f"(step {self.step}); continue it with --resume")

    def _interrupted(self) -> str:
        """What a Ctrl-C in :meth:`fit` left: the step reached and the checkpoint to resume from."""
        latest = self.run_dir / "latest"
        try:  # (no repair here: the resume does it, and a swap cut short is found under .latest.old)
            found = find_checkpoint(latest, repair=False)
            saved = read_meta(found).get("step") if found is not None else None
        except Exception:  # a damaged checkpoint: the resume names it
            found, saved = None, None
        if found is None:
            return (f"interrupted after step {self.step}, before the first checkpoint of {self.run_dir}: nothing "
                    "to resume; start the run again")
        return (f"interrupted after step {self.step}; the last checkpoint is {latest} (step {saved}); continue "
                "it with --resume")

    def _out_of_time(self, t_start: float) -> bool:
        """Whether the wall-time budget is spent; under DDP rank 0 decides for every rank."""
        out = time.perf_counter() - t_start >= self.cfg.max_minutes * 60.0
        if self.dist.enabled:
            flag = torch.tensor([float(out)], device=self.device)
            torch.distributed.broadcast(flag, src=0)
            out = bool(flag.item())
        return out

    def _micro_batches(self) -> Iterator[tuple[Any, bool]]:
        n = self.cfg.grad_accum_steps
        for i in range(n):
            yield move_to(self.task.next_batch(self.step * n + i), self.device), i == n - 1

    def _train_step(self) -> dict[str, torch.Tensor]:
        """One optimizer step over ``grad_accum_steps`` micro-batches; returns the logged scalars."""
        self._train_module.train()
        self.optimizer.zero_grad(set_to_none=True)
        n = self.cfg.grad_accum_steps
        step_logs: dict[str, torch.Tensor] = {}
        for batch, last in self._micro_batches():
            # DDP synchronises gradients only on the last micro-batch of the step
            sync = contextlib.nullcontext() if (last or not self.dist.enabled) else self._train_module.no_sync()
            with sync, torch.enable_grad():
                with self._autocast():
                    loss, logs = self._train_module(batch)
                self.scaler.scale(loss / n if n > 1 else loss).backward()
            for k, v in logs.items():
                step_logs[k] = step_logs[k] + v / n if k in step_logs else v / n
        step_logs["lr"] = torch.tensor(self.scheduler.get_last_lr()[0])
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.cfg.optim.grad_clip > 0:
            step_logs["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.grad_clip).detach()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None and self.step >= self.cfg.ema_start:  # self.step: steps before this one
            self.ema.update(self.model, restart=self.step == self.cfg.ema_start)
        return step_logs

    def _eager(self) -> contextlib.AbstractContextManager:
        """Compiled layers run eagerly inside (inference: validation)."""
        if not self.cfg.compile:
            return contextlib.nullcontext()
        return torch.compiler.set_stance("force_eager")

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _check_finite(self, record: Mapping[str, Any]) -> None:
        loss = record.get("loss")
        if isinstance(loss, float) and not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {self.step} (see {self.run_dir / 'log.jsonl'})")

    # ------------------------------------------------------------------------------------- validation

    def validate(self) -> dict[str, float]:
        """Run the validate hook (rank 0), log it, and keep ``best/`` by ``cfg.best_metric``."""
        if self.validate_fn is None:
            return {}
        metrics: dict[str, float] = {}
        if self.dist.is_main:
            rng = capture_rng_state()  # validation must not shift the training random streams
            was_training = self.model.training
            self.model.eval()
            try:
                with torch.no_grad(), self._eager():
                    metrics = flatten_metrics(self.validate_fn(self.model))
            finally:
                self.model.train(was_training)
                restore_rng_state(rng)
        metrics = D.broadcast_object(metrics)
        self.last_val = metrics
        self.logger.log({"kind": "val", "step": self.step, **metrics})
        if self.cfg.best_metric:
            self._update_best(metrics)
        return metrics

    def _update_best(self, metrics: Mapping[str, float]) -> None:
        key = self.cfg.best_metric
        if key not in metrics:
            raise KeyError(f"best_metric {key!r} is not among the validation metrics {sorted(metrics)}")
        value = metrics[key]
        if not math.isfinite(value):
            return
        better = (
            self.best is None
            or (self.cfg.best_mode == "max" and value > self.best["value"])
            or (self.cfg.best_mode == "min" and value < self.best["value"])
        )
        if not better:
            return
        self.best = {"metric": key, "value": value, "step": self.step}
        if self.dist.is_main:
            save_checkpoint(
                self.run_dir / "best",
                model_state=self.model.state_dict(),
                loss_terms_state=self._loss_terms_state(),
                meta={"kind": "best", "step": self.step, "best": self.best, "metrics": dict(metrics)},
            )
        D.barrier()

    # ------------------------------------------------------------------------------------- checkpoints

    def _loss_terms_state(self) -> dict[str, torch.Tensor]:
        return {f"{t.name}.{k}": v for t in self.loss_terms for k, v in t.state_dict().items()}

    def _load_loss_terms_state(self, state: Mapping[str, torch.Tensor]) -> None:
        for t in self.loss_terms:
            prefix = f"{t.name}."
            t.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})

    def save(self) -> Path:
        """Write ``RUN/latest`` (every rank must call it: the ranks' RNG and task states are gathered)."""
        task_state = self.task.state_dict() if hasattr(self.task, "state_dict") else None
        rank_states = D.all_gather_object({"rng": capture_rng_state(), "task": task_state})
        path = self.run_dir / "latest"
        if self.dist.is_main:
            save_checkpoint(
                path,
                model_state=self.model.state_dict(),
                loss_terms_state=self._loss_terms_state(),
                trainer_state={
                    "step": self.step,
                    "best": self.best,
                    "optimizer": self.optimizer.state_dict(),
                    "scaler": self.scaler.state_dict(),
                    "world_size": self.dist.world_size,
                    "config": dataclasses.asdict(self.cfg),
                    "rank_states": rank_states,
                    "ema": self.ema.state_dict() if self.ema is not None else None,
                },
                meta={"kind": "latest", "step": self.step, "best": self.best, "metrics": self.last_val},
            )
            if self.ema is not None:  # the averaged weights as a weights-only checkpoint beside latest/
                save_checkpoint(self.run_dir / "ema", model_state=self.ema.model_state(self.model),
                                meta={"kind": "ema", "step": self.step, "ema_decay": self.cfg.ema_decay,
                                      "ema_start": self.cfg.ema_start, "ema_updates": self.ema.updates})
        D.barrier()
        return path

    def checkpoint_bytes(self) -> tuple[int, int]:
        """(bytes of the weights, bytes of a ``latest/`` checkpoint: weights, loss terms and AdamW's two
        moments of every trainable parameter), as saved (fp32 moments)."""
        weights = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
        weights += sum(t.numel() * t.element_size() for t in self._loss_terms_state().values())
        moments = sum(2 * p.numel() * 4 for g in self.optimizer.param_groups for p in g["params"])
        return weights, weights + moments

    def _check_free_space(self) -> None:
        """Refuse to start a run whose checkpoints will not fit: ``latest/`` twice (the new one is
        written before the old one goes), ``best/`` twice, and the exported weights, less what the run
        directory already holds of them."""
        weights, latest = self.checkpoint_bytes()
        need = (2 * latest + (2 * weights if self.cfg.best_metric else 0) + weights
                + (2 * weights if self.cfg.ema_decay else 0))
        for sub in ("latest", "best", "model", "pretrained", "ema"):
            d = self.run_dir / sub
            if d.is_dir():
                need -= sum(f.stat().st_size for f in d.iterdir() if f.is_file())
        check_free_space(self.run_dir, need, f"the checkpoints ({format_bytes(latest)} for latest/, written "
                                             "twice during a save, plus best/ and the exported weights)")

    def _resume(self) -> bool:
        """Load ``RUN/latest`` if there is one; returns whether it did."""
        path = self.run_dir / "latest"
        if self.dist.is_main:
            find_checkpoint(path)  # repairs a swap interrupted by a crash
        D.barrier()
        found = find_checkpoint(path, repair=False)
        if found is None:
            if self.dist.is_main:
                warnings.warn(f"resume: no checkpoint in {self.run_dir}; starting from step 0", stacklevel=3)
            return False
        try:
            ckpt = load_checkpoint(found)
        except CheckpointError as exc:
            raise CheckpointError(message=f"cannot resume {self.run_dir}: {exc}") from None
        state = ckpt.trainer
        if state is None:
            raise CheckpointError(message=f"cannot resume {self.run_dir}: {found} has no {TRAINER_FILE} "
                                          "(a weights-only checkpoint cannot be resumed)")
        self.step = int(state["step"])
        self._warn_if_trajectory_changed(state.get("config") or {})
        try:  # another architecture than the checkpoint's: one line naming what differs
            load_state_dict_strict(self.model, ckpt.model, found)
        except CheckpointError as exc:
            raise CheckpointError(message=f"cannot resume {self.run_dir}: {exc}") from None
        self._load_loss_terms_state(ckpt.loss_terms)
        self.optimizer.load_state_dict(state["optimizer"])
        self._apply_optim_config()
        self.scaler.load_state_dict(state["scaler"])
        self.best = state["best"]
        if self.ema is not None:
            if state.get("ema") is None:
                raise CheckpointError(message=f"cannot resume {self.run_dir} with ema_decay > 0: its checkpoint "
                                              "has no weight average (the run was started without one)")
            self.ema.load_state_dict(state["ema"])
        self.last_val = dict(ckpt.meta.get("metrics") or {})
        rank_states = state["rank_states"]
        if len(rank_states) == self.dist.world_size:
            mine = rank_states[self.dist.rank]
            restore_rng_state(mine["rng"])
        else:
            warnings.warn(
                f"resume: checkpoint was written by {len(rank_states)} processes, now {self.dist.world_size}; "
                "random streams are re-seeded, so the run will not repeat exactly", stacklevel=3
            )
            mine = rank_states[0]
            D.seed_everything(self.cfg.seed + self.step, self.dist.rank)
        if mine["task"] is not None and hasattr(self.task, "load_state_dict"):
            self.task.load_state_dict(mine["task"])
        return True

    def _make_scheduler(self, last_epoch: int = -1) -> torch.optim.lr_scheduler.LambdaLR:
        o = self.cfg.optim
        schedule = WarmupDecay(o.warmup_steps, self.cfg.max_steps, o.schedule, o.min_lr_ratio)
        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule, last_epoch=last_epoch)

    def _apply_optim_config(self) -> None:
        """After loading a checkpoint, the optimizer keeps its moments but its hyperparameters and the
        learning-rate schedule come from the current config (unchanged config: the very same values)."""
        o = self.cfg.optim
        # the groups are the ones param_groups() made: decayed first, then not decayed
        for group, weight_decay in zip(self.optimizer.param_groups, (o.weight_decay, 0.0)):
            group.update(initial_lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=weight_decay)
        self.scheduler = self._make_scheduler(last_epoch=self.step - 1)

    # settings that change what a resumed run computes (the rest, e.g. logging, may change freely)
    _TRAJECTORY_KEYS = ("max_steps", "grad_accum_steps", "seed", "precision", "optim")

    def _warn_if_trajectory_changed(self, saved: Mapping[str, Any]) -> None:
        now = dataclasses.asdict(self.cfg)
        changed = [k for k in self._TRAJECTORY_KEYS if k in saved and saved[k] != now[k]]
        if changed and self.dist.is_main:
            warnings.warn(
                f"resume: {', '.join(changed)} differ from the checkpoint's config; the new values apply "
                f"from step {self.step} on (the learning-rate schedule is recomputed from the new config)",
                stacklevel=4,
            )

    def close(self, release_lock: bool = True) -> None:
        """Close the log, let go of the DDP wrapper and (``release_lock``) of ``RUN/.lock``; keep the
        lock while the caller still writes the run directory (exported weights, metrics), then call
        :meth:`release_lock`.

        The wrapper's reducer holds the process group and its last asynchronous work; left to the
        interpreter's exit, Gloo's threads may free them after Python is gone and abort the process
        (``terminate called without an active exception``).  The process group itself belongs to
        the entry point (:func:`minivln.training.distributed.cleanup`).
        """
        self.logger.close()
        if self._train_module is not self._step_module:
            self._train_module = self._step_module
            gc.collect()
        if release_lock:
            self.release_lock()

