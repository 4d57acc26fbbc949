"""Memory of the inference caches of the network (docs/model.md, "What makes the network fast").

For each preset: random weights, ``eval()``, one batch-1 episode of the ``minivln bench model``
protocol (which builds the oneDNN-reordered and concatenated weights on first use), then the bytes
held by those cached copies (``_packed_cache`` of every module; tensors that share storage with a
parameter are not counted; oneDNN-reordered weights count at their logical size) against the bytes
of the parameters.

    python studies/compute_cost/inference_cache_memory.py [--presets duet-r2r minivln-r2r]
"""

from __future__ import annotations

import argparse

import torch


def _storage(t: torch.Tensor) -> tuple[int, int]:
    """(storage key, bytes); an opaque oneDNN tensor has no storage: its own id, logical size."""
    try:
        s = t.untyped_storage()
        return s.data_ptr(), s.nbytes()
    except (RuntimeError, NotImplementedError):
        return -id(t), t.numel() * t.element_size()


def cache_bytes(model: torch.nn.Module) -> int:
    params = {_storage(p)[0] for p in model.parameters()}
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        for _tensors, _key, _kind, weight, bias in module.__dict__.get("_packed_cache", {}).values():
            for t in (weight, bias):
                if t is None:
                    continue
                ptr, nbytes = _storage(t)
                if ptr not in params and ptr not in seen:
                    seen.add(ptr)
                    total += nbytes
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=["duet-r2r", "minivln-r2r"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    from minivln.bench.model import record_episode, run_episode
    from minivln.model.registry import create_model

    torch.set_num_threads(args.threads)
    for name in args.presets:
        torch.manual_seed(0)
        model = create_model(name).eval()
        run_episode(model, record_episode(model, 1))
        param = sum(p.numel() * p.element_size() for p in model.parameters())
        extra = cache_bytes(model)
        print(f"{name:<14} parameters {param / 1e6:7.1f} MB   inference caches {extra / 1e6:7.1f} MB "
              f"(+{100 * extra / param:.0f} %)")
        del model


if __name__ == "__main__":
    main()
