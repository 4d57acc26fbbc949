"""The evaluator on the real R2R / REVERIE val_unseen data, and ``minivln eval`` error handling.

Cross-checks are independent of the package's graph and metric code: distances come from a
networkx graph built here from the raw connectivity JSON, and the metrics are recomputed by a
straightforward numpy re-implementation of the formulas in ``docs/metrics.md``.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import networkx as nx
import numpy as np
import pytest

from minivln.cli import main as cli_main
from minivln.data.datasets import load_episodes
from minivln.evaluation.evaluator import Evaluator, SubmissionError
from minivln.evaluation.metrics import R2R_METRICS, REVERIE_METRICS

pytestmark = pytest.mark.realdata


# -- independent reference implementation -------------------------------------------------------
@lru_cache(maxsize=None)
def nx_graph(data_dir: str, scan: str) -> nx.Graph:
    entries = json.loads((Path(data_dir) / "connectivity" / f"{scan}_connectivity.json").read_text())
    g = nx.Graph()
    pos = {}
    for e in entries:
        if e["included"]:
            g.add_node(e["image_id"])
            p = e["pose"]
            pos[e["image_id"]] = np.array([p[3], p[7], p[11]])
    for i, e in enumerate(entries):
        for j, free in enumerate(e["unobstructed"]):
            a, b = e["image_id"], entries[j]["image_id"]
            if free and i != j and a in pos and b in pos:
                g.add_edge(a, b, weight=float(np.linalg.norm(pos[a] - pos[b])))
    return g


@lru_cache(maxsize=None)
def nx_from(data_dir: str, scan: str, source: str) -> dict[str, float]:
    return nx.single_source_dijkstra_path_length(nx_graph(data_dir, scan), source)


def indep_r2r(pred: list[str], ref: list[str], d) -> dict[str, float]:
    """The R2R metrics of METRICS.md, written out directly (numpy DTW table)."""
    cost = np.array([[d(p, r) for r in ref] for p in pred])
    table = np.full((len(pred) + 1, len(ref) + 1), np.inf)
    table[0, 0] = 0.0
    for i in range(1, len(pred) + 1):
        for j in range(1, len(ref) + 1):
            table[i, j] = cost[i - 1, j - 1] + min(table[i - 1, j], table[i, j - 1], table[i - 1, j - 1])
    ndtw = math.exp(-table[-1, -1] / (3.0 * len(ref)))
    tl = sum(d(a, b) for a, b in zip(pred, pred[1:]))
    ne = d(pred[-1], ref[-1])
    one = min(d(p, ref[-1]) for p in pred)
    ok = ne < 3.0
    shortest = d(ref[0], ref[-1])
    pc = float(np.mean([math.exp(-min(d(r, p) for p in pred) / 3.0) for r in ref]))
    epl = pc * sum(d(a, b) for a, b in zip(ref, ref[1:]))
    return {
        "sr": float(ok),
        "spl": ok * shortest / max(tl, shortest),
        "nav_error": ne,
        "oracle_nav_error": one,
        "oracle_sr": float(one < 3.0),
        "trajectory_length": tl,
        "ndtw": ndtw,
        "sdtw": ndtw * ok,
        "cls": pc * epl / (epl + abs(epl - tl)),
    }


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def r2r(real_data_dir) -> Evaluator:
    return Evaluator("r2r", "val_unseen", real_data_dir)


@pytest.fixture(scope="module")
def reverie(real_data_dir) -> Evaluator:
    return Evaluator("reverie", "val_unseen", real_data_dir)


def item(instr_id: str, vps: list[str], obj: int | None = None) -> dict:
    out: dict = {"instr_id": instr_id, "trajectory": [[vp, 0.0, 0.0] for vp in vps]}
    if obj is not None:
        out["predObjId"] = obj
    return out


def dist_fn(data_dir, scan):
    return lambda a, b: nx_from(str(data_dir), scan, a)[b]


# -- R2R on real data -----------------------------------------------------------------------------
def test_ground_truth_r2r(r2r, real_data_dir):
    eps = list(r2r.episodes.values())
    assert len(eps) == 2349
    summary, per = r2r.score([item(e.instr_id, list(e.path)) for e in eps], strict=True)
    assert list(summary) == list(R2R_METRICS)
    assert summary["sr"] == 1.0 and summary["oracle_sr"] == 1.0
    assert summary["nav_error"] == 0.0 and summary["oracle_nav_error"] == 0.0
    assert summary["ndtw"] == pytest.approx(1.0) and summary["sdtw"] == pytest.approx(1.0)
    assert summary["cls"] == pytest.approx(1.0)
    # SPL < 1 exactly for the paths whose annotation is longer than the shortest path: 8 of 783
    below = {e.path_id for e in eps if per[e.instr_id]["spl"] < 1 - 1e-9}
    assert len({e.path_id for e in eps}) == 783
    assert len(below) == 8
    for e in eps:
        d = dist_fn(real_data_dir, e.scan)
        annotated = sum(d(a, b) for a, b in zip(e.path, e.path[1:]))
        # TL is the annotated length; the release file's "distance" field is it, rounded
        assert per[e.instr_id]["trajectory_length"] == pytest.approx(annotated, abs=1e-6)
        assert abs(annotated - e.distance) < 0.01
        if e.path_id in below:
            assert per[e.instr_id]["spl"] == pytest.approx(d(e.start, e.goal) / annotated)
            assert annotated - d(e.start, e.goal) < 3.75
    # DUET's convention: L is the annotated length, so following the annotation scores 1
    duet = Evaluator("r2r", "val_unseen", real_data_dir, spl_convention="duet")
    assert duet.score([item(e.instr_id, list(e.path)) for e in eps])[0]["spl"] == pytest.approx(1.0)


def test_shortest_path_r2r(r2r, real_data_dir):
    eps = list(r2r.episodes.values())
    preds = [item(e.instr_id, r2r.house(e.scan).shortest_path(e.start, e.goal)) for e in eps]
    summary, per = r2r.score(preds)
    assert summary["sr"] == 1.0 and summary["spl"] == pytest.approx(1.0)
    assert summary["nav_error"] == 0.0
    for e, p in list(zip(eps, preds))[::40]:
        want = indep_r2r([s[0] for s in p["trajectory"]], list(e.path), dist_fn(real_data_dir, e.scan))
        for name in R2R_METRICS:
            assert per[e.instr_id][name] == pytest.approx(want[name], abs=1e-9), (e.instr_id, name)


def test_stay_at_start_r2r(r2r, real_data_dir):
    eps = list(r2r.episodes.values())
    summary, per = r2r.score([item(e.instr_id, [e.start]) for e in eps])
    gaps = [nx_from(str(real_data_dir), e.scan, e.start)[e.goal] for e in eps]
    assert summary["sr"] == pytest.approx(sum(g < 3.0 for g in gaps) / len(eps))
    assert summary["nav_error"] == pytest.approx(float(np.mean(gaps)))
    assert summary["trajectory_length"] == 0.0 and summary["spl"] == 0.0


def test_stop_one_short_r2r(r2r, real_data_dir):
    """Stop at the second-to-last annotated viewpoint: success iff it lies within 3 m of the goal."""
    eps = list(r2r.episodes.values())
    summary, per = r2r.score([item(e.instr_id, list(e.path[:-1])) for e in eps])
    flags = [nx_from(str(real_data_dir), e.scan, e.path[-2])[e.goal] < 3.0 for e in eps]
    assert 0 < sum(flags) < len(eps)
    assert summary["sr"] == pytest.approx(sum(flags) / len(eps))
    for e, ok in zip(eps, flags):
        assert per[e.instr_id]["sr"] == float(ok)


def test_random_walk_matches_independent_metrics(r2r, real_data_dir):
    rng = random.Random(7)
    eps = list(r2r.episodes.values())[::25]
    preds = []
    for e in eps:
        g = nx_graph(str(real_data_dir), e.scan)
        vps = [e.start]
        for _ in range(6):
            # stay in place now and then (repeats must be scored as submitted)
            vps.append(vps[-1] if rng.random() < 0.2 else rng.choice(sorted(g.neighbors(vps[-1]))))
        preds.append(item(e.instr_id, vps))
    _, per = r2r.score(preds)
    for e, p in zip(eps, preds):
        want = indep_r2r([s[0] for s in p["trajectory"]], list(e.path), dist_fn(real_data_dir, e.scan))
        for name in R2R_METRICS:
            assert per[e.instr_id][name] == pytest.approx(want[name], abs=1e-9), (e.instr_id, name)


# -- REVERIE on real data -------------------------------------------------------------------------
def bbox_visible(data_dir: Path, scan: str, vp: str) -> set[str]:
    data = json.loads((data_dir / "REVERIE" / "BBox" / f"{scan}_{vp}.json").read_text())
    return {o for o, info in data[vp].items() if len(info["visible_pos"]) > 0}


def test_ground_truth_reverie(reverie, real_data_dir):
    eps = list(reverie.episodes.values())
    assert len(eps) == 3433
    summary, per = reverie.score([item(e.instr_id, list(e.path), e.obj_id) for e in eps], strict=True)
    assert list(summary) == list(REVERIE_METRICS)
    assert summary["sr"] == 1.0 and summary["oracle_sr"] == 1.0 and summary["rgs"] == 1.0
    items = {e.instr_id.rsplit("_", 1)[0] for e in eps}
    assert len(items) == 1292
    below = {e.instr_id.rsplit("_", 1)[0] for e in eps if per[e.instr_id]["spl"] < 1 - 1e-9}
    assert len(below) == 19
    assert all(per[i]["rgspl"] == per[i]["spl"] for i in per)
    # a wrong object: navigation unchanged, grounding 0
    wrong = reverie.score([item(e.instr_id, list(e.path), -1) for e in eps])[0]
    assert wrong["sr"] == 1.0 and wrong["rgs"] == 0.0 and wrong["rgspl"] == 0.0
    assert summary["grounded_share"] == 1.0 and wrong["grounded_share"] == 0.0
    # every other episode names the right object: half of the successes are grounded
    half = reverie.score([item(e.instr_id, list(e.path), e.obj_id if k % 2 else -1) for k, e in enumerate(eps)])[0]
    assert half["grounded_share"] == pytest.approx(sum(k % 2 for k in range(len(eps))) / len(eps))


def test_stay_at_start_reverie(reverie, real_data_dir):
    eps = list(reverie.episodes.values())[::10]
    summary, _ = reverie.score([item(e.instr_id, [e.start], e.obj_id) for e in eps])
    seen = [str(e.obj_id) in bbox_visible(real_data_dir, e.scan, e.start) for e in eps]
    assert summary["sr"] == pytest.approx(sum(seen) / len(eps))
    assert summary["rgs"] == 1.0  # not gated on success
    assert summary["rgspl"] == 1.0  # T = 0 <= L


def test_reverie_listed_but_not_visible_is_no_success(reverie, real_data_dir):
    """A target listed in a BBox file with an empty visible_pos does not count as visible."""
    found = None
    for e in reverie.episodes.values():
        house = reverie.house(e.scan)
        for vp in house.neighbors(e.goal):
            data = json.loads((real_data_dir / "REVERIE" / "BBox" / f"{e.scan}_{vp}.json").read_text())[vp]
            if str(e.obj_id) in data and not data[str(e.obj_id)]["visible_pos"]:
                found = (e, vp)
                break
        if found:
            break
    assert found is not None
    e, vp = found
    traj = list(e.path) + [vp]  # reach the goal (target visible), then step next door
    summary, per = reverie.score([item(e.instr_id, traj, e.obj_id)])
    assert per[e.instr_id]["sr"] == 0.0
    assert per[e.instr_id]["oracle_sr"] == 1.0
    assert per[e.instr_id]["rgs"] == 1.0


# -- the command line -------------------------------------------------------------------------------
def run_eval(capsys, tmp_path, preds, *extra, task="r2r", data_dir=None, raw: str | None = None):
    sub = tmp_path / "preds.json"
    sub.write_text(raw if raw is not None else json.dumps(preds))
    argv = ["eval", "--task", task, "--split", "val_unseen", "--preds", str(sub), "--data-dir", str(data_dir)]
    rc = cli_main([*argv, *extra])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_writes_flat_json_and_per_episode(capsys, tmp_path, r2r, real_data_dir):
    eps = list(r2r.episodes.values())
    out = tmp_path / "metrics.json"
    preds = [item(e.instr_id, list(e.path)) for e in eps]
    rc, stdout, err = run_eval(capsys, tmp_path, preds, "--out", str(out), "--strict", data_dir=real_data_dir)
    assert rc == 0, err
    assert err == ""
    flat = json.loads(out.read_text())
    assert list(flat) == list(R2R_METRICS)
    assert all(isinstance(v, float) for v in flat.values())
    assert flat["sr"] == 1.0  # a fraction, not a percentage
    per = json.loads((tmp_path / "metrics.per_episode.json").read_text())
    assert set(per) == set(r2r.episodes)
    assert set(per[eps[0].instr_id]) == set(R2R_METRICS)
    assert "100.00" in stdout and "sr" in stdout


def test_cli_missing_unknown_duplicate_ids(capsys, tmp_path, r2r, real_data_dir):
    eps = list(r2r.episodes.values())[:5]
    preds = [item(e.instr_id, list(e.path)) for e in eps]
    preds.append(item("999999_0", ["nowhere"]))  # outside the split: ignored, not validated
    preds.append(item(eps[0].instr_id, [eps[0].start]))  # repeated id: the first occurrence counts
    out = tmp_path / "m.json"
    rc, _, err = run_eval(capsys, tmp_path, preds, "--out", str(out), data_dir=real_data_dir)
    assert rc == 0
    assert "2344 of 2349" in err
    assert repr(list(r2r.episodes)[5]) in err  # an example of a missing id
    assert "'999999_0'" in err and "ignored" in err
    assert "more than once" in err
    flat = json.loads(out.read_text())
    assert flat["sr"] == 1.0  # the stay-at-start duplicate was not scored
    assert len(json.loads((tmp_path / "m.per_episode.json").read_text())) == 5
    rc, _, err = run_eval(capsys, tmp_path, preds, "--strict", data_dir=real_data_dir)
    assert rc == 2
    assert "missing" in err and "--strict" in err and err.startswith("minivln: error:")


def test_cli_allow_jumps(capsys, tmp_path, r2r, real_data_dir):
    e = next(e for e in r2r.episodes.values() if not r2r.house(e.scan).is_neighbor(e.start, e.goal))
    rc, _, err = run_eval(capsys, tmp_path, [item(e.instr_id, [e.start, e.goal])], data_dir=real_data_dir)
    assert rc == 2 and "not neighbours" in err
    out = tmp_path / "j.json"
    preds = [item(e.instr_id, [e.start, e.goal])]
    rc, _, err = run_eval(capsys, tmp_path, preds, "--allow-jumps", "--out", str(out), data_dir=real_data_dir)
    assert rc == 0
    flat = json.loads(out.read_text())
    assert flat["trajectory_length"] == pytest.approx(nx_from(str(real_data_dir), e.scan, e.start)[e.goal])
    assert flat["spl"] == pytest.approx(1.0)


def _r2r_cases(ep, other_vp):
    s, p = ep.start, list(ep.path)
    return {
        "malformed json": (None, "[{", "not valid JSON"),
        "not a list": (None, json.dumps({"instr_id": ep.instr_id}), "must be a JSON list"),
        "item not an object": (["x"], None, "item 0 must be an object"),
        "missing instr_id": ([{"trajectory": [[s, 0, 0]]}], None, "item 0 has no 'instr_id'"),
        "instr_id not a string": (
            [{"instr_id": 12, "trajectory": [[s, 0, 0]]}], None, "item 0: instr_id must be a string"
        ),
        "instr_id unparseable": ([item("walk_home", [s])], None, "'walk_home' is not a r2r instruction id"),
        "missing trajectory": ([{"instr_id": ep.instr_id}], None, "has no 'trajectory'"),
        "empty trajectory": ([{"instr_id": ep.instr_id, "trajectory": []}], None, "non-empty list"),
        "entry too short": ([{"instr_id": ep.instr_id, "trajectory": [[s, 0.0]]}], None, "trajectory entry 0 must be"),
        "bare viewpoint": ([{"instr_id": ep.instr_id, "trajectory": [s]}], None, "trajectory entry 0 must be"),
        "heading not a number": (
            [{"instr_id": ep.instr_id, "trajectory": [[s, 0, 0], [p[1], "left", 0]]}],
            None,
            "trajectory entry 1 must be",
        ),
        "wrong start": ([item(ep.instr_id, p[1:])], None, "not at the episode's start"),
        "unknown viewpoint": (
            [item(ep.instr_id, [s, "f" * 32])], None, f"'{'f' * 32}', which is not in scan {ep.scan}"
        ),
        "viewpoint of another scan": ([item(ep.instr_id, [s, other_vp])], None, "trajectory entry 1 has viewpoint"),
        "jump": ([item(ep.instr_id, [s, p[-1]])], None, "trajectory entry 1 jumps from"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "malformed json", "not a list", "item not an object", "missing instr_id", "instr_id not a string",
        "instr_id unparseable", "missing trajectory", "empty trajectory", "entry too short", "bare viewpoint",
        "heading not a number", "wrong start", "unknown viewpoint", "viewpoint of another scan", "jump",
    ],
)
def test_cli_bad_r2r_submissions(case, capsys, tmp_path, r2r, real_data_dir):
    ep = next(e for e in r2r.episodes.values() if not r2r.house(e.scan).is_neighbor(e.start, e.goal))
    other = next(e for e in r2r.episodes.values() if e.scan != ep.scan).start
    preds, raw, message = _r2r_cases(ep, other)[case]
    rc, stdout, err = run_eval(capsys, tmp_path, preds, raw=raw, data_dir=real_data_dir)
    assert rc == 2
    assert err.startswith("minivln: error:") and err.count("\n") == 1, err
    assert message in err
    unnamed = ("item not an object", "missing instr_id", "instr_id not a string", "instr_id unparseable")
    if preds is not None and case not in unnamed:
        assert repr(ep.instr_id) in err  # the item is named by its id
    assert stdout == ""


@pytest.mark.parametrize(
    ("obj", "message"),
    [(None, "has no 'predObjId'"), ("12", "predObjId must be an integer"), (1.5, "predObjId must be an integer"),
     (True, "predObjId must be an integer")],
)
def test_cli_bad_reverie_pred_obj(obj, message, capsys, tmp_path, reverie, real_data_dir):
    ep = next(iter(reverie.episodes.values()))
    it = item(ep.instr_id, list(ep.path))
    if obj is not None:
        it["predObjId"] = obj
    rc, _, err = run_eval(capsys, tmp_path, [it], task="reverie", data_dir=real_data_dir)
    assert rc == 2 and message in err and repr(ep.instr_id) in err


def test_cli_reverie_without_a_success_shows_no_grounded_share(capsys, tmp_path, reverie, real_data_dir):
    """RGS|SR is a share of the successes: with none it is printed as '-' and written as null."""
    ep = next(e for e in reverie.episodes.values()
              if str(e.obj_id) not in bbox_visible(real_data_dir, e.scan, e.start))
    rc, out, _ = run_eval(capsys, tmp_path, [item(ep.instr_id, [ep.start], ep.obj_id)], task="reverie",
                          data_dir=real_data_dir)
    assert rc == 0
    line = next(l for l in out.splitlines() if l.strip().startswith("grounded_share"))
    assert line.split()[-1] == "-"


def test_cli_reverie_id_form(capsys, tmp_path, real_data_dir):
    rc, _, err = run_eval(capsys, tmp_path, [item("4332_0", ["x"], 1)], task="reverie", data_dir=real_data_dir)
    assert rc == 2 and "<path_id>_<objId>_<k>" in err


def test_missing_submission_file_and_test_split(capsys, tmp_path, real_data_dir):
    rc = cli_main(["eval", "--task", "r2r", "--split", "val_unseen", "--preds", str(tmp_path / "nope.json"),
                   "--data-dir", str(real_data_dir)])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    with pytest.raises(SubmissionError):
        Evaluator("r2r", "val_unseen", real_data_dir).score([item("999999_0", ["x"])])  # nothing in the split
    from minivln.paths import DataError

    with pytest.raises(DataError, match="no goals"):
        Evaluator("r2r", "test", real_data_dir)


def test_module_entry_point(tmp_path, real_data_dir):
    ep = load_episodes("r2r", "val_unseen", real_data_dir)[0]
    sub = tmp_path / "one.json"
    sub.write_text(json.dumps([item(ep.instr_id, list(ep.path))]))
    res = subprocess.run(
        [sys.executable, "-m", "minivln", "eval", "--task", "r2r", "--split", "val_unseen", "--preds", str(sub),
         "--data-dir", str(real_data_dir)],
        capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "2348 of 2349" in res.stderr and "1 episodes scored" in res.stdout


def test_reverie_missing_bbox_file_sees_nothing(real_data_dir, tmp_path, monkeypatch):
    ev = Evaluator("reverie", "val_unseen", real_data_dir)
    monkeypatch.setattr(ev, "_bbox_path", lambda scan, vp: tmp_path / f"{scan}_{vp}.json")  # none exist
    ep = next(iter(ev.episodes.values()))
    result = ev.evaluate([item(ep.instr_id, list(ep.path), ep.obj_id)])
    assert result.per_episode[ep.instr_id]["sr"] == 0.0 and result.per_episode[ep.instr_id]["oracle_sr"] == 0.0
    assert result.report.missing_bbox == sorted(f"{ep.scan}_{vp}" for vp in set(ep.path))
    assert any("no BBox file" in w for w in result.report.warnings())
