#!/usr/bin/env bash
# Runs Keel's whole test suite: unit and integration tests of every crate, then the etcdctl
# compatibility cases against real etcd. Installs what it needs when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
ensure_test_deps

start=$(date +%s)
echo ">> building (target dir: $CARGO_TARGET_DIR)"
cargo build --release --workspace --all-targets

echo ">> cargo test"
cargo test --release --workspace 2>&1 | tee /tmp/keel-cargo-test.log
cargo_status=${PIPESTATUS[0]}

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

echo ">> done in $(( $(date +%s) - start ))s: cargo test exit $cargo_status, compat exit $compat_status"
[ "$cargo_status" -eq 0 ] && [ "$compat_status" -eq 0 ]
