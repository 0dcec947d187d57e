//! The member-to-member gRPC service: Raft RPCs, snapshot installation, request forwarding and
//! read-index requests from followers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;
use keel_proto::keelpb::raft_peer_server::RaftPeer;
use keel_proto::keelpb::{
    ForwardEnvelope, ForwardReply, ForwardRequest, ForwardResponse, LeaseAnswer, LeaseQuery,
    MemberChangeRequest, MemberChangeResponse, MemberIdentity, RaftBytes, ReadIndexRequest,
    ReadIndexResponse, SnapshotChunk, snapshot_chunk,
};
use keel_store::mvcc::HashKvFormat;
use keel_store::raft::TypeConfig;
use keel_store::raft::snapshot::SnapshotFile;
use keel_store::raft::types::{Snapshot, SnapshotMeta, Vote, decode, encode};
use openraft::raft::{AppendEntriesRequest, TransferLeaderRequest, VoteRequest};
use tokio::io::AsyncWriteExt;
use tonic::{Request, Response, Status, Streaming};

use crate::network::{META_CLUSTER, META_TARGET};
use crate::node::KeelNode;

/// Largest snapshot accepted from a peer (the stream is written to disk, not memory).
const MAX_SNAPSHOT_BYTES: u64 = 64 << 30;

pub struct PeerService {
    node: Arc<KeelNode>,
    lessor: Arc<crate::lease::Lessor>,
    incoming_seq: AtomicU64,
}

impl PeerService {
    pub fn new(node: Arc<KeelNode>, lessor: Arc<crate::lease::Lessor>) -> Self {
        Self {
            node,
            lessor,
            incoming_seq: AtomicU64::new(0),
        }
    }

    /// Refuses requests addressed to another member or cluster.
    fn check_target<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let md = req.metadata();
        let target = md
            .get(META_TARGET)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let cluster = md
            .get(META_CLUSTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if target.is_some_and(|t| t != self.node.member_id()) {
            return Err(Status::failed_precondition(format!(
                "this is member {:x}, not {:x}",
                self.node.member_id(),
                target.unwrap_or(0)
            )));
        }
        if cluster.is_some_and(|c| c != self.node.identity.cluster_id) {
            return Err(Status::failed_precondition(
                "etcdserver: cluster ID mismatch",
            ));
        }
        Ok(())
    }
}

fn bad(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(e.to_string())
}

fn reply<T: serde::Serialize>(v: &T) -> Result<Response<RaftBytes>, Status> {
    Ok(Response::new(RaftBytes {
        data: encode(v).map_err(|e| Status::internal(e.to_string()))?,
    }))
}

fn fatal(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("raft stopped: {e}"))
}

type BytesStream = crate::node::ResponseStream<RaftBytes>;

#[tonic::async_trait]
impl RaftPeer for PeerService {
    async fn vote(&self, req: Request<RaftBytes>) -> Result<Response<RaftBytes>, Status> {
        self.check_target(&req)?;
        let rpc: VoteRequest<TypeConfig> = decode(&req.into_inner().data).map_err(bad)?;
        reply(&self.node.raft.vote(rpc).await.map_err(fatal)?)
    }

    async fn pre_vote(&self, req: Request<RaftBytes>) -> Result<Response<RaftBytes>, Status> {
        self.check_target(&req)?;
        let rpc: VoteRequest<TypeConfig> = decode(&req.into_inner().data).map_err(bad)?;
        reply(&self.node.raft.pre_vote(rpc).await.map_err(fatal)?)
    }

    async fn append_entries(&self, req: Request<RaftBytes>) -> Result<Response<RaftBytes>, Status> {
        self.check_target(&req)?;
        let rpc: AppendEntriesRequest<TypeConfig> = decode(&req.into_inner().data).map_err(bad)?;
        reply(&self.node.raft.append_entries(rpc).await.map_err(fatal)?)
    }

    type StreamAppendStream = BytesStream;

    async fn stream_append(
        &self,
        req: Request<Streaming<RaftBytes>>,
    ) -> Result<Response<Self::StreamAppendStream>, Status> {
        self.check_target(&req)?;
        let input = req.into_inner().scan((), |_, item| {
            futures::future::ready(
                item.ok()
                    .and_then(|b| decode::<AppendEntriesRequest<TypeConfig>>(&b.data).ok()),
            )
        });
        let output = self
            .node
            .raft
            .stream_append(input)
            .map(|result| match result {
                Ok(r) => encode(&r)
                    .map(|data| RaftBytes { data })
                    .map_err(|e| Status::internal(e.to_string())),
                Err(e) => Err(fatal(e)),
            });
        Ok(Response::new(self.node.until_stopping(Box::pin(output))))
    }

    async fn install_snapshot(
        &self,
        req: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<RaftBytes>, Status> {
        self.check_target(&req)?;
        let mut stream = req.into_inner();
        let first = stream
            .next()
            .await
            .ok_or_else(|| bad("empty snapshot stream"))??;
        let (vote, meta): (Vote, SnapshotMeta) = match first.chunk {
            Some(snapshot_chunk::Chunk::Meta(m)) => decode(&m).map_err(bad)?,
            _ => return Err(bad("snapshot stream must start with its meta")),
        };
        let seq = self.incoming_seq.fetch_add(1, Ordering::Relaxed);
        tokio::fs::create_dir_all(&self.node.snapshot_dir)
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let path = self
            .node
            .snapshot_dir
            .join(format!("incoming-{}-{seq}.tmp", std::process::id()));
        let receiving = std::time::Instant::now();
        let result = async {
            let mut file = tokio::fs::File::create(&path)
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
            let mut total: u64 = 0;
            while let Some(chunk) = stream.next().await {
                match chunk?.chunk {
                    Some(snapshot_chunk::Chunk::Data(d)) => {
                        total += d.len() as u64;
                        if total > MAX_SNAPSHOT_BYTES {
                            return Err(Status::resource_exhausted("snapshot too large"));
                        }
                        file.write_all(&d)
                            .await
                            .map_err(|e| Status::internal(e.to_string()))?;
                    }
                    _ => return Err(bad("unexpected snapshot chunk")),
                }
            }
            let syncing = std::time::Instant::now();
            file.sync_all()
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
            crate::metrics::SNAPSHOT_DB_FSYNC.observe(syncing.elapsed().as_secs_f64());
            crate::metrics::SNAPSHOT_DB_SAVE.observe(receiving.elapsed().as_secs_f64());
            let snapshot = Snapshot {
                meta,
                snapshot: SnapshotFile::from_path(path.clone()),
            };
            let resp = self
                .node
                .raft
                .install_full_snapshot(vote, snapshot)
                .await
                .map_err(fatal)?;
            reply(&resp)
        }
        .await;
        // Installing moves the file away; one that was not installed (refused, or older than
        // what this member has) is removed here.
        let _ = tokio::fs::remove_file(&path).await;
        result
    }

    async fn transfer_leader(
        &self,
        req: Request<RaftBytes>,
    ) -> Result<Response<RaftBytes>, Status> {
        self.check_target(&req)?;
        let rpc: TransferLeaderRequest<TypeConfig> = decode(&req.into_inner().data).map_err(bad)?;
        reply(
            &self
                .node
                .raft
                .handle_transfer_leader(rpc)
                .await
                .map_err(fatal)?,
        )
    }

    async fn forward(
        &self,
        req: Request<ForwardRequest>,
    ) -> Result<Response<ForwardResponse>, Status> {
        self.check_target(&req)?;
        let request = req
            .into_inner()
            .request
            .ok_or_else(|| bad("forward without a request"))?;
        let response = propose_forwarded(&self.node, request).await?;
        Ok(Response::new(ForwardResponse {
            response: Some(response),
        }))
    }

    type ForwardStreamStream = crate::node::ResponseStream<ForwardReply>;

    async fn forward_stream(
        &self,
        req: Request<Streaming<ForwardEnvelope>>,
    ) -> Result<Response<Self::ForwardStreamStream>, Status> {
        self.check_target(&req)?;
        let mut inbound = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<ForwardReply, Status>>();
        let (node, lessor) = (self.node.clone(), self.lessor.clone());
        // Every envelope is handled concurrently; its reply goes out when its proposal (or
        // keep-alive) completes. The stream ends when the follower closes its side and every
        // reply is sent.
        tokio::spawn(async move {
            while let Some(Ok(envelope)) = inbound.next().await {
                let (node, lessor, tx) = (node.clone(), lessor.clone(), tx.clone());
                tokio::spawn(async move {
                    let id = envelope.id;
                    let result = match (envelope.request, envelope.lease_renew) {
                        // The follower answers this write from its own apply: only a failure
                        // is replied (see crate::forwarding).
                        (Some(request), _) if envelope.answered_on_apply => {
                            match propose_forwarded(&node, request).await {
                                Ok(_) => return,
                                Err(status) => Err(status),
                            }
                        }
                        (Some(request), _) => {
                            propose_forwarded(&node, request)
                                .await
                                .map(|response| ForwardReply {
                                    id,
                                    response: Some(response),
                                    ..Default::default()
                                })
                        }
                        (None, lease) if lease != 0 => lessor
                            .renew_confirmed(lease)
                            .await
                            .map(|ttl| ForwardReply {
                                id,
                                ttl,
                                ..Default::default()
                            })
                            .map_err(Status::from),
                        (None, _) => Err(bad(crate::forwarding::NOT_A_REQUEST)),
                    };
                    let reply = result.unwrap_or_else(|status| ForwardReply {
                        id,
                        code: status.code() as i32,
                        message: status.message().to_string(),
                        ..Default::default()
                    });
                    let _ = tx.send(Ok(reply));
                });
            }
        });
        Ok(Response::new(self.node.until_stopping(Box::pin(
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
        ))))
    }

    async fn read_index(
        &self,
        req: Request<ReadIndexRequest>,
    ) -> Result<Response<ReadIndexResponse>, Status> {
        self.check_target(&req)?;
        let index = self.node.read_index_local().await?;
        Ok(Response::new(ReadIndexResponse {
            data: index.to_be_bytes().to_vec(),
        }))
    }

    async fn lease_renew(&self, req: Request<LeaseQuery>) -> Result<Response<LeaseAnswer>, Status> {
        self.check_target(&req)?;
        let ttl = self.lessor.renew_confirmed(req.into_inner().id).await?;
        Ok(Response::new(LeaseAnswer { ttl }))
    }

    async fn lease_remaining(
        &self,
        req: Request<LeaseQuery>,
    ) -> Result<Response<LeaseAnswer>, Status> {
        self.check_target(&req)?;
        let ttl = self.lessor.remaining_local(req.into_inner().id)?;
        Ok(Response::new(LeaseAnswer { ttl }))
    }

    async fn member_change(
        &self,
        req: Request<MemberChangeRequest>,
    ) -> Result<Response<MemberChangeResponse>, Status> {
        self.check_target(&req)?;
        Ok(Response::new(
            crate::cluster::execute(&self.node, req.into_inner()).await?,
        ))
    }

    async fn hash_kv(
        &self,
        req: Request<keel_proto::etcdserverpb::HashKvRequest>,
    ) -> Result<Response<keel_proto::etcdserverpb::HashKvResponse>, Status> {
        self.check_target(&req)?;
        let revision = req.into_inner().revision;
        // The leader asks at a revision it has applied; give this member a moment to get there.
        let mut applied = self.node.applied.clone();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            applied.wait_for(|a| a.revision >= revision),
        )
        .await;
        let node = self.node.clone();
        let resp = tokio::task::spawn_blocking(move || {
            crate::maintenance::hash_kv(&node, revision, HashKvFormat::Internal)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(resp))
    }

    async fn identify(
        &self,
        req: Request<MemberIdentity>,
    ) -> Result<Response<MemberIdentity>, Status> {
        let caller = req.into_inner();
        let members = if caller.want_members {
            crate::cluster::member_list(&self.node)
                .into_iter()
                .map(|m| keel_proto::keelpb::PeerMember {
                    id: m.id,
                    peer_urls: m.peer_ur_ls,
                })
                .collect()
        } else {
            Vec::new()
        };
        Ok(Response::new(MemberIdentity {
            member_id: self.node.member_id(),
            cluster_id: self.node.identity.cluster_id,
            name: self.node.identity.name.clone(),
            membership_index: 0,
            removed: caller.member_id != 0
                && crate::cluster::was_removed(
                    &self.node,
                    caller.member_id,
                    caller.membership_index,
                ),
            want_members: false,
            members,
            features: self.node.proposals.gate().own_features(),
        }))
    }
}

/// Proposes a write a follower forwarded. Never forwarded again (so requests cannot loop) and
/// bounded by the request timeout, so every forwarded write gets an answer; a member that is no
/// longer leader answers "leader changed".
async fn propose_forwarded(
    node: &KeelNode,
    request: keel_proto::keelpb::RaftRequest,
) -> Result<keel_proto::keelpb::RaftResponse, Status> {
    use crate::error::ServerError;
    node.write_here(request).await.map_err(|e| match e {
        ServerError::NotLeader => ServerError::LeaderChanged.into(),
        e => e.into(),
    })
}
