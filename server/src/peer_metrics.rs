//! Traffic between members, under etcd's peer metric names.
//!
//! - `etcd_network_peer_sent_bytes_total{To}` and `etcd_network_peer_received_bytes_total{From}`:
//!   every HTTP/2 DATA byte a member exchanges with a peer on the peer port, in both roles. As a
//!   caller ([`PeerChannel`], the channel every peer client uses) it sends request bodies to the
//!   peer and receives response bodies from it; as a callee ([`PeerBytesLayer`], on the peer
//!   server) it receives request bodies from the calling peer and sends it response bodies.
//!   Raft replication, votes, snapshots, forwarded writes and keep-alives, read indexes and
//!   probes are all counted, as etcd counts everything on its peer streams. Headers and HTTP/2
//!   framing are not.
//! - `etcd_network_active_peers{Local,Remote}`: 1 while the last probe of the peer (see
//!   [`crate::network::spawn_prober`]) was answered, 0 after one failed.
//!
//! A callee knows its caller by the `keel-sender-member` metadata every peer request carries
//! ([`crate::network::Peers::request`]); a request without it (from a member of an older
//! version) is counted under `From="0"`/`To="0"`, as etcd counts traffic from an unknown sender.

use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll};

use axum::http::{Request, Response};
use bytes::{Buf, Bytes};
use http_body::{Body as HttpBody, Frame, SizeHint};
use prometheus::{IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry};

/// Metadata naming the member that sent a peer request (its ID in decimal).
pub const META_SENDER: &str = "keel-sender-member";

static SENT: LazyLock<IntCounterVec> = LazyLock::new(|| {
    IntCounterVec::new(
        Opts::new(
            "etcd_network_peer_sent_bytes_total",
            "The total number of bytes sent to peers.",
        ),
        &["To"],
    )
    .expect("valid counter")
});
static RECEIVED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    IntCounterVec::new(
        Opts::new(
            "etcd_network_peer_received_bytes_total",
            "The total number of bytes received from peers.",
        ),
        &["From"],
    )
    .expect("valid counter")
});
static ACTIVE: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    IntGaugeVec::new(
        Opts::new(
            "etcd_network_active_peers",
            "The current number of active peer connections.",
        ),
        &["Local", "Remote"],
    )
    .expect("valid gauge")
});

/// Adds the peer families to a member's registry (they are process-wide, like the store's
/// timing histograms).
pub fn register(registry: &Registry) -> prometheus::Result<()> {
    registry.register(Box::new(SENT.clone()))?;
    registry.register(Box::new(RECEIVED.clone()))?;
    registry.register(Box::new(ACTIVE.clone()))
}

fn sent_to(peer: u64) -> IntCounter {
    SENT.with_label_values(&[&format!("{peer:x}")])
}

fn received_from(peer: u64) -> IntCounter {
    RECEIVED.with_label_values(&[&format!("{peer:x}")])
}

/// Records whether `remote` answered this member's last probe.
pub fn set_active(local: u64, remote: u64, active: bool) {
    ACTIVE
        .with_label_values(&[&format!("{local:x}"), &format!("{remote:x}")])
        .set(i64::from(active));
}

/// Forgets `remote` (no longer a member).
pub fn forget_peer(local: u64, remote: u64) {
    let _ = ACTIVE.remove_label_values(&[&format!("{local:x}"), &format!("{remote:x}")]);
}

pin_project_lite::pin_project! {
    /// A body whose DATA bytes are added to a counter as they pass.
    pub struct ByteCountedBody<B> {
        #[pin]
        inner: B,
        counter: IntCounter,
    }
}

impl<B> HttpBody for ByteCountedBody<B>
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
        if let Some(Ok(f)) = &frame
            && let Some(data) = f.data_ref()
        {
            this.counter.inc_by(data.remaining() as u64);
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

pin_project_lite::pin_project! {
    /// A response future whose response body is counted.
    pub struct CountedResponse<F> {
        #[pin]
        inner: F,
        counter: IntCounter,
    }
}

impl<F, B, E> Future for CountedResponse<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ByteCountedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        let counter = this.counter.clone();
        Poll::Ready(result.map(|response| response.map(|inner| ByteCountedBody { inner, counter })))
    }
}

/// The peer server's layer: counts what each calling peer sends and is sent.
#[derive(Clone, Copy, Default)]
pub struct PeerBytesLayer;

impl<S> tower::Layer<S> for PeerBytesLayer {
    type Service = PeerBytesService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PeerBytesService { inner }
    }
}

#[derive(Clone)]
pub struct PeerBytesService<S> {
    inner: S,
}

impl<S, B> tower::Service<Request<tonic::body::Body>> for PeerBytesService<S>
where
    S: tower::Service<Request<tonic::body::Body>, Response = Response<B>>,
    B: HttpBody<Data = Bytes>,
{
    type Response = Response<ByteCountedBody<B>>;
    type Error = S::Error;
    type Future = CountedResponse<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<tonic::body::Body>) -> Self::Future {
        let sender = req
            .headers()
            .get(META_SENDER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        let req = req.map(|inner| {
            tonic::body::Body::new(ByteCountedBody {
                inner,
                counter: received_from(sender),
            })
        });
        CountedResponse {
            inner: self.inner.call(req),
            counter: sent_to(sender),
        }
    }
}

/// The channel to one peer, counting the request bytes sent to it and the response bytes
/// received from it.
#[derive(Clone)]
pub struct PeerChannel {
    inner: tonic::transport::Channel,
    sent: IntCounter,
    received: IntCounter,
}

impl PeerChannel {
    pub fn new(inner: tonic::transport::Channel, peer: u64) -> Self {
        PeerChannel {
            inner,
            sent: sent_to(peer),
            received: received_from(peer),
        }
    }
}

impl tower::Service<Request<tonic::body::Body>> for PeerChannel {
    type Response = Response<ByteCountedBody<tonic::body::Body>>;
    type Error = tonic::transport::Error;
    type Future = CountedResponse<tonic::transport::channel::ResponseFuture>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower::Service::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, req: Request<tonic::body::Body>) -> Self::Future {
        let sent = self.sent.clone();
        let req = req.map(|inner| {
            tonic::body::Body::new(ByteCountedBody {
                inner,
                counter: sent,
            })
        });
        CountedResponse {
            inner: tower::Service::call(&mut self.inner, req),
            counter: self.received.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn data_bytes_are_counted_and_trailers_are_not() {
        let counter = received_from(0xfeed);
        let before = counter.get();
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
            Ok(Frame::data(Bytes::from_static(b"hello"))),
            Ok(Frame::data(Bytes::from_static(b"world!"))),
            Ok(Frame::trailers(axum::http::HeaderMap::new())),
        ];
        let body = ByteCountedBody {
            inner: http_body_util::StreamBody::new(futures::stream::iter(frames)),
            counter: counter.clone(),
        };
        let collected = body.collect().await.expect("infallible");
        assert_eq!(collected.to_bytes().as_ref(), b"helloworld!");
        assert_eq!(counter.get() - before, 11);
    }
}
