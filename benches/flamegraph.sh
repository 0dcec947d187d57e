#!/usr/bin/env bash
# Flame graph of one running keel member: perf samples with DWARF call stacks, folded with
# inferno, generic arguments dropped from the frame names so they stay readable.
#
# Usage: benches/flamegraph.sh PID SECONDS OUT.svg "TITLE"
# Run it while a load runs against the member, for example (a 3-node cluster on loopback):
#   keel-bench put --clients 256 --conns 16 --duration 15 --endpoints ... &
#   sleep 3; benches/flamegraph.sh "$(pgrep -f 'keel .*--name n1')" 5 /tmp/put.svg "put, leader"
# Needs perf (apt: linux-perf or linux-tools) and installs inferno with cargo when missing.
# The flame graphs in docs/bench/flame-*.svg were made this way (see docs/benchmarks.md). It also
# prints the share of the samples spent in each part of the server (HTTP/2, apply, openraft, ...).
set -euo pipefail
[ $# -eq 4 ] || { sed -n '2,11p' "$0" >&2; exit 2; }
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
perf script -i "$WORK/perf.data" 2>/dev/null | "$TOOLS/bin/inferno-collapse-perf" --kernel > "$WORK/folded"
# One pass over the folded stacks: frame names shortened for the graph (generic arguments
# dropped, closures named {...}), and where the CPU went, by part of the server: a stack counts
# for the first part (in this order) that one of its frames belongs to, judged by the frame's
# own path (`<T<..> as Trait>::f` is T's), not by the generic arguments in it; "in the kernel"
# is the share of samples whose innermost frame is the kernel's, whatever part they belong to.
python3 - "$WORK/folded" "$WORK/short" <<'EOF'
import re, sys, collections
def strip_generics(text):
    out, depth = [], 0
    for ch in text:
        if ch == "<":
            depth += 1
        elif ch == ">" and depth:
            depth -= 1
        elif not depth:
            out.append(ch)
    return "".join(out)
def short(frame):
    name = re.sub(r"\{\{closure\}\}|\{(closure|async_fn|async_block|closure_env)#\d+\}", "{...}", strip_generics(frame))
    return name[:120] or frame[:60]
def own_path(frame):
    if frame.startswith("<"):
        depth = 0
        for i, ch in enumerate(frame):
            depth += (ch == "<") - (ch == ">")
            if depth == 0:
                inner, rest = frame[1:i], frame[i + 1:]
                return strip_generics(inner.split(" as ")[0]) + strip_generics(rest)
    return strip_generics(frame)
parts = [
    ("watch hub (matching, encoding events)", r"^keel_server::watch"),
    ("applying commands (store, RocksDB write)", r"ApplyBatch|apply_chunk"),
    ("Raft log append and fsync thread", r"^raft-log-sync$|log_store::sync_loop|LogStore::append"),
    ("forwarding (follower to leader)", r"^keel_server::forwarding"),
    ("client request handlers (keel_server services)", r"^keel_server::(kv|lease|auth|maintenance|cluster|election|lock)::|^keel_proto::\w+::\w+_server::"),
    ("Raft messages (network, peer service)", r"^keel_server::(network|peer_service)"),
    ("openraft", r"^openraft::"),
    ("HTTP/2 and gRPC (h2, hyper, tonic)", r"^(h2|hyper|hyper_util|tonic)::"),
    ("RocksDB background threads", r"^rocksdb:"),
    ("tokio scheduling, wake-ups, I/O driver", r"^tokio::runtime"),
]
total, kernel, by = 0, 0, collections.Counter()
with open(sys.argv[2], "w") as out:
    for line in open(sys.argv[1]):
        stack, n = line.rstrip("\n").rsplit(" ", 1)
        frames = stack.split(";")
        print(";".join(short(f) for f in frames), n, file=out)
        n = int(n)
        paths = [own_path(f) for f in frames]
        total += n
        kernel += n * frames[-1].endswith("_[k]")
        by[next((name for name, pat in parts if any(re.search(pat, f) for f in paths)), "other")] += n
print(">> where the CPU went:", file=sys.stderr)
for name, n in by.most_common():
    print(f"   {100 * n / max(total, 1):5.1f}%  {name}", file=sys.stderr)
print(f"   ({100 * kernel / max(total, 1):.1f}% of all samples in the kernel)", file=sys.stderr)
EOF
"$TOOLS/bin/inferno-flamegraph" --minwidth 0.4 --title "$TITLE" < "$WORK/short" > "$OUT"
echo ">> wrote $OUT ($(wc -l < "$WORK/folded") distinct stacks)" >&2
