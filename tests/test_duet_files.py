"""DUET's / ScaleVLN's processed annotation files (``*_enc.jsonl``, ``*_enc.json``): reading them into
episodes with their token ids, extra connectivity folders (ScaleVLN's HM3D/Gibson houses), one-line
errors for bad files, and a short ``minivln pretrain`` run on an ``_enc.jsonl`` file plus augmented
pairs.  The files are written here in the formats DUET's readers take (``pretrain_src/data/dataset.py``:
``instr_id``, ``scan``, ``path``, ``heading``, ``instr_encoding``, REVERIE ``pos_vps``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_checks import one_error_line, run_cli
from conftest import SMALL_DUET, SMALL_TOY_DIM
from duet_release import (
    HM3D_SCAN,
    hm3d_lines,
    r2r_lines,
    write_hm3d_house,
    write_jsonl,
    write_view_features,
)
from tinyworld import write_tiny_data

from minivln.config import load_config
from minivln.data.datasets import Episode, load_episodes
from minivln.data.duet_files import load_annotation_file, load_annotation_files
from minivln.data.graph import Graphs
from minivln.data.tokenizer import BERT_VOCAB_SIZE, CLS_ID, SEP_ID, get_tokenizer
from minivln.paths import DataError
from minivln.training.finetune import (
    FinetuneConfig,
    build_model,
    make_task,
    prepare_data,
)
from minivln.training.pretrain import PretrainConfig, build_datasets
from minivln.training.pretrain_data import (
    PrefixDataset,
    SyntheticFeatures,
    collate_states,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The 5-viewpoint tiny house (a-b-c-d, b-e; f not included) and an HM3D-style house in a
    separate connectivity folder."""
    root = write_tiny_data(tmp_path_factory.mktemp("duet_files"))
    hm3d = write_hm3d_house(root.parent / "hm3d_connectivity")
    return root, hm3d


# ----------------------------------------------------------------------------------- reading


def test_r2r_enc_jsonl_reads_as_the_official_file_with_its_ids(small_toy, tmp_path):
    data, _ = small_toy
    items = json.loads((data / "R2R" / "R2R_train.json").read_text())
    path = write_jsonl(tmp_path / "R2R_train_enc.jsonl", r2r_lines(items))
    got = load_annotation_file(path, "r2r", Graphs(data))
    want = load_episodes("r2r", "train", data)
    assert [e.instr_id for e in got] == [e.instr_id for e in want]
    tok = get_tokenizer()
    for g, w in zip(got, want):
        assert (g.scan, g.path, g.heading, g.instruction, g.path_id) == (w.scan, w.path, w.heading,
                                                                         w.instruction, w.path_id)
        assert g.token_ids == tok.encode(w.instruction) and g.token_ids[0] == CLS_ID
        assert w.token_ids is None  # the official file has text only


def test_prefix_dataset_uses_the_given_ids_not_the_text(tiny):
    root, _ = tiny
    ids = [CLS_ID] + list(range(2000, 2030)) + [SEP_ID]
    line = {"instr_id": "7_0", "scan": "tinyscan", "path": ["a", "b", "c"], "heading": 1.0,
            "instr_encoding": ids}
    path = write_jsonl(root / "given_ids.jsonl", [line])
    eps = load_annotation_file(path, "r2r", Graphs(root))

    def no_tokenizing(text):
        raise AssertionError("episodes with token ids must not be tokenised again")

    ds = PrefixDataset(eps, Graphs(root), SyntheticFeatures(dim=16, num_classes=10), no_tokenizing,
                       max_instr_len=12)
    assert ds.txt_ids(0) == ids[:11] + [SEP_ID]  # cut to max_instr_len, [SEP] kept last
    long = PrefixDataset(eps, Graphs(root), SyntheticFeatures(dim=16, num_classes=10), no_tokenizing,
                         max_instr_len=80)
    assert long.txt_ids(0) == ids
    batch = collate_states([long[2]])
    assert batch["txt_ids"][0].tolist() == ids
    assert batch["instructions"][0] == get_tokenizer().decode(ids)  # no text in the file: decoded ids


def test_finetuning_enc_json_items_and_files_concatenate(tiny):
    root, _ = tiny
    tok = get_tokenizer()
    item = {"path_id": 9, "scan": "tinyscan", "path": ["e", "b", "a"], "heading": 0.0,
            "instructions": ["go to a", "stop at a"],
            "instr_encodings": [tok.encode("go to a"), [CLS_ID, 2000, SEP_ID]]}
    (root / "R2R_aug_enc.json").write_text(json.dumps([item]))
    jl = write_jsonl(root / "R2R_x_enc.jsonl", [{"instr_id": "3_0", "scan": "tinyscan", "path": ["a", "b"],
                                                 "heading": 0.0, "instr_encoding": [CLS_ID, SEP_ID]}])
    eps = load_annotation_files([str(jl), str(root / "R2R_aug_enc.json")], "r2r", Graphs(root))
    assert [e.instr_id for e in eps] == ["3_0", "9_0", "9_1"]
    assert eps[2].token_ids == [CLS_ID, 2000, SEP_ID] and eps[2].instruction == "stop at a"


def test_reverie_enc_jsonl_pos_vps_object_and_default_heading(tiny):
    """DUET's REVERIE lines: the goal set is ``pos_vps``, the target the 2nd field of ``instr_id``,
    ``heading`` optional (0).  The SAP labels use that goal set: STOP where the target is visible."""
    root, _ = tiny
    line = {"instr_id": "7_5_0", "scan": "tinyscan", "path": ["a", "b", "c", "d"], "pos_vps": ["c", "d"],
            "instr_encoding": [CLS_ID, 2000, 2001, SEP_ID], "instruction": "find the table"}
    path = write_jsonl(root / "REVERIE_train_enc.jsonl", [line, {**line, "instr_id": "7_5_1", "objId": 6}])
    eps = load_annotation_file(path, "reverie", Graphs(root))
    assert eps[0].obj_id == 5 and eps[1].obj_id == 6 and eps[0].heading == 0.0
    assert eps[0].goal_vps == ("c", "d")
    cfg = PretrainConfig(task="reverie", train_files=[str(path)], val_splits=[])
    train, val = build_datasets(cfg, root, SyntheticFeatures(dim=16, num_classes=10), with_classes=False)
    assert val == {} and train.num_episodes == 2
    at_c = train.state(0, 2)  # the path passes c, from which the target is visible: STOP there
    assert at_c.global_label == 0 and at_c.next_vp is None
    at_b = train.state(0, 1)
    assert at_b.next_vp == "c"


def test_extra_connectivity_folder_holds_generated_houses(tiny):
    """ScaleVLN's HM3D/Gibson houses come as ``<scan>_connectivity.json`` in their own folder."""
    root, hm3d = tiny
    path = write_jsonl(root / "R2R_hm3d_aug_envdrop_generated_enc.jsonl", hm3d_lines(2))
    with pytest.raises(DataError) as err:
        load_annotation_file(path, "r2r", Graphs(root))
    msg = str(err.value)
    assert f"{path}:1:" in msg and HM3D_SCAN in msg and "connectivity_dirs" in msg
    graphs = Graphs(root, [hm3d])
    eps = load_annotation_file(path, "r2r", graphs)
    assert [e.scan for e in eps] == [HM3D_SCAN] * 2
    house = graphs[HM3D_SCAN]
    assert house.is_neighbor("000001", "000004") and not house.is_neighbor("000000", "000002")
    assert house.visible.tolist() == house.adjacency.tolist()  # no ``visible`` in the file: the edges
    assert graphs["tinyscan"].scan == "tinyscan"  # the data directory's own houses still first
    with pytest.raises(DataError, match="does not exist"):
        Graphs(root, [root / "nowhere"])


# ----------------------------------------------------------------------------------- bad files

GOOD = {"instr_id": "7_0", "scan": "tinyscan", "path": ["a", "b", "c"], "heading": 1.0,
        "instr_encoding": [CLS_ID, 2000, SEP_ID]}
GOOD_REVERIE = {**GOOD, "instr_id": "7_5_0", "pos_vps": ["c"]}

BAD_LINES = {
    "bad_json": ('{"instr_id": "7_1", "scan": ', "not valid JSON"),
    "not_an_object": ("[1, 2]", "expected a JSON object, got list"),
    "missing_encoding": ({k: v for k, v in GOOD.items() if k != "instr_encoding"},
                         "missing field 'instr_encoding'"),
    "missing_heading": ({k: v for k, v in GOOD.items() if k != "heading"}, "missing field 'heading'"),
    "heading_text": ({**GOOD, "heading": "east"}, "field 'heading' must be a number"),
    "path_not_list": ({**GOOD, "path": "a b c"}, "field 'path' must be a non-empty list"),
    "empty_encoding": ({**GOOD, "instr_encoding": []}, "non-empty list of token ids"),
    "float_id": ({**GOOD, "instr_encoding": [101, 2000.5, 102]}, "integer token ids"),
    "id_too_large": ({**GOOD, "instr_encoding": [101, BERT_VOCAB_SIZE, 102]},
                     f"token id {BERT_VOCAB_SIZE}, outside the tokenizer's vocabulary (0..{BERT_VOCAB_SIZE - 1})"),
    "negative_id": ({**GOOD, "instr_encoding": [101, -1, 102]}, "token id -1, outside"),
    "unknown_scan": ({**GOOD, "scan": "nosuchscan"}, "scan 'nosuchscan' has no connectivity file"),
    "not_an_edge": ({**GOOD, "path": ["a", "c", "d"]}, "path step 1 ('a' -> 'c') is not an edge"),
    "repeat_is_no_edge": ({**GOOD, "path": ["a", "a", "b"]}, "path step 1 ('a' -> 'a') is not an edge"),
    "not_included": ({**GOOD, "path": ["e", "f"]}, "path[1] = 'f' is not an included viewpoint"),
}
BAD_REVERIE = {
    "goal_outside": ({**GOOD_REVERIE, "pos_vps": ["c", "zz"]}, "pos_vps viewpoint 'zz' is not an included"),
    "missing_pos_vps": ({k: v for k, v in GOOD_REVERIE.items() if k != "pos_vps"}, "missing field 'pos_vps'"),
    "no_object": ({**GOOD_REVERIE, "instr_id": "7_0"}, "no target object"),
    "object_not_int": ({**GOOD_REVERIE, "instr_id": "7_x_0"}, "object id in instr_id '7_x_0'"),
}


@pytest.mark.parametrize("task,case", [("r2r", c) for c in BAD_LINES] + [("reverie", c) for c in BAD_REVERIE])
def test_a_bad_line_is_one_error_naming_file_and_line(tiny, tmp_path, task, case):
    root, _ = tiny
    bad, needle = (BAD_LINES if task == "r2r" else BAD_REVERIE)[case]
    good = GOOD if task == "r2r" else GOOD_REVERIE
    path = write_jsonl(tmp_path / "bad_enc.jsonl", [good, "", bad, good])  # the bad one is on line 3
    with pytest.raises(DataError) as err:
        load_annotation_file(path, task, Graphs(root))
    msg = str(err.value)
    assert msg.startswith(f"{path}:3: ") and needle in msg, msg
    assert "\n" not in msg


def test_bad_json_items_name_the_item(tiny, tmp_path):
    root, _ = tiny
    item = {"path_id": 9, "scan": "tinyscan", "path": ["e", "b"], "heading": 0.0, "instructions": ["x"]}
    cases = [({**item, "instr_encodings": [[101, 99999, 102]]}, "item 1: field 'instr_encodings[0]' holds token id 99999"),
             ({**item, "instr_encodings": [[101], [102]]}, "item 1: 'instr_encodings' must be a list with one id"),
             ({**item, "path": ["e", "d"]}, "item 1: path step 1 ('e' -> 'd') is not an edge"),
             ({k: v for k, v in item.items() if k != "scan"}, "item 1 is malformed (KeyError('scan'))")]
    for bad, needle in cases:
        path = tmp_path / "bad_enc.json"
        path.write_text(json.dumps([item, bad]))
        with pytest.raises(DataError) as err:
            load_annotation_file(path, "r2r", Graphs(root))
        assert str(err.value).startswith(f"{path}: ") and needle in str(err.value), str(err.value)
    path.write_text('[{"path_id": 1,\n "scan": }]')
    with pytest.raises(DataError, match=r"bad_enc.json:2: not valid JSON"):
        load_annotation_file(path, "r2r", Graphs(root))
    with pytest.raises(DataError, match="does not exist"):
        load_annotation_file(tmp_path / "absent.jsonl", "r2r", Graphs(root))
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(DataError, match=r"expected a \.jsonl"):
        load_annotation_file(tmp_path / "x.txt", "r2r", Graphs(root))


# ----------------------------------------------------------------------------------- the command


def _pretrain_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["pretrain", "--out", str(out), "model=duet-cpu", f"model_overrides={json.dumps(SMALL_DUET)}",
            f"data_dir={data}", "features=synthetic", "batch_size=2", "val_batches=1", "max_instr_len=40",
            "num_threads=1", "train.max_steps=2", "train.log_every=1", "train.progress=false", *extra]


def test_pretrain_on_enc_jsonl_plus_augmented_pairs(small_toy, tmp_path, capsys):
    """``minivln pretrain`` on DUET-format files: the toy world's train split as ``R2R_train_enc.jsonl``
    plus augmented pairs in an HM3D-style house from another connectivity folder, validated on an
    ``_enc.jsonl`` val file; 2 steps."""
    data, _ = small_toy
    items = json.loads((data / "R2R" / "R2R_train.json").read_text())
    train = write_jsonl(tmp_path / "R2R_train_enc.jsonl", r2r_lines(items))
    aug = write_jsonl(tmp_path / "R2R_hm3d_aug_envdrop_generated_enc.jsonl", hm3d_lines(4))
    val_items = json.loads((data / "R2R" / "R2R_val_unseen.json").read_text())
    val = write_jsonl(tmp_path / "R2R_val_unseen_enc.jsonl", r2r_lines(val_items, with_text=False))
    hm3d = write_hm3d_house(tmp_path / "hm3d_connectivity")
    code, out, err = run_cli(_pretrain_args(
        data, tmp_path / "run", f"train_files=[{train}]", f"aug_files=[{aug}]", f"connectivity_dirs=[{hm3d}]",
        "val_splits=[]", f"val_files={{unseen_enc: [{val}]}}"), capsys)
    assert code == 0, err
    n_train = sum(len(i["instructions"]) for i in items)
    assert f"pretraining on {n_train} instructions + 4 augmented ones (aug_files)" in out
    assert "unseen_enc.sap_fused_acc" in out
    assert (tmp_path / "run" / "pretrained").is_dir()


def test_pretrain_with_a_bad_file_is_one_error_line(small_toy, tmp_path, capsys):
    data, _ = small_toy
    aug = write_jsonl(tmp_path / "aug_enc.jsonl", hm3d_lines(2))  # its house's folder is not given
    code, _, err = run_cli(_pretrain_args(data, tmp_path / "run", f"aug_files=[{aug}]"), capsys)
    assert code == 2
    one_error_line(err, f"{aug}:1:", f"scan '{HM3D_SCAN}' has no connectivity file", "connectivity_dirs")
    code, _, err = run_cli(_pretrain_args(data, tmp_path / "run2", "val_files={val_seen: [x.jsonl]}"), capsys)
    assert code == 2
    one_error_line(err, "val_files", "val_seen")


# ----------------------------------------------------------------------------------- real houses


@pytest.mark.realdata
def test_real_r2r_and_reverie_lines_on_real_connectivity(real_data_dir, tmp_path):
    from minivln.data.reverie import ReverieGoals

    graphs = Graphs(real_data_dir)
    items = json.loads((real_data_dir / "R2R" / "R2R_val_seen.json").read_text())[:3]
    eps = load_annotation_file(write_jsonl(tmp_path / "R2R_val_seen_enc.jsonl", r2r_lines(items)), "r2r", graphs)
    assert len(eps) == sum(len(i["instructions"]) for i in items)
    rev = load_episodes("reverie", "val_seen", real_data_dir)[:4]
    goals = ReverieGoals(real_data_dir, graphs)
    tok = get_tokenizer()
    rows = [{"instr_id": e.instr_id, "scan": e.scan, "path": list(e.path), "heading": e.heading,
             "pos_vps": sorted(goals.episode_goals(e)), "instr_encoding": tok.encode(e.instruction)} for e in rev]
    got = load_annotation_file(write_jsonl(tmp_path / "REVERIE_val_seen_enc.jsonl", rows), "reverie", graphs)
    assert [(g.obj_id, g.path) for g in got] == [(e.obj_id, e.path) for e in rev]
    assert all(set(g.goal_vps) == goals.episode_goals(e) for g, e in zip(got, rev))
    swapped = dict(rows[0], path=[rows[0]["path"][0], rows[0]["path"][-1]])  # a jump, not an edge
    assert not graphs[swapped["scan"]].is_neighbor(*swapped["path"])
    with pytest.raises(DataError, match=r"REVERIE_bad_enc.jsonl:2: path step 1 .* is not an edge"):
        load_annotation_file(write_jsonl(tmp_path / "REVERIE_bad_enc.jsonl", [rows[1], swapped]),
                             "reverie", graphs)


def test_episode_ids_are_compact_and_hashable():
    ep = Episode("1_0", "r2r", "s", 1, ("a",), 0.0, "", encoded=b"\x65\x00\x00\x00\x66\x00\x00\x00")
    assert ep.token_ids == [101, 102] and hash(ep) == hash(ep)


# ----------------------------------------------------------------------------------- fine-tuning


def _finetune_args(data: Path, feats: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--out", str(out), "model=duet-cpu", f"model_overrides={json.dumps(SMALL_DUET)}",
            f"data_dir={data}", f"features={feats}", "batch_size=2", "val_batch_size=8", "max_action_len=6",
            "max_instr_len=40", "num_threads=1", "val_splits=[val_unseen]", "train.val_every=0",
            "train.log_every=1", "train.progress=false", *extra]


def test_finetune_alternates_training_and_augmented_iterations(small_toy, tmp_path, capsys):
    """``minivln finetune aug_files=[...] aug_times=2`` (ScaleVLN's --aug, --aug_times): iterations 0, 3,
    6, ... draw from the training split, the others from the augmented pairs, which live in an HM3D-style
    house of another connectivity folder and come with token ids only (their ids are what the agent
    encodes, not their text); 3 iterations, then resumed to 4."""
    data, _ = small_toy
    # a text that is not what the ids say: the ids are what the agent must encode
    aug = write_jsonl(tmp_path / "R2R_hm3d_aug_envdrop_generated_enc.jsonl",
                      [{**line, "instruction": "turn left"} for line in hm3d_lines(4)])
    hm3d = write_hm3d_house(tmp_path / "hm3d_connectivity")
    feats = write_view_features(tmp_path / "feats_hm3d.h5", data, SMALL_TOY_DIM, [hm3d])  # every house, one file
    extra = (f"aug_files=[{aug}]", "aug_times=2", f"connectivity_dirs=[{hm3d}]")
    run = tmp_path / "run"
    code, out, err = run_cli(_finetune_args(data, feats, run, "train.max_steps=3", *extra), capsys)
    assert code == 0, err
    assert "and 4 augmented ones (aug_files), 2 augmented iteration(s) after each one on train" in out
    with pytest.warns(UserWarning, match="max_steps differ"):  # resumed to a longer run, as said
        code, _, err = run_cli(["finetune", "--resume", *_finetune_args(data, feats, run, "train.max_steps=4",
                                                                         *extra)[1:]], capsys)
    assert code == 0, err

    cfg = load_config_for_test(_finetune_args(data, feats, tmp_path / "probe", *extra))
    res = prepare_data(cfg, tmp_path / "probe", SMALL_TOY_DIM)
    task = make_task(cfg, build_model(cfg), res)
    sources = [task.source(i) for i in range(7)]
    assert sources == [task.env, task.aug_env, task.aug_env, task.env, task.aug_env, task.aug_env, task.env]
    drawn = task.next_batch(1)["sample"]
    assert {ep.scan for ep in drawn} == {HM3D_SCAN} and all(ep.instruction == "turn left" for ep in drawn)
    txt_ids, _ = task.agent.encode_instructions([ep.text for ep in drawn], torch.device("cpu"),
                                                [ep.token_ids for ep in drawn])
    for row, ep in zip(txt_ids.tolist(), drawn):
        assert row[: len(ep.token_ids)] == ep.token_ids and len(ep.token_ids) > 5  # not "turn left"
    assert {ep.scan for ep in task.next_batch(0)["sample"]} != {HM3D_SCAN}
    assert isinstance(cfg, FinetuneConfig) and task.state_dict()["aug_env"]


def load_config_for_test(args: list[str]) -> FinetuneConfig:
    overrides = [a for a in args[3:] if "=" in a and not a.startswith("--")]
    return load_config(FinetuneConfig, None, overrides + [f"train.run_dir={args[2]}"])


def test_finetune_with_bad_augmented_files_is_one_error_line(small_toy, tmp_path, capsys):
    data, feats = small_toy
    aug = write_jsonl(tmp_path / "aug_enc.jsonl", hm3d_lines(2))  # its house's folder is not given
    code, _, err = run_cli(_finetune_args(data, feats, tmp_path / "r1", f"aug_files=[{aug}]"), capsys)
    assert code == 2
    one_error_line(err, f"{aug}:1:", f"scan '{HM3D_SCAN}' has no connectivity file", "connectivity_dirs")
    hm3d = write_hm3d_house(tmp_path / "hm3d_connectivity")  # now the house is known but has no features
    code, _, err = run_cli(_finetune_args(data, feats, tmp_path / "r2", f"aug_files=[{aug}]",
                                          f"connectivity_dirs=[{hm3d}]"), capsys)
    assert code == 2
    one_error_line(err, "the augmented pairs (aug_files)", HM3D_SCAN)
    code, _, err = run_cli(_finetune_args(data, feats, tmp_path / "r3", "task=reverie", f"aug_files=[{aug}]"),
                           capsys)
    assert code == 2
    one_error_line(err, "aug_files", "R2R")
    code, _, err = run_cli(_finetune_args(data, feats, tmp_path / "r4", "aug_times=0"), capsys)
    assert code == 2
    one_error_line(err, "aug_times")
