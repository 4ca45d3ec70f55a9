# Helpers shared by scenarios.sh and fdstore.sh, sourced by them. They run
# on the host under ../shared/tools/systemd-pid1/run, which provides C, N,
# $RES and $SYSTEMD_PID1_DIR; the sourcing script sets U (the unit), A (the
# address the demo answers on), L (load.py) and SUMMARY.

mainpid() { C systemctl show -p MainPID --value "$U" | tr -d '\r'; }
state() {
    local p out=
    for p in ActiveState SubState Result; do
        out="$out${out:+/}$(C systemctl show -p $p --value "$U" | tr -d '\r')"
    done
    echo "$out"
}
# slow_start NAME [ADDR]: starts the 2 s request and waits until it has
# been sent.
slow_start() {
    rm -f "$RES/$1.slow" "$RES/$1.slow.sent"
    N python3 "$L" slow "${2:-$A}" 2000 "$RES/$1.slow" > /dev/null 2>&1 &
    slow_pid=$!
    for _ in $(seq 200); do [ -e "$RES/$1.slow.sent" ] && return 0; sleep 0.05; done
    echo "the slow request of $1 was never sent" >&2
}
# Waits for the slow request (in this shell: `wait` cannot wait for a
# sibling from inside `$(…)`), then prints its outcome.
slow_done() { wait "$slow_pid"; }
slow_result() {
    python3 -c 'import json,sys
try:
    r=json.loads(open(sys.argv[1]).readline())
except Exception:
    print("none"); sys.exit()
# One word: the row is split on spaces.
why = str(r.get("error") or r.get("status") or r.get("slow")).split(":")[0]
print("ok" if r.get("slow") == "ok" else "cut:" + why.replace(" ", "_"))' "$RES/$1.slow"
}
# load_start NAME SECONDS [ADDR]: 4 clients, a new connection per request.
load_start() {
    rm -f "$RES/$1.load"
    N python3 "$L" load "${3:-$A}" "$2" 4 "$RES/$1.load" > /dev/null 2>&1 &
    load_pid=$!
}
load_done() { wait "$load_pid"; }
load_result() {
    python3 -c 'import json,sys
r=json.loads(open(sys.argv[1]).readline())
print(r["ok"], r["failed"], r["refused"], sep="\t")' "$RES/$1.load"
}
row() {
    printf '%s\n' "$*" | tr ' ' '\t' >> "$SUMMARY"
    printf '%s\n' "$*"
}
# MODE (supervised or replace), written into a drop-in with the lines
# given after it: drop_in_mode MODE [LINE...].
drop_in_mode() {
    local mode=$1
    shift
    [ -n "$mode" ] || return 0
    mkdir -p "$ROOT/etc/systemd/system/$U.d"
    {
        printf '[Service]\nEnvironment=TABLEFLIP_MODE=%s\n' "$mode"
        for line in "$@"; do printf '%s\n' "$line"; done
    } > "$ROOT/etc/systemd/system/$U.d/mode.conf"
    C systemctl daemon-reload
}
