#!/usr/bin/env bash
# Runs Keel's whole test suite: lints (rustfmt, clippy and rustdoc, warnings denied), unit and
# integration tests of every crate, the etcdctl
# compatibility cases and the /metrics parity check against real etcd, then keel-jepsen (the
# shared Jepsen register verdicts and the `ci` fault-injection profile). Installs what it needs
# when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
ensure_test_deps

start=$(date +%s)
echo ">> building (target dir: $CARGO_TARGET_DIR)"
cargo build --release --workspace --all-targets

echo ">> cargo test"
# Every test binary runs even when one fails, and the compatibility cases run afterwards.
set +e
cargo test --release --workspace --no-fail-fast 2>&1 | tee /tmp/keel-cargo-test.log
cargo_status=${PIPESTATUS[0]}
set -e

echo ">> lints: rustfmt --check, clippy and rustdoc with warnings denied"
# In the release profile, so they share build-script outputs (RocksDB) with the build above.
lint_status=0
ensure_rust_components rustfmt clippy || lint_status=1
cargo fmt --all -- --check || lint_status=1
cargo clippy --release --workspace --all-targets -- -D warnings || lint_status=1
RUSTDOCFLAGS="-D warnings" cargo doc --release --no-deps --workspace || lint_status=1

echo ">> etcdctl compatibility cases (real etcd vs keel)"
shared_cases=()
if [ -d ../shared/compat/cases ]; then
    shared_cases=(../shared/compat/cases/*.txt)
fi
compat_tool=../shared/compat/etcdctl-diff
compat_status=0
if [ -f "$compat_tool" ]; then
    python3 "$compat_tool" \
        --server-cmd "$CARGO_TARGET_DIR/release/keel --data-dir {dir} --listen-client-urls http://127.0.0.1:{port} --listen-peer-urls http://127.0.0.1:{peer_port}" \
        "${shared_cases[@]}" tests/compat/cases/*.txt || compat_status=$?
else
    echo "!! $compat_tool not found (it lives in the workplace's shared/ beside the clone); compatibility cases skipped"
fi

echo ">> /metrics parity (real etcd vs keel: families, types, label names)"
tests/compat/metrics-parity.sh --self-test || compat_status=1
tests/compat/metrics-parity.sh "$CARGO_TARGET_DIR/release/keel" || compat_status=1

echo ">> keel-jepsen: the WGL checker on the shared Jepsen etcd register logs"
# (tests/it also checks the same verdicts through the library; this checks the CLI's answers.)
jepsen_bin="$CARGO_TARGET_DIR/release/keel-jepsen"
jepsen_status=0
shared_logs=../shared/histories/etcd-register
if [ -f "$shared_logs/verdicts.tsv" ]; then
    mismatches=0
    while IFS=$'\t' read -r file expected _; do
        [ "$file" = "file" ] && continue
        [ -z "$file" ] && continue
        expected="${expected%$'\r'}"
        got=$("$jepsen_bin" check-jepsen-log --model cas-register "$shared_logs/$file" 2>/dev/null \
            | sed -n 's/^linearizable: //p') || true
        if [ "$got" != "$expected" ]; then
            echo "!! $file: keel-jepsen says '$got', verdicts.tsv says '$expected'"
            mismatches=$((mismatches + 1))
        fi
    done < "$shared_logs/verdicts.tsv"
    echo ">> check-jepsen-log: $mismatches mismatches against $shared_logs/verdicts.tsv"
    [ "$mismatches" -eq 0 ] || jepsen_status=1
else
    echo "!! $shared_logs/verdicts.tsv not found (it lives in the workplace's shared/ beside the clone); check-jepsen-log comparison skipped"
fi

echo ">> keel-jepsen ci: fault-injection runs on real clusters (about 4 minutes)"
apt_install faketime   # libfaketime, for the clock-skew faults of `--nemesis all`
# Fails on any violation, and when the negative control (--debug-unsafe-local-reads) is not caught.
KEEL_BIN="$CARGO_TARGET_DIR/release/keel" "$jepsen_bin" ci \
    --store "$CARGO_TARGET_DIR/jepsen-runs/ci" || jepsen_status=$?

echo ">> done in $(( $(date +%s) - start ))s: cargo test exit $cargo_status, lints exit $lint_status, compat exit $compat_status, jepsen exit $jepsen_status"
[ "$cargo_status" -eq 0 ] && [ "$lint_status" -eq 0 ] && [ "$compat_status" -eq 0 ] && [ "$jepsen_status" -eq 0 ]
