//! A lean HTTP/2 transport for unary gRPC calls: tonic's generated clients over a bare `h2`
//! connection.
//!
//! A tonic `Channel` hands every request through two tasks of its own before it reaches the
//! connection: tower's `Buffer` worker (the channel is shared by clones) and hyper's client
//! dispatcher (and, for a request body, a task that pipes it into the HTTP/2 stream); each
//! hand-off is a task wake-up, and the response comes back the same way. The load generator
//! shares the machine's two CPUs with the cluster it measures, so whatever it spends per
//! request is taken from the servers. [`LeanChannel`] sends a unary call straight from the
//! calling task into the `h2` connection (one lock, one wake-up of the connection task) and
//! reads the response stream directly. What goes on the wire is what a `Channel` sends, less
//! its `user-agent` header: HEADERS (tonic's client adds `content-type: application/grpc` and
//! `te: trailers`), the length-prefixed message in DATA with END_STREAM; the response's DATA
//! and trailers are handed to tonic, which decodes them and reads `grpc-status` as usual.
//!
//! Only for unary calls: the request body is read to its end before anything is sent, so a
//! bidirectional stream (watch, lease keep-alive) must use a tonic `Channel` instead.
//! [`BenchChannel`] is either kind, chosen with `--grpc-client`.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri, Version};
use http_body_util::BodyExt;
use keel_proto::h2_body::H2Body;
use tonic::transport::Channel;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One HTTP/2 connection for unary gRPC calls; clones share it. When the connection breaks
/// (the member was restarted, say), the call that finds it broken fails and the connection is
/// opened again for the calls after it, as a tonic `Channel` reconnects.
#[derive(Clone)]
pub struct LeanChannel(Arc<Connection>);

struct Connection {
    authority: Authority,
    /// The current connection's handle and a generation number, so that of several calls
    /// that saw the same connection break only one reconnects.
    current: RwLock<(u64, h2::client::SendRequest<Bytes>)>,
    reconnecting: tokio::sync::Mutex<()>,
}

impl LeanChannel {
    /// Connects to `host:port` with the same settings as the tonic channels (`TCP_NODELAY`,
    /// 16 MiB stream and 64 MiB connection windows).
    pub async fn connect(endpoint: &str) -> anyhow::Result<LeanChannel> {
        let authority: Authority = endpoint
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()?;
        let send = open(&authority).await?;
        Ok(LeanChannel(Arc::new(Connection {
            authority,
            current: RwLock::new((0, send)),
            reconnecting: tokio::sync::Mutex::new(()),
        })))
    }

    fn call(&mut self, req: Request<tonic::body::Body>) -> LeanFuture {
        let conn = self.0.clone();
        Box::pin(async move {
            let (generation, mut send) = conn.handle()?;
            let (mut head, body) = req.into_parts();
            let mut uri = std::mem::take(&mut head.uri).into_parts();
            uri.scheme = Some(Scheme::HTTP);
            uri.authority = Some(conn.authority.clone());
            head.uri = Uri::from_parts(uri)?;
            head.version = Version::HTTP_2;
            // A unary request body is one length-prefixed message, ready at once (a stream's
            // body would make the call wait for its end); one chunk is taken without a copy.
            let data = body.collect().await?.to_bytes();
            let sent = async {
                std::future::poll_fn(|cx| send.poll_ready(cx)).await?;
                let (response, mut stream) =
                    send.send_request(Request::from_parts(head, ()), false)?;
                stream.send_data(data, true)?;
                response.await
            };
            match sent.await {
                Ok(response) => Ok(response.map(|recv| tonic::body::Body::new(H2Body::new(recv)))),
                Err(e) => {
                    if e.is_io() || e.is_go_away() || send.clone().ready().await.is_err() {
                        conn.reconnect(generation).await;
                    }
                    Err(e.into())
                }
            }
        })
    }
}

impl Connection {
    fn handle(&self) -> Result<(u64, h2::client::SendRequest<Bytes>), BoxError> {
        match self.current.read() {
            Ok(current) => Ok(current.clone()),
            Err(_) => Err("lean channel: lock poisoned".into()),
        }
    }

    /// Opens a new connection unless another call already replaced `generation`'s; a failure
    /// leaves the broken one, and the next call that finds it broken tries again.
    async fn reconnect(&self, generation: u64) {
        let _one_at_a_time = self.reconnecting.lock().await;
        match self.handle() {
            Ok((current, _)) if current == generation => {}
            _ => return,
        }
        if let Ok(send) = open(&self.authority).await
            && let Ok(mut current) = self.current.write()
        {
            *current = (generation + 1, send);
        }
    }
}

/// An HTTP/2 connection to `authority`, its I/O driven by a task of its own.
async fn open(authority: &Authority) -> anyhow::Result<h2::client::SendRequest<Bytes>> {
    let tcp = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(authority.as_str()),
    )
    .await
    .map_err(|_| anyhow::anyhow!("connecting to {authority} timed out"))??;
    tcp.set_nodelay(true)?;
    let (send, connection) = h2::client::Builder::new()
        .initial_window_size(16 << 20)
        .initial_connection_window_size(64 << 20)
        .handshake::<_, Bytes>(tcp)
        .await?;
    tokio::spawn(async move {
        // Ends when every handle is dropped or the server goes away; calls in flight then
        // fail with the connection's error.
        let _ = connection.await;
    });
    Ok(send)
}

type LeanFuture =
    Pin<Box<dyn Future<Output = Result<Response<tonic::body::Body>, BoxError>> + Send>>;

/// The transport a workload's unary calls use (`--grpc-client`).
#[derive(Clone)]
pub enum BenchChannel {
    /// A tonic `Channel` (tower `Buffer` and hyper's client on the path).
    Tonic(Channel),
    /// [`LeanChannel`]: the calling task writes into the HTTP/2 connection itself.
    Lean(LeanChannel),
}

impl tower_service::Service<Request<tonic::body::Body>> for BenchChannel {
    type Response = Response<tonic::body::Body>;
    type Error = BoxError;
    type Future = LeanFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match self {
            BenchChannel::Tonic(ch) => {
                tower_service::Service::poll_ready(ch, cx).map_err(|e| Box::new(e) as BoxError)
            }
            // Readiness (a free stream slot) is awaited in the call.
            BenchChannel::Lean(_) => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, req: Request<tonic::body::Body>) -> LeanFuture {
        match self {
            BenchChannel::Tonic(ch) => {
                let call = tower_service::Service::call(ch, req);
                Box::pin(async move { call.await.map_err(|e| Box::new(e) as BoxError) })
            }
            BenchChannel::Lean(lean) => lean.call(req),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use keel_proto::etcdserverpb::kv_client::KvClient;
    use keel_proto::etcdserverpb::kv_server::{Kv, KvServer};
    use keel_proto::etcdserverpb::{
        CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
        PutResponse, RangeRequest, RangeResponse, ResponseHeader, TxnRequest, TxnResponse,
    };
    use tokio::sync::oneshot;
    use tonic::{Code, Request, Response, Status};

    use super::*;

    /// Puts answer with the value's length as the revision; ranges fail as etcd's do.
    struct TestKv;

    #[tonic::async_trait]
    impl Kv for TestKv {
        async fn range(&self, _: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
            Err(Status::invalid_argument("etcdserver: key is not provided"))
        }
        type RangeStreamStream = futures_stream::Empty;
        async fn range_stream(
            &self,
            _: Request<RangeRequest>,
        ) -> Result<Response<Self::RangeStreamStream>, Status> {
            Err(Status::unimplemented("no"))
        }
        async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
            Ok(Response::new(PutResponse {
                header: Some(ResponseHeader {
                    revision: req.get_ref().value.len() as i64,
                    ..Default::default()
                }),
                prev_kv: None,
            }))
        }
        async fn delete_range(
            &self,
            _: Request<DeleteRangeRequest>,
        ) -> Result<Response<DeleteRangeResponse>, Status> {
            Err(Status::unimplemented("no"))
        }
        async fn txn(&self, _: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
            Err(Status::unimplemented("no"))
        }
        async fn compact(
            &self,
            _: Request<CompactionRequest>,
        ) -> Result<Response<CompactionResponse>, Status> {
            Err(Status::unimplemented("no"))
        }
    }

    mod futures_stream {
        use std::pin::Pin;
        use std::task::{Context, Poll};

        use keel_proto::etcdserverpb::RangeStreamResponse;

        /// A stream that ends at once (the test server never streams).
        pub struct Empty;

        impl tonic::codegen::tokio_stream::Stream for Empty {
            type Item = Result<RangeStreamResponse, tonic::Status>;
            fn poll_next(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
                Poll::Ready(None)
            }
        }
    }

    /// Serves `TestKv` on `addr` until the returned sender is dropped or fired.
    async fn serve(addr: SocketAddr) -> oneshot::Sender<()> {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let incoming = tonic::codegen::tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(KvServer::new(TestKv))
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await;
        });
        stop
    }

    async fn free_addr() -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        l.local_addr().expect("addr")
    }

    fn put(value: usize) -> PutRequest {
        PutRequest {
            key: b"k".to_vec(),
            value: vec![b'v'; value],
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn unary_calls_and_their_errors_arrive_as_over_a_tonic_channel() {
        let addr = free_addr().await;
        let _server = serve(addr).await;
        let lean = BenchChannel::Lean(LeanChannel::connect(&addr.to_string()).await.expect("lean"));
        let tonic = BenchChannel::Tonic(
            crate::driver::connect(&addr.to_string())
                .await
                .expect("tonic"),
        );
        for ch in [lean, tonic] {
            let mut kv = KvClient::new(ch);
            // A large message spans several DATA frames each way of the HTTP/2 stream.
            for size in [0, 5, 100_000] {
                let r = kv.put(put(size)).await.expect("put").into_inner();
                assert_eq!(r.header.map(|h| h.revision), Some(size as i64));
            }
            let e = kv
                .range(RangeRequest::default())
                .await
                .expect_err("range fails");
            assert_eq!(e.code(), Code::InvalidArgument);
            assert_eq!(e.message(), "etcdserver: key is not provided");
        }
    }

    #[tokio::test]
    async fn a_lean_channel_reconnects_after_the_server_restarts() {
        let addr = free_addr().await;
        let stop = serve(addr).await;
        let mut kv = KvClient::new(BenchChannel::Lean(
            LeanChannel::connect(&addr.to_string()).await.expect("lean"),
        ));
        kv.put(put(1)).await.expect("first put");
        let _ = stop.send(());
        // The old connection fails calls until the server is back, then a new one is opened.
        let mut failed = false;
        for _ in 0..100 {
            if kv.put(put(1)).await.is_err() {
                failed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(failed, "calls kept succeeding after the server stopped");
        let _server = serve(addr).await;
        let mut answered = false;
        for _ in 0..100 {
            if let Ok(r) = kv.put(put(7)).await {
                assert_eq!(r.into_inner().header.map(|h| h.revision), Some(7));
                answered = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(answered, "no call succeeded after the server came back");
    }
}
