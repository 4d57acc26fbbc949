"""``minivln experiment RECIPE --out DIR``: a table of the paper as one resumable command.

A *recipe* (YAML, ``configs/experiments/``) names

* **runs**: ``minivln pretrain`` / ``minivln finetune`` calls (a base config plus overrides), where a
  fine-tuning run may start from another run's exported weights (``init: RUN``) and either stage may
  have a frozen ``teacher``;
* **rows**: what the table reports, each the *last* checkpoint of a fine-tuning run (no selection on
  the reported split), a given checkpoint (the teacher), or the seeded random walker; every row is
  scored on the **whole** split.

The runner executes every run and every scoring as a separate process, up to ``--jobs`` at a time
(one torch thread each), in dependency order, from a **pinned checkout**: the first call records the
commit (``--commit``, default ``HEAD``; the working tree must be clean) in ``DIR/pin.json`` and makes
a git worktree of it at ``DIR/code``; later calls use the same code, so commits landing meanwhile
never mix versions inside a table.  Before any job starts, :func:`preflight` checks that every input
of the pending runs and rows exists and fits (one line per problem, exit 2).  It resumes: a finished
run or scoring is skipped (``DIR/done/``), an interrupted run continues from its last checkpoint
(``--resume``), so a grid can span sittings.  Several recipes may share one ``DIR``: a run of the same name and the same spec is reused (Tables
IV and V reuse Table III's two-stage row); the same name with another spec is an error.

When every row is scored, each row's submission is gzipped into the recipe's ``submissions`` folder
and the table is written to ``results`` (JSON; the layout of ``docs/results/r2r_table3.json``), with
the metrics re-scored from the gzipped file itself (``minivln eval --preds FILE.json.gz`` gives the
same numbers) and the standard error of each rate over episodes.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import functools
import gzip
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import yaml

from minivln.config import (
    CONFIG_DIR,
    RUN_CONFIG,
    ConfigError,
    config_changes,
    load_config,
    read_yaml,
    resolve_config,
    to_dict,
)
from minivln.data.datasets import load_episodes
from minivln.data.graph import Graphs
from minivln.data.reverie import ReverieGoals, with_name_overlap_objects
from minivln.distill.compat import check_teacher
from minivln.env.env import NavBatchEnv, random_walker_submission
from minivln.evaluation.evaluator import Evaluator, SubmissionError, load_submission
from minivln.evaluation.stats import (
    SEED_ROW,
    arm_summary,
    arms,
    compare_over_seeds,
    gap_over_episodes,
    mean_se,
)
from minivln.features.hdf5 import FeatureStore, ObjectFeatureStore
from minivln.model.checkpoint import read_agent_config, stored_shapes
from minivln.model.config import DUETConfig
from minivln.model.duet import DUET
from minivln.model.registry import get_config
from minivln.paths import (
    DataError,
    atomic_write_bytes,
    atomic_write_text,
    check_free_space,
    check_writable_dir,
    format_bytes,
    json_text,
    resolve_data_dir,
)
from minivln.training.checkpoint import (
    RunLock,
    RunLockedError,
    lock_holder,
    process_alive,
    process_start,
)
from minivln.training.finetune import FinetuneConfig
from minivln.training.logging import read_jsonl
from minivln.training.plot import new_figure, require_matplotlib, save_png
from minivln.training.pretrain import PretrainConfig, resolve_mix, stage1_weights

COMMANDS = ("pretrain", "finetune")
PATH_KEYS = ("teacher", "features", "objects", "data_dir", "init_checkpoint", "init")
"""Override keys holding paths: made absolute (from the repository root) before a run starts."""
LIST_PATH_KEYS = ("train_files", "aug_files", "val_files", "connectivity_dirs")
"""Override keys holding lists of paths (``val_files``: a mapping of name -> list), made absolute too
and checked by the pre-flight (DUET's / ScaleVLN's annotation files, more connectivity folders)."""
INPUT_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass
class RunSpec:
    """One training run of a recipe."""

    command: str = "finetune"  # "pretrain" or "finetune"
    config: str = ""  # base YAML, relative to the (pinned) repository root
    init: str = ""  # another run of the recipe whose exported weights this one starts from
    teacher_run: str = ""  # another run of the recipe whose exported weights are this run's frozen teacher
    overrides: dict[str, Any] = field(default_factory=dict)  # key=value overrides (nested keys with dots)


@dataclass
class RowSpec:
    """One row of the table."""

    name: str = ""
    run: str = ""  # a fine-tuning run: its last checkpoint (RUN/model)
    weights: str = "model"  # with run: "model" (the exported weights) or "model-ema" (the run's weight
    #                        average at its last step; the run needs train.ema_decay > 0), or "undecided"
    #                        (a pre-registered choice not made yet: the run trains, nothing is scored)
    checkpoint: str = ""  # or a given checkpoint (e.g. the teacher)
    random: bool = False  # or the seeded random walker
    stage1: bool = False  # labels of the row (what the runs did)
    stage2: bool = False
    picker: str = ""  # REVERIE: "name-overlap" replaces the agent's object choices by the training-free
    #                   word match at the same final viewpoints (a reference row; see
    #                   minivln.data.reverie.name_overlap_pick); "" keeps the agent's own
    note: str = ""


PICKERS = ("", "name-overlap")


@dataclass
class ComparisonSpec:
    """A group of pre-registered comparisons, computed when the table is written
    (:mod:`minivln.evaluation.stats`)."""

    name: str = ""
    over: str = "seeds"  # "seeds": arms (rows "ARM, seed S"), paired by seed, two-sided t-tests Holm-corrected
    #                      across the group; "episodes": two rows (an arm: each of its seeds) paired over
    #                      the instructions, the difference in paired standard errors
    pairs: list[list[str]] = field(default_factory=list)  # [A, B]: A - B
    metrics: list[str] = field(default_factory=lambda: ["sr"])
    alpha: float = 0.0  # over seeds: > 0 gives each test a verdict at this (Holm-corrected) threshold


@dataclass
class GateSpec:
    """Runs held until a pre-registered check passes (e.g. the stage-2 runs wait until the teacher is
    ahead of the student trained alone): each held run waits for the scorings of ``rows``; then the gaps
    of the over-episodes comparison ``comparison`` between those rows are read, and the runs start only
    if every gap is at least ``min_se`` paired standard errors in every metric.  Otherwise they (and what
    needs them) are held: not started, not failed, reported."""

    name: str = ""
    runs: list[str] = field(default_factory=list)  # run names held (fnmatch patterns: "rev-ft-s2-*")
    rows: list[str] = field(default_factory=list)  # the rows scored before the check is read
    comparison: str = ""  # a comparison group of the recipe with over: episodes
    min_se: float = 3.0


@dataclass
class SummarySpec:
    """A summary table of the rows (e.g. the paper's Table II): each entry an arm (its mean and standard
    error over seeds) or a row, with its share of the reference row per metric."""

    results: str = ""  # its JSON, relative to the repository root ("" = none)
    table: str = ""  # its title
    entries: list[str] = field(default_factory=list)  # arms or row names, in order
    reference: str = ""  # a row name (e.g. the teacher)
    metrics: list[str] = field(default_factory=lambda: ["sr", "spl"])


@dataclass
class Recipe:
    """A table: runs, rows, where its results land."""

    name: str = ""
    table: str = ""  # the table's title
    task: str = "r2r"
    split: str = "val_unseen"
    results: str = ""  # the table's JSON, relative to the repository root
    plots: str = ""  # prefix of the table's pictures (PREFIX_bars.png, PREFIX_curves.png), relative to the root
    submissions: str = ""  # folder for the rows' gzipped submissions, relative to the repository root
    data_dir: str = ""  # "" = $MINIVLN_DATA
    inputs: dict[str, str] = field(default_factory=dict)  # named input paths (a teacher, a release folder),
    #   written ${NAME} in data_dir, features, objects, the runs' overrides and the rows' checkpoints;
    #   given on the command line as inputs.NAME=PATH (see expand_inputs)
    features: str = ""  # view features (HDF5); required
    objects: str = ""  # REVERIE object features
    threads: int = 1  # torch threads per process
    score_batch_size: int = 30
    random_seed: int = 0
    random_stop_prob: float = 1.0 / 6.0
    max_action_len: int = 15
    include: list[str] = field(default_factory=list)  # recipes whose runs this one reuses
    order: str = "teacher-first"  # which runs start first: "teacher-first" (the runs with a teacher, the
    #                               slowest, and what they need) or "listed" (the recipe's own order,
    #                               after the included recipes' runs; each run after what it needs)
    runs: dict[str, RunSpec] = field(default_factory=dict)
    rows: list[RowSpec] = field(default_factory=list)
    comparisons: list[ComparisonSpec] = field(default_factory=list)  # written into the table's JSON
    summary: SummarySpec = field(default_factory=SummarySpec)
    gates: list[GateSpec] = field(default_factory=list)  # runs that start only once a check passes


# ------------------------------------------------------------------------------------------ recipe


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def find_recipe(name: str) -> Path:
    """A recipe by path, or by name from the shipped ``configs/experiments/``."""
    try:
        return resolve_config(name, "experiments")
    except ConfigError:
        known = sorted(q.stem for q in (CONFIG_DIR / "experiments").glob("*.yaml"))
        raise ConfigError(f"recipe {name!r} not found (a YAML path, or one of: {', '.join(known)})") from None


def load_recipe(name: str, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe and the runs of the recipes it includes (same-named runs must be equal)."""
    path = find_recipe(name)
    recipe = load_config(Recipe, path, overrides)
    runs: dict[str, RunSpec] = {}
    for inc in recipe.include:
        inc_path = (path.parent / inc) if not Path(inc).is_absolute() else Path(inc)
        for run_name, spec in load_recipe(str(inc_path)).runs.items():
            runs[run_name] = spec
    for run_name, spec in recipe.runs.items():
        if run_name in runs and to_dict(runs[run_name]) != to_dict(spec):
            raise ConfigError(f"{path}: run {run_name!r} differs from the included recipe's run of that name")
        runs[run_name] = spec
    recipe.runs = runs
    expand_inputs(recipe, path)
    check_recipe(recipe, path)
    return recipe


def _resolve_inputs(inputs: dict[str, str], path: Path) -> dict[str, str | None]:
    """The recipe's inputs with the ``${NAME}`` of other inputs in them replaced (a default such as
    ``${datasets}/R2R/...``) and ``~`` expanded; None for an input that is empty or uses an empty one."""
    resolved: dict[str, str | None] = {}

    def get(name: str, seen: tuple[str, ...]) -> str | None:
        if name in seen:
            raise ConfigError(f"{path}: inputs refer to each other in a circle ({' -> '.join((*seen, name))})")
        if name not in resolved:
            unset = not inputs[name]

            def sub(m: re.Match) -> str:
                nonlocal unset
                ref = m.group(1)
                if ref not in inputs:
                    raise ConfigError(f"{path}: inputs.{name}: ${{{ref}}} names no input of the recipe "
                                      f"(inputs: {', '.join(inputs)})")
                value = get(ref, (*seen, name))
                unset = unset or value is None
                return value or ""
            text = INPUT_REF.sub(sub, inputs[name])
            resolved[name] = None if unset else os.path.expanduser(text)
        return resolved[name]

    for name in inputs:
        get(name, ())
    return resolved


def _expand(value: Any, inputs: dict[str, str | None], where: str, unset: set[str]) -> Any:
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            name = m.group(1)
            if name not in inputs:
                raise ConfigError(f"{where}: ${{{name}}} names no input of the recipe "
                                  f"(inputs: {', '.join(inputs) or 'none'})")
            if inputs[name] is None:
                unset.add(name)
            return inputs[name] or ""
        return INPUT_REF.sub(sub, value)
    if isinstance(value, list):
        return [_expand(v, inputs, where, unset) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v, inputs, f"{where}.{k}", unset) for k, v in value.items()}
    return value


def expand_inputs(recipe: Recipe, path: Path) -> None:
    """Replace every ``${NAME}`` of the recipe (``data_dir``, ``features``, ``objects``, the runs'
    overrides, the rows' checkpoints) by ``inputs.NAME`` (itself possibly made of other inputs, ``~``
    expanded).  A name that is not an input, or an input used but left empty, is one
    :class:`ConfigError` (the empty ones listed with the ``inputs.NAME=PATH`` to give)."""
    inputs = _resolve_inputs(recipe.inputs, path)
    unset: set[str] = set()
    for key in ("data_dir", "features", "objects"):
        setattr(recipe, key, _expand(getattr(recipe, key), inputs, key, unset))
    for name, spec in recipe.runs.items():
        spec.overrides = _expand(spec.overrides, inputs, f"runs.{name}.overrides", unset)
    for row in recipe.rows:
        row.checkpoint = _expand(row.checkpoint, inputs, f"row {row.name!r}", unset)
    if unset:
        # the empty inputs to give, not those made of them (e.g. datasets, not ${datasets}/R2R/...)
        empty = sorted(n for n, v in recipe.inputs.items()
                       if not v and (n in unset or any(f"${{{n}}}" in recipe.inputs[u] for u in unset))) or sorted(unset)
        raise ConfigError(f"{path}: the recipe needs its inputs {', '.join(empty)}: give "
                          + " ".join(f"inputs.{n}=PATH" for n in empty))


def check_recipe(recipe: Recipe, path: Path) -> None:
    if recipe.order not in ("teacher-first", "listed"):
        raise ConfigError(f"{path}: order must be 'teacher-first' or 'listed', got {recipe.order!r}")
    for c in recipe.comparisons:
        if c.over not in ("seeds", "episodes") or not c.pairs or any(len(p) != 2 for p in c.pairs):
            raise ConfigError(f"{path}: comparison {c.name!r}: over must be 'seeds' or 'episodes' and pairs a "
                              f"list of [A, B]; got over={c.over!r}, pairs={c.pairs!r}")
    for run_name, spec in recipe.runs.items():
        if spec.command not in COMMANDS:
            raise ConfigError(f"{path}: run {run_name}: command must be one of {COMMANDS}, got {spec.command!r}")
        if spec.init and spec.init not in recipe.runs:
            raise ConfigError(f"{path}: run {run_name}: init names no run of the recipe ({spec.init!r})")
        if spec.teacher_run and spec.teacher_run not in recipe.runs:
            raise ConfigError(f"{path}: run {run_name}: teacher_run names no run of the recipe ({spec.teacher_run!r})")
        if spec.teacher_run and "teacher" in spec.overrides:
            raise ConfigError(f"{path}: run {run_name}: give teacher_run or overrides.teacher, not both")
    names = [r.name for r in recipe.rows]
    if len(set(names)) != len(names) or not all(names):
        raise ConfigError(f"{path}: every row needs a unique name")
    groups = {c.name: c for c in recipe.comparisons}
    for g in recipe.gates:
        where = f"{path}: gate {g.name!r}"
        if g.comparison not in groups or groups[g.comparison].over != "episodes":
            raise ConfigError(f"{where}: comparison must name a comparison over episodes of the recipe "
                              f"(got {g.comparison!r})")
        unknown = [r for r in g.rows if r not in names]
        if not g.rows or unknown or any(not recipe.rows[names.index(r)].run or
                                        recipe.rows[names.index(r)].weights == "undecided" for r in g.rows):
            raise ConfigError(f"{where}: rows must list rows of the recipe that score a run with decided "
                              f"weights (unknown: {unknown or '-'})")
        if not g.runs or any(not fnmatch.filter(recipe.runs, pat) for pat in g.runs):
            raise ConfigError(f"{where}: every pattern of runs must match a run of the recipe (got {g.runs!r})")
        if not g.min_se > 0:
            raise ConfigError(f"{where}: min_se must be positive, got {g.min_se!r}")
    for row in recipe.rows:
        sources = [bool(row.run), bool(row.checkpoint), row.random]
        if sum(sources) != 1:
            raise ConfigError(f"{path}: row {row.name!r} needs exactly one of run, checkpoint, random")
        if row.run and (row.run not in recipe.runs or recipe.runs[row.run].command != "finetune"):
            raise ConfigError(f"{path}: row {row.name!r}: run {row.run!r} is not a fine-tuning run of the recipe")
        if row.weights not in ("model", "model-ema", "undecided") or (row.weights != "model" and not row.run):
            raise ConfigError(f"{path}: row {row.name!r}: weights must be 'model', 'model-ema' or 'undecided' "
                              f"(the last two of a run), got {row.weights!r}")
        if row.picker not in PICKERS or (row.picker and (recipe.task != "reverie" or row.random)):
            raise ConfigError(f"{path}: row {row.name!r}: picker must be '' or 'name-overlap', the latter on a "
                              f"REVERIE run or checkpoint row; got {row.picker!r} (task {recipe.task})")


def slug(name: str) -> str:
    """A file-name form of a row name: ``"fuse + txt"`` -> ``"fuse-txt"``, ``"KDWeight 0.01"`` -> ``"kdweight-0.01"``."""
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-.")


def row_weights(row: RowSpec, out: Path, root: Path) -> Path:
    """The weights a (non-random) row scores: its run's ``model`` / ``model-ema`` in the experiment
    directory ``out``, or its checkpoint (relative to the repository ``root``)."""
    return out / "runs" / row.run / row.weights if row.run else Path(_abs(row.checkpoint, root))


def score_key(row: RowSpec, split: str = "val_unseen") -> str:
    """What a row scores, and on which split, so that rows of several tables scoring the same weights on
    the same split share one scoring (job ``score:KEY``, ``OUT/scores/KEY/``).  Another split than
    val_unseen is part of the key (``RUN@val_seen``): a table's val_seen scoring is not its val_unseen
    one; val_unseen keys carry no suffix, as in experiment directories made before splits were told apart."""
    if row.weights == "undecided":
        raise ConfigError(f"row {row.name!r}: its weights are undecided, so there is nothing to score yet")
    if row.run:
        key = row.run if row.weights == "model" else f"{row.run}-ema"
    else:
        key = "ckpt-" + slug(row.checkpoint.rstrip("/").rsplit("/", 1)[-1])
    return key if split == "val_unseen" else f"{key}@{split}"


#: RunSpec fields added after runs were made: left out of the hash at their default, so that the
#: runs of an existing experiment directory keep their identity
_LATER_FIELDS = {"teacher_run": ""}


def spec_hash(spec: RunSpec, deps: dict[str, str]) -> str:
    """What makes a run what it is: its spec and the specs of the runs it starts from or learns from."""
    fields = {k: v for k, v in to_dict(spec).items() if not (k in _LATER_FIELDS and v == _LATER_FIELDS[k])}
    blob = json.dumps({"spec": fields, "deps": deps}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{what} {path} is truncated or corrupt (not valid JSON: {exc})") from None


# ------------------------------------------------------------------------------------------ pinning


def _git(*args: str, cwd: Path) -> str:
    out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if out.returncode != 0:
        raise DataError(f"git {' '.join(args)} failed in {cwd}: {out.stderr.strip()}")
    return out.stdout.strip()


def link_shared(out: Path, root: Path) -> None:
    """Make ``../shared`` from the pinned checkout ``out/code`` (the jobs' working directory) the
    repository's own ``../shared``: recipes and configs name the shared teachers and data that way.
    Nothing is done where the repository has no ``../shared`` or ``out/shared`` exists already."""
    shared, link = root.parent / "shared", out / "shared"
    if shared.is_dir() and not link.exists() and not link.is_symlink():
        link.symlink_to(shared.resolve(), target_is_directory=True)


def pin_checkout(out: Path, commit: str | None, root: Path | None = None) -> tuple[str, Path]:
    """The commit and worktree of ``out`` (made on the first call, from the repository ``root``),
    with the repository's ``../shared`` beside it (:func:`link_shared`).  Two drivers started at once
    on a new ``out`` pin it once: the second waits for the first's pin and uses it."""
    root = root or repo_root()
    pin_file, code = out / "pin.json", out / "code"
    if not pin_file.exists():
        sha = _git("rev-parse", commit or "HEAD", cwd=root)
        if not commit and _git("status", "--porcelain", "--untracked-files=no", cwd=root):
            raise ConfigError("the working tree has uncommitted changes: commit them (the runs execute the "
                              "pinned commit, not the working tree) or pass --commit REF")
        lock = _wait_for_lock(out / "claims" / "pin", "pinning the code")
        try:
            if not pin_file.exists():
                link_shared(out, root)
                _git("worktree", "add", "--force", "--detach", str(code), sha, cwd=root)
                atomic_write_text(pin_file, json.dumps({"commit": sha,
                                                        "pinned_at": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
                return sha, code
        finally:
            lock.release()
    link_shared(out, root)
    pinned = _read_json(pin_file, "the pin file").get("commit", "")
    if commit and _git("rev-parse", commit, cwd=root) != pinned:
        raise ConfigError(f"{out} is pinned to {pinned[:12]}; use another --out for {commit}")
    if not code.is_dir():
        _git("worktree", "prune", cwd=root)
        _git("worktree", "add", "--force", "--detach", str(code), pinned, cwd=root)
    return pinned, code


def _wait_for_lock(d: Path, what: str, timeout_s: float = 600.0) -> RunLock:
    """The lock of ``d``, waiting while another driver holds it (a ConfigError after ``timeout_s``)."""
    deadline = time.time() + timeout_s
    while (lock := _try_lock(d)) is None:
        if time.time() > deadline:
            raise ConfigError(f"another driver has been {what} in {d.parent.parent} for {timeout_s:.0f} s "
                              f"({lock_holder(d) or '?'}); try again when it has finished")
        time.sleep(0.5)
    return lock


# ------------------------------------------------------------------------------------------ jobs


@dataclass
class Job:
    name: str  # "train:RUN" or "score:ROW"
    deps: list[str]
    argv: list[str]
    run_dir: Path | None = None  # a training run (resumable)
    spec: str = ""  # spec hash, recorded when done
    # a training run's config as the command gets it: the recipe's base config (relative to the repo)
    # and the KEY=VALUE overrides after it
    config: str = ""
    overrides: list[str] = field(default_factory=list)
    # a training run's exported weights (RUN/model or RUN/pretrained) and those it starts from (its init's)
    weights: Path | None = None
    init: Path | None = None


def _abs(value: Any, base: Path) -> Any:
    if isinstance(value, str) and value and value not in ("toy", "synthetic") and not Path(value).is_absolute():
        return str((base / value).resolve())
    return value


def _abs_paths(key: str, value: Any, base: Path) -> Any:
    """An override's value with its paths made absolute (:data:`PATH_KEYS`, :data:`LIST_PATH_KEYS`;
    ``val_files.NAME`` as the flattened overrides give it)."""
    if key in PATH_KEYS:
        return _abs(value, base)
    if key.split(".")[0] in LIST_PATH_KEYS and isinstance(value, list):
        return [_abs(v, base) for v in value]
    return value


def listed_paths(cfg: Any) -> list[tuple[str, str]]:
    """``(key, path)`` for every path of a run config's :data:`LIST_PATH_KEYS` (those it has)."""
    found = []
    for key in LIST_PATH_KEYS:
        value = getattr(cfg, key, None) or []
        groups = value.items() if isinstance(value, dict) else [(None, value)]
        for name, paths in groups:
            found.extend((key if name is None else f"{key}.{name}", p) for p in paths)
    return found


def _override_items(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key != "model_overrides":
            items.extend(_override_items(v, key + "."))
        else:
            items.append((key, v))
    return items


def _fmt(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (dict, list, bool)) or v is None else str(v)


def plan(recipe: Recipe, out: Path, code: Path, launcher: list[str] | None = None) -> list[Job]:
    """Every job of the recipe, in an order that respects dependencies.  ``launcher``: what starts the
    training runs instead of this Python (e.g. ``["torchrun", "--standalone", "--nproc_per_node", "4"]``:
    each run on 4 GPUs, ``-m minivln.cli ...`` after it); scorings run in one process either way."""
    root = repo_root()
    py = [sys.executable, "-m", "minivln.cli"]
    train_py = [*launcher, "-m", "minivln.cli"] if launcher else py
    jobs: list[Job] = []
    hashes: dict[str, str] = {}

    def upstream(name: str) -> list[str]:
        spec = recipe.runs[name]
        return [r for r in (spec.init, spec.teacher_run) if r]

    def run_hash(name: str) -> str:
        if name not in hashes:
            hashes[name] = spec_hash(recipe.runs[name], {r: run_hash(r) for r in upstream(name)})
        return hashes[name]

    needed = {r.run for r in recipe.rows if r.run}
    stack = list(needed)
    while stack:  # the runs the rows need, and the runs those start from or learn from
        for up in upstream(stack.pop()):
            if up not in needed:
                needed.add(up)
                stack.append(up)
    order: list[str] = []

    def visit(name: str, seen: tuple[str, ...] = ()) -> None:
        if name in seen:
            raise ConfigError(f"recipe {recipe.name}: runs depend on each other in a circle ({' -> '.join(seen)})")
        if name in order:
            return
        for up in upstream(name):
            visit(up, (*seen, name))
        order.append(name)

    def with_teacher(name: str) -> bool:
        return "teacher" in recipe.runs[name].overrides or bool(recipe.runs[name].teacher_run)

    if recipe.order == "listed":
        first = [n for n in recipe.runs if n in needed]
    else:  # runs with a teacher are the slowest: start them (and what they need) first
        first = sorted(needed, key=lambda n: (not with_teacher(n), n))
    for name in first:
        visit(name)
    for name in order:
        spec = recipe.runs[name]
        run_dir = out / "runs" / name
        items = dict(_override_items(spec.overrides))
        for key in ("data_dir", "features", "objects"):
            if getattr(recipe, key) and key not in items:
                items[key] = getattr(recipe, key)
        items.setdefault("num_threads", recipe.threads)
        if spec.init:
            items["init_checkpoint"] = str(_init_weights(recipe, out, spec.init))
        if spec.teacher_run:
            items["teacher"] = str(_init_weights(recipe, out, spec.teacher_run))
        items = {k: _abs_paths(k, v, root) for k, v in items.items()}
        argv = [*train_py, spec.command, "--out", str(run_dir)]
        if spec.config:
            argv += ["--config", str(code / spec.config)]
        overrides = [f"{k}={_fmt(v)}" for k, v in items.items()]
        argv += overrides
        deps = [f"train:{up}" for up in upstream(name)]
        deps += [f"score:{score_key(r, recipe.split)}" for g in gates_of(recipe, name) for r in recipe.rows if r.name in g.rows]
        jobs.append(Job(f"train:{name}", list(dict.fromkeys(deps)), argv, run_dir=run_dir, spec=run_hash(name),
                        config=spec.config or "", overrides=overrides, weights=_exported(recipe, name, run_dir),
                        init=_init_weights(recipe, out, spec.init) if spec.init else None))
    for row in recipe.rows:
        if row.random or row.weights == "undecided":
            continue  # random: scored in-process when the table is written (seconds); undecided: not yet
        ckpt = row_weights(row, out, root)
        target = score_key(row, recipe.split)
        if f"score:{target}" in {j.name for j in jobs}:
            continue
        argv = [*py, "navigate", "--checkpoint", str(ckpt), "--task", recipe.task, "--split", recipe.split,
                "--out", str(out / "scores" / target), "--batch-size", str(recipe.score_batch_size),
                "--threads", str(recipe.threads)]
        for key in ("data_dir", "features", "objects"):
            if getattr(recipe, key):
                argv += [f"--{key.replace('_', '-')}", str(_abs(getattr(recipe, key), root))]
        spec = run_hash(row.run) if row.run else hashlib.sha256(str(ckpt).encode()).hexdigest()[:16]
        jobs.append(Job(f"score:{target}", [f"train:{row.run}"] if row.run else [], argv, spec=spec))
    if recipe.order == "listed":  # each run scored as soon as it is trained
        trains = [j for j in jobs if j.name.startswith("train:")]
        jobs = [j for t in trains for j in [t] + [s for s in jobs if s.deps == [t.name] and s.name.startswith("score:")]] \
            + [j for j in jobs if j.name.startswith("score:") and not j.deps]
    return jobs


def select_jobs(jobs: list[Job], patterns: Sequence[str] | None, out: Path) -> list[Job]:
    """The jobs whose names match one of ``patterns`` (``fnmatch``), in plan order, with the finished
    jobs they need (so that :func:`execute` counts them done); all of ``jobs`` without patterns.  A
    ``ConfigError`` when a pattern matches nothing or a selected job needs one that is neither finished
    nor selected (it could never start)."""
    if not patterns:
        return jobs
    by_name = {j.name: j for j in jobs}
    chosen = {j.name for j in jobs if any(fnmatch.fnmatchcase(j.name, p) for p in patterns)}
    if unmatched := [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in by_name)]:
        raise ConfigError(f"--only: {', '.join(unmatched)} names no job of the plan (see --dry-run)")
    waiting = sorted(f"{n} needs {d}" for n in chosen for d in by_name[n].deps
                     if d not in chosen and not is_done(out, by_name[d]))
    if waiting:
        raise ConfigError(f"--only: selected jobs need jobs that are neither done nor selected: {'; '.join(waiting)}")
    needed = {d for n in chosen for d in by_name[n].deps}
    return [j for j in jobs if j.name in chosen or j.name in needed]


def gate_file(out: Path, gate: GateSpec, suffix: str = ".json") -> Path:
    """Where gate ``gate``'s verdict is kept in the experiment directory ``out`` (``suffix``
    ``.history.jsonl``: every reading)."""
    return out / "gates" / f"{slug(gate.name)}{suffix}"


def gates_of(recipe: Recipe, run: str) -> list[GateSpec]:
    """The recipe's gates that hold run ``run``."""
    return [g for g in recipe.gates if any(fnmatch.fnmatchcase(run, pat) for pat in g.runs)]


def retired_file(out: Path, run: str) -> Path:
    """Where the mark of a run retired by a pre-registered rule (``--retire``) is kept."""
    return out / "retired" / f"{slug(run)}.json"


def retired_why(out: Path, run: str) -> str | None:
    """The reason run ``run`` was retired in ``out`` (``--retire``), or None if it was not."""
    f = retired_file(out, run)
    return _read_json(f, "the retirement mark").get("why", "?") if f.exists() else None


def retire_run(recipe: Recipe, out: Path, run: str, why: str) -> dict[str, Any]:
    """Mark run ``run`` as stopped for good by a pre-registered rule (e.g. a futility stop): the driver
    never starts or resumes it again, what needs it is held, its rows are reported as not run with
    ``why``.  Refused (one :class:`ConfigError`) for a run the recipe does not have, a finished run, a
    run still training, or without a reason.  Its directory and checkpoints are kept."""
    out = Path(out).resolve()
    if run not in recipe.runs:
        raise ConfigError(f"recipe {recipe.name}: no run {run!r} to retire (its runs: {', '.join(recipe.runs)})")
    if not why.strip():
        raise ConfigError("--retire needs --why: the rule that stops the run, as pre-registered")
    if not (out / "pin.json").exists():
        raise ConfigError(f"{out} is no experiment directory (no pin.json): check --out")
    if (out / "done" / f"train-{run}.json").exists():
        raise ConfigError(f"run {run!r} has finished in {out}: nothing to retire")
    if (earlier := retired_why(out, run)) is not None:
        raise ConfigError(f"run {run!r} was retired already ({retired_file(out, run)}: {earlier})")
    run_dir = out / "runs" / run
    if who := lock_holder(run_dir):
        raise ConfigError(f"run {run!r} is still training ({who}): stop it (and its driver) first")
    logged, saved, total = _run_progress(run_dir)
    rec = {"run": run, "why": why.strip(), "recipe": recipe.name, "retired": time.strftime("%Y-%m-%d %H:%M:%S"),
           "last_logged_step": logged, "checkpoint_step": saved, "max_steps": total}
    atomic_write_text(retired_file(out, run), json_text(rec))
    return rec


def gate_runs(recipe: Recipe, gate: GateSpec) -> dict[str, str]:
    """What gate ``gate`` of this recipe reads: its rows -> their runs (or checkpoints)."""
    return {r.name: r.run or r.checkpoint for r in recipe.rows if r.name in gate.rows}


def gate_verdict(recipe: Recipe, out: Path, gate: GateSpec) -> dict[str, Any] | None:
    """The latest reading of gate ``gate`` in ``out`` that read this recipe's rows and runs, or None.
    Two recipes sharing an experiment directory may have gates of the same name that read other runs
    (a continued teacher): each keeps its own verdict, found in the readings' history."""
    want, found = gate_runs(recipe, gate), None
    hist, f = gate_file(out, gate, ".history.jsonl"), gate_file(out, gate)
    for rec in read_jsonl(hist) if hist.exists() else ([_read_json(f, "the gate verdict")] if f.exists() else []):
        if rec.get("runs") == want:
            found = rec
    return found


def not_run_reason(recipe: Recipe, out: Path, run: str) -> str | None:
    """Why run ``run`` will not be trained in ``out`` by the recipe's own rules, or None: it, or a run it
    starts from or distils from, was retired (``--retire``), or a gate that holds it was read on this
    recipe's rows and not passed.  A run that has finished is never "not run"."""
    seen: set[str] = set()

    def why(name: str) -> str | None:
        if name in seen or name not in recipe.runs or (out / "done" / f"train-{name}.json").exists():
            return None
        seen.add(name)
        if (retired := retired_why(out, name)) is not None:
            return f"run {name!r} retired: {retired}"
        for gate in gates_of(recipe, name):
            if (rec := gate_verdict(recipe, out, gate)) is not None and not rec.get("passed"):
                return f"gate {gate.name!r} not passed (read {rec.get('read', '?')})"
        spec = recipe.runs[name]
        return next((r for r in (why(d) for d in (spec.init, spec.teacher_run) if d) if r), None)
    return why(run)


def gate_check(recipe: Recipe, out: Path, gate: GateSpec) -> tuple[bool, str]:
    """Read gate ``gate`` on the scorings in ``out`` (all of its rows must be scored): ``(passed, why)``.
    Every row must have scored every instruction of the recipe's split (a submission that misses one
    does not pass, whatever its numbers)."""
    evaluator = Evaluator(recipe.task, recipe.split, resolve_data_dir(recipe.data_dir or None))
    rows = [r for r in recipe.rows if r.name in gate.rows]
    per_episode = {}
    for row in rows:
        try:
            per_episode[row.name] = evaluator.score(row_entries(recipe, out, row, evaluator), strict=True)[1]
        except SubmissionError as exc:
            return False, f"gate {gate.name!r} NOT passed: row {row.name!r} is not a whole {recipe.split} submission ({exc})"
    group = next(c for c in recipe.comparisons if c.name == gate.comparison)
    gaps, _, _ = episode_gaps(group, [{"name": r.name} for r in rows], per_episode)
    if not gaps:
        return False, f"gate {gate.name!r}: no pair of comparison {group.name!r} among its rows {gate.rows}"
    text = "; ".join(f"{g['a']} - {g['b']} {g['metric']} {g['mean']:+.4f} ({g['in_se']:.1f} se)" for g in gaps)
    passed = all(g["in_se"] >= gate.min_se for g in gaps)
    return passed, (f"gate {gate.name!r} {'passed' if passed else 'NOT passed'} (every gap at least "
                    f"{gate.min_se:g} paired standard errors): {text}")


def _exported(recipe: Recipe, run: str, run_dir: Path) -> Path:
    """Where run ``run`` of the recipe, trained in ``run_dir``, exports its weights: RUN/pretrained for
    pretraining, RUN/model for fine-tuning."""
    return run_dir / ("pretrained" if recipe.runs[run].command == "pretrain" else "model")


def _init_weights(recipe: Recipe, out: Path, run: str) -> Path:
    """A run's exported weights in the experiment directory ``out``."""
    return _exported(recipe, run, out / "runs" / run)


def _done_file(out: Path, job: Job) -> Path:
    return out / "done" / f"{job.name.replace(':', '-')}.json"


def _train_mark(out: Path, run: str) -> Path:
    """Where training run ``run``'s done mark is in ``out``."""
    return _done_file(out, Job(f"train:{run}", [], []))


def _mark(out: Path, run: str) -> dict[str, Any]:
    """Run ``run``'s done mark in ``out`` ({} if it has none)."""
    f = _train_mark(out, run)
    return _read_json(f, "the done mark") if f.exists() else {}


def _trained_commit(out: Path, run: str, default: str) -> str:
    """The commit run ``run`` was trained with, as its done mark records it (an adopted run's own
    commit), else ``default`` (the experiment's pin)."""
    return _mark(out, run).get("commit") or default


def _try_lock(d: Path) -> RunLock | None:
    """The lock of directory ``d`` (made if missing), or None while another holder has it."""
    d.mkdir(parents=True, exist_ok=True)
    try:
        return RunLock(d)
    except RunLockedError:
        return None


def _claim_dir(out: Path, job: Job) -> Path:
    return out / "claims" / job.name.replace(":", "-")


def _child_alive(claim_dir: Path) -> str | None:
    """The process a claim's driver started (``CLAIM/child.json``), if it still runs on this host: a
    driver killed outright leaves its job's process running, which no second driver may duplicate."""
    try:
        info = json.loads((claim_dir / "child.json").read_text())
        pid, host = int(info["pid"]), str(info["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if host == socket.gethostname() and process_alive(pid, info.get("process_start")):
        return f"its process {pid}, whose driver is gone, still runs"
    return None


def claim_job(out: Path, job: Job) -> tuple[RunLock | None, str]:
    """Take job ``job`` of experiment directory ``out`` for this process: ``(claim, "")``, or ``(None,
    who)`` when another driver holds its claim, the process a dead driver started for it still runs,
    or another process writes its run directory.  The claim is a
    :class:`~minivln.training.checkpoint.RunLock` on ``out/claims/JOB`` (one holder; a dead holder's is
    taken over); release it once the job's done (or failed) mark is written."""
    if job.run_dir is not None and (who := lock_holder(job.run_dir)):
        return None, f"its run is written by {who}"
    d = _claim_dir(out, job)
    if (claim := _try_lock(d)) is None:
        return None, f"claimed by {lock_holder(d) or 'another driver'}"
    if who := _child_alive(d):
        claim.release()
        return None, who
    (d / "child.json").unlink(missing_ok=True)
    return claim, ""


def _note_child(out: Path, job: Job, proc: subprocess.Popen) -> None:
    rec = {"pid": proc.pid, "host": socket.gethostname(), "process_start": process_start(proc.pid)}
    atomic_write_text(_claim_dir(out, job) / "child.json", json.dumps(rec) + "\n")


def _take_gpu_slot(out: Path, free: list[str]) -> tuple[str, RunLock] | None:
    """A free GPU slot of this driver that no other driver sharing ``out`` uses now (each slot is
    claimed as ``out/claims/gpu-N``), or None."""
    for slot in free:
        if (lock := _try_lock(out / "claims" / f"gpu-{slot.replace(',', '+')}")) is not None:
            free.remove(slot)
            return slot, lock
    return None


def _failed_file(out: Path, job: Job) -> Path:
    return out / "failed" / f"{job.name.replace(':', '-')}.json"


def failed_since(out: Path, job: Job, t0: float) -> str | None:
    """When another driver sharing ``out`` saw job ``job`` fail after ``t0`` (this driver's start): it is
    not tried again in this call (a driver started later tries it again, as a resume)."""
    f = _failed_file(out, job)
    try:
        if f.stat().st_mtime >= t0:
            return _read_json(f, "the failed mark").get("failed", "?")
    except OSError:
        pass
    return None


@contextlib.contextmanager
def _on_sigterm(handler):
    """SIGTERM handled by ``handler`` inside, as before after; only in the main thread, where Python can
    install a handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _sigterm_exits():
    """SIGTERM ends the driver as Ctrl-C does (its ``finally`` stops the jobs it started)."""
    def _exit(signum, frame):
        raise SystemExit(128 + signum)
    return _on_sigterm(_exit)


def _stop_jobs(running: dict[str, tuple[Job, subprocess.Popen]], wait_s: float = 60.0) -> None:
    """Terminate the jobs this driver started (SIGTERM: a training job saves the step it is in; each resumes
    later from its last checkpoint).  Another SIGTERM to the driver meanwhile (a scheduler's to every process
    of the job) does not cut this short."""
    with _on_sigterm(signal.SIG_IGN):
        for _, proc in running.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.time() + wait_s
        for name, (_, proc) in running.items():
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc._minivln_log.close()  # type: ignore[attr-defined]
            print(f"stopped  {name} (resumes from its last checkpoint)", flush=True)


def is_done(out: Path, job: Job) -> bool:
    f = _done_file(out, job)
    if not f.exists():
        return False
    rec = _read_json(f, "the done mark")
    if rec.get("spec") != job.spec:
        raise ConfigError(f"{job.name} in {out} was made from another spec ({rec.get('spec')} vs {job.spec}): "
                          "a recipe changed under a finished run; use another --out or remove "
                          f"{f} and its run directory")
    return True


def _source_mark(src: Path) -> dict[str, Any] | None:
    """The done mark of the run directory ``src`` where a driver trained or adopted it
    (``EXP/done/train-RUN.json`` beside ``EXP/runs/RUN``: its command names ``src``, or it is an
    adoption's mark), or None."""
    mark = _train_mark(src.parent.parent, src.name)
    try:
        rec = json.loads(mark.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict):
        return None
    return rec if str(src) in (rec.get("argv") or []) or rec.get("adopted_from") else None


def adopt_run(recipe: Recipe, out: Path, run: str, src: Path, *, commit: str, note: str = "") -> dict[str, Any]:
    """Take a run trained outside the driver (e.g. started before its recipe existed) as the recipe's
    run ``run``: its directory is copied to ``OUT/runs/RUN`` and marked done, so that the rows that need
    it use it instead of training it again.

    Refused, with one :class:`ConfigError`, unless the run has finished (``SRC/model`` exported) and its
    saved config is the one the recipe would give it, key by key (paths included; the run directory
    aside).  ``commit`` is the code the run was trained with (the run directory does not record it); the
    done mark keeps it, with ``note``."""
    out, src = Path(out).resolve(), Path(src).resolve()
    job = next((j for j in plan(recipe, out, repo_root()) if j.name == f"train:{run}"), None)
    if job is None:
        raise ConfigError(f"recipe {recipe.name}: no run {run!r} to adopt (its runs: {', '.join(recipe.runs)})")
    if is_done(out, job) or (out / "runs" / run).exists():
        raise ConfigError(f"{out / 'runs' / run} exists already: nothing to adopt")
    exported = _exported(recipe, run, src)
    if not (src / RUN_CONFIG).is_file() or not exported.is_dir():
        raise ConfigError(f"{src} is not a finished run ({src / RUN_CONFIG} and {exported} are needed)")
    cls = PretrainConfig if recipe.runs[run].command == "pretrain" else FinetuneConfig
    path = repo_root() / job.config if job.config else None  # the recipe's base config, from this checkout
    fixed = [f"train.run_dir={src}"]
    expected = load_config(cls, path, job.overrides + fixed)
    saved = load_config(cls, src / RUN_CONFIG, fixed)
    changes = config_changes(expected, saved, ignore=("train.resume",))
    if changes:
        raise ConfigError(f"{src} was not trained as the recipe's run {run!r}: "
                          + "; ".join(f"{k}: recipe {a!r}, run {b!r}" for k, (a, b) in changes.items()))
    try:
        sha = _git("rev-parse", "--verify", f"{commit}^{{commit}}", cwd=repo_root())
    except DataError:
        raise ConfigError(f"--adopt-commit {commit!r} is no commit of this repository") from None
    trained = _source_mark(src) or {}  # src trained (or adopted) by a driver: how and when, from its mark
    if trained.get("commit") and trained["commit"] != sha:
        raise ConfigError(f"--adopt-commit {commit!r} is {sha[:12]}, but {src} was trained at "
                          f"{str(trained['commit'])[:12]} (its driver's done mark)")
    shutil.copytree(src, out / "runs" / run)
    rec = {"job": job.name, "spec": job.spec, "commit": sha, "adopted_from": str(src),
           "adopted": time.strftime("%Y-%m-%d %H:%M:%S"), "note": note,
           # when it was trained: its mark's time, else when its weights were written (copytree keeps it)
           "finished": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(exported.stat().st_mtime))}
    rec.update({k: trained[k] for k in ("finished", "seconds", "argv", "recipe_argv") if trained.get(k) is not None})
    if "argv" not in rec and "recipe_argv" not in rec:  # trained by hand: the command it ran is not known
        rec["recipe_argv"] = job.argv
    atomic_write_text(_done_file(out, job), json.dumps(rec, indent=1) + "\n")
    return rec


# ------------------------------------------------------------------------------------------ record
# What survives a machine change.  Weights and checkpoints are too big to keep anywhere but the machine
# that trained them; the rest of an experiment directory -- the pin, done marks, run configs and logs,
# scorings -- is small.  ``--save-record DIR`` copies it (JSON over 64 KB gzipped), ``--load-record DIR``
# puts it into a new directory, and the driver then knows what is done: a finished run whose weights
# are not on this machine is trained again only when a pending job needs them and nothing has scored it.

#: what a record leaves out: the code worktree, locks, and every folder inside a run (checkpoints,
#: exported weights); in a run's own folder only these files are kept
_RECORD_SKIP = {"code", "claims", "shared"}
_RECORD_SUFFIXES = (".json", ".jsonl", ".yaml", ".txt", ".log")
_RECORD_GZIP_BYTES = 64 * 1024
RECORD_MANIFEST = "record.json"


def weights_digest(weights: Path | None) -> str | None:
    """The first 16 hex digits of the SHA-256 of ``weights/model.safetensors`` (None if absent)."""
    f = weights / "model.safetensors" if weights is not None else None
    if f is None or not f.is_file():
        return None
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _digests(job: Job, init: str | None) -> dict[str, str]:
    """For a finished training job's done mark: the digest of the weights it exported and of those it
    started from (``init``, read when it started), so that a row says which pretraining weights its run
    learned from."""
    rec = {}
    if (d := weights_digest(job.weights)) is not None:
        rec["weights_sha256"] = d
    if init is not None:
        rec["init_sha256"] = init
    return rec


def _lost(out: Path, job: Job) -> bool:
    """A finished training run whose exported weights are not in ``out`` (e.g. its record was loaded on
    another machine)."""
    return job.weights is not None and is_done(out, job) and not (job.weights / "model.safetensors").is_file()


def _scorings_of(out: Path, job: Job) -> list[str]:
    """The done scorings, of any recipe sharing ``out``, of training job ``job``'s weights (a scoring's
    spec is its run's)."""
    found = []
    for f in sorted((out / "done").glob("score-*.json")):
        try:
            rec = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and rec.get("spec") == job.spec:
            found.append(str(rec.get("job") or f.stem))
    return found


def requeue_lost(jobs: list[Job], out: Path, chosen: list[Job] | None = None) -> tuple[list[Job], dict[str, str]]:
    """Make the finished runs whose weights are lost pending again where an unfinished job of
    ``chosen`` (default: all of ``jobs``, the whole plan) needs them: the old done mark becomes
    ``done/train-RUN.lost-N.json`` and the old run folder ``runs/RUN.lost-N`` (kept as history), and the
    run trains again from the start.  A lost run that has been scored (a done ``score-*`` mark in
    ``out`` of its spec, whichever recipe wrote it) is not trained again -- that would score other
    weights than the table's -- so the jobs that need it are held.  A retired run (``--retire``) makes
    nothing train again.  Returns ``(chosen with the runs to train again, in plan order; {job: why held}``).
    Two drivers starting at once requeue one at a time (``claims/requeue``)."""
    by_name = {j.name: j for j in jobs}
    names = {j.name for j in (jobs if chosen is None else chosen)}
    held: dict[str, str] = {}
    if not any(_lost(out, j) for j in jobs):
        return [j for j in jobs if j.name in names], held
    lock = _wait_for_lock(out / "claims" / "requeue", "another driver looking for lost runs")
    try:
        changed = True
        while changed:  # a run trained again may need a lost run itself
            changed = False
            for j in [by_name[n] for n in by_name if n in names]:
                if j.name in held or is_done(out, j) or retired_why(out, j.name.split(":", 1)[1]) is not None:
                    continue
                for d in j.deps:
                    dep = by_name.get(d)
                    if dep is None or not _lost(out, dep):
                        continue
                    if scored := _scorings_of(out, dep):
                        held[j.name] = (f"{dep.name.split(':', 1)[1]}'s weights are not on this machine and it was "
                                        f"scored ({', '.join(scored)}): training it again would score other weights; "
                                        f"put its weights back in {dep.weights}")
                        break
                    k = 1
                    mark = _done_file(out, dep)
                    while (out / "runs" / f"{dep.run_dir.name}.lost-{k}").exists() or \
                            mark.with_suffix(f".lost-{k}.json").exists():
                        k += 1
                    os.replace(mark, mark.with_suffix(f".lost-{k}.json"))
                    if dep.run_dir.exists():
                        os.replace(dep.run_dir, dep.run_dir.with_name(f"{dep.run_dir.name}.lost-{k}"))
                    names.update([dep.name, *dep.deps])  # the driver counts its own needs done (or finds them lost)
                    print(f"lost     {dep.name}: its weights are not on this machine; trained again for {j.name} "
                          f"(the earlier record kept as lost-{k})", flush=True)
                    changed = True
    finally:
        lock.release()
    return [j for j in jobs if j.name in names], held


def _record_files(out: Path) -> list[Path]:
    """The files of an experiment directory that its record keeps (relative to ``out``): JSON, YAML and
    text files, a run's only from its own folder and only once it has finished."""
    keep = []
    for f in sorted(out.rglob("*")):
        rel = f.relative_to(out)
        if rel.parts[0] in _RECORD_SKIP or not f.is_file() or f.is_symlink() or f.suffix not in _RECORD_SUFFIXES:
            continue
        if rel.parts[0] == "runs" and (len(rel.parts) != 3  # only a run's own files: no checkpoint, no weights
                                       or not _train_mark(out, rel.parts[1]).is_file()):
            continue  # nor an unfinished run's (it starts again wherever its checkpoint is missing)
        keep.append(rel)
    return keep


def _restored(data: bytes, rel: str, gz: bool) -> bytes:
    """The bytes a record's file comes back as: JSON that was gzipped comes back compact (the same
    values, not the same spacing); everything else as it was."""
    return json.dumps(json.loads(data)).encode() if gz and rel.endswith(".json") else data


def save_record(out: Path, dest: Path) -> dict[str, Any]:
    """Write the record of experiment directory ``out`` to ``dest`` (replaced whole, the old one only
    once the new one is complete): every file :func:`_record_files` keeps, JSON over 64 KB as ``.gz``
    (gzip with no timestamp, so that a submission already gzipped for a table is the same bytes), and
    ``record.json``: the files with the digest of what loading gives back, the digest of every exported
    weights file present, and when.  A file that vanishes while it is read (another driver moving it)
    is left out."""
    out, dest = Path(out).resolve(), Path(dest).resolve()
    if not (out / "pin.json").is_file():
        raise ConfigError(f"{out} is no experiment directory (no pin.json)")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    files: dict[str, dict[str, Any]] = {}
    for rel in _record_files(out):
        try:
            data = (out / rel).read_bytes()
        except FileNotFoundError:
            continue
        name, gz = str(rel), len(data) > _RECORD_GZIP_BYTES and rel.suffix in (".json", ".jsonl")
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        if gz:
            name += ".gz"
            if rel.suffix == ".json":  # as write_gz writes a table's submission: the same bytes
                write_gz(tmp / name, json.loads(data))
            else:
                (tmp / name).write_bytes(gzip_bytes(data))
        else:
            (tmp / name).write_bytes(data)
        files[str(rel)] = {"stored": name, "sha256": hashlib.sha256(_restored(data, str(rel), gz)).hexdigest()[:16]}
    weights = {}
    for run_dir in sorted((out / "runs").glob("*")) if (out / "runs").is_dir() else []:
        for sub in ("model", "model-ema", "pretrained"):
            if (d := weights_digest(run_dir / sub)) is not None:
                weights[f"{run_dir.name}/{sub}"] = d
    manifest = {"saved": time.strftime("%Y-%m-%d %H:%M:%S"), "host": socket.gethostname(), "from": str(out),
                "files": files, "weights_sha256": weights,
                "note": "weights and checkpoints are not kept: a run whose weights a pending job needs is trained "
                        "again there unless it was scored (minivln experiment --load-record)"}
    atomic_write_text(tmp / RECORD_MANIFEST, json.dumps(manifest, indent=1) + "\n")
    old = dest.with_name(dest.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
    return manifest


def load_record(src: Path, out: Path) -> list[str]:
    """Put the record ``src`` (:func:`save_record`) into the experiment directory ``out``; the files
    written (relative to ``out``).  Each file is checked against the manifest's digest, and a file
    already in ``out`` must hold the same content (one ConfigError naming every one that does not), so a
    record never overwrites work."""
    src, out = Path(src).resolve(), Path(out).resolve()
    manifest = _read_json(src / RECORD_MANIFEST, "the record's manifest")
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise ConfigError(f"{src / RECORD_MANIFEST} lists no files: not a record of minivln experiment")
    blobs, clashes, bad = {}, [], []
    for rel, info in files.items():
        stored = info.get("stored") if isinstance(info, dict) else None
        if not isinstance(stored, str) or Path(rel).is_absolute() or ".." in Path(rel).parts \
                or Path(stored).is_absolute() or ".." in Path(stored).parts or stored not in (rel, rel + ".gz"):
            bad.append(f"{rel} (not a file of an experiment directory)")
            continue
        if not (src / stored).is_file():
            bad.append(f"{stored} (missing)")
            continue
        gz = stored.endswith(".gz") and not rel.endswith(".gz")
        if gz:
            with gzip.open(src / stored, "rb") as fh:
                data = _restored(fh.read(), rel, True)
        else:
            data = (src / stored).read_bytes()
        if hashlib.sha256(data).hexdigest()[:16] != info.get("sha256"):
            bad.append(f"{stored} (not what was saved)")
            continue
        target = out / rel
        if target.exists() and target.read_bytes() != data and \
                not (rel.endswith(".json") and _same_json(target.read_bytes(), data)):
            clashes.append(rel)
        blobs[rel] = data
    if bad:
        raise ConfigError(f"record {src}: {len(bad)} of its files cannot be used: {'; '.join(bad[:5])}")
    if clashes:
        raise ConfigError(f"{out} already holds other versions of {len(clashes)} file(s) of record {src}: "
                          f"{', '.join(clashes[:5])}; load it into a new directory")
    written = []
    for rel, data in blobs.items():
        target = out / rel
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, data)
        written.append(rel)
    return written


def _same_json(a: bytes, b: bytes) -> bool:
    try:
        return json.loads(a) == json.loads(b)
    except ValueError:
        return False


# ------------------------------------------------------------------------------------------ pre-flight


class PreflightError(ConfigError):
    """What a recipe's pending runs and rows need and lack: ``problems``, one line each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        n = len(self.problems)
        super().__init__(f"pre-flight: {n} problem{'s' if n != 1 else ''}, nothing started:\n"
                         + "\n".join(f"  {p}" for p in self.problems))


#: the least a run leaves on disk per parameter of its network: fp32 weights and Adam's two moments in
#: its checkpoint, and the exported weights (4 bytes each; several checkpoints or pretraining heads only
#: add to it).  The word-embedding table counts 8 bytes per parameter (weights and export): a checkpoint
#: keeps its moments only for the rows that had a gradient (training.checkpoint), possibly none.
CHECKPOINT_BYTES_PER_PARAM = 4 * 4
EMBEDDING_BYTES_PER_PARAM = 2 * 4
NO_FEATURES = "features: no view feature file given (features=FILE)"
NO_OBJECTS = "objects: no object feature file given (REVERIE and networks with object tokens need one: objects=FILE)"


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _input_path(value: str, root: Path) -> Path:
    """A path of a run's config as the run will see it (relative ones from the repository root; the
    pinned checkout has the same layout and the same ``../shared``)."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else (root / p).resolve()  # as plan() makes the recipe's paths absolute


def _student(command: str, cfg: Any) -> DUETConfig:
    """The network a run trains (as ``minivln pretrain`` / ``finetune`` build it)."""
    if command == "pretrain":
        return get_config(cfg.model, **cfg.network_overrides)
    return get_config(cfg.model, **{**cfg.model_overrides, "feat_dropout": cfg.feat_dropout})


def _check_config(command: str, cfg: Any) -> None:
    """The checks the command makes of its config before any work (ConfigError)."""
    if command == "pretrain":
        resolve_mix(cfg)
    else:
        cfg.check()


def _parameters(cfg: DUETConfig, cache: dict[str, int]) -> int:
    key = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
    if key not in cache:
        with torch.device("meta"):  # no memory, no initialisation
            cache[key] = sum(p.numel() for p in DUET(cfg).parameters())
    return cache[key]


def checkpoint_bytes(cfg: DUETConfig, cache: dict[str, int]) -> int:
    """The least a run of network ``cfg`` leaves on disk (:data:`CHECKPOINT_BYTES_PER_PARAM`,
    :data:`EMBEDDING_BYTES_PER_PARAM` for the word-embedding table)."""
    embedding = cfg.vocab_size * cfg.hidden_size
    return ((_parameters(cfg, cache) - embedding) * CHECKPOINT_BYTES_PER_PARAM
            + embedding * EMBEDDING_BYTES_PER_PARAM)


class _Problems:
    """Problems keyed by their text, each with what needs it (``run a``, ``row 'b'``, ``the recipe``)."""

    def __init__(self) -> None:
        self.found: dict[str, list[str]] = {}

    def add(self, who: str, message: str) -> None:
        whom = self.found.setdefault(message, [])
        if who not in whom:
            whom.append(who)

    def lines(self) -> list[str]:
        out = []
        for message, whom in self.found.items():
            runs = [w[4:] for w in whom if w.startswith("run ")]
            rows = [w[4:] for w in whom if w.startswith("row ")]
            other = [w for w in whom if not w.startswith(("run ", "row "))]
            parts = [self._names("run", runs), self._names("row", rows), *other]
            out.append(f"{message} ({'; '.join(p for p in parts if p)})")
        return out

    @staticmethod
    def _names(kind: str, names: list[str], shown: int = 3) -> str:
        if not names:
            return ""
        more = f" and {len(names) - shown} more" if len(names) > shown + 1 else ""
        return f"{kind}{'s' if len(names) > 1 else ''} {', '.join(names[:shown] if more else names)}{more}"


def _network_of(path: Path, what: str, who: str, problems: _Problems) -> DUETConfig | None:
    """The network config of a teacher or checkpoint at ``path`` (read without the weights), or None
    with the reason added to ``problems`` (missing, unreadable)."""
    if not path.exists():
        problems.add(who, f"{what} {path} does not exist")
        return None
    try:
        return read_agent_config(path)
    except DataError as exc:
        problems.add(who, f"{what} {path} cannot be read: {exc}")
        return None


def preflight(recipe: Recipe, out: Path, code: Path | None = None, only: Sequence[str] | None = None) -> str:
    """Check, before any job starts, that what the recipe's pending runs and rows need exists and fits;
    the summary line when it does, else one :class:`PreflightError` listing every problem.

    For every training run not done yet: its config loads and passes the command's own checks; its
    inputs exist (``data_dir`` or ``$MINIVLN_DATA``, ``features``, ``objects`` where the task or the
    model reads them, ``init_checkpoint`` and ``teacher`` unless another run of the recipe makes them:
    ``init:``, ``teacher_run:``); the feature files are as wide as the network's ``image_feat_size``
    and ``obj_feat_size``; a teacher (its ``config.json``; a linked run: the network that run trains)
    passes :func:`~minivln.distill.compat.check_teacher` for the run's stage.  For every row not scored
    yet: its checkpoint exists and the recipe's feature files fit it.  And the experiment directory's
    file system has room for the pending runs' checkpoints (a lower bound: :func:`checkpoint_bytes`
    per run).  ``code``: the checkout whose base configs
    the runs use (default: ``out/code`` once pinned, else this repository).  ``only`` (``--only``'s
    patterns): the whole recipe is still checked, and the line says how many of its jobs are selected."""
    out = Path(out).resolve()
    root = repo_root()
    if code is None:
        code = out / "code" if (out / "code").is_dir() else root
    problems = _Problems()
    jobs = plan(recipe, out, code)
    done: dict[str, bool] = {}
    for job in jobs:
        try:
            done[job.name] = is_done(out, job)
        except (ConfigError, DataError) as exc:  # e.g. a recipe changed under a finished run
            problems.add("the recipe", str(exc))
            done[job.name] = True  # nothing more to say about it
    configs: dict[str, Any] = {}  # run -> its resolved config
    students: dict[str, DUETConfig] = {}  # run -> the network it trains
    for job in jobs:
        if not job.name.startswith("train:"):
            continue
        run = job.name.split(":", 1)[1]
        command = recipe.runs[run].command
        cls = PretrainConfig if command == "pretrain" else FinetuneConfig
        base = None
        if job.config:
            base = code / job.config if (code / job.config).is_file() else root / job.config
        try:
            configs[run] = load_config(cls, base, job.overrides + [f"train.run_dir={job.run_dir}"])
            students[run] = _student(command, configs[run])
        except (ConfigError, DataError) as exc:
            if not done[job.name]:
                problems.add(f"run {run}", f"the config does not load: {exc}")
    stores: dict[tuple[str, str, int], str] = {}  # (kind, path, width) -> problem ("" = none)

    def feature_problem(kind: str, path: Path, width: int | None) -> str:
        key = (kind, str(path), width or 0)
        if key not in stores:
            what = "view features" if kind == "features" else "object features"
            msg = ""
            if not path.is_file():
                msg = f"{kind} {path} does not exist" + ("" if not path.exists() else " (not a file)")
            elif width:
                store_cls = FeatureStore if kind == "features" else ObjectFeatureStore
                try:
                    store_cls(path, expected_dim=width).dim
                except DataError as exc:
                    msg = f"{kind}: {exc}"
                    try:
                        found = store_cls(path).dim
                    except DataError:
                        found = None
                    if found is not None and found != width:
                        size = "image_feat_size" if kind == "features" else "obj_feat_size"
                        msg = f"{kind} {path} hold {found}-d {what}, the network's {size} is {width}"
            stores[key] = msg
        return stores[key]

    def data_problem(value: str) -> str:
        try:
            resolve_data_dir(_input_path(value, root) if value else None)
        except DataError as exc:
            return f"data_dir: {exc}"
        return ""

    space, pending_runs = 0, 0
    params: dict[str, int] = {}  # pending run -> parameters of its network
    sizes: dict[str, int] = {}  # network config -> parameters
    for job in jobs:
        if not job.name.startswith("train:") or done[job.name]:
            continue
        run = job.name.split(":", 1)[1]
        pending_runs += 1
        if run not in configs:
            continue
        who, spec, cfg, student = f"run {run}", recipe.runs[run], configs[run], students.get(run)
        try:
            _check_config(spec.command, cfg)
        except (ConfigError, DataError) as exc:
            problems.add(who, str(exc))
        toy = cfg.data_dir == "toy"
        if not toy and (msg := data_problem(cfg.data_dir)):
            problems.add(who, msg)
        width = student.image_feat_size if student else None
        if cfg.features and cfg.features != "synthetic":
            if msg := feature_problem("features", _input_path(cfg.features, root), width):
                problems.add(who, msg)
        elif not cfg.features and not toy:
            problems.add(who, NO_FEATURES)
        if spec.command == "pretrain":
            needs_objects = bool(student and student.use_objects) and cfg.features != "synthetic"
        else:
            needs_objects = cfg.task == "reverie"
            if needs_objects and student is not None and not student.use_objects:
                problems.add(who, f"task reverie needs a network with object tokens (obj_feat_size > 0); "
                                  f"{cfg.model!r} has none")
        if needs_objects and cfg.objects and cfg.objects != "synthetic":
            obj_width = student.obj_feat_size if student and student.use_objects else None
            if msg := feature_problem("objects", _input_path(cfg.objects, root), obj_width):
                problems.add(who, msg)
        elif needs_objects and not cfg.objects and not toy:
            problems.add(who, NO_OBJECTS)
        if cfg.init_checkpoint and not spec.init:
            path = _input_path(cfg.init_checkpoint, root)
            if not path.exists():
                problems.add(who, f"init_checkpoint {path} does not exist")
        for key, value in listed_paths(cfg):
            path = _input_path(value, root)
            if not path.exists():
                problems.add(who, f"{key}: {path} does not exist")
        teacher, source = None, ""
        if spec.teacher_run:
            teacher = students.get(spec.teacher_run)
            source = f"teacher_run {spec.teacher_run} (the network that run trains)"
        elif cfg.teacher:
            path = _input_path(cfg.teacher, root)
            source = f"teacher {path}"
            teacher = _network_of(path, "teacher", who, problems)
        if teacher is not None and student is not None:
            stage = 1 if spec.command == "pretrain" else 2
            kd_terms = stage1_weights(cfg) if stage == 1 else None
            try:
                check_teacher(student, teacher, stage=stage, source=source, kd_terms=kd_terms)
            except ConfigError as exc:
                problems.add(who, str(exc))
        if student is not None:
            params[run] = _parameters(student, sizes)
            space += checkpoint_bytes(student, sizes)
    pending_rows = 0
    scored = {j.name for j in jobs if j.name.startswith("score:") and done[j.name]}
    for row in recipe.rows:
        if row.weights == "undecided" or f"score:{score_key(row, recipe.split)}" in scored:
            continue  # undecided: no scoring is planned until the choice is committed
        pending_rows += 1
        who = f"row {row.name!r}"
        if msg := data_problem(recipe.data_dir):
            problems.add(who, msg)
        if row.random:
            continue
        network = None
        if row.checkpoint:
            network = _network_of(Path(_abs(row.checkpoint, root)), "checkpoint", who, problems)
        else:
            network = students.get(row.run)
        if not recipe.features:
            problems.add(who, NO_FEATURES)
        elif msg := feature_problem("features", Path(_abs(recipe.features, root)),
                                    network.image_feat_size if network else None):
            problems.add(who, msg)
        if recipe.task == "reverie":
            if not recipe.objects:
                problems.add(who, NO_OBJECTS)
            elif msg := feature_problem("objects", Path(_abs(recipe.objects, root)),
                                        network.obj_feat_size if network and network.use_objects else None):
                problems.add(who, msg)
    if space:
        try:
            check_free_space(out, space, f"the checkpoints of {_count(len(params), 'run')} left "
                                         f"({CHECKPOINT_BYTES_PER_PARAM} bytes per parameter and run, "
                                         f"{EMBEDDING_BYTES_PER_PARAM} for the word embeddings)")
        except DataError as exc:
            problems.add("the experiment directory", str(exc))
    if problems.found:
        raise PreflightError(problems.lines())
    finished = sum(1 for j in jobs if j.name.startswith("train:") and done[j.name])
    undecided = sum(1 for r in recipe.rows if r.weights == "undecided")
    notes = ([f"{_count(finished, 'run')} done already"] if finished else []) \
        + ([f"their checkpoints need at least {format_bytes(space)}"] if space else []) \
        + ([f"{_count(undecided, 'row')} with weights undecided, not scored until they are"] if undecided else [])
    if only:
        pending_jobs = [j for j in jobs if not done[j.name]]
        chosen = {j.name for j in select_jobs(jobs, only, out)} & {j.name for j in pending_jobs}
        notes.append(f"the whole recipe checked; --only selects {len(chosen)} of its {len(pending_jobs)} jobs left")
    return (f"pre-flight: {_count(pending_runs, 'run')}, {_count(pending_rows, 'row')} checked, nothing missing"
            + (f" ({'; '.join(notes)})" if notes else ""))


def _start(job: Job, out: Path, code: Path, threads: int, gpu: str | None = None) -> subprocess.Popen:
    argv = list(job.argv)
    if job.run_dir is not None and job.run_dir.exists():
        if (job.run_dir / "latest").exists():
            argv.insert(argv.index("--out"), "--resume")
        else:  # crashed before its first checkpoint: nothing to keep
            shutil.rmtree(job.run_dir)
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if gpu is not None:  # the run sees only its own GPUs (cuda:0 is the first of them)
        env["CUDA_VISIBLE_DEVICES"] = gpu
    log = out / "logs" / f"{job.name.replace(':', '-')}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    fh = open(log, "a")
    fh.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n")
    fh.flush()
    proc = subprocess.Popen(argv, cwd=code, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    proc._minivln_log = fh  # type: ignore[attr-defined]
    proc._minivln_t0 = time.time()  # type: ignore[attr-defined]
    return proc


def parse_gpus(text: str) -> list[str]:
    """``--gpus``: ``"0,1,2,3"`` (four runs side by side, one GPU each) or ``"0+1,2+3"`` (two runs, two GPUs
    each, e.g. under ``--launcher 'torchrun --nproc_per_node 2'``) -> each run slot's
    ``CUDA_VISIBLE_DEVICES``."""
    slots = [s.strip().replace("+", ",") for s in text.split(",")] if text.strip() else []
    if not all(re.fullmatch(r"\d+(,\d+)*", s) for s in slots):
        raise ConfigError(f"--gpus {text!r}: GPU numbers separated by ',' (one run each), or joined by '+' "
                          "(one run on several), e.g. 0,1,2,3 or 0+1,2+3")
    return slots


def execute(jobs: list[Job], out: Path, code: Path, commit: str, *, max_jobs: int, threads: int,
            gpus: list[str] | None = None, on_finished: Callable[[Job], None] | None = None,
            hold: Callable[[Job], str | None] | None = None, poll_s: float = 2.0,
            lost_held: dict[str, str] | None = None) -> bool:
    """Run the pending jobs, up to ``max_jobs`` at a time; True when no job has failed.  ``gpus``
    (:func:`parse_gpus`): each training run takes a free slot and sees only its GPUs, so that at most
    one run trains per slot; scorings (CPU) take none.  ``on_finished(job)``: called once a job's done
    mark is written, before the next job starts (e.g. to delete what no pending job needs).
    ``hold(job)``: asked when a job could start; a reason (a recipe's gate not passed) keeps it and what
    needs it from starting in this call, which is reported and is no failure.

    Several drivers may share ``out`` (e.g. one per core, with overlapping ``--only``): a job is started
    under a claim (:func:`claim_job`, ``out/claims/JOB/.lock``, held by this process until the job's
    done or failed mark is written), so a job another driver runs -- or a training run some other
    process holds the lock of -- is waited for, never started twice; one finished elsewhere meanwhile
    counts as done here, one that failed elsewhere since this driver started (``out/failed/``) as
    failed.  GPU slots are claimed the same way (``out/claims/gpu-N``).  A claim left by a driver that
    died is taken over once the process it started has ended.  Stopping the driver (Ctrl-C, SIGTERM)
    stops the jobs it started; each resumes from its last checkpoint next time."""
    t0 = time.time()
    free = list(gpus or [])
    slot_of: dict[str, tuple[str, RunLock]] = {}
    pending = [j for j in jobs if not is_done(out, j)]
    finished = {j.name for j in jobs if j not in pending}
    running: dict[str, tuple[Job, subprocess.Popen]] = {}
    claims: dict[str, RunLock] = {}
    failed: set[str] = set()
    held: set[str] = set()
    waiting_elsewhere: set[str] = set()
    for j in jobs:
        print(f"{'pending' if j in pending else 'done':<8} {j.name}", flush=True)
    for name, why in (lost_held or {}).items():  # what needs a scored run whose weights are gone (requeue_lost)
        if (j := next((x for x in jobs if x.name == name), None)) in pending:
            pending.remove(j)
            held.add(name)
            print(f"held     {name}: {why}", flush=True)

    def let_go(name: str) -> None:
        if name in slot_of:
            slot, lock = slot_of.pop(name)
            lock.release()
            free.append(slot)
        if (claim := claims.pop(name, None)) is not None:
            (claim.run_dir / "child.json").unlink(missing_ok=True)  # its job's process has ended
            claim.release()

    def done_elsewhere(j: Job) -> None:
        pending.remove(j)
        finished.add(j.name)
        print(f"done     {j.name} (by another driver)", flush=True)

    try:
        with _sigterm_exits():
            while pending or running:
                for j in list(pending):
                    if len(running) >= max_jobs:
                        break
                    if any(d in failed for d in j.deps):
                        pending.remove(j)
                        failed.add(j.name)
                        print(f"skipped  {j.name}: a run it needs failed", flush=True)
                    elif any(d in held for d in j.deps):
                        pending.remove(j)
                        held.add(j.name)
                        print(f"held     {j.name}: a run it needs is held", flush=True)
                    elif not all(d in finished for d in j.deps):
                        if orphans := [d for d in j.deps if d not in finished and d not in running
                                       and not any(p.name == d for p in pending)]:
                            pending.remove(j)  # it could never start: say so rather than wait forever
                            failed.add(j.name)
                            print(f"FAILED   {j.name}: needs {', '.join(orphans)}, which this driver neither runs "
                                  "nor finds done", flush=True)
                        continue
                    elif is_done(out, j):  # another driver finished it since this one started
                        done_elsewhere(j)
                    elif hold is not None and (why := hold(j)):
                        pending.remove(j)
                        held.add(j.name)
                        print(f"held     {j.name}: {why}", flush=True)
                    else:
                        train = j.name.startswith("train:")
                        if gpus and train:
                            if (taken := _take_gpu_slot(out, free)) is None:
                                continue  # every GPU slot is busy: a scoring further down may still start
                            slot_of[j.name] = taken
                        claim, elsewhere = claim_job(out, j)
                        if claim is None:  # another driver (or process) runs it: look again later
                            let_go(j.name)
                            if j.name not in waiting_elsewhere:
                                waiting_elsewhere.add(j.name)
                                print(f"waiting  {j.name}: running elsewhere ({elsewhere})", flush=True)
                            continue
                        claims[j.name] = claim
                        if is_done(out, j):  # finished elsewhere between the look above and the claim
                            let_go(j.name)
                            done_elsewhere(j)
                            continue
                        if (when := failed_since(out, j, t0)) is not None:
                            let_go(j.name)
                            pending.remove(j)
                            failed.add(j.name)
                            print(f"FAILED   {j.name} in another driver at {when}; see {out / 'logs'}", flush=True)
                            continue
                        pending.remove(j)
                        gpu = slot_of[j.name][0] if j.name in slot_of else None
                        started_from = weights_digest(j.init)  # the weights it starts from, read as it starts
                        running[j.name] = (j, _start(j, out, code, threads, gpu))
                        running[j.name][1]._minivln_init = started_from  # type: ignore[attr-defined]
                        _note_child(out, j, running[j.name][1])
                        print(f"started  {j.name} ({time.strftime('%H:%M:%S')}{f', GPU {gpu}' if gpu else ''})",
                              flush=True)
                time.sleep(poll_s)
                for name, (j, proc) in list(running.items()):
                    if proc.poll() is None:
                        continue
                    proc._minivln_log.close()  # type: ignore[attr-defined]
                    del running[name]
                    took = time.time() - proc._minivln_t0  # type: ignore[attr-defined]
                    when = time.strftime("%Y-%m-%d %H:%M:%S")
                    if proc.returncode == 0:
                        finished.add(name)
                        rec = {"job": name, "spec": j.spec, "commit": commit, "seconds": round(took, 1),
                               "finished": when, "argv": j.argv}
                        rec.update(_digests(j, getattr(proc, "_minivln_init", None)))
                        atomic_write_text(_done_file(out, j), json.dumps(rec, indent=1) + "\n")
                        _failed_file(out, j).unlink(missing_ok=True)
                        print(f"finished {name} in {took / 60:.1f} min", flush=True)
                    else:
                        failed.add(name)
                        rec = {"job": name, "exit": proc.returncode, "failed": when, "log": str(out / "logs")}
                        atomic_write_text(_failed_file(out, j), json.dumps(rec, indent=1) + "\n")
                        print(f"FAILED   {name} (exit {proc.returncode}); see {out / 'logs'}", flush=True)
                    let_go(name)  # after the done or failed mark: another driver then sees it
                    if proc.returncode == 0 and on_finished is not None:
                        on_finished(j)
    finally:  # interrupted (Ctrl-C, SIGTERM, an error): stop what this driver started, then let go
        if running:
            _stop_jobs(running)
        for name in list(claims) + list(slot_of):
            let_go(name)
    return not failed


def _run_progress(run_dir: Path) -> tuple[int | None, int | None, int | None]:
    """(last logged step, step of the resume checkpoint ``latest``, ``train.max_steps``) of a run
    directory, each None where unknown (not started, no checkpoint yet)."""
    logged = next((r.get("step") for r in reversed(read_jsonl(run_dir / "log.jsonl")) if r.get("kind") == "train"),
                  None)
    saved = total = None
    try:
        saved = json.loads((run_dir / "latest" / "meta.json").read_text()).get("step")
    except (OSError, ValueError):
        pass
    try:
        total = (yaml.safe_load((run_dir / "config.yaml").read_text()).get("train") or {}).get("max_steps")
    except (OSError, yaml.YAMLError, AttributeError):
        pass
    return logged, saved, total


def _process_records(run_dir: Path) -> list[list[tuple[float, int | None]]]:
    """The run log's training records, ``(time, step)``, split by the process that wrote them: each
    process logs ``time``, its own elapsed seconds, with ``it_s``, the steps since its previous log over
    the seconds since it, so within one process ``(time - previous time) * it_s`` is the step gap, and
    a record whose time goes back or whose gap disagrees starts a new process."""
    segments: list[list[tuple[float, int | None]]] = []
    last_t, last_step = None, None
    for r in read_jsonl(run_dir / "log.jsonl"):
        if r.get("kind") != "train" or not isinstance(r.get("time"), (int, float)):
            continue
        t, step, rate = float(r["time"]), r.get("step"), r.get("it_s")
        same = last_t is not None and t >= last_t
        if same and isinstance(rate, (int, float)) and isinstance(step, int) and isinstance(last_step, int):
            same = abs((t - last_t) * rate - (step - last_step)) <= 0.5
        if not same:
            segments.append([])
        segments[-1].append((t, step if isinstance(step, int) else None))
        last_t, last_step = t, step
    return segments


def _logged_starts(run_dir: Path) -> tuple[float, int]:
    """(seconds of training the run's log records, number of processes that wrote it).  Each process
    logs ``time``, its own elapsed seconds, with ``it_s``, the steps since its previous log over the
    seconds since it: within one process ``(time - previous time) * it_s`` is the step gap, and at a
    resume it is not (the new process's clock and rate start again; its log keeps the steps up to
    the checkpoint).  The sum over processes is the run's training time, which a done mark (the last
    process's) understates; time after a killed process's last checkpoint is not counted."""
    segments = _process_records(run_dir)
    return sum(seg[-1][0] for seg in segments), len(segments)


def _minutes_left(run_dir: Path, total: int | None) -> str:
    """``", ~N min left"`` for a running run: the steps left at the rate of its current process so far
    (steps over seconds between its first and last records, validations included); "" when unknown.  Until
    a resumed process has logged twice, its predecessor's rate stands in for its own."""
    segments = _process_records(run_dir)
    if not total or not segments or len(segments[-1]) < 2:
        return ""
    (t0, s0), (t1, s1) = segments[-1][0], segments[-1][-1]
    if s0 is None or s1 is None or s1 <= s0 or t1 <= t0:
        return ""
    return f", ~{max(total - s1, 0) * (t1 - t0) / (s1 - s0) / 60:.0f} min left"


def job_status(recipe: Recipe, out: Path, jobs: list[Job]) -> list[tuple[str, str, str]]:
    """``(job, state, detail)`` for each job of an experiment directory, read from its files without
    starting anything: ``done`` (when, how long), ``running`` (a live process holds the run's lock:
    step reached, who), ``stopped`` (a checkpoint to resume from), ``retired`` (stopped for good by a
    pre-registered rule, ``--retire``), ``held`` (a gate read and not passed, or it needs a retired
    run), ``waiting`` (for the jobs it needs) or ``pending`` (ready to start)."""
    done = {j.name: is_done(out, j) for j in jobs}
    status = []
    for j in jobs:
        if done[j.name]:
            rec = _read_json(_done_file(out, j), "the done mark")
            took = f", {rec['seconds'] / 60:.0f} min" if rec.get("seconds") else ""
            if j.run_dir is not None and j.name.startswith("train:"):
                logged, starts = _logged_starts(j.run_dir)
                if starts > 1:  # resumed: the mark timed the last process only
                    took = f", {logged / 60:.0f} min of training logged by {starts} processes (resumed)"
            lost = "; its weights are not on this machine" if _lost(out, j) else ""
            when = rec.get("finished") or (f"rebuilt from {rec['rebuilt_from']}" if rec.get("rebuilt_from") else "?")
            status.append((j.name, "done", f"{when}{took}{lost}"))
            continue
        state, detail = "pending", ""
        if j.run_dir is not None:
            logged, saved, total = _run_progress(j.run_dir)
            of = f"/{total}" if total else ""
            if who := lock_holder(j.run_dir):
                left = _minutes_left(j.run_dir, total)
                state, detail = "running", f"step {logged if logged is not None else '?'}{of}{left}, {who}"
            elif saved:
                state, detail = "stopped", f"resumes from step {saved}{of}"
        if state in ("pending", "stopped") and (who := lock_holder(_claim_dir(out, j)) or _child_alive(_claim_dir(out, j))):
            state, detail = "running", f"claimed by {who}" if who.startswith("process") else who
        run = j.name.split(":", 1)[1]
        if state in ("pending", "stopped") and j.name.startswith("train:") and (retired := retired_why(out, run)):
            state, detail = "retired", f"{retired} ({retired_file(out, run)})"
        elif state in ("pending", "stopped") and run in recipe.runs and (why := not_run_reason(recipe, out, run)):
            state, detail = "held", why
        if state == "pending" and (needs := [d for d in j.deps if not done.get(d, False)]):
            state, detail = "waiting", "for " + ", ".join(needs)
        status.append((j.name, state, detail))
    return status


def format_status(status: list[tuple[str, str, str]]) -> str:
    width = max((len(n) for n, _, _ in status), default=0)
    counts = Counter(state for _, state, _ in status)
    lines = [f"{name:<{width}}  {state:<8} {detail}".rstrip() for name, state, detail in status]
    return "\n".join(lines + [", ".join(f"{n} {state}" for state, n in counts.items())])


# ------------------------------------------------------------------------------------------ table


def gzip_bytes(data: bytes) -> bytes:
    """gzip with neither a time nor a file name in its header: the same content gives the same bytes
    whatever file it goes to (a table's submission and an experiment record's copy of it are one git
    blob)."""
    return gzip.compress(data, mtime=0)


def write_gz(path: Path, entries: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, gzip_bytes(json.dumps(entries).encode()))


def _scored(recipe: Recipe, out: Path, row: RowSpec) -> Path:
    """The submission a (non-random) row's scoring wrote."""
    return out / "scores" / score_key(row, recipe.split) / f"submission_{recipe.split}.json"


def row_entries(recipe: Recipe, out: Path, row: RowSpec, evaluator: Evaluator) -> list[dict]:
    """A scored row's submission entries (a picker row: its run's trajectories, each object chosen
    again by the picker)."""
    entries = json.loads(_scored(recipe, out, row).read_text())
    if row.picker == "name-overlap":
        entries = with_name_overlap_objects(entries, evaluator.episodes.values(), evaluator.data_dir)
    return entries


def random_submission(recipe: Recipe) -> list[dict]:
    """The random row of a table: :func:`~minivln.env.env.random_walker_submission` on the recipe's split
    (REVERIE: an object drawn among those visible where it stops, as ``minivln finetune``'s baseline)."""
    root = resolve_data_dir(recipe.data_dir or None)
    env = NavBatchEnv(load_episodes(recipe.task, recipe.split, root), Graphs(root), batch_size=64,
                      max_steps=recipe.max_action_len)
    goals = ReverieGoals(root) if recipe.task == "reverie" else None
    return random_walker_submission(env, recipe.random_seed, recipe.random_stop_prob, goals)


def _run_config(out: Path, run: str) -> dict[str, Any]:
    f = out / "runs" / run / "config.yaml"
    return (read_yaml(f, "the run's config") or {}) if f.exists() else {}


def write_table(recipe: Recipe, out: Path, commit: str) -> dict[str, Any]:
    """Gzip each scored row's submission, re-score it, and write the table JSON."""

    root = repo_root()
    evaluator = Evaluator(recipe.task, recipe.split, resolve_data_dir(recipe.data_dir or None))
    sub_dir = root / (recipe.submissions or f"docs/results/{recipe.name}")
    rows, missing, per_episode = [], [], {}
    not_run: dict[str, str] = {}  # rows the recipe's rules stopped (a gate not passed, a retired run): why
    # the digest of a given weights folder (a teacher, a checkpoint row), read once however many rows name it
    digest = functools.cache(lambda path: weights_digest(Path(_abs(path, root))))
    for row in recipe.rows:
        gz = sub_dir / f"{slug(row.name)}.json.gz"
        if row.random:
            write_gz(gz, random_submission(recipe))
        else:
            if row.weights == "undecided" or not _scored(recipe, out, row).exists():
                if row.run and (why := not_run_reason(recipe, out, row.run)):
                    not_run[row.name] = why
                else:
                    missing.append(row.name)
                continue
            write_gz(gz, row_entries(recipe, out, row, evaluator))
        summary, per_ep = evaluator.score(load_submission(gz))
        per_episode[row.name] = per_ep
        rec: dict[str, Any] = {"name": row.name, "stage1": row.stage1, "stage2": row.stage2}
        if row.run:
            ft = _run_config(out, row.run)
            init = recipe.runs[row.run].init
            pre = _run_config(out, init) if init and recipe.runs[init].command == "pretrain" else {}
            rec.update({
                "teacher": ft.get("teacher") or None,
                "kd_weight": ft.get("kd_weight") if ft.get("teacher") else None,
                "terms": [k for k, v in (ft.get("kd_terms") or {}).items() if v > 0] if ft.get("teacher") else [],
                "steps": (ft.get("train") or {}).get("max_steps"),
                "batch_size": ft.get("batch_size"),
                "pretrain_steps": (pre.get("train") or {}).get("max_steps"),
                "pretrain_batch_size": pre.get("batch_size"),
                "seed": (ft.get("train") or {}).get("seed"),
                "commit": _trained_commit(out, row.run, commit),
                "run": row.run,
                # which weights were scored: "model" the run's export (its last iteration's unless its best_metric
                # selects), "model-ema" its weight average
                "weights": row.weights,
            })
            if init:  # the run it started from: a pretraining run of its own seed, or another fine-tuning
                rec.update({"pretrain_run": init, "pretrain_seed": (pre.get("train") or {}).get("seed"),
                            "pretrain_commit": _trained_commit(out, init, commit)})
                if started := _mark(out, row.run).get("init_sha256"):  # which weights of it (a run may be trained again)
                    rec["pretrain_weights"] = started
            if ft.get("teacher"):  # which teacher weights, by digest: a shared file has no commit of its own here
                rec["teacher_sha256"] = digest(ft["teacher"])
            teacher_run = recipe.runs[row.run].teacher_run
            if teacher_run:
                rec.update({"teacher_run": teacher_run, "teacher_commit": _trained_commit(out, teacher_run, commit)})
            if pre.get("teacher"):  # the teacher of the pretraining run it started from (stage 1)
                rec["stage1_teacher"] = pre["teacher"]
                rec["stage1_teacher_sha256"] = digest(pre["teacher"])
                stage1_run = recipe.runs[init].teacher_run
                if stage1_run:
                    rec.update({"stage1_teacher_run": stage1_run,
                                "stage1_teacher_commit": _trained_commit(out, stage1_run, commit)})
        elif row.checkpoint:
            # a given checkpoint was trained outside this experiment: its weights are named by their digest, and
            # "commit" is the code that scored it (how it was trained is for its own README to say)
            rec.update({"checkpoint": row.checkpoint, "weights_sha256": digest(row.checkpoint),
                        "commit": commit, "commit_is": "the scoring code's (a given checkpoint, trained elsewhere)"})
        else:
            rec.update({"seed": recipe.random_seed,
                        "agent": f"uniform random neighbour, STOP with p={recipe.random_stop_prob:.4g} before "
                                 f"each move, at most {recipe.max_action_len} moves"})
        rec["episodes"] = len(per_ep)
        rec.update({k: summary[k] for k in evaluator.metric_names})
        for k in ("sr", "spl", "rgs", "rgspl"):
            if k in evaluator.metric_names:
                rec[f"{k}_se"] = mean_se([float(e[k]) for e in per_ep.values()])[1]
        rec["submission"] = str(gz.relative_to(root)) if gz.is_relative_to(root) else str(gz)
        if row.picker:
            rec["picker"] = row.picker
        weights = row_weights(row, out, root) / "model.safetensors"
        if weights.is_file():
            rec["parameters"] = count_parameters(weights)
        if row.note:
            rec["note"] = row.note
        rows.append(rec)
    table = {"table": recipe.table or recipe.name, "recipe": recipe.name, "features": _features_label(recipe, out),
             "task": recipe.task, "split": recipe.split,
             "complete": not missing, "pending": missing, "not_run": not_run, "commit": commit,
             "written": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}
    if recipe.comparisons:
        table["arms"] = arm_summary(rows, sorted({m for c in recipe.comparisons for m in c.metrics}))
        table["comparisons"] = analyse(recipe, rows, per_episode, not_run)
    if recipe.summary.results:
        atomic_write_text(root / recipe.summary.results, json_text(summary_table(recipe, table)))
    if recipe.results:
        atomic_write_text(root / recipe.results, json_text(table))
    atomic_write_text(out / f"{recipe.name}.json", json_text(table))
    if recipe.plots and rows:
        prefix = root / recipe.plots
        plot_bars(table, prefix.with_name(prefix.name + "_bars.png"))
        plot_curves(recipe, out, prefix.with_name(prefix.name + "_curves.png"))
    return table


def count_parameters(path: Path) -> int:
    """Elements of every tensor in a safetensors file (read from its header; tied and compact tables
    counted whole)."""
    return sum(math.prod(shape) for shape in stored_shapes(path).values())


def analyse(recipe: Recipe, rows: list[dict[str, Any]], per_episode: dict[str, dict],
            not_run: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The recipe's comparisons on the rows written so far (a pair whose rows are not there yet is
    listed as pending).  ``not_run``: rows the recipe's rules stopped, with why; an arm none of whose
    rows will run makes its pairs "not run" (over seeds they stay in their group's Holm family, counted
    as p = 1, so that a stopped arm does not loosen the correction of the others)."""
    out: list[dict[str, Any]] = []
    not_run = not_run or {}
    planned = arms([{"name": r.name} for r in recipe.rows])
    stopped = {a: not_run[min(by_seed.items())[1]["name"]]  # arm -> why, when the rules stopped all its rows
               for a, by_seed in planned.items() if all(r["name"] in not_run for r in by_seed.values())}
    written = {r["name"] for r in rows} | {r["name"] for a in stopped for r in planned[a].values()}
    for c in recipe.comparisons:
        group: dict[str, Any] = {"name": c.name, "over": c.over, "metrics": c.metrics}
        pairs = [tuple(p) for p in c.pairs]
        if c.over == "seeds":
            # a verdict reads, for every pair of the group (Holm corrects them together), each seed the
            # recipe lists for both of its arms; before that the tests are interim
            unscored = list(dict.fromkeys(
                planned[x][s]["name"] for a, b in pairs if a in planned and b in planned
                for s in sorted(set(planned[a]) & set(planned[b])) for x in (a, b)
                if planned[x][s]["name"] not in written))
            # a row stopped while other seeds of its arm ran is not scored either: no verdict on fewer seeds
            lost = [n for n in unscored if n in not_run]
            try:
                group["tests"] = compare_over_seeds(rows, pairs, c.metrics, 0.0 if unscored else c.alpha,
                                                    not_run=stopped)
            except KeyError as exc:
                group["pending"] = str(exc.args[0])
            else:
                if lost:
                    group["pending"] = (f"no verdict: {len(lost)} pre-registered row{'s' if len(lost) != 1 else ''} "
                                        f"of arms that ran were not run ({', '.join(lost)})")
                elif unscored:
                    group["pending"] = (f"interim, no verdict: {len(unscored)} pre-registered row"
                                        f"{'s' if len(unscored) != 1 else ''} not scored yet ({', '.join(unscored)})")
        else:
            group["gaps"], pending, skipped = episode_gaps(c, rows, per_episode, [r.name for r in recipe.rows],
                                                           not_run)
            if skipped:
                group["not_run"] = skipped
            if pending:
                group["pending"] = pending
        out.append(group)
    return out


def episode_gaps(c: ComparisonSpec, rows: list[dict[str, Any]], per_episode: dict[str, dict],
                 planned: list[str] | None = None, not_run: dict[str, str] | None = None
                 ) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """An over-episodes comparison: each pair's paired gaps per metric (an arm stands for each of its
    seeds' rows, those ``planned`` by the recipe, default ``rows``), the pairs whose rows are not scored
    yet, and those with a row in ``not_run`` (stopped by a rule)."""
    by_arm = arms([{"name": n} for n in planned] if planned is not None else rows)
    not_run = not_run or {}
    gaps, pending, skipped = [], [], []

    def names(x: str) -> list[str]:
        return [r["name"] for _, r in sorted(by_arm[x].items())] if x in by_arm else [x]
    for a, b in c.pairs:
        for na in names(a):
            for nb in names(b):
                if na in not_run or nb in not_run:
                    skipped.append(f"{na} - {nb}")
                elif na in per_episode and nb in per_episode:
                    gaps += [{"a": na, "b": nb, **gap_over_episodes(per_episode[na], per_episode[nb], m)}
                             for m in c.metrics]
                else:
                    pending.append(f"{na} - {nb}")
    return gaps, pending, skipped


def summary_table(recipe: Recipe, table: dict[str, Any]) -> dict[str, Any]:
    """The recipe's summary (e.g. Table II): each entry's metrics (an arm: mean and standard error over
    its seeds), parameters, and share of the reference row."""
    spec, rows = recipe.summary, table["rows"]
    by_name = {r["name"]: r for r in rows}
    per_arm, by_arm = arm_summary(rows, spec.metrics), arms(rows)
    ref = by_name.get(spec.reference)
    not_run = table.get("not_run", {})

    def stopped(name: str) -> str | None:  # a row, or an arm every row of which, the recipe's rules stopped
        whys = [not_run.get(r.name) for r in recipe.rows
                if r.name == name or ((m := SEED_ROW.match(r.name)) and m["arm"] == name)]
        return whys[0] if whys and all(whys) else None
    entries = []
    for name in spec.entries:
        if name in per_arm:
            rec: dict[str, Any] = {"name": name, "seeds": per_arm[name]["seeds"],
                                   # every seed runs one network: any seed whose weights are on this machine
                                   "parameters": next((r["parameters"] for r in by_arm[name].values()
                                                       if r.get("parameters")), None)}
            for m in spec.metrics:
                rec[m], rec[f"{m}_se_over_seeds"] = per_arm[name][m]["mean"], per_arm[name][m]["se"]
        elif name in by_name:
            rec = {"name": name, "parameters": by_name[name].get("parameters"),
                   **{m: by_name[name].get(m) for m in spec.metrics},
                   **{f"{m}_se": by_name[name].get(f"{m}_se") for m in spec.metrics if f"{m}_se" in by_name[name]}}
        elif why := stopped(name):
            entries.append({"name": name, "not_run": why})
            continue
        else:
            entries.append({"name": name, "pending": True})
            continue
        if ref is not None:
            rec["share_of_reference"] = {m: (rec[m] / ref[m] if ref.get(m) and rec.get(m) is not None else None)
                                         for m in spec.metrics}
            if rec.get("parameters") and ref.get("parameters"):
                rec["share_of_reference"]["parameters"] = rec["parameters"] / ref["parameters"]
        entries.append(rec)
    return {"table": spec.table, "recipe": recipe.name, "from": recipe.results, "reference": spec.reference,
            "features": table["features"], "task": table["task"], "split": table["split"],
            "complete": table["complete"] and not any(e.get("pending") for e in entries),
            "commit": table["commit"], "written": table["written"], "entries": entries}


BAR_METRICS = (("sr", "SR (success rate)"), ("spl", "SPL (success weighted by path length)"),
               ("rgs", "RGS (success with the right object)"), ("rgspl", "RGSPL (RGS weighted by path length)"))


def bar_metrics(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The rates :func:`plot_bars` draws, with their legend: those of :data:`BAR_METRICS` the rows have."""
    return [(k, label) for k, label in BAR_METRICS if k in rows[0]]


def plot_bars(table: dict[str, Any], path: Path) -> None:
    """SR and SPL of every row (REVERIE: RGS and RGSPL too) with +-1 standard error bars (over episodes)."""
    rows = table["rows"]
    metrics = bar_metrics(rows)
    width = 0.8 / len(metrics)
    fig = new_figure(1.6 + 0.55 * len(metrics) * len(rows), 3.8)
    ax = fig.add_subplot(1, 1, 1)
    x = list(range(len(rows)))
    for j, (key, label) in enumerate(metrics):
        off = (j - (len(metrics) - 1) / 2) * width
        vals = [100 * r[key] for r in rows]
        errs = [100 * r[f"{key}_se"] for r in rows]
        bars = ax.bar([i + off for i in x], vals, width * 0.95, yerr=errs, capsize=3, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    ax.set_xticks(x, [r["name"] for r in rows], rotation=20, ha="right")
    ax.set_ylabel("% of episodes (+-1 s.e.)")
    ax.set_title(f"{table['table']}\n{table['split']}, {rows[0]['episodes']} episodes, {table['features']} features",
                 fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    save_png(fig, path, tight=True)


SEED_STYLES = (("-", "o"), ("--", "s"), (":", "D"), ("-.", "^"), ("-", "v"), ("--", "P"), (":", "X"), ("-.", "*"))
"""(line style, marker) of seed s of an arm: ``SEED_STYLES[s % 8]`` (the arm gives the colour)."""


def curve_rows(recipe: Recipe, out: Path) -> list[tuple[RowSpec, list[dict], list[dict], dict[str, Any]]]:
    """What :func:`plot_curves` draws: each row trained here with at least one validation so far, its
    validation and training records, and its line's style (a colour per arm, a line style and marker per
    seed).  One line per run: a picker row, or a second row of a run (its weight average), walks or
    validates as the first."""
    colours: dict[str, str] = {}
    drawn, runs = [], set()
    for row in recipe.rows:
        log = out / "runs" / row.run / "log.jsonl"
        if not row.run or row.picker or row.run in runs or not log.exists():
            continue
        records = read_jsonl(log)
        val = [r for r in records if r.get("kind") == "val" and "val_unseen.sr" in r]
        if not val:
            continue
        train = [r for r in records if r.get("kind") == "train" and "loss" in r]
        m = SEED_ROW.match(row.name)
        arm, seed = (m["arm"], int(m["seed"])) if m else (row.name, 0)
        linestyle, marker = SEED_STYLES[seed % len(SEED_STYLES)]
        style = {"color": colours.setdefault(arm, f"C{len(colours) % 10}"), "linestyle": linestyle,
                 "marker": marker, "label": row.name}
        drawn.append((row, val, train, style))
        runs.add(row.run)
    return drawn


def plot_curves(recipe: Recipe, out: Path, path: Path) -> None:
    """Per row trained here (:func:`curve_rows`): its run's validation SR and SPL (REVERIE: and RGS) over
    fine-tuning steps (the subset the run validated on), and its training loss."""
    keys = ["val_unseen.sr", "val_unseen.spl"] + (["val_unseen.rgs"] if recipe.task == "reverie" else [])
    fig = new_figure(4.4 * (len(keys) + 1), 3.8)
    axes = [fig.add_subplot(1, len(keys) + 1, k + 1) for k in range(len(keys) + 1)]
    for _, val, train, style in curve_rows(recipe, out):
        for ax, key in zip(axes, keys):
            ax.plot([r["step"] for r in val], [100 * r.get(key, math.nan) for r in val], **style)
        if train:  # a running mean over 10 records: the raw loss is noisy
            ys = [r.get("loss/task", r["loss"]) for r in train]  # the action loss, without KD terms
            smooth = [sum(ys[max(0, i - 9):i + 1]) / len(ys[max(0, i - 9):i + 1]) for i in range(len(ys))]
            axes[-1].plot([r["step"] for r in train], smooth, **{**style, "marker": None})
    titles = ("validation SR (%)", "validation SPL (%)", "validation RGS (%)")[:len(keys)] \
        + ("training action loss (running mean of 10 logs)",)
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("fine-tuning step")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:  # below the panels: a legend inside one would hide its curves
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(4, len(labels)),
                   fontsize=8, frameon=False)
    fig.suptitle(f"{recipe.table}: validation on the runs' own subset of {recipe.split}", fontsize=9)
    save_png(fig, path, tight=True)


def _features_label(recipe: Recipe, out: Path) -> str:
    """"stand-in" or "real": from the recipe's feature file, or, without one (``--table-only`` on a
    finished directory), from what every scoring recorded; a ConfigError if they disagree or none did."""
    if recipe.features:
        return "stand-in" if FeatureStore(_abs(recipe.features, repo_root())).is_standin else "real"
    labels = set()
    for row in recipe.rows:
        if not row.random and row.weights != "undecided":
            metrics = _scored(recipe, out, row).with_name(f"metrics_{recipe.split}.json")
            if metrics.is_file():
                labels.add(_read_json(metrics, "a scoring's metrics").get("features"))
    if len(labels) != 1 or None in labels:
        found = ", ".join(sorted(map(str, labels))) or "no scored row"
        raise ConfigError(f"recipe {recipe.name}: which features the table used is not known ({found}); "
                          "give features=FILE")
    return labels.pop()


def format_table(table: dict[str, Any]) -> str:
    rates = [k for k in ("sr", "spl", "rgs", "rgspl") if table["rows"] and k in table["rows"][0]]
    width = max([22] + [len(r["name"]) for r in table["rows"]])
    share = bool(table["rows"]) and "grounded_share" in table["rows"][0]  # REVERIE: RGS / SR
    header = f"{'row':<{width}} {'episodes':>8} " + " ".join(f"{k.upper():>14}" for k in rates)
    lines = [f"{table['table']} ({table['features']} features, {table['split']}, all episodes)",
             header + (f" {'RGS|SR':>7}" if share else "")]
    for r in table["rows"]:
        g = r.get("grounded_share")
        lines.append(f"{r['name']:<{width}} {r['episodes']:>8} "
                     + " ".join(f"{r[k]:>7.3f} ±{r[k + '_se']:.3f}" for k in rates)
                     + (f" {'-' if g is None else f'{100 * g:.1f}%':>7}" if share else ""))
    if table["pending"]:
        lines.append(f"pending: {', '.join(table['pending'])}")
    for name, why in table.get("not_run", {}).items():
        lines.append(f"not run: {name}: {why}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ CLI


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experiment", help="run a paper table's grid of runs from a recipe (resumable, pinned code)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", metavar="RECIPE [key=value ...]", nargs="+",
                   help="recipe YAML, or a name from configs/experiments (e.g. r2r-table3), then recipe "
                        "overrides such as features=FEATS.hdf5")
    p.add_argument("--out", required=True, help="experiment directory (shared by recipes that reuse runs)")
    p.add_argument("--jobs", type=int, default=2, help="processes at a time (one torch thread each by default)")
    p.add_argument("--commit", default=None, help="code to pin on the first call (default HEAD)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the jobs, their commands and the pre-flight check (exit 2 on any problem); "
                        "run nothing")
    p.add_argument("--table-only", action="store_true", help="write the table from what has finished")
    p.add_argument("--status", action="store_true",
                   help="where each job stands (done, running at step N, stopped, held by a gate, waiting, "
                        "pending), read from OUT without starting anything")
    p.add_argument("--launcher", default="",
                   help="command that starts each training run instead of python, e.g. 'torchrun --standalone "
                        "--nproc_per_node 4' (several GPUs per run; use with --jobs 1)")
    p.add_argument("--gpus", default="",
                   help="GPU slots for training runs side by side: '0,1,2,3' (one GPU per run) or '0+1,2+3' "
                        "(two GPUs per run, with a --launcher of 2 processes); each run sees only its slot")
    p.add_argument("--only", default="", metavar="JOB,JOB",
                   help="run only these jobs, comma-separated (names as --dry-run lists them, shell patterns "
                        "allowed: 'train:rev-*-s2,score:rev-*-s2'), gates and done marks as usual; every job "
                        "they need must be done or selected too (e.g. a second driver on a free core)")
    p.add_argument("--adopt", metavar="RUN=DIR", default=None,
                   help="take DIR, a finished run trained outside this command with the recipe's config of "
                        "RUN, as RUN (copied into OUT/runs, marked done); needs --adopt-commit; runs nothing")
    p.add_argument("--adopt-commit", default=None, help="the commit --adopt's run was trained with")
    p.add_argument("--adopt-note", default="", help="how --adopt's run was trained (kept in its done mark)")
    p.add_argument("--retire", metavar="RUN", default=None,
                   help="stop RUN for good by a pre-registered rule (e.g. a futility stop): the driver never "
                        "resumes it, what needs it is held, its rows are reported as not run; needs --why; "
                        "stop its process first; runs nothing")
    p.add_argument("--why", default="", help="--retire's reason, as the pre-registration states the rule")
    p.add_argument("--save-record", metavar="DIR", default=None,
                   help="copy what OUT knows -- pin, done marks, run configs and logs, scorings; not weights or "
                        "checkpoints -- to DIR (a few MB, e.g. to commit), so that another machine can go on; runs nothing")
    p.add_argument("--load-record", metavar="DIR", default=None,
                   help="put a --save-record DIR into OUT (never over other work); a run whose weights are "
                        "then missing is trained again only when a pending job needs it and nothing scored it; "
                        "runs nothing")
    p.set_defaults(func=_main, extra_positionals="recipe")  # overrides may also follow the options


def _main(args: argparse.Namespace) -> int:
    name, overrides = args.recipe[0], args.recipe[1:]
    modes = [o for o, on in (("--adopt", args.adopt is not None), ("--retire", args.retire is not None),
                             ("--status", args.status), ("--dry-run", args.dry_run),
                             ("--table-only", args.table_only), ("--save-record", args.save_record is not None),
                             ("--load-record", args.load_record is not None)) if on]
    if len(modes) > 1:
        raise ConfigError(f"{' and '.join(modes)} do different things: give one")
    if args.why and args.retire is None:
        raise ConfigError("--why goes with --retire RUN")
    if args.save_record is not None:  # the whole directory, whatever the recipe: it reads files only
        rec = save_record(Path(args.out), Path(args.save_record))
        print(f"record of {rec['from']}: {len(rec['files'])} files, {len(rec['weights_sha256'])} weights' digests "
              f"-> {Path(args.save_record).resolve()} (no weights)")
        return 0
    if args.load_record is not None:
        written = load_record(Path(args.load_record), Path(args.out))
        print(f"loaded {len(written)} files of {Path(args.load_record).resolve()} into {Path(args.out).resolve()}")
        return 0
    recipe = load_recipe(name, overrides)
    if args.retire is not None:  # needs no features: it reads and writes marks only
        rec = retire_run(recipe, Path(args.out), args.retire, args.why)
        print(f"retired {args.retire} in {Path(args.out).resolve()} (checkpoint at step {rec['checkpoint_step']}): "
              f"{rec['why']}")
        return 0
    if not recipe.features and not (args.status or args.table_only):  # these read marks, logs and scores only
        raise ConfigError("the recipe needs features=FILE (view features, HDF5)")
    if args.jobs < 1:
        raise ConfigError("--jobs must be >= 1")
    out = Path(args.out).resolve()
    launcher = shlex.split(args.launcher)
    gpus = parse_gpus(args.gpus)
    only = [p.strip() for p in args.only.split(",") if p.strip()] or None
    if args.adopt:
        run, _, src = args.adopt.partition("=")
        if not src or not args.adopt_commit:
            raise ConfigError("--adopt RUN=DIR needs a directory and --adopt-commit COMMIT")
        rec = adopt_run(recipe, out, run, Path(src), commit=args.adopt_commit, note=args.adopt_note)
        print(f"adopted {src} as {out / 'runs' / run} (commit {rec['commit'][:12]})")
        return 0
    if args.status:
        jobs = select_jobs(plan(recipe, out, out / "code", launcher), only, out)
        print(format_status(job_status(recipe, out, jobs)))
        return 0
    if args.dry_run:
        pin = out / "pin.json"
        commit = _read_json(pin, "the pin file").get("commit", "?") if pin.exists() else "(HEAD)"
        code = out / "code"
        for j in select_jobs(plan(recipe, out, code, launcher), only, out):
            print(f"{j.name}  after {', '.join(j.deps) or '-'}\n    {' '.join(j.argv)}")
        print(f"code: {commit} at {code}")
        print(preflight(recipe, out, only=only), flush=True)  # every problem at once: PreflightError, exit 2
        return 0
    ok, table = run_experiment(recipe, out, jobs=args.jobs, commit=args.commit, table_only=args.table_only,
                               launcher=launcher, gpus=gpus, only=only)
    print(format_table(table))
    if recipe.results:
        print(f"table: {recipe.results}")
    return 0 if ok else 1


def run_experiment(recipe: Recipe, out: Path, *, jobs: int = 2, commit: str | None = None, pin: bool = True,
                   table_only: bool = False, launcher: list[str] | None = None,
                   gpus: list[str] | None = None,
                   on_finished: Callable[[Job], None] | None = None,
                   only: Sequence[str] | None = None) -> tuple[bool, dict[str, Any]]:
    """Pin the code (``pin=False``: run this checkout in place, for tests), run what is pending
    (``on_finished``: see :func:`execute`; the recipe's gates hold runs; ``only``: the jobs matching
    these names or shell patterns, see :func:`select_jobs`), write the table; ``(no job failed,
    table)`` (held runs are no failure: the table says what is pending)."""
    out = Path(out).resolve()
    # before any work: the experiment directory and where the table and submissions go must take files
    check_writable_dir(out, "experiment directory")
    root = repo_root()
    if recipe.results:
        check_writable_dir((root / recipe.results).parent, "results directory")
    check_writable_dir(root / (recipe.submissions or f"docs/results/{recipe.name}"), "submissions directory")
    if recipe.plots:  # the pictures need the plot extra: say so before hours of training, not after
        require_matplotlib()
    if not table_only:  # before the pin and any job: what the runs and rows need (PreflightError)
        print(preflight(recipe, out, None if pin else root, only), flush=True)
    if pin:
        commit, code = pin_checkout(out, commit)
    else:
        commit, code = "unpinned", repo_root()
    print(f"{recipe.name}: code {commit[:12]} at {code}; runs in {out / 'runs'}", flush=True)
    ok = True
    if not table_only:
        every = plan(recipe, out, code, launcher)
        hold = gate_keeper(recipe, out)
        chosen, lost_held = requeue_lost(every, out, select_jobs(every, only, out))
        ok = execute(chosen, out, code, commit, max_jobs=jobs, threads=recipe.threads, gpus=gpus,
                     on_finished=on_finished, hold=hold, lost_held=lost_held)
    return ok, write_table(recipe, out, commit)


def gate_keeper(recipe: Recipe, out: Path) -> Callable[[Job], str | None]:
    """:func:`execute`'s ``hold`` for retired runs (``--retire``) and the recipe's gates: each gate is
    read once per call, when the first run it holds could start, and its verdict written to
    ``OUT/gates/NAME.json`` (and appended to ``OUT/gates/NAME.history.jsonl``, so that a later reading,
    e.g. of a continued teacher, does not erase the first)."""
    verdicts: dict[str, tuple[bool, str]] = {}

    def hold(job: Job) -> str | None:
        if not job.name.startswith("train:"):
            return None
        if (retired := retired_why(out, job.name.split(":", 1)[1])) is not None:
            return f"retired: {retired}"
        for gate in gates_of(recipe, job.name.split(":", 1)[1]):
            if gate.name not in verdicts:
                verdicts[gate.name] = gate_check(recipe, out, gate)
                passed, why = verdicts[gate.name]
                print(why, flush=True)
                record = {"gate": gate.name, "passed": passed, "why": why, "rows": gate.rows, "min_se": gate.min_se,
                          "runs": gate_runs(recipe, gate),
                          "read": time.strftime("%Y-%m-%d %H:%M:%S")}
                atomic_write_text(gate_file(out, gate), json_text(record))
                with open(gate_file(out, gate, ".history.jsonl"), "a") as f:  # every reading kept
                    f.write(json_text(record, indent=None))
            passed, why = verdicts[gate.name]
            if not passed:
                return why
        return None
    return hold


__all__ = ["PreflightError", "Recipe", "RowSpec", "RunSpec", "GateSpec", "adopt_run", "checkpoint_bytes",
           "format_status", "gate_check", "gate_verdict", "job_status", "load_recipe", "not_run_reason", "pin_checkout",
           "plan", "preflight", "retire_run", "run_experiment", "select_jobs", "write_table"]
