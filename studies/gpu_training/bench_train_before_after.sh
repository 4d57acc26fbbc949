#!/bin/bash
# Copied from the .gpu/ folder this was run from (studies/gpu_training/README.md says how).
# issue 12 on a GPU: `minivln bench train` before (2e34ed0, the agent's host work per sample) and after (batched),
# same harness (this tree's minivln/bench/train.py copied into the old tree), 4 presets, interleaved.
set -u
export PYTHONUNBUFFERED=1
G=$(cd "$(dirname "$0")" && pwd); R=$(cd "$G/.." && pwd)
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"; exec > >(tee -a "$OUT/log.txt") 2>&1
DEV=${DEV:-cuda}; NP=${NP:-16}; ITF=${ITF:-3}; ITP=${ITP:-10}
START=$(date +%s); left() { echo $(( ${BUDGET:-540} - ($(date +%s) - START) )); }
date; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; lscpu | grep "Model name"
W=${WORK:-$(mktemp -d)}; mkdir -p "$W/d" "$W/before"
tar -C "$W/d" -xJf "$G/data.tar.xz" && tar -C "$W/before" -xzf "$G/before.tar.gz" || exit 1
cp "$R/minivln/bench/train.py" "$W/before/minivln/bench/train.py"
export MINIVLN_DATA=$W/d/data
FEATS=${FEATS:-$W/feats.hdf5}
export PYTHONPATH=$R:$G/pkg
python3 -c "import torch, minivln; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" || exit 1
(cd "$R" && git rev-parse HEAD 2>/dev/null); echo "after: working tree (HEAD + uncommitted merge)"
SECONDS=0
[[ -e "$FEATS" ]] || timeout 200 python3 "$G/build_features.py" "$G/minilm_text_memo.npz" "$FEATS" "$NP" "$G/feat_hashes.json" || { echo "FEATURES FAILED"; exit 1; }
echo "== features: $SECONDS s"
P="--presets duet-r2r minivln-r2r duet-cpu minivln-cpu --features $FEATS --device $DEV"
bench() {  # name tree args...
  local name=$1 tree=$2; shift 2
  local l=$(left); [[ $l -lt 40 ]] && { echo "== skip $name: ${l}s left"; return; }
  SECONDS=0
  PYTHONPATH=$tree:$G/pkg timeout $((l - 15)) python3 -m minivln.cli bench train $P "$@" --quiet --json "$OUT/$name.json"
  echo "== $name rc=$? $SECONDS s"
}
bench ft-bf16-b8-after "$R" --phases finetune --batch-size 8 --precision bf16 --iters $ITF --warmup 1
bench ft-bf16-b8-before "$W/before" --phases finetune --batch-size 8 --precision bf16 --iters $ITF --warmup 1
bench pt-bf16-b64-after "$R" --phases pretrain --batch-size 64 --precision bf16 --iters $ITP --warmup 3
bench pt-bf16-b64-before "$W/before" --phases pretrain --batch-size 64 --precision bf16 --iters $ITP --warmup 3
bench ft-fp32-b8-after "$R" --phases finetune --batch-size 8 --iters $ITF --warmup 1
bench ft-fp32-b8-before "$W/before" --phases finetune --batch-size 8 --iters $ITF --warmup 1
echo "total $(( $(date +%s) - START )) s"
