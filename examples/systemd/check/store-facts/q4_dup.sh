#!/bin/bash
# Q4: the same socket sent twice with FDSTORE=1 FDNAME=web (same fd again, then a dup() of it):
# stored once or several times? NFileDescriptorStore and LISTEN_FDS at the next start tell.
# Note: while PID 1 is at log-level debug the service's stdout lines did not reach the journal
# in these containers, so the program's own lines are shown from the info-level steps.
. "$(dirname "$(readlink -f "$0")")/lib.sh"
U=fdtest-store.service
envlines() { jsince "$1" _SYSTEMD_UNIT=$U + _PID=1 | grep -E "env (LISTEN_FDS|LISTEN_FDNAMES)=|passed fd|bound fresh|reusing|notify \"FDSTORE|extra fd|dup of|$U:.*(fd|store)|Cannot"; }

say "start with FDTEST_MODE=dup: binds, sends FDSTORE=1 three times (fd, same fd again, a dup() of fd)"
setmode dup
cur=$(cursor); C systemctl start $U; props $U; envlines "$cur"
say "restart, mode dup (the passed fd is sent back once more), PID 1 at log-level debug"
C systemctl log-level debug
cur=$(cursor); C systemctl restart $U; props $U; envlines "$cur"
C systemctl log-level info
say "restart, mode dup, info level (program lines)"
cur=$(cursor); C systemctl restart $U; props $U; envlines "$cur"
say "restart (mode normal): how many fds come back?"
setmode
cur=$(cursor); C systemctl restart $U; props $U; get; envlines "$cur"
