"""DDP fine-tuning: two Gloo processes (``torchrun``-style environment) take the same steps as one.

Each rank rolls out its half of every global batch.  To compare weights exactly the rollouts must be
deterministic, so the run uses ``feedback: teacher`` (the teacher-forced pass alone) and no dropout;
the sampled pass is the same code path with each rank's own random stream.
Worker: ``python tests/test_ddp_finetune.py DATA FEATS RUN_DIR``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from minivln.config import load_config
from minivln.training.finetune import FinetuneConfig, FinetuneTask, finetune
from minivln.training.logging import read_jsonl

STEPS = 3

# Parameters whose gradient is exactly zero in exact arithmetic, because a softmax ignores a constant
# shift of its inputs: attention key biases, the spatial-relation bias added to the attention scores,
# and the last bias terms of the action heads.  Adam turns their float-rounding "gradients" into
# learning-rate-sized steps, so they differ between any two runs that add numbers in another order.
SHIFT_INVARIANT = ("key.bias", "sprel_linear.bias", "sap_head.net.2.bias", "sap_head.net.3.bias")


def _cfg(data: str, feats: str, run_dir: str) -> FinetuneConfig:
    overrides = [
        "model=duet-cpu", f"data_dir={data}", f"features={feats}", f"train.run_dir={run_dir}",
        "model_overrides={hidden_size: 32, num_attention_heads: 2, intermediate_size: 64, num_l_layers: 1, "
        "num_pano_layers: 1, num_x_layers: 1, image_feat_size: 16, hidden_dropout: 0.0, attention_dropout: 0.0}",
        "feat_dropout=0.0", "feedback=teacher", "batch_size=4", "max_action_len=6", "max_instr_len=40",
        "val_splits=[]", "train.best_metric=", f"train.max_steps={STEPS}", "train.log_every=1",
        "train.ckpt_every=0", "train.progress=false", "train.device=cpu", "train.optim.lr=1e-3",
        "train.optim.schedule=constant", "num_threads=1",
    ]
    return load_config(FinetuneConfig, None, overrides)


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_finetune_like_one(small_toy, tmp_path, one_thread, monkeypatch):
    data, feats = small_toy
    ddp_run, single_run = tmp_path / "ddp", tmp_path / "single"
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, __file__, str(data), str(feats), str(ddp_run)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    _recording_batches(tmp_path / "single.jsonl", monkeypatch.setattr)
    finetune(_cfg(str(data), str(feats), str(single_run)))  # meanwhile, one process, same global batches
    for p in procs:
        log, _ = p.communicate(timeout=300)
        assert p.returncode == 0, log

    # each rank rolled out its own half of every global batch
    import json

    single_batches, r0, r1 = ([json.loads(x) for x in Path(f).read_text().splitlines()] for f in (
        tmp_path / "single.jsonl", f"{ddp_run}.rank0.jsonl", f"{ddp_run}.rank1.jsonl"))
    assert len(single_batches) == STEPS and all(len(b) == 4 for b in single_batches)
    assert [x + y for x, y in zip(r0, r1)] == single_batches

    a = load_file(single_run / "model" / "model.safetensors")
    b = load_file(ddp_run / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    compared = 0
    for k in a:
        x, y = a[k], b[k]
        if k.endswith("in_proj_bias"):  # packed [q, k, v]: drop the key part
            h = x.numel() // 3
            x, y = torch.cat([x[:h], x[2 * h:]]), torch.cat([y[:h], y[2 * h:]])
        elif k.endswith(SHIFT_INVARIANT):
            continue
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-6, msg=f"{k} differs from one process")
        compared += x.numel()
    assert compared > 0.99 * sum(v.numel() for v in a.values())
    # the weights moved, and the logged loss is the global-batch mean in both runs
    from minivln.training.distributed import seed_everything
    from minivln.training.finetune import build_model

    seed_everything(0)
    init = build_model(_cfg(str(data), str(feats), str(tmp_path / "x"))).state_dict()
    assert any(not torch.equal(init[k], a[k]) for k in a)
    la = [r for r in read_jsonl(single_run / "log.jsonl") if r["kind"] == "train"]
    lb = [r for r in read_jsonl(ddp_run / "log.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in lb] == [r["step"] for r in la] == list(range(1, STEPS + 1))
    for ra, rb in zip(la, lb):
        assert abs(ra["loss"] - rb["loss"]) < 1e-4 * max(1.0, abs(ra["loss"]))


def _recording_batches(out: Path, setattr=setattr):
    """Patch FinetuneTask.next_batch to append each batch's instruction ids to ``out`` (JSON lines)."""
    original = FinetuneTask.next_batch

    def next_batch(self, index):
        batch = original(self, index)
        with open(out, "a") as f:
            f.write(json.dumps([ep.instr_id for ep in batch["teacher"]]) + "\n")
        return batch

    setattr(FinetuneTask, "next_batch", next_batch)


if __name__ == "__main__":
    torch.set_num_threads(1)
    _recording_batches(Path(sys.argv[3] + f".rank{os.environ['RANK']}.jsonl"))
    finetune(_cfg(*sys.argv[1:4]))
    # finetune leaves the process group itself: a process that exits with it alive may abort in Gloo
    assert not torch.distributed.is_initialized()
    sys.stdout.flush()
    os._exit(0)  # as tests/test_ddp.py: the checks are done; the interpreter's teardown is not under test
