"""Fine-tuning a DUET navigation agent on R2R or REVERIE with DAgger (``DUET_INTERFACE.md`` §7).

One iteration = a teacher-forced rollout (loss x ``ml_weight``) on one batch, then a sampled rollout
with labels from the 'spl' expert (loss x 1) on the next batch, both through the shared
:class:`~minivln.training.trainer.Trainer` (AdamW, clipping, checkpoints, resume, logs).
Validation runs arg-max rollouts on every ``val_splits`` split, writes the leaderboard submission
``RUN/submissions/<split>_step<N>.json``, scores it with the :class:`Evaluator` (keys such as
``val_unseen.sr``, ``val_unseen.spl``) and, only when ``train.best_metric`` names one (default: none,
no selection on an evaluation split), keeps ``RUN/best`` by it.  At the end the best (else the last)
weights are exported to ``RUN/model`` (``save_pretrained``)
(with ``train.ema_decay`` > 0 also the weight average of the last step to ``RUN/model-ema``)
and ``RUN/metrics.json`` holds the best checkpoint's val_unseen metrics (names of ``minivln eval``),
a seeded random agent's (``"random"``) and whether the features are stand-in.

``data_dir: toy`` builds the toy world under ``RUN/toy_data`` and its stand-in features at
``RUN/toy_features.h5`` (unless ``features`` names a file); fine-tuning then starts from scratch.

``task: reverie`` (VLN-DUET's ``reverie/agent_obj.py`` and ``run_reverie.sh``) needs a model with
objects (e.g. ``duet-cpu-reverie``) and an object feature file (``objects``; with ``data_dir: toy``
the stand-in one is built at ``RUN/toy_objects.h5``).  The goal of a REVERIE episode is decided by
``reverie_goal`` (see :data:`REVERIE_GOALS`); the rollouts add the object-grounding loss (x
``og_weight``) where the target is visible, log it (``loss/og_teacher``, ``loss/og_sample``,
``acc/og_sample``), and the submissions carry ``predObjId``; validation reports the REVERIE metrics
of the :class:`Evaluator` (``sr``, ``oracle_sr``, ``spl``, ``rgs``, ``rgspl``, ``trajectory_length``).

Command line::

    minivln finetune --config configs/toy-teacher.yaml --out RUN [--resume] [key=value ...]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from minivln.config import ConfigError, load_run_config
from minivln.data.datasets import load_episodes, split_file
from minivln.data.duet_files import load_annotation_files
from minivln.data.graph import Graphs
from minivln.data.reverie import ReverieGoals, with_random_endpoint
from minivln.data.toyworld import ensure_toy_world
from minivln.distill.compat import check_teacher
from minivln.distill.stage2 import stage2_terms
from minivln.env.env import (
    NavBatchEnv,
    check_split_features,
    random_walker_submission,
    write_submission,
)
from minivln.evaluation.evaluator import Evaluator
from minivln.evaluation.metrics import (
    R2R_METRICS,
    REVERIE_METRICS,
    format_metrics,
    metrics_legend,
)
from minivln.features.hdf5 import FeatureStore, ObjectFeatureStore
from minivln.features.standin import StandinConfig, build_standin
from minivln.model.checkpoint import load_agent_model, load_weights, save_pretrained
from minivln.model.config import DUETConfig
from minivln.model.pretrain_heads import navigation_network
from minivln.model.registry import create_model, get_config
from minivln.model.text_init import init_text
from minivln.paths import (
    DataError,
    atomic_write_text,
    check_writable_dir,
    resolve_data_dir,
)
from minivln.training import distributed as D
from minivln.training.agent import DUETAgent, run_agent
from minivln.training.checkpoint import find_checkpoint, load_checkpoint
from minivln.training.distributed import placement, shard
from minivln.training.trainer import (
    TEACHER_DTYPES,
    OptimConfig,
    TaskOutput,
    TrainConfig,
    Trainer,
    teacher_autocast,
)

RANDOM_STOP_PROB = 1.0 / 6.0

#: How the goal of a REVERIE *training* episode is chosen (evaluation always scores visibility):
#: ``"random"``: VLN-DUET's ``run_reverie.sh`` (``--multi_endpoints``): every time an episode is drawn
#: its goal becomes a viewpoint drawn uniformly among those from which the target is visible and its
#: path a shortest path to it; the expert heads there and the episode stops there.
#: ``"annotated"``: VLN-DUET's agent without that option: the expert heads for, and the episode stops
#: at, the annotated goal ``path[-1]`` (``agent_obj.py`` ``_teacher_action``).
#: ``"nearest"``: every viewpoint from which the target is visible is a goal: the expert heads for the
#: nearest one and the episode stops at any of them (the rule of ``DUET_INTERFACE.md`` §8 for
#: pre-training SAP labels, and the line upstream left commented out in ``_teacher_action``).
REVERIE_GOALS = ("random", "annotated", "nearest")


def _default_train() -> TrainConfig:
    return TrainConfig(
        run_dir="runs/finetune", max_steps=200_000, log_every=100, val_every=2000, ckpt_every=2000,
        best_metric="", best_mode="max",  # no selection on an evaluation split unless asked for
        optim=OptimConfig(lr=1e-5, weight_decay=0.01, schedule="constant", grad_clip=40.0),
    )


@dataclass
class Stage2Weights:
    """Stage-2 term weights, each multiplied by ``kd_weight`` (0 leaves the term out: Table IV)."""

    txt: float = 1.0  # kd_txt: text-encoder output (W_l)
    pano: float = 1.0  # kd_pano: panorama-encoder output (W_r)
    fuse: float = 1.0  # kd_fuse: CE of the fused action distributions


@dataclass
class FinetuneConfig:
    """A fine-tuning run.  Defaults are DUET's R2R script (batch 8, lr 1e-5, 200k iterations); the
    REVERIE-only fields (``objects``, ``reverie_goal``, ``og_weight``, ``max_objects``) default to DUET's
    REVERIE script."""

    model: str = "duet-r2r"  # registry preset (minivln.model.registry); REVERIE: one with objects
    model_overrides: dict = field(default_factory=dict)  # DUETConfig fields replaced in the preset
    init_checkpoint: str = ""  # pre-trained / fine-tuned weights to start from ("" = from scratch)
    init_fresh: list[str] = field(default_factory=list)  # parameter prefixes that may be missing from
    #                     init_checkpoint and start fresh (e.g. [og_head]: a REVERIE model from R2R weights)
    text_init: str = ""  # "minilm": text encoder from the offline all-MiniLM-L6-v2 BERT (hidden 384 only)
    task: str = "r2r"  # "r2r" or "reverie"
    data_dir: str = ""  # "" = $MINIVLN_DATA; "toy" = a toy world built under RUN/toy_data
    toy_seed: int = 0
    features: str = ""  # view features (HDF5); "" with data_dir=toy: RUN/toy_features.h5, built if missing
    objects: str = ""  # REVERIE object features (HDF5); "" with data_dir=toy: RUN/toy_objects.h5, built if missing
    train_split: str = "train"
    # augmented pairs (R2R), as DUET's and ScaleVLN's --aug: DUET's prevalent_aug_train_enc.json,
    # ScaleVLN's R2R_scalevln_ft_aug_enc.json (or any *_enc.jsonl; docs/data.md, "DUET's release files")
    aug_files: list[str] = field(default_factory=list)
    aug_times: int = 1  # with aug_files: each cycle is 1 iteration on train_split, then aug_times on the
    #                     augmented pairs (DUET: 1, alternating; ScaleVLN's R2R script: 9)
    connectivity_dirs: list[str] = field(default_factory=list)  # more <scan>_connectivity.json folders
    #                     (the augmented pairs' houses, e.g. ScaleVLN's HM3D/Gibson graphs)
    val_splits: list[str] = field(default_factory=lambda: ["val_seen", "val_unseen"])
    val_max_episodes: int = 0  # validate on the first N episodes of each split (0 = all)
    batch_size: int = 8
    val_batch_size: int = 16
    ml_weight: float = 0.2
    max_action_len: int = 15
    max_instr_len: int = 200
    feat_dropout: float = 0.4
    expert: str = "spl"
    feedback: str = "sample"  # "sample": DAgger (teacher-forced x ml_weight + sampled); "teacher": imitation only
    teacher_weight: float = 1.0  # loss weight of the teacher-forced pass with feedback: teacher
    reverie_goal: str = "random"  # REVERIE training goal rule, one of REVERIE_GOALS (DUET's script: random)
    og_weight: float = 1.0  # REVERIE: OG loss weight within each rollout (upstream: 1, no separate weight)
    max_objects: int = 20  # REVERIE: objects per viewpoint in training rollouts (0 = all; DUET: 20); eval: all
    teacher: str = ""  # stage-2 distillation: a frozen teacher (run dir, save_pretrained dir or DUET checkpoint)
    kd_weight: float = 0.1  # KDWeight: multiplies kd_txt, kd_pano, kd_fuse (the paper's best: 0.1)
    kd_terms: Stage2Weights = field(default_factory=Stage2Weights)  # per-term weights (0 = off)
    teacher_dtype: str = "fp32"  # "bf16": the teacher's forward under CPU/GPU autocast (outputs back in fp32)
    kd_temperature: float = 1.0  # t of kd_fuse (the paper: 1)
    num_threads: int = 0  # torch CPU threads (0 = torch's default); 1 is fastest on a busy small CPU
    merge_rollouts: bool = False  # DAgger: the teacher-forced and the sampled rollout as one batch (same
    #                     losses, half the network calls: DUETAgent.rollout_pair); off = two rollouts, as DUET
    random_seed: int = 0  # the random baseline of metrics.json
    random_stop_prob: float = RANDOM_STOP_PROB
    train: TrainConfig = field(default_factory=_default_train)

    def check(self) -> None:
        if self.task not in ("r2r", "reverie"):
            raise ConfigError(f"task: 'r2r' or 'reverie', got {self.task!r}")
        if self.reverie_goal not in REVERIE_GOALS:
            raise ConfigError(f"reverie_goal: one of {REVERIE_GOALS}, got {self.reverie_goal!r}")
        if self.kd_weight < 0 or self.kd_temperature <= 0:
            raise ConfigError("kd_weight must be >= 0 and kd_temperature > 0")
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise ConfigError(f"teacher_dtype: one of {sorted(TEACHER_DTYPES)}, got {self.teacher_dtype!r}")
        if min(self.kd_terms.txt, self.kd_terms.pano, self.kd_terms.fuse) < 0:
            raise ConfigError(f"kd_terms: weights must be >= 0, got {self.kd_terms}")
        if self.og_weight < 0 or self.max_objects < 0:
            raise ConfigError("og_weight and max_objects must be >= 0")
        if self.aug_times < 1:
            raise ConfigError(f"aug_times: must be >= 1, got {self.aug_times}")
        if self.aug_files and self.task != "r2r":
            raise ConfigError("aug_files: fine-tuning on augmented pairs is implemented for R2R (DUET's and "
                              "ScaleVLN's R2R scripts); DUET's REVERIE script fine-tunes without them")
        if self.feedback not in ("sample", "teacher"):
            raise ConfigError(f"feedback: 'sample' (DAgger) or 'teacher' (imitation), got {self.feedback!r}")
        if self.expert != "spl":
            raise ConfigError(f"expert: only 'spl' is implemented, got {self.expert!r}")
        if self.batch_size < 1 or self.val_batch_size < 1 or self.max_action_len < 1 or self.max_instr_len < 3:
            raise ConfigError("batch_size, val_batch_size, max_action_len must be >= 1, max_instr_len >= 3")
        if self.train.best_metric and not self.train.best_metric.split(".")[0] in self.val_splits:
            raise ConfigError(f"train.best_metric {self.train.best_metric!r} names a split not in val_splits")
        names = R2R_METRICS if self.task == "r2r" else REVERIE_METRICS
        if self.train.best_metric and self.train.best_metric.split(".", 1)[-1] not in names:
            raise ConfigError(f"train.best_metric {self.train.best_metric!r}: the metric after the split must be "
                              f"one of {', '.join(names)}")
        self.train.check()
        get_config(self.model, **{**self.model_overrides, "feat_dropout": self.feat_dropout})  # a known preset


# ------------------------------------------------------------------------------------------ data


@dataclass
class Resources:
    data_dir: Path
    features: Any  # FeatureStore
    graphs: Any
    objects: Any = None  # ObjectFeatureStore (REVERIE)
    goals: Any = None  # ReverieGoals (REVERIE)


def prepare_data(cfg: FinetuneConfig, run_dir: Path, image_feat_size: int = 768,
                 obj_feat_size: int = 0) -> Resources:
    """Resolve the data directory and feature files (building the toy world / its features).

    REVERIE (``cfg.task == "reverie"``) also opens the object features (``obj_feat_size`` wide; the
    model must use objects) and the goal sets (:class:`~minivln.data.reverie.ReverieGoals`)."""

    reverie = cfg.task == "reverie"
    if reverie and obj_feat_size <= 0:
        raise ConfigError(f"task reverie needs a model with objects (obj_feat_size > 0), e.g. "
                          f"model=duet-cpu-reverie; {cfg.model!r} has none")
    objs: Path | None = None
    if cfg.data_dir == "toy":
        data_dir = ensure_toy_world(run_dir / "toy_data", cfg.toy_seed)
        feats = Path(cfg.features) if cfg.features else run_dir / "toy_features.h5"
        if reverie:
            objs = Path(cfg.objects) if cfg.objects else run_dir / "toy_objects.h5"
        need_views, need_objs = not feats.exists(), objs is not None and not objs.exists()
        if need_views or need_objs:
            # the builder writes views and objects together; views that exist already are kept
            views_out = feats if need_views else run_dir / ".toy_features_unused.h5"
            print(f"building stand-in features for the toy world -> {views_out if need_views else ''}"
                  f"{' ' + str(objs) if need_objs else ''}", flush=True)
            build_standin(data_dir, views_out, objects_out=objs if need_objs else None,
                          cfg=StandinConfig(dim=image_feat_size))
            if not need_views:
                views_out.unlink(missing_ok=True)
    else:
        data_dir = resolve_data_dir(cfg.data_dir or None)
        if not cfg.features:
            raise ConfigError("features: a view feature file is required (or use data_dir=toy)")
        feats = Path(cfg.features)
        if reverie:
            if not cfg.objects:
                raise ConfigError("objects: an object feature file is required for REVERIE (or use data_dir=toy)")
            objs = Path(cfg.objects)
    store = FeatureStore(feats, expected_dim=image_feat_size)
    graphs = Graphs(data_dir, cfg.connectivity_dirs)
    res = Resources(Path(data_dir), store, graphs)
    if objs is not None:
        res.objects = ObjectFeatureStore(objs, expected_dim=obj_feat_size)
        res.goals = ReverieGoals(data_dir, graphs)
    return res


def make_env(cfg: FinetuneConfig, res: Resources, split: str, *, batch_size: int, shuffle: bool,
             seed: int = 0, max_episodes: int = 0, goal_sets: bool = False):
    """The split's environment; ``goal_sets``: every viewpoint from which a REVERIE target is
    visible is a goal (``reverie_goal: nearest``), else the goal is ``episode.goal``."""

    episodes = load_episodes(cfg.task, split, res.data_dir)
    if max_episodes:
        episodes = episodes[:max_episodes]
    check_split_features(res.features, episodes, res.graphs, f"the {cfg.task} {split} split")
    if goal_sets:
        return NavBatchEnv(episodes, res.graphs, batch_size=batch_size, features=res.features,
                           max_steps=cfg.max_action_len, shuffle=shuffle, seed=seed,
                           goals=res.goals.episode_goals)
    return NavBatchEnv(episodes, res.graphs, batch_size=batch_size, features=res.features,
                       max_steps=cfg.max_action_len, shuffle=shuffle, seed=seed)


# ------------------------------------------------------------------------------------------ task


class FinetuneTask:
    """The Trainer's :class:`~minivln.training.trainer.Task` for DAgger fine-tuning.

    ``next_batch`` draws two batches from the (shuffled) training environment: one for the
    teacher-forced rollout, one for the sampled rollout (the reference resets the environment, hence
    draws a new batch, for each).  ``compute`` returns the loss ``ml_weight * L_teacher + L_sample``
    and, in ``outputs``, the per-step records of both rollouts (``teacher_steps``, ``sample_steps``:
    lists of :class:`~minivln.training.agent.StepRecord` with the fused logits) for distillation.

    ``feedback="teacher"`` runs the teacher-forced pass alone (loss x ``teacher_weight``; VLN-DUET's
    ``--feedback teacher``: plain imitation learning).

    ``merge=True`` (config ``merge_rollouts``) runs the two rollouts of a DAgger iteration as one batch
    (:meth:`~minivln.training.agent.DUETAgent.rollout_pair`): the same two losses, metrics and stage-2
    records from half the network calls; the draws of dropout and sampling differ from two rollouts.

    With a distillation ``teacher`` (a frozen DUET, or a DUETPretrainer whose ``.duet`` is used; stage 2)
    both rollouts also run it in lock-step on the student's states
    (:meth:`~minivln.training.agent.DUETAgent.rollout`), and ``outputs['kd']`` /
    ``teacher_outputs['kd']`` hold one record per rollout (see :func:`kd_records`), what the stage-2
    loss terms (:mod:`minivln.distill.stage2`) read.  The task loss is the same with or without it.

    Under DDP every rank draws the same global batches (same environment seed) and rolls out its own
    contiguous share (``batch_size`` must divide by the number of ranks); each rank's loss is the mean
    over its share, and DDP's gradient average makes it the mean over the global batch.  Sampled
    actions come from each rank's own random stream.

    ``aug_env`` (R2R augmented pairs, config ``aug_files``): iteration ``index`` draws its batches from
    ``env`` when ``index % (aug_times + 1) == 0``, else from ``aug_env`` (DUET's and ScaleVLN's ``--aug``:
    one iteration on the training split, then ``aug_times`` on the augmented pairs; every rollout runs
    in ``env``, whose graphs hold the augmented pairs' houses too).

    ``random_endpoints`` (REVERIE, ``reverie_goal: random``; needs ``goals``): each drawn episode's
    goal is replaced by a viewpoint drawn among those from which its target is visible, and its path by
    a shortest path to it (VLN-DUET's ``--multi_endpoints``), with a seeded generator kept in the
    task's state (resume draws the same goals).
    """

    def __init__(self, agent, env, ml_weight: float = 0.2, *, goals=None, random_endpoints: bool = False,
                 seed: int = 0, feedback: str = "sample", teacher_weight: float = 1.0,
                 rank: int | None = None, world_size: int | None = None, merge: bool = False,
                 aug_env=None, aug_times: int = 1) -> None:

        if random_endpoints and goals is None:
            raise ValueError("random_endpoints needs goals (ReverieGoals)")
        if feedback not in ("sample", "teacher"):
            raise ValueError(f"feedback: 'sample' or 'teacher', got {feedback!r}")
        self.rank, self.world_size = placement(env.batch_size, rank, world_size)
        self.feedback = feedback
        self.merge = merge
        self.teacher_weight = teacher_weight
        self.agent = agent
        self.env = env
        self.ml_weight = ml_weight
        self.goals = goals
        self.random_endpoints = random_endpoints
        self.endpoint_rng = random.Random(seed)
        self.aug_env = aug_env
        self.aug_times = aug_times

    def source(self, index: int):
        """The environment iteration ``index`` draws its episodes from (``env`` or ``aug_env``)."""
        if self.aug_env is None or index % (self.aug_times + 1) == 0:
            return self.env
        return self.aug_env

    def _draw(self, index: int) -> list:
        episodes = self.source(index).next_batch()
        if not self.random_endpoints:
            return episodes

        return [with_random_endpoint(ep, self.goals.episode_goals(ep), self.env.house(ep.scan), self.endpoint_rng)
                for ep in episodes]

    def next_batch(self, index: int) -> dict[str, list]:
        if self.feedback == "teacher":
            return {"teacher": list(shard(self._draw(index), self.rank, self.world_size))}
        return {k: list(shard(self._draw(index), self.rank, self.world_size)) for k in ("teacher", "sample")}

    def compute(self, model, batch, teacher=None) -> TaskOutput:
        self.agent.model = model
        metrics: dict[str, float] = {}
        loss = torch.zeros((), device=next(model.parameters()).device)
        outputs: dict[str, Any] = {}
        kd_net = None
        if teacher is not None:
            kd_net = navigation_network(teacher)  # a clear error before any work
            outputs["kd"], teacher_kd = [], []
        weight = self.teacher_weight if self.feedback == "teacher" else self.ml_weight
        ml = sm = None
        if weight and self.feedback != "teacher" and self.merge:
            ml, sm = self.agent.rollout_pair(self.env, batch["teacher"], batch["sample"], teacher=kd_net)
        else:
            if weight:
                ml = self.agent.rollout(self.env, batch["teacher"], "teacher", teacher=kd_net)
            if self.feedback != "teacher":
                sm = self.agent.rollout(self.env, batch["sample"], "sample", teacher=kd_net)
        if ml is not None:
            loss = loss + weight * ml.loss
            metrics.update({"loss/teacher": ml.loss.detach(), "acc/teacher": ml.metrics["acc"]})
            if ml.og_loss is not None:
                metrics.update({"loss/og_teacher": ml.og_loss.detach(), "acc/og_teacher": ml.metrics["og_acc"]})
            outputs["teacher_steps"] = ml.steps
            if kd_net is not None:
                s_kd, t_kd = kd_records(ml, "teacher", weight)
                outputs["kd"].append(s_kd)
                teacher_kd.append(t_kd)
        if sm is not None:
            loss = loss + sm.loss
            metrics.update({"loss/sample": sm.loss.detach(), "acc/sample": sm.metrics["acc"],
                            "steps/sample": sm.metrics["steps"]})
            if sm.og_loss is not None:
                metrics.update({"loss/og_sample": sm.og_loss.detach(), "acc/og_sample": sm.metrics["og_acc"]})
            outputs["sample_steps"] = sm.steps
            if kd_net is not None:
                s_kd, t_kd = kd_records(sm, "sample", 1.0)
                outputs["kd"].append(s_kd)
                teacher_kd.append(t_kd)
        if kd_net is None:
            return TaskOutput(loss=loss, metrics=metrics, outputs=outputs)
        return TaskOutput(loss=loss, metrics=metrics, outputs=outputs, teacher_outputs={"kd": teacher_kd})

    def state_dict(self) -> dict:
        state = {"env": self.env.state_dict()}
        if self.aug_env is not None:
            state["aug_env"] = self.aug_env.state_dict()
        if self.random_endpoints:
            state["endpoint_rng"] = self.endpoint_rng.getstate()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.env.load_state_dict(state["env"])
        if self.aug_env is not None and "aug_env" in state:
            self.aug_env.load_state_dict(state["aug_env"])
        if "endpoint_rng" in state:
            rng = state["endpoint_rng"]
            self.endpoint_rng.setstate((rng[0], tuple(rng[1]), rng[2]))


def kd_records(rollout, name: str, weight: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """The stage-2 distillation record of one rollout run with a teacher: ``(student, teacher)``.

    Both hold ``text`` (B, L, H) text-encoder output, ``text_masks`` (B, L), and per step (lists, one
    entry per step, shapes vary with the step) ``pano`` (B, N_t, H) panorama-encoder output,
    ``pano_masks`` (B, N_t) and ``fused_logits`` (B, S_t); H is each model's width, the masks are
    equal.  The student's also has ``active`` (per step, (B,) bool: samples still navigating),
    ``rollout`` (``"teacher"``: teacher-forced, ``"sample"``), ``weight`` (the rollout's action-loss
    weight) and ``batch_size``."""
    if rollout.teacher_txt_embeds is None:
        raise ValueError("this rollout ran without a teacher: nothing to distil")
    steps = rollout.steps
    device = rollout.txt_masks.device
    student = {
        "rollout": name, "weight": float(weight), "batch_size": int(rollout.txt_masks.size(0)),
        "text": rollout.txt_embeds, "text_masks": rollout.txt_masks,
        "pano": [s.pano_embeds for s in steps], "pano_masks": [s.pano_masks for s in steps],
        "fused_logits": [s.fused_logits for s in steps],
        "active": [torch.tensor(s.active, dtype=torch.bool, device=device) for s in steps],
    }
    teacher = {
        "text": rollout.teacher_txt_embeds, "text_masks": rollout.txt_masks,
        "pano": [s.teacher.pano_embeds for s in steps], "pano_masks": [s.teacher.pano_masks for s in steps],
        "fused_logits": [s.teacher.fused_logits for s in steps],
    }
    return student, teacher


# ------------------------------------------------------------------------------------ evaluation


def random_baseline(cfg: FinetuneConfig, res: Resources, split: str = "val_unseen") -> dict[str, float]:
    """A seeded random walker's metrics (:func:`~minivln.env.env.random_walker_submission`): a uniformly
    random neighbour each step, STOP with probability ``random_stop_prob`` (1/6: 5 moves expected)
    before each move, at most ``max_action_len`` moves; REVERIE: ``predObjId`` drawn uniformly among
    the objects visible from the final viewpoint."""

    env = make_env(cfg, res, split, batch_size=64, shuffle=False)
    goals = res.goals if cfg.task == "reverie" else None  # prepare_data opens them for REVERIE
    preds = random_walker_submission(env, cfg.random_seed, cfg.random_stop_prob, goals)
    summary, _ = Evaluator(cfg.task, split, res.data_dir).score(preds)
    return summary


class Validator:
    """The Trainer's validate hook: arg-max rollouts, submissions, Evaluator metrics per split."""

    def __init__(self, cfg: FinetuneConfig, res: Resources, agent, run_dir: Path) -> None:
        self.cfg, self.agent, self.run_dir = cfg, agent, run_dir
        self.envs = {s: make_env(cfg, res, s, batch_size=cfg.val_batch_size, shuffle=False,
                                 max_episodes=cfg.val_max_episodes) for s in cfg.val_splits}
        self.evaluators = {s: Evaluator(cfg.task, s, res.data_dir) for s in cfg.val_splits}
        self.trainer = None  # set after the Trainer is built (for the step number)

    def __call__(self, model) -> dict[str, dict[str, float]]:
        self.agent.model = model
        step = self.trainer.step if self.trainer is not None else 0
        out: dict[str, dict[str, float]] = {}
        for split, env in self.envs.items():
            preds = run_agent(self.agent, env)
            write_submission(self.run_dir / "submissions" / f"{split}_step{step}.json", preds)
            summary, _ = self.evaluators[split].score(preds)
            out[split] = summary
        atomic_write_text(self.run_dir / "val" / f"step{step}.json", json.dumps(out, indent=1) + "\n")
        return out


# ------------------------------------------------------------------------------------------ run


def build_model(cfg: FinetuneConfig):
    overrides = dict(cfg.model_overrides)
    overrides["feat_dropout"] = cfg.feat_dropout
    model = create_model(cfg.model, **overrides)
    if cfg.text_init:
        init_text(model, cfg.text_init)
    if cfg.init_checkpoint:
        fresh: list[str] = []
        load_weights(model, cfg.init_checkpoint, fresh=cfg.init_fresh, report=fresh)
        if fresh:
            print(f"init_checkpoint {cfg.init_checkpoint}: {len(fresh)} tensors start fresh "
                  f"({', '.join(fresh)})", flush=True)
    return model


def make_task(cfg: FinetuneConfig, model, res: Resources) -> FinetuneTask:
    """The agent (``.agent``), its shuffled training environment and the :class:`FinetuneTask` of a
    config.  R2R resources carry no objects or goal sets, so the REVERIE arguments are inert there."""

    reverie = cfg.task == "reverie"
    agent = DUETAgent(model, max_action_len=cfg.max_action_len, max_instr_len=cfg.max_instr_len,
                      expert=cfg.expert, features=res.features, objects=res.objects, goals=res.goals,
                      og_weight=cfg.og_weight, max_objects=cfg.max_objects or None)
    train_env = make_env(cfg, res, cfg.train_split, batch_size=cfg.batch_size, shuffle=True,
                         seed=cfg.train.seed, goal_sets=reverie and cfg.reverie_goal == "nearest")
    aug_env = None
    if cfg.aug_files:
        episodes = load_annotation_files(cfg.aug_files, cfg.task, res.graphs)  # DataError naming file and line
        if not episodes:
            raise DataError(f"aug_files {cfg.aug_files} hold no instructions")
        check_split_features(res.features, episodes, res.graphs, "the augmented pairs (aug_files)")
        aug_env = NavBatchEnv(episodes, res.graphs, batch_size=cfg.batch_size, features=res.features,
                              max_steps=cfg.max_action_len, shuffle=True, seed=cfg.train.seed)
        print(f"fine-tuning on {len(train_env)} instructions and {len(episodes)} augmented ones (aug_files), "
              f"{cfg.aug_times} augmented iteration(s) after each one on {cfg.train_split}", flush=True)
    return FinetuneTask(agent, train_env, cfg.ml_weight, goals=res.goals,
                        random_endpoints=reverie and cfg.reverie_goal == "random", seed=cfg.train.seed,
                        feedback=cfg.feedback, teacher_weight=cfg.teacher_weight, merge=cfg.merge_rollouts,
                        aug_env=aug_env, aug_times=cfg.aug_times)


def stage2_loss_terms(cfg: FinetuneConfig, student: DUETConfig, teacher: DUETConfig) -> list[torch.nn.Module]:
    """The stage-2 loss terms ``cfg`` asks for (:func:`~minivln.distill.stage2.stage2_terms`), for the
    trainer, the training benchmark and anything else that must distil exactly as fine-tuning does."""
    return stage2_terms(student, teacher, cfg.kd_weight, cfg.kd_temperature,
                        term_weights=dataclasses.asdict(cfg.kd_terms))


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Run (or resume) a fine-tuning run; returns the content of ``RUN/metrics.json``."""

    cfg.check()
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    t0 = time.perf_counter()
    run_dir = Path(cfg.train.run_dir)
    check_writable_dir(run_dir, "run directory")  # before any work: checkpoints and results go there
    info = D.init_distributed(cfg.train.device)  # before the task, which shards batches by rank
    D.seed_everything(cfg.train.seed)
    model = build_model(cfg)
    teacher, terms = None, []
    if cfg.teacher:  # stage 2: distillation while fine-tuning (docs/distillation.md)

        teacher = load_agent_model(cfg.teacher)
        check_teacher(model.config, teacher.config, stage=2, source=f"teacher {cfg.teacher}")
        teacher_autocast(teacher, cfg.teacher_dtype)
        terms = stage2_loss_terms(cfg, model.config, teacher.config)
    if info.world_size > 1 and info.rank != 0:
        torch.distributed.barrier()  # rank 0 builds what is missing (toy world, stand-in features) first
    res = prepare_data(cfg, run_dir, model.config.image_feat_size, model.config.obj_feat_size)
    if info.world_size > 1 and info.rank == 0:
        torch.distributed.barrier()
    task = make_task(cfg, model, res)
    agent = task.agent
    validator = Validator(cfg, res, agent, run_dir)
    trainer = Trainer(model, task, cfg.train, validate=validator, run_config=cfg, teacher=teacher,
                      loss_terms=terms)
    validator.trainer = trainer
    try:  # RUN/.lock is held until the exported weights and metrics.json are written
        try:
            trainer.fit()
        finally:
            trainer.close(release_lock=False)
        D.cleanup()  # on success only: after one rank's error a barrier would hang
        if not info.is_main:
            return {}  # under DDP rank 0 alone exports and scores
        return _export_and_score(cfg, trainer, model, validator, res, run_dir, t0)
    finally:
        trainer.release_lock()


def _export_and_score(cfg: FinetuneConfig, trainer: Trainer, model, validator: Validator, res: Resources,
                      run_dir: Path, t0: float) -> dict[str, Any]:
    """Export the best (else the last) weights to ``RUN/model`` (and ``RUN/model-ema``), and write
    ``RUN/metrics.json``; returns its content."""
    best = trainer.best
    src = find_checkpoint(run_dir / "best", repair=False) if best else None
    src = src or find_checkpoint(run_dir / "latest", repair=False)
    ckpt = load_checkpoint(src, with_trainer=False)
    model.load_state_dict(ckpt.model)
    best_step = int(ckpt.step)
    save_pretrained(model, run_dir / "model", metadata={"step": str(best_step)})
    ema_src = find_checkpoint(run_dir / "ema", repair=False) if cfg.train.ema_decay else None
    if ema_src is not None:  # the weight average at the last step, beside the selected weights
        ema = load_checkpoint(ema_src, with_trainer=False)
        averaged = copy.deepcopy(model)
        averaged.load_state_dict(ema.model)
        save_pretrained(averaged, run_dir / "model-ema",
                        metadata={"step": str(ema.step), "ema_decay": str(cfg.train.ema_decay),
                                  "ema_start": str(cfg.train.ema_start)})
    val_file = run_dir / "val" / f"step{best_step}.json"
    val = json.loads(val_file.read_text()) if val_file.exists() else {}
    metrics: dict[str, Any] = dict(val.get("val_unseen", {}))
    if "val_unseen" in validator.envs:
        metrics["episodes"] = len(validator.envs["val_unseen"])
    if "val_unseen" in load_split_names(cfg, res):
        metrics["random"] = random_baseline(cfg, res, "val_unseen")
        metrics["random_episodes"] = len(load_episodes(cfg.task, "val_unseen", res.data_dir))
    if cfg.task == "reverie":
        metrics.update({"task": "reverie", "reverie_goal": cfg.reverie_goal,
                        "object_features": "stand-in" if res.objects.is_standin else "real"})
    metrics.update({
        "features": "stand-in" if res.features.is_standin else "real",
        "split": "val_unseen",
        "best_metric": cfg.train.best_metric,
        "best_step": best_step,
        "model": cfg.model,
        "parameters": sum(p.numel() for p in model.parameters()),
        "random_agent": f"uniform random neighbour, STOP with p={cfg.random_stop_prob:.4g} before each move, "
                        f"at most {cfg.max_action_len} moves, seed {cfg.random_seed}"
                        + (", predObjId uniform among the final viewpoint's objects" if cfg.task == "reverie" else ""),
        "wall_s": round(time.perf_counter() - t0, 1),
    })
    atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def load_split_names(cfg: FinetuneConfig, res: Resources) -> list[str]:
    out = []
    for s in ("val_seen", "val_unseen"):
        try:
            split_file(res.data_dir, cfg.task, s)
        except DataError:  # the data directory has no such split (e.g. a test-only release)
            continue
        out.append(s)
    return out


# ------------------------------------------------------------------------------------------ CLI


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune a DUET agent on R2R or REVERIE (DAgger, DUET's recipe)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None,
                   help="YAML config (e.g. configs/toy-teacher.yaml, configs/toy-teacher-reverie.yaml)")
    p.add_argument("--out", required=True, help="run directory (train.run_dir)")
    p.add_argument("--resume", action="store_true", help="continue RUN/latest")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.max_steps=10")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    cfg, note = load_run_config(FinetuneConfig, args.out, args.config, list(args.overrides), resume=args.resume)
    if note:
        print(note, flush=True)
    metrics = finetune(cfg)
    if not metrics:  # a DDP rank other than 0
        return 0
    print(summary_lines(metrics, cfg.task))
    print(f"metrics: {Path(cfg.train.run_dir) / 'metrics.json'}")
    return 0


def summary_lines(metrics: dict[str, Any], task: str) -> str:
    """What ``minivln finetune`` prints: the best checkpoint's val_unseen metrics and the random
    walker's, labelled with the episode counts and the kind of features, and a legend."""
    names = R2R_METRICS if task == "r2r" else REVERIE_METRICS
    features = "STAND-IN features" if metrics.get("features") == "stand-in" else "real features"
    if task == "reverie":
        features += ", STAND-IN objects" if metrics.get("object_features") == "stand-in" else ", real objects"
    lines = []
    if any(n in metrics for n in names):
        episodes = f"{metrics['episodes']:,} episodes, " if "episodes" in metrics else ""
        which = f"best checkpoint by {metrics['best_metric']}" if metrics.get("best_metric") else "last checkpoint"
        lines.append(f"val_unseen ({episodes}{features}), {which} (step {metrics.get('best_step')}): "
                     f"{format_metrics(metrics, names)}")
    else:
        lines.append(f"val_unseen: not validated (val_splits has no val_unseen; {features})")
    if metrics.get("random"):
        episodes = f"{metrics['random_episodes']:,} episodes" if "random_episodes" in metrics else "all episodes"
        lines.append(f"random walker (val_unseen, {episodes}): {format_metrics(metrics['random'], names)}")
    lines.append(f"({metrics_legend(names)})")
    return "\n".join(lines)
