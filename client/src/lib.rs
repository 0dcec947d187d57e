//! keel-client: the Rust client for Keel (and any etcd v3 server), made
//! for control planes.
//!
//! ```no_run
//! use keel_client::{Client, Compare, ConnectOptions, Op};
//! # async fn f() -> keel_client::Result<()> {
//! let client = Client::connect(["127.0.0.1:2379", "127.0.0.1:22379"], ConnectOptions::new()).await?;
//! client.put("greeting", "hello").await?;
//! let kv = client.get("greeting").await?.into_first().unwrap();
//! let swapped = client
//!     .txn()
//!     .when([Compare::mod_revision("greeting").eq(kv.mod_revision)])
//!     .and_then([Op::put("greeting", "world")])
//!     .await?
//!     .succeeded;
//! # Ok(()) }
//! ```
//!
//! # Module map
//! - [`client`]: [`Client`], [`ConnectOptions`], [`RetryPolicy`]. Several endpoints with
//!   health-aware selection: an endpoint that cannot be reached or answers `Unavailable` is
//!   passed over for a while and requests go to the next one; connections come back by
//!   themselves. Per-request timeouts, HTTP/2 keep-alive, auth tokens (`with_user`; the token is
//!   renewed on `etcdserver: invalid auth token`), TLS with the `tls` cargo feature.
//! - [`kv`]: `get` / `put` / `delete` / `txn` builders you `.await`, [`Compare`] and [`Op`] for
//!   transactions, prefix helpers, [`Client::list_prefix`] (paginated, at one revision).
//! - [`error`]: [`Error`], decoded from etcd's codes and messages. **Retries**: reads (and
//!   read-only txns, lease TTL, member list, ...) are retried with backoff on transient
//!   failures; writes are retried only when they certainly were not sent (no connection could
//!   be made). A write that was sent but not answered fails with [`Error::Ambiguous`]: it may
//!   have been applied.
//! - [`watch`]: [`Watcher`]s resume after disconnects from the last revision seen + 1, report
//!   compaction as [`WatchEvent::Compacted`], expose progress notifications and
//!   [`Watcher::request_progress`].
//! - [`lease`]: grant / revoke / time-to-live / list, and [`LeaseKeeper`] (background keep-alive;
//!   drop it to stop).
//! - [`concurrency`]: locks and elections over the server's `v3lockpb.Lock` and
//!   `v3electionpb.Election` services; [`Client::lock_session`] gives a [`LockGuard`] with its
//!   own kept-alive lease and a fencing [`Compare`] for the writes the lock protects.
//! - [`informer`]: [`Informer`]: list a prefix at one revision, watch from the next, keep a
//!   local cache, call a handler on add / update / delete, relist after compaction, periodic
//!   resync.
//! - [`leader`]: [`LeaderElector`]: leader election for controller replicas over the Election
//!   service and a kept-alive lease, with notifications on gain and loss.
//! - [`maintenance`]: member list, endpoint status, snapshot.
//!
//! The `keelctl` binary of this crate is a small etcdctl built on this library; the examples in
//! `client/examples/` (`kv`, `watch`, `informer`, `controlplane`) show each piece in use.

#![warn(missing_docs)]

pub mod client;
pub mod concurrency;
pub mod error;
pub mod informer;
pub mod kv;
pub mod leader;
pub mod lease;
pub mod maintenance;
pub mod watch;

pub use client::{Client, ConnectOptions, RetryPolicy};
pub use concurrency::{LeaderKey, LockGuard, LockKey};
pub use error::{Error, Result};
pub use informer::{Handler, Informer, InformerEvent, InformerHandle, Store};
pub use kv::{
    Compare, DeleteResponse, GetResponse, Header, KeyValue, Op, OpResponse, PutResponse, SortOrder,
    SortTarget, TxnResponse, prefix_end,
};
pub use leader::{ElectorHandle, LeaderElector, Leadership, Role};
pub use lease::{LeaseGrant, LeaseKeeper, LeaseState, LeaseTimeToLive};
pub use maintenance::{Member, SnapshotChunk, Status};
pub use watch::{Event, EventKind, WatchEvent, WatchOptions, Watcher};

/// The generated etcd v3 protobuf types and gRPC stubs, for what this crate does not wrap.
pub use keel_proto as proto;
