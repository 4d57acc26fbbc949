"""Hand-computed metric values on small hand-built graphs (no data files needed).

The main graph, ``LINE``, is a corridor A - B - C - D (edges of 2 m) with a spur E hanging off B
(1.5 m).  Shortest distances are computed here by a tiny Floyd-Warshall, independent of the
package's graph code::

        E
        | 1.5
    A - B - C - D      (2 m each)
"""

from __future__ import annotations

import math

import pytest

from minivln.evaluation import metrics as M


def make_dist(edges: dict[tuple[str, str], float]):
    """Shortest-path distance callable of an undirected weighted graph (Floyd-Warshall)."""
    nodes = sorted({n for e in edges for n in e})
    d = {(a, b): (0.0 if a == b else math.inf) for a in nodes for b in nodes}
    for (a, b), w in edges.items():
        d[a, b] = d[b, a] = w
    for k in nodes:
        for i in nodes:
            for j in nodes:
                if d[i, k] + d[k, j] < d[i, j]:
                    d[i, j] = d[i, k] + d[k, j]
    return lambda a, b: d[a, b]


LINE = make_dist({("A", "B"): 2.0, ("B", "C"): 2.0, ("C", "D"): 2.0, ("B", "E"): 1.5})
REF = ["A", "B", "C", "D"]  # annotated path; goal D; shortest A->D = 6


def test_distance_helper_sanity():
    assert LINE("A", "D") == 6.0
    assert LINE("E", "D") == 5.5
    assert LINE("E", "A") == 3.5


# -- DTW family ------------------------------------------------------------------------------------
def test_ndtw_worked_table():
    # pred A, E, B, C against ref A, B, C, D.  Cost rows d(P_i, R_j):
    #   A: 0   2   4   6
    #   E: 3.5 1.5 3.5 5.5
    #   B: 2   0   2   4
    #   C: 4   2   0   2
    # Accumulated table (cell + min(left, up, up-left)):
    #   A: 0    2    6    12
    #   E: 3.5  1.5  5    10.5
    #   B: 5.5  1.5  3.5  7.5
    #   C: 9.5  3.5  1.5  3.5      -> DTW = 3.5
    pred = ["A", "E", "B", "C"]
    assert M.dtw(pred, REF, LINE) == pytest.approx(3.5)
    assert M.ndtw(pred, REF, LINE) == pytest.approx(math.exp(-3.5 / 12))
    assert M.ndtw(pred, REF, LINE) == pytest.approx(0.7470175, abs=1e-7)
    # NE = d(C, D) = 2 < 3: success, so SDTW = nDTW
    assert M.sdtw(pred, REF, LINE) == pytest.approx(0.7470175, abs=1e-7)


def test_ndtw_identical_path_is_one_and_d_th_scales():
    assert M.ndtw(REF, REF, LINE) == 1.0
    pred = ["A", "E", "B", "C"]
    # d_th enters only the divisor: exp(-3.5 / (1.0 * 4))
    assert M.ndtw(pred, REF, LINE, d_th=1.0) == pytest.approx(math.exp(-3.5 / 4))


def test_dtw_single_row_and_single_column():
    # One-row table: DTW = sum of d(A, R_j) = 0 + 2 + 4 + 6
    assert M.dtw(["A"], REF, LINE) == pytest.approx(12.0)
    assert M.ndtw(["A"], REF, LINE) == pytest.approx(math.exp(-12.0 / 12.0))
    # One-column table: DTW = sum of d(P_i, A)
    assert M.dtw(["A", "B", "E"], ["A"], LINE) == pytest.approx(0 + 2 + 3.5)


def test_sdtw_zero_on_failure():
    pred = ["A", "B"]  # NE = d(B, D) = 4 -> fail
    assert M.ndtw(pred, REF, LINE) > 0
    assert M.sdtw(pred, REF, LINE) == 0.0


# -- CLS -----------------------------------------------------------------------------------------
def test_cls_worked_example():
    pred = ["A", "E", "B", "C"]
    # PC: A, B, C are on the trajectory (exp(0) = 1); D is 2 m from C: exp(-2/3)
    pc = (3 + math.exp(-2 / 3)) / 4
    assert M.path_coverage(pred, REF, LINE) == pytest.approx(pc)
    # EPL = PC * 6 (reference length); PL = 3.5 + 1.5 + 2 = 7
    epl = 6 * pc
    ls = epl / (epl + abs(epl - 7))
    assert M.cls(pred, REF, LINE) == pytest.approx(pc * ls)
    assert M.cls(pred, REF, LINE) == pytest.approx(0.6612911, abs=1e-7)


def test_cls_backtracking_length_penalty():
    pred = ["A", "B", "C", "B", "C", "D"]  # covers everything, PL = 10, EPL = 6
    assert M.path_coverage(pred, REF, LINE) == 1.0
    assert M.cls(pred, REF, LINE) == pytest.approx(6 / (6 + 4))


def test_length_score_degenerate():
    assert M.length_score(1.0, 0.0, 0.0) == 1.0  # nothing to cover and nothing walked
    assert M.length_score(1.0, 0.0, 2.0) == 0.0


# -- SPL, NE, oracle -------------------------------------------------------------------------------
def test_spl_longer_than_shortest():
    pred = ["A", "E", "B", "C"]  # T = 7, L = 6, success
    m = M.r2r_episode_metrics(pred, REF, LINE)
    assert m["trajectory_length"] == pytest.approx(7.0)
    assert m["spl"] == pytest.approx(6 / 7)
    assert m["sr"] == 1.0
    assert m["nav_error"] == pytest.approx(2.0)


def test_spl_plain_function():
    assert M.spl(True, 6.0, 7.0) == pytest.approx(6 / 7)
    assert M.spl(True, 6.0, 4.0) == 1.0  # shorter than L (stopped early, within 3 m): capped at 1
    assert M.spl(False, 6.0, 6.0) == 0.0
    assert M.spl(True, 0.0, 0.0) == 1.0  # start == goal, never moved
    assert M.spl(True, 0.0, 0.0, min_denominator=0.01) == 0.0  # DUET's floor


def test_spl_conventions_differ_when_annotated_path_is_not_shortest():
    # Triangle: the annotated path A-B-C (4 m) is longer than the shortcut A-C (3 m).
    tri = make_dist({("A", "B"): 2.0, ("B", "C"): 2.0, ("A", "C"): 3.0})
    ref = ["A", "B", "C"]
    release = M.r2r_episode_metrics(ref, ref, tri)  # follow the annotation exactly
    duet = M.r2r_episode_metrics(ref, ref, tri, spl_convention="duet")
    assert release["spl"] == pytest.approx(3 / 4)
    assert duet["spl"] == 1.0
    shortcut = M.r2r_episode_metrics(["A", "C"], ref, tri)
    assert shortcut["spl"] == 1.0
    assert M.r2r_episode_metrics(["A", "C"], ref, tri, spl_convention="duet")["spl"] == 1.0
    assert M.reference_length(ref, tri, "release") == 3.0
    assert M.reference_length(ref, tri, "duet") == 4.0
    with pytest.raises(ValueError, match="convention"):
        M.reference_length(ref, tri, "nope")


def test_nav_error_and_oracle():
    pred = ["A", "B", "C", "B", "A"]  # came within 2 m (at C) but ended 6 m away
    m = M.r2r_episode_metrics(pred, REF, LINE)
    assert m["nav_error"] == 6.0
    assert m["oracle_nav_error"] == 2.0
    assert m["sr"] == 0.0 and m["oracle_sr"] == 1.0
    assert m["spl"] == 0.0 and m["sdtw"] == 0.0
    assert m["trajectory_length"] == 8.0


@pytest.mark.parametrize(("edge", "success"), [(2.999, True), (3.0, False), (3.001, False)])
def test_success_boundary_is_strict(edge, success):
    dist = make_dist({("S", "X"): 1.0, ("X", "G"): edge})
    ref = ["S", "X", "G"]
    m = M.r2r_episode_metrics(["S", "X"], ref, dist)
    assert m["nav_error"] == pytest.approx(edge)
    assert m["sr"] == float(success)
    assert m["oracle_sr"] == float(success)
    # L = 1 + edge > T = 1, so a success scores SPL = 1 (stopped short but within the radius)
    assert m["spl"] == (1.0 if success else 0.0)
    assert (m["sdtw"] > 0) == success
    assert M.is_success(2.999) and not M.is_success(3.0)


# -- repeats and back-tracking ------------------------------------------------------------------
def test_consecutive_repeat_off_reference_changes_only_ndtw():
    plain = ["A", "E", "B", "C", "D"]
    repeated = ["A", "E", "E", "B", "C", "D"]
    a = M.r2r_episode_metrics(plain, REF, LINE)
    b = M.r2r_episode_metrics(repeated, REF, LINE)
    # Worked tables: plain DTW = 1.5 (the E row costs d(E, B) = 1.5 once); the extra E row
    # costs another 1.5, so DTW = 3.
    assert M.dtw(plain, REF, LINE) == pytest.approx(1.5)
    assert M.dtw(repeated, REF, LINE) == pytest.approx(3.0)
    assert a["ndtw"] == pytest.approx(math.exp(-1.5 / 12))
    assert b["ndtw"] == pytest.approx(math.exp(-3.0 / 12))
    assert b["sdtw"] == b["ndtw"]
    for name in ("trajectory_length", "sr", "spl", "cls", "nav_error", "oracle_nav_error", "oracle_sr"):
        assert a[name] == pytest.approx(b[name]), name
    assert a["trajectory_length"] == pytest.approx(9.0)
    assert a["spl"] == pytest.approx(6 / 9)
    # collapsing repeats restores the plain trajectory
    assert M.collapse_repeats(repeated) == plain


def test_repeat_on_reference_costs_nothing():
    assert M.dtw(["A", "A", "B", "C", "D", "D"], REF, LINE) == 0.0
    assert M.ndtw(["A", "A", "B", "C", "D", "D"], REF, LINE) == 1.0


def test_backtracking():
    pred = ["A", "B", "C", "B", "C", "D"]
    m = M.r2r_episode_metrics(pred, REF, LINE)
    assert m["trajectory_length"] == 10.0
    assert m["sr"] == 1.0
    assert m["spl"] == pytest.approx(0.6)
    # DTW table rows end with 12, 6, 2, 4, 4, 2 -> DTW = 2
    assert M.dtw(pred, REF, LINE) == pytest.approx(2.0)
    assert m["ndtw"] == pytest.approx(math.exp(-2 / 12))
    assert m["cls"] == pytest.approx(0.6)


# -- REVERIE -------------------------------------------------------------------------------------
VIS = {"A": set(), "B": {"7"}, "C": {"7", "9"}, "D": {"9"}, "E": set()}  # target 9 seen from C and D


def reverie(pred, target=9, pred_obj=9, **kw):
    return M.reverie_episode_metrics(pred, REF, target, pred_obj, LINE, VIS.__getitem__, **kw)


def test_reverie_success_at_non_goal_viewpoint():
    m = reverie(["A", "E", "B", "C"])  # stops at C, not the goal D, but the target is visible
    assert m["sr"] == 1.0 and m["oracle_sr"] == 1.0
    assert m["trajectory_length"] == pytest.approx(7.0)
    assert m["spl"] == pytest.approx(6 / 7)  # L = d(start, annotated goal) = 6
    assert m["rgs"] == 1.0 and m["rgspl"] == pytest.approx(6 / 7)


def test_reverie_rgs_not_gated_on_success():
    m = reverie(["A", "E", "B", "A", "B"], pred_obj="9")  # never sees the target; id as a string
    assert m["sr"] == 0.0 and m["oracle_sr"] == 0.0 and m["spl"] == 0.0
    assert m["rgs"] == 1.0
    assert m["trajectory_length"] == pytest.approx(9.0)
    assert m["rgspl"] == pytest.approx(6 / 9)


def test_reverie_oracle_and_wrong_object():
    m = reverie(["A", "B", "C", "B"], pred_obj=7)  # saw the target at C, ended at B
    assert m["sr"] == 0.0 and m["oracle_sr"] == 1.0
    assert m["rgs"] == 0.0 and m["rgspl"] == 0.0
    assert reverie(["A", "B", "C", "B"], pred_obj=None)["rgs"] == 0.0


def test_reverie_spl_duet_convention():
    tri = make_dist({("A", "B"): 2.0, ("B", "C"): 2.0, ("A", "C"): 3.0})
    vis = {"A": set(), "B": set(), "C": {"1"}}
    ref = ["A", "B", "C"]
    rel = M.reverie_episode_metrics(ref, ref, 1, 1, tri, vis.__getitem__)
    duet = M.reverie_episode_metrics(ref, ref, 1, 1, tri, vis.__getitem__, spl_convention="duet")
    assert rel["spl"] == pytest.approx(0.75) and rel["rgspl"] == pytest.approx(0.75)
    assert duet["spl"] == 1.0 and duet["rgspl"] == 1.0


def test_reverie_repeats_do_not_change_anything():
    a = reverie(["A", "B", "C"])
    b = reverie(["A", "A", "B", "B", "C", "C"])
    assert a == b


# -- aggregation and argument checks ---------------------------------------------------------------
def test_mean_metrics_plain_mean():
    per = {"1_0": {"sr": 1.0, "spl": 0.5}, "1_1": {"sr": 0.0, "spl": 0.0}, "2_0": {"sr": 1.0, "spl": 1.0}}
    assert M.mean_metrics(per, ("sr", "spl")) == {"sr": pytest.approx(2 / 3), "spl": pytest.approx(0.5)}
    with pytest.raises(ValueError):
        M.mean_metrics({}, ("sr",))


def test_output_names():
    assert set(M.r2r_episode_metrics(REF, REF, LINE)) == set(M.R2R_METRICS)
    assert set(reverie(REF)) == set(M.REVERIE_METRICS) - set(M.DERIVED_METRICS)
    assert M.R2R_METRICS == (
        "sr", "spl", "nav_error", "oracle_nav_error", "oracle_sr", "trajectory_length", "ndtw", "sdtw", "cls"
    )
    assert M.REVERIE_METRICS == ("sr", "oracle_sr", "spl", "rgs", "rgspl", "grounded_share", "trajectory_length")


def test_grounded_share_counts_the_right_object_among_successes_only():
    """RGS|SR: of the episodes that succeed, the share that also name the target; a right object at a
    failed episode does not count, and with no success the share is undefined (None), not 0."""
    per = {"a": {"sr": 1.0, "rgs": 1.0}, "b": {"sr": 1.0, "rgs": 0.0}, "c": {"sr": 1.0, "rgs": 1.0},
           "d": {"sr": 0.0, "rgs": 0.0}, "e": {"sr": 0.0, "rgs": 1.0}}
    assert M.grounded_share(per) == pytest.approx(2 / 3)
    out = M.mean_metrics(per, ("sr", "rgs", "grounded_share"))
    assert out == {"sr": pytest.approx(0.6), "rgs": pytest.approx(0.6), "grounded_share": pytest.approx(2 / 3)}
    assert M.grounded_share({"d": {"sr": 0.0, "rgs": 0.0}}) is None
    assert "RGS|SR -" not in M.format_metrics({"grounded_share": None, "sr": 0.0})


def test_bad_arguments():
    with pytest.raises(ValueError):
        M.r2r_episode_metrics([], REF, LINE)
    with pytest.raises(ValueError):
        M.r2r_episode_metrics(REF, REF, LINE, spl_convention="paper")
    with pytest.raises(ValueError):
        M.dtw([], REF, LINE)
