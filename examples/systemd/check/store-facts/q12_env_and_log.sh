#!/bin/bash
# Q1: is $FDSTORE set (with / without FileDescriptorStoreMax=)?
# Q2: what does systemd log when FDSTORE=1 arrives for a unit without FileDescriptorStoreMax=?
. "$(dirname "$(readlink -f "$0")")/lib.sh"

say "Q2: fdtest-nostore.service (no FileDescriptorStoreMax=) sends FDSTORE=1"
cur=$(cursor)
C systemctl start fdtest-nostore.service
props fdtest-nostore.service
get
jall "$cur" fdtest-nostore.service
say "Q2: journalctl -u fdtest-nostore.service -o cat"
C journalctl -q -u fdtest-nostore.service -o cat
say "Q2: journalctl -u fdtest-nostore.service -p warning -o cat (only warning and worse)"
C journalctl -q -u fdtest-nostore.service -p warning -o cat
say "Q2: journalctl -o cat _PID=1 | tail -4"
C journalctl -q -o cat _PID=1 | tail -4
say "Q2: restart nostore (does anything come back?)"
cur=$(cursor)
C systemctl restart fdtest-nostore.service
jall "$cur" fdtest-nostore.service
C systemctl stop fdtest-nostore.service

say "Q1: fdtest-store.service (FileDescriptorStoreMax=4)"
cur=$(cursor)
C systemctl start fdtest-store.service
props fdtest-store.service
jall "$cur" fdtest-store.service
C systemctl stop fdtest-store.service

say "Q2 again with PID 1 at log-level debug (nostore)"
C systemctl log-level debug
cur=$(cursor)
C systemctl start fdtest-nostore.service
jsince "$cur" _PID=1 | grep -E 'fdtest-nostore.service:' | grep -vE 'cgroup|Sent message' | head -40
C systemctl log-level info
C systemctl stop fdtest-nostore.service
