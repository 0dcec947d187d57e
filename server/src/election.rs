//! `v3electionpb.Election`: etcd's `concurrency.Election` recipe run in the server (see
//! [`crate::lock`] for the shared machinery).
//!
//! - A candidate of election `N` with lease `L` is the key `N/<L in hex>` holding its value.
//!   The key with the smallest create revision under `N/` is the leader; Campaign returns once
//!   every older candidate is gone, with a [`LeaderKey`] whose `rev` (the key's create
//!   revision) proves leadership: Proclaim and Resign act only while the key still has it.
//! - Campaigning again with the same lease reuses the key (proclaiming the new value if it
//!   differs). As in etcd, Campaign does not check that its key survived the wait: a lease that
//!   expired meanwhile gives a LeaderKey that Proclaim then rejects with `election: not leader`.
//! - A campaigner whose caller goes away resigns.
//! - Observe streams the current leader's key-value, every update of it, then the next leader
//!   once that key is deleted — each at most once and in revision order. Like etcd's, the call
//!   answers only once there is a leader to report.
//! - Errors reach the caller with code `Unknown`, as from etcd.

use std::collections::VecDeque;
use std::sync::Arc;

use futures::StreamExt;
use keel_proto::etcdserverpb::range_request::SortOrder;
use keel_proto::etcdserverpb::{ResponseHeader, TxnRequest};
use keel_proto::keelpb::raft_request::Request as Cmd;
use keel_proto::mvccpb::KeyValue;
use keel_proto::mvccpb::event::EventType;
use keel_proto::v3electionpb::election_server::Election;
use keel_proto::v3electionpb::{
    CampaignRequest, CampaignResponse, LeaderKey, LeaderRequest, LeaderResponse, ProclaimRequest,
    ProclaimResponse, ResignRequest, ResignResponse,
};
use tonic::{Request, Response, Status};

use crate::error::ServerError;
use crate::lease::Lessor;
use crate::lock::{
    Recipes, by_create_revision, create_revision_is, delete_op, lease_key, prefix_end, prefix_of,
    put_op, range_kvs, range_op, single,
};
use crate::node::KeelNode;
use crate::watch::{InternalWatch, WatchHub};

impl Recipes {
    /// etcd's `Election.Campaign`.
    async fn campaign(
        &self,
        name: Vec<u8>,
        lease: i64,
        value: Vec<u8>,
    ) -> Result<CampaignResponse, ServerError> {
        let lease = self.session(lease).await?;
        let prefix = prefix_of(&name);
        let key = lease_key(&prefix, lease);
        let txn = TxnRequest {
            compare: vec![create_revision_is(&key, 0)],
            success: vec![put_op(&key, value.clone(), lease)],
            failure: vec![range_op(single(&key))],
        };
        let (resp, rev) = self.txn(txn).await?;
        let mut leader_rev = rev;
        if !resp.succeeded {
            let existing = range_kvs(&resp, 0)?
                .first()
                .cloned()
                .ok_or_else(|| ServerError::Internal("unexpected apply response".into()))?;
            leader_rev = existing.create_revision;
            if existing.value != value
                && let Err(e) = self.proclaim(&key, leader_rev, lease, value).await
            {
                let _ = self.resign(&key, leader_rev).await;
                return Err(e);
            }
        }
        tracing::debug!(rev = leader_rev, "campaigning");
        let guard = self.cleanup_on_drop(resign_cmd(&key, leader_rev));
        let waited = self.wait_deletes(&prefix, leader_rev - 1).await;
        guard.disarm();
        waited?;
        Ok(CampaignResponse {
            header: Some(self.node.header_at(rev)),
            leader: Some(LeaderKey {
                name,
                key,
                rev: leader_rev,
                lease,
            }),
        })
    }

    /// etcd's `Election.Proclaim`: puts `value` if `key` still has create revision `rev`.
    async fn proclaim(
        &self,
        key: &[u8],
        rev: i64,
        lease: i64,
        value: Vec<u8>,
    ) -> Result<i64, ServerError> {
        let txn = TxnRequest {
            compare: vec![create_revision_is(key, rev)],
            success: vec![put_op(key, value, lease)],
            failure: Vec::new(),
        };
        let (resp, rev) = self.txn(txn).await?;
        if !resp.succeeded {
            return Err(ServerError::ElectionNotLeader);
        }
        Ok(rev)
    }

    /// etcd's `Election.Resign`: deletes `key` if it still has create revision `rev`.
    async fn resign(&self, key: &[u8], rev: i64) -> Result<i64, ServerError> {
        match resign_cmd(key, rev) {
            Cmd::Txn(txn) => self.txn(txn).await.map(|(_, rev)| rev),
            _ => Err(ServerError::Internal("unexpected resign command".into())),
        }
    }

    /// etcd's `Election.Leader`: the key with the smallest create revision under `name/`.
    async fn leader(&self, name: &[u8]) -> Result<(KeyValue, i64), ServerError> {
        let first = by_create_revision(&prefix_of(name), SortOrder::Ascend);
        let (resp, rev) = self.range(&first).await?;
        let kv = resp
            .kvs
            .into_iter()
            .next()
            .ok_or(ServerError::ElectionNoLeader)?;
        Ok((kv, rev))
    }
}

fn resign_cmd(key: &[u8], rev: i64) -> Cmd {
    Cmd::Txn(TxnRequest {
        compare: vec![create_revision_is(key, rev)],
        success: vec![delete_op(key)],
        failure: Vec::new(),
    })
}

/// The state of one Observe call (etcd's `Election.observe` loop).
struct Observer {
    recipes: Recipes,
    prefix: Vec<u8>,
    /// Watching the current leader's key, from just after the revision last reported.
    following: Option<InternalWatch>,
    /// Updates of the leader's key received but not yet streamed.
    pending: VecDeque<LeaderResponse>,
}

impl Observer {
    fn respond(&self, revision: i64, kv: KeyValue) -> LeaderResponse {
        LeaderResponse {
            header: Some(self.recipes.node.header_at(revision)),
            kv: Some(kv),
        }
    }

    /// The next response; `None` ends the stream (etcd ends it without an error when a read or
    /// a watch fails, e.g. after compaction).
    async fn next(&mut self) -> Option<LeaderResponse> {
        loop {
            if let Some(r) = self.pending.pop_front() {
                return Some(r);
            }
            if let Some(watch) = self.following.as_mut() {
                let resp = watch.next().await?;
                if resp.canceled {
                    return None;
                }
                let revision = resp.header.as_ref().map_or(0, |h| h.revision);
                for ev in resp.events {
                    if ev.r#type == EventType::Delete as i32 {
                        // Leadership moves on: find the next leader (later events of this
                        // response are dropped, as etcd does).
                        self.following = None;
                        break;
                    }
                    if let Some(kv) = ev.kv {
                        let r = self.respond(revision, kv);
                        self.pending.push_back(r);
                    }
                }
                continue;
            }
            let (revision, kv) = self.find_leader().await?;
            self.following = Some(self.recipes.hub.watch_internal(&kv.key, b"", revision + 1));
            return Some(self.respond(revision, kv));
        }
    }

    /// The current leader, or (when there is none) the first key put under the prefix after
    /// the read, with the revision to report it at.
    async fn find_leader(&mut self) -> Option<(i64, KeyValue)> {
        let first = by_create_revision(&self.prefix, SortOrder::Ascend);
        let (resp, rev) = self.recipes.range(&first).await.ok()?;
        if let Some(kv) = resp.kvs.into_iter().next() {
            return Some((rev, kv));
        }
        let end = prefix_end(&self.prefix);
        let mut watch = self.recipes.hub.watch_internal(&self.prefix, &end, rev);
        loop {
            let resp = watch.next().await?;
            if resp.canceled {
                return None;
            }
            if let Some(kv) = resp
                .events
                .into_iter()
                .find(|e| e.r#type == EventType::Put as i32)
                .and_then(|e| e.kv)
            {
                return Some((kv.mod_revision, kv));
            }
        }
    }
}

/// `v3electionpb.Election`.
pub struct ElectionService {
    recipes: Recipes,
}

impl ElectionService {
    pub fn new(node: Arc<KeelNode>, hub: Arc<WatchHub>, lessor: Arc<Lessor>) -> Self {
        Self {
            recipes: Recipes::new(node, hub, lessor),
        }
    }

    fn header(&self, revision: i64) -> Option<ResponseHeader> {
        Some(self.recipes.node.header_at(revision))
    }
}

type ObserveStream = crate::node::ResponseStream<LeaderResponse>;

#[tonic::async_trait]
impl Election for ElectionService {
    #[tracing::instrument(level = "debug", skip_all, fields(name = %String::from_utf8_lossy(&req.get_ref().name), lease = req.get_ref().lease))]
    async fn campaign(
        &self,
        req: Request<CampaignRequest>,
    ) -> Result<Response<CampaignResponse>, Status> {
        let r = req.into_inner();
        self.recipes
            .campaign(r.name, r.lease, r.value)
            .await
            .map(Response::new)
            .map_err(ServerError::into_recipe_status)
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn proclaim(
        &self,
        req: Request<ProclaimRequest>,
    ) -> Result<Response<ProclaimResponse>, Status> {
        let r = req.into_inner();
        let result = async {
            let leader = r.leader.ok_or(ServerError::MissingLeaderKey)?;
            let lease = self.recipes.session(leader.lease).await?;
            self.recipes
                .proclaim(&leader.key, leader.rev, lease, r.value)
                .await
        };
        let rev = result.await.map_err(ServerError::into_recipe_status)?;
        Ok(Response::new(ProclaimResponse {
            header: self.header(rev),
        }))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(name = %String::from_utf8_lossy(&req.get_ref().name)))]
    async fn leader(
        &self,
        req: Request<LeaderRequest>,
    ) -> Result<Response<LeaderResponse>, Status> {
        let (kv, rev) = self
            .recipes
            .leader(&req.into_inner().name)
            .await
            .map_err(ServerError::into_recipe_status)?;
        Ok(Response::new(LeaderResponse {
            header: self.header(rev),
            kv: Some(kv),
        }))
    }

    type ObserveStream = ObserveStream;

    #[tracing::instrument(level = "debug", skip_all, fields(name = %String::from_utf8_lossy(&req.get_ref().name)))]
    async fn observe(
        &self,
        req: Request<LeaderRequest>,
    ) -> Result<Response<Self::ObserveStream>, Status> {
        let mut observer = Observer {
            recipes: self.recipes.clone(),
            prefix: prefix_of(&req.into_inner().name),
            following: None,
            pending: VecDeque::new(),
        };
        // As from etcd (grpc-go sends a stream's headers with its first message), the call
        // completes only once there is a leader to report.
        let Some(first) = observer.next().await else {
            return Ok(Response::new(Box::pin(futures::stream::empty())));
        };
        let rest = futures::stream::unfold(observer, |mut o| async move {
            o.next().await.map(|r| (Ok(r), o))
        });
        Ok(Response::new(self.recipes.node.until_stopping(Box::pin(
            futures::stream::once(async { Ok(first) }).chain(rest),
        ))))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn resign(
        &self,
        req: Request<ResignRequest>,
    ) -> Result<Response<ResignResponse>, Status> {
        let r = req.into_inner();
        let result = async {
            let leader = r.leader.ok_or(ServerError::MissingLeaderKey)?;
            self.recipes.session(leader.lease).await?;
            self.recipes.resign(&leader.key, leader.rev).await
        };
        let rev = result.await.map_err(ServerError::into_recipe_status)?;
        Ok(Response::new(ResignResponse {
            header: self.header(rev),
        }))
    }
}
