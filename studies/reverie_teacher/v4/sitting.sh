#!/usr/bin/env bash
# Start (or resume) REVERIE's fourth teacher on one core (docs/preregistration_reverie.md, "Teacher v4"):
# stand-in view and object features if this machine lacks them, then one driver of recipe
# reverie-teacher-v4 with one job at a time (pretraining, fine-tuning, scoring; each resumes from its
# checkpoint); once v4/gate.json says the teacher is ahead, recipe reverie-prereg-table3-v4 instead
# (v4/after_teacher.sh, started beside the teacher's driver, writes the table and gate.json when that
# driver ends with the teacher scored, and starts the table at once if the gate says ahead).  Run from
# the repository root in the first minutes of a sitting, after the R2R chain
# (R2R_CORES=1 bash studies/r2r_prereg/sitting.sh):
#
#   bash studies/reverie_teacher/v4/sitting.sh      # then: tail -n 3 /work/runs/reverie-v4-*.log
#
# Paths: O (experiment directory), V and J (view and object features), D (data) may be set (v4/paths.sh).
set -euo pipefail
cd "$(dirname "$0")/../../.."
source studies/reverie_teacher/v4/paths.sh  # O, V, J, D and PIN

if pgrep -f "experiment reverie-.* --out $O" > /dev/null || pgrep -f "v4/after_teacher.sh" > /dev/null; then
  echo "a driver on $O, or v4/after_teacher.sh, is running already (pgrep -af 'experiment reverie-|after_teacher')" >&2
  exit 1
fi
(cd / && python -c "import minivln") 2> /dev/null || pip install -q -e '.[test,deploy]'
mkdir -p "$(dirname "$V")" "$(dirname "$O")"
if [ ! -f "$V" ] || [ ! -f "$J" ]; then
  MINIVLN_DATA=$D minivln features build --out "$V" --objects-out "$J" --no-progress
fi
probe=$O/probe-step600.json  # the step-600 rule's verdict (v4/probe.py)
if [ -f "$probe" ] && grep -q '"verdict": "failed"' "$probe"; then
  echo "the step-600 rule failed ($probe): the design is reported as failed, the run is not resumed" >&2
  exit 1
fi
# once the teacher is scored, its gate (v4/gate.py, committed as v4/gate.json) says what runs next: the
# pre-registered Table III with teacher v4 if it is ahead, nothing if not
recipe=reverie-teacher-v4
gate=studies/reverie_teacher/v4/gate.json
if [ -f "$gate" ]; then
  if grep -q '"ahead": true' "$gate"; then recipe=reverie-prereg-table3-v4
  else echo "teacher v4 is not ahead ($gate): nothing more runs" >&2; exit 1; fi
fi
stamp=$(date -u +%m%d-%H%M)
log=/work/runs/reverie-v4-$stamp.log
# pinned to the pre-registered code, so that a new machine runs the same (the pin is kept where it exists)
MINIVLN_DATA=$D nohup minivln experiment $recipe --out "$O" --jobs 1 --commit "$PIN" \
  features="$V" objects="$J" data_dir="$D" > "$log" 2>&1 &
driver=$!
echo "$recipe -> $log (status: minivln experiment $recipe --out $O --status)"
if [ "$recipe" = reverie-teacher-v4 ]; then  # when the driver ends: the table, the gate, and what it decides
  nohup bash studies/reverie_teacher/v4/after_teacher.sh "$driver" > "/work/runs/reverie-v4-after-$stamp.log" 2>&1 &
  echo "after the teacher -> /work/runs/reverie-v4-after-$stamp.log"
fi
if [ ! -f "$probe" ]; then  # wait for step 600; stop the driver if the rule fails
  nohup python studies/reverie_teacher/v4/probe.py --log "$O/runs/rev-teacher-v4-pre/log.jsonl" \
    --out "$probe" --watch --stop-pid "$driver" > "/work/runs/reverie-v4-probe-$stamp.log" 2>&1 &
  echo "step-600 watcher -> /work/runs/reverie-v4-probe-$stamp.log"
fi
