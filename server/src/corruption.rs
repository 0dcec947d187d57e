//! The leader's periodic corruption check (etcd's `--experimental-corrupt-check-time`; Keel's
//! `--corrupt-check-time`, default 5m, 0 turns it off).
//!
//! Every period the leader computes its HashKV at its applied revision, asks every other member
//! for its HashKV at that same revision over the peer port (a member waits up to 2 s to apply
//! it), and compares — only where the compact revisions agree, as the hash covers history from
//! the compact revision on. It then hashes itself again at the same revision: a different
//! result without an intervening compaction means its own store changed under it. On a
//! mismatch it raises a CORRUPT alarm naming the suspect member, through a proposal; from then
//! on every member refuses writes with `etcdserver: corrupt cluster` until an operator
//! investigates and disarms it. A member that cannot answer (down, slow, already compacted past
//! the revision) is skipped, never accused.

use std::sync::Arc;
use std::time::Duration;

use keel_proto::etcdserverpb::{AlarmRequest, AlarmType, HashKvRequest, alarm_request};
use keel_proto::keelpb::RaftRequest;
use keel_proto::keelpb::raft_request::Request as Cmd;
use keel_store::mvcc::HashKvFormat;
use keel_store::raft::NodeId;

use crate::node::KeelNode;

/// How long a member's answer may take.
const PEER_TIMEOUT: Duration = Duration::from_secs(10);

/// What one round found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CheckReport {
    pub revision: i64,
    /// Members whose hash was compared.
    pub compared: Vec<NodeId>,
    /// Members whose hash differs from the leader's (the leader itself if its own hash moved).
    pub mismatched: Vec<NodeId>,
}

/// Starts the periodic check; it runs only while this member is the leader.
pub fn spawn(node: Arc<KeelNode>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let period = node.config.corrupt_check_time;
    if period.is_zero() {
        tracing::info!("corruption check disabled (--corrupt-check-time 0)");
        return;
    }
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            if !node.raft.is_leader() {
                continue;
            }
            match check_once(&node).await {
                Ok(r) if r.mismatched.is_empty() => {
                    tracing::debug!(
                        revision = r.revision,
                        members = r.compared.len(),
                        "corruption check passed"
                    )
                }
                Ok(r) => {
                    for id in &r.mismatched {
                        raise_corrupt(&node, *id).await;
                    }
                }
                Err(e) => tracing::warn!("corruption check skipped: {e}"),
            }
        }
    });
}

async fn raise_corrupt(node: &KeelNode, member: NodeId) {
    let req = RaftRequest {
        request: Some(Cmd::Alarm(AlarmRequest {
            action: alarm_request::AlarmAction::Activate as i32,
            member_id: member,
            alarm: AlarmType::Corrupt as i32,
        })),
        origin: None,
    };
    match node.propose_raw(req).await {
        Ok(_) => {
            tracing::error!(member = %format!("{member:x}"), "CORRUPT alarm raised: writes are refused until it is disarmed")
        }
        Err(e) => {
            tracing::error!(member = %format!("{member:x}"), "raising the CORRUPT alarm failed: {e}")
        }
    }
}

async fn local_hash(node: &Arc<KeelNode>, revision: i64) -> Result<(u32, i64, i64), String> {
    let n = node.clone();
    let r = tokio::task::spawn_blocking(move || {
        crate::maintenance::hash_kv(&n, revision, HashKvFormat::Internal)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    Ok((r.hash, r.hash_revision, r.compact_revision))
}

/// One round of the check (on the leader). Does not raise alarms itself.
pub async fn check_once(node: &Arc<KeelNode>) -> Result<CheckReport, String> {
    let (hash, revision, compacted) = local_hash(node, 0).await?;
    let me = node.member_id();
    let members = node.other_members();
    let asks = members.iter().map(|(id, member)| async move {
        let mut client = node.peers.client(*id, member).ok()?;
        let mut req = node.peers.request(*id, HashKvRequest { revision });
        req.set_timeout(PEER_TIMEOUT);
        match tokio::time::timeout(PEER_TIMEOUT, client.hash_kv(req)).await {
            Ok(Ok(r)) => Some((*id, r.into_inner())),
            Ok(Err(s)) => {
                tracing::debug!(member = %format!("{id:x}"), "HashKV for the corruption check failed: {}", s.message());
                None
            }
            Err(_) => None,
        }
    });
    let answers: Vec<_> = futures::future::join_all(asks)
        .await
        .into_iter()
        .flatten()
        .collect();
    let mut report = CheckReport {
        revision,
        ..Default::default()
    };
    // Our own hash again, at the same revision (etcd's self-check).
    if let Ok((again, rev2, compacted2)) = local_hash(node, revision).await
        && rev2 == revision
        && compacted2 == compacted
        && again != hash
    {
        tracing::error!(
            revision,
            "the leader's own HashKV changed between two computations"
        );
        report.mismatched.push(me);
    }
    for (id, resp) in answers {
        let their_rev = resp.hash_revision;
        if their_rev != revision || resp.compact_revision != compacted {
            tracing::debug!(member = %format!("{id:x}"), their_rev, their_compacted = resp.compact_revision, "not comparable this round");
            continue;
        }
        report.compared.push(id);
        if resp.hash != hash {
            tracing::error!(
                member = %format!("{id:x}"),
                revision,
                compact_revision = compacted,
                leader_hash = hash,
                member_hash = resp.hash,
                "HashKV mismatch"
            );
            report.mismatched.push(id);
        }
    }
    Ok(report)
}
