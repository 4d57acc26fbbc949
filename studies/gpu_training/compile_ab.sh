#!/bin/bash
# Copied from the .gpu/ folder this was run from (studies/gpu_training/README.md says how).
# issue 12 on a GPU: `minivln bench train --compile` (compile_layers) against eager, same machine,
# duet-cpu and minivln-cpu: pretraining at batch 64 and DAgger at batch 8, bf16 autocast.
set -u
export PYTHONUNBUFFERED=1
G=$(cd "$(dirname "$0")" && pwd); R=$(cd "$G/.." && pwd)
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"; exec > >(tee -a "$OUT/log.txt") 2>&1
START=$(date +%s); left() { echo $(( ${BUDGET:-480} - ($(date +%s) - START) )); }
date; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
W=$(mktemp -d); mkdir -p "$W/d" && tar -C "$W/d" -xJf "$G/data.tar.xz" || exit 1
export MINIVLN_DATA=$W/d/data PYTHONPATH=$R:$G/pkg
python3 -c "import torch, triton, minivln; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.is_available())" || exit 1
(cd "$R" && git rev-parse HEAD 2>/dev/null)
FEATS=$W/feats.hdf5; SECONDS=0
timeout 150 python3 "$G/build_features.py" "$G/minilm_text_memo.npz" "$FEATS" 16 "$G/feat_hashes.json" 2>&1 | tail -2
echo "== features: $SECONDS s"
P="--presets duet-cpu minivln-cpu --features $FEATS --device cuda --precision bf16 --quiet"
bench() {  # name args...
  local name=$1; shift
  local l=$(left); [[ $l -lt 30 ]] && { echo "== skip $name: ${l}s left"; return; }
  SECONDS=0
  timeout $((l - 10)) python3 -m minivln.cli bench train $P "$@" --json "$OUT/$name.json" 2>&1 | grep -v "^W1\|^  warnings.warn"
  echo "== $name rc=${PIPESTATUS[0]} $SECONDS s"
}
bench pt-b64-compiled --phases pretrain --batch-size 64 --iters 10 --warmup 4 --compile
bench pt-b64-eager --phases pretrain --batch-size 64 --iters 10 --warmup 4
bench ft-b8-compiled --phases finetune --batch-size 8 --iters 3 --warmup 3 --compile
bench ft-b8-eager --phases finetune --batch-size 8 --iters 3 --warmup 1
echo "total $(( $(date +%s) - START )) s"
