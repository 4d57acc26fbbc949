#!/bin/bash
# REVERIE latency, whole real episodes with their objects (docs/results.md, "REVERIE, with objects"): pauses
# the processes matching $PAUSE (SIGSTOP; training runs) and resumes them at the end (SIGCONT, also on
# failure).  The paper-size presets with random weights (teacher duet-reverie, student minivln-reverie)
# and the trained CPU-scale REVERIE student, eager and int8, batch 1, one thread.  Paths as environment
# variables: DATA VIEWS OBJECTS STUDENT(a trained minivln-cpu-reverie) PAUSE(pgrep -f pattern) OUT
set -u
cd "$(dirname "$0")/../.."
DATA=${DATA:-${MINIVLN_DATA:?set DATA or MINIVLN_DATA}}
VIEWS=${VIEWS:?stand-in view features}; OBJECTS=${OBJECTS:?stand-in object features}; STUDENT=${STUDENT:?}
OUT=${OUT:-docs/results/latency_reverie_1thread.json}
PIDS=$( [ -n "${PAUSE:-}" ] && pgrep -f "$PAUSE" | tr '\n' ' ')
if [ -n "$PIDS" ]; then echo "pausing: $PIDS"; kill -STOP $PIDS; trap 'kill -CONT $PIDS; echo resumed' EXIT; fi
sleep 5; uptime; git rev-parse HEAD
minivln bench model --episodes real --task reverie --data-dir "$DATA" --features "$VIEWS" --objects "$OBJECTS" \
  --presets duet-reverie minivln-reverie --checkpoint student-cpu="$STUDENT" \
  --backend torch onnxruntime-int8 --skip duet-reverie:onnxruntime-int8 \
  --reference duet-reverie --batch-sizes 1 --instructions 16 --repeats 3 --warmup 1 --threads 1 --json "$OUT"
