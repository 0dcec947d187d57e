//! `/livez` and `/readyz`, etcd's probe endpoints (etcd 3.5.11 and later; Kubernetes' kubeadm
//! points its etcd liveness, readiness and startup probes at them, on the metrics port).
//!
//! Each endpoint runs named checks, as etcd's (v3.5.16):
//!
//! | endpoint | checks |
//! |---|---|
//! | `/livez` | `serializable_read`: a keys-only, limit-1 range on this member's own state |
//! | `/readyz` | `data_corruption` (no CORRUPT alarm raised), `serializable_read`, `linearizable_read` (the same range after a read barrier through the leader, within 5 s) |
//!
//! NOSPACE does not make a member unready (it still serves reads and deletes), and no leader
//! does not make it dead (restarting it would not bring one back). `?exclude=<check>` skips a
//! check (unknown names are ignored), `?verbose` lists each check's result, and
//! `/livez/<check>` or `/readyz/<check>` runs one. Success is 200 with `ok`; a failure is 503
//! with every check's line, `[-]<check> failed: <error>`, whether verbose or not. Each run is
//! counted in `etcd_server_healthcheck{type,name}` (1 or 0) and
//! `etcd_server_healthchecks_total{type,name,status}`.

use std::sync::Arc;

use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use keel_proto::etcdserverpb::{AlarmType, RangeRequest};

use crate::node::KeelNode;

/// One named check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Check {
    DataCorruption,
    SerializableRead,
    LinearizableRead,
}

impl Check {
    fn name(self) -> &'static str {
        match self {
            Check::DataCorruption => "data_corruption",
            Check::SerializableRead => "serializable_read",
            Check::LinearizableRead => "linearizable_read",
        }
    }

    async fn run(self, node: &KeelNode) -> Result<(), String> {
        match self {
            Check::DataCorruption => {
                if node
                    .mvcc
                    .alarms()
                    .iter()
                    .any(|a| a.alarm == AlarmType::Corrupt as i32)
                {
                    return Err("alarm activated: CORRUPT".to_string());
                }
                Ok(())
            }
            Check::SerializableRead => local_read(node),
            Check::LinearizableRead => {
                match tokio::time::timeout(crate::http::HEALTH_READ_TIMEOUT, node.read_barrier())
                    .await
                {
                    Ok(Ok(())) => local_read(node),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(crate::error::ServerError::Timeout.to_string()),
                }
            }
        }
    }
}

/// Which endpoint (also the `type` label of the metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    Livez,
    Readyz,
}

impl Probe {
    fn name(self) -> &'static str {
        match self {
            Probe::Livez => "livez",
            Probe::Readyz => "readyz",
        }
    }

    /// The endpoint's checks, in the order they run and print.
    fn checks(self) -> &'static [Check] {
        match self {
            Probe::Livez => &[Check::SerializableRead],
            Probe::Readyz => &[
                Check::DataCorruption,
                Check::SerializableRead,
                Check::LinearizableRead,
            ],
        }
    }
}

/// etcd's read check: a keys-only range of at most one key, on this member's state.
fn local_read(node: &KeelNode) -> Result<(), String> {
    let req = RangeRequest {
        keys_only: true,
        limit: 1,
        serializable: true,
        ..Default::default()
    };
    node.mvcc.range(&req).map(|_| ()).map_err(|e| e.to_string())
}

/// Runs `checks` in order: whether all passed, and one line per check.
async fn run(node: &KeelNode, probe: Probe, checks: &[Check]) -> (bool, String) {
    let mut ok = true;
    let mut lines = String::new();
    for check in checks {
        let result = check.run(node).await;
        let name = check.name();
        node.metrics
            .health_check(probe.name(), name, result.is_ok());
        match result {
            Ok(()) => lines.push_str(&format!("[+]{name} ok\n")),
            Err(e) => {
                ok = false;
                lines.push_str(&format!("[-]{name} failed: {e}\n"));
            }
        }
    }
    (ok, lines)
}

fn plain(status: StatusCode, body: String) -> Response {
    let mut r = (status, body).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

/// Serves `/livez`, `/readyz` (`check` = None) and `/livez/<check>`, `/readyz/<check>`.
pub async fn serve(
    node: Arc<KeelNode>,
    probe: Probe,
    check: Option<String>,
    method: Method,
    uri: Uri,
) -> Response {
    if method != Method::GET {
        let mut r = plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "Method Not Allowed\n".to_string(),
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET"));
        return r;
    }
    let checks: Vec<Check> = match &check {
        Some(name) => match probe.checks().iter().find(|c| c.name() == name.as_str()) {
            Some(c) => vec![*c],
            None => return crate::http::not_found().await,
        },
        None => {
            let excluded: Vec<String> = crate::http::query_values(&uri, "exclude").collect();
            probe
                .checks()
                .iter()
                .copied()
                .filter(|c| !excluded.iter().any(|e| e == c.name()))
                .collect()
        }
    };
    let (ok, lines) = run(&node, probe, &checks).await;
    if !ok {
        tracing::warn!(probe = probe.name(), reason = %lines.trim_end(), "probe failed");
        // Go's http.Error: the body and a newline.
        return plain(StatusCode::SERVICE_UNAVAILABLE, format!("{lines}\n"));
    }
    let body = if crate::http::query_values(&uri, "verbose").next().is_some() {
        format!("{lines}ok\n")
    } else {
        "ok\n".to_string()
    };
    plain(StatusCode::OK, body)
}

/// The probe routes, for the client port's and the metrics listeners' routers.
pub fn routes(node: Arc<KeelNode>) -> axum::Router {
    use axum::extract::Path;
    use axum::routing::any;
    let mut router = axum::Router::new();
    for probe in [Probe::Livez, Probe::Readyz] {
        let n = node.clone();
        router = router.route(
            &format!("/{}", probe.name()),
            any(move |method: Method, uri: Uri| serve(n.clone(), probe, None, method, uri)),
        );
        let n = node.clone();
        router = router.route(
            &format!("/{}/{{check}}", probe.name()),
            any(move |Path(check): Path<String>, method: Method, uri: Uri| {
                serve(n.clone(), probe, Some(check), method, uri)
            }),
        );
    }
    router
}
