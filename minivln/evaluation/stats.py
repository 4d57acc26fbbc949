"""The statistics a pre-registered table reports: paired differences over seeds or over episodes.

A table (``minivln experiment``'s JSON) has one row per run; a row named ``"ARM, seed S"`` is seed S of
arm ARM (``"two-stage, seed 3"``).  Two kinds of comparison, both paired:

* **over seeds** (:func:`compare_over_seeds`): for arms A and B, the per-seed differences
  ``metric(A, seed s) - metric(B, seed s)`` over the seeds both have; their mean, its standard error,
  and a two-sided one-sample t-test (n - 1 degrees of freedom).  The tests of one group are
  Holm-corrected together (:func:`holm`); with a threshold ``alpha`` each gets a verdict.
* **over episodes** (:func:`gap_over_episodes`): two rows' per-episode scores on the same
  instructions; the mean difference, its paired standard error, and the difference in standard errors
  (the issue-20 check "the teacher is ahead of the student by at least 3 paired standard errors").

:func:`arm_summary` gives each arm's mean and standard error over its seeds.  Nothing here reads
files; :mod:`minivln.experiment` calls these when it writes a table.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Mapping

SEED_ROW = re.compile(r"^(?P<arm>.+), seed (?P<seed>\d+)$")
"""A row of one seed of an arm: ``"ARM, seed S"``."""


def arms(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[int, Mapping[str, Any]]]:
    """``{arm: {seed: row}}`` for the rows named ``"ARM, seed S"`` (other rows are left out)."""
    out: dict[str, dict[int, Mapping[str, Any]]] = {}
    for row in rows:
        m = SEED_ROW.match(str(row.get("name", "")))
        if m:
            out.setdefault(m["arm"], {})[int(m["seed"])] = row
    return out


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample SD / sqrt(n)); the error is NaN below two values."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def t_test(diffs: list[float]) -> dict[str, Any]:
    """Two-sided one-sample t-test of ``mean(diffs) == 0``: n, mean, se, t, df, p (NaN below two
    values; p = 0 or 1 when every difference is equal)."""
    mean, se = mean_se(diffs)
    n = len(diffs)
    if n < 2:
        return {"n": n, "mean": mean, "se": se, "t": float("nan"), "df": max(n - 1, 0), "p": float("nan")}
    if se == 0:
        t = math.copysign(math.inf, mean) if mean else 0.0
        return {"n": n, "mean": mean, "se": se, "t": t, "df": n - 1, "p": 0.0 if mean else 1.0}
    t = mean / se
    return {"n": n, "mean": mean, "se": se, "t": t, "df": n - 1, "p": t_two_sided_p(t, n - 1)}


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom: I_x(df/2, 1/2), x = df/(df + t^2)."""
    if math.isinf(t):
        return 0.0
    return betainc(df / 2, 0.5, df / (df + t * t), t * t / (df + t * t))


def betainc(a: float, b: float, x: float, y: float | None = None) -> float:
    """The regularized incomplete beta function I_x(a, b), a, b > 0, 0 <= x <= 1 (``y``: 1 - x where the
    caller has it without rounding): its continued fraction (Numerical Recipes, 6.4), evaluated by the
    modified Lentz method on the side of x where it converges fast (I_x(a, b) = 1 - I_{1-x}(b, a)).
    ``tests/test_stats.py`` checks it against scipy."""
    y = 1.0 - x if y is None else y
    if x <= 0.0 or y <= 0.0:
        return 0.0 if x <= 0.0 else 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(y))
    if x < (a + 1) / (a + b + 2):
        return front * _beta_fraction(a, b, x) / a
    return 1.0 - front * _beta_fraction(b, a, y) / b


def _beta_fraction(a: float, b: float, x: float, eps: float = 1e-16, tiny: float = 1e-300) -> float:
    """The continued fraction of :func:`betainc` (modified Lentz: f = prod of c * d)."""
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 1000):
        even = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        for coef in (even, odd):
            d = 1.0 + coef * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + coef / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < eps:
            return f
    raise ArithmeticError(f"betainc({a}, {b}, {x}): the continued fraction did not converge")


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given; NaN stays NaN and is not counted)."""
    order = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    m = len(order)
    adjusted = [float("nan")] * len(pvalues)
    running = 0.0
    for k, (p, i) in enumerate(order):
        running = max(running, min(1.0, (m - k) * p))
        adjusted[i] = running
    return adjusted


def compare_over_seeds(rows: Iterable[Mapping[str, Any]], pairs: list[tuple[str, str]], metrics: list[str],
                       alpha: float = 0.0, not_run: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """One paired t-test per (pair, metric), over the seeds both arms have, Holm-corrected together.

    Each result: ``a``, ``b``, ``metric``, ``seeds``, ``diffs``, n, mean, se, t, df, p, ``p_holm`` and,
    with ``alpha`` > 0, a ``verdict``: ``"A > B"`` / ``"A < B"`` when ``p_holm < alpha``, else
    ``"no difference shown"``.  An arm missing from the rows is a ``KeyError`` naming the arms there are,
    unless ``not_run`` names it (``{arm: why}``: an arm a pre-registered rule stopped): its tests say
    ``not_run`` and stay in the Holm family with p = 1, so that the planned family size still corrects
    the tests that were run (a test with fewer than two paired seeds, p NaN, counts as p = 1 too)."""
    by_arm, not_run = arms(rows), dict(not_run or {})
    results = []
    for a, b in pairs:
        if stopped := [not_run[x] for x in (a, b) if x in not_run]:
            results += [{"a": a, "b": b, "metric": m, "not_run": stopped[0], "p": float("nan")} for m in metrics]
            continue
        for name in (a, b):
            if name not in by_arm:
                raise KeyError(f"no rows of arm {name!r} (arms: {', '.join(sorted(by_arm)) or 'none'})")
        seeds = sorted(set(by_arm[a]) & set(by_arm[b]))
        for metric in metrics:
            diffs = [float(by_arm[a][s][metric]) - float(by_arm[b][s][metric]) for s in seeds]
            results.append({"a": a, "b": b, "metric": metric, "seeds": seeds, "diffs": diffs, **t_test(diffs)})
    # the planned family: a stopped test, or one without a p (fewer than two paired seeds), counts as p = 1
    for r, p in zip(results, holm([1.0 if "not_run" in r or math.isnan(r["p"]) else r["p"] for r in results])):
        if "not_run" in r:
            if alpha > 0:
                r["verdict"] = "not run"
            continue
        r["p_holm"] = float("nan") if math.isnan(r["p"]) else p
        if alpha > 0:
            r["alpha"] = alpha
            r["verdict"] = ("no difference shown" if math.isnan(p) or p >= alpha
                            else f"{r['a']} > {r['b']}" if r["mean"] > 0 else f"{r['a']} < {r['b']}")
    return results


def gap_over_episodes(a: Mapping[str, Mapping[str, float]], b: Mapping[str, Mapping[str, float]],
                      metric: str) -> dict[str, Any]:
    """Mean of ``a[ep][metric] - b[ep][metric]`` over the episodes of ``a`` (``b`` must score the same
    ones), its paired standard error, and ``in_se`` = mean / se."""
    missing = set(a) ^ set(b)
    if missing:
        raise ValueError(f"the two rows score different episodes ({len(missing)} differ, e.g. {sorted(missing)[0]})")
    mean, se = mean_se([float(a[k][metric]) - float(b[k][metric]) for k in a])
    return {"metric": metric, "episodes": len(a), "mean": mean, "se": se,
            "in_se": mean / se if se and not math.isnan(se) else float("nan")}


def arm_summary(rows: Iterable[Mapping[str, Any]], metrics: list[str]) -> dict[str, dict[str, Any]]:
    """``{arm: {"seeds": [...], metric: {"mean", "se", "sd", "values"}}}`` over each arm's seeds (sd: the
    sample standard deviation over seeds)."""
    out: dict[str, dict[str, Any]] = {}
    for arm, by_seed in arms(rows).items():
        seeds = sorted(by_seed)
        rec: dict[str, Any] = {"seeds": seeds}
        for metric in metrics:
            values = [float(by_seed[s][metric]) for s in seeds if by_seed[s].get(metric) is not None]
            mean, se = mean_se(values)
            rec[metric] = {"mean": mean, "se": se, "sd": se * math.sqrt(len(values)), "values": values}
        out[arm] = rec
    return out


__all__ = ["SEED_ROW", "arm_summary", "arms", "betainc", "compare_over_seeds", "gap_over_episodes", "holm",
           "mean_se", "t_test", "t_two_sided_p"]
