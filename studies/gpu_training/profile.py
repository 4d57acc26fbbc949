"""Where a GPU training step's host time goes: cProfile (Python functions) + torch.profiler (ops) +
the number of device syncs, for duet-cpu pretraining at batch 64 and DAgger at batch 8 (bf16, eager).

Copied from the .gpu/ folder this was run from (studies/gpu_training/README.md says how)."""

import cProfile
import io
import pstats
import sys
import time
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

from minivln.bench.train import finetune_step, pretrain_step

out, feats = sys.argv[1], sys.argv[2]
dev = torch.device("cuda")
torch.set_num_threads(1)
for phase, make, bs, warm, n in (("pretrain", pretrain_step, 64, 4, 6), ("finetune", finetune_step, 8, 2, 2)):
    step = make("duet-cpu", "", feats, batch_size=bs, device=dev, precision="bf16")
    for i in range(warm):
        step(i)
    prof = cProfile.Profile()
    t = time.perf_counter(); prof.enable()
    parts = [step(warm + i) for i in range(n)]
    prof.disable(); wall = (time.perf_counter() - t) / n
    print(f"==== {phase} b{bs}: {wall:.3f} s/it (cProfile on), parts {parts}")
    s = io.StringIO(); st = pstats.Stats(prof, stream=s); st.sort_stats("cumulative").print_stats(45)
    st.sort_stats("tottime").print_stats(30); print(s.getvalue()[:14000])
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        step(warm + n)
    torch.cuda.set_sync_debug_mode(0)
    locs = {}
    for x in w:
        if "synchroniz" in str(x.message):
            k = f"{x.filename.split('/')[-1]}:{x.lineno}"; locs[k] = locs.get(k, 0) + 1
    print(f"==== {phase} syncs per iteration: {sum(locs.values())}", sorted(locs.items(), key=lambda kv: -kv[1])[:20])
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        step(warm + n + 1)
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=55))
    del step
