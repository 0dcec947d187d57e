//! What a test run records: client operations (invoke + completion), fault windows, and the
//! JSON Lines history file that holds both.
//!
//! Every operation is one [`Op`]; the history file has two lines per operation, Jepsen style: an
//! `invoke` event and its completion (`ok`, `fail` or `info`), plus `nemesis` events marking the
//! start and end of each fault. Times are nanoseconds on the harness's monotonic clock since the
//! start of the test.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

pub use crate::history::Outcome;

/// One client operation as the harness saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Op {
    /// Invocation order (unique per run).
    pub index: u64,
    /// Logical process: a worker takes a fresh process number after an indeterminate result,
    /// so a process never has two operations open (Jepsen's convention).
    pub process: u64,
    /// Index of the member the worker talks to (0-based; `n1` is 0).
    pub node: usize,
    /// Operation name (`read`, `write`, `cas`, `add`, `txn`, `put`, `watch`, ...).
    pub f: String,
    /// The request (workload specific JSON).
    pub value: Value,
    /// What the client observed (workload specific JSON; `null` when nothing).
    #[serde(default)]
    pub result: Value,
    pub outcome: Outcome,
    /// Error text for `fail` and `info`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Invocation time (ns since the start of the test).
    pub invoke: u64,
    /// When the client got the answer or gave up. For `info` the operation may still take
    /// effect later: checkers treat its completion as unbounded.
    pub complete: u64,
}

impl Op {
    /// The completion time a checker may rely on: `u64::MAX` for indeterminate operations.
    pub fn effective_complete(&self) -> u64 {
        if self.outcome == Outcome::Info {
            u64::MAX
        } else {
            self.complete
        }
    }

    pub fn latency_ns(&self) -> u64 {
        self.complete.saturating_sub(self.invoke)
    }

    pub fn key(&self) -> Option<&str> {
        self.value.get("key").and_then(Value::as_str)
    }

    /// A one-line description for reports.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "#{} p{} n{} {} {} {:?}",
            self.index,
            self.process,
            self.node + 1,
            self.f,
            self.value,
            self.outcome
        );
        if !self.result.is_null() {
            let r = self.result.to_string();
            if r.len() > 300 {
                let cut = (0..=300)
                    .rev()
                    .find(|&i| r.is_char_boundary(i))
                    .unwrap_or(0);
                s.push_str(&format!(" -> {}… ({} bytes)", &r[..cut], r.len()));
            } else {
                s.push_str(&format!(" -> {r}"));
            }
        }
        if let Some(e) = &self.error {
            s.push_str(&format!(" ({e})"));
        }
        s.push_str(&format!(
            " [{:.3}s..{:.3}s]",
            self.invoke as f64 / 1e9,
            self.complete as f64 / 1e9
        ));
        s
    }
}

/// A fault as it was applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultWindow {
    /// `kill`, `pause`, `partition`, `latency`.
    pub kind: String,
    /// Human description, e.g. `isolate leader n2` or `kill n1,n3`.
    pub description: String,
    /// Members affected (0-based).
    pub nodes: Vec<usize>,
    pub start: u64,
    pub end: u64,
}

/// Writes the history as JSON Lines: invoke/completion pairs and nemesis events, by time.
pub fn write_history(path: &Path, ops: &[Op], faults: &[FaultWindow]) -> std::io::Result<()> {
    let mut events: Vec<(u64, u8, Value)> = Vec::with_capacity(ops.len() * 2 + faults.len() * 2);
    for o in ops {
        events.push((
            o.invoke,
            1,
            json!({"index": o.index, "time": o.invoke, "process": o.process,
                   "node": format!("n{}", o.node + 1), "type": "invoke", "f": o.f, "value": o.value}),
        ));
        let mut done = json!({"index": o.index, "time": o.complete, "process": o.process,
            "node": format!("n{}", o.node + 1), "type": o.outcome, "f": o.f, "value": o.value,
            "result": o.result});
        if let Some(e) = &o.error {
            done["error"] = json!(e);
        }
        events.push((o.complete, 0, done));
    }
    for f in faults {
        let names: Vec<String> = f.nodes.iter().map(|n| format!("n{}", n + 1)).collect();
        events.push((
            f.start,
            2,
            json!({"time": f.start, "process": "nemesis", "type": "info",
                   "f": format!("start-{}", f.kind), "value": {"description": f.description, "nodes": names}}),
        ));
        events.push((
            f.end,
            2,
            json!({"time": f.end, "process": "nemesis", "type": "info",
                   "f": format!("stop-{}", f.kind), "value": {"description": f.description, "nodes": names}}),
        ));
    }
    events.sort_by_key(|(t, order, _)| (*t, *order));
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for (_, _, e) in events {
        serde_json::to_writer(&mut out, &e)?;
        out.write_all(b"\n")?;
    }
    out.flush()
}

/// Reads a history written by [`write_history`] back into operations and fault windows.
pub fn read_history(path: &Path) -> anyhow::Result<(Vec<Op>, Vec<FaultWindow>)> {
    let text = std::fs::read_to_string(path)?;
    let mut open: std::collections::BTreeMap<u64, Value> = Default::default();
    let mut ops = Vec::new();
    let mut fault_open: Vec<FaultWindow> = Vec::new();
    let mut faults = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let e: Value =
            serde_json::from_str(line).map_err(|err| anyhow::anyhow!("line {}: {err}", n + 1))?;
        let time = e["time"].as_u64().unwrap_or(0);
        if e["process"] == "nemesis" {
            let f = e["f"].as_str().unwrap_or("");
            let nodes: Vec<usize> = e["value"]["nodes"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str()?.strip_prefix('n')?.parse::<usize>().ok())
                        .map(|x| x - 1)
                        .collect()
                })
                .unwrap_or_default();
            let description = e["value"]["description"].as_str().unwrap_or("").to_string();
            if let Some(kind) = f.strip_prefix("start-") {
                fault_open.push(FaultWindow {
                    kind: kind.to_string(),
                    description,
                    nodes,
                    start: time,
                    end: time,
                });
            } else if let Some(kind) = f.strip_prefix("stop-")
                && let Some(pos) = fault_open
                    .iter()
                    .position(|w| w.kind == kind && w.description == description)
            {
                let mut w = fault_open.remove(pos);
                w.end = time;
                faults.push(w);
            }
            continue;
        }
        let index = e["index"]
            .as_u64()
            .ok_or_else(|| anyhow::anyhow!("line {}: no index", n + 1))?;
        if e["type"] == "invoke" {
            open.insert(index, e);
            continue;
        }
        let inv = open
            .remove(&index)
            .ok_or_else(|| anyhow::anyhow!("line {}: completion without invocation", n + 1))?;
        let outcome: Outcome = serde_json::from_value(e["type"].clone())?;
        let node = e["node"]
            .as_str()
            .and_then(|s| s.strip_prefix('n')?.parse::<usize>().ok())
            .unwrap_or(1)
            - 1;
        ops.push(Op {
            index,
            process: e["process"].as_u64().unwrap_or(0),
            node,
            f: e["f"].as_str().unwrap_or("").to_string(),
            value: e["value"].clone(),
            result: e["result"].clone(),
            outcome,
            error: e["error"].as_str().map(str::to_string),
            invoke: inv["time"].as_u64().unwrap_or(0),
            complete: time,
        });
    }
    ops.sort_by_key(|o| o.index);
    faults.sort_by_key(|f| f.start);
    Ok((ops, faults))
}

/// The verdict of one checker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Valid {
    True,
    False,
    Unknown,
}

impl Valid {
    /// Combines verdicts: any false is false; otherwise any unknown is unknown.
    pub fn and(self, other: Valid) -> Valid {
        match (self, other) {
            (Valid::False, _) | (_, Valid::False) => Valid::False,
            (Valid::Unknown, _) | (_, Valid::Unknown) => Valid::Unknown,
            _ => Valid::True,
        }
    }
}

impl std::fmt::Display for Valid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Valid::True => "true",
            Valid::False => "false",
            Valid::Unknown => "unknown",
        })
    }
}

/// What one checker found.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckResult {
    pub checker: String,
    pub valid: Valid,
    /// Short lines for the summary (counts, first anomalies).
    pub summary: Vec<String>,
    /// Anomaly name -> how many were found.
    #[serde(default)]
    pub anomalies: std::collections::BTreeMap<String, usize>,
    /// A small failing sub-history (described operations) for the first violation.
    #[serde(default)]
    pub witness: Vec<String>,
    /// Operation indices involved in the first violation (highlighted in the report).
    #[serde(default)]
    pub witness_ops: Vec<u64>,
}

impl CheckResult {
    pub fn new(checker: &str) -> Self {
        CheckResult {
            checker: checker.to_string(),
            valid: Valid::True,
            summary: Vec::new(),
            anomalies: Default::default(),
            witness: Vec::new(),
            witness_ops: Vec::new(),
        }
    }

    /// Records an anomaly (makes the result invalid); the first call's witness is kept.
    pub fn anomaly(&mut self, name: &str, message: String, witness: &[&Op]) {
        self.valid = Valid::False;
        let count = self.anomalies.entry(name.to_string()).or_insert(0);
        *count += 1;
        if *count <= 3 {
            self.summary.push(format!("{name}: {message}"));
        }
        if self.witness.is_empty() {
            self.witness.push(format!("{name}: {message}"));
            for o in witness {
                self.witness.push(format!("  {}", o.describe()));
                self.witness_ops.push(o.index);
            }
        }
    }
}
