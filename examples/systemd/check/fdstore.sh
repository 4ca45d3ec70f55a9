#!/bin/bash
# The scenarios of issue 15 (systemd's fd store), run against one unit under
# a real systemd as PID 1 by ../shared/tools/systemd-pid1/run (see
# README.md next to this file for the command line). Prints one line per
# scenario and writes them to $RES/summary.tsv:
#
#   scenario  ok  failed  refused  slow  mainpid  state  notes
#
# ok/failed/refused: requests of the load that ran during the scenario (4
# clients, a new connection per request, 10 s timeout each); slow: the 2 s
# request in flight when the scenario began ("ok" if answered); mainpid:
# systemd's MainPID before -> after; state: ActiveState/SubState/Result
# after. Notes: `fdnames=` is the LISTEN_FDNAMES the service's main process
# started with, `stored=` what the journal says went into the store.
#
# Arguments: UNIT [MODE]. MODE replace is written into a drop-in as
# Environment=TABLEFLIP_MODE=replace with NotifyAccess=all (a generation
# that binds a socket is not the main process yet when it stores it).
# The binary must be the demo (examples/http.rs) installed as
# /usr/local/bin/tableflip-demo, answering on 127.0.0.1:8080 (or
# HTTP_ADDR).
set -uo pipefail

U=${1:?usage: fdstore.sh UNIT [MODE]}
MODE=${2:-}
A=127.0.0.1:8080
A2=127.0.0.1:8081
L=$SYSTEMD_PID1_DIR/load.py
SUMMARY=$RES/summary.tsv
printf 'scenario\tok\tfailed\trefused\tslow\tmainpid\tstate\tnotes\n' > "$SUMMARY"

# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"
drop_in_mode "$MODE" NotifyAccess=all

# What the main process was started with: LISTEN_FDNAMES, "-" if none.
fdnames() {
    local pid
    pid=$(mainpid)
    C sh -c "tr '\0' '\n' < /proc/$pid/environ | sed -n 's/^LISTEN_FDNAMES=//p'" | tr -d '\r' | grep . || echo -
}
# The demo's log lines since line $1 of its journal that name the store.
stored_since() {
    C journalctl -u "$U" --no-pager -q -o cat | tail -n +$(($1 + 1)) |
        grep -o "kept in systemd's fd store\|back from systemd's fd store\|removing the socket no longer served" |
        sort | uniq -c | awk '{n=$1; $1=""; gsub(/^ /,""); gsub(/ /,"_"); printf "%s%s:%s", sep, $0, n; sep="/"}'
}
journal_lines() { C journalctl -u "$U" --no-pager -q -o cat | wc -l; }
wait_answers() { N python3 "$L" get "$1" --wait 30 > /dev/null || echo "nothing answers on $1" >&2; }

# --- start --------------------------------------------------------------
j=$(journal_lines)
C systemctl start "$U" || { C journalctl -u "$U" --no-pager | tail -20; exit 1; }
wait_answers "$A"
row start - - - - "$(mainpid)" "$(state)" "fdnames=$(fdnames),stored=$(stored_since "$j")"

# --- systemctl restart under load, a slow request in flight -----------------
load_start restart 8 "$A"
sleep 1
mp=$(mainpid) j=$(journal_lines)
slow_start restart "$A"
C systemctl restart "$U"
slow_done; s=$(slow_result restart)
load_done
row restart $(load_result restart) "$s" "$mp->$(mainpid)" "$(state)" "fdnames=$(fdnames),stored=$(stored_since "$j")"

# --- kill -9 of the main PID (Restart=on-failure) ----------------------------
load_start kill-main 8 "$A"
sleep 1
mp=$(mainpid) j=$(journal_lines)
C kill -9 "$mp"
for _ in $(seq 100); do
    now=$(mainpid)
    [ -n "$now" ] && [ "$now" != 0 ] && [ "$now" != "$mp" ] && break
    sleep 0.1
done
load_done
row kill-9-main $(load_result kill-main) - "$mp->$(mainpid)" "$(state)" "fdnames=$(fdnames),stored=$(stored_since "$j"),restarts=$(C systemctl show -p NRestarts --value "$U" | tr -d '\r')"

# --- stop, then start -----------------------------------------------------------
load_start stop-start 8 "$A"
sleep 1
mp=$(mainpid) j=$(journal_lines)
C systemctl stop "$U"
C systemctl start "$U"
load_done
row stop-then-start $(load_result stop-start) - "$mp->$(mainpid)" "$(state)" "fdnames=$(fdnames),stored=$(stored_since "$j")"

# --- a release that moves the listener (HTTP_ADDR), then restart ----------------
mkdir -p "$ROOT/etc/systemd/system/$U.d"
printf '[Service]\nEnvironment=HTTP_ADDR=%s\n' "$A2" > "$ROOT/etc/systemd/system/$U.d/moved.conf"
C systemctl daemon-reload
mp=$(mainpid) j=$(journal_lines)
C systemctl restart "$U"
wait_answers "$A2"
old=$(N python3 "$L" get "$A" --timeout 1 > /dev/null 2>&1 && echo serves || echo refused)
row moved-listener - - - - "$mp->$(mainpid)" "$(state)" "fdnames=$(fdnames),stored=$(stored_since "$j"),old_address=$old"
# And the restart after it: only the moved socket comes back.
mp=$(mainpid) j=$(journal_lines)
load_start moved-restart 6 "$A2"
sleep 1
C systemctl restart "$U"
load_done
row moved-then-restart $(load_result moved-restart) - "$mp->$(mainpid)" "$(state)" "fdnames=$(fdnames),stored=$(stored_since "$j")"

C systemctl stop "$U"
C journalctl -u "$U" --no-pager > "$RES/journal.txt"
C journalctl --no-pager -o cat _PID=1 | grep -i 'fd store\|fdstore\|FileDescriptorStore' > "$RES/manager.txt" || true
echo "summary: $SUMMARY"
