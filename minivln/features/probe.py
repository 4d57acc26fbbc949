"""How much navigation signal do view features carry?  A training-free next-step probe.

For every step of every instruction along its annotated path (current node ``path[i]``,
``i < len(path) - 1``) with at least two navigable neighbours (``House.neighbors``), each candidate
is scored by the cosine between the instruction's all-MiniLM-L6-v2 embedding (mapped into the
feature layout with ``standin.text_query``) and the feature of the view the candidate falls in
(``geometry.nearest_view`` of its direction from the current node).  The best-scoring candidate is
the pick; ties count fractionally (a tie of k candidates including the right one scores 1/k).
Random choice scores the mean of 1/#candidates.  Nothing is fitted.

Two word-overlap baselines use the BBox annotations directly: a candidate scores the number of
instruction words found in the names of (1) the objects within 3 m of the candidate, (2) those plus
the objects around the viewpoints visible from the current node in the candidate's view.

The probe only means something for features that live in the MiniLM space, i.e. MiniVLN stand-ins.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from minivln.data.datasets import Episode, load_episodes
from minivln.data.graph import House, load_house
from minivln.data.words import content_words as words
from minivln.features.embed import MODEL_NAME, TextEmbedder, default_embedder
from minivln.features.hdf5 import FeatureStore
from minivln.features.standin import text_query
from minivln.geometry import direction, nearest_view
from minivln.paths import DataError, resolve_data_dir

@dataclass(frozen=True)
class ProbeStep:
    """One decision: at ``current`` (on the annotated path of instruction ``instr``), pick ``target``."""

    instr: int  # index into the episode list
    scan: str
    current: str
    candidates: tuple[str, ...]
    target: int  # index into candidates
    views: tuple[int, ...]  # view of each candidate at ``current``


@dataclass
class ProbeReport:
    split: str
    task: str
    features: str | None
    standin: bool | None
    instructions: int
    steps: int
    skipped_single_choice: int
    skipped_off_graph: int
    random: float
    accuracy: float | None = None
    baselines: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        tag = "STAND-IN features" if self.standin else "features"
        out = [
            f"next-step probe, {self.task} {self.split}: {self.instructions} instructions, "
            f"{self.steps} steps with >= 2 choices (skipped {self.skipped_single_choice} single-choice, "
            f"{self.skipped_off_graph} off-graph)",
            f"  {'random pick':46s} {100 * self.random:5.1f}%",
        ]
        names = {"overlap_near": "word overlap, objects near the candidate",
                 "overlap_near_far": "word overlap, + objects in its view direction"}
        for k, v in self.baselines.items():
            out.append(f"  {names.get(k, k):46s} {100 * v:5.1f}%")
        if self.accuracy is not None:
            label = f"MiniLM cosine with {tag}"
            out.append(f"  {label:46s} {100 * self.accuracy:5.1f}%  ({self.features})")
        out.append(f"  ({self.seconds:.1f} s)")
        return out

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def candidate_view(house: House, current: str, cand: str) -> int:
    heading, elevation, _ = direction(house.position(current), house.position(cand))
    return nearest_view(heading, elevation)


def probe_steps(episodes: list[Episode], data_dir: str | os.PathLike | None = None) -> tuple[list[ProbeStep], int, int]:
    """All decisions with >= 2 candidates; also the counts of skipped single-choice / off-graph steps."""
    root = resolve_data_dir(data_dir)
    steps: list[ProbeStep] = []
    single = off = 0
    houses: dict[str, House] = {}
    for n, ep in enumerate(episodes):
        house = houses.get(ep.scan) or houses.setdefault(ep.scan, load_house(ep.scan, root))
        for cur, nxt in zip(ep.path[:-1], ep.path[1:]):
            cands = house.neighbors(cur)
            if nxt not in cands:
                off += 1
                continue
            if len(cands) < 2:
                single += 1
                continue
            views = tuple(candidate_view(house, cur, c) for c in cands)
            steps.append(ProbeStep(n, ep.scan, cur, tuple(cands), cands.index(nxt), views))
    return steps, single, off


def tie_aware_hit(scores: np.ndarray, target: int, tol: float = 1e-6) -> float:
    """1/k if the target is among the k best (within ``tol``), else 0."""
    best = scores.max()
    top = np.flatnonzero(scores >= best - tol)
    return 1.0 / len(top) if target in top else 0.0


def random_accuracy(steps: list[ProbeStep]) -> float:
    return float(np.mean([1.0 / len(s.candidates) for s in steps])) if steps else float("nan")


def probe_features(steps: list[ProbeStep], instr_emb: np.ndarray,
                   view_features: Callable[[str, str], np.ndarray],
                   query: Callable[[np.ndarray], np.ndarray]) -> float:
    """Tie-aware accuracy of picking the candidate whose view feature is most like the instruction."""
    if not steps:
        return float("nan")
    hits = 0.0
    q_all = query(instr_emb)
    for s in steps:
        f = view_features(s.scan, s.current)[list(s.views)]  # (C, D)
        f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-8)
        q = q_all[s.instr]
        q = q / max(float(np.linalg.norm(q)), 1e-8)
        hits += tie_aware_hit(f @ q, s.target)
    return hits / len(steps)


# -- word-overlap baselines -----------------------------------------------------------------------


def word_overlap_baselines(steps: list[ProbeStep], episodes: list[Episode],
                           data_dir: str | os.PathLike | None = None) -> dict[str, float]:
    """Accuracies of the two word-overlap pickers (see the module docstring)."""
    root = resolve_data_dir(data_dir)
    vp_words: dict[tuple[str, str], set[str]] = {}

    def around(scan: str, vp: str) -> set[str]:
        key = (scan, vp)
        if key not in vp_words:
            path = root / "REVERIE" / "BBox" / f"{scan}_{vp}.json"
            ws: set[str] = set()
            if path.is_file():
                for o in json.loads(path.read_text()).get(vp, {}).values():
                    if o.get("visible_pos"):
                        ws |= words(str(o["name"]))
            vp_words[key] = ws
        return vp_words[key]

    instr_words = [words(ep.instruction) for ep in episodes]
    houses: dict[str, House] = {}
    near_hits = far_hits = 0.0
    for s in steps:
        house = houses.get(s.scan) or houses.setdefault(s.scan, load_house(s.scan, root))
        iw = instr_words[s.instr]
        near = np.array([len(iw & around(s.scan, c)) for c in s.candidates], dtype=float)
        near_hits += tie_aware_hit(near, s.target)
        # Viewpoints visible from the current node, by the view they fall in.
        cur = house.idx(s.current)
        by_view: dict[int, set[str]] = {}
        for j in np.flatnonzero(house.visible[cur]):
            v = candidate_view(house, s.current, house.vp_ids[j])
            by_view.setdefault(v, set()).update(around(s.scan, house.vp_ids[j]))
        far = np.array([len(iw & (around(s.scan, c) | by_view.get(v, set())))
                        for c, v in zip(s.candidates, s.views)], dtype=float)
        far_hits += tie_aware_hit(far, s.target)
    n = max(len(steps), 1)
    return {"overlap_near": near_hits / n, "overlap_near_far": far_hits / n}


# -- driver ---------------------------------------------------------------------------------------
def embed_instructions(episodes: list[Episode], embedder: TextEmbedder | None = None,
                       progress: bool = False) -> np.ndarray:
    emb = embedder or default_embedder()
    return emb.embed([ep.instruction for ep in episodes], progress=progress)


def run_probe(data_dir: str | os.PathLike | None, features: str | os.PathLike | None, *,
              split: str = "val_unseen", task: str = "r2r", baselines: bool = True,
              limit: int | None = None, every: int = 1, progress: bool = False) -> ProbeReport:
    """The probe on one split; ``features=None`` gives only the random and word-overlap figures.
    ``every``: only every N-th instruction (``episodes[::every]``, before ``limit``)."""
    t0 = time.perf_counter()
    root = resolve_data_dir(data_dir)
    episodes = load_episodes(task, split, root)
    if every < 1:
        raise ValueError(f"every must be at least 1, got {every}")
    episodes = episodes[::every]
    if limit is not None:
        episodes = episodes[:limit]
    steps, single, off = probe_steps(episodes, root)
    report = ProbeReport(split, task, str(features) if features else None, None, len(episodes),
                         len(steps), single, off, random_accuracy(steps))
    if baselines:
        report.baselines = word_overlap_baselines(steps, episodes, root)
    if features is not None:
        store = FeatureStore(features, cache_size=8192)
        attrs = store.attrs
        if attrs.get("embedding_space") != MODEL_NAME:
            raise DataError(
                f"{features} is not in the {MODEL_NAME} embedding space (no embedding_space attribute): "
                "the probe compares instruction embeddings with MiniVLN stand-in features only"
            )
        report.standin = store.is_standin
        dim = store.dim
        instr_emb = embed_instructions(episodes, progress=progress)
        report.accuracy = probe_features(steps, instr_emb, store.get, lambda e: text_query(e, dim))
        store.close()
    report.seconds = time.perf_counter() - t0
    return report
