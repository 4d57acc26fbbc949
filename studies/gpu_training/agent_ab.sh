#!/bin/bash
# issue 12 on a GPU: the DAgger iteration before and after compaction, paired rollouts and fused AdamW,
# and the pretraining step with torch's default (foreach) and fused AdamW; one harness, one process per
# setting, 4 presets interleaved inside each. Prepared on CPU (2026-11-27, no GPU in that session):
# copy to the G folder of studies/gpu_training/README.md, then `BUDGET=480 bash G/agent_ab.sh`.
set -u; export PYTHONUNBUFFERED=1
G=$(cd "$(dirname "$0")" && pwd); R=$(cd "$G/.." && pwd); OUT=${OUT:-/tmp/o}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
START=$(date +%s); left() { echo $(( ${BUDGET:-480} - ($(date +%s) - START) )); }
date; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
W=$(mktemp -d); mkdir -p "$W/d" && tar -C "$W/d" -xJf "$G/data.tar.xz" || exit 1
export MINIVLN_DATA=$W/d/data PYTHONPATH=$R:$G/pkg
SECONDS=0; timeout 150 python3 "$G/build_features.py" "$G/minilm_text_memo.npz" "$W/feats.hdf5" 16 "$G/feat_hashes.json" 2>&1 | tail -1
echo "== features $SECONDS s"
P="--presets duet-cpu minivln-cpu duet-r2r minivln-r2r --features $W/feats.hdf5 --device cuda --precision bf16 --quiet"
bench() {  # name args...
  local name=$1; shift; local l=$(left); [[ $l -lt 40 ]] && { echo "== skip $name: ${l}s left"; return; }
  SECONDS=0; timeout $((l - 10)) python3 -m minivln.cli bench train $P "$@" --json "$OUT/$name.json" 2>&1 | grep -v "^W1"
  echo "== $name rc=${PIPESTATUS[0]} $SECONDS s"
}
F="--phases finetune --batch-size 8 --iters 3 --warmup 1"
bench ft-before $F --full-batch --optimizer foreach --count-ops         # the iteration as it was (torch's CUDA default AdamW)
bench ft-compact $F                                          # compaction + fused AdamW (the defaults now)
bench ft-merged $F --merge-rollouts --count-ops                        # + DAgger's two rollouts as one batch
T="--phases pretrain --batch-size 64 --iters 10 --warmup 4"
bench pt-foreach $T --optimizer foreach
bench pt-fused $T
echo "total $(( $(date +%s) - START )) s"
