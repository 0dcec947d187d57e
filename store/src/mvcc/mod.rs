//! etcd v3 MVCC on top of an [`Engine`](crate::engine::Engine).
//!
//! Module map:
//! - [`revision`]: `(main, sub)` revisions and their byte encoding (the `kv` table's keys).
//! - [`index`]: the in-memory key index (key → revisions written), with a worked example.
//! - [`recent`]: [`recent::RecentValues`] — the values of the newest writes in memory, by
//!   revision, so reads of recently written keys skip RocksDB (worked example inside).
//! - [`store`]: [`MvccStore`] — published state, range / history / hash reads, reload, and the
//!   background physical compaction.
//! - [`apply`]: [`ApplyBatch`] — deterministic application of Raft commands (put, delete, txn,
//!   compaction, leases, alarms) through an overlay, committed with one engine write.
//!
//! See `docs/store.md` for the data model, on-disk layout and durability contract.

pub mod apply;
pub mod index;
pub mod recent;
pub mod revision;
pub mod store;

pub use apply::{ApplyBatch, ApplyOutcome, MAX_LEASE_TTL};
pub use revision::Revision;
pub use store::{
    HashKvFormat, HashKvResult, HistoryBatch, HistoryRequest, LeaseInfo, MvccStore, StoreStats,
};
