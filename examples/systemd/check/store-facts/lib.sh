# Sourced by the scenario scripts (they run on the host under systemd-pid1/run,
# which provides C, N, $ROOT, $RES, $SYSTEMD_PID1_VERSION, $SYSTEMD_PID1_DIR).
V=$SYSTEMD_PID1_VERSION
say() { printf '\n=== [%s] %s\n' "$V" "$*"; }

# Journal cursor "now"; jsince CUR [journalctl filters...] prints "prio=P pid=PID MESSAGE".
cursor() { C journalctl -q -n 0 --show-cursor | sed -n 's/^-- cursor: //p'; }
jsince() {
    local cur=$1; shift
    sleep 1   # let journald catch up with stdout lines
    C journalctl -q -o json --after-cursor "$cur" "$@" | python3 -c '
import json, sys
for line in sys.stdin:
    d = json.loads(line)
    m = d.get("MESSAGE")
    if isinstance(m, list): m = bytes(m).decode(errors="replace")
    print("prio=%s pid=%s %s" % (d.get("PRIORITY"), d.get("_PID"), m))'
}
# Service output + everything PID 1 logged since CUR (manager lines are the pid=1 ones).
jall() { jsince "$1" _SYSTEMD_UNIT="$2" + _PID=1; }

setmode() { if [ -n "$1" ]; then echo "FDTEST_MODE=$1" > "$ROOT/etc/fdtest.env"; else rm -f "$ROOT/etc/fdtest.env"; fi; }
get() { N curl -s -m 2 "http://127.0.0.1:${1:-8080}/" || echo "curl failed (port ${1:-8080}) rc=$?"; }
props() {
    # NFileDescriptorStore/FileDescriptorStorePreserve only exist on newer versions; show prints nothing for unknown ones
    C systemctl show -p MainPID -p ActiveState -p SubState -p NRestarts -p FileDescriptorStoreMax \
        -p NFileDescriptorStore -p FileDescriptorStorePreserve -p StatusText "$1" | tr '\n' ' '; echo
}
wait_new_main() { # UNIT OLDPID: wait (<=10 s) until active with a different MainPID
    local u=$1 old=$2 p s
    for _ in $(seq 100); do
        p=$(C systemctl show -P MainPID "$u"); s=$(C systemctl show -P ActiveState "$u")
        [ "$s" = active ] && [ "$p" != 0 ] && [ "$p" != "$old" ] && return 0
        sleep 0.1
    done
    echo "timeout waiting for new main PID of $u"; return 1
}
