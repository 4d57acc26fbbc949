#!/bin/bash
# The latency study of docs/results.md ("Results (2026-11-27, ...)", under Deployment), as it was run
# on 2026-11-27: pauses the processes matching $PAUSE (SIGSTOP; a training grid), times whole real
# episodes at 1 and 2 threads, measures the fp32 GEMM peak, and resumes them (SIGCONT, also on
# failure).  Paths as environment variables:
#   DATA VIEWS TEACHER LONE DISTILLED(an export directory of `minivln export`) PAUSE(pgrep -f pattern)
set -u
cd "$(dirname "$0")/../.."
DATA=${DATA:-${MINIVLN_DATA:?set DATA or MINIVLN_DATA}}
VIEWS=${VIEWS:?stand-in view features}; TEACHER=${TEACHER:-../shared/teachers/duet-cpu-r2r-finetuned}
LONE=${LONE:?}; DISTILLED=${DISTILLED:?}
PIDS=$( [ -n "${PAUSE:-}" ] && pgrep -f "$PAUSE" | tr '\n' ' ')
if [ -n "$PIDS" ]; then echo "pausing: $PIDS"; kill -STOP $PIDS; trap 'kill -CONT $PIDS; echo resumed' EXIT; fi
sleep 5; uptime; git rev-parse HEAD
for T in 1 2; do
  minivln bench model --episodes real --data-dir "$DATA" --features "$VIEWS" \
    --presets duet-r2r minivln-r2r \
    --checkpoint teacher-cpu="$TEACHER" lone="$LONE" distilled="$DISTILLED" \
    --backend torch onnxruntime onnxruntime-int8 \
    --skip duet-r2r:onnxruntime duet-r2r:onnxruntime-int8 teacher-cpu:onnxruntime teacher-cpu:onnxruntime-int8 \
           lone:onnxruntime lone:onnxruntime-int8 \
    --reference duet-r2r --batch-sizes 1 8 --instructions 32 --repeats 5 --warmup 1 --threads $T \
    --json docs/results/latency_real_${T}thread.json
done
minivln bench gemm --threads 1 2 --bench docs/results/latency_real_1thread.json --json docs/results/gemm_peak.json
