#!/usr/bin/env bash
# What follows teacher v4 once its driver has ended, so that the core does not wait for a person
# (started by v4/sitting.sh beside the reverie-teacher-v4 driver; each step as
# docs/preregistration_reverie.md, "Teacher v4", says):
#   1. the teacher's table from what is scored (minivln experiment reverie-teacher-v4 --table-only);
#   2. its gate (v4/gate.py -> v4/gate.json; it refuses a table whose teacher row is not a whole
#      val_unseen submission, so a driver that stopped before scoring leaves no verdict);
#   3. if the gate says ahead, the pre-registered reverie-prereg-table3-v4 on the same core, pinned
#      as before.  If not ahead: nothing more runs (the result is reported).
# The table, gate.json and the submissions are left in the work tree to be committed by hand.
#
#   bash studies/reverie_teacher/v4/after_teacher.sh DRIVER_PID
#
# Paths: O, V, J, D and the pin as in v4/paths.sh.
set -uo pipefail
cd "$(dirname "$0")/../../.." || exit 1
source studies/reverie_teacher/v4/paths.sh  # O, V, J, D and PIN
pid=${1:?usage: after_teacher.sh DRIVER_PID}

# (the process must still be that driver: a pid can be reused)
while grep -q 'reverie-teacher-v4' "/proc/$pid/cmdline" 2> /dev/null; do sleep 60; done
echo "$(date -u '+%F %T') driver $pid ended"
status=$(MINIVLN_DATA=$D minivln experiment reverie-teacher-v4 --out "$O" --status) || {
  echo "--status failed: nothing done" >&2; exit 1; }
if ! grep -Eq '^score:rev-teacher-v4 +done' <<< "$status"; then
  echo "the teacher is not scored yet: nothing to do (the next sitting resumes it)"
  exit 0
fi
MINIVLN_DATA=$D minivln experiment reverie-teacher-v4 --out "$O" --table-only \
  features="$V" objects="$J" data_dir="$D" || exit 1
gate=studies/reverie_teacher/v4/gate.json
MINIVLN_DATA=$D python studies/reverie_teacher/v4/gate.py --teacher docs/results/reverie_teacher_v4.json \
  --students docs/results/reverie_prereg_table3.json --data-dir "$D" --out "$gate" || exit 1
if grep -q '"ahead": true' "$gate"; then
  echo "$(date -u '+%F %T') teacher v4 is ahead: starting reverie-prereg-table3-v4"
  MINIVLN_DATA=$D exec minivln experiment reverie-prereg-table3-v4 --out "$O" --jobs 1 --commit "$PIN" \
    features="$V" objects="$J" data_dir="$D"
fi
echo "$(date -u '+%F %T') teacher v4 is NOT ahead ($gate): nothing more runs"
