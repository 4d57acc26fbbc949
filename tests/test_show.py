"""``minivln show``: one episode drawn top-down, from a submission or by running a checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SMALL_DUET as SMALL

from minivln.cli import main as cli_main
from minivln.data.datasets import load_episodes
from minivln.model.checkpoint import save_pretrained
from minivln.model.registry import create_model
from minivln.paths import DataError
from minivln.show import episode_trajectory, show


def test_trajectory_of_an_instruction():
    preds = [{"instr_id": "1_0", "trajectory": [["a", 0, 0], ["a", 1, 0], ["b", 0, 0], ["c", 0, 0]]},
             {"instr_id": "1_1", "trajectory": [["x", 0, 0]]}]
    assert episode_trajectory(preds, "1_0") == ["a", "b", "c"]
    with pytest.raises(DataError, match="2_0"):
        episode_trajectory(preds, "2_0")


def test_show_from_a_submission_and_from_a_checkpoint(small_toy, tmp_path, capsys):
    data, feats = small_toy
    ep = load_episodes("r2r", "val_unseen", data)[0]
    sub = tmp_path / "sub.json"
    sub.write_text(json.dumps([{"instr_id": ep.instr_id, "trajectory": [[v, 0.0, 0.0] for v in ep.path]}]))
    out = show("r2r", "val_unseen", ep.instr_id, tmp_path / "a.png", preds=str(sub), data_dir=str(data))
    assert out.read_bytes()[:4] == b"\x89PNG"
    torch.manual_seed(0)
    ckpt = save_pretrained(create_model("duet-cpu", **SMALL), tmp_path / "model")
    assert cli_main(["show", "--checkpoint", str(ckpt), "--features", str(feats), "--data-dir", str(data),
                     "--instr-id", ep.instr_id, "--out", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    # bad input: one line, exit 2
    assert cli_main(["show", "--preds", str(sub), "--data-dir", str(data), "--instr-id", "nope_0",
                     "--out", str(tmp_path / "c.png")]) == 2
    assert "nope_0" in capsys.readouterr().err and not (tmp_path / "c.png").exists()
    assert cli_main(["show", "--data-dir", str(data), "--instr-id", ep.instr_id, "--out", str(tmp_path / "d.png")]) == 2
