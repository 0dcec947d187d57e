//! keel-jepsen: Keel's Jepsen-style fault-testing harness (first cut: the checker).
//!
//! Module map:
//! - [`history`]: operations as a client saw them (invoke / ok / fail / info), serialisable as
//!   JSON Lines.
//! - [`jepsen_log`]: a parser for Jepsen's register logs (`INFO jepsen.util - P :type :f V`).
//! - [`linearizable`]: a Wing–Gong–Lowe linearizability search with Lowe's memoisation of
//!   (linearized set, model state), for a compare-and-set register, per key.
//!
//! Run `keel-jepsen check-jepsen-log --model cas-register FILE...`: it prints
//! `linearizable: true|false` per file and exits 0 when every file could be checked.
//!
//! Semantics of outcomes: a `:fail` operation did not happen and is dropped; an `:info`
//! (indeterminate, e.g. timed-out) write or cas may take effect at any point after its
//! invocation, or never; an indeterminate read constrains nothing and is dropped.

pub mod history;
pub mod jepsen_log;
pub mod linearizable;
