"""Pretraining: prefix states on the true graph, masking, losses, tied MLM decoder, export."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from tinyworld import write_tiny_data

from minivln.data.datasets import load_episodes
from minivln.data.graph import Graphs
from minivln.data.tokenizer import CLS_ID, MASK_ID, SEP_ID
from minivln.model.checkpoint import load_pretrained, load_weights, save_pretrained
from minivln.model.config import DUETConfig
from minivln.model.duet import COMPILED_LAYERS, DUET, compile_layers
from minivln.model.pretrain_heads import DUETPretrainer
from minivln.training import trainer
from minivln.training.pretrain import (
    PretrainConfig,
    PretrainTask,
    compute_task,
    run_pretraining,
)
from minivln.training.pretrain_data import (
    MLM_RANDOM_HIGH,
    MLM_RANDOM_LOW,
    PrefixDataset,
    SyntheticFeatures,
    collate_states,
    mask_tokens,
)

TINY = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_l_layers=1,
            num_pano_layers=1, num_x_layers=2, image_feat_size=16, hidden_dropout=0.0,
            attention_dropout=0.0, feat_dropout=0.0)


def _tokenize(text: str) -> list[int]:  # no vocabulary needed: [CLS] word ids [SEP]
    return [CLS_ID] + [2000 + (sum(map(ord, w)) % 500) for w in text.split()] + [SEP_ID]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = write_tiny_data(tmp_path_factory.mktemp("tiny"))
    eps = load_episodes("r2r", "train", root)
    ds = PrefixDataset(eps, Graphs(root), SyntheticFeatures(dim=16, num_classes=10), _tokenize,
                       with_classes=True)
    return root, ds


def _pretrainer(seed: int = 0) -> DUETPretrainer:
    torch.manual_seed(seed)
    return DUETPretrainer(DUET(DUETConfig(**TINY)), num_classes=10)


def test_prefix_states_true_graph(tiny):
    _, ds = tiny
    assert len(ds) == 2 * 4  # two instructions, path a-b-c-d: four prefixes each
    s0, s1, s3 = ds[0], ds[1], ds[3]
    # t=0 at a: ghost b; label = next GT node b
    assert s0.gmap_vpids == [None, "a", "b"] and s0.next_vp == "b"
    assert s0.gmap_vpids[s0.global_label] == "b"
    assert [None] + [c.viewpoint for c in s0.obs[-1].candidates] == [None, "b"] and s0.local_label == 1
    # t=1 at b: every neighbour of a visited node is a ghost (c and e), in first-sighting order
    assert s1.gmap_vpids == [None, "a", "b", "c", "e"]
    assert s1.gmap_visited == [False, True, True, False, False]
    assert s1.gmap_step_ids == [0, 1, 2, 0, 0]
    assert s1.gmap_vpids[s1.global_label] == "c"
    # true shortest distances (metres) and hop counts
    i_a, i_c, i_e = 1, 3, 4
    assert s1.gmap_pair_dists[i_a, i_c] == pytest.approx(4.0)
    assert s1.gmap_pair_dists[i_c, i_e] == pytest.approx(4.0)
    assert s1.gmap_pos_fts[i_c, 5] == pytest.approx(2.0 / 30)  # path distance from b
    assert s1.gmap_pos_fts[i_c, 6] == pytest.approx(1 / 10)  # hops
    assert s1.gmap_pos_fts[2, 4:].tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-8)  # current node
    # end of the path: STOP
    assert s3.next_vp is None and s3.global_label == 0 and s3.local_label == 0
    assert s3.gmap_vpids == [None, "a", "b", "c", "d", "e"]


def test_mlm_masking_statistics():
    rng = np.random.default_rng(0)
    ids = [CLS_ID] + list(range(3000, 3100)) + [SEP_ID]
    chosen = masked = rand = kept = 0
    for _ in range(300):
        out, lab = mask_tokens(ids, rng)
        assert lab[0] == -100 and lab[-1] == -100  # [CLS]/[SEP] never chosen
        for o, x, la in zip(out, ids, lab):
            if la == -100:
                assert o == x
                continue
            chosen += 1
            assert la == x
            if o == MASK_ID:
                masked += 1
            elif o == x:
                kept += 1
            else:
                rand += 1
                assert MLM_RANDOM_LOW <= o <= MLM_RANDOM_HIGH
    assert chosen / (300 * 100) == pytest.approx(0.15, abs=0.01)
    assert masked / chosen == pytest.approx(0.8, abs=0.03)
    assert rand / chosen == pytest.approx(0.1, abs=0.03) and kept / chosen == pytest.approx(0.1, abs=0.03)
    for seed in range(50):  # at least one token, even in short instructions
        _, lab = mask_tokens([CLS_ID, 2001, SEP_ID], np.random.default_rng(seed))
        assert sum(la != -100 for la in lab) >= 1


def test_mrc_masking(tiny):
    _, ds = tiny
    states = [ds.state(0, 3), ds.state(1, 3)]
    batch = collate_states(states, mrc_rng=np.random.default_rng(0))
    fts = batch["pano"]["view_img_fts"]
    for i, s in enumerate(states):
        cur = batch["node_index"][i][-1]
        rows = [r for r in batch["mrc_rows"][i].tolist() if r >= 0]
        assert len(rows) >= 1
        assert torch.all(fts[cur, rows] == 0)
        n_tok = int(batch["pano"]["view_lens"][cur])
        others = [r for r in range(n_tok) if r not in rows]
        assert torch.all(fts[cur, others].abs().sum(1) > 0)
        expect = s.view_classes[[s.token_views[r] for r in rows]]
        assert torch.allclose(batch["mrc_targets"][i, : len(rows)], torch.from_numpy(expect))
        # the other visited nodes keep their features
        assert torch.all(fts[batch["node_index"][i][0], :36].abs().sum(1) > 0)


def test_batches_deterministic_and_all_tasks_run(tiny):
    _, ds = tiny
    task = PretrainTask(ds, 2, {"mlm": 1, "sap": 1, "mrc": 1}, seed=3, rank=0, world_size=1)
    a, b = task.next_batch(5), task.next_batch(5)
    assert a["task"] == b["task"]
    assert torch.equal(a["txt_ids"], b["txt_ids"]) and torch.equal(a["global_labels"], b["global_labels"])
    assert {task.task_of(i) for i in range(30)} == {"mlm", "sap", "mrc"}
    model = _pretrainer()
    for name in ("mlm", "sap", "mrc"):
        loss, metrics = compute_task(model, task.make_batch(name, [0, 1], np.random.default_rng(0)))
        assert torch.isfinite(loss)
        loss.backward()


def test_sap_loss_decreases(tiny):
    _, ds = tiny
    model = _pretrainer()
    task = PretrainTask(ds, 2, {"sap": 1}, rank=0, world_size=1)
    batch = collate_states([ds.state(0, 0), ds.state(1, 1)])
    batch["task"] = "sap"
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        out = task.compute(model, batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < 0.7 * losses[0] and min(losses[5:]) < min(losses[:3])


def test_mlm_head_tied_and_lang_branch_reuses_cross_attention(tiny):
    _, ds = tiny
    model = _pretrainer()
    word = model.duet.embeddings.word_embeddings.weight
    assert model.mlm_head.decoder.weight is word
    names = [n for n, _ in model.named_parameters()]
    assert not any("mlm_head.decoder.weight" in n for n in names)  # shared, listed once (as duet's)
    assert not any(n.startswith(("global_lang", "local_lang")) and "visual_attention" in n for n in names)
    task = PretrainTask(ds, 2, {"mlm": 1}, rank=0, world_size=1)
    loss, _ = compute_task(model, task.make_batch("mlm", [0, 1], np.random.default_rng(1)))
    loss.backward()
    cross = model.duet.global_encoder.encoder.x_layers[-1].visual_attention.att.query.weight
    assert cross.grad is not None and cross.grad.abs().sum() > 0  # text -> visual reuses it
    assert model.global_lang.layers[-1].lang_self_att.self.query.weight.grad.abs().sum() > 0
    assert word.grad is not None and word.grad.abs().sum() > 0


def test_export_loads_into_navigation_model(tiny, tmp_path):
    _, ds = tiny
    model = _pretrainer()
    out = save_pretrained(model.duet, tmp_path / "pretrained")
    nav = load_pretrained(out)
    for k, v in model.duet.state_dict().items():
        assert torch.equal(nav.state_dict()[k], v)
    fresh = DUET(DUETConfig(**TINY))
    assert load_weights(fresh, out) in ("plain", "pretrain", "finetune")


def test_run_pretraining_end_to_end(tiny, tmp_path):
    root, _ = tiny
    cfg = PretrainConfig(
        model="minivln-cpu", model_overrides={k: v for k, v in TINY.items()}, data_dir=str(root),
        features="synthetic", batch_size=2, val_batches=1, max_instr_len=20,
    )
    cfg.train.run_dir = str(tmp_path / "run")
    cfg.train.max_steps = 3
    cfg.train.log_every = 1
    cfg.train.progress = False
    out = run_pretraining(cfg)
    assert {"val_unseen.sap_fused_acc", "val_seen.mlm_acc", "val_seen.mrc_acc"} <= set(out["val"])
    assert 0 < out["val"]["val_seen.mlm_majority_acc"] <= 1  # the collapse check's reference rate
    nav = load_pretrained(out["export"])
    assert nav.config.hidden_size == 32
    assert (tmp_path / "run" / "config.yaml").exists()


def test_resume_is_exact(tiny, tmp_path):
    root, _ = tiny

    def cfg_for(run: str, steps: int, resume: bool = False) -> PretrainConfig:
        cfg = PretrainConfig(model="minivln-cpu", model_overrides=dict(TINY), data_dir=str(root),
                             features="synthetic", batch_size=2, val_batches=0, max_instr_len=20)
        cfg.train.run_dir = str(tmp_path / run)
        cfg.train.max_steps, cfg.train.resume, cfg.train.progress = steps, resume, False
        cfg.train.optim.schedule = "constant"  # so that a 2-step run is the first half of a 4-step one
        return cfg

    straight = run_pretraining(cfg_for("a", 4))
    run_pretraining(cfg_for("b", 2))
    with pytest.warns(UserWarning, match="max_steps"):
        resumed = run_pretraining(cfg_for("b", 4, resume=True))
    a, b = load_pretrained(straight["export"]).state_dict(), load_pretrained(resumed["export"]).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gmap_image_embeddings_follow_the_definition_and_batches_grow_linearly(tiny):
    """Map node features of a pretraining batch: a visited node = the mean of its panorama's
    outputs, a ghost = the mean of the candidate-view outputs that showed it (revisits: the last
    panorama).  Checked against that definition directly; and no batch tensor grows faster than
    the batch (the former dense (B, G, sum V) matrix grew with its square)."""
    from minivln.model.agent_inputs import masked_mean
    from minivln.training.pretrain import encode_states

    _, ds = tiny
    states = [ds[i] for i in (1, 3, 4, 7, 2)]  # several prefixes, different map sizes
    batch = collate_states(states)
    duet = _pretrainer().duet.eval()
    with torch.no_grad():
        nav = encode_states(duet, batch)
        pano_embeds, pano_masks = duet("panorama", batch["pano"])
    got = nav["gmap_img_embeds"]
    for i, (s, idx) in enumerate(zip(states, batch["node_index"])):
        last = {ob.viewpoint: f for f, ob in zip(idx, s.obs)}
        for slot, vp in enumerate(s.gmap_vpids):
            if vp is None:
                want = torch.zeros(got.size(-1))
            elif vp in last:
                f = last[vp]
                want = masked_mean(pano_embeds[f:f + 1], pano_masks[f:f + 1])[0]
            else:
                rows = [pano_embeds[f, j] for f in idx for j, c in enumerate(batch["pano_cand_vpids"][f]) if c == vp]
                want = torch.stack(rows).mean(0)
            assert torch.allclose(got[i, slot], want, atol=1e-5), (i, slot, vp)
    assert got[1:].abs().sum() > 0  # the check is not vacuous

    def biggest(n: int) -> int:
        b = collate_states([ds[i % len(ds)] for i in range(n)])
        return max(v.numel() for v in b.values() if isinstance(v, torch.Tensor))

    assert biggest(32) <= 2.5 * biggest(16)  # linear (dense matrix: 4x)


def test_worker_processes_build_the_same_batches(tiny):
    """num_workers > 0 builds batches ahead in other processes: the same batches, also after a jump
    (a resume restarts the workers at the asked index)."""
    _, ds = tiny
    mix = {"mlm": 1, "sap": 1, "mrc": 1}
    plain = PretrainTask(ds, 2, mix, seed=3, rank=0, world_size=1)
    ahead = PretrainTask(ds, 2, mix, seed=3, rank=0, world_size=1, num_workers=2, prefetch=2)
    for index in (0, 1, 2, 3, 7, 8):  # 3 -> 7: out of sequence
        a, b = plain.next_batch(index), ahead.next_batch(index)
        assert a["task"] == b["task"] and a.keys() == b.keys()
        for k, v in a.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, b[k]), (index, k)
        assert torch.equal(a["pano"]["view_img_fts"], b["pano"]["view_img_fts"])
    assert ahead.data_wait_s > 0
    workers = list(ahead._batches._workers)
    assert len(workers) == 2 and all(w.is_alive() for w in workers)
    ahead.close()  # the workers end now, not at the interpreter's exit (where they raised or hung)
    assert not any(w.is_alive() for w in workers) and ahead._batches is None
    ahead.close()  # again: nothing to do
    b = ahead.next_batch(9)  # new workers, the same batch
    assert torch.equal(plain.next_batch(9)["txt_ids"], b["txt_ids"])
    ahead.close()
    with pytest.raises(ValueError, match="num_workers"):
        PretrainTask(ds, 2, mix, num_workers=-1)


def test_compiled_layers_train_as_eager_layers(tiny):
    """``compile_layers`` (here with the ``aot_eager`` backend: the same graph capture and autograd
    as inductor, without code generation) keeps the state dict and gives the eager losses and
    gradients on every task; inference under the trainer's ``force_eager`` stance is unchanged."""
    _, ds = tiny
    model = _pretrainer()
    eager = copy.deepcopy(model)
    expected = sum(isinstance(m, COMPILED_LAYERS) for m in eager.modules())
    assert compile_layers(model, backend="aot_eager") == expected >= 5
    assert list(model.state_dict()) == list(eager.state_dict())
    task = PretrainTask(ds, 2, {"mlm": 1, "sap": 1, "mrc": 1}, seed=3, rank=0, world_size=1)
    for name in ("sap", "mrc", "mlm"):
        batch = task.make_batch(name, [0, 1], np.random.default_rng(0))
        losses = []
        for net in (model, eager):
            net.zero_grad()
            loss, _ = compute_task(net, batch)
            loss.backward()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
        for (k, a), b in zip(model.named_parameters(), eager.parameters()):
            assert (a.grad is None) == (b.grad is None), k
            if a.grad is not None:
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=k)
    batch = task.make_batch("sap", [0, 1], np.random.default_rng(1))
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        torch.testing.assert_close(compute_task(model, batch)[0], compute_task(eager, batch)[0])


def test_train_compile_runs_validation_eagerly_and_trains_as_without(tiny, tmp_path, monkeypatch):
    """``train.compile: true`` compiles the student's layers (``aot_eager`` here, see above) and
    trains to the same weights as without, validation included."""
    calls = []

    def compile_aot_eager(model):
        calls.append(compile_layers(model, backend="aot_eager"))
        return calls[-1]

    monkeypatch.setattr(trainer, "compile_layers", compile_aot_eager)
    root, _ = tiny
    exports = []
    for compiled in (True, False):
        cfg = PretrainConfig(model="minivln-cpu", model_overrides=dict(TINY), data_dir=str(root),
                             features="synthetic", batch_size=2, val_batches=1, max_instr_len=20)
        cfg.train.run_dir = str(tmp_path / f"run-{compiled}")
        cfg.train.max_steps, cfg.train.progress, cfg.train.compile = 3, False, compiled
        out = run_pretraining(cfg)
        assert out["val"]
        exports.append(load_pretrained(out["export"]).state_dict())
    assert calls and calls[0] >= 4
    for k, v in exports[1].items():
        torch.testing.assert_close(exports[0][k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_the_mlm_collapse_check_warns_at_the_second_validation_at_the_majority_rate():
    """A text encoder that predicts one word scores the share of the most frequent masked token; two
    validations in a row there give one warning, a validation above it starts the count again."""
    from collections import Counter

    from minivln.training.pretrain import mlm_collapse_check

    masked = Counter({2003: 21, 1996: 79})  # "the" is 79% of the masked tokens
    seen: dict[str, int] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert mlm_collapse_check("val_unseen", 0.79, masked, seen) == pytest.approx(0.79)
        assert not caught  # once may be early training
        assert seen["val_unseen"] == 1
        mlm_collapse_check("val_unseen", 0.90, masked, seen)  # learning: the count starts again
        assert seen["val_unseen"] == 0
        mlm_collapse_check("val_unseen", 0.792, masked, seen)
        mlm_collapse_check("val_unseen", 0.79, masked, seen)
        assert len(caught) == 1 and "collapsed" in str(caught[0].message) and "id 1996: 0.790" in str(caught[0].message)
        mlm_collapse_check("val_unseen", 0.79, masked, seen)
        assert len(caught) == 1  # once per collapse, not at every validation
