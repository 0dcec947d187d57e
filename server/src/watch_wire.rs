//! The `etcdserverpb.Watch` gRPC service on the wire, serving responses the watch hub has
//! already encoded.
//!
//! The generated `WatchServer` would take `WatchResponse` messages and encode every one, so an
//! event delivered to a thousand watchers would be encoded a thousand times. The hub encodes
//! each event once ([`crate::watch::SharedEvent`]) and a response is assembled from those
//! bytes, written straight into the gRPC frame; this service is the generated one with that
//! codec. Requests are decoded as usual. Same path, messages and status codes as etcd.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use keel_proto::etcdserverpb::WatchRequest;
use prost::Message;
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{Body, BoxFuture, StdError, http};
use tonic::server::{Grpc, NamedService, StreamingService};

use crate::watch::{EncodedWatchStream, WatchService, WireResponse};

const WATCH_PATH: &str = "/etcdserverpb.Watch/Watch";

/// Decodes `WatchRequest`s; encodes queued responses from their shared event encodings.
#[derive(Debug, Clone, Copy, Default)]
pub struct PreEncodedCodec;

impl Codec for PreEncodedCodec {
    type Encode = WireResponse;
    type Decode = WatchRequest;
    type Encoder = PreEncodedCodec;
    type Decoder = PreEncodedCodec;

    fn encoder(&mut self) -> Self::Encoder {
        *self
    }
    fn decoder(&mut self) -> Self::Decoder {
        *self
    }
}

impl Encoder for PreEncodedCodec {
    type Item = WireResponse;
    type Error = Status;

    fn encode(&mut self, item: WireResponse, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        if item.reserve > 0 {
            dst.reserve(item.reserve);
        }
        item.out.encode_to(&item.header, dst);
        Ok(())
    }
}

impl Decoder for PreEncodedCodec {
    type Item = WatchRequest;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<WatchRequest>, Status> {
        WatchRequest::decode(src)
            .map(Some)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

/// The Watch service for tonic's router.
#[derive(Clone)]
pub struct WatchServer {
    inner: Arc<WatchService>,
    max_decoding_message_size: usize,
}

impl WatchServer {
    pub fn new(inner: WatchService, max_decoding_message_size: usize) -> Self {
        Self {
            inner: Arc::new(inner),
            max_decoding_message_size,
        }
    }
}

impl NamedService for WatchServer {
    const NAME: &'static str = "etcdserverpb.Watch";
}

struct WatchCall(Arc<WatchService>);

impl StreamingService<WatchRequest> for WatchCall {
    type Response = WireResponse;
    type ResponseStream = EncodedWatchStream;
    type Future = BoxFuture<tonic::Response<EncodedWatchStream>, Status>;

    fn call(&mut self, request: tonic::Request<tonic::Streaming<WatchRequest>>) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move { inner.watch(request).await })
    }
}

impl<B> tower::Service<http::Request<B>> for WatchServer
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != WATCH_PATH {
            return Box::pin(async move {
                Ok(Status::unimplemented("unknown method").into_http::<tonic::body::Body>())
            });
        }
        let call = WatchCall(self.inner.clone());
        let max = self.max_decoding_message_size;
        Box::pin(async move {
            let mut grpc =
                Grpc::new(PreEncodedCodec).apply_max_message_size_config(Some(max), None);
            Ok(grpc.streaming(call, req).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use keel_proto::etcdserverpb::{ResponseHeader, WatchResponse};
    use keel_proto::mvccpb::{Event, KeyValue};
    use prost::Message;

    use crate::watch::{Outgoing, SharedEvent};

    fn event(key: &str, with_prev: bool) -> Event {
        Event {
            r#type: 0,
            kv: Some(KeyValue {
                key: key.into(),
                value: vec![7; 300],
                create_revision: 3,
                mod_revision: 9,
                version: 2,
                lease: 0,
            }),
            prev_kv: with_prev.then(|| KeyValue {
                key: key.into(),
                value: b"old".to_vec(),
                mod_revision: 3,
                ..Default::default()
            }),
        }
    }

    /// A response assembled from shared event encodings is byte for byte what prost would
    /// have encoded for the same message.
    #[test]
    fn assembled_responses_match_prost_encoding() {
        let header = ResponseHeader {
            cluster_id: 11,
            member_id: 22,
            revision: 0,
            raft_term: 5,
        };
        for (watch_id, fragment) in [(0, false), (3, true), (i64::MAX, false)] {
            let events = vec![event("a", false), event("b", true)];
            let out = Outgoing::Events {
                watch_id,
                header_rev: 9,
                fragment,
                events: events
                    .iter()
                    .cloned()
                    .map(|e| Arc::new(SharedEvent::new(e)))
                    .collect(),
            };
            let expected = WatchResponse {
                header: Some(ResponseHeader {
                    revision: 9,
                    ..header
                }),
                watch_id,
                fragment,
                events,
                ..Default::default()
            };
            assert_eq!(out.encode(&header), expected.encode_to_vec());
        }
    }

    /// The room reserved for a response is never less than its encoding, whatever the
    /// member's header fields (largest values, longest varints).
    #[test]
    fn reserved_room_bounds_the_encoding() {
        let header = ResponseHeader {
            cluster_id: u64::MAX,
            member_id: u64::MAX,
            revision: 0,
            raft_term: u64::MAX,
        };
        let events: crate::watch::EventList = [event("a", false), event(&"k".repeat(300), true)]
            .into_iter()
            .map(|e| Arc::new(SharedEvent::new(e)))
            .collect();
        let outs = [
            Outgoing::Events {
                watch_id: i64::MAX,
                header_rev: i64::MAX,
                fragment: true,
                events: events.clone(),
            },
            Outgoing::Events {
                watch_id: 0,
                header_rev: 1,
                fragment: false,
                events,
            },
            Outgoing::Response(Box::new(WatchResponse {
                header: Some(ResponseHeader {
                    revision: i64::MAX,
                    ..Default::default()
                }),
                watch_id: i64::MAX,
                canceled: true,
                cancel_reason: "compacted".into(),
                compact_revision: i64::MAX,
                ..Default::default()
            })),
        ];
        for out in outs {
            let bound = out.encoded_len_bound();
            let len = out.encode(&header).len();
            assert!(bound >= len, "reserved {bound} for {len} bytes");
        }
    }

    /// Control responses get the member's header fields and keep their own revision.
    #[test]
    fn control_responses_get_member_header_fields() {
        let header = ResponseHeader {
            cluster_id: 1,
            member_id: 2,
            revision: 0,
            raft_term: 3,
        };
        let out = Outgoing::Response(Box::new(WatchResponse {
            header: Some(ResponseHeader {
                revision: 42,
                ..Default::default()
            }),
            watch_id: 7,
            created: true,
            ..Default::default()
        }));
        let decoded = WatchResponse::decode(out.encode(&header).as_slice()).unwrap();
        assert_eq!(
            decoded.header,
            Some(ResponseHeader {
                revision: 42,
                ..header
            })
        );
        assert!(decoded.created);
        assert_eq!(decoded.watch_id, 7);
    }
}
