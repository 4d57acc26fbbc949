#!/usr/bin/env bash
# One core's share of a sitting (docs/preregistration.md, amendment of 2026-12-07): run the given steps in
# order, each a driver call with --jobs 1 on the shared experiment directory, and save the directory's
# record after each, so that whatever has been scored can be committed at any time.  Stops at the first
# step that fails.  Run a copy (bash reads a script as it goes), one per core:
#
#   cp studies/r2r_prereg/chain.sh /tmp/chain.sh
#   /tmp/chain.sh OUT FEATS DATA RECORD 'r2r-prereg-table3:train:pre-kd-s0' 'r2r-prereg-table3:train:ft-both-s0,score:ft-both-s0' ...
#
# A step is RECIPE:ONLY (ONLY as --only takes it).  studies/r2r_prereg/sitting.sh starts the two chains
# of a sitting with everything that is left.
set -u
out=$1 feats=$2 data=$3 record=$4
shift 4
for step in "$@"; do
  recipe=${step%%:*} only=${step#*:}
  # a step whose every job has its done mark (DIR/done/train-RUN.json, score-RUN[@SPLIT].json) is skipped
  # without starting a driver, so the same list can be started again every sitting
  all_done=1
  IFS=, read -ra jobs <<< "$only"
  for job in "${jobs[@]}"; do
    [ -f "$out/done/${job/:/-}.json" ] || { all_done=0; break; }
  done
  if [ "$all_done" = 1 ]; then echo "=== $(date -u +%H:%M:%S) $recipe --only $only: done, skipped"; continue; fi
  echo "=== $(date -u +%H:%M:%S) $recipe --only $only"
  log=$(mktemp)
  MINIVLN_DATA=$data minivln experiment "$recipe" --out "$out" --jobs 1 --only "$only" \
    features="$feats" data_dir="$data" > "$log" 2>&1
  rc=$?
  grep -E '^(started|finished|FAILED|held|lost|skipped)|Error' "$log"
  [ "$rc" != 0 ] && tail -20 "$log"
  rm -f "$log"
  if ! flock "$out/.record.lock" minivln experiment "$recipe" --out "$out" --save-record "$record"; then
    echo "=== saving the record failed: stopping"; exit 3
  fi
  if [ "$rc" != 0 ]; then echo "=== step failed (exit $rc): stopping"; exit "$rc"; fi
done
echo "=== $(date -u +%H:%M:%S) all steps done"
