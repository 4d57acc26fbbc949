#!/bin/bash
# SR against latency for Table III against the continued teacher (docs/results.md, "Fig. 1 with the
# continued teacher"): whole real R2R episodes (the same instructions' ground-truth trajectories
# replayed by every model), batch 1, one thread, for the continued teacher and every seed of the
# two-stage student and of the student alone, the two-stage seed 0 also as int8; then the figure, each
# recipe's six seeds as one point (mean SR ± its standard error over seeds, median latency).  Pauses the processes
# matching $PAUSE (SIGSTOP) and resumes them at the end (SIGCONT, also on failure).  Paths as
# environment variables: DATA VIEWS RUNS(the experiment's runs/ directory) EXPORT(`minivln export` of
# RUNS/ft-both-t2/model) INT8_SCORE(metrics_val_unseen.json of `minivln navigate --backend
# onnxruntime-int8` on EXPORT) PAUSE(pgrep -f pattern) OUT FIG
set -u
cd "$(dirname "$0")/../.."
DATA=${DATA:-${MINIVLN_DATA:?set DATA or MINIVLN_DATA}}
VIEWS=${VIEWS:?stand-in view features}; RUNS=${RUNS:?}; EXPORT=${EXPORT:?}; INT8_SCORE=${INT8_SCORE:?}
OUT=${OUT:-docs/results/latency_gap_1thread.json}; FIG=${FIG:-docs/img/fig1_sr_latency_gap.png}
TABLE=docs/results/r2r_table3_gap.json
PIDS=$( [ -n "${PAUSE:-}" ] && pgrep -f "$PAUSE" | tr '\n' ' ')
if [ -n "$PIDS" ]; then echo "pausing: $PIDS"; kill -STOP $PIDS; trap 'kill -CONT $PIDS; echo resumed' EXIT; fi
sleep 5; uptime; git rev-parse HEAD
CKPTS="teacher=$RUNS/teacher-cont/model two-stage-s0=$EXPORT none-s0=$RUNS/ft-none/model"
SKIP="teacher:onnxruntime-int8 none-s0:onnxruntime-int8"
for s in 1 2 3 4 5; do
  CKPTS="$CKPTS two-stage-s$s=$RUNS/ft-both-t2-seed$s/model none-s$s=$RUNS/ft-none-seed$s/model"
  SKIP="$SKIP two-stage-s$s:onnxruntime-int8 none-s$s:onnxruntime-int8"
done
[ -n "${FIGURE_ONLY:-}" ] || minivln bench model --episodes real --data-dir "$DATA" --features "$VIEWS" --checkpoint $CKPTS \
  --backend torch onnxruntime-int8 --skip $SKIP --reference teacher \
  --batch-sizes 1 --instructions 32 --repeats 3 --warmup 1 --threads 1 --json "$OUT" || exit 1  # FIGURE_ONLY=1: redraw
POINTS=(--point "continued teacher (duet-cpu)" teacher "$TABLE#teacher-cont")
for s in 0 1 2 3 4 5; do
  SUF=$( [ $s = 0 ] && echo "" || echo "-seed$s")
  POINTS+=(--point "two-stage" two-stage-s$s "$TABLE#ft-both-t2$SUF")
  POINTS+=(--point "student alone" none-s$s "$TABLE#ft-none$SUF")
done
POINTS+=(--point "two-stage seed 0, int8" two-stage-s0:onnxruntime-int8 "$INT8_SCORE")
minivln bench figure --bench "$OUT" "${POINTS[@]}" --out "$FIG"
