//! `etcdserverpb.Maintenance`: status, hashes, alarms, defragmentation, snapshots and leader
//! transfer.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use keel_proto::etcdserverpb::maintenance_server::Maintenance;
use keel_proto::etcdserverpb::*;
use openraft::async_runtime::WatchReceiver as _;
use tonic::{Request, Response, Status};

use crate::node::KeelNode;

/// The etcd version Keel reports to clients (they gate features on it).
pub const ETCD_COMPAT_VERSION: &str = "3.5.16";

fn unimplemented(what: &str) -> Status {
    Status::unimplemented(format!("keel: {what} is not implemented yet"))
}

pub struct MaintenanceService {
    node: Arc<KeelNode>,
}

impl MaintenanceService {
    pub fn new(node: Arc<KeelNode>) -> Self {
        Self { node }
    }
}

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    async fn alarm(&self, _req: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        Err(unimplemented("Alarm"))
    }

    async fn status(
        &self,
        _req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let m = self.node.raft.metrics().borrow_watched().clone();
        let db_size = self.node.mvcc.engine().size_bytes() as i64;
        let applied = self.node.applied.borrow().index;
        let is_learner = !m
            .membership_config
            .membership()
            .voter_ids()
            .any(|id| id == self.node.member_id());
        let mut errors = Vec::new();
        if m.current_leader.is_none() {
            errors.push("etcdserver: no leader".to_string());
        }
        Ok(Response::new(StatusResponse {
            header: Some(self.node.header()),
            version: ETCD_COMPAT_VERSION.to_string(),
            db_size,
            leader: m.current_leader.unwrap_or(0),
            raft_index: m
                .cluster_committed
                .map(|l| l.index)
                .or(m.last_log_index)
                .unwrap_or(0),
            raft_term: m.current_term,
            raft_applied_index: applied,
            errors,
            db_size_in_use: db_size,
            is_learner,
            ..Default::default()
        }))
    }

    async fn defragment(
        &self,
        _req: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        Err(unimplemented("Defragment"))
    }

    async fn hash(&self, _req: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        Err(unimplemented("Hash"))
    }

    async fn hash_kv(
        &self,
        _req: Request<HashKvRequest>,
    ) -> Result<Response<HashKvResponse>, Status> {
        Err(unimplemented("HashKV"))
    }

    type SnapshotStream = Pin<Box<dyn Stream<Item = Result<SnapshotResponse, Status>> + Send>>;

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
        _req: Request<MoveLeaderRequest>,
    ) -> Result<Response<MoveLeaderResponse>, Status> {
        Err(unimplemented("MoveLeader"))
    }

    async fn downgrade(
        &self,
        _req: Request<DowngradeRequest>,
    ) -> Result<Response<DowngradeResponse>, Status> {
        Err(unimplemented("Downgrade"))
    }
}
