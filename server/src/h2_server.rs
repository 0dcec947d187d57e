//! Plain-text client connections served on `h2` directly, every call of a connection driven by
//! the connection's own task.
//!
//! Why: tonic's server (hyper) spawns a task for every HTTP/2 stream. When an applied Raft
//! entry answers a hundred writes at once, a hundred stream tasks each send their response and
//! wake the connection's task; tokio runs a task woken that way right after the one that woke
//! it (its "LIFO slot"), so the connection task wrote each response with a `writev` of its own:
//! 0.9 system calls per put on a member's client connections at `put --clients 256`
//! (docs/benchmarks.md, change 24). Here the connection task polls its calls itself: every
//! call that an applied entry completes answers in the same pass, and the connection writes
//! them out together. No task is spawned per call.
//!
//! A connection, step by step (`Driver::poll`):
//!
//! ```text
//! accept    poll_accept until Pending: each new stream becomes a call (the service's future,
//!           boxed) in the connection's FuturesUnordered
//! calls     poll every call that was woken: a call whose response is ready sends its HEADERS
//!           and, while its body has frames ready and the stream has send capacity, its DATA
//!           and trailers (h2 only queues them)
//! repeat    if anything was accepted or finished, poll_accept again: that writes and flushes
//!           what the calls queued, in one write; otherwise wait
//! ```
//!
//! A response body that is not ready (a watch stream, a snapshot) or must wait for send
//! capacity is handed to a task of its own (`Pipe`), as hyper does for every body; a call
//! whose stream the client resets is dropped (its future, and so whatever it was waiting for).
//!
//! What tonic's server does that is kept: the same HTTP/2 settings (hyper's defaults: 1 MiB
//! stream and connection windows, 16 KiB frames, at most 200 concurrent streams, 16 KiB of
//! headers), keep-alive pings every 30 s (the connection is dropped if one is not answered
//! within 20 s), `grpc-timeout` (a call past its deadline is answered `CANCELLED`, "Timeout
//! expired"), the connection's addresses in the request's extensions ([`TcpConnectInfo`]),
//! graceful shutdown (GOAWAY, then in-flight calls finish). What differs: no `date` header on
//! responses (gRPC clients ignore it; etcd sends none).
//!
//! A connection whose first bytes are not the HTTP/2 preface (HTTP/1.1: the JSON gateway,
//! `/health`, `/metrics`) is handed to tonic's server unchanged, and TLS listeners stay on
//! tonic's server altogether (`--client-http2-server hyper` puts every connection there).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use http::{HeaderMap, Request, Response};
use http_body::Body;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tonic::transport::server::TcpConnectInfo;
use tower::ServiceExt;

use keel_proto::h2_body::H2Body;

use crate::authority_fix::AuthorityFix;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What this server needs of the service it serves (tonic's router of the client services,
/// behind the gRPC metrics layer).
pub trait ClientService:
    tower::Service<
        Request<tonic::body::Body>,
        Response = Response<Self::ResponseBody>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + Unpin
    + 'static
{
    type ResponseBody: Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static;
}

impl<S, B> ClientService for S
where
    S: tower::Service<Request<tonic::body::Body>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + Unpin
        + 'static,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type ResponseBody = B;
}

/// What a connection that is not HTTP/2 is handed to (tonic's server, through its incoming
/// stream).
pub type Fallback = mpsc::UnboundedSender<std::io::Result<AuthorityFix<TcpStream>>>;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// hyper's server defaults, which tonic's server used.
const WINDOW: u32 = 1 << 20;
const MAX_FRAME: u32 = 16 << 10;
const MAX_SEND_BUFFER: usize = 400 << 10;
const MAX_HEADER_LIST: u32 = 16 << 10;
const MAX_CONCURRENT_STREAMS: u32 = 200;
const MAX_LOCAL_ERROR_RESETS: usize = 1024;
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a connection may take to send the 24 bytes of the preface.
const PREFACE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts client connections on `listener` until `shutdown` turns true, then waits for the
/// connections to end (GOAWAY: calls in flight finish; the caller bounds the wait).
pub async fn serve<S: ClientService>(
    listener: TcpListener,
    service: S,
    fallback: Fallback,
    shutdown: watch::Receiver<bool>,
) {
    let mut connections = tokio::task::JoinSet::new();
    let mut stop = shutdown.clone();
    loop {
        tokio::select! {
            _ = async { drop(stop.wait_for(|s| *s).await) } => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => {
                    let _ = tcp.set_nodelay(true);
                    connections.spawn(connection(
                        tcp,
                        service.clone(),
                        fallback.clone(),
                        shutdown.clone(),
                    ));
                }
                Err(e) => {
                    // Out of file descriptors, say: try again shortly rather than spin.
                    tracing::debug!("accepting a client connection: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    drop(fallback);
    while connections.join_next().await.is_some() {}
}

async fn connection<S: ClientService>(
    tcp: TcpStream,
    service: S,
    fallback: Fallback,
    shutdown: watch::Receiver<bool>,
) {
    match tokio::time::timeout(PREFACE_TIMEOUT, starts_with_preface(&tcp)).await {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => {
            let _ = fallback.send(Ok(AuthorityFix::new(tcp)));
            return;
        }
        Ok(Err(_)) | Err(_) => return,
    }
    let info = TcpConnectInfo {
        local_addr: tcp.local_addr().ok(),
        remote_addr: tcp.peer_addr().ok(),
    };
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(WINDOW)
        .initial_connection_window_size(WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS));
    let mut conn = match builder.handshake(AuthorityFix::new(tcp)).await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!("HTTP/2 handshake with a client: {e}");
            return;
        }
    };
    let keepalive = conn
        .ping_pong()
        .map(|p| Box::pin(keepalive(p)) as KeepAlive);
    let driver = Driver {
        conn,
        calls: FuturesUnordered::new(),
        service,
        info,
        shutdown: Box::pin(async move {
            let mut shutdown = shutdown;
            let _ = shutdown.wait_for(|s| *s).await;
        }),
        going_away: false,
        keepalive,
    };
    if let Err(e) = driver.await {
        tracing::debug!("client connection ended: {e}");
    }
}

/// Whether the connection starts with the HTTP/2 client preface (peeked, not consumed).
async fn starts_with_preface(tcp: &TcpStream) -> std::io::Result<bool> {
    let mut buf = [0u8; PREFACE.len()];
    loop {
        let n = tcp.peek(&mut buf).await?;
        if n == 0 || buf[..n] != PREFACE[..n] {
            return Ok(false);
        }
        if n == PREFACE.len() {
            return Ok(true);
        }
        // Part of the preface so far: peek returns at once until more arrives.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

type KeepAlive = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Pings the client every [`KEEPALIVE_INTERVAL`]; ends when a ping goes unanswered for
/// [`KEEPALIVE_TIMEOUT`] (or the connection is gone), which drops the connection.
async fn keepalive(mut pings: h2::PingPong) {
    loop {
        tokio::time::sleep(KEEPALIVE_INTERVAL).await;
        match tokio::time::timeout(KEEPALIVE_TIMEOUT, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                tracing::debug!("a client did not answer a keep-alive ping in time");
                return;
            }
        }
    }
}

type Call = Pin<Box<dyn Future<Output = ()> + Send>>;

/// One connection: its HTTP/2 state and the calls in flight on it (module docs).
struct Driver<S> {
    conn: h2::server::Connection<AuthorityFix<TcpStream>, Bytes>,
    calls: FuturesUnordered<Call>,
    service: S,
    info: TcpConnectInfo,
    shutdown: Pin<Box<dyn Future<Output = ()> + Send>>,
    going_away: bool,
    keepalive: Option<KeepAlive>,
}

impl<S: ClientService> Future for Driver<S> {
    type Output = Result<(), h2::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if !this.going_away && this.shutdown.as_mut().poll(cx).is_ready() {
            this.going_away = true;
            this.conn.graceful_shutdown();
        }
        if let Some(k) = this.keepalive.as_mut()
            && k.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Ok(()));
        }
        loop {
            let mut progressed = false;
            // Accepting also drives the connection: reads frames, writes and flushes what the
            // calls queued since the last pass.
            loop {
                match this.conn.poll_accept(cx) {
                    Poll::Ready(Some(Ok((request, respond)))) => {
                        progressed = true;
                        this.calls.push(Box::pin(call(
                            this.service.clone(),
                            request,
                            respond,
                            this.info.clone(),
                        )));
                    }
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                    // The connection is closed (or went away and every stream ended).
                    Poll::Ready(None) => return Poll::Ready(Ok(())),
                    Poll::Pending => break,
                }
            }
            while let Poll::Ready(Some(())) = this.calls.poll_next_unpin(cx) {
                progressed = true;
            }
            if !progressed {
                return Poll::Pending;
            }
        }
    }
}

/// One call: the service's response (or the client's reset), then its body.
async fn call<S: ClientService>(
    service: S,
    request: Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    info: TcpConnectInfo,
) {
    let (mut head, recv) = request.into_parts();
    let deadline = grpc_timeout(&head.headers);
    head.extensions.insert(info);
    let request = Request::from_parts(head, tonic::body::Body::new(H2Body::new(recv)));
    let response = service.oneshot(request);
    let answered = async {
        match deadline {
            None => Ok(response.await),
            Some(d) => tokio::time::timeout(d, response).await.map_err(|_| ()),
        }
    };
    let response = tokio::select! {
        biased;
        r = answered => r,
        // The client reset the stream: drop the call.
        _ = std::future::poll_fn(|cx| respond.poll_reset(cx)) => return,
    };
    match response {
        Ok(Ok(response)) => {
            let (head, body) = response.into_parts();
            let end = body.is_end_stream();
            let Ok(send) = respond.send_response(Response::from_parts(head, ()), end) else {
                return;
            };
            if !end {
                Pipe::start(Box::pin(body), send);
            }
        }
        Ok(Err(never)) => match never {},
        Err(()) => {
            let timeout = tonic::Status::cancelled("Timeout expired").into_http::<()>();
            let _ = respond.send_response(timeout, true);
        }
    }
}

/// `grpc-timeout`: up to eight digits and a unit (H, M, S, m, u, n).
fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A response body on its way into its HTTP/2 stream.
struct Pipe<B> {
    body: Pin<Box<B>>,
    send: h2::SendStream<Bytes>,
}

impl<B> Pipe<B>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    /// Sends what the body has ready while the stream has capacity, on the caller's task;
    /// the rest goes on in a task of its own.
    fn start(body: Pin<Box<B>>, send: h2::SendStream<Bytes>) {
        let mut pipe = Pipe { body, send };
        let waker = futures::task::noop_waker();
        // Polled with a waker that is never used: a body or a stream that is not ready yet is
        // polled again, with the task's own waker, once it is spawned.
        if pipe
            .poll_pipe(&mut Context::from_waker(&waker))
            .is_pending()
        {
            tokio::spawn(std::future::poll_fn(move |cx| pipe.poll_pipe(cx)));
        }
    }

    /// Ready when the body has been sent to its end, or cannot be (the client reset the
    /// stream, the connection is gone, the body failed).
    fn poll_pipe(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.send.poll_reset(cx).is_ready() {
                return Poll::Ready(());
            }
            // At most one frame beyond the stream's send capacity is buffered, as hyper does:
            // the next is taken from the body only once there is room again.
            if self.send.capacity() == 0 {
                self.send.reserve_capacity(1);
                if self.send.capacity() == 0 {
                    match ready!(self.send.poll_capacity(cx)) {
                        Some(Ok(_)) => continue,
                        Some(Err(_)) | None => return Poll::Ready(()),
                    }
                }
            }
            let frame = match ready!(self.body.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                Some(Err(e)) => {
                    tracing::debug!("response body failed: {}", e.into());
                    self.send.send_reset(h2::Reason::INTERNAL_ERROR);
                    return Poll::Ready(());
                }
                None => {
                    let _ = self.send.send_data(Bytes::new(), true);
                    return Poll::Ready(());
                }
            };
            match frame.into_data() {
                Ok(data) => {
                    let end = self.body.is_end_stream();
                    if self.send.send_data(data, end).is_err() || end {
                        return Poll::Ready(());
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        let _ = self.send.send_trailers(trailers);
                    }
                    return Poll::Ready(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Frame;
    use http_body_util::{BodyExt, Full, StreamBody};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    type TestBody = tonic::body::Body;

    /// A service for the tests, by path: `/echo` answers the request's bytes (then
    /// `grpc-status: 0` trailers) once `gate` lets it, `/sleep` never answers (it counts its
    /// drops), `/big` answers 3 MiB in 64 KiB frames, `/stream` answers three frames 20 ms
    /// apart.
    #[derive(Clone)]
    struct TestService {
        gate: Arc<tokio::sync::Semaphore>,
        dropped: Arc<AtomicUsize>,
    }

    struct CountDrop(Arc<AtomicUsize>);
    impl Drop for CountDrop {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn with_trailers(data: Vec<Bytes>, delay: Option<Duration>) -> TestBody {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let frames = futures::stream::iter(
            data.into_iter()
                .map(Frame::data)
                .chain(std::iter::once(Frame::trailers(trailers)))
                .map(Ok::<_, Infallible>),
        );
        match delay {
            None => TestBody::new(StreamBody::new(frames)),
            Some(d) => TestBody::new(StreamBody::new(frames.then(move |f| async move {
                tokio::time::sleep(d).await;
                f
            }))),
        }
    }

    impl tower::Service<Request<TestBody>> for TestService {
        type Response = Response<TestBody>;
        type Error = Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Response<TestBody>, Infallible>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: Request<TestBody>) -> Self::Future {
            let this = self.clone();
            Box::pin(async move {
                let body = match req.uri().path() {
                    "/echo" => {
                        let got = req.into_body().collect().await.unwrap().to_bytes();
                        let _permit = this.gate.acquire().await.unwrap();
                        with_trailers(vec![got], None)
                    }
                    "/sleep" => {
                        let _guard = CountDrop(this.dropped.clone());
                        std::future::pending::<()>().await;
                        unreachable!()
                    }
                    "/big" => with_trailers(vec![Bytes::from(vec![7u8; 64 << 10]); 48], None),
                    "/stream" => with_trailers(
                        (0..3).map(|i| Bytes::from(vec![i as u8; 10])).collect(),
                        Some(Duration::from_millis(20)),
                    ),
                    _ => TestBody::new(Full::new(Bytes::from_static(b"?"))),
                };
                Ok(Response::new(body))
            })
        }
    }

    struct Running {
        addr: std::net::SocketAddr,
        service: TestService,
        not_http2: mpsc::UnboundedReceiver<std::io::Result<AuthorityFix<TcpStream>>>,
        stop: watch::Sender<bool>,
        server: tokio::task::JoinHandle<()>,
    }

    async fn start(gate_permits: usize) -> Running {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TestService {
            gate: Arc::new(tokio::sync::Semaphore::new(gate_permits)),
            dropped: Arc::new(AtomicUsize::new(0)),
        };
        let (fallback, not_http2) = mpsc::unbounded_channel();
        let (stop, stopped) = watch::channel(false);
        let server = tokio::spawn(serve(listener, service.clone(), fallback, stopped));
        Running {
            addr,
            service,
            not_http2,
            stop,
            server,
        }
    }

    async fn client(addr: std::net::SocketAddr) -> h2::client::SendRequest<Bytes> {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (send, conn) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        send
    }

    fn request(path: &str) -> Request<()> {
        Request::post(format!("http://127.0.0.1{path}"))
            .header("content-type", "application/grpc")
            .body(())
            .unwrap()
    }

    /// Sends `body` to `path`; returns the response's status, its body and its trailers.
    async fn roundtrip(
        send: &mut h2::client::SendRequest<Bytes>,
        path: &str,
        body: &'static [u8],
    ) -> (http::StatusCode, Bytes, Option<HeaderMap>) {
        let mut send = send.clone().ready().await.unwrap();
        let (response, mut stream) = send.send_request(request(path), false).unwrap();
        stream.send_data(Bytes::from_static(body), true).unwrap();
        let response = response.await.unwrap();
        let status = response.status();
        let mut recv = response.into_body();
        let mut got = Vec::new();
        while let Some(chunk) = recv.data().await {
            let chunk = chunk.unwrap();
            let _ = recv.flow_control().release_capacity(chunk.len());
            got.extend_from_slice(&chunk);
        }
        let trailers = recv.trailers().await.unwrap();
        (status, Bytes::from(got), trailers)
    }

    #[tokio::test]
    async fn calls_that_complete_together_are_all_answered_with_their_own_bytes() {
        let running = start(0).await;
        let send = client(running.addr).await;
        const BODIES: [&[u8]; 4] = [b"one", b"two", b"three", b"four"];
        let mut calls = Vec::new();
        for _ in 0..25 {
            for body in BODIES {
                let mut send = send.clone();
                calls.push(tokio::spawn(async move {
                    (body, roundtrip(&mut send, "/echo", body).await)
                }));
            }
        }
        // Every call waits at the gate; open it for all of them at once.
        tokio::time::sleep(Duration::from_millis(100)).await;
        running.service.gate.add_permits(1000);
        for c in calls {
            let (sent, (status, got, trailers)) = c.await.unwrap();
            assert_eq!(status, 200);
            assert_eq!(&got[..], sent);
            assert_eq!(trailers.unwrap()["grpc-status"], "0");
        }
    }

    #[tokio::test]
    async fn a_response_larger_than_the_clients_window_arrives_whole() {
        let running = start(1).await;
        let mut send = client(running.addr).await;
        let (status, got, trailers) = roundtrip(&mut send, "/big", b"").await;
        assert_eq!(status, 200);
        assert_eq!(got.len(), 3 << 20);
        assert!(got.iter().all(|b| *b == 7));
        assert_eq!(trailers.unwrap()["grpc-status"], "0");
    }

    #[tokio::test]
    async fn a_body_that_is_not_ready_is_piped_to_its_end() {
        let running = start(1).await;
        let mut send = client(running.addr).await;
        let (_, got, trailers) = roundtrip(&mut send, "/stream", b"").await;
        let want: Vec<u8> = (0..3u8).flat_map(|i| vec![i; 10]).collect();
        assert_eq!(&got[..], &want[..]);
        assert_eq!(trailers.unwrap()["grpc-status"], "0");
    }

    #[tokio::test]
    async fn a_call_past_its_grpc_timeout_is_answered_cancelled() {
        let running = start(1).await;
        let mut send = client(running.addr).await.ready().await.unwrap();
        let mut req = request("/sleep");
        req.headers_mut()
            .insert("grpc-timeout", "50m".parse().unwrap());
        let (response, mut stream) = send.send_request(req, false).unwrap();
        stream.send_data(Bytes::new(), true).unwrap();
        let response = tokio::time::timeout(Duration::from_secs(5), response)
            .await
            .expect("answered in time")
            .unwrap();
        assert_eq!(response.headers()["grpc-status"], "1");
        // grpc-message is percent-encoded, as the gRPC spec has it.
        assert_eq!(response.headers()["grpc-message"], "Timeout%20expired");
        assert!(response.into_body().is_end_stream());
        // The timed-out call was dropped.
        assert_eq!(running.service.dropped.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_call_whose_stream_the_client_resets_is_dropped() {
        let running = start(1).await;
        let mut send = client(running.addr).await.ready().await.unwrap();
        let (_response, mut stream) = send.send_request(request("/sleep"), false).unwrap();
        stream.send_data(Bytes::new(), true).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(running.service.dropped.load(Ordering::SeqCst), 0);
        stream.send_reset(h2::Reason::CANCEL);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while running.service.dropped.load(Ordering::SeqCst) == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the call was not dropped"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_connection_that_is_not_http2_goes_to_the_fallback() {
        use tokio::io::AsyncWriteExt;
        let mut running = start(1).await;
        let mut tcp = TcpStream::connect(running.addr).await.unwrap();
        tcp.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let handed = tokio::time::timeout(Duration::from_secs(5), running.not_http2.recv())
            .await
            .expect("handed over in time");
        assert!(matches!(handed, Some(Ok(_))));
        // An HTTP/2 client on the same port is served here, not handed over.
        let mut send = client(running.addr).await;
        let (status, got, _) = roundtrip(&mut send, "/echo", b"x").await;
        assert_eq!((status.as_u16(), &got[..]), (200, &b"x"[..]));
        assert!(running.not_http2.try_recv().is_err());
    }

    #[tokio::test]
    async fn shutdown_lets_calls_in_flight_finish_and_then_ends() {
        let running = start(0).await;
        let mut send = client(running.addr).await;
        let call = tokio::spawn(async move { roundtrip(&mut send, "/echo", b"late").await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        running.stop.send(true).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!running.server.is_finished(), "a call is still in flight");
        running.service.gate.add_permits(1);
        let (status, got, _) = call.await.unwrap();
        assert_eq!((status.as_u16(), &got[..]), (200, &b"late"[..]));
        tokio::time::timeout(Duration::from_secs(5), running.server)
            .await
            .expect("the server ended")
            .unwrap();
    }

    #[test]
    fn grpc_timeouts_parse_as_grpc_defines_them() {
        let mut h = HeaderMap::new();
        for (v, want) in [
            ("5S", Some(Duration::from_secs(5))),
            ("100m", Some(Duration::from_millis(100))),
            ("2H", Some(Duration::from_secs(7200))),
            ("3M", Some(Duration::from_secs(180))),
            ("7u", Some(Duration::from_micros(7))),
            ("9n", Some(Duration::from_nanos(9))),
            ("99999999S", Some(Duration::from_secs(99_999_999))),
            ("999999999S", None),
            ("S", None),
            ("5x", None),
            ("-5S", None),
        ] {
            h.insert("grpc-timeout", v.parse().unwrap());
            assert_eq!(grpc_timeout(&h), want, "{v}");
        }
        assert_eq!(grpc_timeout(&HeaderMap::new()), None);
    }
}
