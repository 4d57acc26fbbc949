"""Call-by-call comparison of two backends on real episodes (``minivln navigate --compare``).

:class:`CompareModel` stands in for the network in the agent: every call (and the per-episode text
cache) runs on both the reference (eager PyTorch) and the candidate (an ONNX Runtime backend) with
the same inputs; the agent goes on with the reference's outputs, so both always see the states the
reference navigates through.  The largest absolute difference of every output is kept (-inf
positions must coincide, else it is inf).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch

from minivln.deploy.export import max_abs_diff as _diff
from minivln.model.fixture import outputs_as_dict


@dataclass
class _PairKV:
    reference: Any
    candidate: Any


class CompareModel:
    """See the module docstring; :attr:`max_abs_diff` maps ``'<mode>.<output>'`` to the largest
    difference seen, :attr:`calls` counts calls per mode."""

    training = False

    def __init__(self, reference: Any, candidate: Any) -> None:
        self.reference = reference
        self.candidate = candidate
        self.config = reference.config
        self.max_abs_diff: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return self.reference.parameters()

    def eval(self) -> "CompareModel":
        return self

    def precompute_text_kv(self, txt_embeds: torch.Tensor, txt_masks: torch.Tensor,
                           instr_embeds: torch.Tensor | None = None) -> _PairKV:
        return _PairKV(self.reference.precompute_text_kv(txt_embeds, txt_masks, instr_embeds),
                       self.candidate.precompute_text_kv(txt_embeds, txt_masks, instr_embeds))

    def __call__(self, mode: str, batch: Mapping[str, Any], taps: bool = False) -> Any:
        ref_batch, cand_batch = dict(batch), dict(batch)
        kv = batch.get("txt_kv")
        if isinstance(kv, _PairKV):
            ref_batch["txt_kv"], cand_batch["txt_kv"] = kv.reference, kv.candidate
        ref = self.reference(mode, ref_batch)
        cand = self.candidate(mode, cand_batch)
        self.calls[mode] = self.calls.get(mode, 0) + 1
        got = outputs_as_dict(mode, cand)
        for name, expected in outputs_as_dict(mode, ref).items():
            key = f"{mode}.{name}"
            diff = max_abs_diff(expected, got.get(name))
            self.max_abs_diff[key] = max(self.max_abs_diff.get(key, 0.0), diff)
        return ref

    def report(self, tolerance: float = 1e-4) -> dict[str, Any]:
        worst = max(self.max_abs_diff.values(), default=0.0)
        return {"calls": dict(self.calls), "max_abs_diff": dict(sorted(self.max_abs_diff.items())),
                "max": worst, "tolerance": tolerance, "within_tolerance": worst < tolerance}


def max_abs_diff(expected: torch.Tensor, got: torch.Tensor | None) -> float:
    """max |expected - got| (see :func:`minivln.deploy.export.max_abs_diff`); inf when missing."""

    if got is None:
        return float("inf")
    return _diff(expected.detach().cpu().numpy(), got.detach().cpu().numpy())
