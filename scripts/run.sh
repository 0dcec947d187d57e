#!/usr/bin/env bash
# Starts a single-node Keel on 127.0.0.1:2379 (data in ./default.keel), like a bare `etcd`.
# Extra arguments are passed to `keel` (see `keel --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
ensure_build_deps
cargo build --release -p keel-server --bin keel
exec "$CARGO_TARGET_DIR/release/keel" "$@"
