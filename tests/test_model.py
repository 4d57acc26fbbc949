"""The DUET network against the recorded reference episode, plus taps, text cache and fusion."""

from __future__ import annotations

import json

import pytest
import torch

from minivln.model.config import DUETConfig
from minivln.model.duet import DUET, fuse_local_into_global, pack_views_objects
from minivln.model.fixture import (
    MASKED_ROWS,
    Fixture,
    compare_outputs,
    decode_ids,
    encode_ids,
    outputs_as_dict,
)
from minivln.model.registry import (
    create_model,
    get_config,
    list_models,
    preset_parameters,
)

CALLS = [f"call{i:02d}" for i in range(9)]



pytestmark = pytest.mark.usefixtures("one_thread")  # `fixture` comes from conftest.py


@pytest.fixture(scope="module")
def model(fixture) -> DUET:
    return fixture.build_model()


def _call(fixture: Fixture, name: str):
    return next(c for c in fixture.calls if c.name == name)


# ----------------------------------------------------------------------------- fixture decoding


def test_fixture_decoding(fixture):
    assert [c.name for c in fixture.calls] == CALLS
    assert [c.mode for c in fixture.calls] == ["language"] + ["panorama", "navigation"] * 4
    assert fixture.config.hidden_size == 64 and fixture.config.num_attention_heads == 4
    nav = _call(fixture, "call02")
    assert nav.inputs["gmap_vpids"] == [[None, 0, 1, 7, 2, 3], [None, 100, 102, 101, 103]]
    assert nav.inputs["vp_cand_vpids"][1] == [None, 102, 101, 103]
    assert "no_vp_left" not in nav.batch() and "gmap_vpids" in nav.batch()
    assert decode_ids(encode_ids(nav.inputs["gmap_vpids"], 6)) == nav.inputs["gmap_vpids"]


def test_state_dict_names_match_fixture(fixture):
    model = DUET(fixture.config)
    assert set(model.state_dict()) == set(fixture.state_dict)


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", CALLS)
def test_parity_with_reference(fixture, model, name):
    call = _call(fixture, name)
    with torch.no_grad():
        result = model(call.mode, call.batch())
    checks = compare_outputs(call, result, atol=1e-4)
    assert {c.name for c in checks} == set(call.outputs)
    bad = [c for c in checks if not c.ok]
    assert not bad, bad


def test_parity_with_cached_text_kv(fixture, model):
    txt_embeds = _call(fixture, "call02").inputs["txt_embeds"]
    txt_masks = _call(fixture, "call02").inputs["txt_masks"]
    with torch.no_grad():
        cache = model.precompute_text_kv(txt_embeds, txt_masks)
        for call in fixture.calls:
            if call.mode != "navigation":
                continue
            batch = call.batch()
            del batch["txt_embeds"], batch["txt_masks"]
            batch["txt_kv"] = cache
            checks = compare_outputs(call, model("navigation", batch))
            assert all(c.ok for c in checks), checks


# ----------------------------------------------------------------------------- taps


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    worst = 0.0
    for k, x in a.items():
        y = b[k]
        if x.dtype == torch.bool:
            assert torch.equal(x, y)
            continue
        assert torch.equal(torch.isinf(x), torch.isinf(y)), k
        fin = torch.isfinite(x)
        worst = max(worst, (x[fin] - y[fin]).abs().max().item())
    return worst


@pytest.mark.parametrize("name", CALLS)
def test_taps_path_equals_fast_path(fixture, model, name):
    call = _call(fixture, name)
    with torch.no_grad():
        fast = outputs_as_dict(call.mode, model(call.mode, call.batch()))
        out, taps = model(call.mode, call.batch(), taps=True)
    slow = outputs_as_dict(call.mode, out)
    # Compare everything, padded rows included: both paths compute them the same way.
    assert _max_diff(fast, slow) < 1e-5
    assert isinstance(taps, dict) and taps


def test_tap_contents(fixture, model):
    cfg = fixture.config
    heads = cfg.num_attention_heads
    lang = _call(fixture, "call00")
    with torch.no_grad():
        txt, taps = model("language", lang.batch(), taps=True)
    b, n_txt = lang.inputs["txt_ids"].shape
    assert taps["text.embeddings"].shape == (b, n_txt, cfg.hidden_size)
    assert len(taps["text.hidden_states"]) == cfg.num_l_layers
    assert torch.equal(taps["text.hidden_states"][-1], txt) and taps["text.output"] is txt
    scores = taps["text.attentions"]
    assert len(scores) == cfg.num_l_layers and scores[0].shape == (b, heads, n_txt, n_txt)
    # The additive mask is part of the tapped scores: padded keys sit near -10000.
    pad = ~lang.inputs["txt_masks"]
    assert pad.any()
    key_pad = pad[:, None, None, :].expand_as(scores[0])
    assert (scores[0][key_pad] < -9000).all() and (scores[0][~key_pad] > -9000).all()

    pano = _call(fixture, "call01")
    with torch.no_grad():
        (pano_embeds, _), taps = model("panorama", pano.batch(), taps=True)
    assert len(taps["pano.hidden_states"]) == cfg.num_pano_layers
    assert len(taps["pano.attentions"]) == cfg.num_pano_layers
    assert taps["pano.output"] is pano_embeds

    nav = _call(fixture, "call04")
    with torch.no_grad():
        outs, taps = model("navigation", nav.batch(), taps=True)
    g = nav.inputs["gmap_masks"].shape[1]
    v = nav.inputs["vp_masks"].shape[1]
    for prefix, length in (("global", g), ("local", v)):
        assert len(taps[f"{prefix}.hidden_states"]) == cfg.num_x_layers
        assert taps[f"{prefix}.attentions"][0].shape == (b, heads, length, length)
        assert taps[f"{prefix}.cross_attentions"][0].shape == (b, heads, length, n_txt)
        assert taps[f"{prefix}.embeddings"].shape == (b, length, cfg.hidden_size)
    assert torch.equal(taps["global.output"], outs["gmap_embeds"])
    probs = taps["action_probs"]
    assert torch.allclose(probs.sum(-1), torch.ones(b))
    assert (probs[torch.isinf(outs["fused_logits"])] == 0).all()


# ----------------------------------------------------------------------------- dropout, training


def test_eval_is_deterministic_and_train_uses_feat_dropout(fixture):
    model = fixture.build_model()
    call = _call(fixture, "call01")
    with torch.no_grad():
        a, _ = model("panorama", call.batch())
        b, _ = model("panorama", call.batch())
        assert torch.equal(a, b)
        model.train()
        torch.manual_seed(0)
        c, _ = model("panorama", call.batch())
    assert not torch.allclose(a, c)
    assert model.feat_dropout.p == pytest.approx(0.4)


def test_backward_through_all_modes(fixture):
    model = fixture.build_model().train()
    lang, pano, nav = (_call(fixture, n) for n in ("call00", "call01", "call02"))
    txt = model("language", lang.batch())
    pano_embeds, _ = model("panorama", pano.batch())
    batch = nav.batch()
    batch["txt_embeds"] = txt
    batch["vp_img_embeds"] = torch.cat(
        [torch.zeros_like(pano_embeds[:, :1]), pano_embeds], dim=1
    )[:, : batch["vp_masks"].shape[1]]
    out = model("navigation", batch)
    loss = torch.nn.functional.cross_entropy(out["fused_logits"], torch.tensor([2, 3]))
    loss.backward()
    assert model.embeddings.word_embeddings.weight.grad is not None
    assert model.img_embeddings.img_linear.weight.grad is not None
    assert model.global_encoder.sprel_linear.weight.grad is not None


# ----------------------------------------------------------------------------- fusion


def test_fusion_spreads_go_back_score_to_non_adjacent_ghosts():
    # slots: [stop], visited A, visited B, ghost C (candidate), ghost D (not adjacent), padding
    gmap_vpids = [[None, "A", "B", "C", "D"]]
    visited = torch.tensor([[False, True, True, False, False, False]])
    inf = float("-inf")
    global_logits = torch.tensor([[1.0, inf, inf, 2.0, 3.0, inf]])
    # local rows: [stop], cand C, cand A (visited), cand B (visited), a non-candidate view
    local_logits = torch.tensor([[0.5, 0.25, 0.125, 0.0625, inf]])
    vp_cand_vpids = [[None, "C", "A", "B"]]
    fused = fuse_local_into_global(global_logits, local_logits, gmap_vpids, visited, vp_cand_vpids)
    bw = 0.125 + 0.0625
    expected = torch.tensor([[1.5, inf, inf, 2.25, 3.0 + bw, inf]])
    assert torch.equal(fused, expected)


# ----------------------------------------------------------------------------- objects


@pytest.mark.parametrize("obj_size", [16, 24])
def test_objects_packing_and_grounding(obj_size):
    torch.manual_seed(0)
    cfg = DUETConfig(
        vocab_size=50, hidden_size=32, num_attention_heads=4, intermediate_size=64,
        num_l_layers=1, num_pano_layers=1, num_x_layers=1, image_feat_size=16, obj_feat_size=obj_size,
    )  # fmt: skip
    model = DUET(cfg).eval()
    assert (model.img_embeddings.obj_linear is not None) == (obj_size != 16)
    assert model.og_head is not None
    view_lens, obj_lens = torch.tensor([3, 2]), torch.tensor([1, 2])
    n = int((view_lens + obj_lens).max())
    views, objs = torch.randn(2, 3, 16), torch.randn(2, 2, obj_size)
    loc = torch.randn(2, n, 7)
    nav_types = torch.tensor([[1, 0, 0, 2], [1, 1, 2, 2]])
    batch = dict(view_img_fts=views, obj_img_fts=objs, loc_fts=loc, nav_types=nav_types,
                 view_lens=view_lens, obj_lens=obj_lens)  # fmt: skip
    with torch.no_grad():
        pano, masks = model("panorama", batch)
        # Sample 1 alone, without padding, must give the same valid rows.
        single = {k: v[1:] for k, v in batch.items()}
        single["view_img_fts"] = views[1:, :2]
        pano1, _ = model("panorama", single)
    assert masks.tolist() == [[True] * 4, [True] * 4]
    assert torch.allclose(pano[1], pano1[0], atol=1e-5)

    vp_masks = torch.ones(2, 1 + n, dtype=torch.bool)
    vp_obj_masks = torch.cat([torch.zeros(2, 1, dtype=torch.bool), nav_types == 2], dim=1)
    nav = dict(
        txt_embeds=torch.randn(2, 5, 32), txt_masks=torch.ones(2, 5, dtype=torch.bool),
        gmap_img_embeds=torch.randn(2, 3, 32), gmap_step_ids=torch.tensor([[0, 1, 0]] * 2),
        gmap_pos_fts=torch.randn(2, 3, 7), gmap_masks=torch.ones(2, 3, dtype=torch.bool),
        gmap_pair_dists=torch.rand(2, 3, 3), gmap_visited_masks=torch.tensor([[False, True, False]] * 2),
        gmap_vpids=[[None, 1, 2]] * 2,
        vp_img_embeds=torch.cat([torch.zeros(2, 1, 32), pano], 1), vp_pos_fts=torch.randn(2, 1 + n, 14),
        vp_masks=vp_masks, vp_nav_masks=torch.cat([torch.ones(2, 1, dtype=torch.bool), nav_types == 1], 1),
        vp_obj_masks=vp_obj_masks, vp_cand_vpids=[[None, 2], [None, 2, 1]],
    )  # fmt: skip
    with torch.no_grad():
        out = model("navigation", nav)
    assert torch.isinf(out["obj_logits"][~vp_obj_masks]).all()
    assert torch.isfinite(out["obj_logits"][vp_obj_masks]).all()


def _og_batch(hidden: int = 32):
    """A navigation batch of two samples with object rows 2-3 (sample 0) and 3 (sample 1)."""
    torch.manual_seed(1)
    m = 5
    vp_obj_masks = torch.tensor([[False, False, True, True, False], [False, False, False, True, False]])
    return dict(
        txt_embeds=torch.randn(2, 6, hidden), txt_masks=torch.tensor([[True] * 6, [True] * 4 + [False] * 2]),
        gmap_img_embeds=torch.randn(2, 3, hidden), gmap_step_ids=torch.tensor([[0, 1, 0]] * 2),
        gmap_pos_fts=torch.randn(2, 3, 7), gmap_masks=torch.ones(2, 3, dtype=torch.bool),
        gmap_pair_dists=torch.rand(2, 3, 3), gmap_visited_masks=torch.tensor([[False, True, False]] * 2),
        gmap_vpids=[[None, 1, 2]] * 2,
        vp_img_embeds=torch.randn(2, m, hidden), vp_pos_fts=torch.randn(2, m, 14),
        vp_masks=torch.ones(2, m, dtype=torch.bool),
        vp_nav_masks=torch.tensor([[True, True, False, False, False], [True, False, True, False, False]]),
        vp_obj_masks=vp_obj_masks, vp_cand_vpids=[[None, 2], [None, 2]],
    )  # fmt: skip


def test_og_text_encoder_starts_as_duet_and_learns_the_match():
    """og_text_encoder: zero at init (the outputs are the plain model's), the term is each object
    token's dot product with og_text_proj(instr_embeds), cached or not, and it gets gradients; a
    batch without instr_embeds is one clear error."""
    cfg = DUETConfig(vocab_size=50, hidden_size=32, num_attention_heads=4, intermediate_size=64, num_l_layers=1,
                     num_pano_layers=1, num_x_layers=1, image_feat_size=16, obj_feat_size=16)
    torch.manual_seed(0)
    plain = DUET(cfg).eval()
    match = DUET(cfg.replace(og_text_encoder="minilm")).eval()
    assert match.og_text_proj.in_features == 384 and torch.count_nonzero(match.og_text_proj.weight) == 0
    match.load_state_dict({**plain.state_dict(), **{k: v for k, v in match.state_dict().items()
                                                    if k.startswith("og_text_")}})
    batch = {**_og_batch(), "instr_embeds": torch.randn(2, 384)}
    with torch.no_grad():
        a, b = plain("navigation", batch), match("navigation", batch)
    for key in ("fused_logits", "obj_logits"):
        assert torch.equal(a[key], b[key]), key
    with torch.no_grad():  # a non-zero map: exactly the dot product
        match.og_text_proj.weight.normal_()
        match.og_text_proj.bias.normal_()
        b = match("navigation", batch)
        term = (batch["vp_img_embeds"] * match.og_text_proj(batch["instr_embeds"])[:, None]).sum(-1)
    sel = batch["vp_obj_masks"]
    assert torch.allclose(b["obj_logits"][sel], (a["obj_logits"] + term)[sel], atol=1e-4)
    assert torch.isinf(b["obj_logits"][~sel]).all() and torch.equal(a["fused_logits"], b["fused_logits"])
    kv = match.precompute_text_kv(batch["txt_embeds"], batch["txt_masks"], batch["instr_embeds"])
    with torch.no_grad():
        cached = match("navigation", {**batch, "txt_kv": kv})
    assert torch.allclose(cached["obj_logits"][sel], b["obj_logits"][sel], atol=1e-5)
    with pytest.raises(ValueError, match="instr_embeds"):
        match("navigation", {k: v for k, v in batch.items() if k != "instr_embeds"})
    # from zero, the OG loss moves og_text_proj (no saddle: the object rows are not small)
    fresh = DUET(cfg.replace(og_text_encoder="minilm")).train()
    out = fresh("navigation", batch)
    torch.nn.functional.cross_entropy(out["obj_logits"], torch.tensor([3, 3])).backward()
    assert fresh.og_text_proj.weight.grad.abs().sum() > 0


def test_og_text_encoder_needs_objects_and_is_read_off_a_checkpoint():
    from minivln.model.checkpoint import infer_config

    with pytest.raises(ValueError, match="og_text_encoder needs object inputs"):
        DUETConfig(og_text_encoder="minilm")
    with pytest.raises(ValueError, match="og_text_encoder must be"):
        DUETConfig(obj_feat_size=768, og_text_encoder="clip")
    small = dict(vocab_size=50, hidden_size=32, num_attention_heads=4, intermediate_size=64, num_l_layers=1,
                 num_pano_layers=1, num_x_layers=1, image_feat_size=16, obj_feat_size=16)
    for name in ("", "minilm"):
        sd = DUET(DUETConfig(**small, og_text_encoder=name)).state_dict()
        assert infer_config(sd, num_attention_heads=4).og_text_encoder == name


def test_pack_views_objects_equals_the_per_sample_loop():
    """The tensor-only packing against the per-sample slicing it replaced: values and gradients, with
    samples without objects, a batch without any object and a sample that fills all n rows."""
    torch.manual_seed(0)

    def loop(v, o, vl, ol, n):
        rows = [torch.cat([v[b, :vl[b]], o[b, :ol[b]]]) for b in range(v.size(0))]
        return torch.stack([torch.nn.functional.pad(r, (0, 0, 0, n - r.size(0))) for r in rows])

    for vl, ol, n_obj in (([3, 1, 2], [2, 0, 4], 4), ([2, 3, 1], [0, 0, 0], 0), ([3], [4], 4)):
        vl, ol = torch.tensor(vl), torch.tensor(ol)
        n = int((vl + ol).max())
        views = torch.randn(len(vl), 3, 8, requires_grad=True)
        objs = torch.randn(len(vl), n_obj, 8, requires_grad=True)
        got, want = pack_views_objects(views, objs, vl, ol, n), loop(views, objs, vl.tolist(), ol.tolist(), n)
        assert torch.equal(got, want)
        w = torch.randn_like(got)
        g1 = torch.autograd.grad((got * w).sum(), (views, objs), allow_unused=True)
        g2 = torch.autograd.grad((want * w).sum(), (views, objs), allow_unused=True)
        for a, b in zip(g1, g2):
            assert torch.equal(a if a is not None else torch.zeros_like(b), b if b is not None else torch.zeros_like(a))


# ----------------------------------------------------------------------------- registry


def test_registry_presets():
    names = list_models()
    for expected in ("duet-r2r", "duet-reverie", "scalevln-r2r", "minivln-r2r", "minivln-reverie",
                     "duet-cpu", "minivln-cpu"):  # fmt: skip
        assert expected in names
    student = preset_parameters("minivln-r2r")["total"]
    assert student == 21_064_925
    assert abs(student / 180_489_221 - 0.117) < 0.001
    assert get_config("minivln-r2r", hidden_dropout=0.0).hidden_dropout == 0.0
    with pytest.raises(KeyError, match="available: duet-r2r"):
        create_model("no-such-model")
    small = create_model("minivln-cpu")
    assert isinstance(small, DUET) and small.config.hidden_size == 128


def test_params_cli(capsys):
    from minivln.cli import main

    assert main(["params", "minivln-r2r", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["total"] == 21_064_925 and sum(out["parts"].values()) == out["total"]
    assert main(["params", "bogus"]) == 2
    err = capsys.readouterr().err
    assert "unknown model preset 'bogus'" in err and "minivln-r2r" in err


def test_masked_rows_cover_embedding_outputs():
    assert set(MASKED_ROWS) == {"txt_embeds", "pano_embeds", "gmap_embeds", "vp_embeds"}


def test_fused_attention_on_a_gpu_leaves_out_cudnn():
    """cuDNN's fused attention re-plans for every new sequence length (ours change each batch and
    step): it cost 0.4-0.5 s per bf16 pretraining step on an H200 (docs/results.md, "On a GPU")."""
    import minivln.model.duet as D

    if D.CUDA_SDPA_BACKENDS is None:
        pytest.skip("torch has no torch.nn.attention.sdpa_kernel")
    from torch.nn.attention import SDPBackend

    assert SDPBackend.CUDNN_ATTENTION not in D.CUDA_SDPA_BACKENDS
    assert SDPBackend.MATH in D.CUDA_SDPA_BACKENDS  # any head size and mask has a kernel
    q, k, v = (torch.randn(2, 4, 7, 26) for _ in range(3))
    mask = D.additive_mask(torch.tensor([[True] * 7, [True] * 5 + [False] * 2]))
    ref = torch.softmax(q @ k.transpose(-1, -2) / 26 ** 0.5 + mask, -1) @ v
    torch.testing.assert_close(D.attend(q, k, v, mask, 0.0, None), ref, atol=1e-5, rtol=1e-5)
    if torch.cuda.is_available():
        cuda = [t.cuda() for t in (q, k, v, mask)]
        torch.testing.assert_close(D.attend(*cuda, 0.0, None).cpu(), ref, atol=1e-4, rtol=1e-4)
