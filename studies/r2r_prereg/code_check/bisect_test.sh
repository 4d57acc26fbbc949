#!/usr/bin/env bash
# For `git bisect run` in a worktree: good (0) when one fine-tuning iteration from INIT gives LOSS (the old
# commit's, from run.sh's losses.json "ft"), bad (1) otherwise, skip (125) when the command fails.
#
#   git -C WT bisect start NEW OLD && git -C WT bisect run bash .../bisect_test.sh WT INIT LOSS
set -uo pipefail
WT=$1 INIT=$2 LOSS=$3
D=${D:?set D to the data folder} F=${F:?set F to the stand-in features}
out=$(mktemp -d)
(cd "$WT" && PYTHONPATH=$WT timeout 600 python -m minivln.cli finetune --out "$out/ft" --config configs/r2r-student-cpu.yaml \
  train.max_steps=1 train.val_every=1000 train.ckpt_every=1000 train.log_every=1 train.seed=0 train.best_metric= \
  train.progress=false data_dir="$D" features="$F" num_threads=1 init_checkpoint="$INIT" > "$out/log" 2>&1) || exit 125
python - "$out/ft/log.jsonl" "$LOSS" <<'PY'
import json, sys
loss = next(json.loads(l)["loss"] for l in open(sys.argv[1]) if '"train"' in l)
print(f"{loss:.5f}", file=sys.stderr)
sys.exit(0 if abs(loss - float(sys.argv[2])) < 1e-4 else 1)
PY
