#!/bin/bash
# Q5: FDSTOREREMOVE=1 FDNAME=web: removed? And a release that moves the listener to 8081.
. "$(dirname "$(readlink -f "$0")")/lib.sh"
U=fdtest-store.service
envlines() { jsince "$1" _SYSTEMD_UNIT=$U + _PID=1 | grep -E "env (LISTEN_FDS|LISTEN_FDNAMES)=|passed fd|bound fresh|reusing|notify \"FDSTORE|$U:.*(fd|store|emov)|Cannot"; }

say "start (normal): stores 127.0.0.1:8080 as web"
cur=$(cursor); C systemctl start $U; props $U; envlines "$cur"
say "restart with FDTEST_MODE=remove: gets web, serves it, sends FDSTOREREMOVE=1 FDNAME=web"
setmode remove
C systemctl log-level debug
cur=$(cursor); C systemctl restart $U; props $U; get; envlines "$cur"
C systemctl log-level info
say "restart (normal): is web still passed?"
setmode
cur=$(cursor); C systemctl restart $U; props $U; get; envlines "$cur"
say "restart with FDTEST_MODE=move: FDSTOREREMOVE web, close it, bind 8081, store as web"
setmode move
cur=$(cursor); C systemctl restart $U; props $U; echo "8080: $(get 8080)"; echo "8081: $(get 8081)"; envlines "$cur"
say "restart (normal): which socket comes back as web?"
setmode
cur=$(cursor); C systemctl restart $U; props $U; echo "8080: $(get 8080)"; echo "8081: $(get 8081)"; envlines "$cur"
