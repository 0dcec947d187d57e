//! `etcdserverpb.Maintenance`: status, hashes, alarms, defragmentation, snapshots and leader
//! transfer; and the backend quota that raises the NOSPACE alarm.
//!
//! - Alarm: every action (GET too, as etcd) is a Raft proposal, so a GET is linearizable and
//!   every member's alarm list is the same.
//! - Quota: a request that would grow the store (Put, a Txn with a Put, LeaseGrant) is refused
//!   with `etcdserver: mvcc: database space exceeded` when this member's database plus the
//!   request's cost (etcd's formula) reaches `--quota-backend-bytes`; the member then raises
//!   NOSPACE for itself through a proposal, after which every member refuses such writes at
//!   apply until an operator disarms it. Deletes, compaction and read-only txns still work.
//! - Defragment: a full RocksDB compaction of every table (etcd rewrites its bolt file).
//! - Hash: a CRC-32 of this member's `kv` and `lease` tables as stored now — not bolt's hash,
//!   and like etcd's it may differ between healthy members (physical compaction runs on each
//!   member at its own pace). HashKV is the one to compare across members.
//! - MoveLeader: must reach the leader (etcdctl finds it); waits until leadership has moved.

use std::sync::Arc;
use std::time::Duration;

use keel_proto::etcdserverpb::maintenance_server::Maintenance;
use keel_proto::etcdserverpb::request_op::Request as OpReq;
use keel_proto::etcdserverpb::*;
use keel_proto::keelpb::RaftRequest;
use keel_proto::keelpb::raft_request::Request as Cmd;
use keel_proto::keelpb::raft_response::Response as Res;
use keel_store::engine::{Direction, ScanControl, Table};
use keel_store::mvcc::HashKvFormat;
use openraft::async_runtime::WatchReceiver as _;
use tonic::{Request, Response, Status};

use crate::error::ServerError;
use crate::node::KeelNode;

/// The etcd version Keel reports to clients (they gate features on it).
pub const ETCD_COMPAT_VERSION: &str = "3.5.16";
/// The cluster version `/version` reports (etcd reports major.minor.0).
pub const ETCD_CLUSTER_VERSION: &str = "3.5.0";

/// etcd's default backend quota (`--quota-backend-bytes 0`): 2 GiB.
pub const DEFAULT_QUOTA_BYTES: u64 = 2 << 30;
/// etcd's per-key and per-lease cost estimates (etcdserver/quota.go).
const KV_OVERHEAD: u64 = 256;
const LEASE_OVERHEAD: u64 = 64;

/// How long MoveLeader waits for the new leader.
const MOVE_LEADER_TIMEOUT: Duration = Duration::from_secs(7);

fn unimplemented(what: &str) -> Status {
    Status::unimplemented(format!("keel: {what} is not implemented yet"))
}

/// etcd's name of an alarm type (`NOSPACE`, `CORRUPT`).
pub fn alarm_name(alarm: i32) -> &'static str {
    AlarmType::try_from(alarm)
        .map(|a| a.as_str_name())
        .unwrap_or("UNKNOWN")
}

/// An alarm as etcd's Status lists it in `errors` (gogoproto's compact text form).
pub fn alarm_text(a: &AlarmMember) -> String {
    format!("memberID:{} alarm:{} ", a.member_id, alarm_name(a.alarm))
}

/// The quota in bytes (`--quota-backend-bytes`, 0 meaning etcd's 2 GiB default).
pub fn quota_bytes(node: &KeelNode) -> u64 {
    quota_in_force(node.config.quota_backend_bytes)
}

/// The quota `--quota-backend-bytes` sets (0 meaning etcd's 2 GiB default).
pub fn quota_in_force(flag: u64) -> u64 {
    match flag {
        0 => DEFAULT_QUOTA_BYTES,
        q => q,
    }
}

fn put_cost(p: &PutRequest) -> u64 {
    let mut c = p.key.len() as u64 + p.value.len() as u64 + KV_OVERHEAD;
    if p.lease != 0 {
        c += LEASE_OVERHEAD;
    }
    c
}

fn txn_ops_cost(ops: &[RequestOp]) -> u64 {
    ops.iter()
        .map(|op| match &op.request {
            Some(OpReq::RequestPut(p)) => put_cost(p),
            Some(OpReq::RequestTxn(t)) => txn_cost(t),
            _ => 0,
        })
        .sum()
}

fn txn_cost(t: &TxnRequest) -> u64 {
    txn_ops_cost(&t.success).max(txn_ops_cost(&t.failure))
}

/// etcd's estimate of how much a request grows the backend; 0 for requests that do not.
pub fn quota_cost(req: &RaftRequest) -> u64 {
    let cmd = match &req.request {
        Some(Cmd::Authorized(a)) => a.request.as_ref().and_then(|r| r.request.as_ref()),
        other => other.as_ref(),
    };
    match cmd {
        Some(Cmd::Put(p)) => put_cost(p),
        Some(Cmd::Txn(t)) => txn_cost(t),
        Some(Cmd::LeaseGrant(_)) => LEASE_OVERHEAD,
        _ => 0,
    }
}

/// Refuses a request that would grow the store past the quota, raising NOSPACE for this
/// member first (etcd's quotaAlarmer).
pub async fn check_quota(node: &KeelNode, req: &RaftRequest) -> Result<(), ServerError> {
    let cost = quota_cost(req);
    if cost == 0 {
        return Ok(());
    }
    let (size, _) = node.metrics.db_size(node.mvcc.engine().as_ref());
    let quota = quota_bytes(node);
    if size.saturating_add(cost) < quota {
        return Ok(());
    }
    let raised = node
        .mvcc
        .alarms()
        .iter()
        .any(|a| a.alarm == AlarmType::Nospace as i32 && a.member_id == node.member_id());
    if !raised {
        tracing::warn!(
            db_size = size,
            quota,
            "database space exceeded; raising the NOSPACE alarm"
        );
        let alarm = RaftRequest {
            request: Some(Cmd::Alarm(AlarmRequest {
                action: alarm_request::AlarmAction::Activate as i32,
                member_id: node.member_id(),
                alarm: AlarmType::Nospace as i32,
            })),
            origin: None,
        };
        if let Err(e) = node.propose_raw(alarm).await {
            tracing::warn!("raising NOSPACE failed: {e}");
        }
    }
    Err(ServerError::NoSpace)
}

/// A CRC-32 over this member's `kv` and `lease` tables (see the module docs).
fn member_hash(node: &KeelNode) -> Result<u32, ServerError> {
    let engine = node.mvcc.engine().clone();
    let mut hasher = crc32fast::Hasher::new();
    for table in [Table::Kv, Table::Lease] {
        hasher.update(table.name().as_bytes());
        engine
            .scan(table, &[], None, Direction::Forward, &mut |k, v| {
                hasher.update(k);
                hasher.update(v);
                ScanControl::Continue
            })
            .map_err(|e| ServerError::Internal(e.to_string()))?;
    }
    Ok(hasher.finalize())
}

/// This member's HashKV at `revision` (0: the current one), in `format`: etcd's for clients,
/// Keel's own between members (see [`HashKvFormat`]). As etcd, the header carries the current
/// revision (`hash_revision` the hashed one) and the compact revision is -1 before the first
/// compaction.
pub fn hash_kv(
    node: &KeelNode,
    revision: i64,
    format: HashKvFormat,
) -> Result<HashKvResponse, ServerError> {
    let r = node
        .mvcc
        .hash_kv(revision, format)
        .map_err(ServerError::from)?;
    let hash = if node.config.debug_corrupt_hashkv {
        r.hash ^ 0x5eed
    } else {
        r.hash
    };
    Ok(HashKvResponse {
        header: Some(node.header()),
        hash,
        compact_revision: r.compact_revision,
        hash_revision: r.hash_revision,
    })
}

pub struct MaintenanceService {
    node: Arc<KeelNode>,
}

impl MaintenanceService {
    pub fn new(node: Arc<KeelNode>) -> Self {
        Self { node }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(Arc<KeelNode>) -> Result<T, ServerError> + Send + 'static,
    ) -> Result<T, Status> {
        let node = self.node.clone();
        tokio::task::spawn_blocking(move || f(node))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(Status::from)
    }
}

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    async fn alarm(&self, req: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        let r = req.into_inner();
        let resp = self
            .node
            .propose(RaftRequest {
                request: Some(Cmd::Alarm(r)),
                origin: None,
            })
            .await?;
        match resp.response {
            // etcd's Alarm answers carry no header (`etcdctl alarm list -w json` prints `{}`).
            Some(Res::Alarm(mut a)) => {
                a.header = None;
                Ok(Response::new(a))
            }
            _ => Err(ServerError::Internal("unexpected apply response".into()).into()),
        }
    }

    async fn status(
        &self,
        _req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let m = self.node.raft.metrics().borrow_watched().clone();
        let (db_size, db_in_use) = self.node.metrics.db_size(self.node.mvcc.engine().as_ref());
        let applied = self.node.applied.borrow().index;
        let is_learner = !m
            .membership_config
            .membership()
            .voter_ids()
            .any(|id| id == self.node.member_id());
        let mut errors = Vec::new();
        if m.current_leader.is_none() {
            errors.push(ServerError::NoLeader.to_string());
        }
        errors.extend(self.node.mvcc.alarms().iter().map(alarm_text));
        // etcd's raftIndex is the committed index as this member knows it.
        let committed = m
            .cluster_committed
            .map(|l| l.index)
            .or(m.last_applied.map(|l| l.index))
            .unwrap_or(0)
            .max(applied);
        Ok(Response::new(StatusResponse {
            header: Some(self.node.header()),
            version: ETCD_COMPAT_VERSION.to_string(),
            db_size: db_size as i64,
            leader: m.current_leader.unwrap_or(0),
            raft_index: committed,
            raft_term: m.current_term,
            raft_applied_index: applied,
            errors,
            db_size_in_use: db_in_use as i64,
            is_learner,
            ..Default::default()
        }))
    }

    async fn defragment(
        &self,
        _req: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        let started = std::time::Instant::now();
        let (before, _) = self
            .node
            .metrics
            .db_size_now(self.node.mvcc.engine().as_ref());
        let after = self
            .blocking(move |node| {
                let engine = node.mvcc.engine().clone();
                // etcd's metrics: in flight while the tables are compacted, and how long it took
                // (observed when it fails too).
                crate::metrics::DEFRAG_INFLIGHT.inc();
                let compacted = Table::ALL
                    .iter()
                    .try_for_each(|table| engine.compact_table(*table));
                crate::metrics::DEFRAG_INFLIGHT.dec();
                crate::metrics::DEFRAG_DURATION.observe(started.elapsed().as_secs_f64());
                compacted.map_err(|e| ServerError::Internal(e.to_string()))?;
                Ok(node.metrics.db_size_now(engine.as_ref()).0)
            })
            .await?;
        tracing::info!(
            before,
            after,
            took = ?started.elapsed(),
            "defragmented (full compaction of every table)"
        );
        Ok(Response::new(DefragmentResponse {
            header: Some(self.node.header()),
        }))
    }

    async fn hash(&self, _req: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        let header = self.node.header();
        let started = std::time::Instant::now();
        let hash = self.blocking(|node| member_hash(&node)).await?;
        crate::metrics::HASH_DURATION.observe(started.elapsed().as_secs_f64());
        Ok(Response::new(HashResponse {
            header: Some(header),
            hash,
        }))
    }

    async fn hash_kv(
        &self,
        req: Request<HashKvRequest>,
    ) -> Result<Response<HashKvResponse>, Status> {
        let revision = req.into_inner().revision;
        let started = std::time::Instant::now();
        let resp = self
            .blocking(move |node| hash_kv(&node, revision, HashKvFormat::Etcd))
            .await?;
        crate::metrics::HASH_REV_DURATION.observe(started.elapsed().as_secs_f64());
        Ok(Response::new(resp))
    }

    type SnapshotStream = crate::node::ResponseStream<SnapshotResponse>;

    async fn snapshot(
        &self,
        _req: Request<SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        let rx = crate::snapshot::stream_backup(self.node.clone()).await?;
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn move_leader(
        &self,
        req: Request<MoveLeaderRequest>,
    ) -> Result<Response<MoveLeaderResponse>, Status> {
        let target = req.into_inner().target_id;
        let me = self.node.member_id();
        let m = self.node.raft.metrics().borrow_watched().clone();
        if m.current_leader != Some(me) {
            return Err(ServerError::NotLeader.into());
        }
        if !m
            .membership_config
            .membership()
            .voter_ids()
            .any(|id| id == target)
        {
            return Err(ServerError::BadLeaderTransferee.into());
        }
        if target != me {
            tracing::info!(from = %format!("{me:x}"), to = %format!("{target:x}"), "leadership transfer starting");
            self.node
                .raft
                .trigger()
                .transfer_leader(target)
                .await
                .map_err(|_| ServerError::Stopped)?;
            match self.node.wait_for_leader(target, MOVE_LEADER_TIMEOUT).await {
                Ok(true) => {
                    tracing::info!(to = %format!("{target:x}"), "leadership transferred")
                }
                Ok(false) => return Err(ServerError::Stopped.into()),
                Err(_) => return Err(ServerError::LeaderTransferTimeout.into()),
            }
        }
        Ok(Response::new(MoveLeaderResponse {
            header: Some(self.node.header()),
        }))
    }

    async fn downgrade(
        &self,
        _req: Request<DowngradeRequest>,
    ) -> Result<Response<DowngradeResponse>, Status> {
        Err(unimplemented("Downgrade"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_costs_follow_etcd() {
        let put = |k: &str, v: usize, lease: i64| PutRequest {
            key: k.as_bytes().to_vec(),
            value: vec![0; v],
            lease,
            ..Default::default()
        };
        let req = |cmd| RaftRequest {
            request: Some(cmd),
            origin: None,
        };
        assert_eq!(quota_cost(&req(Cmd::Put(put("k", 10, 0)))), 267);
        assert_eq!(quota_cost(&req(Cmd::Put(put("k", 10, 5)))), 331);
        let op = |p| RequestOp {
            request: Some(OpReq::RequestPut(p)),
        };
        let txn = TxnRequest {
            success: vec![op(put("a", 1, 0)), op(put("b", 1, 0))],
            failure: vec![op(put("c", 100, 0))],
            ..Default::default()
        };
        assert_eq!(quota_cost(&req(Cmd::Txn(txn))), 516);
        let reads = TxnRequest {
            success: vec![RequestOp {
                request: Some(OpReq::RequestRange(RangeRequest::default())),
            }],
            ..Default::default()
        };
        assert_eq!(quota_cost(&req(Cmd::Txn(reads))), 0);
        assert_eq!(
            quota_cost(&req(Cmd::DeleteRange(DeleteRangeRequest::default()))),
            0
        );
        assert_eq!(
            quota_cost(&req(Cmd::LeaseGrant(LeaseGrantRequest::default()))),
            64
        );
    }

    #[test]
    fn alarm_text_is_etcds() {
        let a = AlarmMember {
            member_id: 13049071153751544597,
            alarm: AlarmType::Nospace as i32,
        };
        assert_eq!(
            alarm_text(&a),
            "memberID:13049071153751544597 alarm:NOSPACE "
        );
        assert_eq!(alarm_name(AlarmType::Corrupt as i32), "CORRUPT");
    }
}
