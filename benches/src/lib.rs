//! keel-bench: a load generator that speaks the etcd v3 API, so the same binary measures Keel
//! and real etcd.
//!
//! Module map:
//! - [`driver`]: the common flags, channels, keys and values, the closed-loop driver.
//! - [`lean`]: a lean HTTP/2 transport for unary calls (`--grpc-client lean`).
//! - [`stats`]: latency histograms and the summary every workload prints.
//! - [`kv`]: `put`, `range`, `txn-put`, `txn-cas`, `load`.
//! - [`watch`]: `watch` (fan-out, many keys, idle-watcher memory).
//! - [`lease`]: `lease` (grant+revoke, keep-alive).
//! - [`kube`]: the kube-apiserver-like mix.
//! - [`report`] and [`svg`]: docs/benchmarks.md and the plots from compare.sh's results.

pub mod driver;
pub mod kube;
pub mod kv;
pub mod lean;
pub mod lease;
pub mod report;
pub mod stats;
pub mod svg;
pub mod watch;
