//! keel-store: everything Keel keeps on disk, with no knowledge of gRPC or sockets.
//!
//! Module map:
//! - [`engine`]: the narrow storage-engine trait, with a RocksDB and an in-memory implementation.
//! - [`mvcc`]: etcd v3 MVCC semantics (revisions, key index, range, put, delete, txn, compaction,
//!   events, leases) on top of an engine.
//! - [`error`]: errors of this layer; request-level failures are data ([`ApplyError`]).
//! - [`raft`]: openraft storage: the Raft log store and the replicated state machine.
//! - [`auth`]: users, roles and permissions (etcd's auth store) and the in-memory tokens.
//! - [`backup`]: backup files (what `Maintenance.Snapshot` streams) and restoring them.
//! - [`bbolt`]: the bbolt file format (etcd's database and snapshot files), written and read.
//! - [`observe`]: timing hooks (fsync, apply commit) the server turns into metrics.

pub mod auth;
pub mod backup;
pub mod bbolt;
pub mod engine;
pub mod error;
pub mod mvcc;
pub mod observe;
pub mod raft;

pub use error::{ApplyError, ApplyErrorKind, StoreError};
pub use keel_proto as proto;
