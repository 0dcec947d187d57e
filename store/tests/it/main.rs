//! keel-store integration tests: etcd MVCC rules on both engines, reopen and compaction on
//! RocksDB, and openraft's storage conformance suite.

mod auth;
mod helpers;
mod mvcc;
mod raft_suite;
mod snapshot;
