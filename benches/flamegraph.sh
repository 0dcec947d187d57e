#!/usr/bin/env bash
# Flame graph of one running keel member: perf samples with DWARF call stacks, folded with
# inferno, generic arguments dropped from the frame names so they stay readable.
#
# Usage: benches/flamegraph.sh PID SECONDS OUT.svg "TITLE"
# Run it while a load runs against the member, for example (a 3-node cluster on loopback):
#   keel-bench put --clients 256 --conns 16 --duration 15 --endpoints ... &
#   sleep 3; benches/flamegraph.sh "$(pgrep -f 'keel .*--name n1')" 5 /tmp/put.svg "put, leader"
# Needs perf (apt: linux-perf or linux-tools) and installs inferno with cargo when missing.
# The flame graphs in docs/bench/flame-*.svg were made this way (see docs/benchmarks.md).
set -euo pipefail
[ $# -eq 4 ] || { sed -n '2,9p' "$0" >&2; exit 2; }
PID=$1 SECONDS_TO_RECORD=$2 OUT=$3 TITLE=$4
command -v perf >/dev/null || { echo "perf is not installed" >&2; exit 1; }
TOOLS=${KEEL_TOOLS_DIR:-/var/tmp/keel-tools}
if ! [ -x "$TOOLS/bin/inferno-flamegraph" ]; then
    echo ">> installing inferno into $TOOLS" >&2
    cargo install --quiet --root "$TOOLS" inferno
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
echo ">> recording pid $PID for ${SECONDS_TO_RECORD}s" >&2
perf record -q -F 499 --call-graph dwarf,16384 -o "$WORK/perf.data" -p "$PID" -- sleep "$SECONDS_TO_RECORD"
perf script -i "$WORK/perf.data" 2>/dev/null | "$TOOLS/bin/inferno-collapse-perf" > "$WORK/folded"
python3 - "$WORK/folded" > "$WORK/short" <<'EOF'
import re, sys
def short(frame):
    out, depth = [], 0
    for ch in frame:
        if ch == '<':
            depth += 1
        elif ch == '>' and depth:
            depth -= 1
        elif not depth:
            out.append(ch)
    name = re.sub(r'\{\{closure\}\}|\{(closure|async_fn|async_block|closure_env)#\d+\}', '{...}', ''.join(out))
    return name[:120] or frame[:60]
for line in open(sys.argv[1]):
    stack, count = line.rstrip('\n').rsplit(' ', 1)
    print(';'.join(short(f) for f in stack.split(';')), count)
EOF
"$TOOLS/bin/inferno-flamegraph" --minwidth 0.4 --title "$TITLE" < "$WORK/short" > "$OUT"
echo ">> wrote $OUT ($(wc -l < "$WORK/folded") distinct stacks)" >&2
