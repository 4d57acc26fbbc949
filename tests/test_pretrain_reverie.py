"""REVERIE pretraining: object tokens and OG labels, "nearest goal" SAP labels, config errors, and a
short end-to-end run on a small toy world (tiny model, synthetic features)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_pretrain import (  # the tiny model and tokenizer (tests/ is on sys.path)
    TINY,
    _tokenize,
)
from tinyworld import SCAN, write_tiny_data

from minivln.config import ConfigError
from minivln.data.datasets import load_episodes
from minivln.data.graph import Graphs
from minivln.data.reverie import ReverieGoals
from minivln.data.toyworld import ToyWorldConfig, ensure_toy_world
from minivln.model.checkpoint import load_pretrained
from minivln.model.config import DUETConfig
from minivln.model.duet import DUET
from minivln.model.pretrain_heads import DUETPretrainer
from minivln.training.pretrain import (
    PretrainConfig,
    PretrainTask,
    compute_task,
    resolve_mix,
    run_pretraining,
)
from minivln.training.pretrain_data import (
    PrefixDataset,
    SyntheticFeatures,
    SyntheticObjects,
    collate_states,
)

OBJ_DIM = 24  # != image_feat_size: the separate object projection is used


def _obj(name: str, views: list[int], boxes: list[list[float]]) -> dict:
    return {"name": name, "visible_pos": views, "bbox2d": boxes}


@pytest.fixture(scope="module")
def tiny_reverie(tmp_path_factory):
    """The 5-viewpoint tiny house (a-b-c-d, b-e) with REVERIE items and BBox files:
    object 5 (a centred box in view 13 = heading 30 deg, level) and 3, 7 are visible from d,
    object 9 only from e, object 8 is listed at d but in no view (so not visible)."""
    root = write_tiny_data(tmp_path_factory.mktemp("tiny_rev"))
    bbox = {
        "a": {"1": _obj("door", [12], [[10, 10, 20, 20]])},
        "b": {},
        "c": {"3": _obj("lamp", [0], [[0, 0, 10, 10]])},
        "d": {"7": _obj("plant", [20], [[5, 5, 30, 30]]),
              "5": _obj("coffee#table", [13], [[295, 220, 50, 40]]),
              "3": _obj("lamp", [1, 2], [[0, 0, 10, 10], [0, 0, 100, 100]]),
              "8": _obj("ghost#object", [], [])},
        "e": {"9": _obj("vase", [14], [[100, 100, 40, 40]])},
    }
    (root / "REVERIE" / "BBox").mkdir(parents=True)
    for vp, objs in bbox.items():
        (root / "REVERIE" / "BBox" / f"{SCAN}_{vp}.json").write_text(json.dumps({vp: objs}))
    items = [
        {"id": "7_5", "path_id": 7, "objId": 5, "scan": SCAN, "path": ["a", "b", "c", "d"],
         "heading": 1.5707963, "instructions": ["find the coffee table"]},
        {"id": "8_9", "path_id": 8, "objId": 9, "scan": SCAN, "path": ["a", "b", "c", "d"],
         "heading": 1.5707963, "instructions": ["find the vase"]},
    ]
    for split in ("train", "val_seen", "val_unseen"):
        (root / "REVERIE" / f"REVERIE_{split}.json").write_text(json.dumps(items))
    return root


def _dataset(root, objects=True, goals=True) -> PrefixDataset:
    graphs = Graphs(root)
    return PrefixDataset(
        load_episodes("reverie", "train", root), graphs, SyntheticFeatures(dim=16, num_classes=10), _tokenize,
        objects=SyntheticObjects(root, dim=OBJ_DIM) if objects else None,
        goals=ReverieGoals(root, graphs).episode_goals if goals else None,
    )


def test_og_label_and_object_tokens_hand_built(tiny_reverie):
    ds = _dataset(tiny_reverie)
    s = ds.state(0, 3)  # objId 5, full path, at d
    cur = s.obs[-1]
    assert cur.viewpoint == "d"
    assert cur.obj_ids == [3, 5, 7]  # visible objects only (8 has no view), sorted by id
    assert s.og_label == 1
    other = ds.state(1, 3)  # objId 9 is not visible from d: no OG label there
    assert other.og_label == -1
    batch = collate_states([s, other])
    pano = batch["pano"]
    c0, c1 = batch["current_index"].tolist()
    view_len = int(pano["view_lens"][c0])
    assert batch["og_labels"].tolist() == [1 + view_len + 1, -100]
    # object tokens follow the views: nav type 2, features of the store, loc = angle + box
    assert pano["nav_types"][c0, view_len:view_len + 3].tolist() == [2, 2, 2]
    assert int(pano["obj_lens"][c0]) == 3
    store = SyntheticObjects(tiny_reverie, dim=OBJ_DIM)
    assert torch.allclose(pano["obj_img_fts"][c0, :3], torch.from_numpy(store.get(SCAN, "d").fts))
    # d is entered from c facing north (view 12, heading 0); object 5's box is centred in view 13
    # (heading 30 deg, level), 50 x 40 pixels
    loc = pano["loc_fts"][c0, view_len + 1].tolist()
    h = math.radians(30)
    assert loc == pytest.approx([math.sin(h), math.cos(h), 0.0, 1.0, 40 / 480, 50 / 640,
                                 (40 / 480) * (50 / 640)], abs=1e-5)
    # every visited node's panorama has its objects (a sees object 1, b and c none / one)
    a_idx = batch["node_index"][0][0]
    assert int(pano["obj_lens"][a_idx]) == 1
    # the OG head scores exactly the object rows; the label row is the target's
    torch.manual_seed(0)
    model = DUETPretrainer(DUET(DUETConfig(**TINY, obj_feat_size=OBJ_DIM)), num_classes=10)
    batch["task"] = "og"
    loss, metrics = compute_task(model, batch)
    assert torch.isfinite(loss) and "acc/og" in metrics
    loss.backward()
    assert model.duet.og_head.net[0].weight.grad.abs().sum() > 0
    assert model.duet.img_embeddings.obj_linear.weight.grad.abs().sum() > 0  # objects reach the loss


def test_og_loss_learns_the_target(tiny_reverie):
    ds = _dataset(tiny_reverie)
    torch.manual_seed(0)
    model = DUETPretrainer(DUET(DUETConfig(**TINY, obj_feat_size=OBJ_DIM)), num_classes=10)
    batch = collate_states([ds.state(0, 3)])
    batch["task"] = "og"
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss, metrics = compute_task(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    assert float(compute_task(model, batch)[1]["acc/og"]) == 1.0


def test_nearest_goal_sap_labels_small_graph(tiny_reverie):
    # episode 1: path a-b-c-d but its target (object 9) is visible from e only: goal set {e}
    ds = _dataset(tiny_reverie, objects=False)
    assert ReverieGoals(tiny_reverie, Graphs(tiny_reverie)).episode_goals(ds.episodes[1]) == {"e"}
    s0, s1, s2, s3 = (ds.state(1, t) for t in range(4))
    assert s0.gmap_vpids[s0.global_label] == "b" and s0.local_label == 1
    # at b: ghosts c, e; e is the goal (the next path node c is not the label)
    assert s1.gmap_vpids == [None, "a", "b", "c", "e"] and s1.gmap_vpids[s1.global_label] == "e"
    assert s1.obs[-1].candidates[s1.local_label - 1].viewpoint == "e"
    # at c: ghosts e (seen from b) and d; e is 4 m away via b, d is a dead end -> e, not adjacent;
    # locally the best candidate row is the visited neighbour b
    assert s2.gmap_vpids[s2.global_label] == "e" and s2.next_vp == "e"
    assert s2.obs[-1].candidates[s2.local_label - 1].viewpoint == "b"
    # end of the annotated path is not a goal: no STOP there
    assert s3.global_label != 0 and s3.gmap_vpids[s3.global_label] == "e"
    # episode 0: object 5 is visible from d only -> R2R-like labels, STOP at d
    e0 = [ds.state(0, t) for t in range(4)]
    assert [s.next_vp for s in e0] == ["b", "c", "d", None]
    assert (e0[3].global_label, e0[3].local_label) == (0, 0)
    # without goal sets the same episode 1 gets the path labels
    r2r_like = _dataset(tiny_reverie, objects=False, goals=False).state(1, 1)
    assert r2r_like.next_vp == "c"


def test_og_needs_reverie_and_objects(tiny_reverie, tmp_path):
    base = dict(data_dir=str(tiny_reverie), features="synthetic", model="minivln-cpu")
    # default: OG on only with task reverie and a model with objects
    assert resolve_mix(PretrainConfig(**base, task="r2r"))["og"] == 0.0
    assert resolve_mix(PretrainConfig(**base, task="reverie"))["og"] == 0.0
    assert resolve_mix(PretrainConfig(**base, task="reverie", model_overrides={"obj_feat_size": 768}))["og"] == 1.0
    cfg = PretrainConfig(**base, task="r2r")
    cfg.mix.og = 1.0
    with pytest.raises(ConfigError, match="task: reverie"):
        resolve_mix(cfg)
    cfg = PretrainConfig(**base, task="reverie")
    cfg.mix.og = 1.0
    with pytest.raises(ConfigError, match="obj_feat_size"):
        run_pretraining(cfg)  # fails before any data or model is built
    cfg = PretrainConfig(data_dir=str(tiny_reverie), features="views.h5", model="minivln-reverie", task="reverie")
    with pytest.raises(ConfigError, match="objects: PATH"):
        resolve_mix(cfg)
    with pytest.raises(ConfigError, match="REVERIE-only"):
        resolve_mix(PretrainConfig(**base, task="r2r", model_overrides={"obj_feat_size": 768}))
    with pytest.raises(ValueError, match="object store"):
        PretrainTask(_dataset(tiny_reverie, objects=False), 2, {"og": 1.0}, rank=0, world_size=1)
    # the CLI reports it as a config error (exit 2), not a traceback
    from minivln.cli import main as cli_main

    rc = cli_main(["pretrain", "--out", str(tmp_path / "run"), f"data_dir={tiny_reverie}",
                   "features=synthetic", "model=minivln-cpu", "task=r2r", "mix.og=1"])
    assert rc == 2


def test_pretrain_reverie_end_to_end_toy(tmp_path, one_thread):
    cfg_w = ToyWorldConfig(n_houses=3, r2r_train=6, r2r_val_seen=2, r2r_val_unseen=2, r2r_test=1,
                           reverie_train=6, reverie_val_seen=2, reverie_val_unseen=2, reverie_test=1)
    root = ensure_toy_world(tmp_path / "toy", 0, cfg_w)
    cfg = PretrainConfig(
        model="minivln-cpu", model_overrides={**TINY, "obj_feat_size": OBJ_DIM}, data_dir=str(root),
        task="reverie", features="synthetic", batch_size=2, val_batches=1, max_instr_len=40,
    )
    cfg.train.run_dir = str(tmp_path / "run")
    cfg.train.max_steps = 4
    cfg.train.log_every = 1
    cfg.train.progress = False
    out = run_pretraining(cfg)
    val = out["val"]
    for split in ("val_seen", "val_unseen"):
        assert {f"{split}.og_acc", f"{split}.og_loss", f"{split}.sap_fused_acc", f"{split}.mlm_acc",
                f"{split}.mrc_acc"} <= set(val)
        assert 0.0 <= val[f"{split}.og_acc"] <= 1.0 and np.isfinite(val[f"{split}.og_loss"])
    nav = load_pretrained(out["export"])
    assert nav.og_head is not None and nav.config.obj_feat_size == OBJ_DIM


def test_object_hdf5_store(tiny_reverie, tmp_path):
    """``objects: PATH`` reads an object HDF5 (here the synthetic objects written to one): same
    tokens and OG label as in memory; a width other than ``obj_feat_size`` is a config error."""
    from minivln.features.hdf5 import ObjectFeatureWriter
    from minivln.training.pretrain import resolve_objects

    mem = SyntheticObjects(tiny_reverie, dim=OBJ_DIM)
    path = tmp_path / "objects.h5"
    with ObjectFeatureWriter(path, dim=OBJ_DIM, standin=True, description="test objects", dtype="float32") as w:
        for vp in "abcde":
            if len(mem.get(SCAN, vp)):
                w.add(SCAN, vp, mem.get(SCAN, vp))
    cfg = PretrainConfig(data_dir=str(tiny_reverie), features="synthetic", objects=str(path), task="reverie",
                         model="minivln-cpu", model_overrides={"obj_feat_size": OBJ_DIM})
    store = resolve_objects(cfg, tiny_reverie)
    graphs = Graphs(tiny_reverie)
    ds = PrefixDataset(load_episodes("reverie", "train", tiny_reverie), graphs,
                       SyntheticFeatures(dim=16, num_classes=10), _tokenize, objects=store,
                       goals=ReverieGoals(tiny_reverie, graphs).episode_goals)
    s = ds.state(0, 3)
    assert s.obs[-1].obj_ids == [3, 5, 7] and s.og_label == 1
    assert s.obs[1].num_objects == 0  # b: no entry in the file -> no objects
    ref = _dataset(tiny_reverie).state(0, 3).obs[-1]
    assert np.allclose(s.obs[-1].obj_img_fts, ref.obj_img_fts)
    assert np.allclose(s.obs[-1].obj_ang_fts, ref.obj_ang_fts)
    assert np.allclose(s.obs[-1].obj_box_fts, ref.obj_box_fts)
    cfg.model_overrides = {"obj_feat_size": 768}
    with pytest.raises(ConfigError, match="obj_feat_size"):
        resolve_objects(cfg, tiny_reverie)
