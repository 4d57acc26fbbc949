"""DUET pretraining: MLM, SAP, MRC and OG on ground-truth path prefixes (``minivln pretrain``).

Each training iteration samples ONE task (seeded by the iteration index, mixing ratios in
``mix``), draws a batch of episodes (a seeded permutation per epoch, so ``next_batch(index)`` is a
pure function of the index and resume is exact), and builds the states with the true environment
graph (:mod:`minivln.training.pretrain_data`):

* **mlm**: the full path; 15 % of the instruction tokens masked (80/10/10, at least one); the text
  is updated through the language branch of every cross-modal layer of both branches
  (:class:`~minivln.model.pretrain_heads.DUETPretrainer`) and the MLM head (decoder tied to the
  word embeddings) predicts the masked tokens; loss CE.
* **sap**: with probability ``sap_stop_prob`` the full path (label STOP), else a prefix ending at a
  random earlier path node (label = next path node; REVERIE: the "nearest goal" label,
  :func:`~minivln.training.agent.nearest_goal_slot`); loss CE(global) + CE(local) + CE(fused).
* **mrc**: the full path; 15 % of the current node's view tokens (at least one) get zero features;
  the classifier on their local outputs predicts the stored class distribution; loss KL(target ||
  prediction).  Needs features with class distributions (stand-in files have them).
* **og** (REVERIE, models with objects): the full path; the OG head on the local outputs of the
  current node's object tokens predicts the episode's target object (``objId``); loss CE (states
  whose current node does not list the target are ignored).

With ``task: reverie`` and a model with objects (``obj_feat_size > 0``) every panorama of every task
carries the viewpoint's object tokens after its view tokens, as upstream.  At the end the
navigation weights are exported with :func:`~minivln.model.checkpoint.save_pretrained` to
``RUN/pretrained`` (fine-tuning starts from them with ``init_checkpoint: RUN/pretrained``).

Distillation (stage 1, groundwork): ``PretrainTask.compute(model, batch, teacher)`` also returns the
student's and the frozen teacher's distillation taps on the same batch, which
:class:`~minivln.distill.stage1.Stage1KD` turns into a loss (``docs/distillation.md``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import signal
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from minivln.config import ConfigError, load_run_config
from minivln.data.datasets import Episode, load_episodes
from minivln.data.duet_files import load_annotation_files
from minivln.data.graph import Graphs
from minivln.data.reverie import ReverieGoals
from minivln.data.tokenizer import get_tokenizer
from minivln.data.toyworld import ensure_toy_world
from minivln.distill.compat import check_teacher
from minivln.distill.stage1 import stage1_terms
from minivln.env.env import check_split_features
from minivln.features.hdf5 import FeatureStore, ObjectFeatureStore
from minivln.features.standin import build_standin
from minivln.model.agent_inputs import masked_mean
from minivln.model.checkpoint import load_agent_model, load_weights, save_pretrained
from minivln.model.config import DUETConfig
from minivln.model.pretrain_heads import DUETPretrainer, navigation_network
from minivln.model.registry import create_model, get_config
from minivln.model.text_init import init_text
from minivln.paths import DataError, check_writable_dir, resolve_data_dir
from minivln.training.agent import instruction_embeddings
from minivln.training.distributed import (
    cleanup,
    init_distributed,
    placement,
    seed_everything,
    shard,
)
from minivln.training.pretrain_data import (
    IGNORE_LABEL,
    PrefixDataset,
    SyntheticFeatures,
    SyntheticObjects,
    collate_states,
    features_have_classes,
)
from minivln.training.trainer import (
    TEACHER_DTYPES,
    TaskOutput,
    TrainConfig,
    Trainer,
    move_to,
    teacher_autocast,
)

PRETRAIN_TASKS = ("mlm", "sap", "mrc", "og")


# ----------------------------------------------------------------------------------- config


@dataclass
class TaskMix:
    """Relative sampling ratios of the tasks (0 turns one off)."""

    mlm: float = 1.0
    sap: float = 1.0
    mrc: float = 1.0
    og: float | None = None  # None = 1 with task reverie and a model with objects, else 0


@dataclass
class Stage1Weights:
    """Stage-1 term weights, each multiplied by ``kd_weight`` (0 leaves the term out)."""

    emb: float = 1.0  # kd_emb: embedding-layer output (W_e)
    att: float = 1.0  # kd_att: per-head pre-softmax self-attention scores
    hid: float = 1.0  # kd_hid: hidden states of the mapped layers (W_h)


@dataclass
class PretrainConfig:
    """``minivln pretrain`` config (YAML + ``key=value`` overrides)."""

    model: str = "duet-cpu"  # preset name (minivln.model.registry)
    model_overrides: dict[str, Any] = field(default_factory=dict)  # DUETConfig fields to replace
    text_init: str = ""  # "minilm": text encoder from the offline all-MiniLM-L6-v2 BERT (hidden 384 only)
    init_checkpoint: str = ""  # optional weights to start from (save_pretrained dir or DUET checkpoint)
    init_fresh: list[str] = field(default_factory=list)  # parameter prefixes that may be missing from
    #                     init_checkpoint and start fresh (e.g. [og_head]: REVERIE pretraining from R2R weights)
    task: str = "r2r"  # annotations: "r2r" or "reverie" (nearest-goal SAP labels; objects + OG with
    #                    a model that has obj_feat_size > 0)
    data_dir: str = ""  # "" = $MINIVLN_DATA; "toy" = the toy world (built on first use in toy_dir)
    toy_dir: str = "runs/toyworld"
    toy_seed: int = 0
    features: str = ""  # view feature HDF5; "" with toy: stand-in built at TOY_DIR/standin_views.h5;
    #                     "synthetic": seeded random features (timing/tests only)
    objects: str = ""  # REVERIE object HDF5 (models with obj_feat_size > 0); "" with toy: stand-in at
    #                    TOY_DIR/standin_objects.h5; "synthetic" (default with features: synthetic):
    #                    seeded random features at the BBox objects (timing/tests only)
    train_split: str = "train"  # the official split file of data_dir (unless train_files is given)
    val_splits: list[str] = field(default_factory=lambda: ["val_seen", "val_unseen"])
    # DUET's / ScaleVLN's processed annotation files (docs/data.md, "DUET's release files"):
    train_files: list[str] = field(default_factory=list)  # *_enc.jsonl (or .json) training files, in
    #                      place of train_split's file; token ids used as given (instr_encoding)
    aug_files: list[str] = field(default_factory=list)  # augmented pairs (R2R_prevalent_aug_train_enc.jsonl,
    #                      REVERIE_speaker_aug_enc.jsonl, ScaleVLN's *_aug_*_enc.jsonl), appended to the
    #                      training instructions (DUET concatenates its train_traj_files)
    val_files: dict[str, list[str]] = field(default_factory=dict)  # more validation sets, name -> files
    #                      (e.g. {val_unseen_enc: [R2R_val_unseen_enc.jsonl]}), besides val_splits
    connectivity_dirs: list[str] = field(default_factory=list)  # more <scan>_connectivity.json folders
    #                      (houses beyond data_dir/connectivity, e.g. ScaleVLN's HM3D/Gibson graphs)
    val_batches: int = 4  # batches per split and task in each validation
    max_instr_len: int = 80
    batch_size: int = 8  # global batch (split over DDP ranks)
    sap_stop_prob: float = 0.2
    mix: TaskMix = field(default_factory=TaskMix)
    export: str = ""  # where to save the navigation weights; "" = RUN/pretrained
    feat_dropout: float = 0.0  # dropout on raw view/object features; DUET pretrains without (and with a
    #                            teacher, student and teacher then see the same inputs)
    teacher: str = ""  # stage-1 distillation: a frozen teacher (run dir, save_pretrained dir or DUET checkpoint)
    kd_weight: float = 1.0  # multiplies every stage-1 term weight
    kd_terms: Stage1Weights = field(default_factory=Stage1Weights)  # per-term weights (0 = off)
    teacher_dtype: str = "fp32"  # "bf16": the teacher's forward under autocast (outputs back in fp32)
    kd_cross_attention: bool = False  # also distil the cross-modal branches' cross-attention (paper: no)
    kd_embed_encoders: list[str] = field(default_factory=lambda: ["text"])  # kd_emb covers these
    #                            encoders' inputs (paper: the instruction's; also pano, global, local)
    num_threads: int = 0  # torch intra-op threads; 0 = torch's default (1 is fastest on a busy 2-core box)
    num_workers: int = 0  # processes building training batches ahead (same batches); 0 = in the loop
    train: TrainConfig = field(default_factory=TrainConfig)
    # deprecated aliases, still read so that older configs and runs in flight load (finetune's names win)
    init: str = ""  # = init_checkpoint
    toy: bool = False  # = data_dir: toy

    def __post_init__(self) -> None:
        clash = sorted(set(self.val_files) & set(self.val_splits))
        if clash:
            raise ConfigError(f"val_files: {clash} already name val_splits; give these validation sets other names")
        if self.init:
            if self.init_checkpoint and self.init_checkpoint != self.init:
                raise ConfigError(f"init ({self.init}) and init_checkpoint ({self.init_checkpoint}) differ: "
                                  "give init_checkpoint only ('init' is its deprecated alias)")
            warnings.warn("pretrain: 'init' is deprecated, use 'init_checkpoint' (as finetune does)", FutureWarning,
                          stacklevel=2)
            self.init_checkpoint, self.init = self.init, ""
        if self.toy:
            warnings.warn("pretrain: 'toy: true' is deprecated, use 'data_dir: toy' (as finetune does)",
                          FutureWarning, stacklevel=2)
            self.data_dir, self.toy = "toy", False

    @property
    def network_overrides(self) -> dict[str, Any]:
        """The DUETConfig fields this run replaces in its preset (``feat_dropout`` included)."""
        return {**self.model_overrides, "feat_dropout": self.feat_dropout}

    @property
    def uses_toy(self) -> bool:
        return self.data_dir == "toy"


# ----------------------------------------------------------------------------------- model side


def encode_states(duet: torch.nn.Module, batch: Mapping[str, Any],
                  taps: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run 'language' and 'panorama' on a collated batch and build the 'navigation' batch dict.

    With ``taps`` (a dict), both calls run with distillation taps, which are merged into it
    (``text.*``, ``pano.*``; see :meth:`~minivln.model.duet.DUET.forward`), together with the token
    masks of the two encoders, ``text.masks`` (B, L) and ``pano.masks`` (F, N) (bool, True = real;
    F = every visited node's panorama of every sample).
    """
    lang = {"txt_ids": batch["txt_ids"], "txt_masks": batch["txt_masks"]}
    if taps is None:
        txt_embeds = duet("language", lang)
        pano_embeds, pano_masks = duet("panorama", batch["pano"])
    else:
        txt_embeds, text_taps = duet("language", lang, taps=True)
        (pano_embeds, pano_masks), pano_taps = duet("panorama", batch["pano"], taps=True)
        taps.update(text_taps)
        taps.update(pano_taps)
        taps["text.masks"] = batch["txt_masks"]
        taps["pano.masks"] = pano_masks
    n_flat, n_tok, hidden = pano_embeds.shape
    sources = torch.cat([masked_mean(pano_embeds, pano_masks), pano_embeds.reshape(n_flat * n_tok, hidden)], 0)
    b, g = batch["gmap_masks"].shape
    contrib = sources[batch["gmap_src_rows"]] * batch["gmap_src_weights"].to(sources.dtype)[:, None]
    gmap_img_embeds = sources.new_zeros(b * g, hidden).index_add_(0, batch["gmap_src_slots"], contrib)
    gmap_img_embeds = gmap_img_embeds.view(b, g, hidden)  # (B, G, H)
    cur = batch["current_index"]
    cur_embeds, cur_masks = pano_embeds[cur], pano_masks[cur]
    b = cur_embeds.size(0)
    ones = torch.ones(b, 1, dtype=torch.bool, device=cur_embeds.device)
    nav_types = batch["pano"]["nav_types"][cur]
    nav = {
        "txt_embeds": txt_embeds,
        "txt_masks": batch["txt_masks"],
        "gmap_img_embeds": gmap_img_embeds,
        "gmap_step_ids": batch["gmap_step_ids"],
        "gmap_pos_fts": batch["gmap_pos_fts"],
        "gmap_masks": batch["gmap_masks"],
        "gmap_pair_dists": batch["gmap_pair_dists"],
        "gmap_visited_masks": batch["gmap_visited_masks"],
        "gmap_vpids": batch["gmap_vpids"],
        "vp_img_embeds": torch.cat([torch.zeros_like(cur_embeds[:, :1]), cur_embeds], 1),
        "vp_pos_fts": batch["vp_pos_fts"],
        "vp_masks": torch.cat([ones, cur_masks], 1),
        "vp_nav_masks": torch.cat([ones, nav_types == 1], 1),
        "vp_cand_vpids": batch["vp_cand_vpids"],
    }
    if "obj_img_fts" in batch["pano"]:
        zeros = torch.zeros(b, 1, dtype=torch.bool, device=cur_embeds.device)
        nav["vp_obj_masks"] = torch.cat([zeros, nav_types == 2], 1)
    instr_embeds = instruction_embeddings(duet, batch["instructions"], cur_embeds.device)
    if instr_embeds is not None:
        nav["instr_embeds"] = instr_embeds
    return nav


def _acc(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Accuracy over the labels that are not -100 (NaN when there are none)."""
    sel = labels != IGNORE_LABEL
    return (logits[sel].argmax(-1) == labels[sel]).float().mean()


def _put_acc(metrics: dict[str, Any], key: str, logits: torch.Tensor, labels: torch.Tensor) -> None:
    """``metrics[key] = accuracy`` when some label is not -100 (else the key stays absent)."""
    if bool((labels != IGNORE_LABEL).any()):
        metrics[key] = _acc(logits, labels)


def _ce(logits: torch.Tensor, labels: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the rows whose label is not -100 (rows are selected first, so rows that
    are -inf everywhere never enter); 0 (still attached to ``anchor``'s graph) when there are none."""
    sel = labels != IGNORE_LABEL
    if not bool(sel.any()):
        return anchor.sum() * 0.0
    return F.cross_entropy(logits[sel], labels[sel])


def sap_loss(outs: Mapping[str, torch.Tensor], batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    gl, ll = batch["global_labels"], batch["local_labels"]
    anchor = outs["gmap_embeds"]
    loss = (_ce(outs["global_logits"], gl, anchor) + _ce(outs["local_logits"], ll, anchor)
            + _ce(outs["fused_logits"], gl, anchor))
    metrics: dict[str, Any] = {"loss/sap": loss.detach()}
    _put_acc(metrics, "acc/sap_fused", outs["fused_logits"], gl)
    _put_acc(metrics, "acc/sap_global", outs["global_logits"], gl)
    _put_acc(metrics, "acc/sap_local", outs["local_logits"], ll)
    return loss, metrics


def mlm_loss(model: DUETPretrainer, text: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    sel = labels != -100
    logits = model.mlm_head(text[sel])
    target = labels[sel]
    loss = F.cross_entropy(logits, target)
    return loss, {"loss/mlm": loss.detach(), "acc/mlm": _acc(logits, target)}


def mrc_loss(model: DUETPretrainer, vp_embeds: torch.Tensor, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    rows, targets = batch["mrc_rows"], batch["mrc_targets"]
    sel = rows >= 0
    b_idx = torch.arange(rows.size(0), device=rows.device)[:, None].expand_as(rows)[sel]
    emb = vp_embeds[b_idx, rows[sel] + 1]  # local row 0 is [stop]
    logp = F.log_softmax(model.image_classifier(emb).float(), -1)
    t = targets[sel].float()
    loss = (t * (torch.log(t.clamp_min(1e-12)) - logp)).sum(-1).mean()
    return loss, {"loss/mrc": loss.detach(), "acc/mrc": (logp.argmax(-1) == t.argmax(-1)).float().mean()}


def og_loss(outs: Mapping[str, Any], batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Object grounding: CE of the OG logits (local rows, -inf outside the object tokens) against
    the target object's row; states without the target among their objects are ignored."""
    logits = outs.get("obj_logits")
    if logits is None or "og_labels" not in batch:
        raise ValueError("OG needs a model with objects (obj_feat_size > 0) and a batch with object "
                         "tokens (task reverie with an object store)")
    labels = batch["og_labels"]
    loss = _ce(logits.float(), labels, outs["vp_embeds"])
    metrics: dict[str, Any] = {"loss/og": loss.detach()}
    _put_acc(metrics, "acc/og", logits, labels)
    return loss, metrics


def navigate(duet: torch.nn.Module, nav: Mapping[str, Any],
             taps: dict[str, Any] | None = None) -> dict[str, Any]:
    """'navigation' mode on a batch from :func:`encode_states`; with ``taps`` (a dict) its taps
    (``global.*``, ``local.*``, ``action_probs``) and the masks ``global.masks`` (B, G) and
    ``local.masks`` (B, 1 + N) are merged into it."""
    if taps is None:
        return duet("navigation", nav)
    outs, nav_taps = duet("navigation", nav, taps=True)
    taps.update(nav_taps)
    add_navigation_masks(taps, nav)
    return outs


def add_navigation_masks(taps: dict[str, Any], nav: Mapping[str, Any]) -> None:
    """``taps['global.masks']`` / ``taps['local.masks']``: the map-slot and viewpoint-token masks."""
    taps["global.masks"] = nav["gmap_masks"]
    taps["local.masks"] = nav["vp_masks"]


def compute_task(model: DUETPretrainer, batch: Mapping[str, Any],
                 taps: dict[str, Any] | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Loss and metrics of one batch of the task named ``batch['task']``.

    With ``taps`` (a dict), the student's distillation taps of every mode it runs are merged into
    it, with the token masks of every encoder (``<p>.masks``; see :func:`encode_states` and
    :func:`navigate`).  The loss is the same either way.
    """
    task = batch["task"]
    nav = encode_states(model.duet, batch, taps)
    if task == "mlm":
        outs, text = model.navigation_with_text(nav, taps)
        if taps is not None:
            add_navigation_masks(taps, nav)
        return mlm_loss(model, text, batch["mlm_labels"])
    outs = navigate(model.duet, nav, taps)
    if task == "sap":
        return sap_loss(outs, batch)
    if task == "mrc":
        return mrc_loss(model, outs["vp_embeds"], batch)
    if task == "og":
        return og_loss(outs, batch)
    raise ValueError(f"unknown pretraining task {task!r}")


def collect_taps(model: torch.nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
    """The distillation taps of ``model`` (a :class:`DUET` or :class:`DUETPretrainer`) on a
    pretraining batch: 'language', 'panorama' and 'navigation' with taps, merged, plus the token
    masks ``<p>.masks`` of every encoder.  Gradients follow the caller's grad mode (the teacher
    path of :meth:`PretrainTask.compute` runs it under ``torch.no_grad()``)."""
    duet = navigation_network(model)
    taps: dict[str, Any] = {}
    navigate(duet, encode_states(duet, batch, taps), taps)
    return taps


# ----------------------------------------------------------------------------------- the task


class _BatchIndices(Dataset):
    """Batch indices ``start, start + 1, ...`` of a task, for a DataLoader that builds them ahead."""

    def __init__(self, task: "PretrainTask", start: int) -> None:
        self.task, self.start = task, start

    def __len__(self) -> int:
        return 2**62  # open-ended: the trainer stops asking

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.task.build_batch(self.start + i)


def _one_thread(_: int) -> None:
    """A batch-building worker: one thread; and the first SIGTERM is ignored, so that one sent to every
    process of a job (SLURM, ``kill -- -PGID``) does not end the workers under a trainer that is finishing
    its step to stop after it (``Trainer.fit``); a second SIGTERM (the DataLoader's own ``terminate()`` at
    shutdown, or the sender's again) ends the worker."""
    torch.set_num_threads(1)
    signal.signal(signal.SIGTERM, _second_sigterm_ends)


def _second_sigterm_ends(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class PretrainTask:
    """The Trainer task: ``next_batch(index)`` is a pure function of (seed, index).

    With ``num_workers > 0`` the batches are built ahead in that many worker processes (a
    DataLoader over consecutive indices, ``prefetch`` batches each); they are the same batches.  An
    index out of sequence (a resume) restarts the workers there.  ``data_wait_s`` adds up the time
    ``next_batch`` waited."""

    def __init__(self, dataset: PrefixDataset, batch_size: int, mix: Mapping[str, float], seed: int = 0,
                 sap_stop_prob: float = 0.2, rank: int | None = None, world_size: int | None = None,
                 num_workers: int = 0, prefetch: int = 4) -> None:
        if num_workers < 0 or prefetch < 1:
            raise ValueError("num_workers must be >= 0 and prefetch >= 1")
        self.num_workers, self.prefetch = num_workers, prefetch
        self._batches: Any = None  # the workers' iterator
        self._expect = -1  # the index it yields next
        self.data_wait_s = 0.0
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.sap_stop_prob = sap_stop_prob
        self.tasks = [t for t in PRETRAIN_TASKS if (mix.get(t) or 0.0) > 0]
        if not self.tasks:
            raise ConfigError("mix: every task ratio is 0 (give mlm, sap, mrc or og a ratio > 0)")
        if "og" in self.tasks and getattr(dataset, "objects", None) is None:
            raise ValueError("the OG task needs object tokens: a REVERIE dataset built with an object store")
        w = np.array([mix[t] for t in self.tasks], dtype=np.float64)
        self.probs = w / w.sum()
        if dataset.num_episodes < batch_size:
            raise ConfigError(f"batch_size: {dataset.num_episodes} episodes cannot fill a batch of {batch_size}")
        self.rank, self.world_size = placement(batch_size, rank, world_size)

    def task_of(self, index: int) -> str:
        rng = np.random.default_rng([self.seed, index, 0])
        return self.tasks[int(rng.choice(len(self.tasks), p=self.probs))]

    def episodes_of(self, index: int) -> list[int]:
        per_epoch = self.dataset.num_episodes // self.batch_size
        epoch, k = divmod(index, per_epoch)
        order = np.random.default_rng([self.seed, epoch, 1]).permutation(self.dataset.num_episodes)
        return [int(e) for e in order[k * self.batch_size:(k + 1) * self.batch_size]]

    def make_batch(self, task: str, episodes: Sequence[int], rng: np.random.Generator) -> dict[str, Any]:
        states = []
        for e in episodes:
            n = len(self.dataset.episodes[e].path)
            t = n - 1
            if task == "sap" and n > 1 and rng.random() >= self.sap_stop_prob:
                t = int(rng.integers(n - 1))
            states.append(self.dataset.state(e, t))
        batch = collate_states(states, mlm_rng=rng if task == "mlm" else None,
                               mrc_rng=rng if task == "mrc" else None,
                               angle_feat_size=self.dataset.angle_feat_size)
        batch["task"] = task
        return batch

    def next_batch(self, index: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        if self.num_workers == 0:
            batch = self.build_batch(index)
        else:
            if self._batches is None or index != self._expect:
                self.close()  # the workers of an earlier position, if any
                loader = DataLoader(_BatchIndices(self, index), batch_size=None, num_workers=self.num_workers,
                                    prefetch_factor=self.prefetch, worker_init_fn=_one_thread)
                self._batches, self._expect = iter(loader), index
            batch = next(self._batches)
            self._expect += 1
        self.data_wait_s += time.perf_counter() - t0
        return batch

    def close(self) -> None:
        """End the batch workers now (idempotent; a later ``next_batch`` starts new ones).  Left to the
        interpreter's exit instead (a run stopped by SIGTERM keeps its task alive in the traceback),
        multiprocessing would terminate them there and the DataLoader's SIGCHLD handler would raise
        over the exit, or its join would hang."""
        batches, self._batches, self._expect = self._batches, None, -1
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def __getstate__(self) -> dict[str, Any]:  # workers get the task without the workers' iterator
        return {**self.__dict__, "_batches": None}

    def build_batch(self, index: int) -> dict[str, Any]:
        """Batch ``index``, built here (what the workers run)."""
        task = self.task_of(index)
        episodes = list(shard(self.episodes_of(index), self.rank, self.world_size))
        rng = np.random.default_rng([self.seed, index, 2, self.rank])
        return self.make_batch(task, episodes, rng)

    def compute(self, model: torch.nn.Module, batch: Any, teacher: torch.nn.Module | None = None) -> TaskOutput:
        """The task loss of ``model`` (a :class:`DUETPretrainer`) on ``batch``.

        With a ``teacher`` (a :class:`DUET` or :class:`DUETPretrainer`, frozen by the caller; the
        :class:`~minivln.training.trainer.Trainer` does it) the student also records its
        distillation taps, ``outputs['taps']`` (every encoder of the modes it ran, with their
        ``<p>.masks``), and the teacher runs on the same batch through the same modes under
        ``torch.no_grad()``, ``teacher_outputs['taps']`` (the MLM language-update branch is not
        run for it: it records no taps).  Without a teacher nothing is recorded and the cost is
        unchanged.  The loss is the same either way; stage-1 KD adds its terms on top
        (:class:`~minivln.distill.stage1.Stage1KD`).
        """
        if teacher is None:
            loss, metrics = compute_task(model, batch)
            return TaskOutput(loss=loss, metrics=metrics)
        teacher_net = navigation_network(teacher)  # a clear error before any work
        taps: dict[str, Any] = {}
        loss, metrics = compute_task(model, batch, taps)
        with torch.no_grad():
            teacher_taps = collect_taps(teacher_net, batch)
        return TaskOutput(loss=loss, metrics=metrics, outputs={"taps": taps},
                          teacher_outputs={"taps": teacher_taps})

    def state_dict(self) -> dict[str, Any]:
        return {}  # batches are a pure function of (seed, index)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


def make_validate(datasets: Mapping[str, PrefixDataset], tasks: Sequence[str], batch_size: int,
                  n_batches: int, seed: int = 0, sap_stop_prob: float = 0.2):
    """``validate(model) -> {split: {mlm_acc, sap_fused_acc, sap_global_acc, sap_local_acc,
    mrc_acc, og_acc, <task>_loss}}`` on fixed, seeded batches of each split (the same every time)."""
    names = {"acc/mlm": "mlm_acc", "acc/sap_fused": "sap_fused_acc", "acc/sap_global": "sap_global_acc",
             "acc/sap_local": "sap_local_acc", "acc/mrc": "mrc_acc", "acc/og": "og_acc"}

    at_majority: dict[str, int] = {}  # consecutive validations whose MLM accuracy is the majority rate

    def validate(model: torch.nn.Module) -> dict[str, Any]:
        device = next(model.parameters()).device

        results: dict[str, Any] = {}
        for split, ds in datasets.items():
            masked: Counter[int] = Counter()  # the masked tokens' labels: the majority rate
            bs = min(batch_size, ds.num_episodes)
            helper = PretrainTask(ds, bs, {t: 1.0 for t in tasks}, seed=seed, sap_stop_prob=sap_stop_prob,
                                  rank=0, world_size=1)
            sums: dict[str, float] = {}
            counts: dict[str, int] = {}
            for task in tasks:
                for k in range(n_batches):
                    rng = np.random.default_rng([seed, k, 3, PRETRAIN_TASKS.index(task)])
                    batch = move_to(helper.make_batch(task, helper.episodes_of(k), rng), device)
                    if task == "mlm":
                        labels = batch["mlm_labels"]
                        masked.update(labels[labels != -100].tolist())
                    loss, metrics = compute_task(model, batch)
                    for key, v in {**metrics, f"loss/{task}": loss}.items():
                        key = names.get(key, key.replace("loss/", "") + "_loss")
                        sums[key] = sums.get(key, 0.0) + float(v)
                        counts[key] = counts.get(key, 0) + 1
            results[split] = {k: sums[k] / counts[k] for k in sorted(sums)}
            if masked:
                results[split]["mlm_majority_acc"] = mlm_collapse_check(
                    split, results[split]["mlm_acc"], masked, at_majority)
        return results

    return validate


def mlm_collapse_check(split: str, accuracy: float, masked: Counter[int], at_majority: dict[str, int],
                       tolerance: float = 0.005) -> float:
    """The accuracy of always predicting the most frequent masked token (``masked``: label counts) on
    ``split``; a warning when ``accuracy`` has been within ``tolerance`` of it at two validations in a
    row (``at_majority`` keeps the count per split): a text encoder that collapsed to one word."""
    token, top = masked.most_common(1)[0]
    majority = top / sum(masked.values())
    at_majority[split] = at_majority.get(split, 0) + 1 if accuracy <= majority + tolerance else 0
    if at_majority[split] == 2:
        warnings.warn(f"{split}: MLM accuracy {accuracy:.3f} is, for the second validation in a row, the rate of "
                      f"always predicting the most frequent masked token (id {token}: {majority:.3f}): the text "
                      "encoder may have collapsed (a lower learning rate or a longer warm-up?)", stacklevel=2)
    return majority


# ----------------------------------------------------------------------------------- building a run


def resolve_data(cfg: PretrainConfig) -> tuple[Path, Any]:
    """(data directory, feature store) of a config (builds the toy world / stand-in if needed)."""

    if cfg.uses_toy:
        data_dir = ensure_toy_world(cfg.toy_dir, seed=cfg.toy_seed)
    else:
        data_dir = resolve_data_dir(cfg.data_dir or None)
    if cfg.features == "synthetic":
        dim = get_config(cfg.model, **cfg.model_overrides).image_feat_size
        return data_dir, SyntheticFeatures(dim=dim, seed=cfg.toy_seed)

    path = Path(cfg.features) if cfg.features else None
    if path is None:
        if not cfg.uses_toy:
            raise ConfigError("features: give a view feature HDF5 file (or 'synthetic'), or use data_dir: toy")
        path = Path(data_dir) / "standin_views.h5"
        if not path.exists():
            objs = Path(data_dir) / "standin_objects.h5"
            with_objs = model_uses_objects(cfg)[0] and not cfg.objects and not objs.exists()
            what = "view and object features" if with_objs else "features"
            print(f"building STAND-IN {what} (not from images) for the toy world at {path}", flush=True)
            build_standin(data_dir, path, objects_out=objs if with_objs else None, dtype="float16")
    return data_dir, FeatureStore(path)


def model_uses_objects(cfg: PretrainConfig) -> tuple[bool, int]:
    """(whether the configured model takes object tokens, its ``obj_feat_size``)."""

    mcfg = get_config(cfg.model, **cfg.model_overrides)
    return bool(mcfg.use_objects), int(mcfg.obj_feat_size)


def resolve_mix(cfg: PretrainConfig) -> dict[str, float]:
    """The task ratios of a config, checked: ``mix.og`` None (default) becomes 1 with task reverie
    and a model with objects, else 0; OG and object models need REVERIE (ConfigError otherwise)."""

    if cfg.task not in ("r2r", "reverie"):
        raise ConfigError(f"task: expected 'r2r' or 'reverie', got {cfg.task!r}")
    use_objects, obj_dim = model_uses_objects(cfg)
    if use_objects and cfg.task != "reverie":
        raise ConfigError(f"model {cfg.model!r} takes object tokens (obj_feat_size={obj_dim}) but task is "
                          f"{cfg.task!r}: objects are REVERIE-only (task: reverie, or a model without objects)")
    if use_objects and not (cfg.objects or cfg.features == "synthetic" or cfg.uses_toy):
        raise ConfigError(
            f"model {cfg.model!r} takes object tokens: give objects: PATH (a REVERIE object HDF5, e.g. "
            "the stand-in from 'minivln features build ... --objects-out') or objects: synthetic")
    og = cfg.mix.og
    if og is None:
        og = 1.0 if cfg.task == "reverie" and use_objects else 0.0
    if og > 0 and cfg.task != "reverie":
        raise ConfigError(f"mix.og={og}: object grounding needs task: reverie (R2R has no target objects)")
    if og > 0 and not use_objects:
        raise ConfigError(
            f"mix.og={og}: object grounding needs a model with object inputs and an OG head, but "
            f"{cfg.model!r} has obj_feat_size=0; use a REVERIE preset (duet-reverie, minivln-reverie, "
            "duet-cpu-reverie, minivln-cpu-reverie) or model_overrides: {obj_feat_size: 768} "
            "(768 = stand-in object files)")
    mix = {"mlm": float(cfg.mix.mlm), "sap": float(cfg.mix.sap), "mrc": float(cfg.mix.mrc), "og": float(og)}
    if any(v < 0 for v in mix.values()):
        raise ConfigError(f"mix: ratios must be >= 0, got {mix}")
    return mix


def resolve_objects(cfg: PretrainConfig, data_dir: Path) -> Any:
    """The REVERIE object store of a config, or None when the model takes no objects.

    ``objects: PATH`` = an :class:`~minivln.features.hdf5.ObjectFeatureStore`; ``"synthetic"`` (also
    the default with ``features: synthetic``) = :class:`~minivln.training.pretrain_data.SyntheticObjects`;
    ``""`` with ``data_dir: toy`` = the stand-in object file ``TOY_DIR/standin_objects.h5`` (built on
    first use).  Errors (ConfigError) when objects are needed but none is given, or widths differ.
    """

    use_objects, obj_dim = model_uses_objects(cfg)
    if not use_objects:
        return None
    name = cfg.objects or ("synthetic" if cfg.features == "synthetic" else "")
    if name == "synthetic":
        return SyntheticObjects(data_dir, dim=obj_dim, seed=cfg.toy_seed)

    if name:
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"objects: object feature file {path} does not exist")
    else:
        if not cfg.uses_toy:
            raise ConfigError(
                f"model {cfg.model!r} takes object tokens: give objects: PATH (a REVERIE object HDF5, e.g. "
                "the stand-in from 'minivln features build ... --objects-out') or objects: synthetic")
        path = Path(data_dir) / "standin_objects.h5"
        if not path.exists():
            print(f"building STAND-IN object features (not from images) for the toy world at {path}", flush=True)
            views = Path(data_dir) / "standin_views.h5"
            with tempfile.TemporaryDirectory(dir=data_dir) as tmp:
                # the builder always writes view features too: keep an existing view file untouched
                view_out = views if not views.exists() else Path(tmp) / "views.h5"
                build_standin(data_dir, view_out, objects_out=path, dtype="float16")
    store = ObjectFeatureStore(path)
    if store.dim != obj_dim:
        raise ConfigError(f"objects: {path} holds {store.dim}-d object features but the model's "
                          f"obj_feat_size is {obj_dim} (set model_overrides.obj_feat_size={store.dim})")
    return store


def build_datasets(cfg: PretrainConfig, data_dir: Path, features: Any, with_classes: bool,
                   objects: Any = None) -> tuple[PrefixDataset, dict[str, PrefixDataset]]:
    """Train and validation :class:`PrefixDataset` of a config (REVERIE: nearest-goal labels from
    the files' ``pos_vps`` or the BBox goal sets, and object tokens when ``objects`` is given).

    Training instructions: ``train_files`` (DUET's ``*_enc.jsonl``) or the official ``train_split``
    file, then ``aug_files`` appended (DUET concatenates its ``train_traj_files``); validation sets:
    ``val_splits`` (official files) and ``val_files`` (named file lists)."""

    graphs = Graphs(data_dir, cfg.connectivity_dirs)
    tok = get_tokenizer()
    goals = None
    if cfg.task == "reverie":
        # goal set = the file's pos_vps (DUET's files), else the included viewpoints that see the
        # target in the BBox files (the evaluator's success test)
        bbox_goals = ReverieGoals(data_dir, graphs).episode_goals

        def goals(ep: Episode) -> frozenset[str]:
            return frozenset(ep.goal_vps) if ep.goal_vps else bbox_goals(ep)

    def make(eps: list[Episode], what: str) -> PrefixDataset:
        check_split_features(features, eps, graphs, what)
        return PrefixDataset(eps, graphs, features, tok.encode, max_instr_len=cfg.max_instr_len,
                             angle_feat_size=4, with_classes=with_classes, objects=objects, goals=goals)

    def from_files(paths: Sequence[str]) -> list[Episode]:
        return load_annotation_files(list(paths), cfg.task, graphs, vocab_size=tok.vocab_size)

    if cfg.train_files:
        train_eps, what = from_files(cfg.train_files), f"train_files ({len(cfg.train_files)})"
    else:
        train_eps, what = load_episodes(cfg.task, cfg.train_split, data_dir), f"the {cfg.task} {cfg.train_split} split"
    if cfg.aug_files:
        n = len(train_eps)
        train_eps = train_eps + from_files(cfg.aug_files)
        what += f" + aug_files ({len(cfg.aug_files)})"
        print(f"pretraining on {n} instructions + {len(train_eps) - n} augmented ones (aug_files)", flush=True)
    train = make(train_eps, what)  # first: a file without the training houses is named for them
    val = {s: make(load_episodes(cfg.task, s, data_dir), f"the {cfg.task} {s} split") for s in cfg.val_splits}
    val.update({name: make(from_files(paths), f"val_files.{name}") for name, paths in cfg.val_files.items()})
    return train, val


def build_pretrainer(cfg: PretrainConfig, num_classes: int = 1000) -> DUETPretrainer:
    duet = create_model(cfg.model, **cfg.network_overrides)
    if cfg.text_init:
        init_text(duet, cfg.text_init)
    if cfg.init_checkpoint:
        fresh: list[str] = []
        load_weights(duet, cfg.init_checkpoint, fresh=cfg.init_fresh, report=fresh)
        if fresh:
            print(f"init_checkpoint {cfg.init_checkpoint}: {len(fresh)} tensors start fresh "
                  f"({', '.join(fresh)})", flush=True)
    return DUETPretrainer(duet, num_classes=num_classes)


def stage1_weights(cfg: PretrainConfig) -> dict[str, float]:
    """Stage 1's term weights as they enter the loss, keyed ``emb``, ``att``, ``hid``: ``kd_weight`` times
    each part's weight (0: the term is not built), as :func:`~minivln.distill.compat.check_teacher` reads them."""
    return {k: cfg.kd_weight * v for k, v in dataclasses.asdict(cfg.kd_terms).items()}


def stage1_loss_terms(cfg: PretrainConfig, student: DUETConfig, teacher: DUETConfig) -> list[torch.nn.Module]:
    """The stage-1 loss terms ``cfg`` asks for (:func:`~minivln.distill.stage1.stage1_terms`), for the
    trainer, the training benchmark and anything else that must distil exactly as pretraining does."""
    return stage1_terms(student, teacher, cfg.kd_weight, part_weights=dataclasses.asdict(cfg.kd_terms),
                        cross_attention=cfg.kd_cross_attention, embed_encoders=cfg.kd_embed_encoders)


def run_pretraining(cfg: PretrainConfig) -> dict[str, Any]:
    """Train, validate, export; returns {'train': last log record, 'val': last validation, 'export': path}."""

    student_cfg = get_config(cfg.model, **cfg.network_overrides)  # a known preset, first
    dist = init_distributed(cfg.train.device)  # before the task, which shards batches by rank
    if dist.is_main:  # before any work: checkpoints and the exported weights go there
        check_writable_dir(cfg.train.run_dir, "run directory")
        if cfg.export:
            check_writable_dir(Path(cfg.export).parent, "export directory")
    teacher = None
    if cfg.teacher:  # stage 1: distillation while pretraining (docs/distillation.md)
        teacher = load_agent_model(cfg.teacher)
        check_teacher(student_cfg, teacher.config, stage=1, source=f"teacher {cfg.teacher}",
                      kd_terms=stage1_weights(cfg))
        if cfg.teacher_dtype not in TEACHER_DTYPES:
            raise ConfigError(f"teacher_dtype: one of {sorted(TEACHER_DTYPES)}, got {cfg.teacher_dtype!r}")
        teacher_autocast(teacher, cfg.teacher_dtype)
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    mix = resolve_mix(cfg)
    data_dir, features = resolve_data(cfg)
    objects = resolve_objects(cfg, data_dir)
    has_classes = features_have_classes(features)
    if mix["mrc"] > 0 and not has_classes:
        print(f"MRC skipped: {getattr(features, 'path', features)} stores no class distributions", flush=True)
        mix["mrc"] = 0.0
    train_ds, val_ds = build_datasets(cfg, data_dir, features, with_classes=mix["mrc"] > 0, objects=objects)
    num_classes = 1000
    if has_classes:
        try:
            ds0 = train_ds.episodes[0]
            num_classes = int(np.asarray(features.classes(ds0.scan, ds0.path[0])).shape[1])
        except (DataError, IndexError, KeyError):  # no class distribution there: keep the default
            num_classes = 1000
    seed_everything(cfg.train.seed)
    model = build_pretrainer(cfg, num_classes=num_classes)
    task = PretrainTask(train_ds, cfg.batch_size, mix, seed=cfg.train.seed, sap_stop_prob=cfg.sap_stop_prob,
                        num_workers=cfg.num_workers)
    active = [t for t in PRETRAIN_TASKS if mix[t] > 0]
    validate = make_validate(val_ds, active, cfg.batch_size, cfg.val_batches, seed=cfg.train.seed,
                             sap_stop_prob=cfg.sap_stop_prob) if val_ds and cfg.val_batches > 0 else None
    terms = []
    if teacher is not None:
        terms = stage1_loss_terms(cfg, model.duet.config, teacher.config)
    trainer = Trainer(model, task, cfg.train, validate=validate, run_config=cfg, teacher=teacher,
                      loss_terms=terms)
    try:  # RUN/.lock is held until the weights are exported
        try:
            record = trainer.fit()
        finally:
            task.close()
            trainer.close(release_lock=False)
        cleanup()  # on success only: after one rank's error a barrier would hang
        export = Path(cfg.export) if cfg.export else Path(cfg.train.run_dir) / "pretrained"
        if trainer.dist.is_main:
            save_pretrained(model.duet, export, metadata={"source": "minivln pretrain"})
            print(f"exported navigation weights to {export} (fine-tune with init_checkpoint: {export})", flush=True)
    finally:
        trainer.release_lock()
    if cfg.num_workers:
        print(f"data: {cfg.num_workers} workers; the training loop waited {task.data_wait_s:.1f} s for batches",
              flush=True)
    return {"train": record, "val": trainer.last_val, "export": str(export), "data_wait_s": task.data_wait_s}


# ----------------------------------------------------------------------------------- CLI


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="pretrain DUET (MLM, SAP, MRC, REVERIE OG) on ground-truth path prefixes")
    p.add_argument("--config", default=None, help="YAML config (e.g. configs/toy-pretrain-teacher.yaml)")
    p.add_argument("--out", required=True, help="run directory (checkpoints, logs, exported weights)")
    p.add_argument("--resume", action="store_true", help="continue RUN/latest")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100 mix.mrc=0")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:

    cfg, note = load_run_config(PretrainConfig, args.out, args.config, list(args.overrides), resume=args.resume)
    if note:
        print(note, flush=True)
    out = run_pretraining(cfg)
    val = out["val"]
    if val:
        print("validation: " + ", ".join(f"{k}={v:.3f}" for k, v in sorted(val.items())
                                         if isinstance(v, float) and math.isfinite(v)))
    return 0
