#!/bin/bash
# Q6: FDSTORE=1 sent by a child of the main process (not the main PID), NotifyAccess=main vs all.
# The child sends, then lingers 2 s (so PID 1 can still map its PID to the unit), then exits;
# the main process sends READY=1 after that.
. "$(dirname "$(readlink -f "$0")")/lib.sh"
for U in fdtest-child-main.service fdtest-child-all.service; do
    say "$U: $(C systemctl show -P NotifyAccess $U | sed 's/^/NotifyAccess=/')"
    cur=$(cursor); C systemctl start $U; props $U
    jsince "$cur" _SYSTEMD_UNIT=$U + _PID=1 | grep -E "bound fresh|child|notify \"FDSTORE|$U|Cannot|permitted"
    say "$U: restart: does the child-sent fd come back?"
    cur=$(cursor); C systemctl restart $U; props $U
    jsince "$cur" _SYSTEMD_UNIT=$U + _PID=1 | grep -E "env (LISTEN_FDS|LISTEN_FDNAMES)=|passed fd|bound fresh|reusing|permitted|Cannot"
    C systemctl stop $U
done
