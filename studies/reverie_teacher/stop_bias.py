"""EXPLORATORY probe (issue 20, after the pre-registered tables closed their teacher): does a constant
added to the STOP logit at decoding turn the teacher's reaching of goals into stopping at them?

The diagnosis (README, points 10-11; ``stops.json``) found the REVERIE teacher passing a goal more often
than its students (oracle SR) but stopping there less often.  This runs a trained agent arg-max with
``fused_logits[:, 0] += b`` (slot 0 is STOP) for each bias ``b``, on a split's first N instructions, and
writes each bias's metrics.  Nothing is trained; the bias is meant to be chosen on a split that is not
reported (val_seen), then read once on val_unseen.

    python studies/reverie_teacher/stop_bias.py --checkpoint RUN/model --split val_seen \\
        --max-episodes 200 --biases 0 1.5 3 --features F --objects O --out OUT
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from minivln.model.checkpoint import load_agent_model
from minivln.paths import atomic_write_text
from minivln.training.navigate import navigate

KEEP = ("sr", "oracle_sr", "spl", "rgs", "rgspl", "grounded_share", "trajectory_length")


def with_stop_bias(model: torch.nn.Module, bias: float) -> torch.nn.Module:
    """``model`` whose 'navigation' outputs have ``bias`` added to the STOP logit (slot 0)."""
    forward = model.forward

    def biased(mode, batch, taps=False):
        out = forward(mode, batch, taps)
        if mode == "navigation" and bias:
            outs = out[0] if taps else out
            outs["fused_logits"] = outs["fused_logits"].clone()
            outs["fused_logits"][:, 0] += bias
        return out
    model.forward = biased  # nn.Module.__call__ finds the instance attribute
    return model


def probe_parser(doc: str) -> argparse.ArgumentParser:
    """The options this folder's decoding probes share: a network, a split's first N instructions, the
    feature files, where to write."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", default="val_seen")
    p.add_argument("--max-episodes", type=int, default=200)
    p.add_argument("--features", required=True)
    p.add_argument("--objects", required=True)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", required=True)
    return p


def main() -> None:
    p = probe_parser(__doc__)
    p.add_argument("--biases", type=float, nargs="+", default=[0.0, 1.5, 3.0])
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    rows = []
    for b in args.biases:
        t0 = time.time()
        model = with_stop_bias(load_agent_model(args.checkpoint), b)
        res = navigate(args.checkpoint, "reverie", args.split, out / f"bias{b:g}", data_dir=args.data_dir,
                       features=args.features, objects=args.objects, batch_size=25, model=model,
                       max_episodes=args.max_episodes)
        rows.append({"bias": b, "episodes": res["episodes"], **{k: res["metrics"].get(k) for k in KEEP},
                     "seconds": round(time.time() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
    atomic_write_text(out / "stop_bias.json", json.dumps(
        {"checkpoint": args.checkpoint, "split": args.split, "first": args.max_episodes,
         "features": res["features"], "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
