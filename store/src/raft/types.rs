//! The openraft type configuration and the values that travel through the Raft log.

use std::fmt;
use std::sync::{Arc, OnceLock};

use keel_proto::keelpb::{RaftRequest, RaftResponse};
use prost::Message;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Member IDs are etcd-style 64-bit IDs.
pub type NodeId = u64;

/// What the membership configuration records about each member.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberNode {
    pub name: String,
    /// URLs other members use to reach this one (Raft RPCs, forwarding).
    pub peer_urls: Vec<String>,
    /// URLs clients use; filled in by the member itself once it has started.
    pub client_urls: Vec<String>,
    /// Added as a voter with `MemberAdd`: Keel first replicates to it as a learner and the
    /// leader promotes it once it has caught up (so adding a member never stalls the cluster).
    pub promote: bool,
}

impl fmt::Display for MemberNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.peer_urls.join(","))
    }
}

/// One command in the Raft log: a protobuf `keelpb.RaftRequest`, shared (openraft clones an
/// entry for every follower it replicates to and for the apply, and those clones only count a
/// reference), with its protobuf encoding made at most once.
///
/// An entry is encoded for the log store and again for every follower it is sent to (bincode
/// asks for it twice each time: once to size the buffer, once to write it); all of those copy
/// the one encoding. A command received from the leader keeps the bytes it arrived as, so a
/// follower writes them to its log without encoding the request again.
#[derive(Clone, Default)]
pub struct Command(Arc<SharedCommand>);

#[derive(Default)]
struct SharedCommand {
    request: RaftRequest,
    encoded: OnceLock<Vec<u8>>,
}

impl Command {
    pub fn new(request: RaftRequest) -> Self {
        Command(Arc::new(SharedCommand {
            request,
            encoded: OnceLock::new(),
        }))
    }

    pub fn request(&self) -> &RaftRequest {
        &self.0.request
    }

    /// The request back (a copy only while another clone of the command lives).
    pub fn into_request(self) -> RaftRequest {
        match Arc::try_unwrap(self.0) {
            Ok(shared) => shared.request,
            Err(shared) => shared.request.clone(),
        }
    }

    /// The request's protobuf encoding, made on first use.
    pub fn encoded(&self) -> &[u8] {
        self.0
            .encoded
            .get_or_init(|| self.0.request.encode_to_vec())
    }
}

impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Command").field(&self.0.request).finish()
    }
}

impl PartialEq for Command {
    fn eq(&self, other: &Self) -> bool {
        self.0.request == other.0.request
    }
}

impl Serialize for Command {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.encoded())
    }
}

impl<'de> Deserialize<'de> for Command {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let bytes: serde_bytes_buf::ByteBuf = Deserialize::deserialize(deserializer)?;
        let request = RaftRequest::decode(bytes.0.as_slice()).map_err(serde::de::Error::custom)?;
        Ok(Command(Arc::new(SharedCommand {
            request,
            encoded: OnceLock::from(bytes.0),
        })))
    }
}

/// The result of applying one [`Command`]: a protobuf `keelpb.RaftResponse`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CommandResult(pub RaftResponse);

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use keel_proto::keelpb::raft_request::Request;
        let kind = match &self.0.request.request {
            Some(Request::Put(_)) => "put",
            Some(Request::DeleteRange(_)) => "delete_range",
            Some(Request::Txn(_)) => "txn",
            Some(Request::Compaction(_)) => "compaction",
            Some(Request::LeaseGrant(_)) => "lease_grant",
            Some(Request::LeaseRevoke(_)) => "lease_revoke",
            Some(Request::LeaseCheckpoint(_)) => "lease_checkpoint",
            Some(Request::Alarm(_)) => "alarm",
            Some(Request::Authorized(_)) => "authorized",
            // Auth store changes (never shown: they may carry password hashes).
            Some(_) => "auth",
            None => "empty",
        };
        write!(f, "Command({kind})")
    }
}

// Both travel as their protobuf encoding inside openraft's serde-encoded messages.
impl Serialize for CommandResult {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0.encode_to_vec())
    }
}

impl<'de> Deserialize<'de> for CommandResult {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let bytes: serde_bytes_buf::ByteBuf = Deserialize::deserialize(deserializer)?;
        RaftResponse::decode(bytes.0.as_slice())
            .map(CommandResult)
            .map_err(serde::de::Error::custom)
    }
}

mod serde_bytes_buf {
    use serde::de::{Deserialize, Deserializer, Error, SeqAccess, Visitor};
    use std::fmt;

    /// A byte buffer that deserializes from either bytes or a sequence of u8.
    pub struct ByteBuf(pub Vec<u8>);

    impl<'de> Deserialize<'de> for ByteBuf {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = ByteBuf;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("bytes")
                }
                fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<ByteBuf, E> {
                    Ok(ByteBuf(v.to_vec()))
                }
                fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<ByteBuf, E> {
                    Ok(ByteBuf(v))
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ByteBuf, A::Error> {
                    let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0));
                    while let Some(b) = seq.next_element::<u8>()? {
                        out.push(b);
                    }
                    Ok(ByteBuf(out))
                }
            }
            d.deserialize_byte_buf(V)
        }
    }
}

openraft::declare_raft_types!(
    /// Keel's openraft configuration: standard Raft leader ids (one leader per term, as etcd).
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = NodeId,
        Node = MemberNode,
        LeaderId = openraft::impls::leader_id_std::LeaderId<u64, NodeId>,
);

/// Shorthands for openraft types under [`TypeConfig`].
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
pub type Snapshot = openraft::alias::SnapshotOf<TypeConfig, crate::raft::snapshot::SnapshotFile>;

/// Encodes an openraft value for storage or the wire.
pub fn encode<T: Serialize>(value: &T) -> std::io::Result<Vec<u8>> {
    bincode::serialize(value).map_err(std::io::Error::other)
}

/// Decodes what [`encode`] produced.
pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> std::io::Result<T> {
    bincode::deserialize(bytes).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}
