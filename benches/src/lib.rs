//! keel-bench: a load generator that speaks the etcd v3 API, so the same binary measures Keel
//! and real etcd.
//!
//! Module map:
//! - [`stats`]: latency histograms and the summary every workload prints.

pub mod stats;
