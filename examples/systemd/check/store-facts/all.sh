#!/bin/bash
# Run every scenario on systemd 252 and 254, one container at a time. Logs: results/VER/SCENARIO.log
# Needs root, gcc (static glibc), and the images of the systemd-pid1 tool
# (SYSTEMD_PID1, see runone.sh; its ./setup builds them).
set -u
H=$(cd "$(dirname "$(readlink -f "$0")")" && pwd)
cd "$H" && gcc -static -O2 -Wall -o fdtest fdtest.c || exit 1
for v in ${VERSIONS:-252 254}; do
    for sc in q12_env_and_log.sh q3_restart.sh q3d_preserve.sh q4_dup.sh q5_remove.sh q5b_samename.sh q6_child.sh q7_load.sh; do
        ./runone.sh "$v" "$sc" > /dev/null 2>&1 || echo "$v $sc: rc=$?"
    done
done
ls -l results/*/*.log
