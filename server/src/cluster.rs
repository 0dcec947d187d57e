//! `etcdserverpb.Cluster`: membership changes mapped onto openraft learners and joint-consensus
//! membership changes. Every change executes on the leader; followers forward the request over
//! the peer service (`MemberChange`).
//!
//! How etcd's operations map onto openraft:
//!
//! | etcd                        | Keel                                                         |
//! |-----------------------------|--------------------------------------------------------------|
//! | `MemberAdd` (learner)       | `add_learner`                                                 |
//! | `MemberAdd` (voter)         | `add_learner` with `promote = true`; the leader's promoter    |
//! |                             | makes it a voter (joint consensus) once it has caught up      |
//! | `MemberPromote`             | `AddVoterIds` if the learner is in sync (≥ 90% of the log)    |
//! | `MemberRemove`              | `RemoveVoters`/`RemoveNodes`, not retained as a learner        |
//! | `MemberUpdate`              | `SetNodes` with the new peer URLs                             |
//! | attribute publish           | each member sets its own name and client URLs (`SetNodes`)    |
//!
//! Adding a voter through a learner stage differs from etcd in one visible way, on purpose: in
//! etcd, adding a voter to a one-member cluster makes it unavailable until the new member is
//! up; in Keel the cluster keeps serving and the new member counts towards the quorum only once
//! it has the log. `member list` shows it as a voter (what was asked for) from the start.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use keel_proto::etcdserverpb::cluster_server::Cluster;
use keel_proto::etcdserverpb::*;
use keel_proto::keelpb::{
    MemberChangeRequest, MemberChangeResponse, MemberPublish, member_change_request::Change,
};
use keel_store::raft::{MemberNode, NodeId};
use openraft::ChangeMembers;
use openraft::async_runtime::WatchReceiver as _;
use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use tonic::{Request, Response, Status};

use crate::error::ServerError;
use crate::node::{KeelNode, member_id, status_to_error};

/// A learner may be promoted once its replicated log reaches this fraction of the leader's
/// (etcd's readiness rule).
const PROMOTE_READY_FRACTION: f64 = 0.9;
/// How long a change waits for a concurrent membership change to finish before giving up.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// The membership as etcd's `Member` list, ordered by member ID.
pub fn member_list(node: &KeelNode) -> Vec<Member> {
    let m = node.raft.metrics().borrow_watched().clone();
    let membership = m.membership_config.membership();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    membership
        .nodes()
        .map(|(id, n)| to_member(*id, n, voters.contains(id)))
        .collect()
}

fn to_member(id: NodeId, n: &MemberNode, voter: bool) -> Member {
    Member {
        id,
        name: n.name.clone(),
        peer_ur_ls: n.peer_urls.clone(),
        client_ur_ls: n.client_urls.clone(),
        is_learner: !voter && !n.promote,
    }
}

/// The header of the Cluster service's responses: as etcd's, without a revision (membership
/// is not part of the key space).
fn cluster_header(node: &KeelNode) -> ResponseHeader {
    node.header_at(0)
}

/// Executes `req` on the leader (forwarding it there from a follower).
pub async fn change(
    node: &KeelNode,
    req: MemberChangeRequest,
) -> Result<MemberChangeResponse, ServerError> {
    let deadline = tokio::time::Instant::now() + CHANGE_TIMEOUT;
    loop {
        let attempt = async {
            match node.leader() {
                Some((leader, _)) if leader == node.member_id() => execute(node, req.clone()).await,
                Some((leader, Some(target))) => {
                    let mut client = node
                        .peers
                        .client(leader, &target)
                        .map_err(|_| ServerError::NoLeader)?;
                    match client
                        .member_change(node.peers.request(leader, req.clone()))
                        .await
                    {
                        Ok(r) => {
                            await_own_view_of_the_change(node).await;
                            Ok(r.into_inner())
                        }
                        Err(s) => Err(status_to_error(&s)),
                    }
                }
                _ => Err(ServerError::NoLeader),
            }
        };
        let result = tokio::time::timeout(CHANGE_TIMEOUT, attempt)
            .await
            .unwrap_or(Err(ServerError::Timeout));
        match result {
            // A concurrent change (another request, the promoter, a publish) or a leader change:
            // wait and try again.
            Err(ServerError::NotLeader | ServerError::NoLeader | ServerError::LeaderChanged)
                if tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(ServerError::Internal(msg))
                if is_in_progress(&msg) && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            other => return other,
        }
    }
}

/// After a change the leader made for this member: waits (at most 2 s) until this member's
/// own membership shows it, so that a member list on this member right after the answer agrees
/// with it (etcd answers a member change once the member that received it has applied it).
/// The leader's commit index covers the change, which it committed before answering.
async fn await_own_view_of_the_change(node: &KeelNode) {
    match tokio::time::timeout(Duration::from_secs(2), node.read_index()).await {
        Ok(Ok(index)) => {
            await_metrics(node, |m| {
                m.last_applied.as_ref().map(|l| l.index).unwrap_or(0) >= index
            })
            .await
        }
        Ok(Err(e)) => tracing::debug!("no read index after a forwarded member change: {e}"),
        Err(_) => tracing::debug!("no read index after a forwarded member change in 2 s"),
    }
}

/// How a change refused because another one is not committed yet is reported (also from a
/// leader to the follower that forwarded the change); such a change is retried until the
/// deadline.
const IN_PROGRESS: &str = "membership change in progress";

fn is_in_progress(msg: &str) -> bool {
    // The second form is openraft's own message, as a leader of an older version reports it.
    msg.contains(IN_PROGRESS) || msg.contains("undergoing a configuration change")
}

fn raft_err(
    e: RaftError<keel_store::raft::TypeConfig, ClientWriteError<keel_store::raft::TypeConfig>>,
) -> ServerError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => ServerError::NotLeader,
        RaftError::APIError(ClientWriteError::LogEntryDiscarded(_)) => ServerError::LeaderChanged,
        RaftError::APIError(ClientWriteError::ChangeMembershipError(
            ChangeMembershipError::InProgress(p),
        )) => ServerError::Internal(format!("{IN_PROGRESS}: {p}")),
        RaftError::APIError(e) => ServerError::Internal(e.to_string()),
        RaftError::Fatal(_) => ServerError::Stopped,
    }
}

fn validate_urls(urls: &[String]) -> Result<(), ServerError> {
    if urls.is_empty()
        || urls
            .iter()
            .any(|u| crate::config::parse_url(u).is_err() || !u.contains("://"))
    {
        return Err(ServerError::MemberBadUrls);
    }
    Ok(())
}

/// Runs a change on this member, which must be the leader.
pub async fn execute(
    node: &KeelNode,
    req: MemberChangeRequest,
) -> Result<MemberChangeResponse, ServerError> {
    let _one_at_a_time = one_change_at_a_time(node).await;
    let metrics = node.raft.metrics().borrow_watched().clone();
    if metrics.current_leader != Some(node.member_id()) {
        return Err(ServerError::NotLeader);
    }
    let membership = metrics.membership_config.membership().clone();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    let nodes: BTreeMap<NodeId, MemberNode> =
        membership.nodes().map(|(id, n)| (*id, n.clone())).collect();
    let url_taken = |urls: &[String], except: Option<NodeId>| {
        nodes
            .iter()
            .any(|(id, n)| Some(*id) != except && n.peer_urls.iter().any(|u| urls.contains(u)))
    };
    let mut added: Option<Member> = None;
    // The log id of the membership this request wrote, if any.
    let written = match req.change {
        Some(Change::Add(add)) => {
            validate_urls(&add.peer_ur_ls)?;
            if url_taken(&add.peer_ur_ls, None) {
                return Err(ServerError::PeerUrlExists);
            }
            // A restored or forced leader whose data is not yet in a snapshot would replay its
            // log to the new member without that data: wait for the snapshot (seconds; the
            // caller retries an in-progress change until its deadline).
            if crate::node::data_predates_log(node) {
                return Err(ServerError::Internal(format!(
                    "{IN_PROGRESS}: the data predates the Raft log and is being snapshotted"
                )));
            }
            let id = member_id(&add.peer_ur_ls, &node.config.initial_cluster_token);
            if nodes.contains_key(&id) {
                return Err(ServerError::MemberExists);
            }
            if add.is_learner
                && nodes
                    .iter()
                    .any(|(id, n)| !voters.contains(id) && !n.promote)
            {
                return Err(ServerError::TooManyLearners);
            }
            let new = MemberNode {
                name: String::new(),
                peer_urls: add.peer_ur_ls.clone(),
                client_urls: Vec::new(),
                promote: !add.is_learner,
            };
            tracing::info!(member = %format!("{id:x}"), urls = ?add.peer_ur_ls, learner = add.is_learner, "adding member");
            let response = node
                .raft
                .add_learner(id, new.clone(), false)
                .await
                .map_err(raft_err)?;
            added = Some(to_member(id, &new, false));
            Some(response.log_id)
        }
        Some(Change::Remove(rm)) => {
            if !nodes.contains_key(&rm.id) {
                return Err(ServerError::MemberNotFound);
            }
            tracing::info!(member = %format!("{:x}", rm.id), "removing member");
            let ids: BTreeSet<NodeId> = [rm.id].into();
            let changes = if voters.contains(&rm.id) {
                if voters.len() == 1 {
                    return Err(ServerError::NotEnoughStartedMembers);
                }
                ChangeMembers::RemoveVoters(ids)
            } else {
                ChangeMembers::RemoveNodes(ids)
            };
            Some(change_membership(node, changes, false).await?)
        }
        Some(Change::Update(up)) => {
            let Some(current) = nodes.get(&up.id) else {
                return Err(ServerError::MemberNotFound);
            };
            validate_urls(&up.peer_ur_ls)?;
            if url_taken(&up.peer_ur_ls, Some(up.id)) {
                return Err(ServerError::PeerUrlExists);
            }
            let mut updated = current.clone();
            updated.peer_urls = up.peer_ur_ls.clone();
            tracing::info!(member = %format!("{:x}", up.id), urls = ?up.peer_ur_ls, "updating member peer URLs");
            let changes = ChangeMembers::SetNodes([(up.id, updated)].into());
            Some(change_membership(node, changes, true).await?)
        }
        Some(Change::Promote(p)) => {
            if !nodes.contains_key(&p.id) {
                return Err(ServerError::MemberNotFound);
            }
            if voters.contains(&p.id) {
                return Err(ServerError::MemberNotLearner);
            }
            if !learner_in_sync(&metrics, p.id) {
                return Err(ServerError::LearnerNotReady);
            }
            tracing::info!(member = %format!("{:x}", p.id), "promoting learner");
            let changes = ChangeMembers::AddVoterIds([p.id].into());
            let changed = change_membership(node, changes, true).await?;
            crate::metrics::learner_promoted();
            Some(changed)
        }
        Some(Change::Publish(publish)) => {
            let Some(current) = nodes.get(&publish.id) else {
                return Err(ServerError::MemberNotFound);
            };
            if current.name != publish.name || current.client_urls != publish.client_urls {
                tracing::info!(member = %format!("{:x}", publish.id), name = %publish.name, client_urls = ?publish.client_urls, "recording published member attributes");
                let mut updated = current.clone();
                updated.name = publish.name.clone();
                updated.client_urls = publish.client_urls.clone();
                let changes = ChangeMembers::SetNodes([(publish.id, updated)].into());
                Some(change_membership(node, changes, true).await?)
            } else {
                None
            }
        }
        None => return Err(ServerError::Internal("empty membership change".into())),
    };
    if let Some(log_id) = written {
        await_membership_visible(node, log_id).await;
    }
    Ok(MemberChangeResponse {
        members: member_list(node),
        member: added,
    })
}

/// Proposes a membership change; the log id of the membership it wrote. The caller holds
/// [`one_change_at_a_time`].
async fn change_membership(
    node: &KeelNode,
    changes: ChangeMembers<NodeId, MemberNode>,
    retain: bool,
) -> Result<keel_store::raft::types::LogId, ServerError> {
    let response = node
        .raft
        .change_membership(changes, retain)
        .await
        .map_err(raft_err)?;
    Ok(response.log_id)
}

/// Serialises the membership changes made through this member (as leader).
///
/// openraft refuses a change while an earlier membership is not yet committed (another change,
/// or a new leader's first entries), logging an error. Each change made here holds this guard
/// from its validation to its commit, and first waits (at most 2 s) for the current membership
/// to commit, so the members publishing their attributes at start-up, a promotion and
/// concurrent `member add` calls queue instead of failing, and each is validated against the
/// membership the one before it left.
async fn one_change_at_a_time(node: &KeelNode) -> tokio::sync::MutexGuard<'_, ()> {
    let guard = node.membership_changes.lock().await;
    await_membership_committed(node).await;
    guard
}

/// Waits (at most 2 s) until the membership in this member's Raft metrics has been applied.
async fn await_membership_committed(node: &KeelNode) {
    await_metrics(node, |m| {
        m.membership_config.log_id().as_ref().map(|l| l.index)
            <= m.last_applied.as_ref().map(|l| l.index)
    })
    .await
}

/// Waits (at most 2 s) until this member's Raft metrics show the membership written at
/// `log_id`. openraft publishes its metrics after the change is committed, and the next
/// request (and this reply's member list) reads the membership from them: without the wait, a
/// promote right after adding a learner could find no such member.
async fn await_membership_visible(node: &KeelNode, log_id: keel_store::raft::types::LogId) {
    await_metrics(node, |m| *m.membership_config.log_id() >= Some(log_id)).await
}

/// Waits until `ready` holds for this member's Raft metrics, at most 2 s (then returns anyway:
/// the caller proceeds and openraft decides).
async fn await_metrics(
    node: &KeelNode,
    ready: impl Fn(&openraft::RaftMetrics<keel_store::raft::TypeConfig>) -> bool,
) {
    let mut metrics = node.raft.metrics();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while !ready(&metrics.borrow_watched()) {
        match tokio::time::timeout_at(deadline, metrics.changed()).await {
            Ok(Ok(())) => {}
            _ => return,
        }
    }
}

/// Whether the leader has replicated at least 90% of its log to `id`.
fn learner_in_sync(
    metrics: &openraft::RaftMetrics<keel_store::raft::TypeConfig>,
    id: NodeId,
) -> bool {
    let last = metrics.last_log_index.unwrap_or(0);
    let matched = metrics
        .replication
        .as_ref()
        .and_then(|r| r.get(&id).cloned().flatten())
        .map(|l| l.index)
        .unwrap_or(0);
    matched as f64 >= last as f64 * PROMOTE_READY_FRACTION
}

/// Background duties of every member: publish its own name and client URLs into the membership
/// (etcd's attribute publish), and — on the leader — promote learners that were added as
/// voters once they have caught up. Returns a receiver that turns `true` if this member is
/// removed from the cluster (it should then stop, as etcd does).
pub fn spawn_background(node: Arc<KeelNode>) -> tokio::sync::watch::Receiver<bool> {
    let (removed_tx, removed_rx) = tokio::sync::watch::channel(false);
    let publisher = node.clone();
    tokio::spawn(async move { publish_loop(publisher).await });
    let promoter = node.clone();
    tokio::spawn(async move { promote_loop(promoter).await });
    tokio::spawn(async move { watch_removal(node, removed_tx).await });
    removed_rx
}

async fn publish_loop(node: Arc<KeelNode>) {
    let want_name = node.identity.name.clone();
    let want_urls = node.config.advertise_client_urls();
    loop {
        let current = {
            let m = node.raft.metrics().borrow_watched().clone();
            m.membership_config
                .membership()
                .get_node(&node.member_id())
                .cloned()
        };
        tracing::trace!(?current, leader = ?node.leader().map(|l| l.0), "publish check");
        if let Some(current) = current
            && (current.name != want_name || current.client_urls != want_urls)
            && node.leader().is_some()
        {
            let req = MemberChangeRequest {
                change: Some(Change::Publish(MemberPublish {
                    id: node.member_id(),
                    name: want_name.clone(),
                    client_urls: want_urls.clone(),
                })),
            };
            match change(&node, req).await {
                Ok(_) => {
                    tracing::info!(name = %want_name, client_urls = ?want_urls, "published member attributes")
                }
                Err(e) => {
                    tracing::debug!(error = %e, "publishing member attributes failed; will retry")
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn promote_loop(node: Arc<KeelNode>) {
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let metrics = node.raft.metrics().borrow_watched().clone();
        if metrics.current_leader != Some(node.member_id()) {
            continue;
        }
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let ready: Vec<NodeId> = membership
            .nodes()
            .filter(|(id, n)| n.promote && !voters.contains(id))
            .map(|(id, _)| *id)
            .filter(|id| learner_in_sync(&metrics, *id))
            .collect();
        for id in ready {
            tracing::info!(member = %format!("{id:x}"), "member caught up; promoting it to voter");
            let _one_at_a_time = one_change_at_a_time(&node).await;
            // Not a learner promotion for etcd's counter: the member was added as a voter.
            if let Err(e) =
                change_membership(&node, ChangeMembers::AddVoterIds([id].into()), true).await
            {
                tracing::debug!(error = %e, "promotion deferred");
            }
        }
    }
}

/// On the leader: whether `member`, which knows memberships up to `known_index`, has been
/// removed by a newer committed membership. Only the leader answers, and only about a
/// membership newer than the caller's, so a lagging or stale member can never talk a current
/// member into stopping.
pub fn was_removed(node: &KeelNode, member: NodeId, known_index: u64) -> bool {
    let m = node.raft.metrics().borrow_watched().clone();
    if m.current_leader != Some(node.member_id()) {
        return false;
    }
    let config = &m.membership_config;
    let index = config.log_id().as_ref().map(|l| l.index).unwrap_or(0);
    let committed = m.last_applied.as_ref().map(|l| l.index).unwrap_or(0) >= index;
    index > known_index
        && committed
        && config.membership().get_joint_config().len() == 1
        && config.membership().get_node(&member).is_none()
}

/// Stops this member once it has been removed. A removed member usually never sees the
/// membership that removes it (the leader stops replicating to it), so besides watching its own
/// membership it asks the other members every few seconds while it is not the leader.
async fn watch_removal(node: Arc<KeelNode>, removed: tokio::sync::watch::Sender<bool>) {
    use keel_proto::keelpb::MemberIdentity;
    let mut was_member = false;
    loop {
        let m = node.raft.metrics().borrow_watched().clone();
        let membership = m.membership_config.membership();
        let present = membership.get_node(&node.member_id()).is_some();
        let mut gone = !present && was_member;
        was_member |= present;
        if present && m.current_leader != Some(node.member_id()) {
            let known = m
                .membership_config
                .log_id()
                .as_ref()
                .map(|l| l.index)
                .unwrap_or(0);
            let others: Vec<(NodeId, MemberNode)> = membership
                .nodes()
                .filter(|(id, _)| **id != node.member_id())
                .map(|(id, n)| (*id, n.clone()))
                .collect();
            for (id, peer) in others {
                let Ok(mut client) = node.peers.client(id, &peer) else {
                    continue;
                };
                let mut req = tonic::Request::new(MemberIdentity {
                    member_id: node.member_id(),
                    membership_index: known,
                    ..Default::default()
                });
                req.set_timeout(Duration::from_secs(1));
                if let Ok(reply) = client.identify(req).await
                    && reply.get_ref().removed
                {
                    gone = true;
                    break;
                }
            }
        }
        if gone {
            tracing::warn!(
                member = %format!("{:x}", node.member_id()),
                "this member has been permanently removed from the cluster; stopping"
            );
            let _ = removed.send(true);
            return;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

pub struct ClusterService {
    node: Arc<KeelNode>,
}

impl ClusterService {
    pub fn new(node: Arc<KeelNode>) -> Self {
        Self { node }
    }

    async fn run(&self, change_req: Change) -> Result<MemberChangeResponse, Status> {
        Ok(change(
            &self.node,
            MemberChangeRequest {
                change: Some(change_req),
            },
        )
        .await?)
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    #[tracing::instrument(skip_all, name = "MemberAdd")]
    async fn member_add(
        &self,
        req: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        let resp = self.run(Change::Add(req.into_inner())).await?;
        Ok(Response::new(MemberAddResponse {
            header: Some(cluster_header(&self.node)),
            member: resp.member,
            members: resp.members,
        }))
    }

    #[tracing::instrument(skip_all, name = "MemberRemove")]
    async fn member_remove(
        &self,
        req: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        let resp = self.run(Change::Remove(req.into_inner())).await?;
        Ok(Response::new(MemberRemoveResponse {
            header: Some(cluster_header(&self.node)),
            members: resp.members,
        }))
    }

    #[tracing::instrument(skip_all, name = "MemberUpdate")]
    async fn member_update(
        &self,
        req: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        let resp = self.run(Change::Update(req.into_inner())).await?;
        Ok(Response::new(MemberUpdateResponse {
            header: Some(cluster_header(&self.node)),
            members: resp.members,
        }))
    }

    #[tracing::instrument(skip_all, name = "MemberList")]
    async fn member_list(
        &self,
        req: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        if req.get_ref().linearizable {
            self.node.read_barrier().await?;
        }
        Ok(Response::new(MemberListResponse {
            header: Some(cluster_header(&self.node)),
            members: member_list(&self.node),
        }))
    }

    #[tracing::instrument(skip_all, name = "MemberPromote")]
    async fn member_promote(
        &self,
        req: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        let resp = self.run(Change::Promote(req.into_inner())).await?;
        Ok(Response::new(MemberPromoteResponse {
            header: Some(cluster_header(&self.node)),
            members: resp.members,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A change refused because another is not committed yet is retried by [`change`]: the
    /// error openraft gives it must be recognised, also as a forwarding leader reports it.
    #[test]
    fn a_change_behind_an_uncommitted_one_is_retried() {
        let id = |i| openraft::LogId::new_term_index(1, i);
        let refused = RaftError::APIError(ClientWriteError::ChangeMembershipError(
            ChangeMembershipError::InProgress(openraft::error::InProgress {
                committed: Some(id(704)),
                membership_log_id: Some(id(1162)),
            }),
        ));
        let ServerError::Internal(msg) = raft_err(refused) else {
            panic!("an in-progress refusal is an internal error until the retries give up");
        };
        assert!(is_in_progress(&msg), "{msg}");
        // openraft's own wording, from a leader that reports it unchanged.
        assert!(is_in_progress(
            "the cluster is already undergoing a configuration change at log Some(..)"
        ));
        assert!(!is_in_progress("etcdserver: member not found"));
    }
}
