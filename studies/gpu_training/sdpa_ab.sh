#!/bin/bash
# Copied from the .gpu/ folder this was run from (studies/gpu_training/README.md says how).
set -u; export PYTHONUNBUFFERED=1
G=$(cd "$(dirname "$0")" && pwd); R=$(cd "$G/.." && pwd); OUT=${OUT:-/tmp/o}; mkdir -p $OUT
W=$(mktemp -d); mkdir -p $W/d && tar -C $W/d -xJf $G/data.tar.xz || exit 1
export MINIVLN_DATA=$W/d/data PYTHONPATH=$R:$G/pkg
SECONDS=0; timeout 100 python3 $G/build_features.py $G/minilm_text_memo.npz $W/feats.hdf5 16 $G/feat_hashes.json 2>&1 | tail -2; echo "features $SECONDS s"
timeout ${T:-190} python3 $G/sdpa.py $OUT $W/feats.hdf5 2>&1 | tee $OUT/sdpa.log | head -60
echo "total $SECONDS s"
