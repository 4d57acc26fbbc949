#!/bin/bash
# Copied from the .gpu/ folder this was run from (studies/gpu_training/README.md says how).
# issue 12 on a GPU: DAgger iterations at batch 8, 32, 64 (bf16, eager): the "larger batches" lever.
set -u; export PYTHONUNBUFFERED=1
G=$(cd "$(dirname "$0")" && pwd); R=$(cd "$G/.." && pwd); OUT=${OUT:-/tmp/o}; mkdir -p $OUT
exec > >(tee -a "$OUT/log.txt") 2>&1
START=$(date +%s); left() { echo $(( ${BUDGET:-250} - ($(date +%s) - START) )); }
W=$(mktemp -d); mkdir -p $W/d && tar -C $W/d -xJf $G/data.tar.xz || exit 1
export MINIVLN_DATA=$W/d/data PYTHONPATH=$R:$G/pkg
SECONDS=0; timeout 100 python3 $G/build_features.py $G/minilm_text_memo.npz $W/feats.hdf5 16 $G/feat_hashes.json 2>&1 | tail -1; echo "features $SECONDS s"
for B in 64 32 8; do
  l=$(left); [[ $l -lt 25 ]] && { echo "== skip b$B: ${l}s left"; continue; }
  SECONDS=0
  timeout $((l - 8)) python3 -m minivln.cli bench train --presets duet-cpu minivln-cpu --phases finetune --features $W/feats.hdf5 \
    --device cuda --precision bf16 --batch-size $B --iters 2 --warmup 1 --quiet --json $OUT/ft-bf16-b$B.json 2>&1 | grep -v "^W1"
  echo "== b$B rc=${PIPESTATUS[0]} $SECONDS s"
done
echo "total $(( $(date +%s) - START )) s"
