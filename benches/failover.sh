#!/usr/bin/env bash
# Fail-over time, Keel against real etcd: how long writes stop when the leader dies.
#
# Starts a 3-member cluster of each system on loopback (benches/loopback.sh, as compare.sh:
# --heartbeat-interval 100 --election-timeout 1000), then, ROUNDS times: finds the leader,
# kills it (SIGKILL), freezes it (SIGSTOP) or stops it gracefully (SIGTERM, as a rolling
# restart does), and puts a key through the two other members with `etcdctl
# --command-timeout 100ms` in a loop until one put succeeds. The time from the signal
# to that success is the fail-over time (resolution: one attempt, at most about 0.1 s; with
# TERM each round also says when the old leader exited). The old
# leader is then restarted (or resumed) and must serve again before the next round.
#
# Usage: benches/failover.sh [--rounds N] [--signal KILL|STOP|TERM] [--only keel|etcd]
# Environment: KEEL_BIN (a keel binary; default: build the release binary), CARGO_TARGET_DIR.
# Needs etcd and etcdctl (Debian: etcd-server etcd-client) and python3.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=10 SIGNAL=KILL ONLY=""
while [ $# -gt 0 ]; do
    case $1 in
        --rounds) ROUNDS=$2; shift 2 ;;
        --signal) SIGNAL=$2; shift 2 ;;
        --only) ONLY=$2; shift 2 ;;
        *) sed -n '2,15p' "$0" >&2; exit 2 ;;
    esac
done
case $SIGNAL in KILL | STOP | TERM) ;; *) echo "--signal must be KILL, STOP or TERM" >&2; exit 2 ;; esac
command -v etcdctl >/dev/null || { echo "etcdctl is not installed (apt: etcd-client)" >&2; exit 1; }

if [ -z "${KEEL_BIN:-}" ]; then
    export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
    cargo build --release --quiet -p keel-server
    KEEL_BIN=$CARGO_TARGET_DIR/release/keel
fi
export ETCDCTL_API=3
WORK=$(mktemp -d /tmp/keel-failover.XXXXXX)
declare -A PID=()
cleanup() {
    for p in "${PID[@]}"; do kill -CONT "$p" 2>/dev/null || true; kill "$p" 2>/dev/null || true; done
    for p in "${PID[@]}"; do gone "$p"; done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

KEEL_MEMBER_BIN=$KEEL_BIN
source benches/loopback.sh

now_ms() { echo $(($(date +%s%N) / 1000000)); }

start_member() { # kind i
    member_cmd "$1" "$2"
    "${MEMBER_ARGS[@]}" >> "$WORK/$1-n$2.log" 2>&1 &
    PID[$1$2]=$!
    disown "$!" # no "Killed" job notices; gone() waits for the process instead
}

gone() { # pid: until the process has exited
    while kill -0 "$1" 2>/dev/null; do sleep 0.05; done
}

leader_of() { # kind -> the index (1..3) of the member that says it leads
    local i
    for i in 1 2 3; do
        if etcdctl --endpoints "$(endpoint "$1" "$i")" --command-timeout=1s endpoint status -w json 2>/dev/null |
            python3 -c 'import json,sys; s=json.load(sys.stdin)[0]["Status"]; sys.exit(0 if s["leader"]==s["header"]["member_id"] else 1)'; then
            echo "$i"
            return
        fi
    done
}

wait_serving() { # kind i: until the member answers a serializable get
    local deadline=$((SECONDS + 60))
    until etcdctl --endpoints "$(endpoint "$1" "$2")" --command-timeout=1s get /failover/ready --consistency=s >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || { echo "$1 n$2 did not come back; logs in $WORK" >&2; trap - EXIT; exit 1; }
        sleep 0.2
    done
}

measure() { # kind -> one line per round on stderr, the times (ms) in $WORK/kind.times
    local kind=$1 i r l survivors t0 tries
    require_free_ports "$kind"
    for i in 1 2 3; do start_member "$kind" "$i"; done
    local deadline=$((SECONDS + 60))
    until etcdctl --endpoints "$(endpoints "$kind")" --command-timeout=2s put /failover/ready 1 >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || { echo "$kind cluster did not come up; logs in $WORK" >&2; trap - EXIT; exit 1; }
        sleep 0.2
    done
    for r in $(seq 1 "$ROUNDS"); do
        sleep 2 # let heartbeats settle after the previous round
        l=$(leader_of "$kind")
        [ -n "$l" ] || { echo "$kind: no member says it leads; logs in $WORK" >&2; trap - EXIT; exit 1; }
        survivors=""
        for i in 1 2 3; do [ "$i" = "$l" ] || survivors+="${survivors:+,}$(endpoint "$kind" "$i")"; done
        t0=$(now_ms)
        kill -"$SIGNAL" "${PID[$kind$l]}"
        tries=1
        until etcdctl --endpoints "$survivors" --command-timeout=100ms put "/failover/$r" v >/dev/null 2>&1; do
            tries=$((tries + 1))
        done
        local took=$(($(now_ms) - t0)) exited=""
        if [ "$SIGNAL" = TERM ]; then
            gone "${PID[$kind$l]}"
            exited=", exited after $(($(now_ms) - t0)) ms"
        fi
        echo "   $kind round $r/$ROUNDS: SIG$SIGNAL to leader n$l, first write after $took ms ($tries attempts)$exited" >&2
        echo "$took" >> "$WORK/$kind.times"
        if [ "$SIGNAL" != STOP ]; then
            gone "${PID[$kind$l]}"
            start_member "$kind" "$l"
        else
            kill -CONT "${PID[$kind$l]}"
        fi
        wait_serving "$kind" "$l"
    done
    for i in 1 2 3; do kill "${PID[$kind$i]}" 2>/dev/null || true; done
    for i in 1 2 3; do gone "${PID[$kind$i]}"; unset "PID[$kind$i]"; done
}

summary() { # label times...
    python3 - "$@" <<'EOF'
import statistics, sys
label, ts = sys.argv[1], sorted(int(t) for t in sys.argv[2:])
print(f"{label:5} rounds {len(ts):3}  min {ts[0]/1000:.2f} s  median {statistics.median(ts)/1000:.2f} s  max {ts[-1]/1000:.2f} s")
EOF
}

declare -A TIMES=()
for kind in keel etcd; do
    [ -z "$ONLY" ] || [ "$ONLY" = "$kind" ] || continue
    echo ">> $kind: $ROUNDS rounds, SIG$SIGNAL of the leader" >&2
    measure "$kind"
    TIMES[$kind]=$(tr '\n' ' ' < "$WORK/$kind.times")
done
echo
echo "fail-over time (SIG$SIGNAL of the leader; --heartbeat-interval 100 --election-timeout 1000):"
for kind in keel etcd; do
    [ -n "${TIMES[$kind]:-}" ] || continue
    # shellcheck disable=SC2086
    summary "$kind" ${TIMES[$kind]}
done
