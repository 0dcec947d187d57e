//! etcd's JSON gateway (grpc-gateway) on the client port: `POST /v3/kv/range` and friends.
//!
//! Every route is one gRPC method. The JSON request body is transcoded to the method's protobuf
//! message with the descriptors in [`keel_proto::FILE_DESCRIPTOR_SET`], sent in-process through
//! the same gRPC router that serves the client port (so validation, auth, admin gates and Raft
//! proposals are the gRPC code paths), and the answer is transcoded back to JSON the way etcd's
//! gateway writes it (grpc-gateway's JSONPb with `OrigName`): the proto field names, 64-bit
//! integers as strings, bytes as base64, enums by name, default values left out.
//!
//! - Unary methods answer one JSON object; errors are grpc-gateway's
//!   `{"error":"...","message":"...","code":N}` with the HTTP status it maps the gRPC code to.
//! - Streaming methods (`/v3/watch`, `/v3/lease/keepalive`, `/v3/maintenance/snapshot`,
//!   `/v3/election/observe`) read a stream of JSON objects from the request body and answer
//!   newline-delimited `{"result":{...}}` objects; an error ends the stream with
//!   `{"error":{"grpc_code":N,"http_code":N,"message":"...","http_status":"..."}}`.
//! - A watch stays open after the request body ends (as etcd's), until the client goes away.
//! - Credentials: the `Authorization` header becomes the `authorization` gRPC metadata (the
//!   token from `/v3/auth/authenticate`), `Grpc-Metadata-<key>` headers become `<key>`.
//! - Unknown JSON fields are ignored, as etcd's gateway does.

use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::http::uri::PathAndQuery;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use http_body_util::BodyExt;
use prost::Message;
use prost_reflect::{
    DescriptorPool, DeserializeOptions, DynamicMessage, Kind, MessageDescriptor, SerializeOptions,
};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue};
use tonic::service::Routes;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::{Code, Status};
use tower::Layer;

use crate::grpc_metrics::{GrpcMetrics, GrpcMetricsLayer, GrpcMetricsService};

/// etcd's gateway paths (the `google.api.http` annotations of etcd 3.5's protos) and the gRPC
/// method each one calls.
#[rustfmt::skip]
const ROUTES: &[(&str, &str, &str)] = &[
    ("/v3/kv/range", "etcdserverpb.KV", "Range"),
    ("/v3/kv/put", "etcdserverpb.KV", "Put"),
    ("/v3/kv/deleterange", "etcdserverpb.KV", "DeleteRange"),
    ("/v3/kv/txn", "etcdserverpb.KV", "Txn"),
    ("/v3/kv/compaction", "etcdserverpb.KV", "Compact"),
    ("/v3/watch", "etcdserverpb.Watch", "Watch"),
    ("/v3/lease/grant", "etcdserverpb.Lease", "LeaseGrant"),
    ("/v3/lease/revoke", "etcdserverpb.Lease", "LeaseRevoke"),
    ("/v3/kv/lease/revoke", "etcdserverpb.Lease", "LeaseRevoke"),
    ("/v3/lease/keepalive", "etcdserverpb.Lease", "LeaseKeepAlive"),
    ("/v3/lease/timetolive", "etcdserverpb.Lease", "LeaseTimeToLive"),
    ("/v3/kv/lease/timetolive", "etcdserverpb.Lease", "LeaseTimeToLive"),
    ("/v3/lease/leases", "etcdserverpb.Lease", "LeaseLeases"),
    ("/v3/kv/lease/leases", "etcdserverpb.Lease", "LeaseLeases"),
    ("/v3/cluster/member/add", "etcdserverpb.Cluster", "MemberAdd"),
    ("/v3/cluster/member/remove", "etcdserverpb.Cluster", "MemberRemove"),
    ("/v3/cluster/member/update", "etcdserverpb.Cluster", "MemberUpdate"),
    ("/v3/cluster/member/list", "etcdserverpb.Cluster", "MemberList"),
    ("/v3/cluster/member/promote", "etcdserverpb.Cluster", "MemberPromote"),
    ("/v3/maintenance/alarm", "etcdserverpb.Maintenance", "Alarm"),
    ("/v3/maintenance/status", "etcdserverpb.Maintenance", "Status"),
    ("/v3/maintenance/defragment", "etcdserverpb.Maintenance", "Defragment"),
    ("/v3/maintenance/hash", "etcdserverpb.Maintenance", "Hash"),
    ("/v3/maintenance/hashkv", "etcdserverpb.Maintenance", "HashKV"),
    ("/v3/maintenance/snapshot", "etcdserverpb.Maintenance", "Snapshot"),
    ("/v3/maintenance/transfer-leadership", "etcdserverpb.Maintenance", "MoveLeader"),
    ("/v3/auth/enable", "etcdserverpb.Auth", "AuthEnable"),
    ("/v3/auth/disable", "etcdserverpb.Auth", "AuthDisable"),
    ("/v3/auth/status", "etcdserverpb.Auth", "AuthStatus"),
    ("/v3/auth/authenticate", "etcdserverpb.Auth", "Authenticate"),
    ("/v3/auth/user/add", "etcdserverpb.Auth", "UserAdd"),
    ("/v3/auth/user/get", "etcdserverpb.Auth", "UserGet"),
    ("/v3/auth/user/list", "etcdserverpb.Auth", "UserList"),
    ("/v3/auth/user/delete", "etcdserverpb.Auth", "UserDelete"),
    ("/v3/auth/user/changepw", "etcdserverpb.Auth", "UserChangePassword"),
    ("/v3/auth/user/grant", "etcdserverpb.Auth", "UserGrantRole"),
    ("/v3/auth/user/revoke", "etcdserverpb.Auth", "UserRevokeRole"),
    ("/v3/auth/role/add", "etcdserverpb.Auth", "RoleAdd"),
    ("/v3/auth/role/get", "etcdserverpb.Auth", "RoleGet"),
    ("/v3/auth/role/list", "etcdserverpb.Auth", "RoleList"),
    ("/v3/auth/role/delete", "etcdserverpb.Auth", "RoleDelete"),
    ("/v3/auth/role/grant", "etcdserverpb.Auth", "RoleGrantPermission"),
    ("/v3/auth/role/revoke", "etcdserverpb.Auth", "RoleRevokePermission"),
    ("/v3/lock/lock", "v3lockpb.Lock", "Lock"),
    ("/v3/lock/unlock", "v3lockpb.Lock", "Unlock"),
    ("/v3/election/campaign", "v3electionpb.Election", "Campaign"),
    ("/v3/election/proclaim", "v3electionpb.Election", "Proclaim"),
    ("/v3/election/leader", "v3electionpb.Election", "Leader"),
    ("/v3/election/observe", "v3electionpb.Election", "Observe"),
    ("/v3/election/resign", "v3electionpb.Election", "Resign"),
];

/// One route, resolved against the descriptors.
struct GatewayMethod {
    grpc_path: PathAndQuery,
    input: MessageDescriptor,
    output: MessageDescriptor,
    client_streaming: bool,
    server_streaming: bool,
    /// Keep the gRPC request stream open after the HTTP body ends (etcd's watch does not end
    /// when its client stops sending).
    hold_open: bool,
}

/// The client gRPC services as the gateway calls them: through etcd's gRPC metrics, so a
/// gateway call is counted like any other (etcd's gateway calls its gRPC server over a loopback
/// connection, through the same interceptors).
type GrpcCalls = GrpcMetricsService<Routes>;

/// The gateway's routes, to be merged into the client port's HTTP router.
///
/// `grpc` is the router of the client gRPC services the gateway calls, `metrics` the gRPC
/// metrics those calls are counted in.
pub fn router(
    grpc: Routes,
    metrics: Arc<GrpcMetrics>,
    max_body_bytes: usize,
) -> anyhow::Result<axum::Router> {
    let grpc = GrpcMetricsLayer(metrics).layer(grpc);
    let pool = DescriptorPool::decode(keel_proto::FILE_DESCRIPTOR_SET)?;
    let mut router = axum::Router::new();
    for (path, service, method) in ROUTES {
        let svc = pool
            .get_service_by_name(service)
            .ok_or_else(|| anyhow::anyhow!("gateway: no service {service}"))?;
        let m = svc
            .methods()
            .find(|m| m.name() == *method)
            .ok_or_else(|| anyhow::anyhow!("gateway: no method {service}.{method}"))?;
        let resolved = Arc::new(GatewayMethod {
            grpc_path: PathAndQuery::from_str(&format!("/{service}/{method}"))?,
            input: m.input(),
            output: m.output(),
            client_streaming: m.is_client_streaming(),
            server_streaming: m.is_server_streaming(),
            hold_open: *service == "etcdserverpb.Watch",
        });
        let grpc = grpc.clone();
        router = router.route(
            path,
            axum::routing::any(move |req: axum::extract::Request| {
                handle(grpc.clone(), resolved.clone(), max_body_bytes, req)
            }),
        );
    }
    // Anything else under /v3/: grpc-gateway's 404.
    Ok(router.route(
        "/v3/{*rest}",
        axum::routing::any(|| async { plain(StatusCode::NOT_FOUND, "Not Found\n".to_string()) }),
    ))
}

fn plain(status: StatusCode, body: String) -> Response {
    let mut r = (status, body).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn handle(
    grpc: GrpcCalls,
    method: Arc<GatewayMethod>,
    max_body_bytes: usize,
    req: axum::extract::Request,
) -> Response {
    if req.method() != Method::POST {
        return plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "Method Not Allowed\n".to_string(),
        );
    }
    let (parts, body) = req.into_parts();
    let mut client = tonic::client::Grpc::new(grpc)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX);
    if let Err(e) = client.ready().await {
        return error_response(&Status::unavailable(e.to_string()));
    }
    let codec = DynCodec(method.output.clone());
    let path = method.grpc_path.clone();

    if method.client_streaming {
        let (tx, rx) = tokio::sync::mpsc::channel::<DynamicMessage>(16);
        let (gone_tx, gone_rx) = tokio::sync::oneshot::channel::<()>();
        let failure: RequestFailure = Arc::default();
        tokio::spawn(feed_requests(
            body,
            method.clone(),
            max_body_bytes,
            tx,
            gone_rx,
            failure.clone(),
        ));
        let request = with_metadata(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            &parts.headers,
            &parts.extensions,
        );
        let result = client.streaming(request, path, codec).await;
        return stream_response(result, Some((gone_tx, failure)));
    }

    let msg = match read_body(body, max_body_bytes)
        .await
        .and_then(|bytes| parse_one(&method.input, &bytes))
    {
        Ok(m) => m,
        Err(status) => return error_response(&status),
    };
    let request = with_metadata(msg, &parts.headers, &parts.extensions);
    if method.server_streaming {
        let result = client.server_streaming(request, path, codec).await;
        return stream_response(result, None);
    }
    match client.unary(request, path, codec).await {
        Ok(resp) => match to_json(&resp.into_inner()) {
            Ok(json) => json_response(StatusCode::OK, json),
            Err(status) => error_response(&status),
        },
        Err(status) => error_response(&status),
    }
}

/// A gRPC request carrying the HTTP request's credentials and connection facts.
fn with_metadata<T>(
    msg: T,
    headers: &HeaderMap,
    ext: &axum::http::Extensions,
) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    let md = req.metadata_mut();
    for (name, value) in headers {
        let key = if name == header::AUTHORIZATION {
            "authorization"
        } else if let Some(k) = name.as_str().strip_prefix("grpc-metadata-") {
            k
        } else {
            continue;
        };
        if let (Ok(k), Ok(v)) = (
            AsciiMetadataKey::from_bytes(key.as_bytes()),
            AsciiMetadataValue::try_from(value.as_bytes()),
        ) {
            md.insert(k, v);
        }
    }
    // The connection's peer (and its TLS certificate, for --client-cert-auth).
    if let Some(i) = ext.get::<TcpConnectInfo>() {
        req.extensions_mut().insert(i.clone());
    }
    if let Some(i) = ext.get::<TlsConnectInfo<TcpConnectInfo>>() {
        req.extensions_mut().insert(i.clone());
    }
    req
}

/// The whole request body, refusing more than `limit` bytes.
async fn read_body(body: Body, limit: usize) -> Result<Bytes, Status> {
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large(limit)),
        Err(e) => Err(Status::invalid_argument(e.to_string())),
    }
}

fn too_large(limit: usize) -> Status {
    Status::resource_exhausted(format!(
        "grpc: received message larger than max ({limit} bytes)"
    ))
}

/// The first JSON value of a unary request body; an empty body is the empty message (as Go's
/// decoder treats EOF), anything after the first value is ignored.
fn parse_one(desc: &MessageDescriptor, body: &[u8]) -> Result<DynamicMessage, Status> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(DynamicMessage::new(desc.clone()));
    }
    let mut values = serde_json::Deserializer::from_slice(body).into_iter::<serde_json::Value>();
    match values.next() {
        Some(Ok(v)) => from_value(desc, v),
        Some(Err(e)) => Err(Status::invalid_argument(json_error_text(&e))),
        None => Ok(DynamicMessage::new(desc.clone())),
    }
}

/// A message from its JSON: unknown fields are dropped first (etcd's gateway ignores them),
/// everything else must be valid, unknown enum names included. (prost-reflect's
/// `deny_unknown_fields(false)` would also accept unknown enum names, which etcd refuses; the
/// `requests_accept_etcds_spellings` test checks both.)
fn from_value(
    desc: &MessageDescriptor,
    mut v: serde_json::Value,
) -> Result<DynamicMessage, Status> {
    drop_unknown_fields(desc, &mut v);
    let options = DeserializeOptions::new().deny_unknown_fields(true);
    DynamicMessage::deserialize_with_options(desc.clone(), v, &options)
        .map_err(|e| Status::invalid_argument(json_error_text(&e)))
}

fn drop_unknown_fields(desc: &MessageDescriptor, v: &mut serde_json::Value) {
    let serde_json::Value::Object(map) = v else {
        return;
    };
    let field = |name: &str| {
        desc.get_field_by_name(name)
            .or_else(|| desc.get_field_by_json_name(name))
    };
    map.retain(|k, _| field(k).is_some());
    for (k, value) in map.iter_mut() {
        let Some(f) = field(k) else { continue };
        let Kind::Message(m) = f.kind() else { continue };
        if f.is_map() {
            continue;
        }
        match value {
            serde_json::Value::Array(items) if f.is_list() => {
                items.iter_mut().for_each(|i| drop_unknown_fields(&m, i))
            }
            other => drop_unknown_fields(&m, other),
        }
    }
}

fn json_error_text(e: &serde_json::Error) -> String {
    if e.is_eof() {
        "unexpected EOF".to_string()
    } else {
        e.to_string()
    }
}

/// The complete JSON values at the start of `buf` (removed from it). Incomplete trailing data
/// stays in `buf`; a malformed value is an error.
fn take_values(desc: &MessageDescriptor, buf: &mut Vec<u8>) -> Result<Vec<DynamicMessage>, Status> {
    let mut out = Vec::new();
    let mut consumed = 0;
    {
        let mut values = serde_json::Deserializer::from_slice(buf).into_iter::<serde_json::Value>();
        loop {
            match values.next() {
                None => {
                    consumed = values.byte_offset();
                    break;
                }
                Some(Ok(v)) => {
                    consumed = values.byte_offset();
                    out.push(from_value(desc, v)?);
                }
                Some(Err(e)) if e.is_eof() => break,
                Some(Err(e)) => return Err(Status::invalid_argument(e.to_string())),
            }
        }
    }
    buf.drain(..consumed);
    Ok(out)
}

/// Reads the request body of a streaming method as a sequence of JSON objects and sends each
/// to the gRPC call. Stops at a malformed object (recording the error for the response), and
/// for `hold_open` methods keeps the call's request stream open until the response is gone.
async fn feed_requests(
    body: Body,
    method: Arc<GatewayMethod>,
    limit: usize,
    tx: tokio::sync::mpsc::Sender<DynamicMessage>,
    mut gone: tokio::sync::oneshot::Receiver<()>,
    failure: RequestFailure,
) {
    let fail = |s: Status| {
        if let Ok(mut f) = failure.status.lock() {
            *f = Some(s);
        }
        // The call itself may stay open (a watch outlives its request stream, as in etcd):
        // tell the response to end with the error now.
        failure.failed.notify_one();
    };
    let mut body = body.into_data_stream();
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let chunk = tokio::select! {
            c = body.next() => c,
            _ = &mut gone => return,
        };
        match chunk {
            Some(Ok(bytes)) => {
                buf.extend_from_slice(&bytes);
                if buf.len() > limit {
                    return fail(too_large(limit));
                }
                let msgs = match take_values(&method.input, &mut buf) {
                    Ok(m) => m,
                    Err(s) => return fail(s),
                };
                for m in msgs {
                    if tx.send(m).await.is_err() {
                        return;
                    }
                }
            }
            // The client stopped sending (or went away): like the end of the body.
            Some(Err(_)) | None => break,
        }
    }
    if !buf.iter().all(u8::is_ascii_whitespace) {
        return fail(Status::invalid_argument("unexpected EOF"));
    }
    if method.hold_open {
        tokio::select! {
            _ = tx.closed() => {}
            _ = gone => {}
        }
    }
}

type JsonStream = Pin<Box<dyn Stream<Item = Result<Bytes, std::convert::Infallible>> + Send>>;

/// The error of a malformed request object in a client stream, for the response to report.
type RequestFailure = Arc<FailureSlot>;

/// How long a failed client stream waits for the responses to its earlier objects.
const FAILURE_DRAIN: std::time::Duration = std::time::Duration::from_millis(200);

/// Where the request feeder leaves the error of a malformed request object.
#[derive(Default)]
struct FailureSlot {
    status: Mutex<Option<Status>>,
    failed: tokio::sync::Notify,
}

/// Held by a client-streaming response: dropping it tells the request feeder the client is gone.
type StreamGuard = (tokio::sync::oneshot::Sender<()>, RequestFailure);

/// A streaming method's answer: `{"result":...}` lines, then an error object if the call fails.
/// `guard` (for client-streaming calls) is dropped with the response body, and holds the error
/// of a malformed request object.
fn stream_response(
    result: Result<tonic::Response<tonic::Streaming<DynamicMessage>>, Status>,
    guard: Option<StreamGuard>,
) -> Response {
    let body: JsonStream = match result {
        // grpc-gateway answers 200 and reports a failed call in the stream.
        Err(status) => Box::pin(futures::stream::once(
            async move { Ok(stream_error(&status)) },
        )),
        Ok(resp) => {
            let state = (resp.into_inner(), guard, false);
            Box::pin(futures::stream::unfold(
                state,
                |(mut upstream, guard, done)| async move {
                    if done {
                        return None;
                    }
                    // Once a malformed request object was reported, the responses to the
                    // objects before it still go out (they are usually already on their way);
                    // the stream ends with the error when none follows for a moment.
                    let failed_now = guard
                        .as_ref()
                        .is_some_and(|(_, f)| f.status.lock().is_ok_and(|s| s.is_some()));
                    let next = if failed_now {
                        tokio::time::timeout(FAILURE_DRAIN, upstream.next())
                            .await
                            .unwrap_or(None)
                    } else {
                        let failed = async {
                            match guard.as_ref() {
                                Some((_, f)) => f.failed.notified().await,
                                None => futures::future::pending().await,
                            }
                        };
                        tokio::select! {
                            biased;
                            m = upstream.next() => m,
                            _ = failed => tokio::time::timeout(FAILURE_DRAIN, upstream.next())
                                .await
                                .unwrap_or(None),
                        }
                    };
                    let item = match next {
                        Some(Ok(msg)) => match to_json(&msg) {
                            Ok(json) => {
                                let mut line = Vec::with_capacity(json.len() + 12);
                                line.extend_from_slice(b"{\"result\":");
                                line.extend_from_slice(&json);
                                line.extend_from_slice(b"}\n");
                                return Some((Ok(Bytes::from(line)), (upstream, guard, false)));
                            }
                            Err(status) => stream_error(&status),
                        },
                        Some(Err(status)) => stream_error(&status),
                        None => {
                            let bad_request = guard
                                .as_ref()
                                .and_then(|(_, f)| f.status.lock().ok().and_then(|mut f| f.take()));
                            match bad_request {
                                Some(status) => stream_error(&status),
                                None => return None,
                            }
                        }
                    };
                    Some((Ok(item), (upstream, guard, true)))
                },
            ))
        }
    };
    let mut r = Response::new(Body::from_stream(body));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut().insert(
        "grpc-metadata-content-type",
        HeaderValue::from_static("application/grpc"),
    );
    r
}

/// grpc-gateway's object for an error in a stream.
fn stream_error(status: &Status) -> Bytes {
    let http = http_status(status.code());
    Bytes::from(format!(
        r#"{{"error":{{"grpc_code":{},"http_code":{},"message":{},"http_status":{}}}}}"#,
        status.code() as i32,
        http.as_u16(),
        serde_json::Value::from(status.message()),
        serde_json::Value::from(http.canonical_reason().unwrap_or("")),
    ))
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    let mut r = (status, body).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if status == StatusCode::OK {
        r.headers_mut().insert(
            "grpc-metadata-content-type",
            HeaderValue::from_static("application/grpc"),
        );
    }
    r
}

/// grpc-gateway's error body for a failed unary call.
pub fn error_body(status: &Status) -> String {
    let msg = serde_json::Value::from(status.message());
    format!(
        r#"{{"error":{msg},"message":{msg},"code":{}}}"#,
        status.code() as i32
    )
}

fn error_response(status: &Status) -> Response {
    json_response(http_status(status.code()), error_body(status).into_bytes())
}

/// The HTTP status grpc-gateway (v1, as in etcd 3.4) gives a gRPC code.
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::REQUEST_TIMEOUT,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::FailedPrecondition => StatusCode::PRECONDITION_FAILED,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// A message as etcd's gateway writes it.
fn to_json(msg: &DynamicMessage) -> Result<Vec<u8>, Status> {
    let options = SerializeOptions::new()
        .use_proto_field_name(true)
        .stringify_64_bit_integers(true)
        .skip_default_fields(true);
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::new(&mut out);
    msg.serialize_with_options(&mut ser, &options)
        .map_err(|e| Status::internal(e.to_string()))?;
    Ok(out)
}

/// Encodes dynamic messages, decodes the method's response type.
#[derive(Clone)]
struct DynCodec(MessageDescriptor);

struct DynEncoder;
struct DynDecoder(MessageDescriptor);

impl Codec for DynCodec {
    type Encode = DynamicMessage;
    type Decode = DynamicMessage;
    type Encoder = DynEncoder;
    type Decoder = DynDecoder;

    fn encoder(&mut self) -> DynEncoder {
        DynEncoder
    }

    fn decoder(&mut self) -> DynDecoder {
        DynDecoder(self.0.clone())
    }
}

impl Encoder for DynEncoder {
    type Item = DynamicMessage;
    type Error = Status;

    fn encode(&mut self, item: DynamicMessage, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

impl Decoder for DynDecoder {
    type Item = DynamicMessage;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<DynamicMessage>, Status> {
        DynamicMessage::decode(self.0.clone(), src)
            .map(Some)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(name: &str) -> MessageDescriptor {
        DescriptorPool::decode(keel_proto::FILE_DESCRIPTOR_SET)
            .unwrap()
            .get_message_by_name(name)
            .unwrap()
    }

    #[test]
    fn every_route_resolves() {
        let metrics = GrpcMetrics::register(&prometheus::Registry::new(), false).unwrap();
        let _router = router(Routes::default(), metrics, 1 << 20).unwrap();
    }

    #[test]
    fn json_shapes_match_etcds_gateway() {
        use keel_proto::etcdserverpb::{RangeResponse, ResponseHeader};
        use keel_proto::mvccpb::KeyValue;
        let resp = RangeResponse {
            header: Some(ResponseHeader {
                cluster_id: 14841639068965178418,
                member_id: 10276657743932975437,
                revision: 2,
                raft_term: 2,
            }),
            kvs: vec![KeyValue {
                key: b"foo".to_vec(),
                create_revision: 2,
                mod_revision: 2,
                version: 1,
                value: b"bar".to_vec(),
                lease: 0,
            }],
            more: false,
            count: 1,
        };
        let d = desc("etcdserverpb.RangeResponse");
        let msg = DynamicMessage::decode(d, resp.encode_to_vec().as_slice()).unwrap();
        // Byte for byte what etcd 3.4's gateway answered.
        assert_eq!(
            String::from_utf8(to_json(&msg).unwrap()).unwrap(),
            r#"{"header":{"cluster_id":"14841639068965178418","member_id":"10276657743932975437","revision":"2","raft_term":"2"},"kvs":[{"key":"Zm9v","create_revision":"2","mod_revision":"2","version":"1","value":"YmFy"}],"count":"1"}"#
        );
    }

    #[test]
    fn requests_accept_etcds_spellings() {
        use keel_proto::etcdserverpb::RangeRequest;
        let d = desc("etcdserverpb.RangeRequest");
        let m = parse_one(
            &d,
            br#"{"key":"Zm9v","limit":"2","revision":3,"sortTarget":"MOD","sort_order":"DESCEND","bogus":1}"#,
        )
        .unwrap();
        let r = RangeRequest::decode(m.encode_to_vec().as_slice()).unwrap();
        assert_eq!(r.key, b"foo");
        assert_eq!(r.limit, 2);
        assert_eq!(r.revision, 3);
        assert_eq!(r.sort_target, 3);
        assert_eq!(r.sort_order, 2);
        assert_eq!(
            parse_one(&d, b"  ").unwrap().encode_to_vec(),
            Vec::<u8>::new()
        );
        // Unknown fields are dropped at any depth; unknown enum names are errors.
        let d_txn = desc("etcdserverpb.TxnRequest");
        let m = parse_one(
            &d_txn,
            br#"{"success":[{"request_put":{"key":"YQ==","x":1},"y":2}],"z":{}}"#,
        )
        .unwrap();
        let t = keel_proto::etcdserverpb::TxnRequest::decode(m.encode_to_vec().as_slice()).unwrap();
        assert_eq!(t.success.len(), 1);
        assert!(parse_one(&d, br#"{"sort_order":"NOPE"}"#).is_err());
        for bad in [
            &br#"{"key":"#[..],
            br#"{"key":"Zm9v!!"}"#,
            br#"{"key":5}"#,
            b"[1]",
        ] {
            let e = parse_one(&d, bad).unwrap_err();
            assert_eq!(
                e.code(),
                Code::InvalidArgument,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            parse_one(&d, br#"{"key":"#).unwrap_err().message(),
            "unexpected EOF"
        );
    }

    #[test]
    fn request_streams_are_split_into_objects() {
        let d = desc("etcdserverpb.WatchRequest");
        let mut buf =
            br#"{"create_request":{"key":"YQ=="}} {"cancel_request":{"watch_id":"1"}}{"progress"#
                .to_vec();
        let msgs = take_values(&d, &mut buf).unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!(buf, br#"{"progress"#);
        buf.extend_from_slice(br#"_request":{}}"#);
        assert_eq!(take_values(&d, &mut buf).unwrap().len(), 1);
        assert!(buf.iter().all(u8::is_ascii_whitespace));
        let mut bad = b"{]".to_vec();
        assert!(take_values(&d, &mut bad).is_err());
    }

    #[test]
    fn error_shapes() {
        let s = Status::not_found("etcdserver: requested lease not found");
        assert_eq!(
            error_body(&s),
            r#"{"error":"etcdserver: requested lease not found","message":"etcdserver: requested lease not found","code":5}"#
        );
        assert_eq!(http_status(s.code()), StatusCode::NOT_FOUND);
        assert_eq!(
            stream_error(&Status::permission_denied("etcdserver: permission denied")),
            Bytes::from_static(
                br#"{"error":{"grpc_code":7,"http_code":403,"message":"etcdserver: permission denied","http_status":"Forbidden"}}"#
            )
        );
        assert_eq!(
            http_status(Code::FailedPrecondition),
            StatusCode::PRECONDITION_FAILED
        );
    }
}
