"""Training checkpoints near the size of their information: a tied weight stored once, an optimizer
state tensor of mostly zero rows stored as its non-zero rows; both read back bit for bit."""

from __future__ import annotations

import torch
from safetensors import safe_open
from torch import nn

from minivln.model.checkpoint import stored_shapes
from minivln.training.checkpoint import load_checkpoint, save_checkpoint


class TiedLM(nn.Module):
    """A word-embedding table (1,000 words, 20 of them used) with a decoder tied to it, as DUET's MLM
    head is."""

    def __init__(self, mlm: bool = False) -> None:
        super().__init__()
        self.mlm = mlm  # predict words with the decoder: a softmax over all of them, every row a gradient
        self.embed = nn.Embedding(1000, 16)
        self.mix = nn.Linear(16, 16)
        self.decoder = nn.Linear(16, 1000, bias=False)
        self.decoder.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.mix(self.embed(ids))
        return self.decoder(x).logsumexp(-1).sum() if self.mlm else x.sum()


def _trained(mlm: bool = False) -> tuple[TiedLM, torch.optim.AdamW]:
    torch.manual_seed(0)
    model = TiedLM(mlm)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):  # gradients reach only the rows of the words used
        opt.zero_grad()
        model(torch.randint(0, 20, (4, 5))).backward()
        opt.step()
    return model, opt


def _bits(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().numpy().tobytes()  # -0.0 and +0.0 differ here


def test_tied_weights_and_zero_rows_are_stored_compactly_and_read_back_bit_for_bit(tmp_path):
    model, opt = _trained()
    with torch.no_grad():
        opt.state[model.embed.weight]["exp_avg"][500, 3] = -0.0  # a negative zero is not a zero row
    state = model.state_dict()
    assert state["decoder.weight"].data_ptr() == state["embed.weight"].data_ptr()
    save_checkpoint(tmp_path / "c", model_state=state, meta={"step": 3},
                    trainer_state={"step": 3, "optimizer": opt.state_dict()})
    with safe_open(str(tmp_path / "c" / "model.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == ["embed.weight", "mix.bias", "mix.weight"]  # the decoder: stored once
    assert stored_shapes(tmp_path / "c" / "model.safetensors") == {k: tuple(v.shape) for k, v in state.items()}
    weights = 1000 * 16 * 4
    moments = 2 * weights  # AdamW's two moments of the table, were they stored whole
    assert (tmp_path / "c" / "trainer.pt").stat().st_size < moments / 10
    back = load_checkpoint(tmp_path / "c")
    assert back.model.keys() == state.keys()
    for k, v in state.items():
        assert _bits(back.model[k]) == _bits(v), k
    saved = opt.state_dict()["state"]
    for p, s in saved.items():
        for k, v in s.items():
            assert _bits(back.trainer["optimizer"]["state"][p][k]) == _bits(v), (p, k)
    assert _bits(back.trainer["optimizer"]["state"][0]["exp_avg"][500]) != bytes(16 * 4)

    # resuming from it gives the same next step as the optimizer that was never saved
    resumed = TiedLM()
    resumed.load_state_dict(back.model)
    opt2 = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    opt2.load_state_dict(back.trainer["optimizer"])
    ids = torch.randint(0, 20, (4, 5))
    for m, o in ((model, opt), (resumed, opt2)):
        o.zero_grad()
        m(ids).backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), resumed.state_dict().values()))


def test_dense_optimizer_state_is_stored_as_it_is(tmp_path):
    model, opt = _trained(mlm=True)
    rows_used = (opt.state[model.embed.weight]["exp_avg"] != 0).any(1).sum()
    assert rows_used == 1000  # the decoder's softmax reaches every row: nothing to save by listing rows
    save_checkpoint(tmp_path / "c", model_state=model.state_dict(), meta={"step": 3},
                    trainer_state={"step": 3, "optimizer": opt.state_dict()})
    raw = torch.load(tmp_path / "c" / "trainer.pt", weights_only=False)
    assert torch.is_tensor(raw["optimizer"]["state"][0]["exp_avg"])
    back = load_checkpoint(tmp_path / "c").trainer["optimizer"]["state"][0]["exp_avg"]
    assert torch.equal(back, opt.state[model.embed.weight]["exp_avg"])
