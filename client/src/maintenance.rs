//! Cluster and maintenance calls: member list, endpoint status, snapshot.

use futures::{Stream, StreamExt};
use keel_proto::etcdserverpb::{
    self as pb, cluster_client::ClusterClient, maintenance_client::MaintenanceClient,
};
use serde::Serialize;

use crate::client::{Client, Kind, MAX_MESSAGE};
use crate::error::{Error, Result};
use crate::kv::Header;

/// A cluster member.
#[derive(Debug, Clone, Serialize)]
pub struct Member {
    /// Member ID.
    pub id: u64,
    /// Name (empty until the member started).
    pub name: String,
    /// Peer URLs.
    pub peer_urls: Vec<String>,
    /// Client URLs.
    pub client_urls: Vec<String>,
    /// A learner (non-voting) member.
    pub is_learner: bool,
}

/// One member's status (`etcdctl endpoint status`).
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Header (`member_id` is the answering member).
    pub header: Header,
    /// Server version (etcd's numbering).
    pub version: String,
    /// Database size, bytes.
    pub db_size: i64,
    /// Database bytes in use.
    pub db_size_in_use: i64,
    /// The leader's member ID (0: none).
    pub leader: u64,
    /// Raft index.
    pub raft_index: u64,
    /// Raft term.
    pub raft_term: u64,
    /// Applied index.
    pub raft_applied_index: u64,
    /// Problems the member reports.
    pub errors: Vec<String>,
    /// A learner.
    pub is_learner: bool,
}

/// A piece of a snapshot.
#[derive(Debug, Clone)]
pub struct SnapshotChunk {
    /// Bytes still to come after this chunk.
    pub remaining_bytes: u64,
    /// The data.
    pub blob: Vec<u8>,
}

impl Client {
    /// The cluster's members.
    pub async fn member_list(&self) -> Result<Vec<Member>> {
        let c = self.clone();
        let r = self
            .call(Kind::Read, move |ch| {
                let req = c.request(pb::MemberListRequest { linearizable: true }, true);
                async move {
                    ClusterClient::new(ch)
                        .max_decoding_message_size(MAX_MESSAGE)
                        .member_list(req)
                        .await
                }
            })
            .await?;
        Ok(r.members
            .into_iter()
            .map(|m| Member {
                id: m.id,
                name: m.name,
                peer_urls: m.peer_ur_ls,
                client_urls: m.client_ur_ls,
                is_learner: m.is_learner,
            })
            .collect())
    }

    /// Status of the member this client talks to (use [`Client::pinned`] to pick one).
    pub async fn status(&self) -> Result<Status> {
        let c = self.clone();
        let r = self
            .call(Kind::Read, move |ch| {
                let req = c.request(pb::StatusRequest {}, true);
                async move {
                    MaintenanceClient::new(ch)
                        .max_decoding_message_size(MAX_MESSAGE)
                        .status(req)
                        .await
                }
            })
            .await?;
        Ok(Status {
            header: r.header.into(),
            version: r.version,
            db_size: r.db_size,
            db_size_in_use: r.db_size_in_use,
            leader: r.leader,
            raft_index: r.raft_index,
            raft_term: r.raft_term,
            raft_applied_index: r.raft_applied_index,
            errors: r.errors,
            is_learner: r.is_learner,
        })
    }

    /// Streams a backup of the member's database ([`Error::Unimplemented`] if the server has
    /// no Snapshot RPC). Opening the stream is retried; a stream that breaks is not resumed.
    pub async fn snapshot(
        &self,
    ) -> Result<impl Stream<Item = Result<SnapshotChunk>> + Send + 'static> {
        let c = self.clone();
        let s = self
            .call_blocking(Kind::Read, move |ch| {
                let req = c.request(pb::SnapshotRequest {}, false);
                async move {
                    MaintenanceClient::new(ch)
                        .max_decoding_message_size(MAX_MESSAGE)
                        .snapshot(req)
                        .await
                }
            })
            .await?;
        Ok(s.map(|r| match r {
            Ok(r) => Ok(SnapshotChunk {
                remaining_bytes: r.remaining_bytes,
                blob: r.blob,
            }),
            Err(s) => Err(Error::from_status(&s)),
        }))
    }
}
