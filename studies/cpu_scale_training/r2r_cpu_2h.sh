#!/usr/bin/env bash
# The "real R2R at CPU scale" measurement of docs/training.md: a CPU-size DUET teacher and a lone
# student (no distillation), each fine-tuned on R2R train with STAND-IN features for a wall-time
# budget, then scored on all of val_unseen with `minivln navigate`, plus their curves.
#
#   studies/cpu_scale_training/r2r_cpu_2h.sh OUT [DATA_DIR] [FEATS]
#
# DATA_DIR defaults to ../shared/data; FEATS (view features) is built there if missing (about a
# minute).  MINUTES (default 115) is each run's budget; PARALLEL=1 (default) runs the two at the same
# time on one torch thread each (a 2-core machine), PARALLEL=0 one after the other.
set -euo pipefail
OUT=${1:?usage: studies/cpu_scale_training/r2r_cpu_2h.sh OUT [DATA_DIR] [FEATS]}
DATA=${2:-../shared/data}
FEATS=${3:-$OUT/feats/standin_views.hdf5}
MINUTES=${MINUTES:-115}
PARALLEL=${PARALLEL:-1}
mkdir -p "$OUT"
if [ ! -f "$FEATS" ]; then
  minivln features build --data-dir "$DATA" --out "$FEATS" --objects-out "$(dirname "$FEATS")/standin_objects.hdf5"
fi
export OMP_NUM_THREADS=1
teacher() {
  minivln finetune --config configs/r2r-teacher-cpu.yaml --out "$OUT/teacher" data_dir="$DATA" features="$FEATS" \
    train.max_steps=1000 train.val_every=200 train.max_minutes="$MINUTES" > "$OUT/teacher.log" 2>&1
}
student() {
  minivln finetune --config configs/r2r-student-cpu.yaml --out "$OUT/student" data_dir="$DATA" features="$FEATS" \
    train.max_steps=2200 train.val_every=250 train.max_minutes="$MINUTES" > "$OUT/student.log" 2>&1
}
if [ "$PARALLEL" = 1 ]; then
  teacher & t=$!; student & s=$!; wait $t; wait $s
else
  teacher; student
fi
nav() {
  minivln navigate --checkpoint "$OUT/$1" --task r2r --split val_unseen --out "$OUT/nav-$1" --threads 1 \
    > "$OUT/nav-$1.log" 2>&1
}
if [ "$PARALLEL" = 1 ]; then
  nav teacher & t=$!; nav student & s=$!; wait $t; wait $s
else
  nav teacher; nav student
fi
for r in teacher student; do
  minivln plot "$OUT/$r"
  echo "== $r"; cat "$OUT/nav-$r/metrics_val_unseen.json"
done
