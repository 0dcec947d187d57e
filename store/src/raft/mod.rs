//! openraft storage for Keel: the Raft log store and the replicated state machine.
//!
//! - [`types`]: the openraft type configuration ([`TypeConfig`]), the log command and
//!   response wrappers, and [`MemberNode`] (what the membership config records per member).
//! - [`log_store`]: [`LogStore`], the Raft log on the engine's `raft_log`/`raft_meta` tables with
//!   group commit: many appends share one fsync, and openraft is told an append is durable only
//!   after that fsync. It keeps the newest entries in memory as well (`log_cache`), because
//!   replication and apply read every entry back right after it is appended.
//! - [`state_machine`]: [`StateMachine`], which applies committed commands to the MVCC store,
//!   one engine write batch per applied chunk holding the data, the last applied log id and the
//!   membership.
//! - [`snapshot`]: point-in-time snapshot files of the state-machine tables, streamed to disk
//!   while applying continues, and their atomic installation on a follower.
//! - [`recovery`]: `--force-new-cluster` (forgetting the Raft state, keeping the applied data).
//!
//! Durability contract: a log entry is acknowledged to openraft (and so may count towards a
//! quorum) only after the write-ahead log holding it was fsynced. State-machine writes are not
//! synced on their own; they share the engine's single write-ahead log with the Raft log, so
//! they become durable no later than the next log fsync, and a crash can only lose a suffix of
//! applied entries, which are replayed from the (durable) log on restart.

mod log_cache;
pub mod log_store;
pub mod recovery;
pub mod snapshot;
pub mod state_machine;
pub mod types;

pub use log_store::LogStore;
pub use state_machine::{AppliedState, StateMachine};
pub use types::{Command, CommandResult, MemberNode, NodeId, TypeConfig};

/// The openraft handle type used by the server.
pub type Raft = openraft::Raft<TypeConfig, StateMachine>;
