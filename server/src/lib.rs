//! keel-server: a Keel member — the etcd v3 gRPC API over a Raft-replicated MVCC store.
//!
//! Module map:
//! - [`config`]: flags and `KEEL_*` environment variables, named after etcd's.
//! - [`node`]: a member's identity, storage and Raft node; the proposal path (with forwarding to
//!   the leader) and the linearizable read barrier.
//! - [`proposals`]: every write this member proposes; those that reach the leader together
//!   share one Raft log entry.
//! - [`forwarding`]: a follower's writes pipelined to the leader on one stream, and its
//!   read-index calls coalesced.
//! - [`network`]: the openraft network client (tonic, one channel per peer, streamed appends).
//! - [`peer_service`]: the member-to-member gRPC service.
//! - [`kv`]: `etcdserverpb.KV`; [`validate`]: etcd's request checks.
//! - [`watch`]: `etcdserverpb.Watch` — the watch hub (synced / unsynced watchers fed from the
//!   applied state) and the stream handler; [`watch_wire`]: the service on the wire, sending
//!   responses assembled from events encoded once for all watchers; [`watch_index`]: which
//!   watchers an event's key concerns (single keys, prefixes, other ranges).
//! - [`lease`]: `etcdserverpb.Lease` and the leader-only [`lease::Lessor`] (deadlines, expiry).
//! - [`lock`]: `v3lockpb.Lock`, and etcd's `concurrency` recipes run in the server.
//! - [`election`]: `v3electionpb.Election` on the same recipes.
//! - [`maintenance`]: the `etcdserverpb.Maintenance` service and the backend quota.
//! - [`corruption`]: the leader's periodic HashKV comparison across members (CORRUPT alarm).
//! - [`compactor`]: auto-compaction (periodic and revision modes).
//! - [`http`]: `/health`, `/version` and `/metrics` on the client port; [`metrics`]: the metrics;
//!   [`grpc_metrics`]: etcd's per-method gRPC counters, as a layer on the client port;
//!   [`peer_metrics`]: bytes exchanged with each peer, as a layer on the peer port and a channel;
//!   [`health`]: `grpc.health.v1.Health`, as etcd serves it; [`probes`]: `/livez` and `/readyz`.
//! - [`gateway`]: etcd's JSON gateway (`POST /v3/kv/range`, ...) on the client port.
//! - [`cluster`]: `etcdserverpb.Cluster` — membership changes.
//! - [`error`]: the one table mapping errors to gRPC status codes and etcd's messages.
//! - [`snapshot`]: backups — the `Maintenance.Snapshot` stream and `keel snapshot restore`.
//! - [`auth`]: `etcdserverpb.Auth`, tokens and the permission checks of every client RPC.
//! - [`tls`]: TLS for the client and peer listeners.
//! - [`authority_fix`]: repairs etcd 3.4 clients' malformed HTTP/2 `:authority`.
//! - [`server`]: listeners and graceful shutdown; [`h2_server`]: plain-text client connections
//!   served on `h2` with every call driven by its connection's task (responses written together).

pub mod auth;
pub mod authority_fix;
pub mod cluster;
pub mod compactor;
pub mod config;
pub mod corruption;
pub mod election;
pub mod error;
pub mod forwarding;
pub mod gateway;
pub mod grpc_metrics;
pub mod h2_server;
pub mod health;
pub mod http;
pub mod kv;
pub mod lease;
pub mod lock;
pub mod maintenance;
pub mod metrics;
pub mod network;
pub mod node;
pub mod peer_metrics;
pub mod peer_service;
pub mod probes;
pub mod proposals;
pub mod server;
pub mod snapshot;
pub mod tls;
pub mod validate;
pub mod watch;
pub mod watch_index;
pub mod watch_wire;
