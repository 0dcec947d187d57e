# Shared helpers for Keel's scripts: install what a fresh machine lacks, pick the target dir.
# shellcheck shell=bash

# A persistent target directory outside the clone, so CI and repeated runs reuse the RocksDB
# build (its C++ took about 30 minutes from source on 2 cores when last timed whole, with debug
# information, which change 25 in docs/benchmarks.md dropped).
# Override with CARGO_TARGET_DIR.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/keel-target}"

KEEL_APT_UPDATED=""
apt_install() {
    # apt_install PKG... : installs the Debian packages that are missing.
    local missing=()
    for p in "$@"; do
        # Installed means "install ok installed": a package removed without --purge keeps its
        # configuration files, and dpkg -s still succeeds for it.
        [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    echo ">> installing ${missing[*]}" >&2
    if [ -z "$KEEL_APT_UPDATED" ]; then
        $sudo apt-get update -qq >&2
        KEEL_APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >&2
}

ensure_build_deps() {
    # RocksDB's bindings are generated with bindgen (libclang). Keel's own protos use a vendored
    # protoc, but the etcd-client crate (a dev-dependency, the compatibility judge) needs protoc.
    apt_install clang libclang-dev protobuf-compiler
    if ! command -v cargo >/dev/null 2>&1; then
        echo "cargo is required (https://rustup.rs)" >&2
        exit 1
    fi
}

ensure_rust_components() {
    # ensure_rust_components NAME... : adds the rustup components (rustfmt, clippy) that are
    # missing; a toolchain not managed by rustup must bring them itself.
    local c
    for c in "$@"; do
        case "$c" in
            rustfmt) cargo fmt --version >/dev/null 2>&1 && continue ;;
            clippy) cargo clippy --version >/dev/null 2>&1 && continue ;;
        esac
        if command -v rustup >/dev/null 2>&1; then
            echo ">> adding the rustup component $c" >&2
            rustup component add "$c" >&2
        else
            echo "cargo $c is required and rustup is not installed to add it" >&2
            return 1
        fi
    done
}

ensure_test_deps() {
    ensure_build_deps
    # Real etcd and etcdctl: the compatibility oracle and judge; curl for the HTTPS metrics test.
    apt_install etcd-server etcd-client python3 curl
}
