"""The DUET navigation agent: environment observations in, rollouts (and their losses) out.

:class:`DUETAgent` glues three pieces together:

* the environment (:class:`~minivln.env.env.NavBatchEnv`), which teleports along walks of
  neighbours and keeps the leaderboard trajectory;
* the agent-side map bookkeeping (:class:`~minivln.model.agent_inputs.MapNavigator`), which builds
  the network's per-step inputs exactly as the reference agent does (``DUET_INTERFACE.md`` §6);
* the network (:class:`~minivln.model.duet.DUET`, any preset).

A rollout runs one batch of episodes with one of three feedbacks (``DUET_INTERFACE.md`` §7):

``'teacher'``
    the agent follows the ground-truth path exactly; the label at each step is the slot of the next
    GT node (0 = STOP at the goal).  The episode ends when the agent reaches the goal.  (REVERIE
    episodes: the agent follows the expert's labels instead, as upstream's REVERIE agent does.)
``'sample'``
    the action is sampled from ``softmax(fused_logits)``; the label at every visited state comes from
    the expert: STOP at the goal, else the unvisited slot ``n`` minimising ``d(cur, n) + d(n, goal)``
    with true shortest distances (``expert='spl'``).  The episode ends when the agent reaches the goal
    (or samples STOP, or runs out of ghosts / steps).
``'argmax'``
    evaluation: arg-max actions, the episode ends when slot 0 (STOP) is chosen, no ghost is left or at
    the last step; the final location is the visited node with the highest recorded STOP probability.
``'path'``
    evaluation (no labels, no loss) with the actions of ``'teacher'``: the slot of the next node of the
    annotated path, 0 (STOP) at its last node (REVERIE episodes, or a next node without a slot: the
    expert's slot).  The episode then ends as in ``'argmax'`` (walk back to the visited node with the
    highest STOP probability; no network call follows).  Every network replays the same steps, so
    ``minivln bench model --episodes real`` times models of different quality on equal work.

**Compaction** (``DUETAgent(compact=True)``, the default): once a sample has ended, the network runs
on the samples still navigating only (their panoramas, text and map; the text keys/values are
recomputed once per set of rows), and the step's outputs are put back over the whole batch (an
ended sample's row allows STOP alone; it is never used).  The reference runs every sample at every
step; the outputs of the navigating samples are the same up to padding (tested against
``compact=False`` in every feedback, with objects and with a stage-2 teacher).  ``keep_inputs=True``
turns it off, so that recorded inputs cover the whole batch.

**Paired rollouts** (:meth:`DUETAgent.rollout_pair`, ``FinetuneConfig.merge_rollouts``): DAgger's
teacher-forced and sampled rollouts of one iteration run as one batch (first half forced, second
half sampled) and come back as the two outputs the separate rollouts would give.

The loss of a rollout is ``sum over steps of CE_sum(fused_logits, labels) / batch_size`` (labels
``-100`` for samples that have ended); the caller applies the rollout weight (``ml_weight`` for the
teacher-forced one).  Every move goes through ``env.step`` with the walk planned on the agent's map,
so the environment's trajectory is the leaderboard trajectory.

REVERIE (a model with objects, ``config.obj_feat_size > 0``; ``DUET_INTERFACE.md`` §7, VLN-DUET's
``reverie/agent_obj.py``): each observation also carries the viewpoint's objects from an object
feature store (features, direction relative to the agent's heading/elevation, box size, ids; the first
``max_objects`` in training rollouts, all of them in 'argmax'), so the panorama is [views, objects].
The goal of an episode is the environment's goal set (``env.goal_viewpoints(i)``); the 'teacher'
labels of REVERIE episodes come from the expert, as upstream, not from the annotated path.  In
'teacher'/'sample' rollouts the object-grounding (OG) loss is added at every step at which a sample
is still navigating and stands where its target is visible (``goals.is_goal``): summed cross-entropy
of ``obj_logits`` against row ``view_len + 1 + j`` of the target (j = its index among the
viewpoint's objects; no label when the target is not among them), divided by the batch size, times
``og_weight`` (upstream: 1, i.e. the rollout's own weight).  Each leaderboard entry gets
``predObjId``: the arg-max object recorded at the final node (-1 when that node shows no object).

For distillation every rollout keeps its per-step outputs (:attr:`RolloutOutput.steps`: fused logits,
labels, slot ids, and the navigation inputs when ``keep_inputs=True``), and ``step_hook`` is called
after every navigation forward pass with ``(t, outputs, navigation batch, labels)``.

Stage-2 distillation (``rollout(..., teacher=duet)``): a frozen teacher DUET runs in lock-step with
the student under ``torch.no_grad()``: 'language' on the same tokens, then at every step 'panorama'
on the same panorama inputs and 'navigation' on the same map state.  The teacher keeps its own
:class:`~minivln.model.agent_inputs.MapNavigator` (a shadow: its node features are the teacher's
panorama outputs), which receives the same observations and the **student's** actions (and the same
``stop`` flags), so its graph, slots, step ids and ended flags are the student's at every step (checked
each step).  The student's text output, the teacher's, both panorama-encoder outputs with their masks,
and the teacher's fused logits are recorded (:class:`TeacherStep`, :attr:`StepRecord.teacher`,
:attr:`RolloutOutput.txt_embeds`, ...).  Without a teacher none of this runs or is recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from minivln.data.datasets import Episode
from minivln.data.reverie import ReverieGoals
from minivln.data.tokenizer import PAD_ID, cut_ids, get_tokenizer
from minivln.env import env as E
from minivln.features.embed import embed_instructions
from minivln.model import graph_map as G
from minivln.model.agent_inputs import MapNavigator, NavigationBatch, PanoramaBatch
from minivln.model.duet import DUET

Feedback = Literal["teacher", "sample", "argmax", "path"]
FEEDBACKS = ("teacher", "sample", "argmax", "path")
EVAL_FEEDBACKS = ("argmax", "path")  # no labels, no loss
IGNORE = -100

StepHook = Callable[[int, dict, NavigationBatch, torch.Tensor], None]


def to_nav_observation(
    ob: E.Observation,
    features: Any | None = None,
    objects: Any | None = None,
    max_objects: int | None = None,
) -> G.NodeObservation:
    """An environment observation as the navigator's :class:`~minivln.model.graph_map.NodeObservation`.

    View features come from ``ob.features`` (the environment's feature store) or, if it has none,
    from ``features.get(scan, viewpoint)``.  Candidates keep the environment's view index and its
    angles relative to the agent's discretised view (DUET's candidate angle feature).

    With ``objects`` (an :class:`~minivln.features.hdf5.ObjectFeatureStore`) the observation also
    carries the viewpoint's objects (the first ``max_objects`` if given) as VLN-DUET's
    ``ObjectFeatureDB.get_object_feature`` gives them: features, ids, box features and angle
    features of the directions relative to the simulator state's heading/elevation
    (:func:`~minivln.model.graph_map.object_location_fts`).
    """
    feats = ob.features
    if feats is None:
        if features is None:
            raise ValueError("the observation carries no view features and no feature store was given")
        feats = features.get(ob.scan, ob.viewpoint)
    cands = [
        G.Candidate(
            viewpoint=c.viewpoint,
            point_id=int(c.view_index),
            position=np.asarray(c.position, dtype=np.float64),
            heading=c.heading,
            elevation=c.elevation,
            rel_heading=c.rel_heading,
            rel_elevation=c.rel_elevation,
            distance=c.distance,
        )
        for c in ob.candidates
    ]
    nav_ob = G.NodeObservation(
        viewpoint=ob.viewpoint,
        view_index=int(ob.view_index),
        heading=float(ob.heading),
        elevation=float(ob.elevation),
        position=np.asarray(ob.position, dtype=np.float64),
        view_features=np.asarray(feats, dtype=np.float32),
        candidates=cands,
    )
    if objects is not None:
        objs = objects.get(ob.scan, ob.viewpoint)
        k = len(objs) if max_objects is None else min(len(objs), int(max_objects))
        nav_ob.obj_img_fts = np.asarray(objs.fts, dtype=np.float32)[:k]
        nav_ob.obj_ang_fts, nav_ob.obj_box_fts = G.object_location_fts(
            np.asarray(objs.directions)[:k], np.asarray(objs.sizes)[:k], float(ob.heading), float(ob.elevation)
        )
        nav_ob.obj_ids = [int(x) for x in np.asarray(objs.obj_ids)[:k]]
    return nav_ob


def spl_expert_slot(
    gmap_vpids: Sequence[Any],
    visited: Sequence[bool],
    current: str,
    goal: str,
    distance: Callable[[str, str], float],
) -> int:
    """The 'spl' expert's slot: 0 (STOP) at the goal, else the unvisited slot ``n`` (slot > 0)
    minimising ``distance(current, n) + distance(n, goal)`` (first one on ties)."""
    if current == goal:
        return 0
    best, best_d = 0, float("inf")
    for k, vp in enumerate(gmap_vpids):
        if k == 0 or vp is None or visited[k]:
            continue
        d = distance(current, vp) + distance(vp, goal)
        if d < best_d:
            best, best_d = k, d
    return best


def nearest_goal_slot(
    gmap_vpids: Sequence[Any],
    visited: Sequence[bool],
    current: str,
    goals: Collection[str],
    distance: Callable[[str, str], float],
) -> int:
    """The 'spl' expert with a set of goal viewpoints: 0 (STOP) at any goal, else the unvisited slot
    ``n`` minimising ``distance(current, n) + min_g distance(n, g)`` (first one on ties); for one
    goal this is :func:`spl_expert_slot`."""
    if current in goals:
        return 0
    best, best_d = 0, float("inf")
    for k, vp in enumerate(gmap_vpids):
        if k == 0 or vp is None or visited[k]:
            continue
        d = distance(current, vp) + min(distance(vp, g) for g in goals)
        if d < best_d:
            best, best_d = k, d
    return best


def object_label(obj_ids: Sequence[Any], target: Any, at_goal: bool, view_len: int) -> int:
    """The OG label of one sample at one step (VLN-DUET ``_teacher_object``): the row
    ``view_len + 1 + j`` of ``obj_logits`` where j is the target's index among the viewpoint's
    objects (ids compared as strings), when the sample stands where its target is visible
    (``at_goal``); :data:`IGNORE` otherwise or when the target is not among the objects."""
    if not at_goal or target is None:
        return IGNORE
    for j, obj in enumerate(obj_ids):
        if str(obj) == str(target):
            return int(view_len) + 1 + j
    return IGNORE


def teacher_slot(gmap_vpids: Sequence[Any], current: str, path: Sequence[str]) -> int | None:
    """The teacher's slot on the ground-truth path: 0 at its last node, else the slot of the node
    after ``current`` on the path; None when ``current`` is off the path or that node has no slot."""
    if current == path[-1]:
        return 0
    if current not in path:
        return None
    nxt = path[list(path).index(current) + 1]
    try:
        return list(gmap_vpids).index(nxt)
    except ValueError:
        return None


@dataclass
class TeacherStep:
    """What the stage-2 teacher computed at one step, on the student's state (no gradient)."""

    fused_logits: torch.Tensor  # (B, slots), the same slots (and -inf positions) as the student's
    pano_embeds: torch.Tensor  # (B, N, H_teacher) panorama-encoder output
    pano_masks: torch.Tensor  # (B, N) bool, True = real token (equal to the student's)
    gmap_vpids: list[list[Any]]  # the shadow navigator's slots (equal to the student's)
    viewpoints: list[str]  # the shadow navigator's current node per sample
    active: list[bool]  # the shadow navigator's samples still navigating (equal to the student's)
    obj_logits: torch.Tensor | None = None  # (B, 1+N) with objects, else None


@dataclass
class StepRecord:
    """One navigation step of a rollout (kept for distillation and tests)."""

    t: int
    fused_logits: torch.Tensor  # (B, slots), with gradient in training
    labels: torch.Tensor  # (B,) int64, -100 for ended samples (all -100 in 'argmax')
    gmap_vpids: list[list[Any]]
    active: list[bool]  # samples still navigating at this step
    actions: list[int]
    inputs: dict[str, Any] | None = None  # the navigation inputs (keep_inputs=True)
    outputs: dict[str, Any] | None = None  # every navigation output (keep_inputs=True)
    obj_logits: torch.Tensor | None = None  # (B, 1+N) with objects (REVERIE), else None
    obj_labels: torch.Tensor | None = None  # (B,) OG labels (-100: none) in training with objects
    # recorded only in a rollout with a teacher (stage-2 distillation), else None:
    pano_embeds: torch.Tensor | None = None  # (B, N, H) the student's panorama-encoder output
    pano_masks: torch.Tensor | None = None  # (B, N) bool
    viewpoints: list[str] | None = None  # the current node of each sample
    teacher: TeacherStep | None = None


@dataclass
class RolloutOutput:
    """A rollout's unweighted loss, logged scalars, per-step records and leaderboard entries."""

    loss: torch.Tensor  # sum over steps of CE_sum / batch size (0 in 'argmax'); + og_weight * og_loss
    steps: list[StepRecord] = field(default_factory=list)
    results: list[dict] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    og_loss: torch.Tensor | None = None  # REVERIE training: OG CE_sum over steps / batch size
    # recorded only in a rollout with a teacher (stage-2 distillation), else None:
    txt_embeds: torch.Tensor | None = None  # (B, L, H) the student's text-encoder output
    txt_masks: torch.Tensor | None = None  # (B, L) bool
    teacher_txt_embeds: torch.Tensor | None = None  # (B, L, H_teacher)


@dataclass
class _Rollout:
    """The state of one rollout while it runs (see :meth:`DUETAgent.rollout`)."""

    feedback: Feedback
    training: bool
    generator: torch.Generator | None
    device: torch.device
    eps: list[Episode]
    houses: list[Any]
    goal_sets: list[Collection[str]]
    use_objects: bool
    objects: Any | None
    max_objects: int | None
    nav: MapNavigator
    synced: list[int]  # nodes of nav.paths[i] the environment has walked
    txt_embeds: torch.Tensor
    txt_masks: torch.Tensor
    txt_kv: Any
    instr_embeds: torch.Tensor | None  # the instructions' sentence embeddings (og_text_encoder), else None
    shadow: _TeacherShadow | None
    loss: torch.Tensor  # the summed action cross-entropy so far
    og_loss: torch.Tensor  # the summed object-grounding cross-entropy so far
    n_correct: torch.Tensor  # () int64 on the device: read once, at the end (no sync per step)
    n_og_correct: torch.Tensor
    n_labels: int = 0
    n_og: int = 0
    steps: list[StepRecord] = field(default_factory=list)
    # a paired rollout (:meth:`DUETAgent.rollout_pair`): samples [0, split) are teacher-forced, the rest
    # sampled; loss, og_loss and the counts are then (2,) / pairs, one entry per half
    split: int | None = None
    compact: bool = False  # build and run only the samples still navigating (see DUETAgent)
    rows: list[int] | None = None  # this step's samples run by the network when compacted (None: all)
    text_rows: dict = field(default_factory=dict)  # rows -> (txt_embeds, txt_masks, txt_kv, instr_embeds) of those rows
    pano_embeds: torch.Tensor | None = None  # this step's panorama-encoder output and masks (compacted
    #                     without a stage-2 teacher: the rows run only; with one: the whole batch)
    pano_masks: torch.Tensor | None = None


class DUETAgent:
    """Runs batches of episodes with a DUET network (see the module docstring).

    Args:
        model: a :class:`~minivln.model.duet.DUET` (its train/eval mode is the caller's business).
        max_action_len: navigation steps per episode (DUET: 15).
        max_instr_len: instruction tokens kept, [CLS]/[SEP] included (DUET: 200).
        expert: 'spl' (the only expert implemented).
        features: a feature store used when the environment's observations carry no features.
        objects: the object feature store (required when the model uses objects).
        goals: where REVERIE targets are visible (required to train a model with objects: OG labels).
        og_weight: weight of the OG loss within a rollout (upstream: 1).
        max_objects: objects kept per viewpoint in 'teacher'/'sample' rollouts (None: all; DUET's
            REVERIE script: 20 in training, all in evaluation).
        compact: run the network on the samples still navigating only (the reference runs every
            sample of the batch at every step; an ended sample's outputs are never used).  The
            outputs of the others are the same up to padding; ``keep_inputs=True`` turns it off.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        max_action_len: int = 15,
        max_instr_len: int = 200,
        expert: str = "spl",
        features: Any | None = None,
        objects: Any | None = None,
        goals: ReverieGoals | None = None,
        og_weight: float = 1.0,
        max_objects: int | None = None,
        compact: bool = True,
    ) -> None:
        if expert != "spl":
            raise ValueError(f"expert {expert!r} is not implemented (only 'spl')")
        if max_objects is not None and max_objects < 0:
            raise ValueError(f"max_objects must be >= 0 or None, got {max_objects}")
        self.model = model
        self.max_action_len = max_action_len
        self.max_instr_len = max_instr_len
        self.expert = expert
        self.features = features
        self.objects = objects
        self.goals = goals
        self.og_weight = og_weight
        self.max_objects = max_objects
        self.compact = compact
        self.tokenizer = get_tokenizer(max_instr_len)

    @property
    def uses_objects(self) -> bool:
        """Whether the model takes object tokens (``config.obj_feat_size > 0``: REVERIE)."""
        return bool(getattr(getattr(self.model, "config", None), "use_objects", False))

    # ---------------------------------------------------------------------------------- inputs

    def encode_instructions(self, texts: Sequence[str], device: torch.device,
                            given: Sequence[list[int] | None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(txt_ids (B, L) int64, txt_masks (B, L) bool), zero-padded.  ``given``: token ids a file gave
        (DUET's ``instr_encodings``; :attr:`~minivln.data.datasets.Episode.token_ids`), used instead of
        tokenising the text where not None (cut to ``max_instr_len``, [SEP] last)."""
        given = list(given) if given is not None else [None] * len(texts)
        encoded = iter(self.tokenizer.encode_batch([t for t, g in zip(texts, given) if g is None]))
        ids = [next(encoded) if g is None else cut_ids(g, self.max_instr_len) for g in given]
        width = max(len(x) for x in ids)
        out = torch.full((len(ids), width), PAD_ID, dtype=torch.long)
        for i, x in enumerate(ids):
            out[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        return out.to(device), (out != PAD_ID).to(device)

    def _device(self) -> torch.device:
        try:
            return next(self.model.parameters()).device
        except StopIteration:  # pragma: no cover
            return torch.device("cpu")

    # ---------------------------------------------------------------------------------- rollout

    def rollout(
        self,
        env: E.NavBatchEnv,
        episodes: Sequence[Episode] | None = None,
        feedback: Feedback = "argmax",
        *,
        step_hook: StepHook | None = None,
        keep_inputs: bool = False,
        generator: torch.Generator | None = None,
        teacher: nn.Module | None = None,
    ) -> RolloutOutput:
        """Run one batch (``episodes``, or the environment's next batch) to the end.

        ``teacher``: a :class:`~minivln.model.duet.DUET` run in lock-step on the student's states
        (stage-2 distillation; see the module docstring).  Its mode (eval) is the caller's business;
        it runs under ``torch.no_grad()``.  The student's computation is the same with or without it.

        Each step: the network scores the map (:meth:`_score`), the teacher follows (stage 2), the
        expert labels the state and the action loss grows (:meth:`_action_labels`), the object
        grounding likewise (:meth:`_object_labels`, REVERIE), the feedback picks the actions
        (:meth:`_choose`), the step is recorded, and the map and the environment move (:meth:`_advance`).
        """
        run = self._start(env, episodes, feedback, generator, teacher)
        self._run(run, env, step_hook, keep_inputs)
        return self._finish(run, env)

    def rollout_pair(
        self,
        env: E.NavBatchEnv,
        forced: Sequence[Episode],
        sampled: Sequence[Episode],
        *,
        generator: torch.Generator | None = None,
        teacher: nn.Module | None = None,
    ) -> tuple[RolloutOutput, RolloutOutput]:
        """DAgger's two rollouts of an iteration, a 'teacher' one on ``forced`` and a 'sample' one on
        ``sampled``, run as ONE batch (half the network calls; the GPU's lever: fewer, larger launches).

        Returns what ``rollout(env, forced, "teacher")`` and ``rollout(env, sampled, "sample")`` would:
        each half's loss over its own batch size, its metrics, steps (a half's steps end when its last
        sample ends), leaderboard entries and stage-2 records.  The computation is the same (tested in
        eval mode: equal losses, gradients and actions with the same ``generator``); what differs is
        padding (text, panorama and map lengths of the joint batch, all masked) and, in training, the
        draws of dropout.
        """
        if not forced or not sampled:
            raise ValueError(f"rollout_pair needs episodes in both halves, got {len(forced)} forced "
                             f"and {len(sampled)} sampled")
        run = self._start(env, list(forced) + list(sampled), "sample", generator, teacher)
        run.split = len(forced)
        run.loss = torch.zeros(2, device=run.device)
        run.og_loss = torch.zeros(2, device=run.device)
        run.n_correct = torch.zeros(2, dtype=torch.long, device=run.device)
        run.n_og_correct = torch.zeros(2, dtype=torch.long, device=run.device)
        run.n_labels, run.n_og = [0, 0], [0, 0]  # type: ignore[assignment]
        self._run(run, env, None, False)
        return self._finish_pair(run, env)

    def _run(self, run: _Rollout, env: E.NavBatchEnv, step_hook: StepHook | None, keep_inputs: bool) -> None:
        """The loop of named steps, until every sample has ended or ``max_action_len`` steps."""
        run.compact = self.compact and not keep_inputs
        for t in range(self.max_action_len):
            active = [not bool(e) for e in run.nav.ended]
            pano, pano_in, rows, batch, outs = self._score(run, t)
            logits = outs["fused_logits"]
            obj_logits = outs.get("obj_logits") if run.use_objects else None
            t_step = (run.shadow.step(t, pano, pano_in, rows, batch, active, run.use_objects)
                      if run.shadow else None)
            expert, labels = self._action_labels(run, batch, logits, active)
            obj_labels = self._object_labels(run, pano, obj_logits, active)
            actions = self._choose(run, logits, expert, batch, active)
            if step_hook is not None:
                step_hook(t, outs, batch, labels)
            run.steps.append(StepRecord(
                t=t, fused_logits=logits, labels=labels, gmap_vpids=batch.gmap_vpids, active=active,
                actions=[int(a) for a in actions],
                inputs=batch.inputs if keep_inputs else None, outputs=outs if keep_inputs else None,
                obj_logits=obj_logits, obj_labels=obj_labels,
            ))
            if run.shadow is not None:
                record = run.steps[-1]
                record.pano_embeds, record.pano_masks = run.pano_embeds, run.pano_masks
                record.viewpoints = [ob.viewpoint for ob in run.nav.obs]
                record.teacher = t_step
            self._advance(run, env, t, actions, batch)
            if run.nav.all_ended:
                break

    # ---------------------------------------------------------------------------------- its steps

    def _start(self, env: E.NavBatchEnv, episodes: Sequence[Episode] | None, feedback: Feedback,
               generator: torch.Generator | None, teacher: nn.Module | None) -> _Rollout:
        """Check the request, reset the environment, build the map and encode the instructions."""
        if feedback not in FEEDBACKS:
            raise ValueError(f"feedback must be one of {FEEDBACKS}, got {feedback!r}")
        training = feedback not in EVAL_FEEDBACKS
        if env.max_steps < self.max_action_len:
            raise ValueError(f"the environment's max_steps ({env.max_steps}) must be at least max_action_len "
                             f"({self.max_action_len}): the agent's final walk back counts as a step")
        device = self._device()
        env_obs = env.reset(episodes)
        eps = [a.episode for a in env.agents]
        # Objects when the model takes them and a store is given (a REVERIE model may still navigate
        # R2R without objects, as before); REVERIE episodes need them.
        use_objects = self.uses_objects and self.objects is not None
        if self.uses_objects and self.objects is None and any(ep.task == "reverie" for ep in eps):
            raise ValueError("REVERIE episodes with a model that uses objects need an object feature store "
                             "(DUETAgent(objects=...))")
        if use_objects and training and self.goals is None:
            raise ValueError("training a model with objects needs `goals` (ReverieGoals) for the OG labels")
        objects = self.objects if use_objects else None
        max_objects = self.max_objects if training else None
        nav = MapNavigator(
            [to_nav_observation(o, self.features, objects, max_objects) for o in env_obs],
            max_action_len=self.max_action_len,
            angle_feat_size=getattr(getattr(self.model, "config", None), "angle_feat_size", 4),
        )
        texts = [ep.text for ep in eps]
        txt_ids, txt_masks = self.encode_instructions(texts, device, [ep.token_ids for ep in eps])
        txt_embeds = self.model("language", {"txt_ids": txt_ids, "txt_masks": txt_masks})
        instr_embeds = instruction_embeddings(self.model, texts, device)
        txt_kv = text_cache(self.model, txt_embeds, txt_masks, instr_embeds)
        shadow = None
        if teacher is not None:
            shadow = _TeacherShadow(self._check_teacher(teacher, use_objects), nav, txt_ids, txt_masks, texts)
        return _Rollout(
            feedback=feedback, training=training, generator=generator, device=device, eps=eps,
            houses=[env.house(ep.scan) for ep in eps], goal_sets=[env.goal_viewpoints(i) for i in range(len(eps))],
            use_objects=use_objects, objects=objects, max_objects=max_objects, nav=nav, synced=[1] * len(eps),
            txt_embeds=txt_embeds, txt_masks=txt_masks,
            txt_kv=txt_kv, instr_embeds=instr_embeds, shadow=shadow,
            loss=torch.zeros((), device=device), og_loss=torch.zeros((), device=device),
            n_correct=torch.zeros((), dtype=torch.long, device=device),
            n_og_correct=torch.zeros((), dtype=torch.long, device=device),
        )

    def _score(self, run: _Rollout, t: int) -> tuple[PanoramaBatch, dict[str, Any], list[int] | None,
                                                     NavigationBatch, dict[str, Any]]:
        """'panorama' on the current nodes, the map updated, 'navigation' on it; scores recorded.

        With compaction and a sample ended, both run on the navigating samples ``rows`` only: the
        panorama batch and its inputs hold those rows, while the returned navigation batch (host
        side) and the outputs (``fused_logits``, ``obj_logits``) cover the whole batch again
        (:func:`network_step`; an ended sample's logits allow STOP alone), and ``run.pano_embeds`` too
        when a stage-2 teacher records it (its panorama masked out).  Returns ``(pano, pano_in, rows,
        batch, outs)``; ``rows`` is None without it."""
        nav = run.nav
        nav.begin_step(t)
        rows = run.rows = nav.active_rows() if run.compact and bool(nav.ended.any()) else None
        kw = {} if rows is None else {"rows": rows}
        pano = nav.panorama_inputs(use_objects=True if run.use_objects else None, **kw)
        pano_in = move_inputs(pano.model_inputs(), run.device)
        batch, outs, run.pano_embeds, run.pano_masks = network_step(
            self.model, nav, pano, pano_in, rows, run.text_rows,
            (run.txt_embeds, run.txt_masks, run.txt_kv, run.instr_embeds),
            run.use_objects, full_pano=run.shadow is not None)
        return pano, pano_in, rows, batch, outs

    def _action_labels(self, run: _Rollout, batch: NavigationBatch, logits: torch.Tensor,
                       active: list[bool]) -> tuple[list[int], torch.Tensor]:
        """The expert's slot for every navigating sample (``IGNORE`` otherwise, and in 'argmax'), as a
        host list and as a tensor on the device, and the step's summed cross-entropy added to the
        action loss.  The labels come from host-side state only (no device sync)."""
        expert = [IGNORE] * len(run.eps)
        if not run.training:
            return expert, torch.tensor(expert, dtype=torch.long)
        for i in range(len(run.eps)):
            if active[i]:
                expert[i] = self._expert_slot(run, batch, i, follow_path=self._forced(run, i))
        labels = torch.tensor(expert, dtype=torch.long).to(run.device)
        correct = (logits.detach().argmax(1) == labels) & (labels != IGNORE)
        if run.split is not None:  # a paired rollout: each half's sums apart
            k = run.split
            ce = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="none")
            run.loss = run.loss + torch.stack([ce[:k].sum(), ce[k:].sum()])
            run.n_correct += torch.stack([correct[:k].sum(), correct[k:].sum()])
            for h, part in enumerate((expert[:k], expert[k:])):
                run.n_labels[h] += sum(label != IGNORE for label in part)  # type: ignore[index]
            return expert, labels
        n_valid = sum(label != IGNORE for label in expert)
        if n_valid:
            run.loss = run.loss + F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="sum")
        run.n_labels += n_valid
        run.n_correct += correct.sum()
        return expert, labels

    @staticmethod
    def _forced(run: _Rollout, i: int) -> bool:
        """Whether sample i follows the annotated path ('teacher' feedback, or the forced half of a pair)."""
        return i < run.split if run.split is not None else run.feedback == "teacher"

    @staticmethod
    def _expert_slot(run: _Rollout, batch: NavigationBatch, i: int, follow_path: bool) -> int:
        """Sample i's expert slot: the next node of the annotated path (``follow_path``, R2R), else
        the 'spl' expert's slot toward the goal (set)."""
        cur, vpids, ep, goals = run.nav.obs[i].viewpoint, batch.gmap_vpids[i], run.eps[i], run.goal_sets[i]
        label = teacher_slot(vpids, cur, ep.path) if follow_path and ep.task == "r2r" else None
        if label is None:
            if len(goals) == 1:
                label = spl_expert_slot(vpids, batch.visited[i], cur, next(iter(goals)), run.houses[i].distance)
            else:
                label = nearest_goal_slot(vpids, batch.visited[i], cur, goals, run.houses[i].distance)
        return label

    def _object_labels(self, run: _Rollout, pano: PanoramaBatch, obj_logits: torch.Tensor | None,
                       active: list[bool]) -> torch.Tensor | None:
        """REVERIE training: the target object's row where it is visible (``IGNORE`` elsewhere), and
        the step's summed OG cross-entropy added to the OG loss; None otherwise.  (``pano`` holds
        the samples ``run.rows`` when the step was compacted.)"""
        if not (run.training and run.use_objects):
            return None
        assert obj_logits is not None and self.goals is not None
        expert = [IGNORE] * len(run.eps)
        where = {i: j for j, i in enumerate(run.rows)} if run.rows is not None else None
        for i, ep in enumerate(run.eps):
            if active[i]:
                j = i if where is None else where[i]
                at_goal = self.goals.is_goal(ep, run.nav.obs[i].viewpoint)
                expert[i] = object_label(pano.obj_ids[j], ep.obj_id, at_goal, int(pano.view_lens[j]))
        obj_labels = torch.tensor(expert, dtype=torch.long).to(run.device)
        rows = [i for i, label in enumerate(expert) if label != IGNORE]
        if rows and run.split is not None:  # a paired rollout: each half's sums apart
            k = run.split
            ce = F.cross_entropy(obj_logits.float(), obj_labels, ignore_index=IGNORE, reduction="none")
            correct = (obj_logits.detach().argmax(1) == obj_labels) & (obj_labels != IGNORE)
            run.og_loss = run.og_loss + torch.stack([ce[:k].sum(), ce[k:].sum()])
            run.n_og_correct += torch.stack([correct[:k].sum(), correct[k:].sum()])
            run.n_og[0] += sum(i < k for i in rows)  # type: ignore[index]
            run.n_og[1] += sum(i >= k for i in rows)  # type: ignore[index]
        elif rows:
            sel = torch.tensor(rows, dtype=torch.long).to(run.device)
            run.og_loss = run.og_loss + F.cross_entropy(obj_logits[sel].float(), obj_labels[sel], reduction="sum")
            run.n_og += len(rows)
            run.n_og_correct += (obj_logits.detach()[sel].argmax(1) == obj_labels[sel]).sum()
        return obj_labels

    def _choose(self, run: _Rollout, logits: torch.Tensor, expert: list[int], batch: NavigationBatch,
                active: list[bool]) -> list[int]:
        """The feedback: the expert's labels ('teacher'), the annotated path ('path'), a sample of the
        fused distribution ('sample') or its arg-max ('argmax')."""
        if run.split is not None:  # a paired rollout: the expert's labels, then a sample of the rest
            k = run.split
            width = max(len(v) for v in batch.gmap_vpids[k:])  # the sampled half's own slots
            probs = torch.softmax(logits.detach()[k:, :width].float(), 1)
            drawn = torch.multinomial(probs, 1, generator=run.generator).squeeze(1).tolist()
            return [label if label != IGNORE else 0 for label in expert[:k]] + drawn
        if run.feedback == "teacher":
            return [label if label != IGNORE else 0 for label in expert]
        if run.feedback == "path":
            return [self._expert_slot(run, batch, i, follow_path=True) if active[i] else 0
                    for i in range(len(run.eps))]
        if run.feedback == "sample":
            probs = torch.softmax(logits.detach().float(), 1)
            return torch.multinomial(probs, 1, generator=run.generator).squeeze(1).tolist()
        return logits.detach().argmax(1).tolist()

    def _advance(self, run: _Rollout, env: E.NavBatchEnv, t: int, actions: list[int], batch: NavigationBatch) -> None:
        """Apply the actions on the map (and the teacher's shadow map), walk the environment there and
        observe the new nodes.  In training a sample stops where it stands on a goal."""
        nav, batch_size = run.nav, len(run.eps)
        stop = [nav.obs[i].viewpoint in run.goal_sets[i] for i in range(batch_size)] if run.training else None
        nav.act(t, actions, batch, stop=stop)
        if run.shadow is not None:
            run.shadow.nav.act(t, actions, run.shadow.batch, stop=stop)
        env_obs = self._move_env(env, nav, run.synced)
        nav.observe([nav.obs[i] if nav.ended[i] else
                     to_nav_observation(env_obs[i], self.features, run.objects, run.max_objects)
                     for i in range(batch_size)])
        if run.shadow is not None:
            run.shadow.nav.observe(nav.obs)

    def _finish(self, run: _Rollout, env: E.NavBatchEnv) -> RolloutOutput:
        """Walk the environment to where the map ended each sample; losses per sample, metrics,
        leaderboard entries (REVERIE: with ``predObjId``)."""
        # samples still going after the last step were ended by the navigator (walk back included)
        self._move_env(env, run.nav, run.synced)
        batch_size = len(run.eps)
        metrics: dict[str, float] = {"steps": float(len(run.steps))}
        loss, og_out = run.loss, None
        if run.training and run.split is None:  # a paired rollout's halves: _finish_pair
            loss = loss / batch_size
            metrics["acc"] = int(run.n_correct) / max(1, run.n_labels)
            if run.use_objects:
                og_out = run.og_loss / batch_size
                loss = loss + self.og_weight * og_out
                metrics.update({"og_loss": float(og_out.detach()), "og_acc": int(run.n_og_correct) / max(1, run.n_og),
                                "og_labels": float(run.n_og)})
        results = env.results()
        if run.use_objects:
            for i, entry in enumerate(results):
                obj = run.nav.predicted_objects[i]
                entry["predObjId"] = int(obj) if obj is not None else -1
        out = RolloutOutput(loss=loss, steps=run.steps, results=results, metrics=metrics, og_loss=og_out)
        if run.shadow is not None:
            out.txt_embeds, out.txt_masks, out.teacher_txt_embeds = run.txt_embeds, run.txt_masks, run.shadow.txt_embeds
        return out

    def _finish_pair(self, run: _Rollout, env: E.NavBatchEnv) -> tuple[RolloutOutput, RolloutOutput]:
        """:meth:`_finish` for a paired rollout: the joint output cut into its two halves, each as its
        own rollout would have returned it."""
        joint = self._finish(run, env)
        k, n = run.split, len(run.eps)
        outs = []
        for h, rows in enumerate((slice(0, k), slice(k, n))):
            size = rows.stop - rows.start
            # a half's steps end with the last step at which one of its samples still navigated
            n_steps = 1 + max((r.t for r in run.steps if any(r.active[rows])), default=0)
            metrics: dict[str, float] = {"steps": float(n_steps),
                                         "acc": int(run.n_correct[h]) / max(1, run.n_labels[h])}  # type: ignore[index]
            loss, og_out = run.loss[h] / size, None
            if run.use_objects:
                og_out = run.og_loss[h] / size
                loss = loss + self.og_weight * og_out
                metrics.update({"og_loss": float(og_out.detach()),
                                "og_acc": int(run.n_og_correct[h]) / max(1, run.n_og[h]),  # type: ignore[index]
                                "og_labels": float(run.n_og[h])})  # type: ignore[index]
            out = RolloutOutput(loss=loss, steps=[_slice_step(r, rows) for r in run.steps[:n_steps]],
                                results=joint.results[rows], metrics=metrics, og_loss=og_out)
            if run.shadow is not None:
                out.txt_embeds, out.txt_masks = run.txt_embeds[rows], run.txt_masks[rows]
                out.teacher_txt_embeds = run.shadow.txt_embeds[rows]
            outs.append(out)
        return outs[0], outs[1]

    def _check_teacher(self, teacher: nn.Module, use_objects: bool) -> DUET:
        """The teacher must be a DUET that accepts the student's inputs."""
        if not isinstance(teacher, DUET):
            raise TypeError(f"the teacher must be a DUET, got {type(teacher).__name__} "
                            "(for a DUETPretrainer pass its .duet)")
        s_cfg, t_cfg = self.model.config, teacher.config
        if t_cfg.image_feat_size != s_cfg.image_feat_size:
            raise ValueError(f"the teacher takes {t_cfg.image_feat_size}-d view features, the student "
                             f"{s_cfg.image_feat_size}-d: both must see the same panoramas")
        if use_objects and (not t_cfg.use_objects or t_cfg.obj_feat_size != s_cfg.obj_feat_size):
            raise ValueError(f"the student sees {s_cfg.obj_feat_size}-d object tokens, the teacher takes "
                             f"{t_cfg.obj_feat_size if t_cfg.use_objects else 'no'} objects")
        return teacher

    @staticmethod
    def _move_env(env: E.NavBatchEnv, nav: MapNavigator, synced: list[int]) -> list[E.Observation]:
        """Make the environment walk every node the navigator appended to its paths since the last
        call, and stop (mark done) the samples the navigator has ended."""
        actions: list[Any] = []
        for i, agent in enumerate(env.agents):
            new = nav.paths[i][synced[i]:]
            synced[i] = len(nav.paths[i])
            if agent.done:
                actions.append(None)
            elif new:
                actions.append(list(new))
            elif nav.ended[i]:
                actions.append(None)  # STOP where it stands
            else:  # pragma: no cover - an active sample always moves
                actions.append([agent.viewpoint])
        obs = env.step(actions)
        for i, agent in enumerate(env.agents):
            if nav.ended[i]:
                agent.done = True  # a final walk back was the last move
        return obs


class _TeacherShadow:
    """The stage-2 teacher's side of a rollout: its text, and a shadow :class:`MapNavigator` that
    holds the teacher's node features and is stepped with the student's observations and actions."""

    def __init__(self, teacher: DUET, nav: MapNavigator, txt_ids: torch.Tensor, txt_masks: torch.Tensor,
                 texts: Sequence[str]) -> None:
        self.teacher = teacher
        self.nav = MapNavigator(
            nav.obs, max_action_len=nav.max_action_len, angle_feat_size=teacher.config.angle_feat_size,
            enc_full_graph=nav.enc_full_graph, act_visited_nodes=nav.act_visited_nodes,
        )
        self.same_pano = teacher.config.angle_feat_size == nav.angle_feat_size
        self.txt_masks = txt_masks
        with torch.no_grad():
            self.txt_embeds = teacher("language", {"txt_ids": txt_ids, "txt_masks": txt_masks})
            self.instr_embeds = instruction_embeddings(teacher, texts, txt_masks.device)
            self.txt_kv = text_cache(teacher, self.txt_embeds, txt_masks, self.instr_embeds)
        self.text_rows: dict = {}
        self.batch: NavigationBatch | None = None  # the teacher's navigation inputs of this step

    def step(self, t: int, pano: PanoramaBatch, pano_in: dict[str, Any], rows: list[int] | None,
             student_batch: NavigationBatch, student_active: list[bool], use_objects: bool) -> TeacherStep:
        """The teacher's 'panorama' and 'navigation' at step ``t`` on the student's state (on the
        student's ``rows`` when the student ran compacted; the outputs then cover the whole batch)."""
        nav = self.nav
        nav.begin_step(t)
        kw = {} if rows is None else {"rows": rows}
        if not self.same_pano:  # another angle-feature size: same tokens, the teacher's encoding
            pano = nav.panorama_inputs(use_objects=True if use_objects else None, **kw)
            pano_in = move_inputs(pano.model_inputs(), self.txt_masks.device)
        with torch.no_grad():
            batch, outs, pano_embeds, pano_masks = network_step(
                self.teacher, nav, pano, pano_in, rows, self.text_rows,
                (self.txt_embeds, self.txt_masks, self.txt_kv, self.instr_embeds),
                use_objects, full_pano=True)
        active = [not bool(e) for e in nav.ended]
        if (batch.gmap_vpids != student_batch.gmap_vpids or batch.no_vp_left != student_batch.no_vp_left
                or active != student_active):
            raise RuntimeError(f"step {t}: the teacher's map differs from the student's (lock-step broken)")
        self.batch = batch
        return TeacherStep(fused_logits=outs["fused_logits"], pano_embeds=pano_embeds, pano_masks=pano_masks,
                           gmap_vpids=batch.gmap_vpids, viewpoints=[ob.viewpoint for ob in nav.obs],
                           active=active, obj_logits=outs.get("obj_logits") if use_objects else None)


def network_step(model: nn.Module, nav: MapNavigator, pano: PanoramaBatch, pano_in: dict[str, Any],
                 rows: list[int] | None, text_cache: dict, text: tuple[torch.Tensor, torch.Tensor, Any],
                 use_objects: bool, *, full_pano: bool
                 ) -> tuple[NavigationBatch, dict[str, Any], torch.Tensor, torch.Tensor]:
    """One step of a network (the student's or the stage-2 teacher's) on its navigator: 'panorama' on
    ``pano_in``, the map updated, 'navigation' on it, the scores recorded.  With ``rows`` (compaction:
    ``pano`` holds those samples) the outputs are put back over the whole batch (:func:`expand_rows`;
    the panorama output too when ``full_pano``).  Returns ``(batch, outs, pano_embeds, pano_masks)``."""
    kw = {} if rows is None else {"rows": rows}
    pano_embeds, pano_masks = model("panorama", pano_in)
    nav.absorb_panorama(pano, pano_embeds, pano_masks, **kw)
    txt_embeds, txt_masks, txt_kv = text_of_rows(model, text_cache, rows, *text)
    batch = nav.navigation_inputs(pano, pano_embeds, pano_masks, txt_embeds, txt_masks, **kw)
    batch.inputs["txt_kv"] = txt_kv
    outs = model("navigation", batch.inputs)
    obj_logits = outs.get("obj_logits") if use_objects else None
    nav.record_scores(outs["fused_logits"], obj_logits, pano if use_objects else None, **kw)
    if rows is None:
        return batch, outs, pano_embeds, pano_masks
    return expand_rows(nav, rows, outs, obj_logits, pano_embeds, pano_masks, with_pano=full_pano)


def text_of_rows(model: nn.Module, cache: dict, rows: list[int] | None, txt_embeds: torch.Tensor,
                 txt_masks: torch.Tensor, txt_kv: Any, instr_embeds: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """The text outputs, masks and cross-attention keys/values of samples ``rows`` (all: None),
    computed once per set of rows (the set only shrinks as samples end)."""
    if rows is None:
        return txt_embeds, txt_masks, txt_kv
    key = tuple(rows)
    if key not in cache:
        cache.clear()  # the previous set is never used again
        index = torch.tensor(rows, dtype=torch.long, device=txt_masks.device)
        emb, masks = txt_embeds.index_select(0, index), txt_masks.index_select(0, index)
        instr = instr_embeds.index_select(0, index) if instr_embeds is not None else None
        cache[key] = (emb, masks, text_cache(model, emb, masks, instr))
    return cache[key]


def text_cache(model: nn.Module, txt_embeds: torch.Tensor, txt_masks: torch.Tensor,
               instr_embeds: torch.Tensor | None) -> Any:
    """``model.precompute_text_kv``, given the instruction embeddings only where the model takes them
    (a runtime or wrapper of a model without ``og_text_encoder`` may not accept the argument)."""
    if instr_embeds is None:
        return model.precompute_text_kv(txt_embeds, txt_masks)
    return model.precompute_text_kv(txt_embeds, txt_masks, instr_embeds)


def instruction_embeddings(model: nn.Module, texts: Sequence[str], device: torch.device) -> torch.Tensor | None:
    """The instructions' sentence embeddings (B, D) on ``device`` when the model grounds objects with
    them (``config.og_text_encoder``, see :meth:`~minivln.model.duet.DUET.grounding_text`), else None."""
    name = getattr(getattr(model, "config", None), "og_text_encoder", "")
    return embed_instructions(name, list(texts)).to(device) if name else None


def expand_rows(nav: MapNavigator, rows: list[int], outs: dict[str, Any], obj_logits: torch.Tensor | None,
                pano_embeds: torch.Tensor, pano_masks: torch.Tensor, *, with_pano: bool
                ) -> tuple[NavigationBatch, dict[str, Any], torch.Tensor, torch.Tensor]:
    """A compacted step's outputs over the whole batch again: the navigation batch's host side from
    the navigator (:meth:`MapNavigator.full_batch`), ``fused_logits`` (B, slots) and ``obj_logits``
    with the computed rows in place and STOP alone allowed elsewhere (finite, so no NaN reaches a
    softmax or a gradient; an ended sample's row is never used), and, ``with_pano``, the panorama
    output (B, N, H) zero and masked out where not computed (else the computed rows as they are)."""
    batch = nav.full_batch()
    size = len(nav.obs)
    index = torch.tensor(rows, dtype=torch.long, device=pano_embeds.device)
    width = max(len(v) for v in batch.gmap_vpids)
    full = {"fused_logits": _scatter_rows(outs["fused_logits"], index, size, width)}
    if obj_logits is not None:
        full["obj_logits"] = _scatter_rows(obj_logits, index, size, obj_logits.size(1))
    if not with_pano:
        return batch, full, pano_embeds, pano_masks
    embeds = pano_embeds.new_zeros((size, *pano_embeds.shape[1:])).index_copy(0, index, pano_embeds)
    masks = pano_masks.new_zeros((size, *pano_masks.shape[1:])).index_copy(0, index, pano_masks)
    return batch, full, embeds, masks


def _scatter_rows(x: torch.Tensor, index: torch.Tensor, size: int, width: int) -> torch.Tensor:
    if x.size(1) < width:
        x = F.pad(x, (0, width - x.size(1)), value=float("-inf"))
    filler = torch.full((size, width), float("-inf"), dtype=x.dtype, device=x.device)
    filler[:, 0] = 0.0
    return filler.index_copy(0, index, x)


def _rows(x: Any, rows: slice) -> Any:
    return None if x is None else x[rows]


def _slice_step(rec: StepRecord, rows: slice) -> StepRecord:
    """The records of samples ``rows`` of one step (a half of a paired rollout; inputs not kept)."""
    t = rec.teacher
    return StepRecord(
        t=rec.t, fused_logits=rec.fused_logits[rows], labels=rec.labels[rows], gmap_vpids=rec.gmap_vpids[rows],
        active=rec.active[rows], actions=rec.actions[rows], obj_logits=_rows(rec.obj_logits, rows),
        obj_labels=_rows(rec.obj_labels, rows), pano_embeds=_rows(rec.pano_embeds, rows),
        pano_masks=_rows(rec.pano_masks, rows), viewpoints=_rows(rec.viewpoints, rows),
        teacher=None if t is None else TeacherStep(
            fused_logits=t.fused_logits[rows], pano_embeds=t.pano_embeds[rows], pano_masks=t.pano_masks[rows],
            gmap_vpids=t.gmap_vpids[rows], viewpoints=t.viewpoints[rows], active=t.active[rows],
            obj_logits=_rows(t.obj_logits, rows)),
    )


def move_inputs(inputs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def run_agent(agent, env, progress: bool = False) -> list[dict]:
    """Arg-max rollouts over every episode of ``env`` once; leaderboard entries in episode order."""

    results: list[dict] = []
    batches = list(env.iter_batches())
    with torch.no_grad():
        for episodes in tqdm(batches, disable=not progress, desc="episodes", unit="batch"):
            results.extend(agent.rollout(env, episodes, "argmax").results)
    return results
