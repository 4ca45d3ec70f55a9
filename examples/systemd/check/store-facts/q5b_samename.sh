#!/bin/bash
# Q5b (extra): a second, different socket stored under the same name "web" without FDSTOREREMOVE.
. "$(dirname "$(readlink -f "$0")")/lib.sh"
U=fdtest-store.service
envlines() { jsince "$1" _SYSTEMD_UNIT=$U + _PID=1 | grep -E "env (LISTEN_FDS|LISTEN_FDNAMES)=|passed fd|extra fd|bound fresh|reusing|notify \"FDSTORE|$U:|Cannot"; }
say "start (normal): stores 8080 as web"
cur=$(cursor); C systemctl start $U; props $U; envlines "$cur"
say "restart with FDTEST_MODE=addsame: keeps web(8080), binds 8081, stores it as web as well"
setmode addsame
cur=$(cursor); C systemctl restart $U; props $U; envlines "$cur"
say "restart (normal): what comes back?"
setmode
cur=$(cursor); C systemctl restart $U; props $U; envlines "$cur"; echo "8080: $(get 8080)"; echo "8081: $(get 8081)"
