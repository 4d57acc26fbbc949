"""Per-episode navigation metrics as small pure functions (the spec is ``docs/metrics.md``).

Every function takes the predicted viewpoint sequence ``pred`` (exactly as submitted, repeats
included), the annotated reference path ``ref`` (start first, goal last) where relevant, and a
distance callable ``dist(a, b)`` returning the shortest-path distance in metres on the navigation
graph.  Nothing here knows about files or houses, so each metric can be checked by hand on a small
hand-built graph.

Conventions (the primary ones are the public release evaluators'):

* success is strict: an error of exactly ``d_th`` = 3.0 m fails;
* SPL's reference length is the shortest distance start -> goal (``spl_convention="release"``);
  ``"duet"`` uses the summed edge length of the annotated path and floors the denominator at 0.01;
* ``pred`` is scored as submitted; :func:`collapse_repeats` is offered for the alternative.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

Distance = Callable[[str, str], float]
"""``dist(a, b)``: shortest-path distance between two viewpoints, in metres."""

SUCCESS_DISTANCE = 3.0
"""d_th: the success radius and the nDTW/CLS scale, in metres."""

SPL_CONVENTIONS = ("release", "duet")
DUET_MIN_DENOMINATOR = 0.01

R2R_METRICS = (
    "sr",
    "spl",
    "nav_error",
    "oracle_nav_error",
    "oracle_sr",
    "trajectory_length",
    "ndtw",
    "sdtw",
    "cls",
)
"""Output names of the R2R metrics, in report order."""

REVERIE_METRICS = ("sr", "oracle_sr", "spl", "rgs", "rgspl", "grounded_share", "trajectory_length")
"""Output names of the REVERIE metrics, in report order."""

RATE_METRICS = frozenset({"sr", "oracle_sr", "spl", "ndtw", "sdtw", "cls", "rgs", "rgspl", "grounded_share"})
"""Metrics that are fractions in [0, 1] (the others are metres)."""

METRIC_LABELS: dict[str, tuple[str, str]] = {
    "sr": ("SR", "success rate"),
    "spl": ("SPL", "success weighted by path length"),
    "nav_error": ("NE", "navigation error"),
    "oracle_nav_error": ("ONE", "oracle navigation error"),
    "oracle_sr": ("OSR", "oracle success rate"),
    "trajectory_length": ("TL", "trajectory length"),
    "ndtw": ("nDTW", "normalized dynamic time warping"),
    "sdtw": ("SDTW", "success weighted by nDTW"),
    "cls": ("CLS", "coverage weighted by length score"),
    "rgs": ("RGS", "remote grounding success"),
    "rgspl": ("RGSPL", "RGS weighted by path length"),
    "grounded_share": ("RGS|SR", "share of the successes that also name the right object"),
}
"""Metric name -> (short label, what it is), for summaries printed to people."""


def format_metrics(summary: dict[str, float], names: Sequence[str] | None = None) -> str:
    """``"SR 0.400  SPL 0.307  NE 5.12 m"``: rates as fractions with 3 decimals, distances in metres."""
    out = []
    for name in names if names is not None else list(summary):
        if name not in summary or summary[name] is None:
            continue
        label = METRIC_LABELS.get(name, (name, ""))[0]
        value = float(summary[name])
        out.append(f"{label} {value:.3f}" if name in RATE_METRICS else f"{label} {value:.2f} m")
    return "  ".join(out)


def metrics_legend(names: Sequence[str]) -> str:
    """``"SR = success rate, SPL = success weighted by path length, ..."``: each label spelled out once."""
    return ", ".join(f"{METRIC_LABELS[n][0]} = {METRIC_LABELS[n][1]}" for n in names if n in METRIC_LABELS)


# -- path helpers ------------------------------------------------------------------------------
def collapse_repeats(path: Sequence[str]) -> list[str]:
    """``path`` with every run of consecutive identical viewpoints reduced to one entry."""
    out: list[str] = []
    for vp in path:
        if not out or out[-1] != vp:
            out.append(vp)
    return out


def path_length(path: Sequence[str], dist: Distance) -> float:
    """Sum of ``dist`` over consecutive entries; a repeated viewpoint adds 0."""
    return float(sum(dist(a, b) for a, b in zip(path[:-1], path[1:]) if a != b))


def trajectory_length(pred: Sequence[str], dist: Distance) -> float:
    """TL: the length T of the predicted trajectory (metres)."""
    return path_length(pred, dist)


def navigation_error(pred: Sequence[str], goal: str, dist: Distance) -> float:
    """NE = d(last predicted viewpoint, goal)."""
    return float(dist(pred[-1], goal))


def oracle_navigation_error(pred: Sequence[str], goal: str, dist: Distance) -> float:
    """Oracle NE = the smallest d(p, goal) over every predicted viewpoint p."""
    return float(min(dist(p, goal) for p in pred))


def is_success(error: float, d_th: float = SUCCESS_DISTANCE) -> bool:
    """Strict success test: ``error < d_th`` (an error of exactly ``d_th`` fails)."""
    return error < d_th


# -- SPL -----------------------------------------------------------------------------------------
def reference_length(ref: Sequence[str], dist: Distance, convention: str = "release") -> float:
    """SPL's reference length L for the annotated path ``ref``.

    ``"release"``: the shortest distance from ``ref[0]`` to ``ref[-1]`` (R2R/REVERIE release
    evaluators).  ``"duet"``: the summed length of the annotated path (VLN-DUET).
    """
    if convention == "release":
        return float(dist(ref[0], ref[-1]))
    if convention == "duet":
        return path_length(ref, dist)
    raise ValueError(f"unknown SPL convention {convention!r}; expected one of {SPL_CONVENTIONS}")


def spl(success: bool | float, ref_length: float, traj_length: float, min_denominator: float = 0.0) -> float:
    """Success weighted by path length: ``success * L / max(T, L, min_denominator)``.

    ``min_denominator`` is 0 in the release convention and 0.01 in DUET's.  If the denominator is 0
    (start == goal and the agent never moved), a success scores 1: it took the optimal, empty path.
    """
    if not success:
        return 0.0
    denom = max(traj_length, ref_length, min_denominator)
    if denom <= 0.0:
        return 1.0
    return float(ref_length / denom)


# -- DTW family ------------------------------------------------------------------------------------
def dtw(pred: Sequence[str], ref: Sequence[str], dist: Distance) -> float:
    """Dynamic-time-warping cost between ``pred`` (rows) and ``ref`` (columns).

    Cell (i, j) costs ``dist(pred[i], ref[j])`` plus the smallest of the cells to its left, above
    and above-left; the table starts from 0 before (0, 0).  Returns the value of the last cell.
    """
    if not pred or not ref:
        raise ValueError("dtw needs non-empty paths")
    inf = math.inf
    prev = [inf] * (len(ref) + 1)
    prev[0] = 0.0  # the virtual corner before cell (0, 0)
    for p in pred:
        cur = [inf] * (len(ref) + 1)
        for j, r in enumerate(ref, start=1):
            cur[j] = dist(p, r) + min(prev[j], cur[j - 1], prev[j - 1])
        prev = cur
    return float(prev[-1])


def ndtw(pred: Sequence[str], ref: Sequence[str], dist: Distance, d_th: float = SUCCESS_DISTANCE) -> float:
    """Normalised DTW: ``exp(-DTW / (d_th * |ref|))`` with ``|ref|`` the reference's viewpoint count."""
    return float(math.exp(-dtw(pred, ref, dist) / (d_th * len(ref))))


def sdtw(pred: Sequence[str], ref: Sequence[str], dist: Distance, d_th: float = SUCCESS_DISTANCE) -> float:
    """Success-weighted nDTW: nDTW if ``d(pred[-1], ref[-1]) < d_th`` (strict), else 0."""
    if not is_success(navigation_error(pred, ref[-1], dist), d_th):
        return 0.0
    return ndtw(pred, ref, dist, d_th)


# -- CLS -------------------------------------------------------------------------------------------
def path_coverage(pred: Sequence[str], ref: Sequence[str], dist: Distance, d_th: float = SUCCESS_DISTANCE) -> float:
    """PC: mean over reference viewpoints r of ``exp(-min_p d(r, p) / d_th)``."""
    return float(sum(math.exp(-min(dist(r, p) for p in pred) / d_th) for r in ref) / len(ref))


def length_score(coverage: float, ref_len: float, pred_len: float) -> float:
    """LS = EPL / (EPL + |EPL - PL|) with EPL = coverage * ref_len.

    When EPL and PL are both 0 (a one-viewpoint reference and an agent that did not move), the
    lengths agree exactly and LS is 1.
    """
    epl = coverage * ref_len
    denom = epl + abs(epl - pred_len)
    if denom <= 0.0:
        return 1.0
    return float(epl / denom)


def cls(pred: Sequence[str], ref: Sequence[str], dist: Distance, d_th: float = SUCCESS_DISTANCE) -> float:
    """Coverage weighted by length score: CLS = PC * LS."""
    pc = path_coverage(pred, ref, dist, d_th)
    return float(pc * length_score(pc, path_length(ref, dist), path_length(pred, dist)))


# -- whole episodes ----------------------------------------------------------------------------------
def _check_convention(convention: str) -> float:
    if convention not in SPL_CONVENTIONS:
        raise ValueError(f"unknown SPL convention {convention!r}; expected one of {SPL_CONVENTIONS}")
    return DUET_MIN_DENOMINATOR if convention == "duet" else 0.0


def r2r_episode_metrics(
    pred: Sequence[str],
    ref: Sequence[str],
    dist: Distance,
    *,
    d_th: float = SUCCESS_DISTANCE,
    spl_convention: str = "release",
) -> dict[str, float]:
    """All R2R metrics of one episode, keyed by the names of :data:`R2R_METRICS`.

    Flags (``sr``, ``oracle_sr``) are 0.0 or 1.0, so a plain mean over episodes gives the rates.
    """
    floor = _check_convention(spl_convention)
    if not pred or not ref:
        raise ValueError("an episode needs a non-empty trajectory and reference path")
    goal = ref[-1]
    tl = trajectory_length(pred, dist)
    ne = navigation_error(pred, goal, dist)
    one = oracle_navigation_error(pred, goal, dist)
    ok = is_success(ne, d_th)
    return {
        "sr": float(ok),
        "spl": spl(ok, reference_length(ref, dist, spl_convention), tl, floor),
        "nav_error": ne,
        "oracle_nav_error": one,
        "oracle_sr": float(is_success(one, d_th)),
        "trajectory_length": tl,
        "ndtw": ndtw(pred, ref, dist, d_th),
        "sdtw": sdtw(pred, ref, dist, d_th),
        "cls": cls(pred, ref, dist, d_th),
    }


def reverie_episode_metrics(
    pred: Sequence[str],
    ref: Sequence[str],
    target_obj: int | str,
    pred_obj: int | str | None,
    dist: Distance,
    visible: Callable[[str], "frozenset[str] | set[str]"],
    *,
    spl_convention: str = "release",
) -> dict[str, float]:
    """All REVERIE metrics of one episode, keyed by the names of :data:`REVERIE_METRICS`.

    ``visible(vp)`` returns the ids (as strings) of the objects visible from ``vp``.  Success means
    the target is visible from ``pred[-1]`` (any viewpoint counts, not only the annotated goal);
    SPL and RGSPL still use L from the annotated goal.  RGS compares ``str(pred_obj)`` with
    ``str(target_obj)`` and is not gated on navigation success.
    """
    floor = _check_convention(spl_convention)
    if not pred or not ref:
        raise ValueError("an episode needs a non-empty trajectory and reference path")
    target = str(target_obj)
    tl = trajectory_length(pred, dist)
    ref_len = reference_length(ref, dist, spl_convention)
    seen = [target in visible(p) for p in pred]  # every viewpoint is looked up (no short cut)
    ok = seen[-1]
    oracle = any(seen)
    grounded = pred_obj is not None and str(pred_obj) == target
    return {
        "sr": float(ok),
        "oracle_sr": float(oracle),
        "spl": spl(ok, ref_len, tl, floor),
        "rgs": float(grounded),
        "rgspl": spl(grounded, ref_len, tl, floor),
        "trajectory_length": tl,
    }


def grounded_share(per_episode: dict[str, dict[str, float]]) -> float | None:
    """REVERIE: of the successful episodes, the share whose predicted object is the target
    (sum of sr x rgs over sum of sr); None when no episode succeeds."""
    successes = sum(ep["sr"] for ep in per_episode.values())
    if not successes:
        return None
    return float(sum(ep["sr"] * ep["rgs"] for ep in per_episode.values()) / successes)


DERIVED_METRICS: dict[str, Callable[[dict[str, dict[str, float]]], float | None]] = {
    "grounded_share": grounded_share,
}
"""Summary metrics computed over the episodes together (not per-episode means)."""


def mean_metrics(per_episode: dict[str, dict[str, float]], names: Sequence[str]) -> dict[str, float]:
    """Plain mean over episodes of each metric in ``names`` (insertion order kept); the names of
    :data:`DERIVED_METRICS` are computed from the episodes together instead (None where undefined)."""
    if not per_episode:
        raise ValueError("no episodes to average")
    n = len(per_episode)
    return {name: DERIVED_METRICS[name](per_episode) if name in DERIVED_METRICS
            else float(sum(ep[name] for ep in per_episode.values()) / n) for name in names}
