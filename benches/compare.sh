#!/usr/bin/env bash
# Side-by-side first cut: starts a 3-node Keel and a 3-node real etcd on loopback (same
# heartbeat/election settings), runs the same keel-bench workloads against both in one run, and
# prints a markdown table of absolute figures and Keel/etcd ratios.
# Usage: benches/compare.sh [TOTAL_OPS_PER_WORKLOAD] [CLIENTS]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
ensure_test_deps
TOTAL=${1:-20000}
CLIENTS=${2:-32}
cargo build --release -q -p keel-server -p keel-bench
B=$CARGO_TARGET_DIR/release
WORK=$(mktemp -d /tmp/keel-compare.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

start_cluster() { # kind base_port
    local kind=$1 base=$2 cl="" i
    for i in 1 2 3; do cl+="${cl:+,}n$i=http://127.0.0.1:$((base + i * 10 + 1))"; done
    for i in 1 2 3; do
        local c=$((base + i * 10)) p=$((base + i * 10 + 1)) bin
        if [ "$kind" = keel ]; then bin="$B/keel"; else bin=etcd; fi
        "$bin" --name n$i --data-dir "$WORK/$kind-n$i" \
            --listen-client-urls http://127.0.0.1:$c --advertise-client-urls http://127.0.0.1:$c \
            --listen-peer-urls http://127.0.0.1:$p --initial-advertise-peer-urls http://127.0.0.1:$p \
            --initial-cluster "$cl" --heartbeat-interval 100 --election-timeout 1000 \
            > "$WORK/$kind-n$i.log" 2>&1 &
        PIDS+=($!)
    done
    EPS="127.0.0.1:$((base + 10)),127.0.0.1:$((base + 20)),127.0.0.1:$((base + 30))"
}

# Not in a subshell: PIDS must reach the cleanup trap.
start_cluster keel 24000; KEEL_EPS=$EPS
start_cluster etcd 25000; ETCD_EPS=$EPS
sleep 5
declare -A RESULT
for kind in keel etcd; do
    eps=$KEEL_EPS; [ $kind = etcd ] && eps=$ETCD_EPS
    for w in "put" "range --consistency l" "range --consistency s" "range --range-keys 100 --consistency s" "txn-cas"; do
        name=$(echo "$w" | tr -d '-' | tr ' ' '_')
        echo ">> $kind: $w" >&2
        RESULT[$kind/$name]=$("$B/keel-bench" $w --endpoints "$eps" --clients "$CLIENTS" --total "$TOTAL" --key-space 10000 --json)
    done
done
echo "| workload | Keel ops/s | etcd ops/s | ratio | Keel p99 ms | etcd p99 ms |"
echo "|---|---|---|---|---|---|"
for key in "${!RESULT[@]}"; do echo "$key"; done | sed 's#^[a-z]*/##' | sort -u | while read -r name; do
    python3 - "$name" "${RESULT[keel/$name]}" "${RESULT[etcd/$name]}" <<'PY'
import json, sys
name, k, e = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
print(f"| {name} | {k['ops_per_sec']:.0f} | {e['ops_per_sec']:.0f} | {k['ops_per_sec']/max(e['ops_per_sec'],1e-9):.2f} | {k['p99_ms']:.2f} | {e['p99_ms']:.2f} |")
PY
done
