//! `etcdserverpb.Lease`: grants and revocations go through Raft; deadlines live only on the
//! leader.
//!
//! - The [`Lessor`] runs on every member but acts only while this member is the Raft leader:
//!   it keeps an in-memory deadline per lease, renews it on keep-alive, and proposes a
//!   `LeaseRevoke` when it passes. Followers never expire leases, and applying the log never
//!   reads a clock.
//! - On becoming leader it gives every lease its full TTL again plus an election timeout
//!   (etcd's "renew on promotion"), so a leader change can only extend a lease, never expire it
//!   early.
//! - A keep-alive is acknowledged only after the leader confirmed with a quorum that it still
//!   leads, so a deposed or paused leader cannot promise a lifetime the real leader does not
//!   know of (a TTL > 0 in a keep-alive answer means the lease is really alive).
//! - A keep-alive of a lease whose deadline has passed does not renew it: it waits for the
//!   revocation and answers TTL 0 (etcd's lessor does the same), so a revocation already on
//!   its way cannot delete the keys of a lease a client was just told is alive.
//! - Keep-alives and TTL queries that reach a follower are forwarded to the leader.
//! - Expired leases are revoked in bounded batches of concurrent proposals, so thousands of
//!   expiries at once do not monopolise the proposal path. A revocation is this member's own
//!   Raft write, never forwarded: a deposed leader (e.g. one resumed after a pause) must not
//!   push its expiry decisions onto the leader that replaced it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use keel_proto::etcdserverpb::lease_server::Lease;
use keel_proto::etcdserverpb::*;
use keel_proto::keelpb::raft_request::Request as Cmd;
use keel_proto::keelpb::raft_response::Response as Res;
use keel_proto::keelpb::{LeaseQuery, RaftRequest};
use tokio::time::Instant;
use tonic::{Request, Response, Status, Streaming};

use crate::error::ServerError;
use crate::node::KeelNode;
use openraft::async_runtime::WatchReceiver as _;

/// Revocations proposed at once by the expiry loop.
const REVOKE_BATCH: usize = 256;
const TICK: Duration = Duration::from_millis(250);
/// How long a keep-alive or TTL query waits for a leader that can answer it.
const ON_LEADER_PATIENCE: Duration = Duration::from_secs(5);
const LEADER_RETRY: Duration = Duration::from_millis(100);
/// How long one keep-alive forwarded to the leader may take before it is sent again.
const RENEW_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Keep-alives of one stream renewed together at most.
const KEEPALIVE_BATCH: usize = 256;
/// How long a keep-alive of an expired lease waits for its revocation before failing.
const EXPIRED_RENEWAL_PATIENCE: Duration = Duration::from_millis(1500);

/// What renewing a lease on the leader found.
enum Renewal {
    /// Renewed for this many seconds.
    Renewed(i64),
    /// No such lease (never granted, or revoked).
    NotFound,
    /// Its deadline has passed: it is being revoked.
    Expired,
}

/// Leader-side lease deadlines.
pub struct Lessor {
    node: Arc<KeelNode>,
    /// `Some((term, deadlines))` while this member is leader in `term`.
    deadlines: Mutex<Option<(u64, BTreeMap<i64, Instant>)>>,
}

impl Lessor {
    pub fn start(node: Arc<KeelNode>) -> Arc<Lessor> {
        let lessor = Arc::new(Lessor {
            node,
            deadlines: Mutex::new(None),
        });
        let weak = Arc::downgrade(&lessor);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(TICK);
            // A member resumed after a pause runs one tick, not one per missed period.
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(l) = weak.upgrade() else { return };
                l.tick().await;
            }
        });
        lessor
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(u64, BTreeMap<i64, Instant>)>> {
        self.deadlines.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The term this member leads in, if it is the leader (one read of the Raft metrics, no
    /// copy: this runs for every keep-alive).
    fn leader_term(&self) -> Option<u64> {
        let rx = self.node.raft.metrics();
        let m = rx.borrow_watched();
        (m.state.is_leader() && m.current_leader == Some(self.node.member_id()))
            .then_some(m.current_term)
    }

    /// The smallest TTL a lease gets (etcd: 1.5 election timeouts, in whole seconds).
    pub fn min_ttl(&self) -> i64 {
        let ms = self
            .node
            .config
            .election_timeout
            .max(self.node.config.heartbeat_interval * 3)
            * 3
            / 2;
        ms.div_ceil(1000).max(1) as i64
    }

    async fn tick(&self) {
        let now = Instant::now();
        let expired: Vec<i64> = {
            let mut guard = self.lock();
            let Ok(deadlines) = self.leader_deadlines(&mut guard) else {
                *guard = None;
                return;
            };
            let leases = self.node.mvcc.leases();
            // Track leases granted since the last tick (full TTL) and forget revoked ones.
            let mut fresh = BTreeMap::new();
            for l in leases {
                let d = deadlines
                    .get(&l.id)
                    .copied()
                    .unwrap_or_else(|| now + Duration::from_secs(l.ttl.max(0) as u64));
                fresh.insert(l.id, d);
            }
            *deadlines = fresh;
            deadlines
                .iter()
                .filter(|(_, d)| **d <= now)
                .map(|(id, _)| *id)
                .take(REVOKE_BATCH)
                .collect()
        };
        if expired.is_empty() {
            return;
        }
        tracing::debug!(count = expired.len(), "revoking expired leases");
        let proposals = expired.into_iter().map(|id| {
            let node = self.node.clone();
            async move {
                (
                    id,
                    node.propose_as_leader(RaftRequest {
                        request: Some(Cmd::LeaseRevoke(LeaseRevokeRequest { id })),
                        origin: None,
                    })
                    .await,
                )
            }
        });
        for (id, result) in futures::future::join_all(proposals).await {
            match result {
                Ok(_) | Err(ServerError::LeaseNotFound) => {
                    if result.is_ok() {
                        crate::metrics::lease_expired();
                    }
                    if let Some((_, d)) = self.lock().as_mut() {
                        d.remove(&id);
                    }
                }
                Err(ServerError::NotLeader) => {
                    // Deposed: the next leader decides this lease's expiry from its own
                    // deadlines.
                    tracing::info!(lease = id, "not leader any more; expiry left to the leader");
                }
                Err(e) => {
                    tracing::warn!(lease = id, error = %e, "lease revocation failed; will retry")
                }
            }
        }
    }

    /// Deadlines of a member that just became leader: every lease gets its full TTL again, so a
    /// leader change can only extend a lease (etcd's renew-on-promotion).
    /// The extra election timeout covers renewals the previous leader acknowledged in its last
    /// moments (etcd's `Promote(extend)`).
    fn promoted(node: &KeelNode, now: Instant) -> BTreeMap<i64, Instant> {
        let extend = Duration::from_millis(node.config.election_timeout);
        node.mvcc
            .leases()
            .into_iter()
            .map(|l| {
                (
                    l.id,
                    now + Duration::from_secs(l.ttl.max(0) as u64) + extend,
                )
            })
            .collect()
    }

    /// The leader's deadlines, created afresh when this member was promoted since they were
    /// last used (a keep-alive must not fail between promotion and the next tick, and a member
    /// that lost and regained leadership must not reuse deadlines from its earlier term).
    fn leader_deadlines<'a>(
        &self,
        guard: &'a mut Option<(u64, BTreeMap<i64, Instant>)>,
    ) -> Result<&'a mut BTreeMap<i64, Instant>, ServerError> {
        let term = self.leader_term().ok_or(ServerError::NotLeader)?;
        if guard.as_ref().is_none_or(|(t, _)| *t != term) {
            *guard = Some((term, Self::promoted(&self.node, Instant::now())));
        }
        match guard {
            Some((_, d)) => Ok(d),
            None => Err(ServerError::NotLeader),
        }
    }

    /// Renews a lease on the leader after confirming with a quorum that this member still
    /// leads (one ReadIndex round, shared by concurrent calls). Without the confirmation a
    /// leader cut off from the others, or paused and resumed, would keep acknowledging
    /// keep-alives that the real leader never hears of, and the lease could expire while the
    /// client was told it is alive (found by keel-jepsen's lease workload; etcd's
    /// `ensureLeadership`). `Ok(0)` when the lease does not exist.
    ///
    /// A lease whose deadline has passed is not renewed: its revocation is proposed, or about
    /// to be, and would delete the keys of a lease the client was just told is alive (found by
    /// keel-jepsen's lease workload under a partition: revocations proposed when the leader
    /// could commit again raced with keep-alives arriving at the same moment). The renewal
    /// waits for the revocation and answers `Ok(0)`, as etcd's lessor does for an expired
    /// lease; if this member stops leading meanwhile, the caller retries on the next leader,
    /// which gives every lease its full TTL again.
    pub async fn renew_confirmed(&self, id: i64) -> Result<i64, ServerError> {
        let read_index = self.node.read_index_local().await?;
        // A revocation committed before the confirmation must be seen by the check below (on
        // the leader the index is almost always applied already: one borrow, no wait).
        if self.node.applied.borrow().index < read_index {
            self.node.wait_applied(read_index).await?;
        }
        match self.renew_local(id)? {
            Renewal::Renewed(ttl) => return Ok(ttl),
            Renewal::NotFound => return Ok(0),
            Renewal::Expired => {}
        }
        let give_up = Instant::now() + EXPIRED_RENEWAL_PATIENCE;
        let mut applied = self.node.applied.clone();
        loop {
            if Instant::now() >= give_up {
                return Err(ServerError::Timeout);
            }
            // Woken by every applied chunk (the revocation's among them), and at least every
            // tick to notice a lost leadership.
            let _ = tokio::time::timeout(TICK, applied.changed()).await;
            match self.renew_local(id)? {
                Renewal::Renewed(ttl) => return Ok(ttl),
                Renewal::NotFound => return Ok(0),
                Renewal::Expired => {}
            }
        }
    }

    /// Renews a lease on the leader without confirming leadership. Use
    /// [`Self::renew_confirmed`] for client keep-alives.
    fn renew_local(&self, id: i64) -> Result<Renewal, ServerError> {
        let mut guard = self.lock();
        let deadlines = self.leader_deadlines(&mut guard)?;
        let Some(info) = self.node.mvcc.lease(id) else {
            return Ok(Renewal::NotFound);
        };
        let now = Instant::now();
        if deadlines.get(&id).is_some_and(|d| *d <= now) {
            return Ok(Renewal::Expired);
        }
        deadlines.insert(id, now + Duration::from_secs(info.ttl.max(0) as u64));
        crate::metrics::lease_renewed();
        Ok(Renewal::Renewed(info.ttl))
    }

    /// Remaining seconds on the leader; `Ok(-1)` when the lease does not exist.
    pub fn remaining_local(&self, id: i64) -> Result<i64, ServerError> {
        let mut guard = self.lock();
        let deadlines = self.leader_deadlines(&mut guard)?;
        let Some(info) = self.node.mvcc.lease(id) else {
            return Ok(-1);
        };
        let remaining = match deadlines.get(&id) {
            Some(d) => d
                .saturating_duration_since(Instant::now())
                .as_secs_f64()
                .ceil() as i64,
            None => info.ttl,
        };
        // A lease carried over a leader change runs up to an election timeout longer than its
        // TTL; report at most the TTL (never more than a client was granted).
        Ok(remaining.clamp(0, info.ttl.max(0)))
    }

    /// Renews (`renew`) or reads the remaining TTL of lease `id` on the leader: here if this
    /// member leads, otherwise through the leader's peer service. Retries while leadership is
    /// moving (up to [`ON_LEADER_PATIENCE`]), so a keep-alive sent during an election is answered
    /// by the new leader rather than failed.
    async fn on_leader(&self, id: i64, renew: bool) -> Result<i64, ServerError> {
        let deadline = Instant::now() + ON_LEADER_PATIENCE;
        loop {
            let result = match self.node.leader() {
                Some((leader, _)) if leader == self.node.member_id() => {
                    if renew {
                        self.renew_confirmed(id).await
                    } else {
                        self.remaining_local(id)
                    }
                }
                Some((leader, Some(node))) => self.ask_leader(leader, &node, id, renew).await,
                _ => Err(ServerError::NoLeader),
            };
            match result {
                Err(ServerError::NotLeader | ServerError::NoLeader)
                    if Instant::now() < deadline =>
                {
                    tokio::time::sleep(LEADER_RETRY).await
                }
                Err(ServerError::NotLeader) => return Err(ServerError::NoLeader),
                other => return other,
            }
        }
    }

    async fn ask_leader(
        &self,
        leader: u64,
        node: &keel_store::raft::MemberNode,
        id: i64,
        renew: bool,
    ) -> Result<i64, ServerError> {
        if renew {
            // On the forwarding stream; unary only if the leader does not take it there. A
            // leader that does not answer in time (paused, or cut off without the connection
            // breaking) is treated as gone: the caller retries on whoever leads next, instead
            // of waiting for HTTP/2 keepalive to notice (15 s, longer than many leases' TTL).
            let attempt = self.node.renew_on_stream(leader, node, id);
            match tokio::time::timeout(RENEW_ATTEMPT_TIMEOUT, attempt).await {
                Ok(Ok(Some(ttl))) => return Ok(ttl),
                Ok(Ok(None)) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(ServerError::NoLeader),
            }
        }
        let mut client = self
            .node
            .peers
            .client(leader, node)
            .map_err(|_| ServerError::NoLeader)?;
        let req = self.node.peers.request(leader, LeaseQuery { id });
        let reply = if renew {
            client.lease_renew(req).await
        } else {
            client.lease_remaining(req).await
        };
        reply
            .map(|r| r.into_inner().ttl)
            .map_err(|s| crate::node::status_to_error(&s))
    }

    pub async fn renew(&self, id: i64) -> Result<i64, ServerError> {
        self.on_leader(id, true).await
    }

    pub async fn remaining(&self, id: i64) -> Result<i64, ServerError> {
        self.on_leader(id, false).await
    }
}

pub struct LeaseService {
    node: Arc<KeelNode>,
    lessor: Arc<Lessor>,
}

impl LeaseService {
    pub fn new(node: Arc<KeelNode>, lessor: Arc<Lessor>) -> Self {
        Self { node, lessor }
    }

    /// With auth enabled: credentials are required, and unless the caller is an admin, read
    /// access to every key attached to lease `id` (etcd's `checkLeaseTimeToLive`).
    async fn check_lease_keys(
        &self,
        caller: &crate::auth::Caller,
        id: i64,
    ) -> Result<Option<keel_store::auth::AuthInfo>, ServerError> {
        let state = self.node.mvcc.auth();
        if !state.enabled() {
            return Ok(None);
        }
        let info = caller
            .info(&self.node)
            .await?
            .ok_or(ServerError::UserEmpty)?;
        if state.check_admin(&info).is_ok() {
            return Ok(Some(info));
        }
        for key in self.node.mvcc.lease(id).map(|l| l.keys).unwrap_or_default() {
            state
                .check(&info, &key, &[], keel_store::auth::Access::Read)
                .map_err(ServerError::from)?;
        }
        Ok(Some(info))
    }
}

type KeepAliveStream = crate::node::ResponseStream<LeaseKeepAliveResponse>;

#[tonic::async_trait]
impl Lease for LeaseService {
    #[tracing::instrument(level = "debug", skip_all)]
    async fn lease_grant(
        &self,
        req: Request<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        let mut r = req.into_inner();
        r.ttl = r.ttl.max(self.lessor.min_ttl());
        let chosen = r.id == 0;
        for _ in 0..5 {
            if chosen {
                r.id = (rand::random::<u64>() >> 1).max(1) as i64;
            }
            match self
                .node
                .propose(RaftRequest {
                    request: Some(Cmd::LeaseGrant(r)),
                    origin: None,
                })
                .await
            {
                Ok(resp) => match resp.response {
                    Some(Res::LeaseGrant(mut g)) => {
                        if g.error.is_empty() {
                            crate::metrics::lease_granted_ttl(g.ttl);
                        }
                        g.header = Some(self.node.header_at(resp.revision));
                        return Ok(Response::new(g));
                    }
                    _ => {
                        return Err(
                            ServerError::Internal("unexpected apply response".into()).into()
                        );
                    }
                },
                Err(ServerError::LeaseExists) if chosen => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ServerError::LeaseExists.into())
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn lease_revoke(
        &self,
        req: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        // Applying checks that the caller may delete every key attached to the lease.
        let caller = crate::auth::Caller::of(&req);
        let r = req.into_inner();
        let resp = crate::auth::propose_as(&self.node, &caller, Cmd::LeaseRevoke(r)).await?;
        Ok(Response::new(LeaseRevokeResponse {
            header: Some(self.node.header_at(resp.revision)),
        }))
    }

    type LeaseKeepAliveStream = KeepAliveStream;

    async fn lease_keep_alive(
        &self,
        req: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let mut incoming = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let lessor = self.lessor.clone();
        let node = self.node.clone();
        tokio::spawn(async move {
            // Keep-alives that arrived together are renewed together: concurrently, so they
            // share the leader's quorum confirmation round instead of paying one each.
            let mut batches = (&mut incoming).ready_chunks(KEEPALIVE_BATCH);
            while let Some(batch) = batches.next().await {
                let ids: Vec<i64> = batch
                    .iter()
                    .map_while(|m| m.as_ref().ok().map(|m| m.id))
                    .collect();
                let broken = ids.len() < batch.len();
                let results =
                    futures::future::join_all(ids.iter().map(|id| lessor.renew(*id))).await;
                for (id, result) in ids.into_iter().zip(results) {
                    let reply = match result {
                        Ok(ttl) => Ok(LeaseKeepAliveResponse {
                            header: Some(node.header()),
                            id,
                            ttl,
                        }),
                        Err(e) => Err(Status::from(e)),
                    };
                    let failed = reply.is_err();
                    if tx.send(reply).await.is_err() || failed {
                        return;
                    }
                }
                if broken {
                    return;
                }
            }
        });
        Ok(Response::new(self.node.until_stopping(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))))
    }

    async fn lease_time_to_live(
        &self,
        req: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let caller = crate::auth::Caller::of(&req);
        let r = req.into_inner();
        // Listing the attached keys needs read access to each of them (etcd checks only then).
        let checked = if r.keys {
            self.check_lease_keys(&caller, r.id).await?
        } else {
            None
        };
        let ttl = self.lessor.remaining(r.id).await?;
        // The granted TTL and keys come from this member's state: bring it up to the leader's
        // commit index first, so keys attached just before (perhaps through another member) are
        // listed, as etcd (which answers on the leader) lists them.
        self.node.read_barrier().await?;
        let info = self.node.mvcc.lease(r.id);
        crate::auth::check_unchanged(&self.node, &checked)?;
        Ok(Response::new(LeaseTimeToLiveResponse {
            header: Some(self.node.header()),
            id: r.id,
            ttl,
            granted_ttl: info.as_ref().map(|l| l.ttl).unwrap_or(0),
            keys: if r.keys {
                info.map(|l| l.keys).unwrap_or_default()
            } else {
                Vec::new()
            },
        }))
    }

    async fn lease_leases(
        &self,
        req: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        let caller = crate::auth::Caller::of(&req);
        let mut checked = None;
        for l in self.node.mvcc.leases() {
            checked = self.check_lease_keys(&caller, l.id).await?;
        }
        crate::auth::check_unchanged(&self.node, &checked)?;
        let leases = self
            .node
            .mvcc
            .leases()
            .into_iter()
            .map(|l| LeaseStatus { id: l.id })
            .collect();
        Ok(Response::new(LeaseLeasesResponse {
            header: Some(self.node.header()),
            leases,
        }))
    }
}
