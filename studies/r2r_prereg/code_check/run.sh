#!/usr/bin/env bash
# Did the code between two commits change what R2R training computes, or only its random draws?
# (issue 21, exploratory: the earlier Table III's runs executed ae3fc26, the pre-registered ones 095f747)
#
#   bash studies/r2r_prereg/code_check/run.sh OLD NEW INIT [OUT]     # INIT: a pretrained student (its folder)
#
# For each commit (a git worktree of it under OUT, removed after): 30 pretraining steps (seed 0, the tables' config), one
# fine-tuning iteration with dropout on, and three with every dropout off (nodrop.py), from INIT; the
# losses of every step go to OUT/losses.json.  Needs D (data) and F (stand-in features); one thread.
set -euo pipefail
OLD=$1 NEW=$2 INIT=$3 OUT=${4:-/tmp/code_check}
D=${D:-$(cd "$(dirname "$0")/../../../../shared/data" && pwd)}
F=${F:-/work/feats/standin_views.hdf5}
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(git -C "$HERE" rev-parse --show-toplevel)
mkdir -p "$OUT"
for c in "$OLD" "$NEW"; do
  wt=$OUT/code-$c
  [ -d "$wt" ] || git -C "$REPO" worktree add -f -q --detach "$wt" "$c"
  common=(train.val_every=1000 train.ckpt_every=1000 train.log_every=1 train.seed=0 train.progress=false
          data_dir=$D features=$F num_threads=1)
  (cd "$wt" && rm -rf "$OUT/$c-pre" "$OUT/$c-ft" "$OUT/$c-ft-nodrop"
   PYTHONPATH=$wt python -m minivln.cli pretrain --out "$OUT/$c-pre" --config configs/r2r-pretrain-student-cpu.yaml \
     batch_size=32 feat_dropout=0.0 val_batches=4 train.max_steps=30 "${common[@]}" > "$OUT/$c-pre.log" 2>&1
   PYTHONPATH=$wt python -m minivln.cli finetune --out "$OUT/$c-ft" --config configs/r2r-student-cpu.yaml \
     train.max_steps=1 train.best_metric= init_checkpoint="$INIT" "${common[@]}" > "$OUT/$c-ft.log" 2>&1
   PYTHONPATH=$wt python "$HERE/nodrop.py" finetune --out "$OUT/$c-ft-nodrop" --config configs/r2r-student-cpu.yaml \
     train.max_steps=3 train.best_metric= feat_dropout=0.0 init_checkpoint="$INIT" "${common[@]}" > "$OUT/$c-ft-nodrop.log" 2>&1)
  git -C "$REPO" worktree remove --force "$wt"
done
python - "$OUT" "$OLD" "$NEW" <<'PY'
import json, sys
out, old, new = sys.argv[1:]
def losses(run):
    return [json.loads(l)["loss"] for l in open(f"{out}/{run}/log.jsonl") if '"train"' in l]
res = {kind: {c: losses(f"{c}-{kind}") for c in (old, new)} for kind in ("pre", "ft", "ft-nodrop")}
# equal up to float32 rounding (AdamW's fused kernel rounds otherwise): relative differences below 1e-5
res["max_rel_diff"] = {k: max(abs(a - b) / abs(a) for a, b in zip(res[k][old], res[k][new])) for k in ("pre", "ft", "ft-nodrop")}
res["equal"] = {k: len(res[k][old]) == len(res[k][new]) and d < 1e-5 for k, d in res["max_rel_diff"].items()}
json.dump(res, open(f"{out}/losses.json", "w"), indent=1)
for k, same in res["equal"].items():
    print(f"{k:10s} {'equal' if same else 'DIFFERENT'} (largest relative difference {res['max_rel_diff'][k]:.1e}): "
          f"{old} {[round(x, 4) for x in res[k][old][:3]]} ... / {new} {[round(x, 4) for x in res[k][new][:3]]} ...")
PY
