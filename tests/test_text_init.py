"""The MiniLM text initialisation must reproduce an independent BERT implementation."""

import pytest
import torch

from minivln.data.tokenizer import get_tokenizer
from minivln.model.registry import create_model
from minivln.model.text_init import (
    TextInitError,
    init_text,
    init_text_from_minilm,
    minilm_weights_path,
)

MINILM = dict(hidden_size=384, num_attention_heads=12, intermediate_size=1536)


def test_duet_text_encoder_with_minilm_weights_matches_hf_bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = create_model("minivln-cpu", num_l_layers=6, **MINILM).eval()
    init_text_from_minilm(model, layers=list(range(6)))
    hf = transformers.BertModel.from_pretrained(str(minilm_weights_path().parent)).eval()
    tok = get_tokenizer()
    texts = ["walk past the sofa and stop by the fridge", "go upstairs"]
    ids = [tok.encode(t) for t in texts]
    n = max(map(len, ids))
    txt_ids = torch.tensor([i + [0] * (n - len(i)) for i in ids])
    mask = txt_ids != 0
    with torch.no_grad():
        ours = model("language", {"txt_ids": txt_ids, "txt_masks": mask})
        ref = hf(input_ids=txt_ids, attention_mask=mask.long()).last_hidden_state
    assert (ours - ref)[mask].abs().max().item() < 1e-4


def test_uniform_layer_mapping_and_errors():
    model = create_model("minivln-cpu", num_l_layers=3, **MINILM)
    before = model.img_embeddings.img_linear.weight.clone()
    keys = init_text(model, "minilm")
    assert "lang_encoder.layer.2.output.dense.weight" in keys and "embeddings.word_embeddings.weight" in keys
    assert torch.equal(before, model.img_embeddings.img_linear.weight)  # only text parts change
    from safetensors.torch import load_file

    src = load_file(str(minilm_weights_path()))
    # 3 layers take MiniLM layers 1, 3, 5
    assert torch.equal(model.lang_encoder.layer[1].attention.self.query.weight,
                       src["encoder.layer.3.attention.self.query.weight"])
    with pytest.raises(TextInitError, match="hidden_size=128"):
        init_text(create_model("minivln-cpu"), "minilm")
    with pytest.raises(TextInitError, match="unknown text_init"):
        init_text(model, "bert-large")
