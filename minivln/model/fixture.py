"""Reading the recorded reference episode (``duet_fixture_r2r.npz`` + ``.json``).

The fixture holds a small DUET's weights (``state_dict.<key>``) and every network call of one
episode: ``callNN.<mode>.in.<name>`` / ``callNN.<mode>.out.<name>``.  This module turns it into
model-ready batches and compares outputs the way the fixture's JSON prescribes:

* id arrays (``gmap_vpids``, ``vp_cand_vpids``, ``cand_vpids``) are int64 with -1 = the [stop] slot
  (``None`` upstream) and -2 = batch padding; they decode to per-sample lists without the padding;
* embeddings are compared only at valid rows (``txt_masks``, ``pano_masks``, ``gmap_masks``,
  ``vp_masks``); ``-inf`` positions must match exactly; other values within ``atol`` (1e-4).

Used by ``tests/test_model.py`` and by the ``minivln parity`` command.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from minivln.model.checkpoint import load_state_dict_strict
from minivln.model.config import DUETConfig
from minivln.model.duet import DUET

STOP_ID = -1  # encodes the [stop] slot (None upstream)
PAD_ID = -2  # encodes batch padding
ID_KEYS = ("gmap_vpids", "vp_cand_vpids", "cand_vpids")

# Inputs each mode of the network reads (the fixture also stores agent bookkeeping such as
# ``cand_vpids`` and ``no_vp_left``, which are not model inputs).
MODEL_INPUTS: dict[str, tuple[str, ...]] = {
    "language": ("txt_ids", "txt_masks"),
    "panorama": ("view_img_fts", "obj_img_fts", "loc_fts", "nav_types", "view_lens", "obj_lens"),
    "navigation": (
        "txt_embeds", "txt_masks",
        "gmap_img_embeds", "gmap_step_ids", "gmap_pos_fts", "gmap_masks", "gmap_pair_dists",
        "gmap_visited_masks", "gmap_vpids",
        "vp_img_embeds", "vp_pos_fts", "vp_masks", "vp_nav_masks", "vp_obj_masks", "vp_cand_vpids",
    ),
}  # fmt: skip

# Output -> (where the mask lives: 'in' or 'out', mask name) for outputs compared at valid rows only.
MASKED_ROWS: dict[str, tuple[str, str]] = {
    "txt_embeds": ("in", "txt_masks"),
    "pano_embeds": ("out", "pano_masks"),
    "gmap_embeds": ("in", "gmap_masks"),
    "vp_embeds": ("in", "vp_masks"),
}

_CALL_KEY = re.compile(r"^(call\d+)\.(language|panorama|navigation)\.(in|out)\.(.+)$")


def decode_ids(arr: np.ndarray | Tensor) -> list[list[int | None]]:
    """(B, K) int ids -> per-sample lists: -1 becomes None ([stop]), -2 (padding) is dropped."""
    rows = np.asarray(arr).tolist()
    return [[None if v == STOP_ID else int(v) for v in row if v != PAD_ID] for row in rows]


def encode_ids(ids: list[list[Any]], width: int | None = None) -> np.ndarray:
    """Inverse of :func:`decode_ids` for integer ids: None -> -1, padded with -2."""
    width = width if width is not None else max((len(r) for r in ids), default=0)
    out = np.full((len(ids), width), PAD_ID, dtype=np.int64)
    for i, row in enumerate(ids):
        out[i, : len(row)] = [STOP_ID if v is None else int(v) for v in row]
    return out


@dataclass
class FixtureCall:
    """One recorded network call: decoded inputs (tensors, id lists) and expected outputs."""

    name: str  # e.g. 'call02'
    mode: str  # 'language' | 'panorama' | 'navigation'
    inputs: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Tensor] = field(default_factory=dict)

    def batch(self) -> dict[str, Any]:
        """The model inputs of this call (bookkeeping-only arrays left out)."""
        return {k: v for k, v in self.inputs.items() if k in MODEL_INPUTS[self.mode]}


@dataclass
class Fixture:
    """The whole recorded episode."""

    path: Path
    raw_config: dict[str, Any]
    config: DUETConfig
    state_dict: dict[str, Tensor]
    calls: list[FixtureCall]
    extras: dict[str, np.ndarray]  # everything else (stepT.*, final.*, instr_encoding...)

    def build_model(self) -> "torch.nn.Module":
        """A :class:`~minivln.model.duet.DUET` with the fixture's config and weights, in eval mode."""

        model = DUET(self.config)
        load_state_dict_strict(model, self.state_dict)
        return model.eval()


def _to_torch(name: str, arr: np.ndarray) -> Any:
    if name in ID_KEYS:
        return decode_ids(arr)
    return torch.from_numpy(np.ascontiguousarray(arr))


def load_fixture(npz_path: str | Path) -> Fixture:
    """Read the fixture npz (no pickles) into a :class:`Fixture`, calls in recorded order."""
    npz_path = Path(npz_path)
    calls: dict[str, FixtureCall] = {}
    state_dict: dict[str, Tensor] = {}
    extras: dict[str, np.ndarray] = {}
    with np.load(npz_path, allow_pickle=False) as z:
        raw_config = json.loads(str(z["config_json"]))
        for key in z.files:
            arr = z[key]
            if key.startswith("state_dict."):
                state_dict[key[len("state_dict.") :]] = torch.from_numpy(arr.copy())
                continue
            m = _CALL_KEY.match(key)
            if m is None:
                if key != "config_json":
                    extras[key] = arr
                continue
            name, mode, direction, arr_name = m.groups()
            call = calls.setdefault(name, FixtureCall(name=name, mode=mode))
            target = call.inputs if direction == "in" else call.outputs
            target[arr_name] = _to_torch(arr_name, arr)
    ordered = [calls[k] for k in sorted(calls)]
    return Fixture(
        path=npz_path,
        raw_config=raw_config,
        config=DUETConfig.from_dict(raw_config),
        state_dict=state_dict,
        calls=ordered,
        extras=extras,
    )


def outputs_as_dict(mode: str, result: Any) -> dict[str, Tensor]:
    """Name the outputs of ``model(mode, batch)`` like the fixture does."""
    if mode == "language":
        return {"txt_embeds": result}
    if mode == "panorama":
        pano_embeds, pano_masks = result
        return {"pano_embeds": pano_embeds, "pano_masks": pano_masks}
    return {k: v for k, v in result.items() if v is not None}


@dataclass
class OutputCheck:
    """Comparison of one output array with the recorded one."""

    name: str
    max_abs_diff: float  # over compared finite positions (0 for bool arrays that match)
    inf_positions_match: bool
    shape_match: bool
    ok: bool
    note: str = ""


def compare_outputs(call: FixtureCall, result: Any, atol: float = 1e-4) -> list[OutputCheck]:
    """Compare a model result for ``call`` with the recorded outputs (JSON comparison rules).

    Every recorded output must be present in the result.  Embeddings are compared only at the rows
    of :data:`MASKED_ROWS`; ``-inf`` (and ``+inf``) positions must match exactly; NaN never passes.
    """
    actual = outputs_as_dict(call.mode, result)
    checks: list[OutputCheck] = []
    for name, expected in call.outputs.items():
        got = actual.get(name)
        if got is None:
            checks.append(OutputCheck(name, float("inf"), False, False, False, "missing"))
            continue
        got = got.detach().cpu()
        if tuple(got.shape) != tuple(expected.shape):
            note = f"shape {tuple(got.shape)} != {tuple(expected.shape)}"
            checks.append(OutputCheck(name, float("inf"), False, False, False, note))
            continue
        if expected.dtype == torch.bool:
            same = bool(torch.equal(got.bool(), expected))
            checks.append(OutputCheck(name, 0.0 if same else 1.0, True, True, same))
            continue
        got, exp = got.float(), expected.float()
        if name in MASKED_ROWS:
            where, mask_name = MASKED_ROWS[name]
            rows = (call.inputs if where == "in" else call.outputs)[mask_name].bool()
            got, exp = got[rows], exp[rows]
        inf_ok = bool(torch.equal(torch.isinf(got) & (got > 0), torch.isinf(exp) & (exp > 0)))
        inf_ok &= bool(torch.equal(torch.isinf(got) & (got < 0), torch.isinf(exp) & (exp < 0)))
        finite = torch.isfinite(exp) & torch.isfinite(got)
        nan = bool(torch.isnan(got).any())
        diff = (got[finite] - exp[finite]).abs().max().item() if finite.any() else 0.0
        ok = inf_ok and not nan and diff < atol
        checks.append(OutputCheck(name, diff, inf_ok, True, ok, "NaN in output" if nan else ""))
    return checks


def run_fixture(
    model: torch.nn.Module, fixture: Fixture, atol: float = 1e-4, **kwargs: Any
) -> dict[str, list[OutputCheck]]:
    """Feed every recorded call's inputs to ``model`` (no grad) and compare; keyed by call name.

    ``kwargs`` are passed to ``model(mode, batch, **kwargs)``.
    """
    report: dict[str, list[OutputCheck]] = {}
    with torch.no_grad():
        for call in fixture.calls:
            result = model(call.mode, call.batch(), **kwargs)
            if kwargs.get("taps"):
                result = result[0]
            report[call.name] = compare_outputs(call, result, atol)
    return report
