//! A Keel member: identity, storage, the Raft node, and the two paths every request takes —
//! proposals (writes, forwarded to the leader when this member is a follower) and linearizable
//! read barriers (ReadIndex on the leader, or a read index fetched from the leader, then a wait
//! until this member has applied that index).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use keel_proto::etcdserverpb::ResponseHeader;
use keel_proto::keelpb::{RaftRequest, RaftResponse};
use keel_store::ApplyError;
use keel_store::engine::Engine;
use keel_store::engine::rocks::RocksEngine;
use keel_store::mvcc::MvccStore;
use keel_store::raft::state_machine::ApplyListener;
use keel_store::raft::{AppliedState, LogStore, MemberNode, NodeId, Raft, StateMachine};
use openraft::async_runtime::WatchReceiver as _;
use openraft::error::{LinearizableReadError, RaftError};
use openraft::{ReadPolicy, SnapshotPolicy};
use prost::Message;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::config::{ClusterState, Config};
use crate::error::ServerError;
use crate::network::{NetworkFactory, Peers};
use crate::proposals::WriteFailure;

/// How long a proposal or read barrier may take before the client gets "request timed out".
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(7);

/// What a data directory remembers about its member, so a restart needs no bootstrap flags.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub member_id: NodeId,
    pub cluster_id: u64,
}

/// 64-bit FNV-1a: a stable hash for deriving member and cluster IDs.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.iter().chain(std::iter::once(&0u8)) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// A member ID derived from its peer URLs and the cluster token (like etcd), never zero.
pub fn member_id(peer_urls: &[String], token: &str) -> NodeId {
    let mut urls = peer_urls.to_vec();
    urls.sort();
    let joined = urls.join(",");
    fnv1a(&[joined.as_bytes(), token.as_bytes()]).max(1)
}

/// A cluster ID derived from the sorted member IDs and the token.
pub fn cluster_id(members: &BTreeSet<NodeId>, token: &str) -> u64 {
    let ids: Vec<u8> = members.iter().flat_map(|id| id.to_be_bytes()).collect();
    fnv1a(&[&ids, token.as_bytes()]).max(1)
}

fn identity_path(data_dir: &Path) -> PathBuf {
    data_dir.join("member.json")
}

/// Everything the gRPC services share.
pub struct KeelNode {
    pub identity: Identity,
    pub config: Config,
    pub raft: Raft,
    pub mvcc: Arc<MvccStore>,
    pub applied: watch::Receiver<AppliedState>,
    pub peers: Arc<Peers>,
    pub data_dir: PathBuf,
    pub snapshot_dir: PathBuf,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Forwarded writes, pipelined on one stream per leader.
    write_pipes: crate::forwarding::WritePipes,
    /// Coalesced read-index calls to the leader.
    read_batcher: Arc<crate::forwarding::ReadIndexBatcher>,
    /// Every write this member proposes; those that arrive together share a log entry.
    pub(crate) proposals: crate::proposals::ProposalBatcher,
    /// Held while this member (as leader) validates and makes a membership change: openraft
    /// refuses a change while another is in flight, so concurrent ones queue here (see
    /// `cluster::one_change_at_a_time`).
    pub membership_changes: tokio::sync::Mutex<()>,
    /// Turns `true` when the member starts shutting down (see [`KeelNode::until_stopping`]).
    stopping: watch::Sender<bool>,
}

/// A gRPC call's stream of responses.
pub type ResponseStream<T> =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<T, tonic::Status>> + Send>>;

/// See [`KeelNode::until_stopping`].
struct UntilStopping<T> {
    /// `None` once ended (the inner stream is dropped then, which ends a watch's watchers).
    inner: Option<ResponseStream<T>>,
    stopped: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
}

impl<T> futures::Stream for UntilStopping<T> {
    type Item = Result<T, tonic::Status>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return std::task::Poll::Ready(None);
        };
        if this.stopped.as_mut().poll(cx).is_ready() {
            this.inner = None;
            return std::task::Poll::Ready(Some(Err(ServerError::Stopped.into())));
        }
        inner.as_mut().poll_next(cx)
    }
}

/// openraft's `(election_timeout_min, election_timeout_max)` for `--election-timeout` E.
///
/// etcd's followers campaign after a randomized E..2E without hearing from the leader. An
/// openraft follower waits longer: it first lets the leader's lease run out
/// (`election_timeout_max`, during which it also refuses to vote for anyone) and only then its
/// randomized timeout (`min..max`). Mapping E to `E..2E` made a fail-over take 3–4 s with
/// E = 1 s (etcd: 1–2 s). With `E/4..3E/4` a follower campaigns after 1–1.5 E of silence, and a
/// candidate that lost retries after E/4..3E/4 (the minimum is kept above the heartbeat
/// interval, as openraft requires). E is at least three heartbeats.
fn raft_election_timeouts(config: &Config) -> (u64, u64) {
    let election = config.election_timeout.max(config.heartbeat_interval * 3);
    // openraft refuses a minimum below the heartbeat interval.
    let min = election.div_ceil(4).max(config.heartbeat_interval + 1);
    (min, (election * 3).div_ceil(4).max(min + 1))
}

impl KeelNode {
    /// Opens (or creates) the data directory and starts the Raft node.
    pub async fn start(
        config: Config,
        listener: Option<ApplyListener>,
    ) -> anyhow::Result<Arc<KeelNode>> {
        let data_dir = config.data_dir();
        std::fs::create_dir_all(&data_dir)?;
        let id_path = identity_path(&data_dir);
        let existing: Option<Identity> = match std::fs::read(&id_path) {
            Ok(bytes) => Some(serde_json::from_slice(&bytes)?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e.into()),
        };

        let mut config = config;
        let restored = existing.is_none() && apply_restore_bootstrap(&mut config, &data_dir)?;
        let members = config.initial_members().map_err(anyhow::Error::msg)?;
        let mut bootstrap: BTreeMap<NodeId, MemberNode> = BTreeMap::new();
        for (name, urls) in &members {
            let id = member_id(urls, &config.initial_cluster_token);
            // Every founding member must initialize with byte-identical membership (openraft
            // treats the initial entries as the same log entry), so client URLs are left empty
            // here; each member publishes its own once the cluster runs (cluster.rs).
            let client_urls = Vec::new();
            bootstrap.insert(
                id,
                MemberNode {
                    name: name.clone(),
                    peer_urls: urls.clone(),
                    client_urls,
                    promote: false,
                },
            );
        }
        // This member's peer URLs, as --initial-cluster names them.
        let my_urls = members
            .iter()
            .find(|(n, _)| *n == config.name)
            .map(|(_, u)| u.clone())
            .unwrap_or_default();
        let mut identity = match &existing {
            Some(id) => id.clone(),
            None => {
                let ids: BTreeSet<NodeId> = bootstrap.keys().copied().collect();
                Identity {
                    name: config.name.clone(),
                    member_id: member_id(&my_urls, &config.initial_cluster_token),
                    cluster_id: cluster_id(&ids, &config.initial_cluster_token),
                }
            }
        };

        if existing.is_none() && config.initial_cluster_state == ClusterState::Existing {
            let (cluster, member) = discover_cluster(&members, &my_urls, &config).await?;
            identity.cluster_id = cluster;
            if let Some(member) = member {
                identity.member_id = member;
            }
        }

        let opening = std::time::Instant::now();
        let engine: Arc<dyn Engine> = Arc::new(RocksEngine::open(&data_dir.join("db"))?);
        let engine_opened = opening.elapsed();
        let mvcc = Arc::new(MvccStore::open_with(
            engine.clone(),
            config.value_cache_bytes,
        )?);
        tracing::info!(
            engine_ms = engine_opened.as_millis() as u64,
            key_index_ms = (opening.elapsed() - engine_opened).as_millis() as u64,
            keys = mvcc.key_count(),
            revision = mvcc.current_revision(),
            "store opened"
        );
        let snapshot_dir = data_dir.join("snapshots");
        let peers = Peers::new(identity.cluster_id, identity.member_id);
        peers.set_tls(crate::tls::peer_client_config(&config)?);
        let open_raft = |listener: Option<ApplyListener>| {
            let (config, identity, engine, mvcc) = (&config, &identity, &engine, &mvcc);
            let (snapshot_dir, peers) = (&snapshot_dir, &peers);
            async move {
                let mut log_store = LogStore::new(engine.clone())?;
                // A follower fsyncs on the worker that appends: two thread wake-ups fewer
                // per write (keel_store::raft::log_store). With a single worker the fsync
                // would stall every other task, so such a member keeps the sync thread.
                if tokio::runtime::Handle::current().metrics().num_workers() >= 2 {
                    log_store = log_store.syncing_follower_appends_inline(identity.member_id)?;
                }
                let state_machine = StateMachine::open(mvcc.clone(), snapshot_dir, listener)?
                    .answering_forwards_of(identity.member_id);
                let applied = state_machine.applied_watch();
                let raft = Raft::new(
                    identity.member_id,
                    Arc::new(raft_config(config)?),
                    NetworkFactory {
                        peers: peers.clone(),
                    },
                    log_store,
                    state_machine,
                )
                .await?;
                anyhow::Ok((raft, applied))
            }
        };

        let force_new_cluster = config.force_new_cluster && existing.is_some();
        if config.force_new_cluster && existing.is_none() {
            tracing::warn!("--force-new-cluster ignored: the data directory is new");
        }
        if force_new_cluster {
            // docs: keel_store::raft::recovery. First apply what the log knows to be committed.
            let committed = {
                use openraft::storage::RaftLogStorage as _;
                let mut probe = LogStore::new(engine.clone())?;
                probe
                    .read_committed()
                    .await?
                    .map(|id| id.index)
                    .unwrap_or(0)
            };
            let (raft, mut applied) = open_raft(None).await?;
            let caught_up = tokio::time::timeout(
                Duration::from_secs(60),
                applied.wait_for(|a| a.index >= committed),
            )
            .await
            .is_ok_and(|r| r.is_ok());
            let last = applied.borrow().index;
            raft.shutdown().await.map_err(|e| anyhow::anyhow!("{e}"))?;
            drop(raft);
            if !caught_up {
                anyhow::bail!(
                    "--force-new-cluster: applied only up to entry {last} of {committed} committed"
                );
            }
            let me = keel_store::raft::recovery::forget_raft_state(
                &engine,
                &snapshot_dir,
                identity.member_id,
            )?;
            let me = me.unwrap_or_else(|| MemberNode {
                name: identity.name.clone(),
                peer_urls: config.initial_advertise_peer_urls.clone(),
                ..Default::default()
            });
            bootstrap = BTreeMap::from([(
                identity.member_id,
                MemberNode {
                    client_urls: Vec::new(),
                    promote: false,
                    ..me
                },
            )]);
            tracing::warn!(
                member_id = %format!("{:x}", identity.member_id),
                applied = last,
                revision = mvcc.current_revision(),
                "--force-new-cluster: the Raft state is forgotten; starting a one-member cluster with this member's data"
            );
        }
        // Writes this member forwards are answered from its own apply (see crate::forwarding).
        let write_pipes = crate::forwarding::WritePipes::new(identity.member_id);
        let answers = write_pipes.answers();
        let listener: ApplyListener = Arc::new(move |chunk| {
            answers.deliver(chunk);
            if let Some(inner) = &listener {
                inner(chunk);
            }
        });
        let (raft, applied) = open_raft(Some(listener)).await?;

        if force_new_cluster {
            raft.initialize(bootstrap.clone())
                .await
                .map_err(|e| anyhow::anyhow!("--force-new-cluster: {e}"))?;
        }
        let marker = data_dir.join(DATA_PREDATES_LOG_FILE);
        if force_new_cluster || restored {
            std::fs::write(&marker, b"")?;
        }
        if marker.exists() {
            start_log_after_a_snapshot(raft.clone(), marker);
        }
        if existing.is_none() {
            if config.initial_cluster_state == ClusterState::New {
                // Every founding member initializes with the same membership; openraft accepts
                // that, and the first to win an election commits it.
                match raft.initialize(bootstrap.clone()).await {
                    Ok(()) => {}
                    Err(RaftError::APIError(e)) => {
                        tracing::info!("cluster already initialized: {e}")
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            let tmp = id_path.with_extension("json.tmp");
            std::fs::write(&tmp, serde_json::to_vec_pretty(&identity)?)?;
            std::fs::rename(&tmp, &id_path)?;
        } else if existing.as_ref().is_some_and(|e| e.name != config.name)
            && config.name != "default"
        {
            tracing::warn!(stored = %identity.name, flag = %config.name, "--name differs from the data directory's member; keeping the stored identity");
        }

        tracing::info!(member_id = %format!("{:x}", identity.member_id), cluster_id = %format!("{:x}", identity.cluster_id), data_dir = %data_dir.display(), "keel member started");
        let metrics = crate::metrics::Metrics::new(
            identity.member_id,
            crate::maintenance::quota_in_force(config.quota_backend_bytes),
            config.metrics == crate::config::MetricsLevel::Extensive,
        );
        let proposals = crate::proposals::ProposalBatcher::start(
            raft.clone(),
            identity.member_id,
            config.proposal_batching,
            metrics.proposal_batch_sizes.clone(),
        );
        Ok(Arc::new(KeelNode {
            identity,
            config,
            raft,
            proposals,
            mvcc,
            applied,
            peers,
            data_dir,
            snapshot_dir,
            metrics,
            write_pipes,
            read_batcher: Default::default(),
            membership_changes: tokio::sync::Mutex::new(()),
            stopping: watch::channel(false).0,
        }))
    }

    pub fn member_id(&self) -> NodeId {
        self.identity.member_id
    }

    /// Every other member of the current membership (voters and learners), with its address.
    pub fn other_members(&self) -> Vec<(NodeId, keel_store::raft::MemberNode)> {
        let me = self.member_id();
        let m = self.raft.metrics().borrow_watched().clone();
        m.membership_config
            .membership()
            .nodes()
            .filter(|(id, _)| **id != me)
            .map(|(id, n)| (*id, n.clone()))
            .collect()
    }

    pub fn term(&self) -> u64 {
        self.raft.metrics().borrow_watched().current_term
    }

    /// A response header at the store's current revision.
    pub fn header(&self) -> ResponseHeader {
        self.header_at(self.mvcc.current_revision())
    }

    pub fn header_at(&self, revision: i64) -> ResponseHeader {
        ResponseHeader {
            cluster_id: self.identity.cluster_id,
            member_id: self.identity.member_id,
            revision,
            raft_term: self.term(),
        }
    }

    /// The leader this member knows of, with its address. Runs on every request: it reads the
    /// Raft metrics in place rather than copying them.
    pub fn leader(&self) -> Option<(NodeId, Option<MemberNode>)> {
        let rx = self.raft.metrics();
        let m = rx.borrow_watched();
        let leader = m.current_leader?;
        let node = m.membership_config.membership().get_node(&leader).cloned();
        Some((leader, node))
    }

    /// Proposes `req` through Raft and returns the applied result. On a follower the request is
    /// forwarded to the leader. Request-level failures come back as errors.
    /// Requests that would grow the store past the quota are refused (see
    /// [`crate::maintenance::check_quota`]).
    pub async fn propose(&self, req: RaftRequest) -> Result<RaftResponse, ServerError> {
        if req.encoded_len() > self.config.max_request_bytes {
            return Err(ServerError::RequestTooLarge);
        }
        crate::maintenance::check_quota(self, &req).await?;
        let lease_op = crate::metrics::LeaseOp::of(&req);
        let pending = self.metrics.pending();
        let result = self.propose_raw(req).await;
        drop(pending);
        match &result {
            Ok(_) => self.metrics.proposed(lease_op),
            Err(ServerError::Timeout)
            | Err(ServerError::NoLeader)
            | Err(ServerError::LeaderChanged)
            | Err(ServerError::Stopped)
            | Err(ServerError::Internal(_)) => self.metrics.proposals_failed.inc(),
            Err(_) => {}
        }
        result
    }

    /// [`Self::propose`] without the quota check and metrics (for the members' own requests).
    pub async fn propose_raw(&self, req: RaftRequest) -> Result<RaftResponse, ServerError> {
        let resp = match tokio::time::timeout(REQUEST_TIMEOUT, self.propose_routed(req)).await {
            Ok(r) => r?,
            Err(_) => return Err(ServerError::Timeout),
        };
        match &resp.error {
            Some(e) => Err(ApplyError::from_proto(e).into()),
            None => Ok(resp),
        }
    }

    async fn propose_routed(&self, req: RaftRequest) -> Result<RaftResponse, ServerError> {
        match self.leader() {
            Some((leader, Some(node))) if leader != self.member_id() => {
                self.forward(leader, &node, req).await
            }
            _ => self.propose_local(req).await,
        }
    }

    /// Writes `req` into this member's Raft log, never forwarding it, bounded by the request
    /// timeout; the applied response as it is, its `error` included. A member that is not the
    /// leader gets [`ServerError::NotLeader`]. For writes that must not travel on: those a
    /// follower forwarded here (so requests cannot loop) and the leader's own decisions.
    pub async fn write_here(&self, req: RaftRequest) -> Result<RaftResponse, ServerError> {
        match tokio::time::timeout(REQUEST_TIMEOUT, self.proposals.write(req)).await {
            Err(_) => Err(ServerError::Timeout),
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(WriteFailure::NotLeader { .. })) => Err(ServerError::NotLeader),
            Ok(Err(WriteFailure::Failed(e))) => Err(e),
        }
    }

    /// Proposes `req` as this member's own Raft write ([`Self::write_here`]): for decisions a
    /// leader makes from its own clocks (lease expiry). A member that stopped leading (or was
    /// paused and has not yet noticed it was replaced) gets [`ServerError::NotLeader`] and its
    /// decision is dropped; pushing it onto the new leader would revoke a lease that leader
    /// keeps alive. An entry this member still appends in its old term cannot commit once
    /// another leader was elected.
    pub async fn propose_as_leader(&self, req: RaftRequest) -> Result<RaftResponse, ServerError> {
        let lease_op = crate::metrics::LeaseOp::of(&req);
        let resp = self.write_here(req).await?;
        match &resp.error {
            Some(e) => Err(ApplyError::from_proto(e).into()),
            None => {
                self.metrics.proposed(lease_op);
                Ok(resp)
            }
        }
    }

    /// Proposes on this member, forwarding once if it turns out not to be the leader.
    pub async fn propose_local(&self, req: RaftRequest) -> Result<RaftResponse, ServerError> {
        match self.proposals.write(req).await {
            Ok(resp) => Ok(resp),
            Err(WriteFailure::NotLeader {
                leader: Some((id, node)),
                request,
            }) if id != self.member_id() => self.forward(id, &node, request).await,
            Err(WriteFailure::NotLeader { .. }) => Err(ServerError::NoLeader),
            Err(WriteFailure::Failed(e)) => Err(e),
        }
    }

    /// Hands `req` to the leader and answers from this member's own apply of it, so that what
    /// this member acknowledged is what its serializable reads and new watches see, as with
    /// etcd, whose members answer a write from their own apply (see [`crate::forwarding`]).
    /// A leader that predates answers on apply replies with the response and its log index;
    /// the answer then waits until this member has applied that index (at once if the leader
    /// predates the index too, 0).
    async fn forward(
        &self,
        leader: NodeId,
        node: &MemberNode,
        req: RaftRequest,
    ) -> Result<RaftResponse, ServerError> {
        use crate::forwarding::Answer;
        match self
            .write_pipes
            .forward(&self.peers, leader, node, req)
            .await?
        {
            Answer::Applied(resp) => Ok(resp),
            Answer::FromLeader(resp) => {
                if resp.index > 0 {
                    self.wait_applied(resp.index).await?;
                }
                Ok(resp)
            }
        }
    }

    /// Sends a keep-alive of `lease` to `leader` on the forwarding stream (see
    /// [`crate::forwarding`]); `None` if the leader does not take keep-alives there.
    pub(crate) async fn renew_on_stream(
        &self,
        leader: NodeId,
        node: &MemberNode,
        lease: i64,
    ) -> Result<Option<i64>, ServerError> {
        self.write_pipes
            .renew(&self.peers, leader, node, lease)
            .await
    }

    /// Waits until this member may serve a linearizable read: the read index is confirmed by a
    /// quorum (on the leader, or fetched from it) and applied locally.
    pub async fn read_barrier(&self) -> Result<(), ServerError> {
        if self.config.unsafe_local_reads {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let result = match tokio::time::timeout(REQUEST_TIMEOUT, self.read_barrier_inner()).await {
            Ok(r) => r,
            Err(_) => Err(ServerError::Timeout),
        };
        crate::metrics::read_index_done(result.is_ok(), started.elapsed());
        result
    }

    async fn read_barrier_inner(&self) -> Result<(), ServerError> {
        let index = self.read_index().await?;
        self.wait_applied(index).await
    }

    /// The index a linearizable read on this member must wait for: the leader's commit index,
    /// confirmed by a quorum (a follower asks the leader).
    pub async fn read_index(&self) -> Result<u64, ServerError> {
        match self.leader() {
            Some((leader, Some(node))) if leader != self.member_id() => {
                self.read_batcher
                    .read_index(&self.peers, leader, &node)
                    .await
            }
            Some(_) => self.read_index_local().await,
            None => Err(ServerError::NoLeader),
        }
    }

    /// On the leader: confirms leadership with a quorum (concurrent calls share one round) and
    /// returns the index a read must wait for.
    pub async fn read_index_local(&self) -> Result<u64, ServerError> {
        match self.raft.get_read_log_id(ReadPolicy::ReadIndex).await {
            Ok((read_log_id, _)) => Ok(read_log_id.index()),
            Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(_))) => {
                Err(ServerError::NotLeader)
            }
            Err(RaftError::APIError(LinearizableReadError::QuorumNotEnough(_))) => {
                Err(ServerError::Timeout)
            }
            Err(RaftError::Fatal(_)) => Err(ServerError::Stopped),
        }
    }

    /// Waits until this member has applied `index`.
    pub async fn wait_applied(&self, index: u64) -> Result<(), ServerError> {
        let mut rx = self.applied.clone();
        rx.wait_for(|a| a.index >= index)
            .await
            .map_err(|_| ServerError::Stopped)?;
        Ok(())
    }

    /// On the leader of a cluster with other voters: hands leadership to the voter whose log
    /// matches most of the leader's and waits, at most `timeout`, until that voter leads. A
    /// member stopped on purpose then costs the cluster one leadership transfer instead of an
    /// election timeout without a leader (etcd's members do the same when they stop). Returns
    /// the new leader if leadership moved.
    pub async fn hand_over_leadership(&self, timeout: Duration) -> Option<NodeId> {
        let me = self.member_id();
        let m = self.raft.metrics().borrow_watched().clone();
        if m.current_leader != Some(me) {
            return None;
        }
        let voters: BTreeSet<NodeId> = m
            .membership_config
            .membership()
            .voter_ids()
            .filter(|id| *id != me)
            .collect();
        // The most caught-up voter; among equals the lowest ID, so the choice is reproducible.
        let target = m
            .replication
            .as_ref()?
            .iter()
            .filter(|(id, _)| voters.contains(id))
            .max_by_key(|(id, matched)| (matched.map(|l| l.index), std::cmp::Reverse(**id)))
            .map(|(id, _)| *id)?;
        tracing::info!(to = %format!("{target:x}"), "handing leadership over before shutting down");
        self.raft.trigger().transfer_leader(target).await.ok()?;
        if self.wait_for_leader(target, timeout).await == Ok(true) {
            tracing::info!(to = %format!("{target:x}"), "leadership handed over");
            Some(target)
        } else {
            tracing::warn!(to = %format!("{target:x}"), "leadership hand-over did not finish; stopping anyway");
            None
        }
    }

    /// Waits, at most `timeout`, until this member's Raft names `target` leader: `Ok(true)`
    /// once it does, `Ok(false)` if Raft stopped first, `Err` on the timeout.
    pub async fn wait_for_leader(
        &self,
        target: NodeId,
        timeout: Duration,
    ) -> Result<bool, tokio::time::error::Elapsed> {
        let mut rx = self.raft.metrics();
        tokio::time::timeout(timeout, async {
            loop {
                if rx.borrow_watched().current_leader == Some(target) {
                    return true;
                }
                if rx.changed().await.is_err() {
                    return false;
                }
            }
        })
        .await
    }

    /// Marks the member as shutting down: every stream wrapped by [`KeelNode::until_stopping`]
    /// ends.
    pub fn begin_stopping(&self) {
        self.stopping.send_replace(true);
    }

    /// `stream`, ended with `etcdserver: server stopped` (gRPC `Unavailable`) as soon as the
    /// member starts shutting down. Long-lived calls (watches, lease keep-alives, election
    /// observers, and the Raft replication and forwarding streams of peers) never end on their
    /// own, so they would hold a graceful shutdown until its deadline; ended, their clients
    /// reconnect to another member (etcd clients retry `Unavailable` on the next endpoint).
    pub fn until_stopping<T: Send + 'static>(
        &self,
        stream: ResponseStream<T>,
    ) -> ResponseStream<T> {
        let mut stopping = self.stopping.subscribe();
        Box::pin(UntilStopping {
            inner: Some(stream),
            stopped: Box::pin(async move {
                let _ = stopping.wait_for(|s| *s).await;
            }),
        })
    }
}

/// A member joining with `--initial-cluster-state existing` asks the other members named in
/// `--initial-cluster` for the cluster ID and the membership, and takes the member ID that
/// `member add` gave its peer URLs, as etcd's joining members do (so its own
/// `--initial-cluster-token` does not matter). `None`: the member that answered is of a Keel
/// version that does not list members; the ID derived from the token is kept.
async fn discover_cluster(
    members: &[(String, Vec<String>)],
    my_urls: &[String],
    config: &Config,
) -> anyhow::Result<(u64, Option<NodeId>)> {
    use keel_proto::keelpb::MemberIdentity;
    let own_name = config.name.as_str();
    let probe = Peers::new(0, 0);
    probe.set_tls(crate::tls::peer_client_config(config)?);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let sorted = |urls: &[String]| {
        let mut urls = urls.to_vec();
        urls.sort();
        urls
    };
    let mine = sorted(my_urls);
    loop {
        for (name, urls) in members.iter().filter(|(n, _)| n != own_name) {
            let node = MemberNode {
                name: name.clone(),
                peer_urls: urls.clone(),
                ..Default::default()
            };
            let Ok(mut client) = probe.client(0, &node) else {
                continue;
            };
            let mut req = tonic::Request::new(MemberIdentity {
                want_members: true,
                ..Default::default()
            });
            req.set_timeout(Duration::from_secs(2));
            let Ok(reply) = client.identify(req).await else {
                continue;
            };
            let reply = reply.into_inner();
            let id = reply.cluster_id;
            tracing::info!(cluster_id = %format!("{id:x}"), from = %name, "joining existing cluster");
            if reply.members.is_empty() {
                return Ok((id, None));
            }
            return match reply.members.iter().find(|m| sorted(&m.peer_urls) == mine) {
                Some(m) => Ok((id, Some(m.id))),
                None => anyhow::bail!(
                    "--initial-cluster-state existing: no member of the cluster has this member's peer URLs {my_urls:?}; add it first (etcdctl member add {own_name} --peer-urls {})",
                    my_urls.join(",")
                ),
            };
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!(
                "--initial-cluster-state existing: no other member of --initial-cluster answered"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// openraft's configuration from the member's flags.
fn raft_config(config: &Config) -> anyhow::Result<openraft::Config> {
    let (election_timeout_min, election_timeout_max) = raft_election_timeouts(config);
    Ok(openraft::Config {
        cluster_name: config.initial_cluster_token.clone(),
        heartbeat_interval: config.heartbeat_interval,
        election_timeout_min,
        election_timeout_max,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_count),
        max_in_snapshot_log_to_keep: config.experimental_snapshot_catchup_entries,
        purge_batch_size: 1_000,
        max_payload_entries: 1_000,
        install_snapshot_timeout: 10_000,
        enable_pre_vote: Some(true),
        ..Default::default()
    }
    .validate()?)
}

/// A data directory made by `keel snapshot restore` carries the new cluster's bootstrap flags;
/// they take the place of the command line's on the member's first start.
/// Returns whether it did.
fn apply_restore_bootstrap(config: &mut Config, data_dir: &Path) -> anyhow::Result<bool> {
    let path = data_dir.join(crate::snapshot::RESTORE_BOOTSTRAP_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    let b: crate::snapshot::RestoreBootstrap = serde_json::from_slice(&bytes)?;
    tracing::info!(name = %b.name, initial_cluster = %b.initial_cluster, "first start of a restored member");
    config.name = b.name;
    config.initial_cluster = Some(b.initial_cluster);
    config.initial_cluster_token = b.initial_cluster_token;
    config.initial_advertise_peer_urls = b.initial_advertise_peer_urls;
    config.initial_cluster_state = ClusterState::New;
    Ok(true)
}

/// A restored member, or one forced into a new cluster, holds data that no entry of its new
/// Raft log carries: a member added later would replay the log from its start onto an empty
/// store. So once the new log has begun, such a member snapshots its state and purges the log
/// it covers; a member that joins later then receives the data as a snapshot.
/// A marker file in the data directory: the member still has to snapshot its data and purge the
/// log before it (see [`start_log_after_a_snapshot`]); it is removed once that is done, so a
/// restart in between does it again.
const DATA_PREDATES_LOG_FILE: &str = "data-predates-log";

/// Whether this member still has to snapshot data that no log entry carries (a member added
/// now would not receive it; `MemberAdd` waits).
pub(crate) fn data_predates_log(node: &KeelNode) -> bool {
    node.data_dir.join(DATA_PREDATES_LOG_FILE).exists()
}

fn start_log_after_a_snapshot(raft: Raft, marker: PathBuf) {
    tokio::spawn(async move {
        let wait = |secs| raft.wait(Some(Duration::from_secs(secs)));
        if let Err(e) = wait(600)
            .metrics(
                |m| m.last_applied.is_some(),
                "the new log's first entry is applied",
            )
            .await
        {
            tracing::warn!("no entry applied yet, the log is not purged: {e}");
            return;
        }
        if raft.trigger().snapshot().await.is_err() {
            return;
        }
        let snapshot = match wait(60)
            .metrics(|m| m.snapshot.is_some(), "a snapshot of the data")
            .await
        {
            Ok(m) => m.snapshot,
            Err(e) => {
                tracing::warn!("no snapshot, the log is not purged: {e}");
                return;
            }
        };
        if let Some(upto) = snapshot
            && raft.trigger().purge_log(upto.index).await.is_ok()
            && wait(60)
                .metrics(
                    |m| m.purged.is_some_and(|p| p.index >= upto.index),
                    "the log before the snapshot purged",
                )
                .await
                .is_ok()
        {
            if let Err(e) = std::fs::remove_file(&marker) {
                tracing::warn!(error = %e, "could not remove {}", marker.display());
            }
            tracing::info!(
                upto = upto.index,
                "the data predates the Raft log: snapshot taken and the log before it purged, so members added later receive the data as a snapshot"
            );
        }
    });
}

/// Turns a forwarded request's gRPC failure back into our error.
pub(crate) fn status_to_error(status: &tonic::Status) -> ServerError {
    use ServerError::*;
    let all = [
        EmptyKey,
        KeyNotFound,
        ValueProvided,
        LeaseProvided,
        TooManyOps,
        DuplicateKey,
        InvalidSortOption,
        RequestTooLarge,
        Compacted,
        FutureRevision,
        NoSpace,
        LeaseNotFound,
        LeaseExists,
        LeaseTtlTooLarge,
        NoLeader,
        LeaderChanged,
        Timeout,
        Stopped,
        NotLeader,
        BadLeaderTransferee,
        Corrupt,
        MemberExists,
        PeerUrlExists,
        MemberBadUrls,
        MemberNotFound,
        MemberNotLearner,
        LearnerNotReady,
        TooManyLearners,
        NotEnoughStartedMembers,
    ];
    if let Some(e) = all.into_iter().find(|e| e.to_string() == status.message()) {
        return e;
    }
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
            NoLeader
        }
        // The connection to the leader broke mid-request (tonic reports the transport's or
        // HTTP/2's failure): the request may or may not have been applied, which is what
        // etcd's `request timed out` (Unavailable) tells clients, and they retry it.
        _ if ["transport error", "h2 protocol error"]
            .iter()
            .any(|t| status.message().contains(t)) =>
        {
            Timeout
        }
        _ => Internal(status.message().to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A forward whose connection to the leader broke is "request timed out" (Unavailable,
    /// retried by clients), whatever code tonic gave the failure; the leader's own errors come
    /// back as themselves.
    #[test]
    fn broken_forwards_are_timeouts_and_leader_errors_pass_through() {
        use tonic::{Code, Status};
        for s in [
            Status::new(
                Code::Unknown,
                "h2 protocol error: error reading a body from connection",
            ),
            Status::new(Code::Internal, "h2 protocol error: stream no longer needed"),
            Status::new(Code::Unknown, "transport error"),
        ] {
            assert_eq!(
                status_to_error(&s).to_string(),
                ServerError::Timeout.to_string(),
                "{s:?}"
            );
        }
        let leader: Status = ServerError::Compacted.into();
        assert_eq!(
            status_to_error(&leader).to_string(),
            ServerError::Compacted.to_string()
        );
        assert_eq!(
            status_to_error(&Status::unavailable("connection refused")).to_string(),
            ServerError::NoLeader.to_string()
        );
        assert!(matches!(
            status_to_error(&Status::internal("disk full")),
            ServerError::Internal(_)
        ));
    }

    /// An openraft follower campaigns `election_timeout_max` (the leader's lease) plus a
    /// timeout drawn from `min..max` after it last heard from the leader; like etcd's E..2E, that
    /// must never be sooner than E nor later than 2E, and openraft must accept the pair.
    #[test]
    fn a_follower_campaigns_between_one_and_two_election_timeouts() {
        use clap::Parser;
        for (heartbeat, election) in [
            (100, 1000),
            (100, 300),
            (100, 500),
            (2, 6),
            (10, 50),
            (1, 1),
            (50, 5000),
        ] {
            let config = Config::parse_from([
                "keel".to_string(),
                format!("--heartbeat-interval={heartbeat}"),
                format!("--election-timeout={election}"),
            ]);
            let e = election.max(heartbeat * 3);
            let (min, max) = raft_election_timeouts(&config);
            assert!(
                max + min >= e,
                "{heartbeat}/{election}: first campaign before E"
            );
            assert!(
                max + max <= 2 * e,
                "{heartbeat}/{election}: first campaign after 2E"
            );
            assert!(
                max > heartbeat,
                "{heartbeat}/{election}: lease within one heartbeat"
            );
            let validated = openraft::Config {
                heartbeat_interval: heartbeat,
                election_timeout_min: min,
                election_timeout_max: max,
                ..Default::default()
            }
            .validate();
            assert!(validated.is_ok(), "{heartbeat}/{election}: {validated:?}");
        }
    }

    #[test]
    fn ids_are_stable_and_distinct() {
        let a = member_id(&["http://127.0.0.1:2380".into()], "t");
        assert_eq!(a, member_id(&["http://127.0.0.1:2380".into()], "t"));
        assert_ne!(a, member_id(&["http://127.0.0.1:2381".into()], "t"));
        assert_ne!(a, member_id(&["http://127.0.0.1:2380".into()], "u"));
        let set: BTreeSet<u64> = [1, 2, 3].into();
        assert_eq!(cluster_id(&set, "t"), cluster_id(&[3, 2, 1].into(), "t"));
        assert_ne!(cluster_id(&set, "t"), cluster_id(&[1, 2].into(), "t"));
    }
}
