//! The harness's etcd v3 client: one connection to one member, no failover, no retries.
//!
//! Every call has a deadline. Errors are classified the way Jepsen's etcd client does: an error
//! is *definite* (the request certainly had no effect) when the server refused it for a reason
//! decided before anything was proposed, or when the connection could not even be opened;
//! everything else (timeouts, resets, "leader changed", "no leader", ...) is *indeterminate* for a
//! write. Reads are idempotent, so a failed read is always just a failure. Being conservative
//! here costs only search time; calling an error definite when the request did take effect
//! would make the checkers report anomalies that are not there.

use std::time::Duration;

use keel_proto::etcdserverpb::kv_client::KvClient;
use keel_proto::etcdserverpb::lease_client::LeaseClient;
use keel_proto::etcdserverpb::{
    DeleteRangeRequest, DeleteRangeResponse, LeaseGrantRequest, LeaseGrantResponse,
    LeaseKeepAliveRequest, LeaseKeepAliveResponse, LeaseLeasesRequest, LeaseLeasesResponse,
    LeaseRevokeRequest, LeaseRevokeResponse, PutRequest, PutResponse, RangeRequest, RangeResponse,
    TxnRequest, TxnResponse,
};
use keel_proto::v3lockpb::lock_client::LockClient;
use keel_proto::v3lockpb::{LockRequest, LockResponse, UnlockRequest, UnlockResponse};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

#[derive(Debug, Clone)]
pub struct ClientError {
    pub definite: bool,
    pub message: String,
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Whether the error chain says the TCP connection was never established.
fn connect_failed(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::ConnectionRefused
        {
            return true;
        }
        let s = err.to_string();
        if s.contains("Connection refused") || s.contains("tcp connect error") {
            return true;
        }
        cur = err.source();
    }
    false
}

pub fn classify(status: &Status) -> ClientError {
    let definite = match status.code() {
        Code::InvalidArgument
        | Code::OutOfRange
        | Code::NotFound
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::Unimplemented
        | Code::ResourceExhausted => true,
        // `FailedPrecondition` ("not leader") is today only returned before proposing, but a
        // server may also say it when it loses leadership with the entry in its log: not relied
        // upon, so it stays indeterminate for writes (reads are failures anyway).
        Code::Unavailable => {
            connect_failed(status)
                || status.message().contains("Connection refused")
                || status.message().contains("tcp connect error")
        }
        _ => false,
    };
    ClientError {
        definite,
        message: format!("{:?}: {}", status.code(), status.message()),
    }
}

#[derive(Clone)]
pub struct Client {
    kv: KvClient<Channel>,
    channel: Channel,
    timeout: Duration,
}

impl Client {
    pub fn new(url: &str, timeout: Duration) -> anyhow::Result<Client> {
        let channel = Endpoint::from_shared(url.to_string())?
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true)
            .connect_lazy();
        Ok(Client {
            kv: KvClient::new(channel.clone()),
            channel,
            timeout,
        })
    }

    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    async fn call<T, F>(&self, fut: F) -> Result<T, ClientError>
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(classify(&s)),
            Err(_) => Err(ClientError {
                definite: false,
                message: "client timeout".into(),
            }),
        }
    }

    pub async fn range(&self, req: RangeRequest) -> Result<RangeResponse, ClientError> {
        let mut kv = self.kv.clone();
        self.call(kv.range(req)).await
    }

    pub async fn put(&self, req: PutRequest) -> Result<PutResponse, ClientError> {
        let mut kv = self.kv.clone();
        self.call(kv.put(req)).await
    }

    pub async fn delete(
        &self,
        req: DeleteRangeRequest,
    ) -> Result<DeleteRangeResponse, ClientError> {
        let mut kv = self.kv.clone();
        self.call(kv.delete_range(req)).await
    }

    pub async fn txn(&self, req: TxnRequest) -> Result<TxnResponse, ClientError> {
        let mut kv = self.kv.clone();
        self.call(kv.txn(req)).await
    }

    pub async fn lease_grant(&self, ttl: i64) -> Result<LeaseGrantResponse, ClientError> {
        let mut c = LeaseClient::new(self.channel.clone());
        self.call(c.lease_grant(LeaseGrantRequest { ttl, id: 0 }))
            .await
    }

    pub async fn lease_revoke(&self, id: i64) -> Result<LeaseRevokeResponse, ClientError> {
        let mut c = LeaseClient::new(self.channel.clone());
        self.call(c.lease_revoke(LeaseRevokeRequest { id })).await
    }

    pub async fn lease_leases(&self) -> Result<LeaseLeasesResponse, ClientError> {
        let mut c = LeaseClient::new(self.channel.clone());
        self.call(c.lease_leases(LeaseLeasesRequest {})).await
    }

    /// One keep-alive on a fresh stream: one request, its one answer (`ttl` 0: the lease does
    /// not exist).
    pub async fn lease_keep_alive_once(
        &self,
        id: i64,
    ) -> Result<LeaseKeepAliveResponse, ClientError> {
        let mut c = LeaseClient::new(self.channel.clone());
        let fut = async move {
            let reqs = futures::stream::iter(vec![LeaseKeepAliveRequest { id }]);
            let mut stream = c.lease_keep_alive(reqs).await?.into_inner();
            match stream.message().await? {
                Some(r) => Ok(tonic::Response::new(r)),
                None => Err(Status::unavailable(
                    "keep-alive stream ended without an answer",
                )),
            }
        };
        self.call(fut).await
    }

    /// v3lockpb.Lock with its own deadline (it blocks while another session holds the lock).
    pub async fn lock(
        &self,
        name: &[u8],
        lease: i64,
        timeout: Duration,
    ) -> Result<LockResponse, ClientError> {
        let mut c = LockClient::new(self.channel.clone());
        let req = LockRequest {
            name: name.to_vec(),
            lease,
        };
        match tokio::time::timeout(timeout, c.lock(req)).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(classify(&s)),
            Err(_) => Err(ClientError {
                definite: false,
                message: "client timeout".into(),
            }),
        }
    }

    pub async fn unlock(&self, key: &[u8]) -> Result<UnlockResponse, ClientError> {
        let mut c = LockClient::new(self.channel.clone());
        self.call(c.unlock(UnlockRequest { key: key.to_vec() }))
            .await
    }
}

/// The end of the range covering every key with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}
