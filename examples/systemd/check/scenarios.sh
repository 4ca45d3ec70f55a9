#!/bin/bash
# The field scenarios of issue 14, run against one unit under a real systemd
# as PID 1 by ../shared/tools/systemd-pid1/run (see README.md next to this
# file for the command line). Prints one line per scenario and writes them
# to $RES/summary.tsv:
#
#   scenario  ok  failed  refused  slow  mainpid  state  notes
#
# ok/failed/refused: requests of the load that ran during the scenario
# (4 clients, a new connection per request); slow: the request that was in
# flight (2 s) when the reload, stop or kill happened, "ok" if answered;
# mainpid: systemd's MainPID before -> after; state: ActiveState/SubState/
# Result after the scenario.
#
# Arguments: UNIT [MODE]. MODE (supervised or replace) is written into a
# drop-in as Environment=TABLEFLIP_MODE=…; without it the unit runs as
# written. The binary must be the demo (examples/http.rs) installed as
# /usr/local/bin/tableflip-demo, answering on 127.0.0.1:8080.
set -uo pipefail

U=${1:?usage: scenarios.sh UNIT [MODE]}
MODE=${2:-}
A=127.0.0.1:8080
L=$SYSTEMD_PID1_DIR/load.py
BIN=/usr/local/bin/tableflip-demo
SUMMARY=$RES/summary.tsv
printf 'scenario\tok\tfailed\trefused\tslow\tmainpid\tstate\tnotes\n' > "$SUMMARY"

# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"
drop_in_mode "$MODE"
# A binary that fails to start, for the broken-upgrade scenario.
printf '#!/bin/sh\necho "broken build" >&2\nexit 3\n' > "$ROOT/usr/local/bin/broken"
chmod 0755 "$ROOT/usr/local/bin/broken"
cp "$ROOT$BIN" "$ROOT/usr/local/bin/good"

# The PID that answers GET / (the demo answers "pid N"), empty if none.
serving() { N python3 "$L" get "$A" --timeout 2 2>/dev/null | awk '{print $2}'; }
# Waits (up to $2 s) until a process other than $1 answers GET /.
wait_serving_other() {
    local old=$1 deadline=$((SECONDS + ${2:-30})) now
    while [ $SECONDS -lt $deadline ]; do
        now=$(serving)
        if [ -n "$now" ] && [ "$now" != "$old" ]; then echo "$now"; return 0; fi
        sleep 0.1
    done
    return 1
}
# Before each scenario: the unit must be serving. If an earlier scenario
# left it stopped (no Restart=), it is started again, and the scenario's
# notes say so.
restarted=
ensure_running() {
    restarted=
    if [ "$(C systemctl is-active "$U" | tr -d '\r')" != active ] || [ -z "$(serving)" ]; then
        C systemctl reset-failed "$U" 2> /dev/null
        C systemctl restart "$U"
        N python3 "$L" get "$A" --wait 20 > /dev/null || echo "the service does not answer after a restart" >&2
        restarted=",restarted_before"
    fi
}
# --- start --------------------------------------------------------------
C systemctl start "$U" || { C journalctl -u "$U" --no-pager | tail -20; exit 1; }
N python3 "$L" get "$A" --wait 20 > /dev/null || { echo "the service never answered" >&2; exit 1; }
start_pid=$(mainpid)
row start - - - - "$start_pid" "$(state)" "serving=$(serving)"

# --- reload x5 under load, a slow request in flight each time -------------
load_start reload 30
sleep 1
pids=$start_pid slows=ok
for i in 1 2 3 4 5; do
    before=$(serving)
    slow_start "reload$i"
    C systemctl reload "$U" || true
    wait_serving_other "$before" 40 > /dev/null || echo "reload $i: no new generation serves" >&2
    slow_done; s=$(slow_result "reload$i"); [ "$s" = ok ] || slows="$slows reload$i:$s"
    pids="$pids,$(mainpid)"
done
load_done
row reload-x5 $(load_result reload) "$slows" "$start_pid->$(mainpid)" "$(state)" "mainpids=$pids"

# --- a broken binary, then reload -------------------------------------------
ensure_running
load_start broken 8
sleep 1
before=$(serving) mp=$(mainpid)
C install -m 0755 /usr/local/bin/broken "$BIN"
C systemctl reload "$U" || true
sleep 4   # the load runs on; the outcome is read from the journal below
after=$(serving)
C install -m 0755 /usr/local/bin/good "$BIN"
said=$(C journalctl -u "$U" --no-pager -n 40 | grep -c -i 'upgrade failed\|upgrade refused\|cannot upgrade' || true)
load_done
row broken-binary $(load_result broken) - "$mp->$(mainpid)" "$(state)" "serving=$before->$after,failure_logged=$said$restarted"

# --- kill -9 of the serving generation ---------------------------------------
ensure_running
load_start kill-gen 8
sleep 1
mp=$(mainpid) gen=$(serving)
C kill -9 "$gen"
new=$(wait_serving_other "$gen" 20 || echo none)
load_done
row kill-9-generation $(load_result kill-gen) - "$mp->$(mainpid)" "$(state)" "serving=$gen->$new$restarted"

# --- kill -9 of the new generation while the old one drains --------------------
# The old generation keeps draining for the slow request; the new one dies.
# Then one more reload: does the service still upgrade?
ensure_running
load_start kill-succ 12
sleep 1
before=$(serving) mp=$(mainpid)
slow_start kill-succ
C systemctl reload "$U" || true
new=$(wait_serving_other "$before" 40 || echo none)
C kill -9 "$new"
repl=$(wait_serving_other "$new" 20 || echo none)
mid=$(mainpid)
alive=$(C sh -c "kill -0 $mid 2>/dev/null && echo alive || echo dead" | tr -d '\r')
slow_done; s=$(slow_result kill-succ)
C systemctl reload "$U" || true
next=$(wait_serving_other "$repl" 40 || echo none)
load_done
row kill-9-successor-draining $(load_result kill-succ) "$s" "$mp->$mid->$(mainpid)" "$(state)" "serving=$before->$new->$repl->$next,mainpid_after_kill=$alive$restarted"

# --- stop right after an upgrade, a slow request in flight ---------------------
ensure_running
before=$(serving) mp=$(mainpid)
C systemctl reload "$U" || true
wait_serving_other "$before" 40 > /dev/null || echo "stop: the upgrade never finished" >&2
slow_start stop
lines=$(C journalctl -u "$U" --no-pager -q | wc -l)
t0=$(date +%s.%N)
C systemctl stop "$U"
t1=$(date +%s.%N)
slow_done; s=$(slow_result stop)
# systemd's own kills during the stop (not the scenarios' kill -9 above).
killed=$(C journalctl -u "$U" --no-pager -q | tail -n +$((lines + 1)) | grep -c 'systemd\[1\].*\(SIGKILL\|Killing\)' || true)
row stop-after-upgrade - - - "$s" "$mp->$(mainpid)" "$(state)" "stop_s=$(python3 -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 2))" "$t0" "$t1"),sigkill_lines=$killed$restarted"

# --- kill -9 of the main PID -------------------------------------------------
ensure_running
load_start kill-main 8
sleep 1
mp=$(mainpid) gen=$(serving)
C kill -9 "$mp"
sleep 5
load_done
row kill-9-main $(load_result kill-main) - "$mp->$(mainpid)" "$(state)" "serving=$gen->$(serving),restarts=$(C systemctl show -p NRestarts --value "$U" | tr -d '\r')"
C systemctl stop "$U"
C journalctl -u "$U" --no-pager > "$RES/journal.txt"
echo "summary: $SUMMARY"
