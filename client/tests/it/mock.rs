//! Behaviour that a healthy Keel cluster cannot show on demand, checked against an in-process
//! mock of the etcd API: auth tokens (Keel has no auth yet), and exactly which failures reads
//! retry and writes report as ambiguous.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_client::{Client, ConnectOptions, Error, RetryPolicy};
use keel_proto::etcdserverpb::{self as pb, auth_server, kv_server};
use tonic::{Request, Response, Status};

use crate::cluster::free_port;

#[derive(Default)]
struct Mock {
    /// The only token the server accepts now ("" : auth off).
    valid_token: Mutex<String>,
    issued: AtomicU32,
    /// Answer every request with this status (if set).
    fail_with: Mutex<Option<(tonic::Code, String)>>,
    ranges: AtomicU32,
    puts: AtomicU32,
    auth_on: AtomicBool,
}

impl Mock {
    fn check(&self, md: &tonic::metadata::MetadataMap) -> Result<String, Status> {
        if let Some((code, msg)) = self.fail_with.lock().unwrap().clone() {
            return Err(Status::new(code, msg));
        }
        if !self.auth_on.load(Ordering::SeqCst) {
            return Ok(String::new());
        }
        let token = md
            .get("token")
            .and_then(|t| t.to_str().ok())
            .unwrap_or_default()
            .to_string();
        if token.is_empty() {
            return Err(Status::invalid_argument("etcdserver: user name is empty"));
        }
        if token != *self.valid_token.lock().unwrap() {
            return Err(Status::invalid_argument("etcdserver: invalid auth token"));
        }
        Ok(token)
    }
}

#[derive(Clone)]
struct Svc(Arc<Mock>);

/// `impl $trait for Svc` with the given methods, every other RPC answering Unimplemented.
macro_rules! mock_impl {
    ($tr:path, { $($items:tt)* }, $($name:ident($req:ident) -> $resp:ident;)*) => {
        #[tonic::async_trait]
        impl $tr for Svc {
            $($items)*
            $(
                async fn $name(&self, _: Request<pb::$req>) -> Result<Response<pb::$resp>, Status> {
                    Err(Status::unimplemented("mock"))
                }
            )*
        }
    };
}

mock_impl! {
    auth_server::Auth,
    {
    async fn authenticate(
        &self,
        req: Request<pb::AuthenticateRequest>,
    ) -> Result<Response<pb::AuthenticateResponse>, Status> {
        let r = req.into_inner();
        if r.name != "root" || r.password != "secret" {
            return Err(Status::invalid_argument(
                "etcdserver: authentication failed, invalid user ID or password",
            ));
        }
        let n = self.0.issued.fetch_add(1, Ordering::SeqCst) + 1;
        let token = format!("token-{n}");
        *self.0.valid_token.lock().unwrap() = token.clone();
        Ok(Response::new(pb::AuthenticateResponse {
            header: None,
            token,
        }))
    }
    },
        auth_enable(AuthEnableRequest) -> AuthEnableResponse;
        auth_disable(AuthDisableRequest) -> AuthDisableResponse;
        auth_status(AuthStatusRequest) -> AuthStatusResponse;
        user_add(AuthUserAddRequest) -> AuthUserAddResponse;
        user_get(AuthUserGetRequest) -> AuthUserGetResponse;
        user_list(AuthUserListRequest) -> AuthUserListResponse;
        user_delete(AuthUserDeleteRequest) -> AuthUserDeleteResponse;
        user_change_password(AuthUserChangePasswordRequest) -> AuthUserChangePasswordResponse;
        user_grant_role(AuthUserGrantRoleRequest) -> AuthUserGrantRoleResponse;
        user_revoke_role(AuthUserRevokeRoleRequest) -> AuthUserRevokeRoleResponse;
        role_add(AuthRoleAddRequest) -> AuthRoleAddResponse;
        role_get(AuthRoleGetRequest) -> AuthRoleGetResponse;
        role_list(AuthRoleListRequest) -> AuthRoleListResponse;
        role_delete(AuthRoleDeleteRequest) -> AuthRoleDeleteResponse;
        role_grant_permission(AuthRoleGrantPermissionRequest) -> AuthRoleGrantPermissionResponse;
        role_revoke_permission(AuthRoleRevokePermissionRequest) -> AuthRoleRevokePermissionResponse;
}

type RangeStream = std::pin::Pin<
    Box<dyn futures::Stream<Item = Result<pb::RangeStreamResponse, Status>> + Send + 'static>,
>;

mock_impl! {
    kv_server::Kv,
    {
    async fn range(
        &self,
        req: Request<pb::RangeRequest>,
    ) -> Result<Response<pb::RangeResponse>, Status> {
        self.0.ranges.fetch_add(1, Ordering::SeqCst);
        let token = self.0.check(req.metadata())?;
        Ok(Response::new(pb::RangeResponse {
            kvs: vec![keel_proto::mvccpb::KeyValue {
                key: req.into_inner().key,
                value: token.into_bytes(),
                ..Default::default()
            }],
            count: 1,
            ..Default::default()
        }))
    }
    async fn put(&self, req: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        self.0.puts.fetch_add(1, Ordering::SeqCst);
        self.0.check(req.metadata())?;
        Ok(Response::new(pb::PutResponse::default()))
    }
    type RangeStreamStream = RangeStream;
    async fn range_stream(
        &self,
        _: Request<pb::RangeRequest>,
    ) -> Result<Response<RangeStream>, Status> {
        Err(Status::unimplemented("mock"))
    }
    },
    delete_range(DeleteRangeRequest) -> DeleteRangeResponse;
    txn(TxnRequest) -> TxnResponse;
    compact(CompactionRequest) -> CompactionResponse;
}

async fn serve() -> (Arc<Mock>, String) {
    let mock = Arc::new(Mock::default());
    let port = free_port();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let svc = Svc(mock.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(auth_server::AuthServer::new(svc.clone()))
            .add_service(kv_server::KvServer::new(svc))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (mock, format!("127.0.0.1:{port}"))
}

fn fast_retry() -> ConnectOptions {
    ConnectOptions::new()
        .with_request_timeout(Duration::from_secs(2))
        .with_retry(RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(10),
        })
}

#[tokio::test]
async fn auth_token_is_sent_and_renewed() {
    let (mock, ep) = serve().await;
    mock.auth_on.store(true, Ordering::SeqCst);

    // Without credentials: refused with a typed error.
    let anon = Client::connect([ep.clone()], fast_retry()).await.unwrap();
    let e = anon.get("k").await.unwrap_err();
    assert!(matches!(e, Error::Unauthenticated(_)), "{e:?}");

    // Wrong password: connect fails.
    let e = Client::connect([ep.clone()], fast_retry().with_user("root", "nope"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Unauthenticated(_)), "{e:?}");

    let c = Client::connect([ep.clone()], fast_retry().with_user("root", "secret"))
        .await
        .unwrap();
    let got = c.get("k").await.unwrap().into_first().unwrap();
    assert_eq!(got.value_str(), "token-1");

    // The server invalidates the token (e.g. it expired): the client authenticates again and
    // retries, for reads and for writes (the refused write was not applied).
    *mock.valid_token.lock().unwrap() = "rotated".into();
    let got = c.get("k").await.unwrap().into_first().unwrap();
    assert_eq!(got.value_str(), "token-2");
    *mock.valid_token.lock().unwrap() = "rotated-again".into();
    c.put("k", "v").await.unwrap();
    assert_eq!(mock.issued.load(Ordering::SeqCst), 3);
    // Clones share the token.
    let clone = c.clone();
    assert_eq!(
        clone
            .get("k")
            .await
            .unwrap()
            .into_first()
            .unwrap()
            .value_str(),
        "token-3"
    );
}

#[tokio::test]
async fn reads_retry_and_fail_over_writes_are_ambiguous() {
    let (a, ep_a) = serve().await;
    let (b, ep_b) = serve().await;
    let c = Client::connect([ep_a.clone(), ep_b.clone()], fast_retry())
        .await
        .unwrap();

    // Member A has no leader: reads move to B.
    *a.fail_with.lock().unwrap() = Some((tonic::Code::Unavailable, "etcdserver: no leader".into()));
    for _ in 0..4 {
        c.get("k").await.unwrap();
    }
    assert!(
        a.ranges.load(Ordering::SeqCst) <= 1,
        "A passed over once it failed"
    );

    // Both fail: a read gives up after its attempts with the typed error.
    *b.fail_with.lock().unwrap() = Some((tonic::Code::Unavailable, "etcdserver: no leader".into()));
    let e = c.get("k").await.unwrap_err();
    assert!(matches!(e, Error::NoLeader), "{e:?}");

    // A write that reached a server and failed transiently is never retried: ambiguous.
    let before = a.puts.load(Ordering::SeqCst) + b.puts.load(Ordering::SeqCst);
    *a.fail_with.lock().unwrap() = Some((
        tonic::Code::Unavailable,
        "etcdserver: leader changed".into(),
    ));
    *b.fail_with.lock().unwrap() = Some((
        tonic::Code::Unavailable,
        "etcdserver: leader changed".into(),
    ));
    let e = c.put("k", "v").await.unwrap_err();
    assert!(e.is_ambiguous(), "{e:?}");
    assert_eq!(
        a.puts.load(Ordering::SeqCst) + b.puts.load(Ordering::SeqCst),
        before + 1
    );

    // A definite error is returned as is, without retry.
    *a.fail_with.lock().unwrap() = Some((
        tonic::Code::InvalidArgument,
        "etcdserver: request is too large".into(),
    ));
    *b.fail_with.lock().unwrap() = a.fail_with.lock().unwrap().clone();
    let e = c.put("k", "v").await.unwrap_err();
    assert!(
        matches!(&e, Error::InvalidArgument(m) if m.contains("too large")),
        "{e:?}"
    );
    assert_eq!(
        a.puts.load(Ordering::SeqCst) + b.puts.load(Ordering::SeqCst),
        before + 2
    );

    // A write to an endpoint that cannot be reached is retried on the next one (not sent).
    let dead = format!("127.0.0.1:{}", free_port());
    let c = Client::connect([dead, ep_b], fast_retry()).await.unwrap();
    *b.fail_with.lock().unwrap() = None;
    for _ in 0..3 {
        c.put("k", "v").await.unwrap();
    }
}
