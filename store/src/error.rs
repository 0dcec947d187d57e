//! Errors of the store layer.
//!
//! [`StoreError`] is a failure of the store itself (I/O, corruption) and stops the node.
//! [`ApplyError`] is a request-level failure (compacted revision, missing lease, ...): it is data
//! in the response and every member computes the same one.

use crate::engine::EngineError;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("corrupt data in table {table}: {detail}")]
    Corrupt { table: &'static str, detail: String },
}

/// Kinds of request-level failures. The numeric values travel in `keelpb::ApplyError.kind`
/// through the Raft log, so never renumber them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ApplyErrorKind {
    Compacted = 1,
    FutureRevision = 2,
    LeaseNotFound = 3,
    LeaseExists = 4,
    LeaseTtlTooLarge = 5,
    NoSpace = 6,
    KeyNotFound = 7,
    /// A CORRUPT alarm is raised: writes are refused.
    Corrupt = 8,
    /// Anything else; the message says what.
    Other = 99,
}

impl ApplyErrorKind {
    pub fn from_u32(v: u32) -> Self {
        match v {
            1 => Self::Compacted,
            2 => Self::FutureRevision,
            3 => Self::LeaseNotFound,
            4 => Self::LeaseExists,
            5 => Self::LeaseTtlTooLarge,
            6 => Self::NoSpace,
            7 => Self::KeyNotFound,
            8 => Self::Corrupt,
            _ => Self::Other,
        }
    }

    /// etcd's message for this failure.
    pub fn etcd_message(self) -> &'static str {
        match self {
            Self::Compacted => "mvcc: required revision has been compacted",
            Self::FutureRevision => "mvcc: required revision is a future revision",
            Self::LeaseNotFound => "etcdserver: requested lease not found",
            Self::LeaseExists => "etcdserver: lease already exists",
            Self::LeaseTtlTooLarge => "etcdserver: too large lease TTL",
            Self::NoSpace => "etcdserver: mvcc: database space exceeded",
            Self::KeyNotFound => "etcdserver: key not found",
            Self::Corrupt => "etcdserver: corrupt cluster",
            Self::Other => "etcdserver: internal error",
        }
    }
}

/// A request-level failure: returned to the client, never stops the node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApplyError {
    pub kind: ApplyErrorKind,
    pub message: String,
}

impl ApplyError {
    pub fn new(kind: ApplyErrorKind) -> Self {
        Self {
            kind,
            message: kind.etcd_message().to_string(),
        }
    }
    pub fn to_proto(&self) -> keel_proto::keelpb::ApplyError {
        keel_proto::keelpb::ApplyError {
            kind: self.kind as u32,
            message: self.message.clone(),
        }
    }
    pub fn from_proto(e: &keel_proto::keelpb::ApplyError) -> Self {
        Self {
            kind: ApplyErrorKind::from_u32(e.kind),
            message: e.message.clone(),
        }
    }
}
