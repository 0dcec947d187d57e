#!/usr/bin/env bash
# Prometheus /metrics parity, Keel against real etcd as the oracle.
#  1. starts a 3-member real etcd (client ports 25010/25020/25030) and a 3-member Keel
#     (24010/24020/24030) on 127.0.0.1 (benches/loopback.sh), in a temporary directory;
#  2. runs the same small etcdctl workload against both (puts, gets, a txn, a delete, leases
#     granted, kept alive, revoked and expired, a watch, compaction, defrag, hashkv, status,
#     member list, snapshot save), so that etcd's metric families that only appear once used
#     are there;
#  3. scrapes /metrics from every member and, per system, collects the metric families (from the
#     "# TYPE" lines, union over the members) and the label names seen in their samples
#     (without "le" and "quantile");
#  4. every etcd family must exist in Keel with the same TYPE, unless it matches an entry of
#     tests/compat/metrics-excluded.txt (deliberate gaps, each with its reason); where a family
#     has samples in both, the label names must be the same.
# Exit status: 0 parity, 1 missing families or type/label mismatches, 2 the run itself failed
# (usage, a cluster that does not come up, a scrape that fails). Every process it starts is
# killed on exit (also on Ctrl-C or an error); other keel/etcd processes are left alone.
# Takes about 15 s.
#
# Usage: tests/compat/metrics-parity.sh KEEL_BIN
#        tests/compat/metrics-parity.sh --self-test   (the comparison on fabricated scrapes; no
#                                                      clusters, a second or so)
# Environment: METRICS_EXCLUDED=path  an exclusion file instead of tests/compat/metrics-excluded.txt
#              METRICS_JSON=path      also write the result as JSON (missing, mismatches, ...)
#              KEEP_WORK=1            keep the work directory (data dirs, logs, the scrapes)
set -euo pipefail

usage() { sed -n '/^# Usage:/,/^set -euo/p' "$0" | sed -n 's/^# \{0,1\}//p' >&2; exit 2; }
[ $# -eq 1 ] || usage

# Paths given by the caller are relative to the caller's directory: resolve them before the cd.
EXCLUDED=${METRICS_EXCLUDED:-}
[ -n "$EXCLUDED" ] && EXCLUDED=$(realpath -m "$EXCLUDED")
JSON_OUT=${METRICS_JSON:-}
[ -n "$JSON_OUT" ] && JSON_OUT=$(realpath -m "$JSON_OUT")
MODE=run
case $1 in
    --self-test) MODE=self-test ;;
    -h|--help) usage ;;
    -*) echo "unknown option $1" >&2; usage ;;
    *) KEEL_BIN=$(realpath -m "$1"); [ -x "$KEEL_BIN" ] || { echo "$1 is not an executable" >&2; exit 2; } ;;
esac
cd "$(dirname "$0")/../.."
EXCLUDED=${EXCLUDED:-$(pwd)/tests/compat/metrics-excluded.txt}
[ -f "$EXCLUDED" ] || { echo "exclusion file $EXCLUDED does not exist" >&2; exit 2; }

# --- the comparison (python3): compare.py EXCLUDED_FILE JSON_OUT --etcd FILE... --keel FILE... ---
read -r -d '' COMPARE_PY <<'PY' || true
import collections, fnmatch, json, re, sys

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
SAMPLE = re.compile(r"^(" + NAME + r")(?:\{(.*)\})?\s+(\S+)(?:\s+-?\d+)?\s*$")
LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')
IGNORED_LABELS = {"le", "quantile"}
NO_TYPE = "untyped (no # TYPE line)"


class System:
    def __init__(self, name):
        self.name = name
        self.types = collections.defaultdict(set)   # family -> its TYPEs (several: members disagree)
        self.help = {}
        self.labels = collections.defaultdict(set)  # family -> label names seen in its samples
        self.samples = collections.Counter()        # family -> number of samples
        self.bad = []                               # lines that do not parse

    def parse(self, path):
        types, samples = {}, []
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                if line.startswith("#"):
                    parts = line.split(None, 3)
                    if len(parts) >= 3 and parts[1] == "TYPE":
                        types[parts[2]] = parts[3].strip() if len(parts) > 3 else ""
                        self.types[parts[2]].add(types[parts[2]])
                    elif len(parts) >= 3 and parts[1] == "HELP":
                        self.help.setdefault(parts[2], parts[3] if len(parts) > 3 else "")
                    continue
                m = SAMPLE.match(line)
                if not m:
                    self.bad.append("%s:%d: %s" % (path, n, line[:200]))
                    continue
                names, pos, body = set(), 0, m.group(2) or ""
                while pos < len(body):
                    lm = LABEL.match(body, pos)
                    if not lm or lm.end() == pos:
                        self.bad.append("%s:%d: %s" % (path, n, line[:200]))
                        break
                    names.add(lm.group(1))
                    pos = lm.end()
                samples.append((m.group(1), names))
        for name, names in samples:
            fam = family_of(name, types)
            if fam is None:  # a sample without a TYPE line: the text format calls it untyped
                fam = name
                self.types[fam].add(NO_TYPE)
            self.samples[fam] += 1
            self.labels[fam] |= names - IGNORED_LABELS


def family_of(name, types):
    if name in types:
        return name
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix):
            t = types.get(name[: -len(suffix)])
            if t == "histogram" or (t == "summary" and suffix != "_bucket"):
                return name[: -len(suffix)]
    return None


def read_exclusions(path):
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            parts = s.split(None, 1)
            if len(parts) < 2 or not parts[1].strip():
                print("%s:%d: an entry is PATTERN<TAB or spaces>REASON; the reason is missing: %r"
                      % (path, n, s), file=sys.stderr)
                sys.exit(2)
            out.append((parts[0], parts[1].strip()))
    return out


def fmt_type(ts):
    return "/".join(sorted(ts))


def fmt_labels(ls):
    return "{" + ", ".join(sorted(ls)) + "}" if ls else "{}"


def main(argv):
    excl_path, json_out = argv[0], argv[1]
    files = {"etcd": [], "keel": []}
    cur = None
    for a in argv[2:]:
        if a in ("--etcd", "--keel"):
            cur = a[2:]
        else:
            files[cur].append(a)
    systems = {}
    for name in ("etcd", "keel"):
        systems[name] = System(name)
        for p in files[name]:
            systems[name].parse(p)
    E, K = systems["etcd"], systems["keel"]
    exclusions = read_exclusions(excl_path)
    used = collections.Counter()

    excluded, missing, type_mm, label_mm, unchecked, ok = [], [], [], [], [], []
    for fam in sorted(E.types):
        hit = next(((p, r) for p, r in exclusions if fnmatch.fnmatchcase(fam, p)), None)
        if hit:
            used[hit[0]] += 1
            excluded.append({"family": fam, "pattern": hit[0], "in_keel": fam in K.types})
            continue
        if fam not in K.types:
            missing.append({"family": fam, "type": fmt_type(E.types[fam]),
                            "labels": sorted(E.labels[fam]), "help": E.help.get(fam, "")})
            continue
        bad = False
        if E.types[fam] != K.types[fam] or len(K.types[fam]) > 1:
            type_mm.append({"family": fam, "etcd": fmt_type(E.types[fam]),
                            "keel": fmt_type(K.types[fam])})
            bad = True
        if E.samples[fam] and K.samples[fam]:
            if E.labels[fam] != K.labels[fam]:
                label_mm.append({"family": fam, "etcd": sorted(E.labels[fam]),
                                 "keel": sorted(K.labels[fam]),
                                 "only_etcd": sorted(E.labels[fam] - K.labels[fam]),
                                 "only_keel": sorted(K.labels[fam] - E.labels[fam])})
                bad = True
        elif E.samples[fam]:
            unchecked.append({"family": fam, "labels": sorted(E.labels[fam])})
        if not bad:
            ok.append(fam)
    keel_only = sorted(f for f in K.types if f not in E.types)
    unused = [p for p, _ in exclusions if not used[p]]

    print("== metrics parity: Keel against etcd ==")
    print("scrapes: %d etcd, %d Keel" % (len(files["etcd"]), len(files["keel"])))
    print("families: etcd %d, Keel %d; excluded %d (%s); compared %d: %d match, %d missing, "
          "%d type mismatches, %d label mismatches"
          % (len(E.types), len(K.types), len(excluded), excl_path, len(E.types) - len(excluded),
             len(ok), len(missing), len(type_mm), len(label_mm)))
    for s in (E, K):
        if s.bad:
            print("\n!! %s: %d lines do not parse as the Prometheus text format, e.g.:" % (s.name, len(s.bad)))
            for b in s.bad[:5]:
                print("     " + b)
    if missing:
        print("\nMISSING in Keel (%d): etcd family, its TYPE, label names, HELP" % len(missing))
        for m in missing:
            print("  %-62s %-9s %s" % (m["family"], m["type"], fmt_labels(m["labels"])))
            if m["help"]:
                print("      %s" % m["help"])
    if type_mm:
        print("\nTYPE MISMATCH (%d): family, etcd's TYPE, Keel's TYPE" % len(type_mm))
        for t in type_mm:
            print("  %-62s etcd %-9s keel %s" % (t["family"], t["etcd"], t["keel"]))
    if label_mm:
        print("\nLABEL MISMATCH (%d): family, etcd's label names, Keel's label names" % len(label_mm))
        for l in label_mm:
            print("  %s\n      etcd %s\n      keel %s" % (l["family"], fmt_labels(l["etcd"]), fmt_labels(l["keel"])))
    if unchecked:
        print("\n(info) labels not compared, etcd has samples but Keel has none (%d):" % len(unchecked))
        for u in unchecked:
            print("  %-62s etcd %s" % (u["family"], fmt_labels(u["labels"])))
    if keel_only:
        print("\n(info) Keel families etcd lacks in this run (%d; etcd omits a labelled family "
              "until it has a sample):" % len(keel_only))
        for f in keel_only:
            print("  %-62s %s" % (f, fmt_type(K.types[f])))
    shown = [e for e in excluded if e["in_keel"]]
    if shown:
        print("\n(info) excluded, yet Keel has them (the exclusion may be stale):")
        for e in shown:
            print("  %-62s (%s)" % (e["family"], e["pattern"]))
    if unused:
        print("\n(info) exclusion patterns that match no etcd family in this run: %s" % ", ".join(unused))

    failed = bool(missing or type_mm or label_mm)
    if failed:
        print("\nFAIL: Keel's /metrics differs from etcd's.")
        print("Add what is missing to Keel, or, for a deliberate gap, record it in %s as a line"
              % excl_path)
        print("'PATTERN<TAB>REASON' (PATTERN is a shell glob such as etcd_foo_*; "
              "METRICS_EXCLUDED=path uses another file).")
    else:
        print("\nOK: every etcd family that is not excluded exists in Keel with the same TYPE and label names.")
    if json_out:
        with open(json_out, "w") as f:
            json.dump({"ok": not failed, "missing": missing, "type_mismatches": type_mm,
                       "label_mismatches": label_mm, "labels_unchecked": unchecked,
                       "keel_only": keel_only, "excluded": excluded, "unused_exclusions": unused,
                       "etcd_families": len(E.types), "keel_families": len(K.types)}, f, indent=1)
    return 1 if failed else 0


sys.exit(main(sys.argv[1:]))
PY

compare() { # excluded json_out --etcd files... --keel files...
    python3 -c "$COMPARE_PY" "$@"
}

# --- --self-test: the comparison on fabricated scrapes ---
self_test() {
    local fail=0 rc
    d=$(mktemp -d /tmp/keel-metrics-selftest.XXXXXX)  # global: the EXIT trap removes it
    trap 'rm -rf "$d"' EXIT
    cat > "$d/etcd1" <<'EOF'
# HELP a_total A counter.
# TYPE a_total counter
a_total{x="a,\"b}",y="2"} 1
# HELP h_seconds A histogram.
# TYPE h_seconds histogram
h_seconds_bucket{op="get",le="0.1"} 1
h_seconds_bucket{op="get",le="+Inf"} 1
h_seconds_sum{op="get"} 0.05
h_seconds_count{op="get"} 1
# HELP g A gauge.
# TYPE g gauge
g 1
# HELP lbl_total Labelled.
# TYPE lbl_total counter
lbl_total{To="x"} 3
# HELP s A summary.
# TYPE s summary
s{quantile="0.5"} 1
s_sum 1
s_count 1
# HELP go_goroutines Go.
# TYPE go_goroutines gauge
go_goroutines 10
EOF
    # A second member: adds a family the first one lacks (the union is compared).
    cat > "$d/etcd2" <<'EOF'
# HELP missing_total Only on member 2.
# TYPE missing_total counter
missing_total 0
# HELP no_samples_total A vector without children yet.
# TYPE no_samples_total counter
EOF
    cat > "$d/keel-good" <<'EOF'
# TYPE a_total counter
a_total{y="1",x="z"} 2
# TYPE h_seconds histogram
h_seconds_bucket{op="get",le="0.5"} 1
h_seconds_bucket{op="get",le="+Inf"} 1
h_seconds_sum{op="get"} 0.05
h_seconds_count{op="get"} 1
# TYPE g gauge
g 2
# TYPE lbl_total counter
lbl_total{To="y"} 3
# TYPE s summary
s{quantile="0.99"} 1
s_sum 1
s_count 1
# TYPE missing_total counter
missing_total 1
# TYPE no_samples_total counter
no_samples_total{kind="x"} 1
# TYPE keel_only gauge
keel_only 1
EOF
    # The bad Keel: missing_total absent, g a counter, lbl_total labelled "to", h_seconds without
    # "op", and a_total without a TYPE line (untyped).
    sed -e '/missing_total/d' -e 's/^# TYPE g gauge/# TYPE g counter/' -e 's/lbl_total{To=/lbl_total{to=/' \
        -e 's/{op="get",le=/{le=/; s/h_seconds_sum{op="get"}/h_seconds_sum/; s/h_seconds_count{op="get"}/h_seconds_count/' \
        -e '/^# TYPE a_total/d' "$d/keel-good" > "$d/keel-bad"
    printf '# deliberate gaps\ngo_*\tnot Go\n\n' > "$d/excl"
    printf 'go_*  not Go\nmissing_*\tdeliberate\nnomatch_*\tstale\n' > "$d/excl2"
    printf 'go_*\n' > "$d/excl-noreason"

    check() { # description expected-rc python-assertion-on-result args...
        local what=$1 want=$2 assertion=$3
        shift 3
        rc=0
        compare "$@" > "$d/out" 2>&1 || rc=$?
        if [ "$rc" != "$want" ]; then
            echo "self-test FAILED: $what: exit $rc, expected $want; output:" >&2
            sed 's/^/    /' "$d/out" >&2
            fail=1
        elif [ -n "$assertion" ] && ! python3 -c "import json,sys; r=json.load(open(sys.argv[1])); assert ($assertion), r" "$d/r.json" 2>"$d/err"; then
            echo "self-test FAILED: $what: $assertion does not hold:" >&2
            sed 's/^/    /' "$d/err" "$d/out" >&2
            fail=1
        else
            echo "self-test ok: $what"
        fi
    }
    check "matching scrapes pass" 0 \
        'r["ok"] and r["keel_only"] == ["keel_only"] and [e["family"] for e in r["excluded"]] == ["go_goroutines"] and r["labels_unchecked"] == []' \
        "$d/excl" "$d/r.json" --etcd "$d/etcd1" "$d/etcd2" --keel "$d/keel-good"
    check "mismatches are caught" 1 \
        '[m["family"] for m in r["missing"]] == ["missing_total"]
         and r["missing"][0]["help"] == "Only on member 2." and r["missing"][0]["type"] == "counter"
         and sorted((t["family"], t["etcd"], t["keel"]) for t in r["type_mismatches"])
             == [("a_total", "counter", "untyped (no # TYPE line)"), ("g", "gauge", "counter")]
         and sorted((l["family"], tuple(l["only_etcd"]), tuple(l["only_keel"])) for l in r["label_mismatches"])
             == [("h_seconds", ("op",), ()), ("lbl_total", ("To",), ("to",))]' \
        "$d/excl" "$d/r.json" --etcd "$d/etcd1" "$d/etcd2" --keel "$d/keel-bad"
    check "a TYPE that differs between Keel's members is a mismatch" 1 \
        '[t["family"] for t in r["type_mismatches"]] == ["g"] and r["type_mismatches"][0]["keel"] == "counter/gauge"' \
        "$d/excl" "$d/r.json" --etcd "$d/etcd1" "$d/etcd2" --keel "$d/keel-good" <(sed 's/^# TYPE g gauge/# TYPE g counter/' "$d/keel-good")
    check "an exclusion covers a missing family" 0 \
        'r["ok"] and r["unused_exclusions"] == ["nomatch_*"] and [e["family"] for e in r["excluded"]] == ["go_goroutines", "missing_total"]' \
        "$d/excl2" "$d/r.json" --etcd "$d/etcd1" "$d/etcd2" --keel <(sed '/missing_total/d' "$d/keel-good")
    check "an exclusion without a reason is refused" 2 "" \
        "$d/excl-noreason" "$d/r.json" --etcd "$d/etcd1" --keel "$d/keel-good"
    grep -q 'the reason is missing' "$d/out" || { echo "self-test FAILED: no reason, no message" >&2; fail=1; }
    check "the exclusion file parses ($EXCLUDED)" 0 "" \
        "$EXCLUDED" "$d/r.json" --etcd "$d/etcd1" --keel "$d/keel-good"
    [ $fail = 0 ] && echo "self-test passed" || echo "self-test FAILED" >&2
    return $fail
}

if [ "$MODE" = self-test ]; then
    self_test
    exit $?
fi

# --- the real run ---
for c in etcd etcdctl python3 curl timeout; do
    command -v "$c" >/dev/null || { echo "$c is required (Debian: etcd-server etcd-client python3 curl)" >&2; exit 2; }
done
export ETCDCTL_API=3
source benches/loopback.sh
# (in a subshell: require_free_ports exits 1, which here means a parity failure)
(require_free_ports keel) || exit 2
(require_free_ports etcd) || exit 2

# The members (and a running watch) this script started; nothing else is ever signalled. Their
# data is thrown away, so SIGKILL: on SIGTERM an etcd leader first tries to hand over leadership
# and, with its peers stopping too, takes ~7 s to give up.
PIDS=()
WATCH_PID=""
WORK=""
cleanup() {
    local rc=$? p
    trap - EXIT INT TERM
    # timeout(1) passes SIGTERM on to its etcdctl; a SIGKILL would leave that etcdctl running.
    [ -n "$WATCH_PID" ] && { kill -TERM "$WATCH_PID" 2>/dev/null || true; wait "$WATCH_PID" 2>/dev/null || true; }
    for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    if [ "${KEEP_WORK:-0}" = 1 ]; then echo ">> work directory kept: $WORK" >&2; else [ -z "$WORK" ] || rm -rf "$WORK"; fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM
T0=$SECONDS
WORK=$(mktemp -d /tmp/keel-metrics-parity.XXXXXX)
# The three members run one build, even if someone rebuilds KEEL_BIN meanwhile (cargo replaces
# the file, so a hard link keeps this build; a copy where /tmp is another file system).
ln "$KEEL_BIN" "$WORK/keel" 2>/dev/null || cp "$KEEL_BIN" "$WORK/keel"
KEEL_MEMBER_BIN=$WORK/keel

echo ">> starting 3 etcd and 3 Keel members (work directory $WORK)" >&2
for kind in etcd keel; do
    for i in 1 2 3; do
        member_cmd "$kind" "$i"
        "${MEMBER_ARGS[@]}" > "$WORK/$kind-n$i.log" 2>&1 &
        PIDS+=($!)
    done
done

wait_healthy() { # kind
    local deadline=$((SECONDS + 60))
    until etcdctl --endpoints "$(endpoints "$1")" --dial-timeout=1s --command-timeout=2s endpoint health >/dev/null 2>&1; do
        if [ $SECONDS -ge $deadline ]; then
            echo "!! the $1 cluster is not healthy after 60 s; the last lines of its logs:" >&2
            tail -n 5 "$WORK/$1"-n*.log >&2 || true
            KEEP_WORK=1
            exit 2
        fi
        sleep 0.3
    done
    echo ">> $1 is healthy after $((SECONDS - T0)) s" >&2
}
wait_healthy etcd
wait_healthy keel

# --- the workload: the same etcdctl commands against both; a failing command is shown, not fatal ---
OUT=""
ctl_at() { # endpoints etcdctl-args... : output in OUT
    local eps=$1 rc=0
    shift
    OUT=$(timeout 20 etcdctl --endpoints "$eps" --dial-timeout=3s --command-timeout=10s "$@" 2>&1) || rc=$?
    if [ $rc -ne 0 ]; then
        echo "   !! etcdctl $* failed (exit $rc):" >&2
        printf '%s\n' "$OUT" | head -n 5 | sed 's/^/      /' >&2
    fi
    return 0
}
ctl() { # kind etcdctl-args... : against all three members
    local kind=$1
    shift
    ctl_at "$(endpoints "$kind")" "$@"
}
lease_id() { # the ID from "lease 694d7c1b2f9e8a05 granted with TTL(60s)"
    printf '%s\n' "$OUT" | awk '/^lease [0-9a-f]+ granted/ {print $2; exit}'
}

EXPIRE_AT=0
start_expiring_lease() { # kind: a 2 s lease with a key, left to expire
    local id
    ctl "$1" lease grant 2
    id=$(lease_id)
    if [ -n "$id" ]; then
        ctl "$1" put /parity/expiring v --lease="$id"
    else
        echo "   !! $1: no lease ID in: $OUT" >&2
    fi
    EXPIRE_AT=$((SECONDS + 5))
}

workload() { # kind
    local kind=$1 eps first id rev
    eps=$(endpoints "$kind")
    first=${eps%%,*}
    echo ">> $kind: workload" >&2
    ctl "$kind" put /parity/k1 v1
    ctl "$kind" put /parity/k2 v2
    ctl "$kind" put /parity/k1 v1b --prev-kv
    ctl "$kind" get /parity/k1
    ctl "$kind" get /parity/ --prefix
    ctl "$kind" get /parity/k2 --consistency=s
    ctl "$kind" txn <<'EOF'
value("/parity/k1") = "v1b"

put /parity/k3 from-txn
get /parity/k2

put /parity/k3 else

EOF
    ctl "$kind" del /parity/k2
    ctl "$kind" lease grant 60
    id=$(lease_id)
    if [ -n "$id" ]; then
        ctl "$kind" lease keep-alive --once "$id"
        ctl "$kind" lease timetolive "$id" --keys
        ctl "$kind" put /parity/leased v --lease="$id"
        ctl "$kind" lease list
        ctl "$kind" lease revoke "$id"
    else
        echo "   !! $kind: no lease ID in: $OUT" >&2
    fi
    timeout 3 etcdctl --endpoints "$eps" watch /parity/w > "$WORK/$kind-watch.out" 2>&1 &
    WATCH_PID=$!
    sleep 1
    ctl "$kind" put /parity/w seen
    wait "$WATCH_PID" 2>/dev/null || true
    WATCH_PID=""
    grep -q '^seen$' "$WORK/$kind-watch.out" || echo "   !! $kind: the watch did not see the put" >&2
    ctl "$kind" get /parity/k1 -w json
    rev=$(printf '%s\n' "$OUT" | grep -o '"revision":[0-9]*' | head -n 1 | cut -d: -f2)
    if [ -n "$rev" ]; then ctl "$kind" compaction "$rev"; else echo "   !! $kind: no revision" >&2; fi
    ctl_at "$first" defrag
    ctl "$kind" endpoint hashkv
    ctl "$kind" endpoint status
    ctl "$kind" member list
    ctl "$kind" alarm list
    ctl_at "$first" snapshot save "$WORK/$kind.snapshot.db"
}

start_expiring_lease etcd
start_expiring_lease keel
workload etcd
workload keel
while [ $SECONDS -lt $EXPIRE_AT ]; do sleep 0.2; done
for kind in etcd keel; do
    ctl "$kind" get /parity/expiring
    [ -z "$OUT" ] || echo "   !! $kind: /parity/expiring has not expired: $OUT" >&2
done

# --- scrape every member ---
scrape() { # kind i
    local url="http://$(endpoint "$1" "$2")/metrics" try
    for try in 1 2 3; do
        curl -sS --fail --connect-timeout 3 --max-time 10 "$url" -o "$WORK/$1-n$2.metrics" && return 0
        sleep 0.5
    done
    echo "!! cannot scrape $url" >&2
    KEEP_WORK=1
    exit 2
}
ARGS=()
for kind in etcd keel; do
    ARGS+=("--$kind")
    for i in 1 2 3; do
        scrape "$kind" "$i"
        ARGS+=("$WORK/$kind-n$i.metrics")
    done
done
echo ">> scraped 6 members after $((SECONDS - T0)) s" >&2
echo >&2

rc=0
compare "$EXCLUDED" "$WORK/result.json" "${ARGS[@]}" || rc=$?
[ -n "$JSON_OUT" ] && cp "$WORK/result.json" "$JSON_OUT"
[ $rc -le 1 ] || { echo "!! the comparison itself failed (exit $rc)" >&2; rc=2; }
echo ">> $((SECONDS - T0)) s in all" >&2
exit $rc
