#!/bin/bash
# `systemctl reload` through tableflip-ctl (ExecReload=, issue 16's control
# socket), run against one unit under a real systemd as PID 1 by
# ../shared/tools/systemd-pid1/run (see README.md next to this file for the
# command line): does the reload fail when the upgrade fails, and succeed
# otherwise? Prints one line per scenario and writes them to
# $RES/summary.tsv:
#
#   scenario  reload_exit  reload_s  ok  failed  refused  mainpid  generation  serving  state  notes
#
# reload_exit: the exit status of `systemctl reload`; reload_s: how long it
# took; ok/failed/refused: requests of the load that ran during the
# scenario (4 clients, a new connection per request, from 1 s before the
# reload to 3 s after it); mainpid, generation (from `tableflip-ctl
# status`), serving (the PID that answers GET /): before -> after;
# state: ActiveState/SubState/Result after. Notes: `ctl=` the exit status
# of tableflip-ctl that systemd logged ("Control process exited, ...
# status=N"), `reply=` its JSON line's outcome and failure, `said=` what
# `systemctl reload` printed on stderr.
#
# Scenarios: good-reload (the binary as installed), broken-reload (the
# binary replaced by a script that exits 3, as scenarios.sh does), fixed-
# reload (the good binary put back); whole-run: a load over these three.
# Then hung-reload (a binary that never gets ready: the demo's
# upgrade_timeout, 30 s, ends the upgrade), after-hung-reload (the good
# binary back), slow-reload (a wrapper script that sleeps 2 s, then execs
# the good binary: does `systemctl reload` wait for the new generation?),
# stop. slow-reload comes last: in replace mode, the generation it starts
# takes the path the wrapper exec'd (/usr/local/bin/good) as its own
# executable, and later upgrades would run that path, not the unit's.
# Raw outputs (systemctl status, the journal, each reload's stderr, each
# load's JSON line) are kept in $RES.
#
# Arguments: UNIT [MODE]. MODE (supervised or replace) is written into a
# drop-in as Environment=TABLEFLIP_MODE=…; without it the unit runs as
# written. The demo (examples/http.rs) must be installed as
# /usr/local/bin/tableflip-demo and tableflip-ctl as
# /usr/local/bin/tableflip-ctl (run-all.sh passes both with --bin); the
# unit's ExecReload= runs `tableflip-ctl upgrade --socket
# /run/tableflip-demo/tableflip.sock`.
set -uo pipefail

U=${1:?usage: ctl.sh UNIT [MODE]}
MODE=${2:-}
A=127.0.0.1:8080
L=$SYSTEMD_PID1_DIR/load.py
BIN=/usr/local/bin/tableflip-demo
CTL=/usr/local/bin/tableflip-ctl
SOCK=/run/tableflip-demo/tableflip.sock
SUMMARY=$RES/summary.tsv
printf 'scenario\treload_exit\treload_s\tok\tfailed\trefused\tmainpid\tgeneration\tserving\tstate\tnotes\n' > "$SUMMARY"

# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"
drop_in_mode "$MODE"
printf '#!/bin/sh\necho "broken build" >&2\nexit 3\n' > "$ROOT/usr/local/bin/broken"
# A release that takes 2 s to start, and one that never gets ready.
printf '#!/bin/sh\nsleep 2\nexec /usr/local/bin/good "$@"\n' > "$ROOT/usr/local/bin/slow"
printf '#!/bin/sh\nexec sleep 3600\n' > "$ROOT/usr/local/bin/hung"
chmod 0755 "$ROOT/usr/local/bin/broken" "$ROOT/usr/local/bin/slow" "$ROOT/usr/local/bin/hung"
cp "$ROOT$BIN" "$ROOT/usr/local/bin/good"

serving() { N python3 "$L" get "$A" --timeout 2 2>/dev/null | awk '{print $2}'; }
# The generation number tableflip-ctl status reports, "?" if none.
generation() {
    C "$CTL" status --socket "$SOCK" --json 2>/dev/null | tr -d '\r' |
        python3 -c 'import json,sys
try: print(json.loads(sys.stdin.readline())["generation"])
except Exception: print("?")'
}
journal_lines() { C journalctl -u "$U" --no-pager -q | wc -l; }
journal_since() { C journalctl -u "$U" --no-pager -q | tr -d '\r' | tail -n +$(($1 + 1)); }
# reload NAME [SECONDS]: `systemctl reload` under load, and its row. The
# scenario's load runs SECONDS (default 10), from 1 s before the reload.
reload() {
    local name=$1 j t0 t1
    load_start "$name" "${2:-10}"
    sleep 1
    mp0=$(mainpid) gen0=$(generation) srv0=$(serving)
    j=$(journal_lines)
    t0=$(date +%s.%N)
    C systemctl reload "$U" > "$RES/$name.reload.out" 2> "$RES/$name.reload.err"
    rc=$?
    t1=$(date +%s.%N)
    secs=$(python3 -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 2))" "$t0" "$t1")
    load_done
    mp1=$(mainpid) gen1=$(generation) srv1=$(serving)
    C systemctl status "$U" --no-pager -n 0 > "$RES/$name.status.txt" 2>&1
    journal_since "$j" > "$RES/$name.journal.txt"
    # What systemd logged about the control process (nothing when it
    # exited 0), and tableflip-ctl's JSON line (its stdout, in the unit's
    # journal).
    ctl=$(grep -o 'Control process exited, code=[a-z]*, status=[0-9]*' "$RES/$name.journal.txt" | sed 's/.*status=//' | tail -1)
    reply=$(grep -o '{"outcome".*}' "$RES/$name.journal.txt" | tail -1 |
        python3 -c 'import json,sys
try:
    r=json.loads(sys.stdin.readline())
    print(r["outcome"] + (":" + str(r.get("failure")) if r.get("failure") else ""))
except Exception: print("none")')
    said=$(tr -d '\r' < "$RES/$name.reload.err" | head -1 | tr ' ' '_')
    row "$name" "$rc" "$secs" $(load_result "$name") "$mp0->$mp1" "$gen0->$gen1" "$srv0->$srv1" "$(state)" \
        "active=$(C systemctl is-active "$U" | tr -d '\r'),ctl=${ctl:-0},reply=$reply${said:+,said=$said}"
}

# --- start --------------------------------------------------------------
C systemctl start "$U" || { C journalctl -u "$U" --no-pager | tail -20; exit 1; }
N python3 "$L" get "$A" --wait 20 > /dev/null || { echo "the service never answered" >&2; exit 1; }
sock=$(C stat -c '%A_%U' "$SOCK" 2> /dev/null | tr -d '\r')
row start - - - - - "$(mainpid)" "$(generation)" "$(serving)" "$(state)" "socket=${sock:-missing}"

# A load over the three reloads, beside each scenario's own (about 33 s).
N python3 "$L" load "$A" 36 4 "$RES/whole.load" > /dev/null 2>&1 &
whole_pid=$!
sleep 1

# --- a. the good binary --------------------------------------------------------
reload good-reload

# --- b. a broken binary --------------------------------------------------------
C install -m 0755 /usr/local/bin/broken "$BIN"
reload broken-reload
grep -i 'upgrade failed\|upgrade refused\|cannot upgrade\|broken build' "$RES/broken-reload.journal.txt" > "$RES/broken-reload.said.txt" || true

# --- c. the good binary back ---------------------------------------------------
C install -m 0755 /usr/local/bin/good "$BIN"
reload fixed-reload

wait "$whole_pid"
row whole-run - - $(load_result whole) - - - - "$(python3 -c 'import json,sys; r=json.loads(open(sys.argv[1]).readline()); print("seconds=%s,errors=%s" % (r["seconds"], ",".join("%s:%s" % kv for kv in r["errors"].items()) or "none"))' "$RES/whole.load")"

# --- more: a hung release, the good one back, a slow one ---------------------
C install -m 0755 /usr/local/bin/hung "$BIN"
reload hung-reload 40
C install -m 0755 /usr/local/bin/good "$BIN"
reload after-hung-reload
C install -m 0755 /usr/local/bin/slow "$BIN"
reload slow-reload
C install -m 0755 /usr/local/bin/good "$BIN"

# --- stop -------------------------------------------------------------------------
t0=$(date +%s.%N)
C systemctl stop "$U"
t1=$(date +%s.%N)
row stop - "$(python3 -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 2))" "$t0" "$t1")" - - - "$(mainpid)" - - "$(state)" "runtime_dir=$(C sh -c 'test -e /run/tableflip-demo && echo kept || echo removed' | tr -d '\r')"
C journalctl -u "$U" --no-pager > "$RES/journal.txt"
echo "summary: $SUMMARY"
