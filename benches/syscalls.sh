#!/usr/bin/env bash
# System calls per operation of a 3-member loopback cluster (benches/loopback.sh) under one
# keel-bench case: all system calls of the members (perf stat), and their writev / recvfrom
# calls by kind of socket (client connections, peer connections served, peer connections
# opened), each call's file descriptor matched to its socket with ss. perf slows the members,
# so read the counts per operation, not the throughput. Needs perf and root.
#
# Usage: benches/syscalls.sh KIND "CASE" [KEEL_BINARY]
#   KIND is keel or etcd; CASE is keel-bench arguments without --endpoints/--duration, e.g.
#   benches/syscalls.sh keel "put --clients 256 --conns 16" $CARGO_TARGET_DIR/release/keel
set -euo pipefail
[ $# -ge 2 ] || { sed -n '2,10p' "$0" >&2; exit 2; }
KIND=$1 CASE=$2
HERE=$(cd "$(dirname "$0")" && pwd)
KEEL_MEMBER_BIN=${3:-${CARGO_TARGET_DIR:-$HERE/../target}/release/keel}
BENCH=${KEEL_BENCH:-${CARGO_TARGET_DIR:-$HERE/../target}/release/keel-bench}
command -v perf > /dev/null || { echo "perf not found" >&2; exit 1; }
WORK=$(mktemp -d)
export WORK
# shellcheck source=benches/loopback.sh
source "$HERE/loopback.sh"
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; sleep 1; rm -rf "$WORK"' EXIT
require_free_ports "$KIND"
for i in 1 2 3; do
    member_cmd "$KIND" "$i"
    "${MEMBER_ARGS[@]}" > "$WORK/$KIND-n$i.log" 2>&1 &
    PIDS+=($!)
done
sleep 3
eps=$(endpoints "$KIND")
echo ">> warm-up: 8 s of puts (64 clients)" >&2
"$BENCH" put --clients 64 --conns 8 --duration 8 --quiet --endpoints "$eps" > /dev/null 2>&1 || true
pids_csv=$(IFS=,; echo "${PIDS[*]}")
read -ra args <<< "$CASE"
echo ">> $KIND: $CASE for 6 s; perf on the members from 1 s to 5 s" >&2
"$BENCH" "${args[@]}" --duration 6 --json --quiet --endpoints "$eps" > "$WORK/out.json" &
bench=$!
sleep 0.5
ss -tnp state established > "$WORK/ss.txt" 2>&1
sleep 0.5
perf stat -e raw_syscalls:sys_enter -p "$pids_csv" -o "$WORK/stat.txt" -- sleep 4 &
stat=$!
perf record -q -e syscalls:sys_enter_writev -e syscalls:sys_enter_recvfrom -p "$pids_csv" \
    -o "$WORK/perf.data" -- sleep 4 > /dev/null 2>&1
wait "$stat" "$bench"
perf script -i "$WORK/perf.data" -F pid,event,trace > "$WORK/calls.txt" 2> /dev/null
python3 - "$WORK" "$(port_base "$KIND")" "${PIDS[@]}" <<'EOF'
import collections, json, re, sys
work, base, pids = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
ops_per_sec = json.load(open(f"{work}/out.json")).get("ops_per_sec", 0)
ops = ops_per_sec * 4  # the 4 s perf watched
# (pid, fd) -> kind of socket, from ss's "users:(("keel",pid=P,fd=F))".
kinds = {}
for line in open(f"{work}/ss.txt"):
    m = re.search(r"(\S+):(\d+)\s+(\S+):(\d+)\s+users:\(\((.*)\)\)", line)
    if not m:
        continue
    local, peer = int(m.group(2)), int(m.group(4))
    for u in re.finditer(r"pid=(\d+),fd=(\d+)", m.group(5)):
        if base < local < base + 100 and local % 10 == 0:
            kind = "client connections"
        elif base < local < base + 100 and local % 10 == 1:
            kind = "peer connections served"
        elif base < peer < base + 100 and peer % 10 == 1:
            kind = "peer connections opened"
        else:
            kind = "other"
        kinds[(u.group(1), int(u.group(2)))] = kind
counts = collections.Counter()
for line in open(f"{work}/calls.txt"):
    m = re.match(r"\s*(\d+)\s+syscalls:sys_enter_(\w+):\s*fd: (0x[0-9a-f]+)", line)
    if m:
        pid, call, fd = m.group(1), m.group(2), int(m.group(3), 16)
        counts[(pids.index(pid) + 1 if pid in pids else pid, call, kinds.get((pid, fd), "other"))] += 1
total = 0
for line in open(f"{work}/stat.txt"):
    if "raw_syscalls:sys_enter" in line:
        total = int(line.split()[0].replace(",", ""))
print(f"{ops_per_sec:.0f} ops/s under perf; {ops:.0f} operations in the 4 s watched")
print(f"all system calls of the three members: {total} ({total / max(ops, 1):.2f} per operation)")
print(f"{'member':>6}  {'call':<8}  {'socket':<24}  {'calls':>7}  {'per op':>7}")
for (member, call, kind), n in sorted(counts.items(), key=lambda kv: (str(kv[0][0]), kv[0][1], kv[0][2])):
    print(f"{member!s:>6}  {call:<8}  {kind:<24}  {n:>7}  {n / max(ops, 1):>7.3f}")
EOF
