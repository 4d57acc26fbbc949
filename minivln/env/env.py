"""A batched navigation environment over the connectivity graphs: no simulator build, pure Python.

It stands in for the Matterport3D simulator in its discretised mode, as VLN agents use it:

* The agent stands at a viewpoint with a heading and an elevation; its ``view_index`` is the
  discretised view it looks at (``geometry.discretised_view``).
* It observes the navigable neighbours (``Candidate``): for each, the absolute and relative
  direction, the Euclidean distance, and the view it falls in (the nearest view direction).
* It moves to any neighbour (or, for agents that keep a map, along a path of neighbours); after a
  move it looks at the view in which the target was seen from the previous viewpoint, as DUET's
  agent does.  ``None`` is STOP.
* The expert gives the next viewpoint on a shortest path to the goal from wherever the agent is
  (what DAgger needs off the reference path).  By default the goal is the annotated one
  (``episode.goal``); with ``goals`` (e.g. :meth:`minivln.data.reverie.ReverieGoals.episode_goals`:
  every viewpoint from which a REVERIE target is visible) an episode has a *set* of goal
  viewpoints, the expert heads for the nearest one and stops at any of them.
* Trajectories are kept in leaderboard format: ``[viewpoint, heading, elevation]`` per step.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass, field
from typing import Callable, Collection, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from minivln import geometry as geo
from minivln.data.datasets import Episode
from minivln.data.graph import Graphs, House
from minivln.data.reverie import ReverieGoals, nearest_goal
from minivln.paths import atomic_write_text


@dataclass(frozen=True)
class Candidate:
    """A navigable neighbour as seen from the agent's viewpoint."""

    viewpoint: str
    view_index: int  # the panorama view it falls in (simulator ``pointId``)
    heading: float  # absolute direction of the line to it (radians)
    elevation: float
    rel_heading: float  # relative to the agent's discretised view (DUET's convention)
    rel_elevation: float
    distance: float  # straight-line distance (metres)
    position: tuple[float, float, float]


@dataclass
class Observation:
    """What one agent sees at one step."""

    instr_id: str
    scan: str
    viewpoint: str
    view_index: int
    heading: float
    elevation: float
    position: tuple[float, float, float]
    candidates: list[Candidate]
    instruction: str
    step: int
    done: bool
    features: np.ndarray | None = None  # (36, D) view features of this viewpoint, if a store is set
    distance_to_goal: float | None = None  # graph distance to the (nearest) goal; None without a goal


@dataclass
class AgentState:
    episode: Episode
    viewpoint: str
    heading: float
    elevation: float
    trajectory: list[list] = field(default_factory=list)
    done: bool = False
    steps: int = 0  # number of moves taken

    def record(self) -> None:
        self.trajectory.append([self.viewpoint, float(self.heading), float(self.elevation)])


_NEIGHBOUR_CACHE: dict[tuple[int, str], list[tuple]] = {}


def _neighbour_geometry(house: House, viewpoint: str) -> list[tuple]:
    """(viewpoint, view, heading, elevation, distance, position) of each neighbour, cached."""
    key = (id(house), viewpoint)
    hit = _NEIGHBOUR_CACHE.get(key)
    if hit is None:
        src = house.position(viewpoint)
        hit = []
        for nb in house.neighbors(viewpoint):
            pos = house.position(nb)
            h, e, d = geo.direction(src, pos)
            hit.append((nb, geo.nearest_view(h, e), h, e, d, tuple(float(x) for x in pos)))
        _NEIGHBOUR_CACHE[key] = hit
    return hit


def candidates_at(house: House, viewpoint: str, heading: float, elevation: float) -> list[Candidate]:
    """The navigable neighbours of ``viewpoint`` for an agent looking at (heading, elevation)."""
    view = geo.discretised_view(heading, elevation)
    base_h, base_e = geo.view_heading(view), geo.view_elevation(view)
    return [
        Candidate(
            viewpoint=nb,
            view_index=v,
            heading=h,
            elevation=e,
            rel_heading=float(geo.wrap_angle(h - base_h)),
            rel_elevation=e - base_e,
            distance=d,
            position=pos,
        )
        for nb, v, h, e, d, pos in _neighbour_geometry(house, viewpoint)
    ]


class FeatureLookup:
    """Anything with ``get(scan, viewpoint) -> (36, D) array`` (see ``minivln.features``)."""

    def get(self, scan: str, viewpoint: str) -> np.ndarray:  # pragma: no cover - protocol
        raise NotImplementedError


class NavBatchEnv:
    """Batches of episodes over one data directory's graphs.

    ``reset()`` starts the next batch (or the given episodes) and returns their observations;
    ``step(actions)`` takes one action per agent: a neighbouring viewpoint id, a list of
    viewpoints forming a walk of neighbours (an agent that keeps a map jumps to a remote node that
    way), or ``None`` for STOP.  Agents that are done ignore their action.

    ``goals(episode)`` (optional) gives an episode's set of goal viewpoints (see the module
    docstring); without it the goal is ``episode.goal``.
    """

    def __init__(
        self,
        episodes: Sequence[Episode],
        graphs: Graphs,
        batch_size: int = 8,
        features: FeatureLookup | None = None,
        max_steps: int = 15,
        shuffle: bool = False,
        seed: int = 0,
        goals: Callable[[Episode], Collection[str]] | None = None,
    ):
        if not episodes:
            raise ValueError("NavBatchEnv needs at least one episode")
        self.episodes = list(episodes)
        self.graphs = graphs
        self.batch_size = batch_size
        self.features = features
        self.max_steps = max_steps
        self.shuffle = shuffle
        self.goals = goals
        self.rng = random.Random(seed)
        self._order = list(range(len(self.episodes)))
        self._cursor = 0
        self.epoch = 0
        if shuffle:
            self.rng.shuffle(self._order)
        self.agents: list[AgentState] = []

    # -- batching ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.episodes)

    def next_batch(self) -> list[Episode]:
        """The next ``batch_size`` episodes, wrapping around (and reshuffling) at the end."""
        batch = []
        while len(batch) < self.batch_size:
            if self._cursor >= len(self._order):
                self._cursor = 0
                self.epoch += 1
                if self.shuffle:
                    self.rng.shuffle(self._order)
            batch.append(self.episodes[self._order[self._cursor]])
            self._cursor += 1
        return batch

    def iter_batches(self) -> Iterator[list[Episode]]:
        """Every episode exactly once, in order (for evaluation); the last batch may be short."""
        for i in range(0, len(self.episodes), self.batch_size):
            yield self.episodes[i : i + self.batch_size]

    def state_dict(self) -> dict:
        return {"order": list(self._order), "cursor": self._cursor, "epoch": self.epoch,
                "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self._order = list(state["order"])
        self._cursor = int(state["cursor"])
        self.epoch = int(state["epoch"])
        rng = state["rng"]
        self.rng.setstate((rng[0], tuple(rng[1]), rng[2]))

    # -- episode dynamics ----------------------------------------------------------------------
    def house(self, scan: str) -> House:
        return self.graphs[scan]

    def reset(self, episodes: Sequence[Episode] | None = None) -> list[Observation]:
        episodes = list(episodes) if episodes is not None else self.next_batch()
        self.agents = []
        for ep in episodes:
            house = self.house(ep.scan)
            if ep.start not in house:
                raise ValueError(f"episode {ep.instr_id}: start {ep.start} is not in scan {ep.scan}")
            agent = AgentState(ep, ep.start, ep.heading % (2 * math.pi), 0.0)
            agent.record()
            self.agents.append(agent)
        return self.observe()

    def observe(self) -> list[Observation]:
        return [self._observe(a) for a in self.agents]

    def _observe(self, a: AgentState) -> Observation:
        house = self.house(a.episode.scan)
        ep = a.episode
        feats = self.features.get(ep.scan, a.viewpoint) if self.features is not None else None
        has_goal = len(ep.path) > 1 or ep.distance is not None
        return Observation(
            instr_id=ep.instr_id,
            scan=ep.scan,
            viewpoint=a.viewpoint,
            view_index=geo.discretised_view(a.heading, a.elevation),
            heading=a.heading,
            elevation=a.elevation,
            position=tuple(float(x) for x in house.position(a.viewpoint)),
            candidates=candidates_at(house, a.viewpoint, a.heading, a.elevation),
            instruction=ep.instruction,
            step=a.steps,
            done=a.done,
            features=feats,
            distance_to_goal=self._goal_distance(house, a.viewpoint, ep) if has_goal else None,
        )

    def _move(self, a: AgentState, target: str) -> None:
        house = self.house(a.episode.scan)
        if not house.is_neighbor(a.viewpoint, target):
            raise ValueError(
                f"episode {a.episode.instr_id}: {target} is not a neighbour of {a.viewpoint}"
            )
        h, e, _ = geo.direction(house.position(a.viewpoint), house.position(target))
        view = geo.nearest_view(h, e)
        a.viewpoint = target
        a.heading = geo.view_heading(view)
        a.elevation = geo.view_elevation(view)
        a.record()

    def step(self, actions: Sequence[str | Sequence[str] | None]) -> list[Observation]:
        if len(actions) != len(self.agents):
            raise ValueError(f"expected {len(self.agents)} actions, got {len(actions)}")
        for a, act in zip(self.agents, actions):
            if a.done:
                continue
            if act is None:
                a.done = True
                continue
            walk = [act] if isinstance(act, str) else list(act)
            for vp in walk:
                if vp != a.viewpoint:
                    self._move(a, vp)
            a.steps += 1
            if a.steps >= self.max_steps:
                a.done = True
        return self.observe()

    @property
    def all_done(self) -> bool:
        return all(a.done for a in self.agents)

    # -- expert --------------------------------------------------------------------------------
    def goal_viewpoints(self, i: int) -> frozenset[str]:
        """Agent ``i``'s goal viewpoints: ``goals(episode)``, or ``{episode.goal}`` without ``goals``."""
        ep = self.agents[i].episode
        return frozenset(self.goals(ep)) if self.goals is not None else frozenset({ep.goal})

    def _goal_distance(self, house: House, vp: str, ep: Episode) -> float:
        if self.goals is None:
            return house.distance(vp, ep.goal)
        return min(house.distance(vp, g) for g in self.goals(ep))

    def expert_action(self, i: int) -> str | None:
        """Next viewpoint on a shortest path from agent ``i``'s position to its goal (with ``goals``:
        to the nearest goal viewpoint, ties broken by the smallest id); None at a goal."""
        a = self.agents[i]
        goal = a.episode.goal
        if self.goals is not None:
            goal_set = self.goal_viewpoints(i)
            if a.viewpoint in goal_set:
                return None
            goal = nearest_goal(self.house(a.episode.scan), a.viewpoint, goal_set)
        if a.viewpoint == goal:
            return None
        return self.house(a.episode.scan).shortest_path(a.viewpoint, goal)[1]

    def expert_actions(self) -> list[str | None]:
        return [None if a.done else self.expert_action(i) for i, a in enumerate(self.agents)]

    # -- results -------------------------------------------------------------------------------
    def results(self) -> list[dict]:
        """Leaderboard entries for the current batch."""
        return [{"instr_id": a.episode.instr_id, "trajectory": [list(t) for t in a.trajectory]}
                for a in self.agents]


Policy = Callable[[NavBatchEnv, list[Observation]], list]


def rollout(env: NavBatchEnv, policy: Policy, episodes: Sequence[Episode] | None = None) -> list[dict]:
    """Run ``policy`` on one batch until every agent is done; return leaderboard entries."""
    obs = env.reset(episodes)
    while not env.all_done:
        obs = env.step(policy(env, obs))
    return env.results()


def evaluate_policy(env: NavBatchEnv, policy: Policy, progress: bool = False) -> list[dict]:
    """Run ``policy`` over every episode of ``env`` once; return all leaderboard entries."""
    batches = env.iter_batches()
    if progress:

        batches = tqdm(batches, total=math.ceil(len(env) / env.batch_size), desc="episodes", unit="batch")
    results: list[dict] = []
    for batch in batches:
        results.extend(rollout(env, policy, batch))
    return results


def expert_policy(env: NavBatchEnv, obs: list[Observation]) -> list:
    """Follow the shortest path to the goal, then STOP."""
    return env.expert_actions()


def make_random_policy(seed: int = 0, stop_prob: float | str | None = None) -> Policy:
    """A seeded random walker: a random neighbour each step, until the step limit.

    ``stop_prob``: None never stops early; a float stops with that probability at each step;
    ``"uniform"`` treats STOP as one more choice, so at a viewpoint with k neighbours it stops with
    probability 1/(k+1).
    """
    rng = random.Random(seed)
    if isinstance(stop_prob, str) and stop_prob != "uniform":
        raise ValueError(f"stop_prob must be a float, None or 'uniform', not {stop_prob!r}")

    def policy(env: NavBatchEnv, obs: list[Observation]) -> list:
        acts = []
        for o in obs:
            if o.done or not o.candidates:
                acts.append(None)
                continue
            if stop_prob == "uniform":
                choice = rng.randrange(len(o.candidates) + 1)
                acts.append(None if choice == len(o.candidates) else o.candidates[choice].viewpoint)
            elif stop_prob is not None and rng.random() < stop_prob:
                acts.append(None)
            else:
                acts.append(rng.choice(o.candidates).viewpoint)
        return acts

    return policy


def random_walker_submission(env: NavBatchEnv, seed: int = 0, stop_prob: float | str | None = None,
                             goals: ReverieGoals | None = None, progress: bool = False) -> list[dict]:
    """The leaderboard entries of a seeded random walker (:func:`make_random_policy`) over every episode
    of ``env``: the one random row of every table and of ``minivln finetune``'s summary.

    REVERIE (``goals`` given): ``predObjId`` is drawn uniformly among the objects visible from the final
    viewpoint (its BBox annotation, sorted ids; the candidates a grounding head picks among), with a
    generator seeded by ``seed`` and independent of the walk; -1 where none is visible.
    """
    subs = evaluate_policy(env, make_random_policy(seed, stop_prob), progress=progress)
    if goals is None:
        return subs
    rng = random.Random(f"objects-{seed}")
    scans = {ep.instr_id: ep.scan for ep in env.episodes}
    for item in subs:
        ids = sorted(int(x) for x in goals.visible_objects(scans[item["instr_id"]], item["trajectory"][-1][0]))
        item["predObjId"] = ids[rng.randrange(len(ids))] if ids else -1
    return subs


def check_split_features(features, episodes: Sequence[Episode], graphs: Graphs, what: str) -> None:
    """Fail before any work when ``features`` lacks a viewpoint that ``episodes`` may visit (every
    viewpoint of their houses): the count and the first few missing keys (a store without
    ``require``, e.g. synthetic features, is not checked)."""
    require = getattr(features, "require", None)
    if require is None:
        return
    scans = sorted({e.scan for e in episodes})
    keys = [f"{scan}_{vp}" for scan in scans for vp in graphs[scan].vp_ids]
    require(keys, f"{what} ({len(scans)} house{'s' if len(scans) != 1 else ''})")


def write_submission(path: str | os.PathLike, entries: list[dict]) -> None:
    """Write leaderboard entries as JSON, atomically."""
    atomic_write_text(path, json.dumps(entries))
