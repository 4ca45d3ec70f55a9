#!/bin/bash
# Runs fdstore.sh (issue 15: systemd's fd store) for the units below under
# systemd 252 and 254 (../shared/tools/systemd-pid1/, as root) and prints
# one markdown table per systemd version and configuration: the "fd store"
# tables of ../README.md.
#
#   sudo examples/systemd/check/run-fdstore.sh PATH/TO/systemd-pid1 DEMO_BINARY [OUT]
#
# DEMO_BINARY: a release build of examples/http.rs. About 60 s per run,
# 6 runs. VERSIONS="254" runs fewer.
set -uo pipefail

TOOL=${1:?usage: run-fdstore.sh PATH/TO/systemd-pid1 DEMO_BINARY [OUT]}
BIN=${2:?usage: run-fdstore.sh PATH/TO/systemd-pid1 DEMO_BINARY [OUT]}
OUT=${3:-$(mktemp -d "${TMPDIR:-/tmp}/tableflip-fdstore-XXXXXX")}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
UNITS=$(cd "$HERE/.." && pwd)
mkdir -p "$OUT"
# A copy: bash reads a script as it runs it.
cp "$HERE/fdstore.sh" "$OUT/fdstore.sh"

# unit file : mode ("" = as the unit says)
CONFIGS=(
    "$UNITS/tableflip-demo-fdstore.service:"
    "$UNITS/tableflip-demo-fdstore.service:replace"
    "$UNITS/tableflip-demo-supervised.service:"
)
status=0
for v in ${VERSIONS:-252 254}; do
    for c in "${CONFIGS[@]}"; do
        unit=${c%%:*} mode=${c##*:}
        name=$(basename "$unit" .service)
        res="$OUT/$v-$name${mode:+-$mode}"
        rm -rf "$res"; mkdir -p "$res"
        echo "== systemd $v, $name${mode:+ (TABLEFLIP_MODE=$mode)}" >&2
        RES=$res timeout 900 "$TOOL/run" -v "$v" --bin "$BIN:tableflip-demo" --unit "$unit" \
            "$OUT/fdstore.sh" "$name.service" $mode > "$res/run.log" 2>&1 || status=1
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
