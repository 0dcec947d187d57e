//! Every error a client can see, and the one table that maps it to a gRPC status with etcd's
//! code and message (clients such as etcdctl, Go clientv3 and Patroni match on the text).

use keel_store::{ApplyError, ApplyErrorKind};
use tonic::{Code, Status};

/// Errors of the server layer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServerError {
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    #[error("etcdserver: key not found")]
    KeyNotFound,
    #[error("etcdserver: value is provided")]
    ValueProvided,
    #[error("etcdserver: lease is provided")]
    LeaseProvided,
    #[error("etcdserver: too many operations in txn request")]
    TooManyOps,
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
    #[error("etcdserver: invalid sort option")]
    InvalidSortOption,
    #[error("etcdserver: request is too large")]
    RequestTooLarge,
    #[error("etcdserver: mvcc: required revision has been compacted")]
    Compacted,
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRevision,
    #[error("etcdserver: mvcc: database space exceeded")]
    NoSpace,
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    #[error("etcdserver: lease already exists")]
    LeaseExists,
    #[error("etcdserver: too large lease TTL")]
    LeaseTtlTooLarge,
    #[error("etcdserver: no leader")]
    NoLeader,
    #[error("etcdserver: leader changed")]
    LeaderChanged,
    #[error("etcdserver: request timed out")]
    Timeout,
    #[error("etcdserver: server stopped")]
    Stopped,
    #[error("etcdserver: not leader")]
    NotLeader,
    #[error("etcdserver: bad leader transferee")]
    BadLeaderTransferee,
    #[error("etcdserver: request timed out, leader transfer took too long")]
    LeaderTransferTimeout,
    #[error("etcdserver: corrupt cluster")]
    Corrupt,
    #[error("etcdserver: member ID already exist")]
    MemberExists,
    #[error("etcdserver: Peer URLs already exists")]
    PeerUrlExists,
    #[error("etcdserver: given member URLs are invalid")]
    MemberBadUrls,
    #[error("etcdserver: member not found")]
    MemberNotFound,
    #[error("etcdserver: can only promote a learner member")]
    MemberNotLearner,
    #[error("etcdserver: can only promote a learner member which is in sync with leader")]
    LearnerNotReady,
    #[error("etcdserver: too many learner members in cluster")]
    TooManyLearners,
    #[error("etcdserver: re-configuration failed due to not enough started members")]
    NotEnoughStartedMembers,
    /// Lock and election errors: etcd's `concurrency` package texts (code `Unknown`).
    #[error("election: not leader")]
    ElectionNotLeader,
    #[error("election: no leader")]
    ElectionNoLeader,
    #[error("\"leader\" field must be provided")]
    MissingLeaderKey,
    #[error("mutex: session is expired")]
    SessionExpired,
    #[error("lost watcher waiting for delete")]
    LostWatcher,
    /// Auth errors (etcd's rpctypes texts and codes).
    #[error("etcdserver: authentication is not enabled")]
    AuthNotEnabled,
    #[error("etcdserver: root user does not exist")]
    RootUserNotExist,
    #[error("etcdserver: root user does not have root role")]
    RootRoleNotExist,
    #[error("etcdserver: user name already exists")]
    UserAlreadyExist,
    #[error("etcdserver: user name is empty")]
    UserEmpty,
    #[error("etcdserver: user name not found")]
    UserNotFound,
    #[error("etcdserver: role name already exists")]
    RoleAlreadyExist,
    #[error("etcdserver: role name not found")]
    RoleNotFound,
    #[error("etcdserver: role name is empty")]
    RoleEmpty,
    #[error("etcdserver: authentication failed, invalid user ID or password")]
    AuthFailed,
    #[error("etcdserver: permission not given")]
    PermissionNotGiven,
    #[error("etcdserver: permission denied")]
    PermissionDenied,
    #[error("etcdserver: role is not granted to the user")]
    RoleNotGranted,
    #[error("etcdserver: permission is not granted to the role")]
    PermissionNotGranted,
    #[error("etcdserver: invalid auth token")]
    InvalidAuthToken,
    #[error("etcdserver: invalid auth management")]
    InvalidAuthMgmt,
    #[error("etcdserver: revision of auth store is old")]
    AuthOldRevision,
    #[error("etcdserver: {0}")]
    Internal(String),
    #[error("{0}")]
    Unimplemented(String),
}

impl ServerError {
    pub fn code(&self) -> Code {
        use ServerError::*;
        match self {
            EmptyKey | KeyNotFound | ValueProvided | LeaseProvided | TooManyOps | DuplicateKey
            | InvalidSortOption | RequestTooLarge => Code::InvalidArgument,
            Compacted | FutureRevision | LeaseTtlTooLarge => Code::OutOfRange,
            NoSpace => Code::ResourceExhausted,
            LeaseNotFound => Code::NotFound,
            Corrupt => Code::DataLoss,
            LeaseExists
            | NotLeader
            | BadLeaderTransferee
            | MemberExists
            | PeerUrlExists
            | MemberNotLearner
            | LearnerNotReady
            | TooManyLearners
            | NotEnoughStartedMembers => Code::FailedPrecondition,
            MemberBadUrls => Code::InvalidArgument,
            MemberNotFound => Code::NotFound,
            NoLeader | LeaderChanged | Timeout | Stopped | LeaderTransferTimeout => {
                Code::Unavailable
            }
            ElectionNotLeader | ElectionNoLeader | MissingLeaderKey | SessionExpired
            | LostWatcher => Code::Unknown,
            AuthNotEnabled | RootUserNotExist | RootRoleNotExist | UserAlreadyExist
            | UserNotFound | RoleAlreadyExist | RoleNotFound | RoleNotGranted
            | PermissionNotGranted => Code::FailedPrecondition,
            UserEmpty | RoleEmpty | AuthFailed | PermissionNotGiven | InvalidAuthMgmt
            | AuthOldRevision => Code::InvalidArgument,
            PermissionDenied => Code::PermissionDenied,
            InvalidAuthToken => Code::Unauthenticated,
            Internal(_) => Code::Internal,
            Unimplemented(_) => Code::Unimplemented,
        }
    }
}

impl From<ServerError> for Status {
    fn from(e: ServerError) -> Status {
        Status::new(e.code(), e.to_string())
    }
}

impl ServerError {
    /// The status a Lock or Election call fails with. etcd serves those services by running its
    /// Go client's `concurrency` recipes against itself, and that client turns every server
    /// error into a plain error: the caller sees etcd's message with code `Unknown`.
    pub fn into_recipe_status(self) -> Status {
        Status::new(Code::Unknown, self.to_string())
    }
}

impl ServerError {
    /// The status etcd 3.4/3.5's Maintenance service fails its admin checks with: the auth
    /// package's own error text and code `Unknown` (e.g. `auth: permission denied`).
    pub fn into_maintenance_status(self) -> Status {
        let text = match self {
            ServerError::PermissionDenied => "auth: permission denied",
            ServerError::UserEmpty => "auth: user name is empty",
            ServerError::UserNotFound => "auth: user not found",
            ServerError::InvalidAuthToken => "auth: invalid auth token",
            ServerError::AuthOldRevision => "auth: revision in header is old",
            other => return other.into(),
        };
        Status::new(Code::Unknown, text)
    }
}

impl From<ApplyError> for ServerError {
    fn from(e: ApplyError) -> ServerError {
        match e.kind {
            ApplyErrorKind::Compacted => ServerError::Compacted,
            ApplyErrorKind::FutureRevision => ServerError::FutureRevision,
            ApplyErrorKind::LeaseNotFound => ServerError::LeaseNotFound,
            ApplyErrorKind::LeaseExists => ServerError::LeaseExists,
            ApplyErrorKind::LeaseTtlTooLarge => ServerError::LeaseTtlTooLarge,
            ApplyErrorKind::NoSpace => ServerError::NoSpace,
            ApplyErrorKind::KeyNotFound => ServerError::KeyNotFound,
            ApplyErrorKind::Corrupt => ServerError::Corrupt,
            ApplyErrorKind::AuthNotEnabled => ServerError::AuthNotEnabled,
            ApplyErrorKind::RootUserNotExist => ServerError::RootUserNotExist,
            ApplyErrorKind::RootRoleNotExist => ServerError::RootRoleNotExist,
            ApplyErrorKind::UserAlreadyExist => ServerError::UserAlreadyExist,
            ApplyErrorKind::UserEmpty => ServerError::UserEmpty,
            ApplyErrorKind::UserNotFound => ServerError::UserNotFound,
            ApplyErrorKind::RoleAlreadyExist => ServerError::RoleAlreadyExist,
            ApplyErrorKind::RoleNotFound => ServerError::RoleNotFound,
            ApplyErrorKind::RoleEmpty => ServerError::RoleEmpty,
            ApplyErrorKind::AuthFailed => ServerError::AuthFailed,
            ApplyErrorKind::PermissionNotGiven => ServerError::PermissionNotGiven,
            ApplyErrorKind::PermissionDenied => ServerError::PermissionDenied,
            ApplyErrorKind::RoleNotGranted => ServerError::RoleNotGranted,
            ApplyErrorKind::PermissionNotGranted => ServerError::PermissionNotGranted,
            ApplyErrorKind::InvalidAuthToken => ServerError::InvalidAuthToken,
            ApplyErrorKind::InvalidAuthMgmt => ServerError::InvalidAuthMgmt,
            ApplyErrorKind::AuthOldRevision => ServerError::AuthOldRevision,
            ApplyErrorKind::Other => ServerError::Internal(e.message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_codes_and_messages() {
        let cases: &[(ServerError, Code, &str)] = &[
            (
                ServerError::EmptyKey,
                Code::InvalidArgument,
                "etcdserver: key is not provided",
            ),
            (
                ServerError::TooManyOps,
                Code::InvalidArgument,
                "etcdserver: too many operations in txn request",
            ),
            (
                ServerError::DuplicateKey,
                Code::InvalidArgument,
                "etcdserver: duplicate key given in txn request",
            ),
            (
                ServerError::Compacted,
                Code::OutOfRange,
                "etcdserver: mvcc: required revision has been compacted",
            ),
            (
                ServerError::FutureRevision,
                Code::OutOfRange,
                "etcdserver: mvcc: required revision is a future revision",
            ),
            (
                ServerError::LeaseNotFound,
                Code::NotFound,
                "etcdserver: requested lease not found",
            ),
            (
                ServerError::NoLeader,
                Code::Unavailable,
                "etcdserver: no leader",
            ),
            (
                ServerError::RequestTooLarge,
                Code::InvalidArgument,
                "etcdserver: request is too large",
            ),
        ];
        for (err, code, msg) in cases {
            let status: Status = err.clone().into();
            assert_eq!(status.code(), *code, "{err:?}");
            assert_eq!(status.message(), *msg);
        }
        let recipe = ServerError::LeaseNotFound.into_recipe_status();
        assert_eq!(recipe.code(), Code::Unknown);
        assert_eq!(recipe.message(), "etcdserver: requested lease not found");
        let status: Status = ServerError::ElectionNotLeader.into();
        assert_eq!(status.code(), Code::Unknown);
        assert_eq!(status.message(), "election: not leader");
        assert_eq!(
            ServerError::MissingLeaderKey.to_string(),
            r#""leader" field must be provided"#
        );
        let from_store: Status =
            ServerError::from(ApplyError::new(ApplyErrorKind::Compacted)).into();
        assert_eq!(
            from_store.message(),
            "etcdserver: mvcc: required revision has been compacted"
        );
    }
}
