"""Is the fixed per-step cost of bf16 training on a GPU cuDNN's attention?  Same process, both ways,
then a profile of one unfixed pretraining step."""
import json
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import minivln.model.duet as D
from minivln.bench.train import bench_train, pretrain_step

out, feats = sys.argv[1], sys.argv[2]
fixed = D.CUDA_SDPA_BACKENDS
P = ["minivln-cpu", "minivln-r2r", "duet-cpu"]
res = {}
for phase, bs, it, wu in (("pretrain", 64, 5, 2), ("finetune", 8, 2, 1)):
    for name, backends in (("no-cudnn", fixed), ("torch-default", None)):
        D.CUDA_SDPA_BACKENDS = backends
        r = bench_train(P, [phase], os.environ["MINIVLN_DATA"], feats, iters=it, warmup=wu, device="cuda",
                        batch_size=bs, precision="bf16", quiet=True)
        res[f"{phase}-{name}"] = r
        print(phase, name, {p: (round(v["s_per_it"], 3), round(v["step_s"], 3)) for p, v in r["phases"][phase].items()}, flush=True)
        json.dump(res, open(f"{out}/sdpa.json", "w"), indent=1)
D.CUDA_SDPA_BACKENDS = None
step = pretrain_step("minivln-cpu", os.environ["MINIVLN_DATA"], feats, batch_size=64, device=torch.device("cuda"), precision="bf16")
for i in range(3):
    step(i)
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    step(3)
t = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
print(t); open(f"{out}/profile.txt", "w").write(t + "\n" + prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25))
