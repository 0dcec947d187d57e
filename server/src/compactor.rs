//! Auto-compaction, etcd's two modes (`--auto-compaction-mode`, `--auto-compaction-retention`),
//! run by the leader only; each compaction is an ordinary Compaction proposal.
//!
//! - `periodic`, retention a duration (`1h`, `30m`, `1h30m`; a bare number is hours): the
//!   leader samples the current revision every retention/10 (at most every 6 minutes) and keeps
//!   the samples of the last retention; once a retention has passed since the last compaction
//!   it compacts to the oldest sample — the revision current `retention` ago — and then again
//!   every retention (at most every hour), as etcd's `Periodic` compactor.
//! - `revision`, retention a count: every 5 minutes the leader compacts to
//!   `current revision - retention`, if that moved (etcd's `Revision` compactor).
//!
//! Retention `0` (the default) turns auto-compaction off.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use keel_proto::etcdserverpb::CompactionRequest;
use keel_proto::keelpb::RaftRequest;
use keel_proto::keelpb::raft_request::Request as Cmd;
use tokio::time::Instant;

use crate::error::ServerError;
use crate::node::KeelNode;

/// etcd's fixed interval of revision-mode compaction.
pub const REVISION_INTERVAL: Duration = Duration::from_secs(300);
const RETRY_DIVISOR: u32 = 10;

/// What `--auto-compaction-mode` and `--auto-compaction-retention` ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoCompaction {
    Off,
    Periodic(Duration),
    Revision(i64),
}

/// Parses Go-style durations as etcd accepts them: `1h`, `30m`, `1h30m`, `1.5h`, `90s`,
/// `500ms`; a bare number is a number of hours.
pub fn parse_retention_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(hours) = s.parse::<u64>() {
        return Ok(Duration::from_secs(hours * 3600));
    }
    let bad = || format!("invalid auto-compaction retention '{s}'");
    let mut total = 0f64;
    let mut rest = s;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let (num, tail) = rest.split_at(num_end);
        let n: f64 = num.parse().map_err(|_| bad())?;
        let unit_end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        let secs = match unit {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            "us" | "µs" => 0.000_001,
            "ns" => 0.000_000_001,
            _ => return Err(bad()),
        };
        total += n * secs;
        rest = tail;
    }
    Ok(Duration::from_secs_f64(total))
}

/// Reads the two flags (etcd's rules; an unknown mode is an error at start-up).
pub fn parse(mode: &str, retention: &str) -> Result<AutoCompaction, String> {
    match mode {
        "periodic" | "" => {
            let d = parse_retention_duration(retention)?;
            Ok(if d.is_zero() {
                AutoCompaction::Off
            } else {
                AutoCompaction::Periodic(d)
            })
        }
        "revision" => {
            let n: i64 = retention.trim().parse().map_err(|_| {
                format!("invalid auto-compaction retention '{retention}' for revision mode (a number of revisions)")
            })?;
            if n < 0 {
                return Err(format!("invalid auto-compaction retention '{retention}'"));
            }
            Ok(if n == 0 {
                AutoCompaction::Off
            } else {
                AutoCompaction::Revision(n)
            })
        }
        other => Err(format!(
            "unknown auto-compaction-mode '{other}' (periodic or revision)"
        )),
    }
}

/// Starts auto-compaction as configured. `revision_interval` is etcd's 5 minutes except in tests.
pub fn spawn(
    node: Arc<KeelNode>,
    mode: AutoCompaction,
    revision_interval: Duration,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    match mode {
        AutoCompaction::Off => {}
        AutoCompaction::Periodic(period) => {
            tracing::info!(retention = ?period, "auto-compaction: periodic");
            tokio::spawn(periodic(node, period, stop));
        }
        AutoCompaction::Revision(retention) => {
            tracing::info!(retention, interval = ?revision_interval, "auto-compaction: revision");
            tokio::spawn(revision(node, retention, revision_interval, stop));
        }
    }
}

/// Proposes a compaction to `rev`; an already compacted revision counts as done (as etcd).
async fn compact(node: &KeelNode, rev: i64, mode: &str) -> bool {
    let started = std::time::Instant::now();
    let req = RaftRequest {
        request: Some(Cmd::Compaction(CompactionRequest {
            revision: rev,
            physical: false,
        })),
        origin: None,
    };
    match node.propose(req).await {
        Ok(_) => {
            tracing::info!(mode, revision = rev, took = ?started.elapsed(), "completed auto compaction");
            true
        }
        Err(ServerError::Compacted) => {
            tracing::info!(
                mode,
                revision = rev,
                "auto compaction: revision already compacted"
            );
            true
        }
        Err(e) => {
            tracing::warn!(mode, revision = rev, "auto compaction failed: {e}");
            false
        }
    }
}

/// Sleeps `d`; false when the server stops.
async fn pause(d: Duration, stop: &mut tokio::sync::watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = stop.wait_for(|s| *s) => false,
    }
}

async fn periodic(
    node: Arc<KeelNode>,
    period: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let interval = period.min(Duration::from_secs(3600));
    let retry = interval / RETRY_DIVISOR;
    let retentions = (period.as_secs_f64() / retry.as_secs_f64()) as usize + 1;
    let mut revs: VecDeque<i64> = VecDeque::new();
    let mut last_rev = 0;
    let mut last_success = Instant::now();
    let mut base = period;
    let mut was_leader = false;
    loop {
        let leader = node.raft.is_leader();
        if leader && !was_leader {
            // A new leader starts sampling afresh (etcd pauses and resumes its compactor).
            revs.clear();
            last_success = Instant::now();
            base = period;
        }
        was_leader = leader;
        if leader {
            revs.push_back(node.mvcc.current_revision());
            if revs.len() > retentions {
                revs.pop_front();
            }
        }
        if !pause(retry, &mut stop).await {
            return;
        }
        if !leader || !node.raft.is_leader() {
            continue;
        }
        let Some(&rev) = revs.front() else { continue };
        if last_success.elapsed() < base || rev == last_rev || rev <= 0 {
            continue;
        }
        base = interval;
        tracing::info!(revision = rev, retention = ?period, "starting auto periodic compaction");
        if compact(&node, rev, "periodic").await {
            last_rev = rev;
            last_success = Instant::now();
        }
    }
}

async fn revision(
    node: Arc<KeelNode>,
    retention: i64,
    interval: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut prev = 0;
    loop {
        if !pause(interval, &mut stop).await {
            return;
        }
        if !node.raft.is_leader() {
            continue;
        }
        let rev = node.mvcc.current_revision() - retention;
        if rev <= 0 || rev == prev || rev <= node.mvcc.compact_revision() {
            continue;
        }
        tracing::info!(
            revision = rev,
            retention,
            "starting auto revision compaction"
        );
        if compact(&node, rev, "revision").await {
            prev = rev;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_parsing_follows_etcd() {
        assert_eq!(
            parse("periodic", "1").unwrap(),
            AutoCompaction::Periodic(Duration::from_secs(3600))
        );
        assert_eq!(
            parse("periodic", "30m").unwrap(),
            AutoCompaction::Periodic(Duration::from_secs(1800))
        );
        assert_eq!(
            parse("periodic", "1h30m").unwrap(),
            AutoCompaction::Periodic(Duration::from_secs(5400))
        );
        assert_eq!(
            parse("periodic", "1.5h").unwrap(),
            AutoCompaction::Periodic(Duration::from_secs(5400))
        );
        assert_eq!(parse("periodic", "0").unwrap(), AutoCompaction::Off);
        assert_eq!(
            parse("revision", "1000").unwrap(),
            AutoCompaction::Revision(1000)
        );
        assert_eq!(parse("revision", "0").unwrap(), AutoCompaction::Off);
        assert!(parse("revision", "1h").is_err());
        assert!(parse("periodic", "5x").is_err());
        assert!(parse("periodic", "").is_err());
        assert!(parse("hourly", "1").is_err());
    }
}
