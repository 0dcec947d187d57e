//! Typed errors, decoded from the gRPC status code and etcd's message text (etcd clients match on
//! the text; Keel sends etcd's texts verbatim).

use std::error::Error as StdError;

use tonic::{Code, Status};

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything a Keel (or etcd) call can fail with.
///
/// Reads are retried on transient failures before you see an error; writes are not, and a write
/// whose outcome is unknown fails with [`Error::Ambiguous`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A write (Put, DeleteRange, Txn with writes, lease grant/revoke, lock, campaign, ...) was
    /// sent but no answer came back (connection lost, leader changed, timed out). It **may or
    /// may not have been applied**: read back (e.g. compare the key's mod revision) before
    /// deciding to try again.
    #[error("outcome unknown, the request may have been applied: {cause}")]
    Ambiguous {
        /// What went wrong while waiting for the answer.
        cause: Box<Error>,
    },
    /// The requested revision has been compacted away. `compact_revision` is known for watches
    /// (0 when the server did not say, as for ranges).
    #[error(
        "etcdserver: mvcc: required revision has been compacted{}",
        at_revision(*.compact_revision)
    )]
    Compacted {
        /// The oldest revision still available minus one, when known.
        compact_revision: i64,
    },
    /// The requested revision is newer than the store's.
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRevision,
    /// The lease does not exist (never granted, revoked or expired).
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    /// A lease with the requested ID already exists.
    #[error("etcdserver: lease already exists")]
    LeaseExists,
    /// The lease expired while a keep-alive was running.
    #[error("lease {0:x} expired")]
    LeaseExpired(i64),
    /// The server has no Raft leader right now (after retries for reads).
    #[error("etcdserver: no leader")]
    NoLeader,
    /// The server timed out (or this client's per-request timeout expired).
    #[error("request timed out: {0}")]
    Timeout(String),
    /// No endpoint could be reached (after retries).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The caller lacks the permission (auth enabled).
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// Authentication failed or the token was refused.
    #[error("authentication failed: {0}")]
    Unauthenticated(String),
    /// The database reached its space quota.
    #[error("etcdserver: mvcc: database space exceeded")]
    NoSpace,
    /// The request is invalid (empty key, too many txn ops, duplicate key in txn, too large, ...);
    /// the text is etcd's.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The lock's or campaign's lease expired while waiting (`mutex: session is expired`).
    #[error("session expired: {0}")]
    SessionExpired(String),
    /// Election: the caller is not (or no longer) the leader (`election: not leader`).
    #[error("election: not leader")]
    NotElectionLeader,
    /// Election: nobody leads this election (`election: no leader`).
    #[error("election: no leader")]
    NoElectionLeader,
    /// The server does not implement this RPC.
    #[error("unimplemented: {0}")]
    Unimplemented(String),
    /// A watch was cancelled by the server.
    #[error("watch canceled: {0}")]
    WatchCanceled(String),
    /// A precondition failed (membership changes, `etcdserver: not leader`, ...).
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// Not found (members, ...).
    #[error("not found: {0}")]
    NotFound(String),
    /// The request was cancelled locally (the client or a handle was dropped).
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// An endpoint string could not be parsed, or other bad configuration.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Any other gRPC status.
    #[error("grpc status {code:?}: {message}")]
    Grpc {
        /// The gRPC code.
        code: Code,
        /// The message.
        message: String,
    },
}

fn at_revision(rev: i64) -> String {
    if rev > 0 {
        format!(" (compacted at {rev})")
    } else {
        String::new()
    }
}

/// How a failed attempt may be handled by the retry loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The request never left this process (connection could not be established): always safe
    /// to retry, on another endpoint.
    NotSent,
    /// The endpoint is unhealthy (no leader, stopped, connection lost mid-request, timeout):
    /// reads retry elsewhere; writes are ambiguous.
    Transient,
    /// The token was refused: re-authenticate and retry (the request was rejected).
    BadToken,
    /// A definite answer from the server.
    Final,
}

impl Error {
    /// Decodes a status as the server sent it (etcd's code and message).
    pub fn from_status(status: &Status) -> Error {
        let msg = status.message();
        let mut m = msg;
        while let Some(rest) = m.strip_prefix("etcdserver: ") {
            m = rest;
        }
        match m {
            "mvcc: required revision has been compacted" => {
                return Error::Compacted {
                    compact_revision: 0,
                };
            }
            "mvcc: required revision is a future revision" => return Error::FutureRevision,
            "requested lease not found" => return Error::LeaseNotFound,
            "lease already exists" => return Error::LeaseExists,
            "no leader" => return Error::NoLeader,
            "request timed out"
            | "request timed out, possibly due to previous leader failure"
            | "request timed out, possibly due to connection lost"
            | "request timed out, waiting for the applied index took too long" => {
                return Error::Timeout(msg.to_string());
            }
            "leader changed" | "server stopped" | "not capable" | "not leader" => {
                return Error::Unavailable(msg.to_string());
            }
            "mvcc: database space exceeded" => return Error::NoSpace,
            "permission denied" => return Error::PermissionDenied(msg.to_string()),
            "invalid auth token"
            | "authentication failed, invalid user ID or password"
            | "user name is empty"
            | "authentication is not enabled"
            | "user name not found" => return Error::Unauthenticated(msg.to_string()),
            "election: not leader" => return Error::NotElectionLeader,
            "election: no leader" => return Error::NoElectionLeader,
            "mutex: session is expired" | "session expired" => {
                return Error::SessionExpired(msg.to_string());
            }
            _ => {}
        }
        match status.code() {
            Code::InvalidArgument | Code::OutOfRange => Error::InvalidArgument(msg.to_string()),
            Code::PermissionDenied => Error::PermissionDenied(msg.to_string()),
            Code::Unauthenticated => Error::Unauthenticated(msg.to_string()),
            Code::Unavailable => Error::Unavailable(msg.to_string()),
            Code::DeadlineExceeded => Error::Timeout(msg.to_string()),
            Code::Unimplemented => Error::Unimplemented(msg.to_string()),
            Code::FailedPrecondition => Error::FailedPrecondition(msg.to_string()),
            Code::NotFound => Error::NotFound(msg.to_string()),
            Code::ResourceExhausted if m.contains("space exceeded") => Error::NoSpace,
            Code::Cancelled => Error::Cancelled(msg.to_string()),
            code => Error::Grpc {
                code,
                message: msg.to_string(),
            },
        }
    }

    /// True when the request was certainly not applied by the server: `Ambiguous` is the only
    /// error after which a write may have happened.
    pub fn is_ambiguous(&self) -> bool {
        matches!(self, Error::Ambiguous { .. })
    }

    /// True for failures that may go away by themselves (no leader, unavailable, timeout,
    /// ambiguous): worth retrying later, after checking state for writes.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Ambiguous { .. }
            | Error::NoLeader
            | Error::Timeout(_)
            | Error::Unavailable(_) => true,
            Error::Grpc { code, .. } => matches!(code, Code::Unknown | Code::Aborted),
            _ => false,
        }
    }

    pub(crate) fn ambiguous(cause: Error) -> Error {
        match cause {
            e @ Error::Ambiguous { .. } => e,
            cause => Error::Ambiguous {
                cause: Box::new(cause),
            },
        }
    }
}

/// True when the status was produced by this process's transport (it carries a source error):
/// statuses sent by a server have none.
fn is_local(status: &Status) -> bool {
    status.source().is_some()
}

/// True when the connection could not be established, so the request was never sent.
fn is_connect_error(status: &Status) -> bool {
    let mut cur: Option<&(dyn StdError + 'static)> = status.source();
    while let Some(e) = cur {
        if e.downcast_ref::<tonic::ConnectError>().is_some() {
            return true;
        }
        cur = e.source();
    }
    false
}

pub(crate) fn classify(status: &Status) -> Failure {
    if is_connect_error(status) {
        return Failure::NotSent;
    }
    if is_local(status) {
        // Connection reset, GOAWAY, keep-alive timeout, grpc-timeout: the request may have
        // reached the server.
        return Failure::Transient;
    }
    let m = status.message();
    if m.ends_with("etcdserver: invalid auth token") {
        return Failure::BadToken;
    }
    // A member that lost track of the leader while forwarding (some servers send this with
    // code Internal).
    if m.ends_with("etcdserver: not leader") {
        return Failure::Transient;
    }
    match status.code() {
        Code::Unavailable => Failure::Transient,
        Code::DeadlineExceeded => Failure::Transient,
        // A server that goes away mid-response (h2 reset without a status).
        Code::Unknown if m.contains("transport") || m.contains("h2 protocol") => Failure::Transient,
        _ => Failure::Final,
    }
}

impl From<Status> for Error {
    fn from(s: Status) -> Error {
        Error::from_status(&s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_etcd_messages() {
        let e = Error::from_status(&Status::out_of_range(
            "etcdserver: mvcc: required revision has been compacted",
        ));
        assert!(matches!(e, Error::Compacted { .. }));
        assert_eq!(
            e.to_string(),
            "etcdserver: mvcc: required revision has been compacted"
        );
        let e = Error::from_status(&Status::out_of_range(
            "etcdserver: mvcc: required revision is a future revision",
        ));
        assert!(matches!(e, Error::FutureRevision));
        let e = Error::from_status(&Status::not_found("etcdserver: requested lease not found"));
        assert!(matches!(e, Error::LeaseNotFound));
        let e = Error::from_status(&Status::unavailable("etcdserver: no leader"));
        assert!(matches!(e, Error::NoLeader));
        assert!(e.is_transient());
        let e = Error::from_status(&Status::permission_denied("etcdserver: permission denied"));
        assert!(matches!(e, Error::PermissionDenied(_)));
        let e = Error::from_status(&Status::unknown("election: not leader"));
        assert!(matches!(e, Error::NotElectionLeader));
        let e = Error::from_status(&Status::invalid_argument(
            "etcdserver: duplicate key given in txn request",
        ));
        assert!(matches!(e, Error::InvalidArgument(m) if m.contains("duplicate key")));
        let e = Error::from_status(&Status::unimplemented("nope"));
        assert!(matches!(e, Error::Unimplemented(_)));
        let e = Error::ambiguous(Error::Timeout("x".into()));
        assert!(e.is_ambiguous());
        assert!(e.to_string().contains("may have been applied"));
    }

    #[test]
    fn classification() {
        assert_eq!(
            classify(&Status::unavailable("etcdserver: leader changed")),
            Failure::Transient
        );
        assert_eq!(
            classify(&Status::invalid_argument("etcdserver: invalid auth token")),
            Failure::BadToken
        );
        assert_eq!(
            classify(&Status::out_of_range(
                "etcdserver: mvcc: required revision has been compacted"
            )),
            Failure::Final
        );
        let connect = Status::from_error(Box::new(tonic::ConnectError(
            std::io::Error::from(std::io::ErrorKind::ConnectionRefused).into(),
        )));
        assert_eq!(connect.code(), Code::Unavailable);
        assert_eq!(classify(&connect), Failure::NotSent);
    }
}
