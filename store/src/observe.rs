//! Timing hooks for metrics, without a metrics dependency in the store.
//!
//! The server installs one observer per hook at start-up (first caller wins; the hooks are
//! process-wide, like Prometheus' default registry); the store calls them with the duration of
//! each Raft log fsync (`etcd_disk_wal_fsync_duration_seconds`) and of each apply batch's engine
//! write (`etcd_disk_backend_commit_duration_seconds`). Without an observer a hook costs one
//! atomic load.

use std::sync::OnceLock;
use std::time::Duration;

/// Receives one duration per observed operation.
pub type DurationObserver = Box<dyn Fn(Duration) + Send + Sync>;

static WAL_FSYNC: OnceLock<DurationObserver> = OnceLock::new();
static BACKEND_COMMIT: OnceLock<DurationObserver> = OnceLock::new();

/// Observes every fsync of the Raft log (one per group commit). Returns false if an observer
/// was already installed.
pub fn set_wal_fsync_observer(f: DurationObserver) -> bool {
    WAL_FSYNC.set(f).is_ok()
}

/// Observes every engine write of an apply batch (the state machine's commit).
pub fn set_backend_commit_observer(f: DurationObserver) -> bool {
    BACKEND_COMMIT.set(f).is_ok()
}

pub(crate) fn wal_fsync(d: Duration) {
    if let Some(f) = WAL_FSYNC.get() {
        f(d);
    }
}

pub(crate) fn backend_commit(d: Duration) {
    if let Some(f) = BACKEND_COMMIT.get() {
        f(d);
    }
}
