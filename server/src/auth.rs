//! Authentication and access control: the `etcdserverpb.Auth` service, and the checks every
//! other client RPC makes.
//!
//! The users, roles and permissions live in the replicated state machine
//! ([`keel_store::auth::AuthState`]) and change only through Raft. This module is the member's
//! side:
//!
//! - Identity ([`Caller`]): the `token` gRPC metadata (or `authorization: Bearer <token>`, as
//!   etcd's gateway sends it), looked up in the member's simple tokens; with
//!   `--client-cert-auth`, a verified client certificate's common name names the user when no
//!   token is given (etcd's `AuthInfoFromTLS`).
//! - Simple tokens, like etcd's default `--auth-token simple`: `Authenticate` checks the password
//!   on the member that received it (never in the state machine), picks a random token and
//!   proposes it; applying that entry assigns the token on every member, so a token works on
//!   all of them (clients balance requests across endpoints). Each member expires a token after
//!   `--auth-token-ttl` without use, and a restart forgets its tokens (clients authenticate
//!   again on `invalid auth token`). A member that does not know a token yet first catches up
//!   with the leader's commit index, in case the entry that assigned it is not applied there.
//! - Checks, with etcd's rules and errors: reads are checked by the member against its applied
//!   auth state, then the auth revision is compared again after the read; writes are proposed
//!   wrapped with the caller's name and the auth revision at which the token was accepted, and
//!   applying re-checks them against the auth state of their own log position — a request
//!   checked against an older auth revision fails with `revision of auth store is old` (clients
//!   then authenticate again and retry), so revoking a permission takes effect at once.
//! - Passwords are hashed with bcrypt (etcd's algorithm and default cost 10, `--bcrypt-cost`) on
//!   the receiving member before proposing: neither the log nor the state machine ever holds a
//!   clear-text password, and nothing here logs one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_proto::etcdserverpb::auth_server::Auth;
use keel_proto::etcdserverpb::*;
use keel_proto::keelpb::raft_request::Request as Cmd;
use keel_proto::keelpb::raft_response::Response as Res;
use keel_proto::keelpb::{
    AuthorizedRequest, InternalAuthenticateRequest, RaftRequest, RequestHeader,
};
use keel_store::auth::{Access, AuthInfo, AuthState};
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use crate::error::ServerError;
use crate::node::KeelNode;

/// The gRPC metadata key clients send their token in (etcd's `rpctypes.TokenFieldNameGRPC`).
pub const TOKEN_METADATA: &str = "token";
/// The gateway's alternative (etcd's `TokenFieldNameSwagger`), `Bearer ` prefix optional.
const AUTHORIZATION_METADATA: &str = "authorization";
/// Characters of a simple token's random part (etcd: 16 letters).
const TOKEN_LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
const TOKEN_PREFIX_LEN: usize = 16;

/// Who is calling, as read from a request before its body is taken.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    token: Option<String>,
    /// The common name of a verified client certificate (only with `--client-cert-auth`).
    common_name: Option<String>,
}

impl Caller {
    pub fn of<T>(req: &Request<T>) -> Caller {
        let mut caller = Caller::from_metadata(req.metadata());
        caller.common_name = crate::tls::peer_common_name(req);
        caller
    }

    pub fn from_metadata(md: &MetadataMap) -> Caller {
        let token = md
            .get(TOKEN_METADATA)
            .or_else(|| md.get(AUTHORIZATION_METADATA))
            .and_then(|v| v.to_str().ok())
            .map(|t| t.strip_prefix("Bearer ").unwrap_or(t).to_string());
        Caller {
            token,
            common_name: None,
        }
    }

    /// The caller's identity (etcd's `AuthInfoFromCtx`): `None` when auth is disabled or the
    /// request carries no credentials; an unknown or expired token is an error.
    pub async fn info(&self, node: &KeelNode) -> Result<Option<AuthInfo>, ServerError> {
        let state = node.mvcc.auth();
        if !state.enabled() {
            return Ok(None);
        }
        if let Some(token) = &self.token {
            let user = lookup_token(node, token).await?;
            return Ok(Some(AuthInfo {
                username: user,
                revision: node.mvcc.auth().revision(),
            }));
        }
        if node.config.client_cert_auth
            && let Some(cn) = &self.common_name
        {
            return Ok(Some(AuthInfo {
                username: cn.clone(),
                revision: state.revision(),
            }));
        }
        Ok(None)
    }

    /// The header a proposal made for this caller carries.
    pub async fn header(&self, node: &KeelNode) -> Result<RequestHeader, ServerError> {
        Ok(match self.info(node).await? {
            Some(i) => RequestHeader {
                username: i.username,
                auth_revision: i.revision,
            },
            None => RequestHeader::default(),
        })
    }

    /// Checks read access for a read served by this member (etcd's `doSerialize`, first half);
    /// pass the result to [`check_unchanged`] after reading.
    pub async fn check_read(
        &self,
        node: &KeelNode,
        key: &[u8],
        range_end: &[u8],
    ) -> Result<Option<AuthInfo>, ServerError> {
        let info = self.info(node).await?;
        node.mvcc
            .auth()
            .check(
                &info.clone().unwrap_or_default(),
                key,
                range_end,
                Access::Read,
            )
            .map_err(ServerError::from)?;
        Ok(info)
    }

    /// A read-only Txn served on this member: read access to the keys of every compare and
    /// every range of both branches, nested Txns included (etcd's `checkTxnAuth`).
    pub async fn check_txn_read(
        &self,
        node: &KeelNode,
        txn: &keel_proto::etcdserverpb::TxnRequest,
    ) -> Result<Option<AuthInfo>, ServerError> {
        let info = self.info(node).await?;
        node.mvcc
            .auth()
            .check_txn(&info.clone().unwrap_or_default(), txn, &|_| None)
            .map_err(ServerError::from)?;
        Ok(info)
    }

    /// Admin operations (the `root` role); anyone when auth is disabled.
    pub async fn check_admin(&self, node: &KeelNode) -> Result<(), ServerError> {
        if !node.mvcc.auth().enabled() {
            return Ok(());
        }
        let info = self.info(node).await?.unwrap_or_default();
        node.mvcc
            .auth()
            .check_admin(&info)
            .map_err(ServerError::from)
    }
}

/// etcd's `doSerialize`, second half: a read checked at one auth revision is refused if the
/// auth state changed while it was served.
pub fn check_unchanged(node: &KeelNode, info: &Option<AuthInfo>) -> Result<(), ServerError> {
    match info {
        Some(i) if i.revision != 0 && i.revision != node.mvcc.auth().revision() => {
            Err(ServerError::AuthOldRevision)
        }
        _ => Ok(()),
    }
}

/// Proposes `cmd` on behalf of `caller`. When apply refuses it because this member accepted
/// the token at an auth revision older than the entry's (this member had not applied a recent
/// auth change yet), the member catches up and proposes once more with a fresh check, instead
/// of sending the client etcd's `revision of auth store is old` (which clients answer by
/// authenticating again and retrying). The refused entry changed nothing, so this is safe.
pub async fn propose_as(
    node: &KeelNode,
    caller: &Caller,
    cmd: Cmd,
) -> Result<keel_proto::keelpb::RaftResponse, ServerError> {
    let header = caller.header(node).await?;
    match node.propose(authorized(header, cmd.clone())).await {
        Err(ServerError::AuthOldRevision) => {
            node.read_barrier().await?;
            let header = caller.header(node).await?;
            node.propose(authorized(header, cmd)).await
        }
        other => other,
    }
}

/// Wraps a client request with its sender, for the permission check in apply.
pub fn authorized(header: RequestHeader, cmd: Cmd) -> RaftRequest {
    RaftRequest {
        request: Some(Cmd::Authorized(Box::new(AuthorizedRequest {
            header: Some(header),
            request: Some(Box::new(RaftRequest {
                request: Some(cmd),
                origin: None,
            })),
        }))),
        origin: None,
    }
}

/// The shape of the tokens this module issues: 16 letters, a dot, digits.
fn looks_like_simple_token(token: &str) -> bool {
    match token.split_once('.') {
        Some((prefix, n)) => {
            prefix.len() == TOKEN_PREFIX_LEN
                && prefix.bytes().all(|b| b.is_ascii_alphabetic())
                && !n.is_empty()
                && n.bytes().all(|b| b.is_ascii_digit())
        }
        None => false,
    }
}

fn new_token() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    let prefix: String = (0..TOKEN_PREFIX_LEN)
        .map(|_| TOKEN_LETTERS[rng.random_range(0..TOKEN_LETTERS.len())] as char)
        .collect();
    format!("{prefix}.{}", rng.random::<u32>())
}

async fn lookup_token(node: &KeelNode, token: &str) -> Result<String, ServerError> {
    let ttl = node.config.auth_token_ttl();
    let tokens = node.mvcc.auth_tokens();
    if let Some(user) = tokens.lookup(token, Instant::now(), ttl) {
        return Ok(user);
    }
    // Assigned by an entry this member may not have applied yet: catch up once.
    if looks_like_simple_token(token) {
        node.read_barrier().await?;
        if let Some(user) = tokens.lookup(token, Instant::now(), ttl) {
            return Ok(user);
        }
    }
    tracing::debug!("invalid auth token");
    Err(ServerError::InvalidAuthToken)
}

/// Expires tokens unused for `--auth-token-ttl` (etcd checks once a second).
pub fn spawn_token_sweeper(node: Arc<KeelNode>) -> tokio::task::JoinHandle<()> {
    let weak = Arc::downgrade(&node);
    drop(node);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let Some(node) = weak.upgrade() else { return };
            node.mvcc
                .auth_tokens()
                .expire(Instant::now(), node.config.auth_token_ttl());
        }
    })
}

/// bcrypt hash of `password`, base64-encoded as etcd's `hashedPassword` field carries it.
async fn hash_password(password: String, cost: u32) -> Result<String, ServerError> {
    use base64::Engine as _;
    let hash = tokio::task::spawn_blocking(move || bcrypt::hash(password, cost))
        .await
        .map_err(|e| ServerError::Internal(e.to_string()))?
        .map_err(|e| ServerError::Internal(format!("hashing the password: {e}")))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(hash))
}

/// Checks `password` against a stored bcrypt hash. Without one (no such user) it checks against
/// a hash of a random password made once, so a failed login takes as long either way.
async fn verify_password(password: String, hash: Option<Vec<u8>>, cost: u32) -> bool {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    tokio::task::spawn_blocking(move || {
        let known = hash.is_some();
        let hash = match hash {
            Some(h) => String::from_utf8(h).unwrap_or_default(),
            None => DUMMY
                .get_or_init(|| bcrypt::hash(new_token(), cost).unwrap_or_default())
                .clone(),
        };
        bcrypt::verify(password, &hash).unwrap_or(false) && known
    })
    .await
    .unwrap_or(false)
}

/// How an [`AdminGate`] reports a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateErrors {
    /// etcd's gRPC errors (`etcdserver: permission denied`, code PermissionDenied).
    Etcd,
    /// etcd 3.4/3.5's Maintenance service: the auth package's text, code Unknown
    /// (`auth: permission denied`).
    Maintenance,
}

/// Wraps a gRPC service so the listed methods are for admins (the `root` role) when auth is
/// enabled, leaving the service's own code untouched. Methods not listed pass straight through.
#[derive(Clone)]
pub struct AdminGate<S> {
    inner: S,
    node: Arc<KeelNode>,
    methods: &'static [(&'static str, GateErrors)],
}

impl<S> AdminGate<S> {
    pub fn new(
        inner: S,
        node: Arc<KeelNode>,
        methods: &'static [(&'static str, GateErrors)],
    ) -> Self {
        Self {
            inner,
            node,
            methods,
        }
    }
}

/// Maintenance methods for admins: etcd 3.5 checks the first four (with its auth package's
/// errors); newer etcd also MoveLeader and Downgrade.
pub const MAINTENANCE_ADMIN: &[(&str, GateErrors)] = &[
    ("Defragment", GateErrors::Maintenance),
    ("Snapshot", GateErrors::Maintenance),
    ("Hash", GateErrors::Maintenance),
    ("HashKV", GateErrors::Maintenance),
    ("MoveLeader", GateErrors::Etcd),
    ("Downgrade", GateErrors::Etcd),
];

/// Membership changes are for admins (etcd 3.4.26+/3.5.8+); MemberList is open.
pub const CLUSTER_ADMIN: &[(&str, GateErrors)] = &[
    ("MemberAdd", GateErrors::Etcd),
    ("MemberRemove", GateErrors::Etcd),
    ("MemberUpdate", GateErrors::Etcd),
    ("MemberPromote", GateErrors::Etcd),
];

impl<S: tonic::server::NamedService> tonic::server::NamedService for AdminGate<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tonic::codegen::Service<tonic::codegen::http::Request<B>> for AdminGate<S>
where
    S: tonic::codegen::Service<
            tonic::codegen::http::Request<B>,
            Response = tonic::codegen::http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: tonic::codegen::http::Request<B>) -> Self::Future {
        let method = req.uri().path().rsplit('/').next().unwrap_or_default();
        let Some((_, errors)) = self.methods.iter().find(|(m, _)| *m == method).copied() else {
            return Box::pin(self.inner.call(req));
        };
        // The clone is ready only after poll_ready; call the instance that was polled.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let node = self.node.clone();
        let mut caller = Caller::from_metadata(&MetadataMap::from_headers(req.headers().clone()));
        caller.common_name = crate::tls::common_name_http(req.extensions());
        Box::pin(async move {
            match caller.check_admin(&node).await {
                Ok(()) => inner.call(req).await,
                Err(e) => {
                    let status = match errors {
                        GateErrors::Etcd => Status::from(e),
                        GateErrors::Maintenance => e.into_maintenance_status(),
                    };
                    Ok(status.into_http())
                }
            }
        })
    }
}

pub struct AuthService {
    node: Arc<KeelNode>,
}

impl AuthService {
    pub fn new(node: Arc<KeelNode>) -> Self {
        Self { node }
    }

    /// Proposes an auth store change for `caller` (checked again in apply).
    async fn change(&self, caller: &Caller, cmd: Cmd) -> Result<(Res, i64), Status> {
        let resp = propose_as(&self.node, caller, cmd).await?;
        let body = resp
            .response
            .ok_or_else(|| ServerError::Internal("empty apply response".into()))?;
        Ok((body, resp.revision))
    }

    /// An auth read: the applied state after a linearizable read barrier.
    async fn read_state(&self) -> Result<Arc<AuthState>, Status> {
        self.node.read_barrier().await?;
        Ok(self.node.mvcc.auth())
    }

    fn header(&self) -> Option<ResponseHeader> {
        Some(self.node.header())
    }
}

fn unexpected() -> Status {
    ServerError::Internal("unexpected apply response".into()).into()
}

/// The body of an admin RPC that proposes one auth store change.
macro_rules! change_rpc {
    ($self:ident, $req:ident, $cmd:ident) => {{
        let caller = Caller::of(&$req);
        caller.check_admin(&$self.node).await?;
        match $self.change(&caller, Cmd::$cmd($req.into_inner())).await? {
            (Res::$cmd(mut r), rev) => {
                r.header = Some($self.node.header_at(rev));
                Ok(Response::new(r))
            }
            _ => Err(unexpected()),
        }
    }};
}

#[tonic::async_trait]
impl Auth for AuthService {
    async fn auth_enable(
        &self,
        req: Request<AuthEnableRequest>,
    ) -> Result<Response<AuthEnableResponse>, Status> {
        change_rpc!(self, req, AuthEnable)
    }

    async fn auth_disable(
        &self,
        req: Request<AuthDisableRequest>,
    ) -> Result<Response<AuthDisableResponse>, Status> {
        change_rpc!(self, req, AuthDisable)
    }

    async fn user_delete(
        &self,
        req: Request<AuthUserDeleteRequest>,
    ) -> Result<Response<AuthUserDeleteResponse>, Status> {
        change_rpc!(self, req, AuthUserDelete)
    }

    async fn user_grant_role(
        &self,
        req: Request<AuthUserGrantRoleRequest>,
    ) -> Result<Response<AuthUserGrantRoleResponse>, Status> {
        change_rpc!(self, req, AuthUserGrantRole)
    }

    async fn user_revoke_role(
        &self,
        req: Request<AuthUserRevokeRoleRequest>,
    ) -> Result<Response<AuthUserRevokeRoleResponse>, Status> {
        change_rpc!(self, req, AuthUserRevokeRole)
    }

    async fn role_add(
        &self,
        req: Request<AuthRoleAddRequest>,
    ) -> Result<Response<AuthRoleAddResponse>, Status> {
        change_rpc!(self, req, AuthRoleAdd)
    }

    async fn role_delete(
        &self,
        req: Request<AuthRoleDeleteRequest>,
    ) -> Result<Response<AuthRoleDeleteResponse>, Status> {
        change_rpc!(self, req, AuthRoleDelete)
    }

    async fn role_grant_permission(
        &self,
        req: Request<AuthRoleGrantPermissionRequest>,
    ) -> Result<Response<AuthRoleGrantPermissionResponse>, Status> {
        change_rpc!(self, req, AuthRoleGrantPermission)
    }

    async fn role_revoke_permission(
        &self,
        req: Request<AuthRoleRevokePermissionRequest>,
    ) -> Result<Response<AuthRoleRevokePermissionResponse>, Status> {
        change_rpc!(self, req, AuthRoleRevokePermission)
    }

    async fn auth_status(
        &self,
        req: Request<AuthStatusRequest>,
    ) -> Result<Response<AuthStatusResponse>, Status> {
        let caller = Caller::of(&req);
        let state = self.read_state().await?;
        caller.check_admin(&self.node).await?;
        Ok(Response::new(AuthStatusResponse {
            header: self.header(),
            enabled: state.enabled(),
            auth_revision: state.revision(),
        }))
    }

    async fn authenticate(
        &self,
        req: Request<AuthenticateRequest>,
    ) -> Result<Response<AuthenticateResponse>, Status> {
        let r = req.into_inner();
        self.node.read_barrier().await?;
        loop {
            let state = self.node.mvcc.auth();
            let checked = state.revision();
            let hash = match state.password_hash(&r.name) {
                Ok(h) => Some(h.to_vec()),
                Err(e) if e.kind == keel_store::ApplyErrorKind::AuthFailed => None,
                Err(e) => return Err(ServerError::from(e).into()),
            };
            let ok = verify_password(r.password.clone(), hash, self.node.config.bcrypt_cost).await;
            if !ok {
                tracing::info!(user = %r.name, "authentication failed");
                return Err(ServerError::AuthFailed.into());
            }
            let token = new_token();
            let resp = self
                .node
                .propose(RaftRequest {
                    request: Some(Cmd::Authenticate(InternalAuthenticateRequest {
                        name: r.name.clone(),
                        simple_token: token,
                    })),
                    origin: None,
                })
                .await?;
            // The password was checked at `checked`; if the auth state moved meanwhile (the
            // password may have changed), check again with a new token.
            if self.node.mvcc.auth().revision() != checked {
                tracing::info!("auth revision changed while authenticating; retrying");
                continue;
            }
            return match resp.response {
                Some(Res::Authenticate(mut a)) => {
                    a.header = Some(self.node.header_at(resp.revision));
                    Ok(Response::new(a))
                }
                _ => Err(unexpected()),
            };
        }
    }

    async fn user_add(
        &self,
        req: Request<AuthUserAddRequest>,
    ) -> Result<Response<AuthUserAddResponse>, Status> {
        let caller = Caller::of(&req);
        caller.check_admin(&self.node).await?;
        let mut r = req.into_inner();
        if !r.options.is_some_and(|o| o.no_password)
            && (!r.password.is_empty() || r.hashed_password.is_empty())
        {
            let password = std::mem::take(&mut r.password);
            r.hashed_password = hash_password(password, self.node.config.bcrypt_cost).await?;
        }
        r.password.clear();
        match self.change(&caller, Cmd::AuthUserAdd(r)).await? {
            (Res::AuthUserAdd(mut a), rev) => {
                a.header = Some(self.node.header_at(rev));
                Ok(Response::new(a))
            }
            _ => Err(unexpected()),
        }
    }

    async fn user_change_password(
        &self,
        req: Request<AuthUserChangePasswordRequest>,
    ) -> Result<Response<AuthUserChangePasswordResponse>, Status> {
        let caller = Caller::of(&req);
        caller.check_admin(&self.node).await?;
        let mut r = req.into_inner();
        if !r.password.is_empty() || r.hashed_password.is_empty() {
            let password = std::mem::take(&mut r.password);
            r.hashed_password = hash_password(password, self.node.config.bcrypt_cost).await?;
        }
        match self.change(&caller, Cmd::AuthUserChangePassword(r)).await? {
            (Res::AuthUserChangePassword(mut a), rev) => {
                a.header = Some(self.node.header_at(rev));
                Ok(Response::new(a))
            }
            _ => Err(unexpected()),
        }
    }

    async fn user_get(
        &self,
        req: Request<AuthUserGetRequest>,
    ) -> Result<Response<AuthUserGetResponse>, Status> {
        let caller = Caller::of(&req);
        let r = req.into_inner();
        let state = self.read_state().await?;
        let info = caller.info(&self.node).await?.unwrap_or_default();
        // Users may read their own entry (etcd).
        if let Err(e) = state.check_admin(&info)
            && r.name != info.username
        {
            return Err(ServerError::from(e).into());
        }
        let roles = state.user_get(&r.name).map_err(ServerError::from)?;
        Ok(Response::new(AuthUserGetResponse {
            header: self.header(),
            roles,
        }))
    }

    async fn user_list(
        &self,
        req: Request<AuthUserListRequest>,
    ) -> Result<Response<AuthUserListResponse>, Status> {
        let caller = Caller::of(&req);
        let state = self.read_state().await?;
        caller.check_admin(&self.node).await?;
        Ok(Response::new(AuthUserListResponse {
            header: self.header(),
            users: state.user_names(),
        }))
    }

    async fn role_get(
        &self,
        req: Request<AuthRoleGetRequest>,
    ) -> Result<Response<AuthRoleGetResponse>, Status> {
        let caller = Caller::of(&req);
        let r = req.into_inner();
        let state = self.read_state().await?;
        let info = caller.info(&self.node).await?.unwrap_or_default();
        // Users may read the roles they have (etcd).
        if let Err(e) = state.check_admin(&info)
            && !state.has_role(&info.username, &r.role)
        {
            return Err(ServerError::from(e).into());
        }
        let perm = state.role_get(&r.role).map_err(ServerError::from)?;
        Ok(Response::new(AuthRoleGetResponse {
            header: self.header(),
            perm,
        }))
    }

    async fn role_list(
        &self,
        req: Request<AuthRoleListRequest>,
    ) -> Result<Response<AuthRoleListResponse>, Status> {
        let caller = Caller::of(&req);
        let state = self.read_state().await?;
        caller.check_admin(&self.node).await?;
        Ok(Response::new(AuthRoleListResponse {
            header: self.header(),
            roles: state.role_names(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_have_etcds_shape() {
        let t = new_token();
        assert!(looks_like_simple_token(&t), "{t}");
        assert_ne!(t, new_token());
        assert!(!looks_like_simple_token("abc"));
        assert!(!looks_like_simple_token("abcdefghijklmnop.x1"));
        assert!(!looks_like_simple_token("abcdefghijklmno1.1"));
    }

    #[test]
    fn metadata_tokens() {
        let mut md = MetadataMap::new();
        md.insert("authorization", "Bearer abc".parse().unwrap());
        assert_eq!(Caller::from_metadata(&md).token.as_deref(), Some("abc"));
        md.insert("token", "xyz".parse().unwrap());
        assert_eq!(Caller::from_metadata(&md).token.as_deref(), Some("xyz"));
        assert!(Caller::from_metadata(&MetadataMap::new()).token.is_none());
    }

    #[tokio::test]
    async fn passwords() {
        use base64::Engine as _;
        let b64 = hash_password("pw".into(), 4).await.unwrap();
        let hash = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        assert!(hash.starts_with(b"$2"), "a bcrypt hash");
        assert!(verify_password("pw".into(), Some(hash.clone()), 4).await);
        assert!(!verify_password("wrong".into(), Some(hash), 4).await);
        assert!(!verify_password("pw".into(), None, 4).await);
    }
}
