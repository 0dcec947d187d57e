//! Raft transport between members: the openraft network client over tonic.
//!
//! One long-lived HTTP/2 channel per peer carries every RPC to it (tonic multiplexes); log
//! replication uses a bidirectional `StreamAppend` stream so appends are pipelined, and
//! snapshots are streamed from their file in 1 MiB chunks. Every request carries the target's
//! member ID and the cluster ID, and the receiver refuses requests meant for someone else, so a
//! reused address never delivers a vote or log to the wrong member.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use keel_proto::keelpb::raft_peer_client::RaftPeerClient;
use keel_proto::keelpb::{MemberIdentity, RaftBytes, SnapshotChunk, snapshot_chunk};
use keel_store::raft::snapshot::SnapshotFile;
use keel_store::raft::types::{Snapshot, Vote, decode, encode};
use keel_store::raft::{MemberNode, NodeId, TypeConfig};
use openraft::base::{BoxFuture, BoxStream};
use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{Backoff, RPCOption};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult,
    TransferLeaderRequest, TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::{OptionalSend, RaftNetworkFactory, RaftNetworkV2};
use tokio::io::AsyncReadExt;
use tonic::transport::{Channel, Endpoint};

use crate::peer_metrics::{META_SENDER, PeerChannel};

/// Metadata keys naming the intended receiver.
pub const META_TARGET: &str = "keel-target-member";
pub const META_CLUSTER: &str = "keel-cluster";

const SNAPSHOT_CHUNK: usize = 1 << 20;
/// Pause after a failed attempt to open a replication stream.
const UNREACHABLE_BACKOFF: Duration = Duration::from_millis(100);

/// Cached channels to every peer, shared by Raft replication and request forwarding.
pub struct Peers {
    cluster_id: u64,
    /// This member's ID, sent with every request (`crate::peer_metrics::META_SENDER`); 0 while
    /// it is not known yet (discovery).
    own_id: u64,
    channels: Mutex<BTreeMap<NodeId, (String, Channel)>>,
    /// How to connect to `https://` peer URLs (see `crate::tls`).
    tls: Mutex<Option<tonic::transport::ClientTlsConfig>>,
}

impl Peers {
    pub fn new(cluster_id: u64, own_id: u64) -> Arc<Self> {
        Arc::new(Self {
            cluster_id,
            own_id,
            channels: Mutex::new(BTreeMap::new()),
            tls: Mutex::new(None),
        })
    }

    /// Sets the TLS configuration used for `https://` peer URLs.
    pub fn set_tls(&self, tls: Option<tonic::transport::ClientTlsConfig>) {
        if let Ok(mut t) = self.tls.lock() {
            *t = tls;
        }
    }

    /// A client for `target` at `node`'s first peer URL (connects lazily).
    pub fn client(
        &self,
        target: NodeId,
        node: &MemberNode,
    ) -> Result<RaftPeerClient<PeerChannel>, String> {
        let url = node
            .peer_urls
            .first()
            .ok_or_else(|| format!("member {target:x} has no peer URL"))?
            .clone();
        let mut channels = self
            .channels
            .lock()
            .map_err(|_| "peer channel map poisoned".to_string())?;
        let channel = match channels.get(&target) {
            Some((known, ch)) if *known == url => ch.clone(),
            _ => {
                let mut endpoint = Endpoint::from_shared(url.clone())
                    .map_err(|e| format!("bad peer URL {url}: {e}"))?;
                if url.starts_with("https://") {
                    let tls = self
                        .tls
                        .lock()
                        .ok()
                        .and_then(|t| t.clone())
                        .ok_or_else(|| {
                            format!("peer URL {url} needs --peer-trusted-ca-file to connect")
                        })?;
                    endpoint = endpoint
                        .tls_config(tls)
                        .map_err(|e| format!("TLS for peer URL {url}: {e}"))?;
                }
                let ch = endpoint
                    .connect_timeout(Duration::from_secs(1))
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(10))
                    .keep_alive_timeout(Duration::from_secs(5))
                    .connect_lazy();
                channels.insert(target, (url, ch.clone()));
                ch
            }
        };
        Ok(RaftPeerClient::new(PeerChannel::new(channel, target))
            .max_decoding_message_size(256 << 20)
            .max_encoding_message_size(256 << 20))
    }

    /// Wraps `msg` in a request addressed to `target`.
    pub fn request<T>(&self, target: NodeId, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if let Ok(v) = target.to_string().parse() {
            req.metadata_mut().insert(META_TARGET, v);
        }
        if let Ok(v) = self.cluster_id.to_string().parse() {
            req.metadata_mut().insert(META_CLUSTER, v);
        }
        if self.own_id != 0
            && let Ok(v) = self.own_id.to_string().parse()
        {
            req.metadata_mut().insert(META_SENDER, v);
        }
        req
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TransportError(String);

fn unreachable(e: impl std::fmt::Display) -> RPCError<TypeConfig> {
    RPCError::Unreachable(Unreachable::new(&TransportError(e.to_string())))
}

fn network(e: impl std::fmt::Display) -> NetworkError<TypeConfig> {
    NetworkError::new(&TransportError(e.to_string()))
}

/// Maps a gRPC failure: connection problems back off, anything else retries.
/// A failed Raft RPC to `target`: counted (`etcd_network_peer_sent_failures_total`), then
/// converted for openraft.
fn send_failed(target: NodeId, s: tonic::Status) -> RPCError<TypeConfig> {
    crate::metrics::peer_send_failed(target);
    status_err(s)
}

fn status_err(s: tonic::Status) -> RPCError<TypeConfig> {
    match s.code() {
        tonic::Code::Unavailable | tonic::Code::FailedPrecondition | tonic::Code::Unknown => {
            unreachable(s.message())
        }
        _ => RPCError::Network(network(s.message())),
    }
}

/// Creates a connection object per target; openraft keeps one per replication stream.
pub struct NetworkFactory {
    pub peers: Arc<Peers>,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &MemberNode) -> PeerConnection {
        PeerConnection {
            target,
            node: node.clone(),
            peers: self.peers.clone(),
        }
    }
}

/// The openraft network client for one peer.
pub struct PeerConnection {
    target: NodeId,
    node: MemberNode,
    peers: Arc<Peers>,
}

impl PeerConnection {
    fn client(&self) -> Result<RaftPeerClient<PeerChannel>, RPCError<TypeConfig>> {
        self.peers
            .client(self.target, &self.node)
            .map_err(unreachable)
    }

    fn bytes_request<T: serde::Serialize>(
        &self,
        msg: &T,
        timeout: Duration,
    ) -> Result<tonic::Request<RaftBytes>, RPCError<TypeConfig>> {
        let data = encode(msg).map_err(|e| RPCError::Network(network(e)))?;
        let mut req = self.peers.request(self.target, RaftBytes { data });
        req.set_timeout(timeout);
        Ok(req)
    }
}

fn decode_reply<T: serde::de::DeserializeOwned>(
    reply: tonic::Response<RaftBytes>,
) -> Result<T, RPCError<TypeConfig>> {
    decode(&reply.into_inner().data).map_err(|e| RPCError::Network(network(e)))
}

impl RaftNetworkV2<TypeConfig> for PeerConnection {
    type SnapshotData = SnapshotFile;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let req = self.bytes_request(&rpc, option.soft_ttl())?;
        decode_reply(
            self.client()?
                .append_entries(req)
                .await
                .map_err(|s| send_failed(self.target, s))?,
        )
    }

    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        _option: RPCOption,
    ) -> BoxFuture<
        's,
        Result<
            BoxStream<'s, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>,
            RPCError<TypeConfig>,
        >,
    >
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + OptionalSend + Unpin + 'static,
    {
        Box::pin(async move {
            let mut client = self.client()?;
            // openraft sends its heartbeats on a stream of their own, whose appends carry no
            // entries: a stream that fails before it carried an entry counts as a failed
            // heartbeat (`etcd_server_heartbeat_send_failures_total`).
            let carried_entries = Arc::new(AtomicBool::new(false));
            let carried = carried_entries.clone();
            // An entry that cannot be encoded ends the stream; openraft then retries.
            let requests = input.scan((), move |_, r| {
                if !r.entries.is_empty() {
                    carried.store(true, Ordering::Relaxed);
                }
                futures::future::ready(encode(&r).ok().map(|data| RaftBytes { data }))
            });
            let heartbeat_failed = move || {
                if !carried_entries.load(Ordering::Relaxed) {
                    crate::metrics::heartbeat_send_failed();
                }
            };
            let req = self.peers.request(self.target, requests);
            let replies = match client.stream_append(req).await {
                Ok(r) => r.into_inner(),
                Err(status) => {
                    // openraft applies its backoff only while it polls the request stream,
                    // which a refused connection never does: without this pause a dead peer
                    // makes the leader retry in a tight loop.
                    tokio::time::sleep(UNREACHABLE_BACKOFF).await;
                    heartbeat_failed();
                    return Err(send_failed(self.target, status));
                }
            };
            let target = self.target;
            let results = replies.map(move |item| {
                let bytes = item.map_err(|s| {
                    heartbeat_failed();
                    send_failed(target, s)
                })?;
                decode::<StreamAppendResult<TypeConfig>>(&bytes.data)
                    .map_err(|e| RPCError::Network(network(e)))
            });
            Ok(Box::pin(results) as BoxStream<'s, _>)
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let req = self.bytes_request(&rpc, option.soft_ttl())?;
        decode_reply(
            self.client()?
                .vote(req)
                .await
                .map_err(|s| send_failed(self.target, s))?,
        )
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let req = self.bytes_request(&rpc, option.soft_ttl())?;
        decode_reply(
            self.client()?
                .pre_vote(req)
                .await
                .map_err(|s| send_failed(self.target, s))?,
        )
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let mut client = self.client().map_err(|e| {
            StreamingError::Unreachable(Unreachable::new(&TransportError(e.to_string())))
        })?;
        let meta = encode(&(vote, snapshot.meta.clone()))
            .map_err(|e| StreamingError::Network(network(e)))?;
        // A pinned view is written to a file now (off the state machine's task); the file is
        // unlinked once open, so it disappears when the stream ends, however it ends.
        let saving = std::time::Instant::now();
        let written = snapshot
            .snapshot
            .into_file()
            .await
            .map_err(|e| StreamingError::Network(network(e)))?;
        crate::metrics::SNAPSHOT_SAVE.observe(saving.elapsed().as_secs_f64());
        let mut file = tokio::fs::File::open(written.path())
            .await
            .map_err(|e| StreamingError::Network(network(e)))?;
        drop(written);
        let (tx, rx) = tokio::sync::mpsc::channel::<SnapshotChunk>(4);
        let sender = async move {
            if tx
                .send(SnapshotChunk {
                    chunk: Some(snapshot_chunk::Chunk::Meta(meta)),
                })
                .await
                .is_err()
            {
                return;
            }
            loop {
                let mut buf = vec![0u8; SNAPSHOT_CHUNK];
                let n = match file.read(&mut buf).await {
                    Ok(0) | Err(_) => return, // an unreadable file ends the stream; the receiver rejects it
                    Ok(n) => n,
                };
                buf.truncate(n);
                if tx
                    .send(SnapshotChunk {
                        chunk: Some(snapshot_chunk::Chunk::Data(buf)),
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
        };
        tokio::spawn(sender);
        let req = self
            .peers
            .request(self.target, tokio_stream::wrappers::ReceiverStream::new(rx));
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            reply = client.install_snapshot(req) => {
                let reply = reply.map_err(|s| {
                    crate::metrics::peer_send_failed(self.target);
                    StreamingError::Unreachable(Unreachable::new(&TransportError(s.message().to_string())))
                })?;
                decode(&reply.into_inner().data).map_err(|e| StreamingError::Network(network(e)))
            }
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        let req = self.bytes_request(&req, option.soft_ttl())?;
        decode_reply(
            self.client()?
                .transfer_leader(req)
                .await
                .map_err(|s| send_failed(self.target, s))?,
        )
    }

    fn backoff(&self) -> Option<Backoff> {
        Some(Backoff::new(std::iter::repeat(UNREACHABLE_BACKOFF)))
    }
}

/// How often a member measures the round trip to each peer (etcd's prober interval).
const PROBE_INTERVAL: Duration = Duration::from_secs(4);
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Measures the round trip to every other member every `PROBE_INTERVAL` with a cheap
/// `Identify` call, as etcd's peer prober does (`etcd_network_peer_round_trip_time_seconds`);
/// a probe that fails counts as a send failure to that peer, so every member, not only the
/// leader, reports a peer it cannot reach.
pub fn spawn_prober(
    node: Arc<crate::node::KeelNode>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        // The first tick is at once: the first round's answers open proposal batching (see
        // `crate::proposals`), which waits until every member said it applies batches.
        let mut rounds = tokio::time::interval(PROBE_INTERVAL);
        // The peers of the last round, to forget those that left the membership.
        let mut probed: Vec<NodeId> = Vec::new();
        rounds.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = rounds.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let peers = node.other_members();
            let probes = peers.iter().map(|(id, member)| {
                let node = &node;
                async move {
                    let Ok(mut client) = node.peers.client(*id, member) else {
                        return None;
                    };
                    let mut req = node.peers.request(*id, MemberIdentity::default());
                    req.set_timeout(PROBE_TIMEOUT);
                    let started = std::time::Instant::now();
                    match tokio::time::timeout(PROBE_TIMEOUT, client.identify(req)).await {
                        Ok(Ok(reply)) => {
                            crate::metrics::peer_round_trip(*id, started.elapsed());
                            Some((*id, reply.into_inner().features))
                        }
                        _ => {
                            crate::metrics::peer_send_failed(*id);
                            None
                        }
                    }
                }
            });
            let answers: Vec<(NodeId, u64)> = futures::future::join_all(probes)
                .await
                .into_iter()
                .flatten()
                .collect();
            let members: Vec<NodeId> = peers.iter().map(|(id, _)| *id).collect();
            let me = node.member_id();
            for id in &members {
                let answered = answers.iter().any(|(a, _)| a == id);
                crate::peer_metrics::set_active(me, *id, answered);
            }
            for gone in probed.iter().filter(|id| !members.contains(id)) {
                crate::peer_metrics::forget_peer(me, *gone);
            }
            probed = members.clone();
            node.proposals.gate().update(&members, &answers);
        }
    });
}
