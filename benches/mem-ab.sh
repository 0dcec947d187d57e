#!/usr/bin/env bash
# Memory A/B of keel binaries: for each round and each binary, a fresh 3-member loopback cluster
# (benches/loopback.sh) loads KEYS keys of 256 B (as compare.sh's memory phase does, but with no
# workload before it), then prints every member's RSS, restarts a follower with kill -9 and
# prints how long it took to serve a loaded key and its RSS then. Binaries alternate, so slow
# phases of a shared machine hit both.
#
# Usage: benches/mem-ab.sh ROUNDS KEEL_BIN... (KEYS=1000000 by default)
#   benches/mem-ab.sh 2 /tmp/keel-old target/release/keel
set -euo pipefail
[ $# -ge 2 ] || { sed -n '2,9p' "$0" >&2; exit 2; }
ROUNDS=$1; shift
KEYS=${KEYS:-1000000}
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=benches/loopback.sh
source "$HERE/loopback.sh"
ab_setup "$HERE"
rss_mib() { awk '/^VmRSS:/ {print int($2 / 1024)}' "/proc/$1/status"; }
for round in $(seq "$ROUNDS"); do
    for bin in "$@"; do
        start_keel_cluster "$bin"
        "$BENCH" load --keys "$KEYS" --batch 100 --prefix /mem/ --clients 32 --conns 8 \
            --val-size 256 --quiet --endpoints "$(endpoints keel)" > /dev/null
        sleep 5
        loaded="$(rss_mib "${PIDS[0]}") / $(rss_mib "${PIDS[1]}") / $(rss_mib "${PIDS[2]}")"
        leader=$(leader_first keel)
        leader=${leader%%,*}
        victim=1
        for i in 1 2 3; do [ "$(endpoint keel "$i")" != "$leader" ] && victim=$i; done
        kill -9 "${PIDS[$((victim - 1))]}"
        wait "${PIDS[$((victim - 1))]}" 2>/dev/null || true
        t0=$(date +%s.%N)
        member_cmd keel "$victim"
        "${MEMBER_ARGS[@]}" >> "$WORK/keel-n$victim.log" 2>&1 &
        PIDS[victim - 1]=$!
        "$BENCH" wait-ready --endpoint "$(endpoint keel "$victim")" --key "/mem/$(printf '%08d' 0)" \
            --timeout 120 > /dev/null
        t1=$(date +%s.%N)
        sleep 2
        echo "round $round  $bin  RSS after $KEYS keys (MiB) $loaded;" \
            "follower n$victim restarted, serving after $(python3 -c "print(round($t1 - $t0, 2))") s," \
            "RSS $(rss_mib "${PIDS[$((victim - 1))]}") MiB"
        stop_keel_cluster
    done
done
