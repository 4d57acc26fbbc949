"""``minivln demo``: the method on the built-in toy world, distilled from a released teacher.

The paper distils the released ScaleVLN weights; it does not train its teacher.  The demo does the
same at toy scale: a DUET teacher trained once by ``configs/experiments/demo-teacher.yaml`` (a budget
the demo cannot afford) ships with the package in ``minivln/demo_teacher/`` (fp16, checksummed in its
``manifest.json``; ``minivln demo --train-teacher DIR`` trains and packs it again).  The demo

1. builds the seeded toy world (300 val_unseen instructions) and its stand-in visual features;
2. checks the released teacher against its checksums and unpacks it;
3. scores the shortest-path expert and the seeded random walker (the table's own) on val_unseen;
4. runs the ``demo`` recipe (``configs/experiments/demo.yaml``, two processes at a time): the student
   distilled in two stages from the released teacher (stage 1 while pretraining, stage 2 while
   fine-tuning), and the same student trained alone with the same steps; scores every row;
5. prints the rows with standard errors, says whether teacher > two-stage > alone holds (and how far
   apart), draws the bars of the table (``table_bars.svg``: no matplotlib needed);
6. exports the distilled student to ONNX (fp32 and int8, with the ``deploy`` extra) and times one
   episode of the teacher and of the student on each runtime;

and closes with a paragraph: what was shown, where the files are, what to run on real data.
Everything goes under ``--out`` (default ``$MINIVLN_CACHE/demo``, i.e. ``~/.cache/minivln/demo``);
a second call reuses what is finished.  STAND-IN features, toy world: this shows the method and its
code path, not the paper's numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from minivln.bench.common import cpu_info
from minivln.bench.model import record_episode, run_episode
from minivln.data.datasets import load_episodes
from minivln.data.graph import Graphs
from minivln.data.tokenizer import CLS_ID, MASK_ID, PAD_ID, SEP_ID, UNK_ID, get_tokenizer
from minivln.data.toyworld import SPLITS, ToyWorldConfig, ensure_toy_world
from minivln.deploy.export import export_model, require_onnx
from minivln.deploy.runtime import OnnxRuntimeDUET
from minivln.env.env import NavBatchEnv, evaluate_policy, expert_policy
from minivln.evaluation.evaluator import Evaluator
from minivln.evaluation.stats import mean_se
from minivln.experiment import Job, Recipe, load_recipe, random_submission, run_experiment
from minivln.features.hdf5 import FeatureStore
from minivln.features.standin import build_standin
from minivln.model.checkpoint import (
    CONFIG_NAME,
    ROWS_KEY,
    WEIGHTS_NAME,
    load_agent_model,
    read_agent_config,
    read_safetensors,
)
from minivln.model.duet import DUET
from minivln.paths import DataError, atomic_write_text, cache_dir
from minivln.training.plot import bars_svg

DEMO_SEED = 0
DEMO_WORLD = ToyWorldConfig(r2r_val_unseen=100)  # 100 paths x 3 instructions: 300 val_unseen instructions
TEACHER_DIR = Path(__file__).resolve().parent / "demo_teacher"  # the released teacher (package data)
MANIFEST = "manifest.json"
TEACHER_PARTS = ("pretrained", "model")  # stage 1's teacher (pretrained), stage 2's (fine-tuned; its table row)
VOCAB_ROWS = "vocab_rows"  # the word ids whose embedding rows a packed file keeps
EXPERT_ROW, TEACHER_ROW, KD_ROW = "expert (shortest path)", "teacher (released)", "student, two-stage KD"
ALONE_ROW, RANDOM_ROW = "student alone", "random walk"

SHOWN = ("sr", "spl", "nav_error", "oracle_sr", "ndtw", "cls", "trajectory_length")
HEADERS = ("SR", "SPL", "NE (m)", "OSR", "nDTW", "CLS", "TL (m)")
RATE_KEYS = {"sr", "spl", "oracle_sr", "ndtw", "cls"}
EXPLAINED = ("SR = success rate (stops within 3 m of the goal), SPL = success weighted by path length, "
             "NE = navigation error (m from the goal), OSR = oracle success rate (passed within 3 m), "
             "nDTW = normalised dynamic time warping (path fidelity), CLS = coverage weighted by length score, "
             "TL = trajectory length (m); rates in %, SR and SPL +- one standard error over instructions")
NEXT_ON_REAL_DATA = (
    "minivln download --data-dir ~/vln-data && export MINIVLN_DATA=~/vln-data && "
    "minivln features build --out ~/vln-data/standin_views.hdf5 && "
    "minivln experiment r2r-table3 --out runs/r2r-distill features=~/vln-data/standin_views.hdf5 --dry-run "
    "(lists Table III's runs and checks what they need, its teachers included, before anything starts)"
)


# ------------------------------------------------------------------------------ world and features


def prepare_world(out: Path, progress: bool = True) -> tuple[Path, Path]:
    """The demo's toy world and its stand-in view features under ``out`` (reused when present)."""
    data_dir = ensure_toy_world(out / "toyworld", seed=DEMO_SEED, config=DEMO_WORLD)
    feats = out / "features" / "standin_views.hdf5"
    if not feats.is_file():  # compressed: lossless, 0.6x the disk
        build_standin(data_dir, feats, progress=progress, compress=True)
    return data_dir, feats


def world_record() -> dict[str, Any]:
    return {"seed": DEMO_SEED, "config": DEMO_WORLD.__dict__.copy()}


# ------------------------------------------------------------------------------ the released teacher


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def vocab_rows(data_dir: Path) -> list[int]:
    """The word ids a toy world's R2R instructions use (every split), plus BERT's special tokens: the
    rows of the word-embedding table that a packed teacher keeps."""
    tok = get_tokenizer(512)
    ids = {PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID}
    for split in SPLITS:
        for ids_ in tok.encode_batch([ep.instruction for ep in load_episodes("r2r", split, data_dir)]):
            ids.update(ids_)
    return sorted(ids)


def pack_teacher(sources: dict[str, Path], data_dir: Path, dest: Path, provenance: dict[str, Any]) -> dict[str, Any]:
    """Write a release of the teacher into ``dest``: per part (``TEACHER_PARTS``: a saved model
    directory each) one fp16 safetensors file whose word-embedding tables keep only the rows of
    :func:`vocab_rows`, and ``manifest.json`` (configs, sha256 of each file, the world, ``provenance``)."""
    dest.mkdir(parents=True, exist_ok=True)
    rows = torch.tensor(vocab_rows(data_dir), dtype=torch.int32)
    parts = {}
    for part in TEACHER_PARTS:
        src = Path(sources[part])
        config = json.loads((src / CONFIG_NAME).read_text())
        packed, compact = {VOCAB_ROWS: rows}, []
        for key, value in read_safetensors(src / WEIGHTS_NAME).items():
            value = value.half() if value.is_floating_point() else value
            if value.ndim == 2 and value.shape[0] == config["vocab_size"]:  # a word-embedding table
                compact.append(key)
                value = value[rows.long()]
            packed[key] = value.contiguous()
        path = dest / f"{part}.safetensors"
        save_file(packed, str(path))
        path.chmod(0o644)
        parts[part] = {"file": path.name, "sha256": sha256(path), "bytes": path.stat().st_size,
                       "source": str(src), "compact": compact, "config": config}
    manifest = {"name": "minivln demo teacher", "format": 1, "world": world_record(),
                "vocab_rows": len(rows), "parts": parts, **provenance}
    atomic_write_text(dest / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def read_manifest(release: Path = TEACHER_DIR) -> dict[str, Any]:
    path = release / MANIFEST
    if not path.is_file():
        raise DataError(f"the released demo teacher is missing ({path}): reinstall minivln, or train and pack "
                        "one with `minivln demo --train-teacher DIR`")
    manifest = json.loads(path.read_text())
    if manifest.get("world") != world_record():
        raise DataError(f"the released teacher {release} was trained on another toy world than the demo's "
                        f"({manifest.get('world')} vs {world_record()}): train it again with "
                        "`minivln demo --train-teacher DIR`")
    return manifest


def unpack_teacher(dest: Path, release: Path = TEACHER_DIR) -> dict[str, Any]:
    """Check the released teacher's files against their sha256 and write each part as a saved model
    directory ``dest/PART`` (fp16; word-embedding rows no toy instruction uses are zero), reusing one
    unpacked from the same file; returns the manifest.  The weights file keeps the release's compact
    tables, its header saying how to expand them (``minivln.rows``: every reader of saved models does),
    so that the zero rows take no disk."""
    manifest = read_manifest(release)
    for part in TEACHER_PARTS:
        info = manifest["parts"][part]
        path = release / info["file"]
        if not path.is_file() or sha256(path) != info["sha256"]:
            raise DataError(f"{path} does not match the sha256 in {release / MANIFEST}: the released teacher is "
                            "damaged; reinstall minivln")
        target, stamp = dest / part, dest / part / "released.sha256"
        if stamp.is_file() and stamp.read_text().strip() == info["sha256"]:
            continue
        rows = {"index": VOCAB_ROWS, "rows": info["config"]["vocab_size"], "keys": info["compact"]}
        target.mkdir(parents=True, exist_ok=True)
        save_file(load_file(str(path)), str(target / WEIGHTS_NAME), metadata={ROWS_KEY: json.dumps(rows)})
        atomic_write_text(target / CONFIG_NAME, json.dumps(info["config"], indent=2) + "\n")
        atomic_write_text(stamp, info["sha256"] + "\n")
    return manifest


def train_teacher(out: str | Path, jobs: int = 1, overrides: list[str] | tuple[str, ...] = (), pin: bool = True,
                  progress: bool = True) -> dict[str, Any]:
    """``minivln demo --train-teacher OUT``: run the ``demo-teacher`` recipe on the demo's world (pinned
    to HEAD, resumable) and pack the result into ``OUT/release`` (the files of ``minivln/demo_teacher``).
    ``overrides``: ``key=value`` for the recipe (e.g. a test's tiny budget); ``pin=False`` runs this
    checkout in place (tests)."""
    out = Path(out).resolve()
    t0 = time.perf_counter()
    data_dir, feats = prepare_world(out, progress)
    recipe = load_recipe("demo-teacher", [f"data_dir={data_dir}", f"features={feats}", f"results={out / 'table.json'}",
                                          f"submissions={out / 'submissions'}", *overrides])
    ok, table = run_experiment(recipe, out / "experiment", jobs=jobs, commit="HEAD" if pin else None, pin=pin)
    if not ok:
        raise DataError(f"a training run of the teacher failed: see {out / 'experiment' / 'logs'}")
    runs = out / "experiment" / "runs"
    row = next(r for r in table["rows"] if r["name"] == "teacher")
    done = [json.loads(f.read_text()) for f in sorted((out / "experiment" / "done").glob("train-*.json"))]
    cpu = cpu_info()
    provenance = {
        "recipe": "configs/experiments/demo-teacher.yaml", "commit": table["commit"],
        "packed": time.strftime("%Y-%m-%d"), "machine": f"{cpu['model_name']}, {cpu['logical_cpus']} CPUs",
        "torch": torch.__version__, "train_seconds": sum(d.get("seconds", 0.0) for d in done),
        "val_unseen_before_packing": {k: row[k] for k in ("episodes", "sr", "sr_se", "spl", "spl_se")},
        "reproduce": f"minivln demo --train-teacher {out}",
    }
    manifest = pack_teacher({"pretrained": runs / "teacher-pre" / "pretrained", "model": runs / "teacher" / "model"},
                            data_dir, out / "release", provenance)
    print(f"packed the teacher into {out / 'release'} in {time.perf_counter() - t0:.0f} s; to ship it: "
          f"cp {out / 'release'}/* {TEACHER_DIR}/")
    return manifest


# ------------------------------------------------------------------------------ scoring and reading


def _pm(rate: float, se: float) -> str:
    return f"{100 * rate:.1f}±{100 * se:.1f}"


def scored(evaluator: Evaluator, preds: list[dict]) -> dict[str, float]:
    """Metrics of a submission, with the standard errors of SR and SPL over its instructions."""
    summary, per_ep = evaluator.score(preds)
    summary = dict(summary)
    for k in ("sr", "spl"):
        summary[f"{k}_se"] = mean_se([float(e[k]) for e in per_ep.values()])[1]
    return summary


def metric_row(name: str, m: dict, width: int = 26) -> str:
    cells = [_pm(m[k], m[f"{k}_se"]) if f"{k}_se" in m else f"{100 * m[k]:.1f}" if k in RATE_KEYS else f"{m[k]:.2f}"
             for k in SHOWN]
    return f"{name:<{width}}" + "".join(f"{c:>11}" for c in cells)


def verdict(teacher: float, kd: float, alone: float, gaps: dict[str, tuple[float, float]]) -> tuple[bool, str]:
    """Whether teacher SR > two-stage SR > alone SR holds, and a sentence that says so.  SRs are
    fractions; ``gaps`` holds the paired SR differences (mean, standard error over the instructions) of
    ``"teacher - two-stage"`` and ``"two-stage - alone"``."""
    holds = teacher > kd > alone
    sizes = "; ".join(f"{name}: {100 * m:+.1f} ± {100 * se:.1f}" + (" (under 2 s.e.)" if not m > 2 * se else "")
                      for name, (m, se) in gaps.items())
    sizes = (f"paired differences in SR points over the same instructions, {sizes} (one training seed: "
             "these standard errors are over instructions, not over training runs)")
    if holds:
        weak = [name for name, (m, se) in gaps.items() if not m > 2 * se]
        caveat = (f" A gap under two standard errors ({' and '.join(weak)}) is not established by one run: "
                  "another training seed may reverse it." if weak else "")
        return True, (f"The order holds: teacher {100 * teacher:.1f} > two-stage student {100 * kd:.1f} > "
                      f"student alone {100 * alone:.1f} (SR); {sizes}.{caveat}")
    broken = [what for what, ok in (("the teacher is not ahead of the two-stage student", teacher > kd),
                                    ("distillation did not beat the student alone", kd > alone)) if not ok]
    return False, (f"The order teacher > two-stage > alone does NOT hold in this run: {'; '.join(broken)} "
                   f"(SR {100 * teacher:.1f} / {100 * kd:.1f} / {100 * alone:.1f}); {sizes}. "
                   "This run does not show distillation helping; nothing was tuned to make it.")


def sr_gaps(table: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """The recipe's paired SR comparisons from the table: ``{"A - B": (mean, se)}``."""
    short = {TEACHER_ROW: "teacher", KD_ROW: "two-stage", ALONE_ROW: "alone"}
    return {f"{short[g['a']]} - {short[g['b']]}": (g["mean"], g["se"])
            for c in table.get("comparisons", []) for g in c.get("gaps", []) if g["metric"] == "sr"}


def pruner(out: Path, recipe: Recipe) -> Callable[[Job], None]:
    """The runner's ``on_finished`` for the demo: as soon as a training run has finished, what no job
    still to run needs goes, so that the demo's disk stays small: the run's resume checkpoint
    (``latest/``: a finished run is not run again), a pretraining run's weights once every run that
    starts from them has finished, and the unpacked stage-1 teacher once every run that learns from it
    has finished.  A demo stopped mid-way still resumes: a running run keeps its ``latest/``."""
    runs, stage1 = out / "experiment" / "runs", out / "teacher" / "pretrained"
    starts_from = {name: {r for r, spec in recipe.runs.items() if spec.init == name} for name in recipe.runs}
    learn_stage1 = {r for r, spec in recipe.runs.items() if Path(str(spec.overrides.get("teacher", ""))) == stage1}
    finished: set[str] = set()

    def on_finished(job: Job) -> None:
        if not job.name.startswith("train:"):
            return
        run = job.name.split(":", 1)[1]
        finished.add(run)
        drop = [runs / run / "latest", runs / run / ".latest.old"]
        drop += [runs / name / "pretrained" for name, users in starts_from.items() if users and users <= finished]
        if learn_stage1 and learn_stage1 <= finished:
            drop.append(stage1)
        for path in drop:
            shutil.rmtree(path, ignore_errors=True)

    return on_finished


def prune(out: Path) -> None:
    """Drop what a finished demo no longer needs: every run's resume state (``latest/``), the students'
    pretrained weights (their fine-tuning runs have started from them) and the unpacked stage-1 teacher
    (a later call unpacks it again if a run needs it)."""
    for run in (out / "experiment" / "runs").iterdir():
        for sub in [*run.glob("latest*"), *run.glob(".latest*"), run / "pretrained"]:
            if sub.is_dir():
                shutil.rmtree(sub)
    shutil.rmtree(out / "teacher" / "pretrained", ignore_errors=True)


def parameters(checkpoint: Path) -> int:
    """The parameter count of a saved network (built on the meta device: no memory, no weights read)."""
    with torch.device("meta"):
        return sum(p.numel() for p in DUET(read_agent_config(checkpoint)).parameters())


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


# ------------------------------------------------------------------------------ the demo


def demo_recipe(out: Path, data_dir: Path, feats: Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """The ``demo`` recipe with its files under ``out`` (the released teacher unpacked in ``out/teacher``)."""
    return load_recipe("demo", [f"data_dir={data_dir}", f"features={feats}", f"inputs.teacher={out / 'teacher'}",
                                f"results={out / 'table.json'}", f"submissions={out / 'submissions'}", *overrides])


def run_demo(out: str | Path | None = None, jobs: int = 2, train: bool = True, deploy: bool = True,
             overrides: list[str] | tuple[str, ...] = (), release: Path = TEACHER_DIR,
             progress: bool = True) -> dict[str, Any]:
    """The demo end to end (see the module docstring); returns what it measured (also ``OUT/metrics.json``).
    ``overrides``: ``key=value`` for the ``demo`` recipe (e.g. a test's tiny budget); ``release``: the
    teacher's release folder (default: the one shipped with the package)."""
    out = Path(out).resolve() if out is not None else cache_dir("demo")
    t0 = time.perf_counter()
    print("[1/6] the toy world and its STAND-IN visual features", flush=True)
    data_dir, feats = prepare_world(out, progress)
    store = FeatureStore(feats)
    episodes = load_episodes("r2r", "val_unseen", data_dir)
    print(f"      {data_dir}: {len(episodes)} val_unseen instructions in houses no agent trains in; features "
          f"{feats} ({store.dim}-d, {'STAND-IN, not image features' if store.is_standin else 'real'})", flush=True)

    print("[2/6] the released teacher: checksums, unpacked", flush=True)
    manifest = unpack_teacher(out / "teacher", release)
    model_cfg = manifest["parts"]["model"]["config"]
    print(f"      {release} (sha256 checked) -> {out / 'teacher'}: DUET hidden {model_cfg['hidden_size']}, "
          f"layers {model_cfg['num_l_layers']}/{model_cfg['num_pano_layers']}/{model_cfg['num_x_layers']}, "
          f"trained once by {manifest.get('recipe', '?')} ({manifest.get('train_seconds', 0) / 60:.0f} min, "
          f"commit {str(manifest.get('commit', '?'))[:7]}); the demo does not train it", flush=True)

    recipe = demo_recipe(out, data_dir, feats, overrides)
    print("[3/6] reference agents: the shortest-path expert and the seeded random walker", flush=True)
    evaluator = Evaluator("r2r", "val_unseen", data_dir)
    env = NavBatchEnv(episodes, Graphs(data_dir), batch_size=16, features=store)
    rows: dict[str, dict[str, float]] = {EXPERT_ROW: scored(evaluator, evaluate_policy(env, expert_policy,
                                                                                       progress=False))}
    if not train:
        rows[RANDOM_ROW] = scored(evaluator, random_submission(recipe))
    results: dict[str, Any] = {"features": "stand-in" if store.is_standin else "real", "split": "val_unseen",
                               "instructions": len(episodes), "teacher": {k: manifest.get(k) for k in
                                                                          ("recipe", "commit", "train_seconds")},
                               "agents": rows}
    reading = ""
    if train:
        print(f"[4/6] training: the student distilled in two stages from the released teacher, and the same "
              f"student alone ({jobs} process{'es' if jobs != 1 else ''} at a time; each line is a run or a "
              "scoring starting or finishing)", flush=True)
        ok, table = run_experiment(recipe, out / "experiment", jobs=jobs, pin=False, on_finished=pruner(out, recipe))
        if not ok:
            raise DataError(f"a training run of the demo failed: see {out / 'experiment' / 'logs'}")
        for row in table["rows"]:
            rows[row["name"]] = {k: row[k] for k in (*SHOWN, "sr_se", "spl_se")}
        bars_svg(table, out / "table_bars.svg")
        gaps = sr_gaps(table)
        holds, reading = verdict(rows[TEACHER_ROW]["sr"], rows[KD_ROW]["sr"], rows[ALONE_ROW]["sr"], gaps)
        results.update({"order_holds": holds, "reading": reading, "sr_gaps": gaps, "table": str(out / "table.json"),
                        "parameters": {"teacher": parameters(out / "teacher" / "model"),
                                       "student": parameters(out / "experiment" / "runs" / "student-kd" / "model")}})
        prune(out)

    print(f"\n[5/6] R2R-style val_unseen of the toy world, {len(episodes)} instructions, "
          f"{results['features'].upper()} features")
    print(EXPLAINED)
    print(f"{'agent':<26}" + "".join(f"{h:>11}" for h in HEADERS))
    for name, m in rows.items():
        print(metric_row(name, m))
    if train:
        print(reading)
        print(f"(bars of this table: {out / 'table_bars.svg'})")
        results["speed"] = speed(out) if deploy else None
    results["seconds"] = time.perf_counter() - t0
    results["bytes_written"] = disk_bytes(out)
    # --no-train keeps its own file: a full demo's metrics.json stays as it was
    atomic_write_text(out / ("metrics.json" if train else "metrics_no_train.json"), json.dumps(results, indent=2))
    print("\n" + closing(out, results, manifest, release), flush=True)
    return results


def closing(out: Path, results: dict[str, Any], manifest: dict[str, Any], release: Path = TEACHER_DIR) -> str:
    """The demo's last paragraph: what it showed, where the files are, what to run next."""
    secs = results["seconds"]
    took = f"this call {secs / 60:.1f} min" if secs >= 120 else f"this call {secs:.0f} s"
    took += f"; {results['bytes_written'] / 1e6:.0f} MB under {out}"
    if "reading" not in results:
        return (f"Shown ({took}): the toy world, its stand-in features and the official metrics, with the expert "
                f"and the random walker, and the released teacher ({release}) checked. `minivln demo` without "
                f"--no-train distils that teacher into a smaller student and trains the same student alone.\n"
                f"Next, on real data: {NEXT_ON_REAL_DATA}")
    a, n = results["agents"], results["parameters"]
    speed_ = (results.get("speed") or {}).get("speedup_vs_teacher", {})
    fastest = max(speed_.items(), key=lambda kv: kv[1], default=None)
    speed_text = (f" Exported to ONNX, the student runs an episode {fastest[1]:.1f}x faster than the teacher "
                  f"({fastest[0]}, batch 1, one thread)." if fastest else "")
    exported = f", {out / 'export'} (ONNX)" if (out / "export").is_dir() else ""
    order = ("The order teacher > two-stage > alone holds in this run." if results["order_holds"] else
             "The order teacher > two-stage > alone does NOT hold in this run, so it does not show "
             "distillation helping (see above).")
    return (
        f"What this showed ({took}): a DUET teacher released with the package ({n['teacher'] / 1e6:.1f}M parameters, "
        f"trained once for {manifest.get('train_seconds', 0) / 60:.0f} min by {manifest.get('recipe', '?')}) "
        f"reaches SR {100 * a[TEACHER_ROW]['sr']:.1f} on {results['instructions']} instructions in houses no agent "
        f"trained in; a student of {n['student'] / 1e6:.1f}M parameters distilled from it in two stages reaches "
        f"{100 * a[KD_ROW]['sr']:.1f}, and the same student trained alone with the same steps "
        f"{100 * a[ALONE_ROW]['sr']:.1f} (random walker {100 * a[RANDOM_ROW]['sr']:.1f}). {order}{speed_text} "
        f"Toy world, stand-in features: the method and its code at work, not the paper's numbers.\n"
        f"Files: {out / 'metrics.json'} (everything above), {out / 'table.json'} and {out / 'table_bars.svg'} (the "
        f"table and its bars), {out / 'submissions'} (each row's trajectories: `minivln eval --task r2r --split "
        f"val_unseen --data-dir {out / 'toyworld'} --preds FILE` re-scores one), {out / 'experiment'} (runs, "
        f"logs){exported}.\n"
        f"Next, on real data (downloads, then hours to days of CPU; docs/distil.md): {NEXT_ON_REAL_DATA}"
    )


def speed(out: Path, repeats: int = 7) -> dict[str, Any]:
    """[6/6]: export the distilled student to ONNX and time one episode (batch 1, one thread) of the
    teacher and the student on each runtime, interleaved; replays recorded inputs, so the agent's
    bookkeeping is not in these times."""
    student_dir = out / "experiment" / "runs" / "student-kd" / "model"
    teacher, student = load_agent_model(out / "teacher" / "model"), load_agent_model(student_dir)
    torch.set_num_threads(1)
    models: dict[str, Any] = {"teacher (PyTorch)": teacher, "student (PyTorch)": student}
    print("\n[6/6] deployment: the distilled student exported to ONNX (fp32 + int8), then one episode "
          "timed per model (batch 1, one thread)", flush=True)
    try:
        require_onnx()
    except DataError as exc:
        print(f"      export skipped: {exc}")
    else:
        export_dir = out / "export"
        if export_dir.exists():
            shutil.rmtree(export_dir)
        export_model(student, export_dir, source=str(student_dir))
        for name, variant in (("student (ONNX Runtime)", "fp32"), ("student (ONNX Runtime int8)", "int8")):
            models[name] = OnnxRuntimeDUET(export_dir, variant, threads=1)
        print(f"      exported to {export_dir}")
    episodes = {"teacher (PyTorch)": record_episode(teacher, 1)}
    student_ep = record_episode(student, 1)
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(repeats + 1):  # the first round warms up
        order = list(models) if i % 2 == 0 else list(reversed(models))
        for name in order:
            ms = 1e3 * run_episode(models[name], episodes.get(name, student_ep))["episode"]
            if i:
                times[name].append(ms)
    med = {name: statistics.median(v) for name, v in times.items()}
    base = med["teacher (PyTorch)"]
    print(f"{'model':<30}{'ms / episode':>14}{'speed-up':>10}")
    for name, ms in med.items():
        print(f"{name:<30}{ms:>14.1f}{base / ms:>9.1f}x")
    return {"ms_per_episode": med, "speedup_vs_teacher": {k: base / v for k, v in med.items()},
            "repeats": repeats, "batch": 1, "threads": 1,
            "what": "one 7-step episode of recorded network inputs (agent bookkeeping excluded), median"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="zero-download demo: toy world, stand-in features, agents, official metrics")
    p.add_argument("--out", default=None, help="output directory (default $MINIVLN_CACHE/demo, i.e. "
                                               "~/.cache/minivln/demo: outside the source tree)")
    p.add_argument("--no-train", action="store_true", help="only the world, the released teacher's check and the "
                                                           "reference agents (seconds)")
    p.add_argument("--jobs", type=int, default=2, help="training processes at a time (default 2)")
    p.add_argument("--teacher", default=str(TEACHER_DIR), metavar="DIR",
                   help="the teacher's release folder (default: the one shipped with the package; "
                        "--train-teacher packs one)")
    p.add_argument("--train-teacher", metavar="DIR", default=None,
                   help="instead: train the demo's teacher again by configs/experiments/demo-teacher.yaml in DIR "
                        "(pinned to HEAD; tens of minutes) and pack it into DIR/release")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    if args.jobs < 1:
        raise DataError("--jobs must be >= 1")
    if args.train_teacher:
        train_teacher(args.train_teacher, jobs=args.jobs)
    else:
        run_demo(args.out, jobs=args.jobs, train=not args.no_train, release=Path(args.teacher))
    return 0
