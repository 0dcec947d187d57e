//! etcd's gRPC server metrics, as a tower layer on the client port.
//!
//! etcd exports the `go-grpc-prometheus` counters, and its dashboards and alerts are written
//! against them (RPC rate from `grpc_server_started_total{grpc_type="unary"}`, failed RPCs from
//! `grpc_server_handled_total{grpc_code=...}`, open watch streams as started minus handled
//! `bidi_stream`s). Keel exports the same series with the same labels:
//!
//! | series | labels | counted |
//! |---|---|---|
//! | `grpc_server_started_total` | service, method, type | when a call's request arrives |
//! | `grpc_server_handled_total` | + `grpc_code` | when its status is sent (or `Canceled` when the client goes away first) |
//! | `grpc_server_msg_received_total` | service, method, type | per message in the request stream |
//! | `grpc_server_msg_sent_total` | service, method, type | per message in the response stream |
//! | `etcd_network_client_grpc_received_bytes_total`, `..._sent_bytes_total` | — | message bytes, without gRPC's 5-byte prefix |
//! | `grpc_server_handling_seconds` (only with `--metrics extensive`, as etcd's) | service, method, type | from the request's arrival to the status sent |
//!
//! Every known method's series exist from the start at 0, for every status code, as etcd's
//! (`InitializeMetrics`); unknown paths are not counted, so clients cannot grow the label set.
//! Messages are counted by following gRPC's length-prefixed framing in the request and
//! response bodies (`MessageCounter`), so streams are counted message by message without the
//! services knowing.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::http::{HeaderMap, Request, Response};
use bytes::{Buf, Bytes};
use http_body::{Body as HttpBody, Frame, SizeHint};
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
};

/// gRPC status codes by number, named as `grpc_code` labels (Go's `codes.Code.String()`).
const CODE_NAMES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];
const CANCELED: usize = 1;
const UNKNOWN: usize = 2;

/// The client-facing gRPC methods (etcd's API as Keel serves it): service, method and
/// `grpc_type`.
const METHODS: &[(&str, &str, &str)] = &[
    ("etcdserverpb.KV", "Range", "unary"),
    ("etcdserverpb.KV", "Put", "unary"),
    ("etcdserverpb.KV", "DeleteRange", "unary"),
    ("etcdserverpb.KV", "Txn", "unary"),
    ("etcdserverpb.KV", "Compact", "unary"),
    ("etcdserverpb.Watch", "Watch", "bidi_stream"),
    ("etcdserverpb.Lease", "LeaseGrant", "unary"),
    ("etcdserverpb.Lease", "LeaseRevoke", "unary"),
    ("etcdserverpb.Lease", "LeaseTimeToLive", "unary"),
    ("etcdserverpb.Lease", "LeaseLeases", "unary"),
    ("etcdserverpb.Lease", "LeaseKeepAlive", "bidi_stream"),
    ("etcdserverpb.Cluster", "MemberAdd", "unary"),
    ("etcdserverpb.Cluster", "MemberRemove", "unary"),
    ("etcdserverpb.Cluster", "MemberUpdate", "unary"),
    ("etcdserverpb.Cluster", "MemberList", "unary"),
    ("etcdserverpb.Cluster", "MemberPromote", "unary"),
    ("etcdserverpb.Maintenance", "Alarm", "unary"),
    ("etcdserverpb.Maintenance", "Status", "unary"),
    ("etcdserverpb.Maintenance", "Defragment", "unary"),
    ("etcdserverpb.Maintenance", "Hash", "unary"),
    ("etcdserverpb.Maintenance", "HashKV", "unary"),
    ("etcdserverpb.Maintenance", "MoveLeader", "unary"),
    ("etcdserverpb.Maintenance", "Downgrade", "unary"),
    ("etcdserverpb.Maintenance", "Snapshot", "server_stream"),
    ("etcdserverpb.Auth", "AuthEnable", "unary"),
    ("etcdserverpb.Auth", "AuthDisable", "unary"),
    ("etcdserverpb.Auth", "AuthStatus", "unary"),
    ("etcdserverpb.Auth", "Authenticate", "unary"),
    ("etcdserverpb.Auth", "UserAdd", "unary"),
    ("etcdserverpb.Auth", "UserGet", "unary"),
    ("etcdserverpb.Auth", "UserList", "unary"),
    ("etcdserverpb.Auth", "UserDelete", "unary"),
    ("etcdserverpb.Auth", "UserChangePassword", "unary"),
    ("etcdserverpb.Auth", "UserGrantRole", "unary"),
    ("etcdserverpb.Auth", "UserRevokeRole", "unary"),
    ("etcdserverpb.Auth", "RoleAdd", "unary"),
    ("etcdserverpb.Auth", "RoleGet", "unary"),
    ("etcdserverpb.Auth", "RoleList", "unary"),
    ("etcdserverpb.Auth", "RoleDelete", "unary"),
    ("etcdserverpb.Auth", "RoleGrantPermission", "unary"),
    ("etcdserverpb.Auth", "RoleRevokePermission", "unary"),
    ("v3lockpb.Lock", "Lock", "unary"),
    ("v3lockpb.Lock", "Unlock", "unary"),
    ("v3electionpb.Election", "Campaign", "unary"),
    ("v3electionpb.Election", "Proclaim", "unary"),
    ("v3electionpb.Election", "Leader", "unary"),
    ("v3electionpb.Election", "Resign", "unary"),
    ("v3electionpb.Election", "Observe", "server_stream"),
    ("grpc.health.v1.Health", "Check", "unary"),
    ("grpc.health.v1.Health", "Watch", "server_stream"),
];

/// One method's counters, looked up once per call.
struct MethodCounters {
    started: IntCounter,
    received: IntCounter,
    sent: IntCounter,
    handled: [IntCounter; 17],
    /// With `--metrics extensive`.
    handling: Option<Histogram>,
    /// `unary` or `stream`, as `etcd_server_client_requests_total` labels the call.
    client_type: &'static str,
}

/// The counters of every known method, by request path (`/service/method`).
pub struct GrpcMetrics {
    methods: HashMap<String, Arc<MethodCounters>>,
    received_bytes: IntCounter,
    sent_bytes: IntCounter,
    /// `etcd_server_client_requests_total{client_api_version, type}`.
    client_requests: IntCounterVec,
}

impl GrpcMetrics {
    /// Creates the series (all at 0) and registers them; `extensive` adds the handling-time
    /// histograms.
    pub fn register(registry: &Registry, extensive: bool) -> prometheus::Result<Arc<GrpcMetrics>> {
        let labels = ["grpc_service", "grpc_method", "grpc_type"];
        let vec = |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntCounterVec> {
            let v = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(v.clone()))?;
            Ok(v)
        };
        let started = vec(
            "grpc_server_started_total",
            "Total number of RPCs started on the server.",
            &labels,
        )?;
        let handled = vec(
            "grpc_server_handled_total",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            &["grpc_service", "grpc_method", "grpc_type", "grpc_code"],
        )?;
        let received = vec(
            "grpc_server_msg_received_total",
            "Total number of RPC stream messages received on the server.",
            &labels,
        )?;
        let sent = vec(
            "grpc_server_msg_sent_total",
            "Total number of gRPC stream messages sent by the server.",
            &labels,
        )?;
        let handling = if extensive {
            // go-grpc-prometheus' buckets (Prometheus' defaults, 5 ms to 10 s).
            let h = HistogramVec::new(
                HistogramOpts::new(
                    "grpc_server_handling_seconds",
                    "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
                ),
                &labels,
            )?;
            registry.register(Box::new(h.clone()))?;
            Some(h)
        } else {
            None
        };
        let counter = |name: &str, help: &str| -> prometheus::Result<IntCounter> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let received_bytes = counter(
            "etcd_network_client_grpc_received_bytes_total",
            "The total number of bytes received from grpc clients.",
        )?;
        let sent_bytes = counter(
            "etcd_network_client_grpc_sent_bytes_total",
            "The total number of bytes sent to grpc clients.",
        )?;
        let mut methods = HashMap::new();
        for (service, method, kind) in METHODS {
            let l = [*service, *method, *kind];
            let handled =
                CODE_NAMES.map(|code| handled.with_label_values(&[*service, *method, *kind, code]));
            methods.insert(
                format!("/{service}/{method}"),
                Arc::new(MethodCounters {
                    started: started.with_label_values(&l),
                    received: received.with_label_values(&l),
                    sent: sent.with_label_values(&l),
                    handled,
                    handling: handling.as_ref().map(|h| h.with_label_values(&l)),
                    client_type: if *kind == "unary" { "unary" } else { "stream" },
                }),
            );
        }
        let client_requests = vec(
            "etcd_server_client_requests_total",
            "The total number of client requests per client version.",
            &["type", "client_api_version"],
        )?;
        Ok(Arc::new(GrpcMetrics {
            methods,
            received_bytes,
            sent_bytes,
            client_requests,
        }))
    }
}

/// The `client-api-version` an etcd client sends (etcd's clientv3 sets it to its major.minor),
/// or "unknown". Anything but a short dotted number is "unknown" too, so a client cannot make
/// up label values without bound.
fn client_api_version(headers: &HeaderMap) -> &str {
    match headers
        .get("client-api-version")
        .and_then(|v| v.to_str().ok())
    {
        Some(v)
            if !v.is_empty()
                && v.len() <= 8
                && v.bytes().all(|b| b.is_ascii_digit() || b == b'.') =>
        {
            v
        }
        _ => "unknown",
    }
}

/// Follows gRPC's framing (a 1-byte flag and a 4-byte big-endian length before each message)
/// across a body's data frames, however they split the messages.
#[derive(Default)]
struct MessageCounter {
    /// Prefix bytes of the next message seen so far.
    prefix: [u8; 5],
    prefix_len: usize,
    /// Bytes of the current message still to come.
    remaining: u64,
}

impl MessageCounter {
    /// Consumes one data frame; returns the messages that started in it and their bytes in it.
    fn feed(&mut self, mut data: &[u8]) -> (u64, u64) {
        let (mut messages, mut bytes) = (0, 0);
        while !data.is_empty() {
            if self.remaining > 0 {
                let n = (self.remaining.min(data.len() as u64)) as usize;
                self.remaining -= n as u64;
                bytes += n as u64;
                data = &data[n..];
                continue;
            }
            let n = (5 - self.prefix_len).min(data.len());
            self.prefix[self.prefix_len..self.prefix_len + n].copy_from_slice(&data[..n]);
            self.prefix_len += n;
            data = &data[n..];
            if self.prefix_len == 5 {
                self.prefix_len = 0;
                messages += 1;
                let len = u32::from_be_bytes([
                    self.prefix[1],
                    self.prefix[2],
                    self.prefix[3],
                    self.prefix[4],
                ]);
                self.remaining = u64::from(len);
            }
        }
        (messages, bytes)
    }
}

/// The status code of a `grpc-status` header or trailer, if there is one.
fn status_code(headers: &HeaderMap) -> Option<usize> {
    let code = headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .parse::<usize>()
        .ok()?;
    Some(if code < CODE_NAMES.len() {
        code
    } else {
        UNKNOWN
    })
}

/// The layer: counts calls to known methods on everything it wraps.
#[derive(Clone)]
pub struct GrpcMetricsLayer(pub Arc<GrpcMetrics>);

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService {
            inner,
            metrics: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct GrpcMetricsService<S> {
    inner: S,
    metrics: Arc<GrpcMetrics>,
}

impl<S, B> tower::Service<Request<tonic::body::Body>> for GrpcMetricsService<S>
where
    S: tower::Service<Request<tonic::body::Body>, Response = Response<B>>,
    B: HttpBody<Data = Bytes>,
{
    type Response = Response<CountedBody<B>>;
    type Error = S::Error;
    type Future = CountedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<tonic::body::Body>) -> Self::Future {
        let Some(counters) = self.metrics.methods.get(req.uri().path()).cloned() else {
            return CountedFuture {
                inner: self.inner.call(req),
                call: None,
            };
        };
        counters.started.inc();
        self.metrics
            .client_requests
            .with_label_values(&[counters.client_type, client_api_version(req.headers())])
            .inc();
        let call = Call {
            started: counters.handling.is_some().then(std::time::Instant::now),
            counters,
            metrics: self.metrics.clone(),
        };
        let req = req.map(|body| {
            tonic::body::Body::new(CountedBody {
                inner: body,
                counter: MessageCounter::default(),
                direction: Direction::Received,
                call: Some(call.clone()),
                status_pending: false,
            })
        });
        CountedFuture {
            inner: self.inner.call(req),
            call: Some(call),
        }
    }
}

#[derive(Clone)]
struct Call {
    counters: Arc<MethodCounters>,
    metrics: Arc<GrpcMetrics>,
    /// When the request arrived (only if handling time is measured).
    started: Option<std::time::Instant>,
}

impl Call {
    fn handled(&self, code: usize) {
        self.counters.handled[code].inc();
        if let (Some(h), Some(t)) = (&self.counters.handling, self.started) {
            h.observe(t.elapsed().as_secs_f64());
        }
    }

    fn messages(&self, direction: Direction, messages: u64, bytes: u64) {
        match direction {
            Direction::Received => {
                self.counters.received.inc_by(messages);
                self.metrics.received_bytes.inc_by(bytes);
            }
            Direction::Sent => {
                self.counters.sent.inc_by(messages);
                self.metrics.sent_bytes.inc_by(bytes);
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Direction {
    Received,
    Sent,
}

pin_project_lite::pin_project! {
    /// The inner service's response future; wraps the response body in a [`CountedBody`].
    /// Dropped before the response (the client went away), the call counts as canceled.
    pub struct CountedFuture<F> {
        #[pin]
        inner: F,
        call: Option<Call>,
    }

    impl<F> PinnedDrop for CountedFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(call) = this.project().call.take() {
                call.handled(CANCELED);
            }
        }
    }
}

impl<F, B, E> Future for CountedFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<CountedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        let call = this.call.take();
        Poll::Ready(result.map(|response| {
            // A status in the headers is a trailers-only response: the call ends here.
            let status_pending = match (&call, status_code(response.headers())) {
                (Some(call), Some(code)) => {
                    call.handled(code);
                    false
                }
                (Some(_), None) => true,
                (None, _) => false,
            };
            response.map(|inner| CountedBody {
                inner,
                counter: MessageCounter::default(),
                direction: Direction::Sent,
                call,
                status_pending,
            })
        }))
    }
}

pin_project_lite::pin_project! {
    /// A request or response body whose gRPC messages are counted as they pass; a response
    /// body also counts the call as handled when its status trailer passes (or as canceled
    /// when it is dropped before).
    pub struct CountedBody<B> {
        #[pin]
        inner: B,
        counter: MessageCounter,
        direction: Direction,
        call: Option<Call>,
        status_pending: bool,
    }

    impl<B> PinnedDrop for CountedBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if *this.status_pending && let Some(call) = this.call.as_ref() {
                call.handled(CANCELED);
            }
        }
    }
}

impl<B> HttpBody for CountedBody<B>
where
    B: HttpBody<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = std::task::ready!(this.inner.poll_frame(cx));
        if let Some(call) = this.call.as_ref() {
            match &frame {
                Some(Ok(f)) => {
                    if let Some(data) = f.data_ref() {
                        let (messages, bytes) = this.counter.feed(data.chunk());
                        call.messages(*this.direction, messages, bytes);
                    } else if let Some(trailers) = f.trailers_ref()
                        && *this.status_pending
                    {
                        *this.status_pending = false;
                        call.handled(status_code(trailers).unwrap_or(UNKNOWN));
                    }
                }
                // The body ended without a status: not a well-formed gRPC response.
                None if *this.status_pending => {
                    *this.status_pending = false;
                    call.handled(UNKNOWN);
                }
                _ => {}
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn method_type(service: &str, method: &str) -> Option<&'static str> {
        METHODS
            .iter()
            .find(|(s, m, _)| *s == service && *m == method)
            .map(|(_, _, kind)| *kind)
    }

    #[test]
    fn client_api_versions_are_short_dotted_numbers_or_unknown() {
        let version = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert("client-api-version", v.parse().unwrap());
            client_api_version(&h).to_string()
        };
        assert_eq!(version("3.4"), "3.4");
        assert_eq!(version("3.5.12"), "3.5.12");
        assert_eq!(version("3.4; more"), "unknown");
        assert_eq!(version("123456789"), "unknown");
        assert_eq!(client_api_version(&HeaderMap::new()), "unknown");
    }

    #[test]
    fn messages_are_counted_however_frames_split_them() {
        // Three messages of 3, 0 and 300 bytes.
        let mut wire = vec![0, 0, 0, 0, 3, b'a', b'b', b'c', 0, 0, 0, 0, 0];
        wire.extend_from_slice(&[0, 0, 0, 1, 44]);
        wire.extend(std::iter::repeat_n(7u8, 300));
        for split in [1, 2, 4, 5, 7, 64, wire.len()] {
            let mut c = MessageCounter::default();
            let (mut messages, mut bytes) = (0, 0);
            for chunk in wire.chunks(split) {
                let (m, b) = c.feed(chunk);
                messages += m;
                bytes += b;
            }
            assert_eq!((messages, bytes), (3, 303), "split {split}");
            assert_eq!((c.remaining, c.prefix_len), (0, 0));
        }
    }

    #[test]
    fn method_types_are_etcds() {
        assert_eq!(method_type("etcdserverpb.KV", "Put"), Some("unary"));
        assert_eq!(
            method_type("etcdserverpb.Watch", "Watch"),
            Some("bidi_stream")
        );
        assert_eq!(
            method_type("etcdserverpb.Lease", "LeaseKeepAlive"),
            Some("bidi_stream")
        );
        assert_eq!(
            method_type("etcdserverpb.Maintenance", "Snapshot"),
            Some("server_stream")
        );
        assert_eq!(
            method_type("v3electionpb.Election", "Observe"),
            Some("server_stream")
        );
        assert_eq!(method_type("etcdserverpb.KV", "Nope"), None);
        assert_eq!(method_type("x.Y", "Put"), None);
        assert_eq!(
            method_type("grpc.health.v1.Health", "Watch"),
            Some("server_stream")
        );
        // One entry per method, each with its own series.
        let registry = Registry::new();
        let m = GrpcMetrics::register(&registry, false).unwrap();
        assert_eq!(m.methods.len(), 50);
        assert_eq!(METHODS.len(), 50);
    }

    #[test]
    fn status_codes_become_etcds_labels() {
        let mut h = HeaderMap::new();
        assert_eq!(status_code(&h), None);
        h.insert("grpc-status", "11".parse().unwrap());
        assert_eq!(CODE_NAMES[status_code(&h).unwrap()], "OutOfRange");
        h.insert("grpc-status", "99".parse().unwrap());
        assert_eq!(CODE_NAMES[status_code(&h).unwrap()], "Unknown");
    }
}
