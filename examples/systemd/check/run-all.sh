#!/bin/bash
# Runs a scenario script for every unit and mode below under systemd 252
# and 254 (../shared/tools/systemd-pid1/, as root) and prints one markdown
# table per systemd version and configuration: the tables of ../README.md.
#
#   sudo examples/systemd/check/run-all.sh PATH/TO/systemd-pid1 DEMO_BINARY [OUT]
#   sudo SCRIPT=fdstore examples/systemd/check/run-all.sh PATH/TO/systemd-pid1 DEMO_BINARY [OUT]
#   sudo SCRIPT=ctl examples/systemd/check/run-all.sh PATH/TO/systemd-pid1 DEMO_BINARY [OUT]
#
# SCRIPT: scenarios (the default: issue 14's field scenarios, about 90 s
# per run, 11 runs), fdstore (systemd's fd store, issue 15: about 60 s
# per run, 6 runs) or ctl (`systemctl reload` through tableflip-ctl, issue
# 16: about 45 s per run, 4 runs). DEMO_BINARY: a release build of
# examples/http.rs (`cargo build --release --example http`, then
# target/release/examples/http). SCRIPT=ctl also installs tableflip-ctl
# (`cargo build --release -p tableflip-ctl`) as
# /usr/local/bin/tableflip-ctl: CTL_BINARY, by default tableflip-ctl in
# the directory above DEMO_BINARY's (target/release/ for
# target/release/examples/http).
# OUT (default: a new directory under $TMPDIR) keeps every run's results.
# VERSIONS="254" or ONLY=supervised (a part of the unit's name) run fewer.
set -uo pipefail

TOOL=${1:?usage: run-all.sh PATH/TO/systemd-pid1 DEMO_BINARY [OUT]}
BIN=${2:?usage: run-all.sh PATH/TO/systemd-pid1 DEMO_BINARY [OUT]}
OUT=${3:-$(mktemp -d "${TMPDIR:-/tmp}/tableflip-systemd-XXXXXX")}
SCRIPT=${SCRIPT:-scenarios}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
UNITS=$(cd "$HERE/.." && pwd)
mkdir -p "$OUT"
# bash reads a script as it runs it: run copies, so that editing the
# originals meanwhile cannot change a run half-way.
cp "$HERE/$SCRIPT.sh" "$HERE/lib.sh" "$OUT/" || exit 2

# unit file : mode ("" = as the unit says)
EXTRA=()   # more --bin for the tool
case $SCRIPT in
scenarios)
    CONFIGS=(
        "$HERE/obvious.service:"
        "$HERE/obvious.service:replace"
        "$UNITS/tableflip-demo-supervised.service:"
        "$UNITS/tableflip-demo-notify-reload.service:"
        "$UNITS/tableflip-demo-notify.service:"
        "$UNITS/tableflip-demo-pidfile.service:"
    )
    ;;
fdstore)
    CONFIGS=(
        "$UNITS/tableflip-demo-fdstore.service:"
        "$UNITS/tableflip-demo-fdstore.service:replace"
        "$UNITS/tableflip-demo-supervised.service:"
    )
    ;;
ctl)
    CONFIGS=(
        "$UNITS/tableflip-demo-ctl.service:"
        "$UNITS/tableflip-demo-ctl.service:replace"
    )
    CTL_BINARY=${CTL_BINARY:-$(dirname "$BIN")/../tableflip-ctl}
    [ -f "$CTL_BINARY" ] || { echo "no $CTL_BINARY: cargo build --release -p tableflip-ctl, or set CTL_BINARY" >&2; exit 2; }
    EXTRA=(--bin "$CTL_BINARY:tableflip-ctl")
    ;;
*)
    echo "SCRIPT=$SCRIPT: expected scenarios, fdstore or ctl" >&2
    exit 2
    ;;
esac
status=0
for v in ${VERSIONS:-252 254}; do
    for c in "${CONFIGS[@]}"; do
        unit=${c%%:*} mode=${c##*:}
        name=$(basename "$unit" .service)
        # Type=notify-reload needs systemd 253 or later.
        if [ "$v" -lt 253 ] && [ "$name" = tableflip-demo-notify-reload ]; then continue; fi
        # ONLY=word: just the configurations whose name contains it.
        case "$name${mode:+-$mode}" in *"${ONLY:-}"*) ;; *) continue ;; esac
        res="$OUT/$v-$name${mode:+-$mode}"
        rm -rf "$res"; mkdir -p "$res"
        echo "== systemd $v, $name${mode:+ (TABLEFLIP_MODE=$mode)}" >&2
        RES=$res timeout 900 "$TOOL/run" -v "$v" --bin "$BIN:tableflip-demo" ${EXTRA[@]+"${EXTRA[@]}"} --unit "$unit" \
            "$OUT/$SCRIPT.sh" "$name.service" $mode > "$res/run.log" 2>&1 || status=1
        {
            echo
            echo "#### systemd $v, \`$name.service\`${mode:+ with TABLEFLIP_MODE=$mode}"
            echo
            if [ -s "$res/summary.tsv" ]; then
                head -1 "$res/summary.tsv" | sed 's/\t/ | /g; s/^/| /; s/$/ |/'
                head -1 "$res/summary.tsv" | sed 's/[^\t]*/---/g; s/\t/|/g; s/^/|/; s/$/|/'
                tail -n +2 "$res/summary.tsv" | sed 's/|/\\|/g; s/\t/ | /g; s/^/| /; s/$/ |/'
            else
                echo "(no results: see $res/run.log)"
            fi
        } | tee -a "$OUT/tables.md"
    done
done
echo "tables: $OUT/tables.md" >&2
exit $status
