#!/usr/bin/env bash
# A/B of two keel-bench flag sets (a load-generator change) against both systems: a 3-member
# Keel and a 3-member etcd cluster on loopback (benches/loopback.sh) stay up, and per round every
# case runs for 6 s against each system with flag set A, then B. Prints throughput, p50/p99, the
# servers' CPU per operation (the three members' user + system time from /proc) and the load
# generator's own CPU per operation, so both what the tool costs and what it does to each
# system's figures show.
#
# Usage: benches/client-ab.sh "FLAGS_A" "FLAGS_B" "CASE;CASE;..." [ROUNDS]
#   benches/client-ab.sh "--grpc-client tonic" "--grpc-client lean" \
#       "put --clients 256 --conns 16;put --clients 32 --conns 8" 2
set -euo pipefail
[ $# -ge 3 ] || { sed -n '2,11p' "$0" >&2; exit 2; }
FLAGS_A=$1 FLAGS_B=$2 CASES=$3 ROUNDS=${4:-2}
HERE=$(cd "$(dirname "$0")" && pwd)
TARGET=${CARGO_TARGET_DIR:-$HERE/../target}
BENCH=${KEEL_BENCH:-$TARGET/release/keel-bench}
KEEL_MEMBER_BIN=${KEEL_BIN:-$TARGET/release/keel}
for b in "$BENCH" "$KEEL_MEMBER_BIN"; do
    [ -x "$b" ] || { echo "$b not found (cargo build --release)" >&2; exit 1; }
done
command -v etcd >/dev/null || { echo "etcd not found (apt-get install etcd-server)" >&2; exit 1; }
WORK=$(mktemp -d)
export WORK
# shellcheck source=benches/loopback.sh
source "$HERE/loopback.sh"
declare -A PIDS_OF
stop() {
    local p
    for p in ${PIDS_OF[keel]:-} ${PIDS_OF[etcd]:-}; do kill "$p" 2>/dev/null || true; done
    for p in ${PIDS_OF[keel]:-} ${PIDS_OF[etcd]:-}; do
        while kill -0 "$p" 2>/dev/null; do sleep 0.1; done
    done
}
trap 'stop; rm -rf "$WORK"' EXIT
HZ=$(getconf CLK_TCK)
for kind in keel etcd; do
    require_free_ports "$kind"
    for i in 1 2 3; do
        member_cmd "$kind" "$i"
        "${MEMBER_ARGS[@]}" > "$WORK/$kind-n$i.log" 2>&1 &
        PIDS_OF[$kind]+="$! "
    done
done
sleep 3
for kind in keel etcd; do # warm-up, as ab.sh
    "$BENCH" put --clients 64 --conns 8 --duration 6 --quiet --endpoints "$(endpoints "$kind")" > /dev/null 2>&1 || true
done
IFS=';' read -ra CASE_LIST <<< "$CASES"
for round in $(seq "$ROUNDS"); do
    for c in "${CASE_LIST[@]}"; do
        for kind in keel etcd; do
            for label in A B; do
                flags=$FLAGS_A
                [ "$label" = B ] && flags=$FLAGS_B
                read -ra args <<< "$c $flags"
                eps=$(endpoints "$kind")
                [[ " $c " == *" --conns 1 "* ]] && eps=$(leader_first "$kind")
                # shellcheck disable=SC2086
                before=$(pid_cpu_ticks ${PIDS_OF[$kind]})
                out=$("$BENCH" "${args[@]}" --duration 6 --json --quiet --endpoints "$eps")
                # shellcheck disable=SC2086
                after=$(pid_cpu_ticks ${PIDS_OF[$kind]})
                python3 - "$round" "$kind" "$label" "$flags" "$c" "$before" "$after" "$HZ" "$out" <<'EOF'
import json, sys
rnd, kind, label, flags, case, before, after, hz, out = sys.argv[1:]
r = json.loads(out)
ops = r.get("ops") or 1
server_us = (int(after) - int(before)) / int(hz) * 1e6 / ops
client_us = r.get("extra", {}).get("client_cpu_s", 0) * 1e6 / ops
print(f"round {rnd}  {kind:4}  {label} ({flags})  [{case}]  {r.get('ops_per_sec', 0):.0f} ops/s  "
      f"p50 {r.get('p50_ms', 0):.2f} p99 {r.get('p99_ms', 0):.2f} ms  "
      f"server CPU {server_us:.0f} us/op  load generator CPU {client_us:.1f} us/op", flush=True)
EOF
            done
        done
    done
done
