"""``minivln demo``: the released teacher (checksums, packing, unpacking), the reading of the order, and
the whole pipeline on a tiny budget (four training runs of two steps and three scorings: under a
minute on two idle cores)."""

from __future__ import annotations

import json

import pytest
import torch

from minivln import demo
from minivln.data.toyworld import ensure_toy_world
from minivln.experiment import Job, count_parameters
from minivln.model.checkpoint import load_agent_model, save_pretrained
from minivln.model.duet import DUET
from minivln.model.registry import get_config
from minivln.paths import DataError

TINY = [f"runs.{run}.overrides.train.max_steps=2" for run in ("student-pre", "student-pre-kd", "student", "student-kd")]
ROWS = [demo.EXPERT_ROW, demo.TEACHER_ROW, demo.KD_ROW, demo.ALONE_ROW, demo.RANDOM_ROW]


def test_the_released_teacher_matches_its_manifest(tmp_path):
    manifest = demo.unpack_teacher(tmp_path)
    assert manifest["world"] == demo.world_record()
    assert manifest["recipe"].endswith("demo-teacher.yaml") and manifest["commit"]
    total = 0
    for part in demo.TEACHER_PARTS:
        info = manifest["parts"][part]
        total += (demo.TEACHER_DIR / info["file"]).stat().st_size
        model = load_agent_model(tmp_path / part)
        assert model.config.hidden_size == info["config"]["hidden_size"] == 128
        # unpacked, the zero rows of the word-embedding table take no disk (the header says how to expand)
        assert (tmp_path / part / "model.safetensors").stat().st_size < 1.01 * info["bytes"]
        assert model.embeddings.word_embeddings.weight.shape[0] == info["config"]["vocab_size"]
        assert count_parameters(tmp_path / part / "model.safetensors") == sum(  # the table's count: whole
            v.numel() for v in model.state_dict().values())
    assert total < 15e6  # the package stays small
    teacher_pre, teacher = (load_agent_model(tmp_path / p).state_dict() for p in demo.TEACHER_PARTS)
    assert teacher_pre.keys() == teacher.keys()
    assert any(not torch.equal(teacher_pre[k], teacher[k]) for k in teacher)  # fine-tuned further


def test_packing_keeps_the_toy_vocabulary_and_unpacking_checks_the_sums(tmp_path):
    data_dir = ensure_toy_world(tmp_path / "world", seed=demo.DEMO_SEED, config=demo.DEMO_WORLD)
    torch.manual_seed(0)
    model = DUET(get_config("duet-cpu", hidden_size=32, num_attention_heads=2, intermediate_size=64,
                            num_l_layers=1, num_pano_layers=1, num_x_layers=1))
    save_pretrained(model, tmp_path / "m")
    manifest = demo.pack_teacher({"pretrained": tmp_path / "m", "model": tmp_path / "m"}, data_dir,
                                 tmp_path / "release", {"recipe": "test"})
    demo.unpack_teacher(tmp_path / "out", release=tmp_path / "release")
    back = load_agent_model(tmp_path / "out" / "model").state_dict()
    rows = torch.tensor(demo.vocab_rows(data_dir))
    assert 50 < len(rows) < 1000  # the toy world's word pieces and BERT's special tokens
    compact = manifest["parts"]["model"]["compact"]
    assert compact
    for key, value in model.state_dict().items():
        if key in compact:
            assert torch.equal(back[key][rows], value[rows].half().float())
            others = torch.ones(len(value), dtype=torch.bool)
            others[rows] = False
            assert not back[key][others].any()
        else:
            assert torch.equal(back[key], value.half().to(value.dtype) if value.is_floating_point() else value)
    damaged = tmp_path / "release" / "model.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 1
    damaged.write_bytes(bytes(data))
    with pytest.raises(DataError, match="sha256"):
        demo.unpack_teacher(tmp_path / "out2", release=tmp_path / "release")


def test_the_pruner_drops_what_no_run_still_to_come_needs(tmp_path):
    recipe = demo.demo_recipe(tmp_path, tmp_path / "toyworld", tmp_path / "features.hdf5")
    runs = tmp_path / "experiment" / "runs"
    for run in recipe.runs:
        (runs / run / "latest").mkdir(parents=True)
        (runs / run / ("pretrained" if run.endswith("-pre") or "-pre-" in run else "model")).mkdir()
    for part in demo.TEACHER_PARTS:
        (tmp_path / "teacher" / part).mkdir(parents=True)
    on_finished = demo.pruner(tmp_path, recipe)

    def left() -> set[str]:
        return {str(p.relative_to(tmp_path)) for p in tmp_path.glob("*/*") if p.parent.name == "teacher"} | {
            str(p.relative_to(runs)) for p in runs.glob("*/*")}

    start = left()
    on_finished(Job("score:student alone", [], []))
    assert left() == start
    on_finished(Job("train:student-pre", [], []))  # its weights wait for the student that starts from them
    assert left() == start - {"student-pre/latest"}
    on_finished(Job("train:student-pre-kd", [], []))  # stage 1 over: its teacher goes
    assert left() == start - {"student-pre/latest", "student-pre-kd/latest", "teacher/pretrained"}
    on_finished(Job("train:student", [], []))
    on_finished(Job("train:student-kd", [], []))
    assert left() == {"student/model", "student-kd/model", "teacher/model"}


def test_the_reading_says_when_the_order_does_not_hold():
    holds, text = demo.verdict(0.5, 0.4, 0.3, {"teacher - two-stage": (0.1, 0.02), "two-stage - alone": (0.1, 0.03)})
    assert holds and text.startswith("The order holds") and "under 2 s.e." not in text and "established" not in text
    holds, text = demo.verdict(0.6, 0.25, 0.22,
                               {"teacher - two-stage": (0.35, 0.03), "two-stage - alone": (0.03, 0.03)})
    assert holds and "+3.0 ± 3.0 (under 2 s.e.)" in text and "two-stage - alone) is not established" in text
    holds, text = demo.verdict(0.5, 0.3, 0.32, {"teacher - two-stage": (0.2, 0.03), "two-stage - alone": (-0.02, 0.03)})
    assert not holds and "does NOT hold" in text and "distillation did not beat the student alone" in text
    assert "-2.0 ± 3.0 (under 2 s.e.)" in text
    holds, text = demo.verdict(0.3, 0.35, 0.2, {})
    assert not holds and "the teacher is not ahead" in text


@pytest.mark.slow
def test_the_demo_pipeline_on_a_tiny_budget(tmp_path, capsys):
    out = tmp_path / "demo"
    res = demo.run_demo(out, jobs=2, deploy=False, overrides=TINY, progress=False)
    assert list(res["agents"]) == ROWS
    assert res["instructions"] >= 300
    for m in res["agents"].values():
        assert 0 <= m["sr"] <= 1 and m["sr_se"] >= 0 and m["spl_se"] >= 0
    assert res["agents"][demo.EXPERT_ROW]["sr"] == 1.0
    table = json.loads((out / "table.json").read_text())
    assert [r["name"] for r in table["rows"]] == ROWS[1:]
    assert all(r["episodes"] == res["instructions"] for r in table["rows"])
    for row in table["rows"][1:3]:  # both students trained the same steps
        assert row["steps"] == 2 and row["pretrain_steps"] == 2
    assert set(res["sr_gaps"]) == {"teacher - two-stage", "two-stage - alone"}
    assert res["order_holds"] == (table["rows"][0]["sr"] > table["rows"][1]["sr"] > table["rows"][2]["sr"])
    assert (out / "table_bars.svg").read_text().startswith("<svg") and not list(out.glob("*.png"))
    assert res["bytes_written"] < 100e6 and not list((out / "experiment" / "runs").glob("*/latest"))
    printed = capsys.readouterr().out
    assert res["reading"] in printed and "What this showed" in printed and "Next, on real data" in printed
    assert json.loads((out / "metrics.json").read_text())["reading"] == res["reading"]
    # --no-train: the same seeded random walker as the table's row, and the full metrics.json kept
    again = demo.run_demo(out, train=False, progress=False)["agents"][demo.RANDOM_ROW]
    assert {k: again[k] for k in res["agents"][demo.RANDOM_ROW]} == pytest.approx(res["agents"][demo.RANDOM_ROW])
    assert "reading" in json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_training_the_teacher_again_packs_a_release_the_demo_reads(tmp_path):
    tiny = [f"runs.{run}.overrides.train.max_steps=2" for run in ("teacher-pre", "teacher")]
    manifest = demo.train_teacher(tmp_path / "t", overrides=tiny, pin=False, progress=False)
    release = tmp_path / "t" / "release"
    assert sorted(p.name for p in release.iterdir()) == ["manifest.json", "model.safetensors", "pretrained.safetensors"]
    assert manifest["val_unseen_before_packing"]["episodes"] >= 300 and manifest["train_seconds"] > 0
    assert demo.unpack_teacher(tmp_path / "u", release=release) == manifest
    assert load_agent_model(tmp_path / "u" / "model").config.hidden_size == 128
