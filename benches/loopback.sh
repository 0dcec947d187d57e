# Sourced by benches/compare.sh, ab.sh, mem-ab.sh, client-ab.sh, syscalls.sh and failover.sh: 3-member clusters of
# Keel (client ports 24010, 24020, 24030, each peer port one above) or real etcd (25010, ...)
# on 127.0.0.1, started with the same flags. The caller sets WORK (member I of KIND keeps its
# data in $WORK/KIND-nI) and KEEL_MEMBER_BIN (the keel binary to run).

port_free() { ! (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null; }

port_base() { # kind
    if [ "$1" = etcd ]; then echo 25000; else echo 24000; fi
}

member_cmd() { # kind i -> the member's command line in MEMBER_ARGS
    local kind=$1 i=$2 base cl="" j bin=etcd
    base=$(port_base "$kind")
    for j in 1 2 3; do cl+="${cl:+,}n$j=http://127.0.0.1:$((base + j * 10 + 1))"; done
    local c=$((base + i * 10)) p=$((base + i * 10 + 1))
    [ "$kind" = keel ] && bin=$KEEL_MEMBER_BIN
    MEMBER_ARGS=("$bin" --name "n$i" --data-dir "$WORK/$kind-n$i"
        --listen-client-urls "http://127.0.0.1:$c" --advertise-client-urls "http://127.0.0.1:$c"
        --listen-peer-urls "http://127.0.0.1:$p" --initial-advertise-peer-urls "http://127.0.0.1:$p"
        --initial-cluster "$cl" --heartbeat-interval 100 --election-timeout 1000)
}

endpoint() { # kind i -> the member's client address
    echo "127.0.0.1:$(($(port_base "$1") + $2 * 10))"
}

endpoints() { # kind -> the three client addresses, comma-separated
    echo "$(endpoint "$1" 1),$(endpoint "$1" 2),$(endpoint "$1" 3)"
}

leader_first() { # kind -> its endpoints with the current leader first
    local eps status
    eps=$(endpoints "$1")
    status=$(ETCDCTL_API=3 etcdctl --endpoints "$eps" endpoint status -w json 2>/dev/null) || { echo "$eps"; return; }
    python3 -c '
import json, sys
eps = sys.argv[2].split(",")
lead = [i for i, e in enumerate(json.loads(sys.argv[1]))
        if e["Status"]["header"]["member_id"] == e["Status"]["leader"]]
if lead:
    eps.insert(0, eps.pop(lead[0]))
print(",".join(eps))' "$status" "$eps"
}

require_free_ports() { # kind: exits when a port of that cluster is taken
    local base i port
    base=$(port_base "$1")
    for i in 1 2 3; do
        for port in $((base + i * 10)) $((base + i * 10 + 1)); do
            port_free "$port" || { echo "port $port is in use; is another benchmark running?" >&2; exit 1; }
        done
    done
}

pid_cpu_ticks() { # pids... -> the user + system clock ticks those processes have used so far
    local t=0 p fields
    for p in "$@"; do
        read -ra fields < <(cut -d' ' -f14,15 "/proc/$p/stat")
        t=$((t + fields[0] + fields[1]))
    done
    echo "$t"
}

# For A/B scripts (ab.sh, mem-ab.sh): one Keel cluster at a time, its member pids in PIDS.
PIDS=()
start_keel_cluster() { # keel binary: starts the 3 members (logs in $WORK/keel-nI.log)
    local i
    require_free_ports keel
    KEEL_MEMBER_BIN=$1
    for i in 1 2 3; do
        member_cmd keel "$i"
        "${MEMBER_ARGS[@]}" > "$WORK/keel-n$i.log" 2>&1 &
        PIDS+=($!)
    done
    sleep 3
}

stop_keel_cluster() { # stops the members in PIDS, waits for them, removes their data
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do while kill -0 "$p" 2>/dev/null; do sleep 0.1; done; done
    PIDS=()
    rm -rf "${WORK:?}"/keel-n*
}

ab_setup() { # benches dir: sets BENCH (the keel-bench to run) and WORK (a new temporary
    # directory), and stops the cluster and removes WORK on exit
    BENCH=${KEEL_BENCH:-${CARGO_TARGET_DIR:-$1/../target}/release/keel-bench}
    [ -x "$BENCH" ] || { echo "keel-bench not found at $BENCH (cargo build --release -p keel-bench)" >&2; exit 1; }
    WORK=$(mktemp -d)
    export WORK
    trap 'stop_keel_cluster; rm -rf "$WORK"' EXIT
}
