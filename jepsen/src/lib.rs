//! keel-jepsen: Keel's Jepsen-style fault-testing harness.
//!
//! It treats Keel as a black box: it starts `keel` processes on 127.0.0.1, puts a controllable
//! TCP proxy in front of every member's peer port, drives clients over the etcd v3 gRPC API,
//! injects faults on a seeded schedule, records the history and checks it.
//!
//! Module map:
//! - [`history`], [`jepsen_log`], [`linearizable`]: the register model, Jepsen's log format and
//!   a Wing–Gong–Lowe linearizability search (also behind `keel-jepsen check-jepsen-log`).
//! - [`record`]: run histories (operations, fault windows, JSON Lines) and checker results.
//! - [`cluster`], [`proxy`]: the members as processes and the peer-link proxies.
//! - [`nemesis`]: faults (kill, graceful stop, pause, partition, latency, member changes,
//!   compaction, clock skew) and the seeded schedule.
//! - [`client`]: a no-retry etcd client that classifies errors as definite or indeterminate.
//! - [`workload`]: register, set, append and watch clients; [`checker`]: their checkers.
//! - [`runner`]: one test run end to end; [`profiles`]: the `ci` and `long` profiles;
//!   [`report`]: the HTML report.
//!
//! Semantics of outcomes: a `fail` operation did not happen; an `info` (indeterminate, e.g.
//! timed-out) write may take effect at any point after its invocation, or never; an
//! indeterminate read constrains nothing.

pub mod checker;
pub mod client;
pub mod cluster;
pub mod history;
pub mod jepsen_log;
pub mod linearizable;
pub mod nemesis;
pub mod profiles;
pub mod proxy;
pub mod record;
pub mod report;
pub mod runner;
pub mod workload;
