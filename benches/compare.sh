#!/usr/bin/env bash
# Keel vs etcd, side by side, in one run (about 10-15 minutes on 2 cores):
#  1. starts a 3-node Keel (client ports 24010/24020/24030) and a 3-node real etcd (25010/...)
#     on loopback with the same heartbeat/election flags;
#  2. runs every keel-bench workload against both, workload by workload (put, range, txn, lease,
#     watch, kube mix; put and range at 1, 32 and 256 clients);
#  3. memory: RSS per member of the fresh clusters, per idle watcher (10 000 watchers), after
#     loading 1M keys of 256 B; restart-to-serving time of one follower (kill -9, start, until it
#     answers a serializable get of a loaded key); then put throughput with those 1M keys in
#     the store (case put-1m);
#  4. regenerates the "Keel vs etcd" section of docs/benchmarks.md and docs/bench/*.svg
#     (keel-bench report); the raw results go to docs/bench/results.jsonl.
# Every process it starts is killed on exit (also on Ctrl-C or an error). Processes of other
# runs (other keel/etcd clusters on the machine) are listed and left alone.
#
# Usage: benches/compare.sh [--quick] [--no-report] [--only REGEX]
#   --quick      one 2 s run per workload and 100 000 keys instead of 1M (a smoke test; no report)
#   --no-report  do not touch docs/ (results stay in the work directory, kept)
#   --only RE    only the cases whose name matches RE (implies --no-report)
# Each case runs REPEAT times per system in the order Keel, etcd, etcd, Keel (the report keeps
# each system's better run: interference from other jobs only ever slows a run down).
# Environment: KEEL_BIN (a keel binary to use instead of building one), KEEL_BENCH_DURATION (seconds per run, default 6), KEEL_BENCH_REPEAT (default 2),
# KEEL_BENCH_MEM_KEYS (default 1000000), KEEL_BENCH_WARMUP (seconds of puts before anything is
# measured, default 20), KEEP_WORK=1 keeps the work directory (data dirs, logs,
# results).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
COMMAND="benches/compare.sh${*:+ $*}"
source scripts/lib.sh
ensure_test_deps

DUR=${KEEL_BENCH_DURATION:-6}
REPEAT=${KEEL_BENCH_REPEAT:-2}
MEM_KEYS=${KEEL_BENCH_MEM_KEYS:-1000000}
WARMUP=${KEEL_BENCH_WARMUP:-20}
REPORT=1
ONLY=""
while [ $# -gt 0 ]; do
    case $1 in
        --quick) DUR=2; REPEAT=1; MEM_KEYS=100000; WARMUP=2; REPORT=0; KEEP_WORK=1 ;;
        --no-report) REPORT=0; KEEP_WORK=1 ;;
        --only) ONLY=$2; REPORT=0; KEEP_WORK=1; shift ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

# keel-bench and keel in the `dist` profile (fat LTO, Cargo.toml): keel as it is meant for
# production, and the load generator as lean as it can be, since it shares the two cores with
# the cluster it measures (`release` has no cross-crate LTO, to keep the test suite's build short).
D=$CARGO_TARGET_DIR/dist
B=$D
echo ">> building keel-bench (profile dist)" >&2
cargo build --profile dist -q -p keel-bench
KEEL_SOURCE="built from this tree (profile dist)"
if [ -n "${KEEL_BIN:-}" ]; then
    KEEL_SOURCE="the prebuilt binary KEEL_BIN=$KEEL_BIN"
else
    echo ">> building keel (profile dist; the first build in a target directory takes about 40 minutes on 2 cores)" >&2
    if ! cargo build --profile dist -q -p keel-server; then
        # Other people edit the shared tree: fall back to the last binary that built, and say so.
        [ -x "$D/keel" ] || { echo "keel does not build and there is no $D/keel" >&2; exit 1; }
        echo "!! keel-server does not build from the working tree; using $D/keel built $(date -u -r "$D/keel" '+%Y-%m-%d %H:%M UTC')" >&2
        KEEL_SOURCE="the last build of $D/keel ($(date -u -r "$D/keel" '+%Y-%m-%d %H:%M UTC')), as the working tree did not build"
    fi
    KEEL_BIN=$D/keel
fi
WORK=$(mktemp -d /tmp/keel-compare.XXXXXX)
# A private copy: a rebuild by someone else during the run cannot swap the binary under the
# restart step.
cp "$KEEL_BIN" "$WORK/keel"
KEEL_MEMBER_BIN=$WORK/keel
source benches/loopback.sh
RESULTS=$WORK/results.jsonl
: > "$RESULTS"
T_START=$(date +%s)

# --- process bookkeeping: everything we start is in PIDS (or BENCH_PID) and dies on exit ---
PIDS=()
BENCH_PID=""
declare -A MEMBER_PID
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    [ -n "$BENCH_PID" ] && kill -9 "$BENCH_PID" 2>/dev/null || true
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    if [ "${KEEP_WORK:-0}" = 1 ]; then echo ">> work directory kept: $WORK" >&2; else rm -rf "$WORK"; fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo ">> keel/etcd processes of other runs (left alone):" >&2
OTHERS=$(pgrep -a -f '(^|/)(keel|etcd) ' || true)
[ -n "$OTHERS" ] && echo "$OTHERS" | sed 's/^/   /' >&2
OTHER_COUNT=$(printf '%s' "$OTHERS" | grep -c . || true)

start_member() { # kind i
    member_cmd "$1" "$2"
    "${MEMBER_ARGS[@]}" >> "$WORK/$1-n$2.log" 2>&1 &
    PIDS+=($!)
    MEMBER_PID[$1$2]=$!
}

start_cluster() { # kind
    local i
    require_free_ports "$1"
    for i in 1 2 3; do start_member "$1" "$i"; done
}

wait_cluster() { # kind
    local eps deadline=$((SECONDS + 60)) ep
    eps=$(endpoints "$1")
    until ETCDCTL_API=3 etcdctl --endpoints "$eps" --command-timeout=2s put /bench/ready 1 >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || { echo "$1 cluster did not come up; logs in $WORK" >&2; KEEP_WORK=1; exit 1; }
        sleep 0.2
    done
    for ep in ${eps//,/ }; do "$B/keel-bench" wait-ready --endpoint "$ep" --key /bench/ready --timeout 30 >/dev/null; done
}

record() { # kind case args json [extra top-level fields, e.g. ,"rep":1]
    printf '{"system":"%s","case":"%s","args":"%s"%s,"result":%s}\n' "$1" "$2" "$3" "${5:-}" "$4" >> "$RESULTS"
}

cpu_ticks() { # kind -> user+system clock ticks used so far by the cluster's members
    local i t=0
    for i in 1 2 3; do
        t=$((t + $(awk '{print $14 + $15}' "/proc/${MEMBER_PID[$1$i]}/stat")))
    done
    echo $t
}

rss_json() { # kind -> {"rss_kib":[n1,n2,n3]}
    local i out=""
    for i in 1 2 3; do
        out+="${out:+,}$(awk '/^VmRSS:/ {print $2}' "/proc/${MEMBER_PID[$1$i]}/status")"
    done
    echo "{\"rss_kib\":[$out]}"
}

bench() { # args... : runs keel-bench in the background (so a signal reaches the trap), JSON in $WORK/out.json
    "$B/keel-bench" "$@" > "$WORK/out.json" &
    BENCH_PID=$!
    local rc=0
    wait "$BENCH_PID" || rc=$?
    BENCH_PID=""
    return $rc
}

run_case() { # case args... : REPEAT runs per system in the order keel etcd etcd keel ...
    local case=$1 kind eps rep=0 c0 c1
    shift
    if [ -n "$ONLY" ] && ! [[ $case =~ $ONLY ]]; then return 0; fi
    local order=(keel etcd)
    [ "$REPEAT" -ge 2 ] && order=(keel etcd etcd keel)
    [ "$REPEAT" -ge 3 ] && order=(keel etcd etcd keel keel etcd)
    for kind in "${order[@]}"; do
        rep=$((rep + 1))
        # A single connection, or a single writer (watch cases: the writer uses the first
        # endpoint), goes to the leader of both systems (same role, same path).
        if [[ " $* " == *" --conns 1 "* ]] || [[ " $* " == *" watch "*" --clients 1 "* ]]; then
            eps=$(leader_first "$kind")
        else
            eps=$(endpoints "$kind")
        fi
        echo ">> $kind: $case: keel-bench $*" >&2
        c0=$(cpu_ticks "$kind")
        if bench "$@" --endpoints "$eps" --duration "$DUR" --json; then
            c1=$(cpu_ticks "$kind")
            record "$kind" "$case" "$*" "$(cat "$WORK/out.json")" \
                ",\"rep\":$rep,\"server_cpu_s\":$(( (c1 - c0) / 100 )).$(printf '%02d' $(( (c1 - c0) % 100 ))),\"loadavg\":\"$(cut -d' ' -f1 /proc/loadavg)\""
            python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); print("   %.0f ops/s  p50 %.2f  p99 %.2f  max %.1f ms  errors %d  server CPU %s s%s" % (s["ops_per_sec"], s["p50_ms"], s["p99_ms"], s["max_ms"], s["errors"], sys.argv[2], "".join("  %s %g" % kv for kv in s.get("extra", {}).items() if kv[0] in ("lost","duplicates","puts","bytes_per_watcher","conflicts"))))' "$WORK/out.json" "$(( (c1 - c0) / 100 ))" >&2
        else
            echo "!! $kind: $case failed (see above); continuing" >&2
        fi
    done
}

echo ">> starting clusters (work directory $WORK)" >&2
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
start_cluster keel
start_cluster etcd
wait_cluster keel
wait_cluster etcd
sleep 2
for kind in keel etcd; do record "$kind" rss-idle "" "$(rss_json $kind)"; done
# Memory per idle watcher first, on the fresh clusters: later workloads leave freed heap behind
# that new watchers would reuse without growing the RSS.
if [ -z "$ONLY" ] || [[ memory =~ $ONLY ]]; then
    for kind in keel etcd; do
        eps=$(endpoints "$kind")
        ep=${eps%%,*}
        echo ">> $kind: 10 000 idle watchers on n1" >&2
        args="watch --idle --watchers 10000 --streams 100 --conns 4"
        if bench $args --endpoints "$ep" --rss-pid "${MEMBER_PID[${kind}1]}" --json; then
            record "$kind" watch-idle "$args" "$(cat "$WORK/out.json")"
        fi
    done
fi

# --- warm-up: both systems into their steady state before anything is measured ---
# A freshly created member differs from one that has been running: Keel's write-ahead log
# starts reusing retired files (an fsync into a reused file does not grow it) once the first
# ones are retired, after ~130 MB of writes; etcd preallocates its WAL segments from the start.
# So both clusters take WARMUP seconds of puts, then are compacted to their current revision
# (the warm-up's history is not left behind to weigh on later cases). Not recorded.
for kind in keel etcd; do
    [ "$WARMUP" -gt 0 ] || break
    eps=$(endpoints "$kind")
    echo ">> $kind: warm-up, ${WARMUP}s of puts (64 clients), then compaction" >&2
    bench put --clients 64 --conns 8 --duration "$WARMUP" --quiet --endpoints "$eps" --json \
        || echo "!! $kind: warm-up failed; continuing" >&2
    rev=$(ETCDCTL_API=3 etcdctl --endpoints "$eps" endpoint status -w json \
        | python3 -c 'import json,sys; print(max(e["Status"]["header"]["revision"] for e in json.load(sys.stdin)))')
    ETCDCTL_API=3 etcdctl --endpoints "$eps" compaction --physical "$rev" >&2 \
        || echo "!! $kind: compaction failed; continuing" >&2
done

# --- request workloads (10 000 keys of 8 B, 256 B values unless said otherwise) ---
run_case put put --clients 1 --conns 1
run_case put put --clients 32 --conns 8
run_case put put --clients 256 --conns 16
run_case range-l range --consistency l --clients 1 --conns 1
run_case range-l range --consistency l --clients 32 --conns 8
run_case range-l range --consistency l --clients 256 --conns 16
run_case range-s range --consistency s --clients 32 --conns 8
run_case range-s-100 range --consistency s --range-keys 100 --clients 32 --conns 8
run_case txn-put txn-put --clients 32 --conns 8
run_case txn-cas txn-cas --clients 32 --conns 8
run_case txn-cas txn-cas --clients 256 --conns 16
run_case lease-grant-revoke lease --mode grant-revoke --clients 32 --conns 8
run_case lease-keepalive lease --mode keepalive --leases 10000 --streams 10 --clients 100 --conns 8
# --- watch: fan-out (one prefix) and many keys; zero lost/duplicate events is required ---
# one writer as fast as it can go (issue 4's fan-out benchmark), saturation (8 writers), then
# fixed rates (200 000 events/s) for latency
run_case watch-fanout-1k-1w watch --watchers 1000 --streams 10 --clients 1 --conns 4
run_case watch-fanout-10k-1w watch --watchers 10000 --streams 100 --clients 1 --conns 4
run_case watch-fanout-1k watch --watchers 1000 --streams 10 --clients 8 --conns 4
run_case watch-fanout-1k-rate watch --watchers 1000 --streams 10 --clients 1 --rate 200 --conns 4
run_case watch-fanout-10k-rate watch --watchers 10000 --streams 100 --clients 1 --rate 20 --conns 4
run_case watch-distinct-10k watch --distinct-keys --watchers 10000 --streams 100 --clients 32 --conns 4
run_case watch-distinct-prefix-10k watch --distinct-prefixes --watchers 10000 --streams 100 --clients 32 --conns 4
# History replay: 1 000 revisions written first, then 10 000 watchers created at once from the
# first of them (controllers resuming after a restart); events/s until all have all of them.
run_case watch-replay-10k watch --replay 1000 --watchers 10000 --streams 100 --clients 8 --conns 4 --drain 120
# --- kube-apiserver-like mix ---
run_case kube kube --clients 32 --conns 8 --key-space 10000 --val-size 1024 --watchers 8

# --- memory and restart ---
if [ -z "$ONLY" ] || [[ memory =~ $ONLY ]]; then
    for kind in keel etcd; do
        eps=$(endpoints "$kind")
        echo ">> $kind: loading $MEM_KEYS keys of 256 B" >&2
        args="load --keys $MEM_KEYS --batch 100 --prefix /mem/ --clients 32 --conns 8 --val-size 256"
        if bench $args --endpoints "$eps" --json; then
            record "$kind" load-1m "$args" "$(cat "$WORK/out.json")"
        fi
        sleep 5
        record "$kind" rss-1m "" "$(rss_json $kind)"
        du=""
        for i in 1 2 3; do du+="${du:+,}$(du -sb "$WORK/$kind-n$i" | cut -f1)"; done
        record "$kind" disk-1m "" "{\"bytes\":[$du]}"
        echo "   RSS KiB: $(rss_json $kind), disk bytes: [$du]" >&2

        # Restart a follower: kill -9, start it again on its data dir, time until it serves.
        status=$(ETCDCTL_API=3 etcdctl --endpoints "$eps" endpoint status -w json)
        victim=$(python3 -c '
import json, sys
st = json.loads(sys.argv[1])
for i, e in enumerate(st):
    if e["Status"]["header"]["member_id"] != e["Status"]["leader"]:
        print(i + 1); break
else:
    print(3)' "$status")
        pid=${MEMBER_PID[$kind$victim]}
        ep=$(echo "$eps" | cut -d, -f"$victim")
        echo ">> $kind: restarting follower n$victim (kill -9 $pid)" >&2
        kill -9 "$pid"
        wait "$pid" 2>/dev/null || true
        t0=$(date +%s.%N)
        start_member "$kind" "$victim"
        if "$B/keel-bench" wait-ready --endpoint "$ep" --key "/mem/$(printf '%08d' 0)" --timeout 120 >/dev/null; then
            t1=$(date +%s.%N)
            secs=$(python3 -c "print(round($t1 - $t0, 3))")
            rss=$(awk '/^VmRSS:/ {print $2}' "/proc/${MEMBER_PID[$kind$victim]}/status")
            record "$kind" restart-1m "" "{\"seconds\":$secs,\"rss_kib\":$rss,\"member\":\"n$victim\"}"
            echo "   serving after $secs s, RSS $rss KiB" >&2
        else
            echo "!! $kind: n$victim did not serve within 120 s" >&2
        fi
    done
    # Writes to a large store: every member's Raft snapshots (each --snapshot-count entries)
    # now cover a million keys, which is where a snapshot that copies the store would show.
    ONLY="" run_case put-1m put --clients 256 --conns 16
fi

ELAPSED=$(( $(date +%s) - T_START ))
python3 - "$WORK/meta.json" <<PY
import json, subprocess, sys
v = subprocess.run(["etcd", "--version"], capture_output=True, text=True).stdout.split("\n")
git = subprocess.run(["git", "-C", "$ROOT", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
dirty = subprocess.run(["git", "-C", "$ROOT", "status", "--porcelain", "--", "server", "store", "proto"], capture_output=True, text=True).stdout.strip()
json.dump({
    "command": "$COMMAND",
    "date": subprocess.run(["date", "-u", "+%Y-%m-%d %H:%M UTC"], capture_output=True, text=True).stdout.strip(),
    "git": git + (" + uncommitted server/store changes" if dirty else ""),
    "keel_source": "$KEEL_SOURCE",
    "etcd_version": "etcd " + v[0].split(":")[-1].strip() + " (" + (v[2].split(":")[-1].strip() if len(v) > 2 else "?") + ")",
    "loadavg_start": "$LOAD_START",
    "loadavg_end": " ".join(open("/proc/loadavg").read().split()[:3]),
    "other_procs": "$OTHER_COUNT",
    "elapsed": "$ELAPSED",
    "duration": "$DUR",
    "warmup": "$WARMUP",
    "repeat": "$REPEAT",
}, open(sys.argv[1], "w"), indent=1)
PY

if [ "$REPORT" = 1 ]; then
    mkdir -p docs/bench
    cp "$RESULTS" docs/bench/results.jsonl
    cp "$WORK/meta.json" docs/bench/meta.json
    "$B/keel-bench" report --results docs/bench/results.jsonl --meta docs/bench/meta.json \
        --out docs/benchmarks.md --svg-dir docs/bench
    echo ">> wrote docs/benchmarks.md and docs/bench/ in ${ELAPSED} s" >&2
else
    "$B/keel-bench" report --results "$RESULTS" --meta "$WORK/meta.json" \
        --out "$WORK/benchmarks.md" --svg-dir "$WORK/bench"
    echo ">> report in $WORK/benchmarks.md (docs/ untouched), ${ELAPSED} s" >&2
fi
