//! Plain HTTP on the client port, next to gRPC (the server accepts HTTP/1.1 and HTTP/2 on the
//! same listener; gRPC requests are routed by path as before):
//!
//! - `GET /health`: etcd 3.5's check and JSON shape, `{"health":"true","reason":""}` with 200,
//!   or `{"health":"false","reason":"..."}` with 503. Unhealthy when an alarm is raised
//!   (`ALARM NOSPACE`, `ALARM CORRUPT`; `?exclude=NOSPACE` ignores one), when there is no
//!   leader (`RAFT NO LEADER`), or when a linearizable read fails (`RANGE ERROR:...`).
//!   `?serializable=true` checks only this member (no leader or quorum needed).
//! - `GET /version`: `{"etcdserver":"3.5.16","etcdcluster":"3.5.0","keel":"<Keel's version>"}`.
//! - `GET /metrics`: Prometheus text ([`crate::metrics`]).
//! - `GET /livez`, `GET /readyz`: etcd's probe endpoints ([`crate::probes`]).
//! - `POST /v3/...`: etcd's JSON gateway ([`crate::gateway`]).

use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use keel_proto::etcdserverpb::AlarmType;

use crate::maintenance::{ETCD_CLUSTER_VERSION, ETCD_COMPAT_VERSION, alarm_name};
use crate::node::KeelNode;
use crate::watch::WatchHub;

/// How long the health check's read may take.
pub(crate) const HEALTH_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The outcome of a health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub healthy: bool,
    pub reason: String,
}

impl Health {
    fn ok() -> Health {
        Health {
            healthy: true,
            reason: String::new(),
        }
    }
    fn bad(reason: impl Into<String>) -> Health {
        Health {
            healthy: false,
            reason: reason.into(),
        }
    }
    /// etcd's JSON body.
    pub fn json(&self) -> String {
        format!(
            r#"{{"health":"{}","reason":{}}}"#,
            self.healthy,
            serde_json::Value::from(self.reason.as_str())
        )
    }
}

/// etcd 3.5's /health logic: alarms, then leader, then a read.
pub async fn check_health(node: &KeelNode, excluded: &[String], serializable: bool) -> Health {
    for a in node.mvcc.alarms() {
        let name = alarm_name(a.alarm);
        if excluded.iter().any(|e| e == name) {
            continue;
        }
        return Health::bad(match AlarmType::try_from(a.alarm) {
            Ok(AlarmType::Nospace) => "ALARM NOSPACE",
            Ok(AlarmType::Corrupt) => "ALARM CORRUPT",
            _ => "ALARM UNKNOWN",
        });
    }
    if serializable {
        return Health::ok();
    }
    if node.leader().is_none() {
        return Health::bad("RAFT NO LEADER");
    }
    match tokio::time::timeout(HEALTH_READ_TIMEOUT, node.read_barrier()).await {
        Ok(Ok(())) => Health::ok(),
        Ok(Err(e)) => Health::bad(format!("RANGE ERROR:{e}")),
        Err(_) => Health::bad(format!(
            "RANGE ERROR:{}",
            crate::error::ServerError::Timeout
        )),
    }
}

pub(crate) fn query_values<'a>(uri: &'a Uri, name: &'a str) -> impl Iterator<Item = String> + 'a {
    uri.query().unwrap_or("").split('&').filter_map(move |kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then(|| v.to_string())
    })
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response {
    let mut r = (status, body).into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

async fn health(node: Arc<KeelNode>, uri: Uri) -> Response {
    let excluded: Vec<String> = query_values(&uri, "exclude").collect();
    let serializable = query_values(&uri, "serializable").any(|v| v == "true");
    let h = check_health(&node, &excluded, serializable).await;
    if h.healthy {
        node.metrics.health_success.inc();
        text(StatusCode::OK, "text/plain; charset=utf-8", h.json())
    } else {
        node.metrics.health_failures.inc();
        tracing::warn!(reason = %h.reason, "serving /health false");
        // Go's http.Error: the body and a newline.
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain; charset=utf-8",
            format!("{}\n", h.json()),
        )
    }
}

/// The `/version` body.
pub fn version_json() -> String {
    // etcd's field order (serde_json's maps would sort the keys).
    format!(
        r#"{{"etcdserver":"{ETCD_COMPAT_VERSION}","etcdcluster":"{ETCD_CLUSTER_VERSION}","keel":"{}"}}"#,
        env!("CARGO_PKG_VERSION")
    )
}

async fn version() -> Response {
    let mut r = text(StatusCode::OK, "application/json", version_json());
    r.headers_mut().insert(
        "x-keel-version",
        HeaderValue::from_static(env!("CARGO_PKG_VERSION")),
    );
    r
}

async fn metrics(node: Arc<KeelNode>, hub: Arc<WatchHub>) -> Response {
    let body = tokio::task::spawn_blocking(move || node.metrics.render(&node, &hub))
        .await
        .unwrap_or_default();
    text(
        StatusCode::OK,
        "text/plain; version=0.0.4; charset=utf-8",
        body,
    )
}

/// Go's 404, for paths nothing serves.
pub async fn not_found() -> Response {
    text(
        StatusCode::NOT_FOUND,
        "text/plain; charset=utf-8",
        "404 page not found\n".to_string(),
    )
}

/// Anything that is neither an HTTP endpoint nor a known gRPC method: gRPC's Unimplemented
/// (what tonic answers by default) to gRPC requests, 404 to others.
async fn unimplemented(headers: axum::http::HeaderMap) -> Response {
    let grpc = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if !grpc {
        return not_found().await;
    }
    let (parts, ()) = tonic::Status::unimplemented("")
        .into_http::<()>()
        .into_parts();
    Response::from_parts(parts, axum::body::Body::empty())
}

/// The client port's router: the HTTP endpoints, the JSON gateway and the gRPC services
/// (`grpc`, which the gateway calls too).
pub fn routes(
    node: Arc<KeelNode>,
    hub: Arc<WatchHub>,
    grpc: tonic::service::Routes,
) -> anyhow::Result<tonic::service::Routes> {
    let max_body = gateway_body_limit(node.config.max_request_bytes);
    let gateway = crate::gateway::router(grpc.clone(), node.metrics.grpc.clone(), max_body)?;
    let router = metrics_routes(node.clone(), hub)
        .route("/version", get(version))
        .merge(gateway)
        .merge(grpc.into_axum_router())
        .fallback(unimplemented);
    Ok(tonic::service::Routes::from(router))
}

/// What a `--listen-metrics-urls` listener serves (as etcd's metrics listeners): `/metrics`,
/// `/health`, `/livez` and `/readyz`; the client port serves them too.
pub fn metrics_routes(node: Arc<KeelNode>, hub: Arc<WatchHub>) -> axum::Router {
    let health_node = node.clone();
    let metrics_node = node.clone();
    axum::Router::new()
        .route(
            "/health",
            get(move |uri: Uri| health(health_node.clone(), uri)),
        )
        .route(
            "/metrics",
            get(move || metrics(metrics_node.clone(), hub.clone())),
        )
        .merge(crate::probes::routes(node))
}

/// The largest JSON body the gateway reads: a request of `--max-request-bytes` with its bytes
/// in base64 (4/3) and JSON's own overhead.
fn gateway_body_limit(max_request_bytes: usize) -> usize {
    max_request_bytes.saturating_mul(2).saturating_add(1 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shapes_match_etcd() {
        assert_eq!(Health::ok().json(), r#"{"health":"true","reason":""}"#);
        assert_eq!(
            Health::bad("RAFT NO LEADER").json(),
            r#"{"health":"false","reason":"RAFT NO LEADER"}"#
        );
        let v: serde_json::Value = serde_json::from_str(&version_json()).unwrap();
        assert_eq!(v["etcdserver"], "3.5.16");
        assert_eq!(v["etcdcluster"], "3.5.0");
        assert!(version_json().starts_with(r#"{"etcdserver":"3.5.16","etcdcluster":"3.5.0","#));
    }

    #[test]
    fn query_parsing() {
        let uri: Uri = "/health?exclude=NOSPACE&serializable=true&exclude=CORRUPT"
            .parse()
            .unwrap();
        assert_eq!(
            query_values(&uri, "exclude").collect::<Vec<_>>(),
            vec!["NOSPACE", "CORRUPT"]
        );
        assert!(query_values(&uri, "serializable").any(|v| v == "true"));
    }
}
