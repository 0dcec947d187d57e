//! The history model: what a client invoked and what it observed.

use serde::{Deserialize, Serialize};

/// A register operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "f", rename_all = "kebab-case")]
pub enum Op {
    /// Observed value (`None`: never written).
    Read {
        value: Option<i64>,
    },
    Write {
        value: i64,
    },
    Cas {
        from: i64,
        to: i64,
    },
}

/// How an operation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// It happened, with the recorded result.
    Ok,
    /// It certainly did not happen.
    Fail,
    /// Unknown: it may have happened at any time after its invocation, or never.
    Info,
}

/// One completed (or indeterminate) operation with its position in real time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operation {
    pub process: u64,
    pub key: String,
    pub op: Op,
    pub outcome: Outcome,
    /// Invocation and completion positions (any monotonic clock; `u64::MAX` = never completed).
    pub invoke: u64,
    pub complete: u64,
}

/// Writes a history as JSON Lines.
pub fn to_jsonl(ops: &[Operation]) -> String {
    ops.iter()
        .filter_map(|o| serde_json::to_string(o).ok())
        .map(|l| l + "\n")
        .collect()
}
