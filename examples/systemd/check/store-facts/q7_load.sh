#!/bin/bash
# Q7: refused connections while the service is restarted (or kill -9'd) under load,
# with the fd store (fdtest-store) vs without (fdtest-nostore: binds fresh every start).
# load.py: CONC threads, one new connection per request, no retries; 3 restarts per 8 s window.
. "$(dirname "$(readlink -f "$0")")/lib.sh"
L=$SYSTEMD_PID1_DIR/load.py A=127.0.0.1:8080
SECS=${SECS:-8} CONC=${CONC:-4}
for action in restart kill; do
  for U in fdtest-nostore.service fdtest-store.service; do
    out=$RES/load-$action-$U.json; rm -f "$out"
    C systemctl start $U || exit 1
    N python3 "$L" get $A --wait 5 > /dev/null
    N python3 "$L" load $A "$SECS" "$CONC" "$out" > /dev/null & load=$!
    for t in 1.5 2 2; do
        sleep $t
        if [ $action = restart ]; then C systemctl restart $U
        else old=$(C systemctl show -P MainPID $U); C kill -9 "$old"; wait_new_main $U "$old"; fi
    done
    wait $load
    say "$action x3 under load ($SECS s, $CONC conc): $U  NRestarts=$(C systemctl show -P NRestarts $U)"
    python3 -c 'import json,sys; r=json.loads(open(sys.argv[1]).readline()); print("ok=%(ok)s failed=%(failed)s refused=%(refused)s errors=%(errors)s max_ms=%(max_ms)s fail_window_s=%(fail_window_s)s" % r); print("served by:", r["bodies"])' "$out"
    C systemctl stop $U
    C systemctl reset-failed $U 2> /dev/null
  done
done
