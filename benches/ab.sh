#!/usr/bin/env bash
# A/B of two keel binaries on the same machine: for each round and each binary, a fresh 3-member
# loopback cluster (benches/loopback.sh), 6 s of puts to warm it up, then every case for 6 s,
# printing throughput, p50 and the server CPU per operation (the three members' user + system
# time from /proc during the case, divided by the operations). Binaries alternate, so slow
# phases of a shared machine hit both.
#
# Usage: benches/ab.sh OLD_KEEL NEW_KEEL "CASE;CASE;..." [ROUNDS]
#   a CASE is keel-bench arguments without --endpoints/--duration, for example
#   benches/ab.sh /tmp/keel-old target/release/keel \
#       "range --consistency s --clients 32 --conns 8;put --clients 256 --conns 16" 3
# Build the old binary from a git worktree with the same CARGO_TARGET_DIR and copy it away;
# then `touch proto/build.rs` in this checkout before building it again (cargo hashes workspace
# packages by their path relative to the workspace root, so the two checkouts share artifacts).
set -euo pipefail
[ $# -ge 3 ] || { sed -n '2,14p' "$0" >&2; exit 2; }
OLD=$1 NEW=$2 CASES=$3 ROUNDS=${4:-2}
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=benches/loopback.sh
source "$HERE/loopback.sh"
ab_setup "$HERE"
HZ=$(getconf CLK_TCK)
IFS=';' read -ra CASE_LIST <<< "$CASES"
for round in $(seq "$ROUNDS"); do
    for bin in "$OLD" "$NEW"; do
        start_keel_cluster "$bin"
        "$BENCH" put --clients 64 --conns 8 --duration 6 --quiet --endpoints "$(endpoints keel)" > /dev/null 2>&1 || true
        for c in "${CASE_LIST[@]}"; do
            read -ra args <<< "$c"
            eps=$(endpoints keel)
            # A single connection, or a watch case's single writer (it uses the first
            # endpoint), goes to the leader (as in compare.sh).
            if [[ " $c " == *" --conns 1 "* ]] || [[ " $c " == *"watch "*" --clients 1 "* ]]; then
                eps=$(leader_first keel)
            fi
            before=$(pid_cpu_ticks "${PIDS[@]}")
            out=$("$BENCH" "${args[@]}" --duration 6 --json --quiet --endpoints "$eps")
            after=$(pid_cpu_ticks "${PIDS[@]}")
            python3 - "$round" "$bin" "$c" "$before" "$after" "$HZ" "$out" <<'EOF'
import json, sys
rnd, binary, case, before, after, hz, out = sys.argv[1:]
r = json.loads(out)
ops = r.get("ops") or 1
cpu_us = (int(after) - int(before)) / int(hz) * 1e6 / ops
print(f"round {rnd}  {binary}  [{case}]  {r.get('ops_per_sec', 0):.0f} ops/s  "
      f"p50 {r.get('p50_ms', 0):.2f} p99 {r.get('p99_ms', 0):.2f} ms  server CPU {cpu_us:.0f} us/op")
EOF
        done
        stop_keel_cluster
    done
done
