#!/bin/bash
# Q3 a-c: does the stored "web" socket come back (LISTEN_FDS/LISTEN_FDNAMES, same inode)
# after restart, after kill -9 + Restart=on-failure, after stop + start?
. "$(dirname "$(readlink -f "$0")")/lib.sh"
U=fdtest-store.service
envlines() { jsince "$1" _SYSTEMD_UNIT=$U + _PID=1 | grep -E "env (FDSTORE|LISTEN_FDS|LISTEN_FDNAMES)=|passed fd|bound fresh|reusing|fdtest-store.service:|Cannot|fd store"; }

say "start (first time: binds fresh, stores)"
cur=$(cursor); C systemctl start $U; props $U; get; envlines "$cur"

say "(a) systemctl restart"
cur=$(cursor); C systemctl restart $U; props $U; get; envlines "$cur"

say "(b) kill -9 of the main PID, Restart=on-failure RestartSec=100ms"
old=$(C systemctl show -P MainPID $U)
cur=$(cursor); C kill -9 "$old"; wait_new_main $U "$old"; props $U; get; envlines "$cur"

say "(c) systemctl stop; systemctl start"
cur=$(cursor); C systemctl stop $U; props $U; C systemctl start $U; props $U; get; envlines "$cur"
