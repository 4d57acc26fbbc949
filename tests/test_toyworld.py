"""The toy world: formats, determinism, atomic writes, graph/loader compatibility, geometry,
and instructions that determine their goals."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minivln.data import toyworld
from minivln.data.datasets import SPLITS, TASKS, load_episodes
from minivln.data.graph import build_house, list_scans, load_house
from minivln.data.toyworld import (
    ToyWorldConfig,
    build_toy_world,
    generate_toy_world,
    parse_r2r_goal,
    parse_reverie_target,
    project_object,
    words,
)
from minivln.geometry import direction, nearest_view, wrap_angle

SMALL = ToyWorldConfig(n_houses=3, r2r_train=20, r2r_val_seen=5, r2r_val_unseen=5, r2r_test=5,
                       reverie_train=20, reverie_val_seen=5, reverie_val_unseen=5, reverie_test=5)


@pytest.fixture(scope="module")
def world() -> toyworld.ToyWorld:
    """The default world of seed 0, in memory (room labels and anchors for the checks)."""
    return generate_toy_world(0)


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory, world) -> Path:
    """``world`` written out (``build_toy_world`` itself is checked to write the same bytes)."""
    root = tmp_path_factory.mktemp("toy") / "data"
    root.mkdir()
    toyworld.write_toy_world(world, root)
    return root


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _items(root: Path, task: str, split: str) -> list[dict]:
    name = {"r2r": "R2R", "reverie": "REVERIE"}[task]
    return json.loads((root / name / f"{name}_{split}.json").read_text())


# ------------------------------------------------------------------------------------ layout, sizes


def test_layout_and_default_sizes(toy_dir):
    scans = list_scans(toy_dir)
    assert len(scans) == 8
    assert (toy_dir / "connectivity" / "scans.txt").read_text() == "".join(f"{s}\n" for s in sorted(scans))
    for s in scans:
        assert re.fullmatch(r"[0-9A-Za-z]{11}", s)
        assert (toy_dir / "connectivity" / f"{s}_connectivity.json").is_file()
        assert 30 <= len(load_house(s, toy_dir)) <= 60
    for split in SPLITS:
        assert (toy_dir / "R2R" / f"R2R_{split}.json").is_file()
        assert (toy_dir / "REVERIE" / f"REVERIE_{split}.json").is_file()
    counts = {split: len(_items(toy_dir, "r2r", split)) for split in SPLITS}
    assert counts == {"train": 300, "val_seen": 50, "val_unseen": 50, "test": 30}
    assert {split: len(_items(toy_dir, "reverie", split)) for split in SPLITS} == counts
    man = toyworld.read_manifest(toy_dir)
    assert man["seed"] == 0 and man["version"] == toyworld.TOYWORLD_VERSION


def test_config_house_split():
    assert ToyWorldConfig().house_split_sizes() == (5, 2, 1)
    assert ToyWorldConfig(n_houses=3).house_split_sizes() == (1, 1, 1)
    with pytest.raises(ValueError):
        ToyWorldConfig(n_houses=2).house_split_sizes()
    for bad in (ToyWorldConfig(min_hops=5, max_hops=4), ToyWorldConfig(max_viewpoints=30)):
        with pytest.raises(ValueError):
            generate_toy_world(0, bad)


def test_record_formats(toy_dir):
    scan = list_scans(toy_dir)[0]
    entries = json.loads((toy_dir / "connectivity" / f"{scan}_connectivity.json").read_text())
    for e in entries:
        assert list(e) == ["image_id", "pose", "included", "visible", "unobstructed", "height"]
        assert re.fullmatch(r"[0-9a-f]{32}", e["image_id"])
        assert len(e["pose"]) == 16 and e["pose"][12:] == [0, 0, 0, 1]
        rot = np.array(e["pose"], dtype=float).reshape(4, 4)[:3, :3]
        assert np.allclose(rot @ rot.T, np.eye(3), atol=1e-5) and np.linalg.det(rot) > 0
        assert len(e["visible"]) == len(e["unobstructed"]) == len(entries)
        assert isinstance(e["included"], bool) and isinstance(e["height"], float)
    r2r_keys = ["distance", "scan", "path_id", "path", "heading", "instructions"]
    rev_keys = ["id", "path", "objId", "instructions", "heading", "scan", "path_id"]
    for split in ("train", "val_seen", "val_unseen"):
        for it in _items(toy_dir, "r2r", split):
            assert list(it) == r2r_keys
            assert isinstance(it["distance"], float) and isinstance(it["path_id"], int)
            assert isinstance(it["heading"], float) and 0 <= it["heading"] < 2 * math.pi
            assert len(it["instructions"]) == 3 and len(set(it["instructions"])) == 3
            assert 4 <= len(it["path"]) <= 8
        for it in _items(toy_dir, "reverie", split):
            assert list(it) == rev_keys
            assert it["id"] == f"{it['path_id']}_{it['objId']}" and isinstance(it["objId"], int)
            assert 1 <= len(it["instructions"]) <= 3
    # test splits, as released: the start only; no distance (R2R), no objId/path_id (REVERIE)
    for it in _items(toy_dir, "r2r", "test"):
        assert list(it) == ["scan", "path_id", "path", "heading", "instructions"] and len(it["path"]) == 1
    for it in _items(toy_dir, "reverie", "test"):
        assert list(it) == ["id", "path", "instructions", "heading", "scan"] and len(it["path"]) == 1
        assert re.fullmatch(r"\d+", it["id"])
    for task in TASKS:
        key = "path_id" if task == "r2r" else "id"
        ids = [it[key] for s in SPLITS for it in _items(toy_dir, task, s)]
        assert len(ids) == len(set(ids))


@pytest.mark.realdata
def test_same_keys_and_types_as_the_release(toy_dir, real_data_dir):
    def shape(x):
        return [(k, type(v).__name__) for k, v in x.items()]

    for task, name in (("r2r", "R2R"), ("reverie", "REVERIE")):
        for split in SPLITS:
            real = json.loads((real_data_dir / name / f"{name}_{split}.json").read_text())[0]
            assert shape(_items(toy_dir, task, split)[0]) == shape(real), (task, split)
    real_scan = list_scans(real_data_dir)[0]
    real = json.loads((real_data_dir / "connectivity" / f"{real_scan}_connectivity.json").read_text())[0]
    scan = list_scans(toy_dir)[0]
    ours = json.loads((toy_dir / "connectivity" / f"{scan}_connectivity.json").read_text())[0]
    assert shape(ours) == shape(real)
    assert [type(v).__name__ for v in ours["pose"]] == [type(v).__name__ for v in real["pose"]]


# ------------------------------------------------------------------------------ determinism, writes


def test_same_seed_same_bytes_other_seed_other_world(toy_dir, tmp_path):
    again = build_toy_world(tmp_path / "again", seed=0)  # a fresh generation, through the builder
    assert _tree(again) == _tree(toy_dir)
    other = build_toy_world(tmp_path / "other", seed=1, config=SMALL)
    assert set(list_scans(other)).isdisjoint(list_scans(toy_dir))
    assert _tree(other)["R2R/R2R_train.json"] != _tree(toy_dir)["R2R/R2R_train.json"]


def test_bytes_do_not_depend_on_the_process(tmp_path):
    """Same bytes from another interpreter with another string-hash seed."""
    here = build_toy_world(tmp_path / "here", seed=5, config=SMALL)
    code = ("import sys; from minivln.data.toyworld import build_toy_world, ToyWorldConfig as C; "
            "build_toy_world(sys.argv[1], seed=5, config=C(n_houses=3, r2r_train=20, r2r_val_seen=5, "
            "r2r_val_unseen=5, r2r_test=5, reverie_train=20, reverie_val_seen=5, reverie_val_unseen=5, "
            "reverie_test=5))")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "there")], check=True, env=env)
    assert _tree(tmp_path / "there") == _tree(here)


def test_atomic_build(tmp_path, monkeypatch):
    out = tmp_path / "data"
    build_toy_world(out, seed=2, config=SMALL)
    before = _tree(out)
    with pytest.raises(FileExistsError):
        build_toy_world(out, seed=3, config=SMALL)
    assert _tree(out) == before

    seed3 = generate_toy_world(3, SMALL)
    monkeypatch.setattr(toyworld, "generate_toy_world", lambda seed, config: seed3)  # save time
    write = toyworld.write_toy_world

    def broken(world, root):
        (root / "R2R").mkdir()
        (root / "R2R" / "R2R_train.json").write_text("[")
        raise RuntimeError("disk full")

    monkeypatch.setattr(toyworld, "write_toy_world", broken)
    with pytest.raises(RuntimeError):
        build_toy_world(out, seed=3, config=SMALL, overwrite=True)
    assert _tree(out) == before  # the old directory is untouched
    with pytest.raises(RuntimeError):
        build_toy_world(tmp_path / "fresh", seed=3, config=SMALL)
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no temporary leftovers
    monkeypatch.setattr(toyworld, "write_toy_world", write)
    build_toy_world(out, seed=3, config=SMALL, overwrite=True)
    assert _tree(out) != before and sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_ensure_reuses_a_matching_world(tmp_path):
    out = toyworld.ensure_toy_world(tmp_path / "d", seed=4, config=SMALL)
    stamp = (out / "R2R" / "R2R_train.json").stat().st_mtime_ns
    assert toyworld.ensure_toy_world(out, seed=4, config=SMALL) == out
    assert (out / "R2R" / "R2R_train.json").stat().st_mtime_ns == stamp
    toyworld.ensure_toy_world(out, seed=5, config=SMALL)
    assert toyworld.read_manifest(out)["seed"] == 5


def test_cli_build(tmp_path, capsys):
    import argparse

    from minivln.cli import COMMAND_MODULES
    from minivln.data import toy_cli

    assert "minivln.data.toy_cli" in COMMAND_MODULES
    parser = argparse.ArgumentParser(prog="minivln")  # just this command: no heavy imports
    toy_cli.register(parser.add_subparsers())

    def run(*argv: str) -> int:
        args = parser.parse_args(list(argv))
        return args.func(args)

    out = tmp_path / "toy"
    assert run("toy", "build", "--out", str(out), "--seed", "7", "--houses", "3") == 0
    text = capsys.readouterr().out
    assert str(out) in text and "R2R" in text and "REVERIE" in text and "val_unseen" in text
    assert len(list_scans(out)) == 3
    assert run("toy", "build", "--out", str(out)) == 2  # exists: refused without --force
    assert "--force" in capsys.readouterr().err
    assert run("toy", "build", "--out", str(tmp_path / "x"), "--houses", "2") == 2
    assert run("toy") == 2


# ------------------------------------------------------------------------------ graph and loaders


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("split", SPLITS)
def test_loads_through_the_dataset_loader(toy_dir, task, split):
    # the released REVERIE_test.json has no objId/path_id, and neither has ours
    episodes = load_episodes(task, split, toy_dir)
    assert episodes
    for ep in episodes:
        house = load_house(ep.scan, toy_dir)
        assert all(v in house for v in ep.path)


def test_paths_are_walks_and_distances_match(toy_dir):
    for task in TASKS:
        for split in ("train", "val_seen", "val_unseen"):
            for it in _items(toy_dir, task, split):
                house = load_house(it["scan"], toy_dir)
                path = it["path"]
                assert all(house.is_neighbor(a, b) for a, b in zip(path[:-1], path[1:]))
                assert path == house.shortest_path(path[0], path[-1])
                if task == "r2r":
                    assert abs(house.path_length(path) - it["distance"]) <= 0.0051
                    assert 4.0 <= it["distance"] <= 20.0


def test_house_splits(toy_dir, world):
    scans = {split: {it["scan"] for t in TASKS for it in _items(toy_dir, t, split)} for split in SPLITS}
    assert scans["val_unseen"].isdisjoint(scans["train"])
    assert scans["test"].isdisjoint(scans["train"] | scans["val_unseen"])
    assert scans["val_seen"] <= scans["train"]
    assert scans == {s: set(v) for s, v in world.split_scans.items()}
    train = {(it["scan"], it["path"][0], it["path"][-1]) for it in _items(toy_dir, "r2r", "train")}
    seen = {(it["scan"], it["path"][0], it["path"][-1]) for it in _items(toy_dir, "r2r", "val_seen")}
    assert train.isdisjoint(seen)


def test_excluded_viewpoints_are_not_in_the_graph(toy_dir):
    for scan in list_scans(toy_dir):
        entries = json.loads((toy_dir / "connectivity" / f"{scan}_connectivity.json").read_text())
        excluded = [k for k, e in enumerate(entries) if not e["included"]]
        assert excluded
        house = load_house(scan, toy_dir, use_cache=False)
        assert len(house) == len(entries) - len(excluded)
        for k in excluded:
            assert entries[k]["image_id"] not in house
            # they are linked in the file, so the graph really has to drop them
            assert any(entries[j]["unobstructed"][k] for j in range(len(entries)) if entries[j]["included"])
        assert not (toy_dir / "REVERIE" / "BBox" / f"{scan}_{entries[excluded[0]]['image_id']}.json").exists()


def test_relations_symmetric_and_visible_covers_unobstructed(toy_dir):
    for scan in list_scans(toy_dir):
        entries = json.loads((toy_dir / "connectivity" / f"{scan}_connectivity.json").read_text())
        unob = np.array([e["unobstructed"] for e in entries])
        vis = np.array([e["visible"] for e in entries])
        assert (unob == unob.T).all() and (vis == vis.T).all()
        assert not unob.diagonal().any() and not (unob & ~vis).any()
        house = build_house(scan, entries)
        assert np.isfinite(house.dist).all()  # one connected graph per house
        assert house.visible.sum() > house.adjacency.sum()


def test_two_floors_joined_by_stairs(toy_dir, world):
    crossing = 0
    for scan in list_scans(toy_dir):
        house = load_house(scan, toy_dir)
        floors = np.round(house.positions[:, 2] - house.heights, 1)
        assert floors.min() == pytest.approx(0.0) and floors.max() - floors.min() >= 2.0
        mid = (floors > 0.3) & (floors < floors.max() - 0.3)
        assert mid.sum() >= 2  # viewpoints on the flights
    for it in _items(toy_dir, "r2r", "train"):
        house = load_house(it["scan"], toy_dir)
        z = [house.position(v)[2] for v in it["path"]]
        if abs(z[-1] - z[0]) >= 2.0:
            crossing += 1
            assert all("stairs" in text for text in it["instructions"])
    assert crossing >= 10


# ------------------------------------------------------------------------------ BBox files


def test_every_included_viewpoint_has_a_bbox_file(toy_dir):
    names_of: dict[tuple[str, str], str] = {}
    for scan in list_scans(toy_dir):
        house = load_house(scan, toy_dir)
        for vp in house.vp_ids:
            data = json.loads((toy_dir / "REVERIE" / "BBox" / f"{scan}_{vp}.json").read_text())
            assert list(data) == [vp]
            for key, obj in data[vp].items():
                assert re.fullmatch(r"\d+", key)
                assert list(obj) == ["name", "visible_pos", "bbox2d"]
                assert re.fullmatch(r"[a-z]+(#[a-z]+)*", obj["name"])
                assert names_of.setdefault((scan, key), obj["name"]) == obj["name"]  # one id, one object
                pos = obj["visible_pos"]
                assert pos and pos == sorted(set(pos)) and all(0 <= p < 36 for p in pos)
                assert len(obj["bbox2d"]) == len(pos)
                for x, y, w, h in obj["bbox2d"]:
                    assert 0 <= x and 0 <= y and w >= 2 and h >= 2 and x + w <= 640 and y + h <= 480
    n_files = len(list((toy_dir / "REVERIE" / "BBox").glob("*.json")))
    assert n_files == sum(len(load_house(s, toy_dir)) for s in list_scans(toy_dir))


def test_bbox_geometry_is_plausible(world):
    # a box shrinks with distance and sits in the view nearest to the object's direction
    cam = np.array([0.0, 0.0, 1.5])
    near = project_object(cam, np.array([1.0, 1.0, 1.2]), (0.8, 0.8))
    far = project_object(cam, np.array([2.0, 2.0, 1.2]), (0.8, 0.8))
    k = nearest_view(*direction(cam, np.array([1.0, 1.0, 1.2]))[:2])
    area = {name: b[2] * b[3] for name, (views, boxes) in (("near", near), ("far", far))
            for v, b in zip(views, boxes) if v == k}
    assert area["near"] > 2 * area["far"]
    checked = 0
    for house in world.houses.values():
        for vp_id, data in house.bboxes.items():
            cam = house.vp(vp_id).position
            for key, obj in data[vp_id].items():
                heading, elevation, _ = direction(cam, house.object(int(key)).position)
                if abs(elevation) < math.radians(35):
                    assert nearest_view(heading, elevation) in obj["visible_pos"]
                    checked += 1
    assert checked > 1000


def test_reverie_targets_visible_from_the_goal(toy_dir):
    for split in ("train", "val_seen", "val_unseen"):
        for it in _items(toy_dir, "reverie", split):
            goal = it["path"][-1]
            data = json.loads((toy_dir / "REVERIE" / "BBox" / f"{it['scan']}_{goal}.json").read_text())
            assert str(it["objId"]) in data[goal]


# ------------------------------------------------------------------------------ instructions


def test_r2r_instructions_determine_the_path(toy_dir, world):
    """A rule-based follower: read (goal room, goal object, flights up/down) off the words, find
    the viewpoints of the house that match, walk the shortest path there.  Every instruction of
    every annotated split leads to exactly its annotated path."""
    for split in ("train", "val_seen", "val_unseen"):
        for it in _items(toy_dir, "r2r", split):
            house = world.houses[it["scan"]]
            start = it["path"][0]
            for text in it["instructions"]:
                room, obj, flights = parse_r2r_goal(text)
                floor = house.floor_of(start) + flights
                matches = [v for v in house.graph.vp_ids
                           if house.region_of(v).name == room and house.region_of(v).kind != "stairs"
                           and house.floor_of(v) == floor and words(house.anchor_name(v) or "") == obj]
                assert len(matches) == 1, text
                assert house.graph.shortest_path(start, matches[0]) == it["path"], text


def test_r2r_first_turn_follows_the_start_heading(toy_dir):
    """The opening words agree with the geometry: "Turn left/right/around" exactly when the first
    step leaves the start heading by more than 40 degrees (clockwise = right)."""
    for it in _items(toy_dir, "r2r", "train"):
        house = load_house(it["scan"], toy_dir)
        heading = direction(house.position(it["path"][0]), house.position(it["path"][1]))[0]
        delta = math.degrees(float(wrap_angle(heading - it["heading"])))
        expected = ("" if abs(delta) <= 40 else "turn around" if abs(delta) >= 140
                    else "turn right" if delta > 0 else "turn left")
        for text in it["instructions"]:
            opening = re.match(r"turn (left|right|around)", text.lower())
            assert (opening.group(0) if opening else "") == expected, (text, delta)


def test_r2r_landmarks_are_seen_on_the_path(toy_dir):
    """Objects the instruction walks past are in the BBox file of a viewpoint on the path."""
    mentioned = 0
    for it in _items(toy_dir, "r2r", "train"):
        seen = set()
        for vp in it["path"]:
            data = json.loads((toy_dir / "REVERIE" / "BBox" / f"{it['scan']}_{vp}.json").read_text())
            seen |= {words(o["name"]) for o in data[vp].values()}
        goal = json.loads((toy_dir / "REVERIE" / "BBox" / f"{it['scan']}_{it['path'][-1]}.json").read_text())
        goal_names = {words(o["name"]) for o in goal[it["path"][-1]].values()}
        for text in it["instructions"]:
            passed = re.findall(r"past the ([a-z ]+?)(?: and the ([a-z ]+?))?(?= and |[.,])", text.lower())
            for a, b in passed:
                for name in filter(None, (a, b)):
                    assert name in seen, (name, text)
                    mentioned += 1
            assert parse_r2r_goal(text)[1] in goal_names
    assert mentioned > 100


def test_reverie_instructions_determine_the_target(toy_dir, world):
    for split in ("train", "val_seen", "val_unseen"):
        for it in _items(toy_dir, "reverie", split):
            house = world.houses[it["scan"]]
            for text in it["instructions"]:
                room, floor, name = parse_reverie_target(text)
                matches = [o.obj_id for o in house.objects
                           if (reg := house.regions[o.region]).name == room and reg.kind != "stairs"
                           and reg.floor == floor and words(o.name) == name]
                assert matches == [it["objId"]], text


def test_instruction_vocabulary_is_plain_words(toy_dir):
    vocab = set()
    for task in TASKS:
        for split in SPLITS:
            for it in _items(toy_dir, task, split):
                for text in it["instructions"]:
                    assert text.endswith("."), text
                    assert all(re.fullmatch(r"[A-Z][a-z ,]*", s) for s in text[:-1].split(". ")), text
                    vocab |= set(re.findall(r"[a-z]+", text.lower()))
    assert 60 <= len(vocab) <= 400
