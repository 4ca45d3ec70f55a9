#!/bin/bash
# Q3 d: stop + start with FileDescriptorStorePreserve=yes (is the key even accepted?)
. "$(dirname "$(readlink -f "$0")")/lib.sh"
U=fdtest-preserve.service
envlines() { jsince "$1" _SYSTEMD_UNIT=$U + _PID=1 | grep -E "env (FDSTORE|LISTEN_FDS|LISTEN_FDNAMES)=|passed fd|bound fresh|reusing|$U:|Cannot|fd store"; }

say "is FileDescriptorStorePreserve= accepted? (systemd-analyze verify, boot journal)"
C systemd-analyze verify /etc/systemd/system/$U 2>&1 | grep -v 'is not executable\|No such file' ; echo "verify rc=${PIPESTATUS[0]}"
C journalctl -q -b -o json _PID=1 | python3 -c '
import json, sys
for l in sys.stdin:
    d = json.loads(l); m = d.get("MESSAGE")
    if isinstance(m, str) and "FileDescriptorStorePreserve" in m: print("prio=%s %s" % (d.get("PRIORITY"), m))'
C systemctl show -p FileDescriptorStorePreserve $U

say "start"
cur=$(cursor); C systemctl start $U; props $U; get; envlines "$cur"
say "stop (props while inactive)"
cur=$(cursor); C systemctl stop $U; props $U; get; envlines "$cur"
say "start again"
cur=$(cursor); C systemctl start $U; props $U; get; envlines "$cur"
say "stop again, at log-level debug: why is the store gone? (GC of an unreferenced unit)"
C systemctl log-level debug
cur=$(cursor); C systemctl stop $U; sleep 0.3
jsince "$cur" _PID=1 | grep -E "$U: (Changed|Releasing|Collecting)|stored fd"
C systemctl log-level info

say "(d2) same, but the unit is kept loaded: systemctl add-wants multi-user.target $U"
C systemctl add-wants multi-user.target $U
cur=$(cursor); C systemctl start $U; props $U; get; envlines "$cur"
say "(d2) stop (props while inactive)"
C systemctl log-level debug
cur=$(cursor); C systemctl stop $U; props $U; get
jsince "$cur" _PID=1 | grep -E "$U: (Changed|Releasing|Collecting)|stored fd"
C systemctl log-level info
say "(d2) start again"
cur=$(cursor); C systemctl start $U; props $U; get; envlines "$cur"
if [ "$V" -ge 254 ]; then
    say "254: stop, systemctl clean --what=fdstore, start"
    C systemctl stop $U; props $U
    cur=$(cursor); C systemctl clean --what=fdstore $U; echo "clean rc=$?"; props $U; get
    C systemctl start $U; props $U; envlines "$cur"
fi
