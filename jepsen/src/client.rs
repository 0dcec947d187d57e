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
use keel_proto::etcdserverpb::{
    DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse, RangeRequest, RangeResponse,
    TxnRequest, TxnResponse,
};
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
