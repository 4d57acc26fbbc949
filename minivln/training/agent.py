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
    GT node (0 = STOP at the goal).  The episode ends when the agent reaches the goal.
``'sample'``
    the action is sampled from ``softmax(fused_logits)``; the label at every visited state comes from
    the expert: STOP at the goal, else the unvisited slot ``n`` minimising ``d(cur, n) + d(n, goal)``
    with true shortest distances (``expert='spl'``).  The episode ends when the agent reaches the goal
    (or samples STOP, or runs out of ghosts / steps).
``'argmax'``
    evaluation: arg-max actions, the episode ends when slot 0 (STOP) is chosen, no ghost is left or at
    the last step; the final location is the visited node with the highest recorded STOP probability.

The loss of a rollout is ``sum over steps of CE_sum(fused_logits, labels) / batch_size`` (labels
``-100`` for samples that have ended); the caller applies the rollout weight (``ml_weight`` for the
teacher-forced one).  Every move goes through ``env.step`` with the walk planned on the agent's map,
so the environment's trajectory is the leaderboard trajectory.

For distillation every rollout keeps its per-step outputs (:attr:`RolloutOutput.steps`: fused logits,
labels, slot ids, and the navigation inputs when ``keep_inputs=True``), and ``step_hook`` is called
after every navigation forward pass with ``(t, outputs, navigation batch, labels)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from minivln.data.datasets import Episode
from minivln.data.tokenizer import PAD_ID, get_tokenizer
from minivln.env import env as E
from minivln.model import graph_map as G
from minivln.model.agent_inputs import MapNavigator, NavigationBatch

Feedback = Literal["teacher", "sample", "argmax"]
FEEDBACKS = ("teacher", "sample", "argmax")
IGNORE = -100

StepHook = Callable[[int, dict, NavigationBatch, torch.Tensor], None]


def to_nav_observation(ob: E.Observation, features: Any | None = None) -> G.Observation:
    """An environment observation as the navigator's :class:`~minivln.model.graph_map.Observation`.

    View features come from ``ob.features`` (the environment's feature store) or, if it has none,
    from ``features.get(scan, viewpoint)``.  Candidates keep the environment's view index and its
    angles relative to the agent's discretised view (DUET's candidate angle feature).
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
    return G.Observation(
        viewpoint=ob.viewpoint,
        view_index=int(ob.view_index),
        heading=float(ob.heading),
        elevation=float(ob.elevation),
        position=np.asarray(ob.position, dtype=np.float64),
        view_features=np.asarray(feats, dtype=np.float32),
        candidates=cands,
    )


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


@dataclass
class RolloutOutput:
    """A rollout's unweighted loss, logged scalars, per-step records and leaderboard entries."""

    loss: torch.Tensor  # sum over steps of CE_sum / batch size (0 in 'argmax')
    steps: list[StepRecord] = field(default_factory=list)
    results: list[dict] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


class DUETAgent:
    """Runs batches of episodes with a DUET network (see the module docstring).

    Args:
        model: a :class:`~minivln.model.duet.DUET` (its train/eval mode is the caller's business).
        max_action_len: navigation steps per episode (DUET: 15).
        max_instr_len: instruction tokens kept, [CLS]/[SEP] included (DUET: 200).
        expert: 'spl' (the only expert implemented).
        features: a feature store used when the environment's observations carry no features.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        max_action_len: int = 15,
        max_instr_len: int = 200,
        expert: str = "spl",
        features: Any | None = None,
    ) -> None:
        if expert != "spl":
            raise ValueError(f"expert {expert!r} is not implemented (only 'spl')")
        self.model = model
        self.max_action_len = max_action_len
        self.max_instr_len = max_instr_len
        self.expert = expert
        self.features = features
        self.tokenizer = get_tokenizer(max_instr_len)

    # ---------------------------------------------------------------------------------- inputs

    def encode_instructions(self, texts: Sequence[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(txt_ids (B, L) int64, txt_masks (B, L) bool), zero-padded."""
        ids = self.tokenizer.encode_batch(list(texts))
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
    ) -> RolloutOutput:
        """Run one batch (``episodes``, or the environment's next batch) to the end."""
        if feedback not in FEEDBACKS:
            raise ValueError(f"feedback must be one of {FEEDBACKS}, got {feedback!r}")
        training = feedback != "argmax"
        if env.max_steps < self.max_action_len:
            raise ValueError(f"the environment's max_steps ({env.max_steps}) must be at least max_action_len "
                             f"({self.max_action_len}): the agent's final walk back counts as a step")
        device = self._device()
        env_obs = env.reset(episodes)
        eps = [a.episode for a in env.agents]
        houses = [env.house(ep.scan) for ep in eps]
        batch_size = len(eps)
        nav = MapNavigator(
            [to_nav_observation(o, self.features) for o in env_obs], max_action_len=self.max_action_len,
            angle_feat_size=getattr(getattr(self.model, "config", None), "angle_feat_size", 4),
        )
        synced = [1] * batch_size  # nodes of nav.paths[i] the environment has walked

        txt_ids, txt_masks = self.encode_instructions([ep.instruction for ep in eps], device)
        txt_embeds = self.model("language", {"txt_ids": txt_ids, "txt_masks": txt_masks})
        txt_kv = self.model.precompute_text_kv(txt_embeds, txt_masks)

        loss = torch.zeros((), device=device)
        steps: list[StepRecord] = []
        n_labels = n_correct = 0
        for t in range(self.max_action_len):
            nav.begin_step(t)
            pano = nav.panorama_inputs()
            pano_embeds, pano_masks = self.model("panorama", move_inputs(pano.model_inputs(), device))
            nav.absorb_panorama(pano, pano_embeds, pano_masks)
            batch = nav.navigation_inputs(pano, pano_embeds, pano_masks, txt_embeds, txt_masks)
            batch.inputs["txt_kv"] = txt_kv
            outs = self.model("navigation", batch.inputs)
            logits = outs["fused_logits"]
            nav.record_scores(logits)

            active = [not bool(e) for e in nav.ended]
            labels = torch.full((batch_size,), IGNORE, dtype=torch.long)
            if training:
                visited = batch.inputs["gmap_visited_masks"].tolist()
                for i in range(batch_size):
                    if not active[i]:
                        continue
                    cur, vpids = nav.obs[i].viewpoint, batch.gmap_vpids[i]
                    label = teacher_slot(vpids, cur, eps[i].path) if feedback == "teacher" else None
                    if label is None:
                        label = spl_expert_slot(vpids, visited[i], cur, eps[i].goal, houses[i].distance)
                    labels[i] = label
                labels = labels.to(device)
                ce = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="sum")
                if bool((labels != IGNORE).any()):
                    loss = loss + ce

            if feedback == "teacher":
                actions = [int(x) if x != IGNORE else 0 for x in labels.tolist()]
            elif feedback == "sample":
                probs = torch.softmax(logits.detach().float(), 1)
                actions = torch.multinomial(probs, 1, generator=generator).squeeze(1).tolist()
            else:
                actions = logits.detach().argmax(1).tolist()
            if training:
                valid = labels != IGNORE
                n_labels += int(valid.sum())
                pred = logits.detach().argmax(1)
                n_correct += int(((pred == labels) & valid).sum())

            if step_hook is not None:
                step_hook(t, outs, batch, labels)
            steps.append(StepRecord(
                t=t, fused_logits=logits, labels=labels, gmap_vpids=batch.gmap_vpids, active=active,
                actions=[int(a) for a in actions],
                inputs=batch.inputs if keep_inputs else None, outputs=outs if keep_inputs else None,
            ))

            stop = [nav.obs[i].viewpoint == eps[i].goal for i in range(batch_size)] if training else None
            nav.act(t, actions, batch, stop=stop)
            env_obs = self._move_env(env, nav, synced)
            nav.observe([nav.obs[i] if nav.ended[i] else to_nav_observation(env_obs[i], self.features)
                         for i in range(batch_size)])
            if nav.all_ended:
                break

        # samples still going after the last step were ended by the navigator (walk back included)
        self._move_env(env, nav, synced)
        metrics: dict[str, float] = {"steps": float(len(steps))}
        if training:
            loss = loss / batch_size
            metrics["acc"] = n_correct / max(1, n_labels)
        return RolloutOutput(loss=loss, steps=steps, results=env.results(), metrics=metrics)

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


def move_inputs(inputs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
