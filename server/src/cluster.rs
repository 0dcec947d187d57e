//! `etcdserverpb.Cluster`: membership changes mapped onto openraft learners and joint-consensus
//! membership changes, executed on the leader (followers forward them over the peer service).

use std::sync::Arc;

use keel_proto::etcdserverpb::cluster_server::Cluster;
use keel_proto::etcdserverpb::*;
use openraft::async_runtime::WatchReceiver as _;
use tonic::{Request, Response, Status};

use crate::node::KeelNode;

fn unimplemented(what: &str) -> Status {
    Status::unimplemented(format!("keel: {what} is not implemented yet"))
}

pub struct ClusterService {
    node: Arc<KeelNode>,
}

impl ClusterService {
    pub fn new(node: Arc<KeelNode>) -> Self {
        Self { node }
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_add(
        &self,
        _req: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        Err(unimplemented("MemberAdd"))
    }

    async fn member_remove(
        &self,
        _req: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        Err(unimplemented("MemberRemove"))
    }

    async fn member_update(
        &self,
        _req: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        Err(unimplemented("MemberUpdate"))
    }

    async fn member_list(
        &self,
        _req: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        let m = self.node.raft.metrics().borrow_watched().clone();
        let membership = m.membership_config.membership();
        let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(id, node)| Member {
                id: *id,
                name: node.name.clone(),
                peer_ur_ls: node.peer_urls.clone(),
                client_ur_ls: node.client_urls.clone(),
                is_learner: !voters.contains(id),
            })
            .collect();
        Ok(Response::new(MemberListResponse {
            header: Some(self.node.header()),
            members,
        }))
    }

    async fn member_promote(
        &self,
        _req: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        Err(unimplemented("MemberPromote"))
    }
}
