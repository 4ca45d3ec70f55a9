#!/bin/bash
# runone.sh VERSION SCENARIO [ARGS]: one boot of systemd VERSION running SCENARIO;
# output in results/VERSION/SCENARIO.log. SYSTEMD_PID1: the systemd-pid1 tool
# (default: ../shared/tools/systemd-pid1 next to the repository).
H=$(cd "$(dirname "$(readlink -f "$0")")" && pwd)
ver=$1 sc=$2; shift 2
name=$(basename "$sc" .sh)
mkdir -p "$H/results/$ver/$name" "$H/tmp"
export TMPDIR=$H/tmp RES=$H/results/$ver/$name
units=(); for u in "$H"/units/*.service; do units+=(--unit "$u"); done
"${SYSTEMD_PID1:-$H/../../../../../shared/tools/systemd-pid1}/run" -v "$ver" --bin "$H/fdtest:fdtest" "${units[@]}" "$H/$sc" "$@" 2>&1 | tee "$H/results/$ver/$name.log"
