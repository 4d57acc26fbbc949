#!/usr/bin/env bash
# Start a sitting of the pre-registered R2R tables (docs/preregistration.md): install, features and the
# experiment directory if this machine lacks them, then one chain per core (chain.sh) with everything
# that is left, in the pre-registered order: Table III, then Table IV with its val_seen scorings, then
# Table V with its val_seen scorings.  Steps already done are skipped, so the same lists serve every
# sitting; a run cut by the end of a sitting resumes from its checkpoint on the same machine and is trained
# again on a new one (a lost pretraining run a pending step needs is trained again first: each step names
# the pretraining run it starts from).  Run from the repository root, in the first minutes of a sitting:
#
#   bash studies/r2r_prereg/sitting.sh            # then watch /work/runs/chain-[AB]-*.log
#   R2R_CORES=1 bash studies/r2r_prereg/sitting.sh   # one chain (A) with every step, in the same order,
#                                                   # when the other core trains REVERIE's teacher v4
#
# Paths: O (experiment directory), F (stand-in features), D (data), R (scratch record) may be set.
set -euo pipefail
cd "$(dirname "$0")/../.."
O=${O:-/work/runs/r2r-prereg-tables}
F=${F:-/work/feats/standin_views.hdf5}
D=${D:-$(cd ../shared/data && pwd)}
R=${R:-/work/runs/record}

if pgrep -f "chain.sh $O" > /dev/null; then
  echo "chains on $O are running already (pgrep -af chain.sh): not starting two more" >&2
  exit 1
fi
# from / : in the repository root the package imports from the working tree even when it is not installed
(cd / && python -c "import minivln") 2> /dev/null || pip install -q -e '.[test,deploy]'
mkdir -p "$(dirname "$F")" "$(dirname "$O")"
[ -f "$F" ] || MINIVLN_DATA=$D minivln features build --out "$F" --no-progress
[ -d "$O" ] || minivln experiment r2r-prereg-table3 --out "$O" --load-record studies/r2r_prereg/record
MINIVLN_DATA=$D minivln experiment r2r-prereg-table3 --out "$O" --status | tail -1

T3=r2r-prereg-table3
# Table III: the rest of seeds 4 (core A) and 5 (core B), each pretraining before the runs that start from it
t3() { local s=$1
  echo "$T3:train:pre-kd-s$s,train:ft-both-s$s,score:ft-both-s$s" \
       "$T3:train:pre-plain-s$s,train:ft-none-s$s,score:ft-none-s$s"; }
# Table IV / V: one run after stage 1 (pre-kd-sS), scored on val_unseen, then on val_seen
ab() { local table=$1 run=$2 s=${2##*-s}
  echo "r2r-prereg-$table:train:pre-kd-s$s,train:$run,score:$run" "r2r-prereg-$table-seen:score:$run@val_seen"; }
core_a=($(t3 4)); core_b=($(t3 5))
for s in 0 1 2; do  # Table IV by seed, two term sets per core
  core_a+=($(ab table4 ft-pano-fuse-s$s) $(ab table4 ft-txt-pano-s$s))
  core_b+=($(ab table4 ft-txt-fuse-s$s) $(ab table4 ft-fuse-s$s))
done
for s in 0 1 2; do  # Table V: KDWeight 0.01 on core A, 1 on core B
  core_a+=($(ab table5 ft-kdw0.01-s$s)); core_b+=($(ab table5 ft-kdw1-s$s))
done

cores=(A B)
if [ "${R2R_CORES:-2}" = 1 ]; then  # one chain: the two lists merged step by step (A's first), same order
  merged=()
  for i in "${!core_a[@]}"; do merged+=("${core_a[$i]}" "${core_b[$i]}"); done
  core_a=("${merged[@]}"); cores=(A)
fi

cp studies/r2r_prereg/chain.sh /tmp/chain.sh  # bash reads a script as it runs: run a copy
stamp=$(date -u +%m%d-%H%M)
for core in "${cores[@]}"; do
  if [ $core = A ]; then steps=("${core_a[@]}"); else steps=("${core_b[@]}"); fi
  nohup /tmp/chain.sh "$O" "$F" "$D" "$R" "${steps[@]}" > "/work/runs/chain-$core-$stamp.log" 2>&1 &
  echo "core $core: ${#steps[@]} steps -> /work/runs/chain-$core-$stamp.log"
done
