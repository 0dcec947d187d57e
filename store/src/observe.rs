//! Timing hooks for metrics, without a metrics dependency in the store.
//!
//! The server installs one observer per hook at start-up (first caller wins; the hooks are
//! process-wide, like Prometheus' default registry); the store calls them with the duration of
//! each Raft log fsync (`etcd_disk_wal_fsync_duration_seconds`) and of each apply batch's engine
//! write (`etcd_disk_backend_commit_duration_seconds`), of each snapshot file's fsync
//! (`etcd_snap_fsync_duration_seconds`), with the index and duration of each applied command
//! (`etcd_server_slow_apply_total`), and with the steps of each physical compaction
//! (`etcd_debugging_mvcc_*compaction*`). Without an observer a hook costs one atomic load. Two counters are read instead of pushed: the bytes of Raft log entries written
//! ([`wal_write_bytes`]) and the snapshot installations under way
//! ([`snapshot_installs_in_progress`]).
//!
//! Timing an applied command reads the monotonic clock, for the observer only: what it returns
//! never reaches the state machine, so applying the log stays deterministic.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// Receives one duration per observed operation.
pub type DurationObserver = Box<dyn Fn(Duration) + Send + Sync>;

/// Receives the log index of an applied command and how long applying it took.
pub type EntryObserver = Box<dyn Fn(u64, Duration) + Send + Sync>;

static WAL_FSYNC: OnceLock<DurationObserver> = OnceLock::new();
static BACKEND_COMMIT: OnceLock<DurationObserver> = OnceLock::new();
static SNAPSHOT_FSYNC: OnceLock<DurationObserver> = OnceLock::new();
static APPLY_ENTRY: OnceLock<EntryObserver> = OnceLock::new();
static WAL_WRITE_BYTES: AtomicU64 = AtomicU64::new(0);
static SNAPSHOT_INSTALLS: AtomicI64 = AtomicI64::new(0);

/// Calls `hook`'s observer, if one is installed.
fn observe(hook: &OnceLock<DurationObserver>, d: Duration) {
    if let Some(f) = hook.get() {
        f(d);
    }
}

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
    observe(&WAL_FSYNC, d);
}

pub(crate) fn backend_commit(d: Duration) {
    observe(&BACKEND_COMMIT, d);
}

/// Observes every applied command (a `Normal` log entry): its index and the time its apply
/// took, without the batch's engine write (that is the backend commit).
pub fn set_apply_entry_observer(f: EntryObserver) -> bool {
    APPLY_ENTRY.set(f).is_ok()
}

/// The observer of applied commands, if one is installed (the caller times only then).
pub(crate) fn apply_entry_observer() -> Option<&'static EntryObserver> {
    APPLY_ENTRY.get()
}

/// Bytes of Raft log entries written by this process so far (`etcd_disk_wal_write_bytes_total`).
pub fn wal_write_bytes() -> u64 {
    WAL_WRITE_BYTES.load(Ordering::Relaxed)
}

pub(crate) fn wal_written(bytes: u64) {
    WAL_WRITE_BYTES.fetch_add(bytes, Ordering::Relaxed);
}

/// Snapshot installations under way in this process
/// (`etcd_server_snapshot_apply_in_progress_total`).
pub fn snapshot_installs_in_progress() -> i64 {
    SNAPSHOT_INSTALLS.load(Ordering::Relaxed)
}

/// Counts a snapshot installation as under way until dropped.
pub(crate) struct InstallingSnapshot;

impl InstallingSnapshot {
    pub(crate) fn start() -> Self {
        SNAPSHOT_INSTALLS.fetch_add(1, Ordering::Relaxed);
        InstallingSnapshot
    }
}

impl Drop for InstallingSnapshot {
    fn drop(&mut self) {
        SNAPSHOT_INSTALLS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a physical compaction reports, step by step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompactionStep {
    /// The key index was held for one chunk of keys (readers and the applier waited).
    IndexPause(Duration),
    /// One chunk's deletions were written to the engine.
    DbPause(Duration),
    /// Revisions deleted by one chunk.
    Deleted(u64),
    /// The whole compaction, once finished.
    Finished(Duration),
}

/// Receives the steps of every physical compaction.
pub type CompactionObserver = Box<dyn Fn(CompactionStep) + Send + Sync>;

static COMPACTION: OnceLock<CompactionObserver> = OnceLock::new();

/// Observes physical compactions (etcd's `etcd_debugging_mvcc_*compaction*` metrics).
pub fn set_compaction_observer(f: CompactionObserver) -> bool {
    COMPACTION.set(f).is_ok()
}

pub(crate) fn compaction(step: CompactionStep) {
    if let Some(f) = COMPACTION.get() {
        f(step);
    }
}

/// Observes the fsync of every snapshot file the store writes (`etcd_snap_fsync_duration_seconds`).
pub fn set_snapshot_fsync_observer(f: DurationObserver) -> bool {
    SNAPSHOT_FSYNC.set(f).is_ok()
}

pub(crate) fn snapshot_fsync(d: Duration) {
    observe(&SNAPSHOT_FSYNC, d);
}
