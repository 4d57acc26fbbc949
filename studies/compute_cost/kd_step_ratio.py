"""Cost of stage-2 KD per fine-tuning iteration, and whether a bf16 teacher is faithful enough.

Times the forward and backward of DAgger iterations (teacher-forced + sampled rollout) of one
student, on the same batches and the same weights (no optimizer step, the torch RNG re-seeded before
each variant, so every variant rolls out exactly the same episodes), in three variants, interleaved
(for each batch each variant runs once, the order alternating) so that load from other jobs hits them
alike:

* ``plain``: the student alone;
* ``kd-fp32``: + the stage-2 teacher in lock-step and the three KD terms;
* ``kd-bf16``: the same with the teacher's forward under bf16 autocast (``teacher_dtype: bf16``).  Then, on the same states
(teacher-forced rollouts, so the student's path does not depend on the teacher), it compares the
teacher's fused action distribution in bf16 with fp32: arg-max agreement, max |p_bf16 - p_fp32|
and the mean KL(p_fp32 || p_bf16) over every navigating sample and step.

    python studies/compute_cost/kd_step_ratio.py --features FEATS.hdf5 --student-init RUN/pretrained \\
        --teacher ../shared/teachers/duet-cpu-r2r-finetuned [--iters 8] [--json OUT]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from minivln.distill.stage2 import stage2_terms
from minivln.model.checkpoint import load_agent_model
from minivln.training.distributed import seed_everything
from minivln.training.finetune import (
    FinetuneConfig,
    build_model,
    make_task,
    prepare_data,
)
from minivln.training.trainer import freeze_teacher, teacher_autocast


def make_variant(model, task, teacher, terms):
    def step(i: int) -> None:
        batch = task.next_batch(i)
        torch.manual_seed(i)  # the same sampled actions in every variant
        model.zero_grad(set_to_none=True)
        out = task.compute(model, batch, teacher)
        loss = out.loss + sum(t.weight * t(out.outputs, out.teacher_outputs, batch) for t in terms)
        loss.backward()

    return step


def compare_precisions(task, model, teacher_fp32, teacher_bf16, batches: int) -> dict[str, float]:
    """Teacher-forced rollouts of ``model`` with each teacher on the same states."""
    agree, total, max_diff, kl_sum = 0, 0, 0.0, 0.0
    model.eval()
    with torch.no_grad():
        for i in range(batches):
            eps = task.next_batch(1000 + i)["teacher"]
            recs = []
            for teacher in (teacher_fp32, teacher_bf16):
                task.agent.model = model
                recs.append(task.agent.rollout(task.env, eps, "teacher", teacher=teacher).steps)
            for s32, s16 in zip(*recs, strict=True):
                active = torch.as_tensor(s32.active, dtype=torch.bool)
                z32, z16 = s32.teacher.fused_logits[active], s16.teacher.fused_logits[active]
                p32, p16 = F.softmax(z32, 1), F.softmax(z16, 1)
                agree += int((z32.argmax(1) == z16.argmax(1)).sum())
                total += int(active.sum())
                max_diff = max(max_diff, float((p32 - p16).abs().max()))
                ok = p32 > 0
                kl = torch.where(ok, p32 * (torch.log(p32.clamp_min(1e-30)) - F.log_softmax(z16, 1)), 0.0)
                kl_sum += float(kl.sum())
    model.train()
    return {"decisions": total, "argmax_agreement": agree / max(total, 1), "max_abs_prob_diff": max_diff,
            "mean_kl": kl_sum / max(total, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--features", required=True)
    ap.add_argument("--data-dir", default="")
    ap.add_argument("--config", default="configs/r2r-student-cpu.yaml")
    ap.add_argument("--student-init", default="", help="student weights (e.g. a pretraining run's pretrained/)")
    ap.add_argument("--teacher", default="../shared/teachers/duet-cpu-r2r-finetuned")
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--compare-batches", type=int, default=4)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from minivln.config import load_config

    cfg = load_config(FinetuneConfig, args.config, [f"features={args.features}", f"data_dir={args.data_dir}",
                                                    f"init_checkpoint={args.student_init}"])
    t32 = freeze_teacher(load_agent_model(args.teacher))
    t16 = freeze_teacher(teacher_autocast(copy.deepcopy(t32), "bf16"))
    seed_everything(cfg.train.seed)
    model = build_model(cfg)
    res = prepare_data(cfg, Path("."), model.config.image_feat_size, model.config.obj_feat_size)
    task = make_task(cfg, model, res)
    terms = stage2_terms(model.config, t32.config, cfg.kd_weight)
    variants = {"plain": make_variant(model, task, None, []), "kd-fp32": make_variant(model, task, t32, terms),
                "kd-bf16": make_variant(model, task, t16, terms)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(args.warmup + args.iters):
        order = list(variants) if i % 2 == 0 else list(reversed(variants))
        for name in order:
            t0 = time.perf_counter()
            variants[name](i)
            dt = time.perf_counter() - t0
            if i >= args.warmup:
                times[name].append(dt)
            print(f"iteration {i} {name}: {dt:.2f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor()}".strip(), "torch": torch.__version__,
        "threads": 1, "measures": "forward + backward, same weights and episodes", "student_init": args.student_init, "teacher": args.teacher, "config": args.config,
        "iters": args.iters, "s_per_it": med, "all_s": times,
        "ratio_kd_fp32": med["kd-fp32"] / med["plain"], "ratio_kd_bf16": med["kd-bf16"] / med["plain"],
        "bf16_vs_fp32": compare_precisions(task, model, t32, t16, args.compare_batches),
    }
    print(json.dumps({k: report[k] for k in ("s_per_it", "ratio_kd_fp32", "ratio_kd_bf16", "bf16_vs_fp32")},
                     indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
