"""What the latency benchmarks share: the models to time (presets and checkpoints, on each backend),
the machine and code they ran on.

A model is a preset (random weights: latency does not depend on the values) or a checkpoint given as
``NAME=PATH`` (whatever ``minivln navigate --checkpoint`` takes: a run's ``model/``, a fine-tuning run
directory, an export directory of ``minivln export``, a DUET checkpoint).  Each model runs on every
requested backend: ``torch`` (eager), ``onnxruntime`` / ``onnxruntime-int8`` (the network exported to
a temporary directory, or the graphs of an export directory as they are).
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from minivln.deploy.backends import ONNX_VARIANTS
from minivln.deploy.export import export_model, require_onnx
from minivln.deploy.runtime import OnnxRuntimeDUET, is_export_dir
from minivln.model.checkpoint import load_agent_model
from minivln.model.duet import DUET
from minivln.model.registry import create_model, get_preset
from minivln.paths import DataError

BACKEND_NAMES = ("torch", "onnxruntime", "onnxruntime-int8")
_NAME = re.compile(r"[A-Za-z0-9_.+-]+")


# ----------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelSpec:
    """A model to time: a preset (``checkpoint`` None, random weights) or a named checkpoint."""

    name: str
    checkpoint: Path | None = None

    @property
    def weights(self) -> str:
        return "random" if self.checkpoint is None else "trained"

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "weights": self.weights,
                "checkpoint": str(self.checkpoint) if self.checkpoint is not None else None}


def parse_checkpoints(values: Sequence[str]) -> list[ModelSpec]:
    """``NAME=PATH`` arguments as :class:`ModelSpec`; a :class:`DataError` (one line) when one is
    malformed, a name repeats, or a path does not exist."""
    specs: list[ModelSpec] = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise DataError(f"--checkpoint takes NAME=PATH (e.g. student=RUN/model), got {value!r}")
        if not _NAME.fullmatch(name):
            raise DataError(f"--checkpoint {value!r}: NAME may hold letters, digits and . _ + - only")
        if not Path(path).exists():
            raise DataError(f"--checkpoint {name}: {path} does not exist")
        specs.append(ModelSpec(name, Path(path)))
    return specs


def model_specs(presets: Sequence[str], checkpoints: Sequence[str], *, registered: bool = True) -> list[ModelSpec]:
    """The presets (checked against the registry unless ``registered`` is False: a factory of
    :func:`load_models` builds them) then the checkpoints; names must be distinct."""
    specs = []
    for name in presets:
        if registered:
            get_preset(name)  # UnknownPresetError (a ConfigError) for an unknown name
        specs.append(ModelSpec(name))
    specs += parse_checkpoints(checkpoints)
    seen: set[str] = set()
    for s in specs:
        if s.name in seen:
            raise DataError(f"model name {s.name!r} given twice (presets and --checkpoint names must differ)")
        seen.add(s.name)
    return specs


def check_backends(backends: Sequence[str]) -> list[str]:
    """The backends, deduplicated in order; ONNX Runtime ones need the deploy extra."""
    backends = list(dict.fromkeys(backends)) or ["torch"]
    unknown = [b for b in backends if b not in BACKEND_NAMES]
    if unknown:
        raise DataError(f"unknown backend {unknown[0]!r}; available: {', '.join(BACKEND_NAMES)}")
    if any(b != "torch" for b in backends):
        require_onnx()
    return backends


@dataclass
class LoadedModel:
    """One row of a benchmark: a model on a backend."""

    spec: ModelSpec
    backend: str
    runtime: Any  # drives like a DUET: model(mode, batch), precompute_text_kv, config
    network: DUET  # the torch network behind it (FLOP counts, its config)

    @property
    def label(self) -> str:
        return row_label(self.spec.name, self.backend)


def row_label(name: str, backend: str) -> str:
    """A row's label: the model's name (torch) or ``NAME:BACKEND``."""
    return name if backend == "torch" else f"{name}:{backend}"


def check_skip(specs: Sequence[ModelSpec], backends: Sequence[str], skip: Sequence[str]) -> set[str]:
    """``skip`` (row labels not to time) checked against the rows; at least one row must remain."""
    labels = [row_label(s.name, b) for s in specs for b in backends]
    unknown = [x for x in skip if x not in labels]
    if unknown:
        raise DataError(f"--skip {unknown[0]!r} is not a row of this benchmark (rows: {', '.join(labels)})")
    if set(labels) <= set(skip):
        raise DataError("--skip leaves no row to time")
    return set(skip)


def load_models(specs: Sequence[ModelSpec], backends: Sequence[str], stack: ExitStack, *, threads: int = 0,
                factory: Callable[[str], DUET] | None = None, skip: Sequence[str] = (),
                log: Callable[[str], None] | None = None) -> list[LoadedModel]:
    """Every (model, backend) pair whose label is not in ``skip``, in spec-major order.  Presets are
    built by ``factory`` (default :func:`create_model`, random weights; seed the generator first),
    checkpoints loaded with :func:`load_agent_model`; ONNX rows export the network into a temporary
    directory that ``stack`` removes (an export directory's own graphs are used as they are)."""
    say = log or (lambda msg: None)
    factory = factory or create_model
    skipped = check_skip(specs, backends, skip)
    out: list[LoadedModel] = []
    for spec in specs:
        mine = [b for b in backends if row_label(spec.name, b) not in skipped]
        if not mine:
            continue
        onnx = [b for b in mine if b != "torch"]
        network = (factory(spec.name) if spec.checkpoint is None else load_agent_model(spec.checkpoint)).eval()
        runtimes: dict[str, Any] = {"torch": network}
        if onnx:
            if spec.checkpoint is not None and is_export_dir(spec.checkpoint):
                export_dir = spec.checkpoint
            else:
                say(f"exporting {spec.name} to ONNX")
                export_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="minivln-bench-")))
                export_model(network, export_dir, source=str(spec.checkpoint or spec.name),
                             int8="onnxruntime-int8" in onnx, check=False)
            for b in onnx:
                runtimes[b] = OnnxRuntimeDUET(export_dir, ONNX_VARIANTS[b], threads=threads)
        out += [LoadedModel(spec, b, runtimes[b], network) for b in mine]
    return out


# ------------------------------------------------------------------------------------- FLOPs


def flop_counter() -> FlopCounterMode:
    """A :class:`FlopCounterMode` that counts matrix products and attention (element-wise ops are not
    counted), the oneDNN linear of wide layers included."""
    mapping = {}
    if hasattr(torch.ops.mkldnn, "_linear_pointwise"):  # the oneDNN path of wide layers
        mapping[torch.ops.mkldnn._linear_pointwise] = _onednn_linear_flops
    return FlopCounterMode(display=False, custom_mapping=mapping)


def _onednn_linear_flops(x_shape, w_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
    """2 * rows * in * out for ``mkldnn::_linear_pointwise`` (weight (out, in))."""
    return 2 * math.prod(x_shape[:-1]) * x_shape[-1] * w_shape[0]


# ------------------------------------------------------------------------------ machine, code


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
        "avx512_vnni": "avx512_vnni" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
    }


def loadavg() -> float | None:
    """The 1-minute load average (above the thread count: other jobs were running)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def onnxruntime_version(backends: Sequence[str]) -> dict[str, str]:
    if all(b == "torch" for b in backends):
        return {}
    import onnxruntime

    return {"onnxruntime": onnxruntime.__version__}


def code_version() -> dict[str, Any]:
    """The git commit of the code that ran (``dirty``: tracked files were modified), or None
    outside a git checkout."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def machine_info(threads: int, backends: Sequence[str]) -> dict[str, Any]:
    return {**cpu_info(), "threads": threads, "torch": torch.__version__, **onnxruntime_version(backends),
            "python": platform.python_version()}


def read_json_input(path: str | Path, what: str, expected: str) -> Any:
    """The JSON in ``path``; one :class:`DataError` line when it is missing (naming the ``expected``
    kind of file) or not valid JSON.  ``what`` prefixes the path in the message (e.g. ``"score file "``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what}{path} does not exist ({expected})")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{what}{path} is not valid JSON ({exc})") from None


def read_bench_report(path: str | Path) -> dict[str, Any]:
    """A ``bench model`` report (JSON with ``results`` rows); a :class:`DataError` otherwise."""
    path = Path(path)
    report = read_json_input(path, "", "a JSON report of `minivln bench model --json`")
    if not isinstance(report, dict) or not isinstance(report.get("results"), list) or not all(
            isinstance(r, dict) and "label" in r and "batch_size" in r and "episode_ms" in r
            for r in report["results"]):
        raise DataError(f"{path} is not a `minivln bench model` report (no results rows with label, "
                        "batch_size, episode_ms)")
    return report
