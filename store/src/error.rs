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
    // Auth (etcd's auth store errors, with the texts its gRPC layer sends).
    AuthNotEnabled = 20,
    RootUserNotExist = 21,
    RootRoleNotExist = 22,
    UserAlreadyExist = 23,
    UserEmpty = 24,
    UserNotFound = 25,
    RoleAlreadyExist = 26,
    RoleNotFound = 27,
    RoleEmpty = 28,
    AuthFailed = 29,
    PermissionNotGiven = 30,
    PermissionDenied = 31,
    RoleNotGranted = 32,
    PermissionNotGranted = 33,
    InvalidAuthToken = 34,
    InvalidAuthMgmt = 35,
    AuthOldRevision = 36,
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
            20 => Self::AuthNotEnabled,
            21 => Self::RootUserNotExist,
            22 => Self::RootRoleNotExist,
            23 => Self::UserAlreadyExist,
            24 => Self::UserEmpty,
            25 => Self::UserNotFound,
            26 => Self::RoleAlreadyExist,
            27 => Self::RoleNotFound,
            28 => Self::RoleEmpty,
            29 => Self::AuthFailed,
            30 => Self::PermissionNotGiven,
            31 => Self::PermissionDenied,
            32 => Self::RoleNotGranted,
            33 => Self::PermissionNotGranted,
            34 => Self::InvalidAuthToken,
            35 => Self::InvalidAuthMgmt,
            36 => Self::AuthOldRevision,
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
            Self::AuthNotEnabled => "etcdserver: authentication is not enabled",
            Self::RootUserNotExist => "etcdserver: root user does not exist",
            Self::RootRoleNotExist => "etcdserver: root user does not have root role",
            Self::UserAlreadyExist => "etcdserver: user name already exists",
            Self::UserEmpty => "etcdserver: user name is empty",
            Self::UserNotFound => "etcdserver: user name not found",
            Self::RoleAlreadyExist => "etcdserver: role name already exists",
            Self::RoleNotFound => "etcdserver: role name not found",
            Self::RoleEmpty => "etcdserver: role name is empty",
            Self::AuthFailed => "etcdserver: authentication failed, invalid user ID or password",
            Self::PermissionNotGiven => "etcdserver: permission not given",
            Self::PermissionDenied => "etcdserver: permission denied",
            Self::RoleNotGranted => "etcdserver: role is not granted to the user",
            Self::PermissionNotGranted => "etcdserver: permission is not granted to the role",
            Self::InvalidAuthToken => "etcdserver: invalid auth token",
            Self::InvalidAuthMgmt => "etcdserver: invalid auth management",
            Self::AuthOldRevision => "etcdserver: revision of auth store is old",
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
