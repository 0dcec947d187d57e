//! Maintenance and operations: alarms and the backend quota, HashKV across members, the HTTP
//! endpoints on the client port, etcdctl's maintenance commands, auto-compaction.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use etcd_client::{AlarmAction, AlarmOptions, AlarmType, Compare, CompareOp, Txn, TxnOp};

use crate::cluster::{Cluster, client, status_code, status_message};

/// A plain HTTP/1.1 GET (or another method): status code and body.
pub(crate) fn http(port: u16, method: &str, path: &str) -> (u16, String) {
    try_http(port, method, path).expect("HTTP request")
}

/// [`http`], with a connection that fails (refused, reset) as an error.
pub(crate) fn try_http(port: u16, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    Ok((
        code,
        if chunked {
            dechunk(body)
        } else {
            body.to_string()
        },
    ))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        body = &rest[n + 2..];
    }
    out
}

fn etcdctl(endpoints: &[String], args: &[&str]) -> (bool, String) {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", endpoints.join(",")))
        .args(args)
        .output()
        .expect("etcdctl is installed by scripts/test.sh (Debian package etcd-client)");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn deactivate(member: u64, alarm: AlarmType) -> (AlarmAction, AlarmType, Option<AlarmOptions>) {
    let mut o = AlarmOptions::new();
    o.with_member(member);
    (AlarmAction::Deactivate, alarm, Some(o))
}

#[tokio::test]
async fn quota_alarm_round_trip() {
    let quota: i64 = 8 << 20;
    let cluster = Cluster::start_with(1, &["--quota-backend-bytes", &quota.to_string()]).await;
    let m = &cluster.members[0];
    let mut c = client(&m.endpoint()).await.unwrap();
    let value = vec![b'x'; 100 * 1024];
    let mut refused = None;
    for i in 0..400 {
        if let Err(e) = c.put(format!("q/{i:04}"), value.clone(), None).await {
            refused = Some(e);
            break;
        }
    }
    let e = refused.expect("the quota stops writes");
    assert_eq!(
        status_message(&e),
        "etcdserver: mvcc: database space exceeded"
    );
    assert_eq!(status_code(&e), Some(tonic::Code::ResourceExhausted));

    let me = c.status().await.unwrap().header().unwrap().member_id();
    let alarms = c
        .alarm(AlarmAction::Get, AlarmType::None, None)
        .await
        .unwrap();
    assert_eq!(alarms.alarms().len(), 1);
    assert_eq!(alarms.alarms()[0].member_id(), me);
    assert_eq!(alarms.alarms()[0].alarm(), AlarmType::Nospace);
    let status = c.status().await.unwrap();
    assert!(
        status
            .errors()
            .contains(&format!("memberID:{me} alarm:NOSPACE ")),
        "{:?}",
        status.errors()
    );
    let (code, body) = http(m.client_port, "GET", "/health");
    assert_eq!(
        (code, body.trim()),
        (503, r#"{"health":"false","reason":"ALARM NOSPACE"}"#)
    );
    let (code, _) = http(m.client_port, "GET", "/health?exclude=NOSPACE");
    assert_eq!(code, 200);

    // Writes that grow the store fail; reads, deletes and compaction work.
    let e = c.put("small", "v", None).await.unwrap_err();
    assert_eq!(
        status_message(&e),
        "etcdserver: mvcc: database space exceeded"
    );
    let e = c.lease_grant(60, None).await.unwrap_err();
    assert_eq!(
        status_message(&e),
        "etcdserver: mvcc: database space exceeded"
    );
    let e = c
        .txn(Txn::new().and_then([TxnOp::put("t", "v", None)]))
        .await
        .unwrap_err();
    assert_eq!(
        status_message(&e),
        "etcdserver: mvcc: database space exceeded"
    );
    let read_only = c
        .txn(
            Txn::new()
                .when([Compare::version("q/0000", CompareOp::Greater, 0)])
                .and_then([TxnOp::get("q/0000", None)]),
        )
        .await
        .unwrap();
    assert!(read_only.succeeded());
    assert!(c.get("q/0000", None).await.unwrap().count() == 1);
    c.delete("q/", Some(etcd_client::DeleteOptions::new().with_prefix()))
        .await
        .unwrap();
    let rev = c
        .get("q/", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    // Physical: returns once the compacted revisions are removed from the store, so the
    // defragmentation after it finds them gone (without it, removal runs in the background).
    c.compact(
        rev,
        Some(etcd_client::CompactionOptions::new().with_physical()),
    )
    .await
    .unwrap();
    c.defragment().await.unwrap();
    let status = c.status().await.unwrap();
    assert!(
        status.db_size() < quota / 4,
        "defragment reclaims the space: {}",
        status.db_size()
    );

    // Still refused until the alarm is disarmed.
    assert!(c.put("small", "v", None).await.is_err());
    let (action, kind, opts) = deactivate(me, AlarmType::Nospace);
    let resp = c.alarm(action, kind, opts).await.unwrap();
    assert_eq!(resp.alarms().len(), 1, "the disarmed alarm is returned");
    assert!(
        c.alarm(AlarmAction::Get, AlarmType::None, None)
            .await
            .unwrap()
            .alarms()
            .is_empty()
    );
    c.put("small", "v", None).await.unwrap();
    c.lease_grant(60, None).await.unwrap();
    assert_eq!(http(m.client_port, "GET", "/health").0, 200);
}

#[tokio::test]
async fn corrupt_alarm_refuses_writes_until_disarmed() {
    let cluster = Cluster::start(1).await;
    let m = &cluster.members[0];
    let mut c = client(&m.endpoint()).await.unwrap();
    c.put("k", "v", None).await.unwrap();
    let me = c.status().await.unwrap().header().unwrap().member_id();
    let mut o = AlarmOptions::new();
    o.with_member(me);
    c.alarm(AlarmAction::Activate, AlarmType::Corrupt, Some(o))
        .await
        .unwrap();
    let e = c.put("k", "w", None).await.unwrap_err();
    assert_eq!(status_message(&e), "etcdserver: corrupt cluster");
    assert_eq!(status_code(&e), Some(tonic::Code::DataLoss));
    assert!(c.delete("k", None).await.is_err());
    assert!(c.lease_grant(60, None).await.is_err());
    assert_eq!(c.get("k", None).await.unwrap().kvs()[0].value(), b"v");
    let (code, body) = http(m.client_port, "GET", "/health");
    assert_eq!(
        (code, body.trim()),
        (503, r#"{"health":"false","reason":"ALARM CORRUPT"}"#)
    );
    // etcd's probes: not ready (every check listed), still live; readiness without the
    // corruption check.
    assert_eq!(
        http(m.client_port, "GET", "/readyz"),
        (
            503,
            "[-]data_corruption failed: alarm activated: CORRUPT\n[+]serializable_read ok\n[+]linearizable_read ok\n\n".to_string()
        )
    );
    assert_eq!(
        http(m.client_port, "GET", "/livez"),
        (200, "ok\n".to_string())
    );
    assert_eq!(
        http(m.client_port, "GET", "/readyz?exclude=data_corruption"),
        (200, "ok\n".to_string())
    );
    let (action, kind, opts) = deactivate(me, AlarmType::Corrupt);
    c.alarm(action, kind, opts).await.unwrap();
    c.put("k", "w", None).await.unwrap();
}

#[tokio::test]
async fn hashkv_is_equal_across_members_after_a_workload() {
    // A fast corruption check runs throughout and must not accuse anyone.
    let cluster = Cluster::start_with(3, &["--corrupt-check-time", "1s"]).await;
    let eps = cluster.endpoints();
    let mut c = client(&eps[0]).await.unwrap();
    let lease = c.lease_grant(600, None).await.unwrap().id();
    for i in 0..200 {
        let key = format!("w/{:03}", i % 37);
        match i % 5 {
            0 => {
                c.delete(key, None).await.unwrap();
            }
            1 => {
                c.put(
                    key,
                    format!("v{i}"),
                    Some(etcd_client::PutOptions::new().with_lease(lease)),
                )
                .await
                .unwrap();
            }
            2 => {
                c.txn(
                    Txn::new()
                        .when([Compare::version(key.clone(), CompareOp::Greater, 0)])
                        .and_then([TxnOp::put(key.clone(), format!("t{i}"), None)])
                        .or_else([TxnOp::put(key, "new", None)]),
                )
                .await
                .unwrap();
            }
            _ => {
                c.put(key, format!("v{i}"), None).await.unwrap();
            }
        }
        if i == 120 {
            let rev = c
                .get("w/", None)
                .await
                .unwrap()
                .header()
                .unwrap()
                .revision();
            c.compact(rev - 50, None).await.unwrap();
        }
    }
    let rev = c
        .get("w/", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let mut hashes = Vec::new();
    for ep in &eps {
        let mut mc = client(ep).await.unwrap();
        // Wait until this member has applied the workload.
        let deadline = Instant::now() + Duration::from_secs(10);
        while mc
            .get(
                "w/",
                Some(etcd_client::GetOptions::new().with_serializable()),
            )
            .await
            .unwrap()
            .header()
            .unwrap()
            .revision()
            < rev
        {
            assert!(Instant::now() < deadline, "{ep} did not catch up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let h = mc.hash_kv(rev).await.unwrap();
        assert_eq!(h.hash_revision(), rev);
        hashes.push((h.hash(), h.compact_version()));
        assert!(mc.hash().await.is_ok());
    }
    assert!(
        hashes.iter().all(|h| *h == hashes[0]),
        "HashKV differs: {hashes:?}"
    );
    assert!(hashes[0].1 > 0, "the compaction is part of the answer");
    // Errors as etcd: a compacted and a future revision.
    let e = c.hash_kv(2).await.unwrap_err();
    assert_eq!(
        status_message(&e),
        "etcdserver: mvcc: required revision has been compacted"
    );
    let e = c.hash_kv(rev + 1000).await.unwrap_err();
    assert_eq!(
        status_message(&e),
        "etcdserver: mvcc: required revision is a future revision"
    );
    // A few corruption-check rounds later there is still no alarm.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let alarms = c
        .alarm(AlarmAction::Get, AlarmType::None, None)
        .await
        .unwrap();
    let raised: Vec<_> = alarms
        .alarms()
        .iter()
        .map(|a| (a.member_id(), a.alarm()))
        .collect();
    assert!(raised.is_empty(), "{raised:?}");
}

#[tokio::test]
async fn corruption_check_raises_corrupt_for_the_diverging_member() {
    let mut cluster = Cluster::start_with(3, &["--corrupt-check-time", "1s"]).await;
    let leader = cluster.leader().await;
    let bad = (leader + 1) % 3;
    let mut c = client(&cluster.members[leader].endpoint()).await.unwrap();
    for i in 0..20 {
        c.put(format!("k{i}"), "v", None).await.unwrap();
    }
    let bad_id = client(&cluster.members[bad].endpoint())
        .await
        .unwrap()
        .status()
        .await
        .unwrap()
        .header()
        .unwrap()
        .member_id();
    // Restart one follower so that it reports a wrong HashKV.
    cluster.members[bad].kill();
    cluster.members[bad]
        .extra
        .push("--debug-corrupt-hashkv".into());
    cluster.members[bad].start();
    cluster.wait_ready(Duration::from_secs(30)).await;
    let leader = cluster.leader().await;
    let mut c = client(&cluster.members[leader].endpoint()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let raised = loop {
        let alarms = c
            .alarm(AlarmAction::Get, AlarmType::None, None)
            .await
            .unwrap();
        let raised: Vec<_> = alarms
            .alarms()
            .iter()
            .map(|a| (a.member_id(), a.alarm()))
            .collect();
        if !raised.is_empty() {
            break raised;
        }
        assert!(Instant::now() < deadline, "no CORRUPT alarm");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(raised, vec![(bad_id, AlarmType::Corrupt)]);
    let e = c.put("k", "w", None).await.unwrap_err();
    assert_eq!(status_message(&e), "etcdserver: corrupt cluster");
    let log = cluster.members[leader].log();
    assert!(log.contains("HashKV mismatch"), "{log}");
}

#[tokio::test]
async fn http_endpoints_on_the_client_port() {
    let cluster = Cluster::start(1).await;
    let port = cluster.members[0].client_port;
    let mut c = client(&cluster.members[0].endpoint()).await.unwrap();
    c.put("k", "v", None).await.unwrap();
    let _watch = c.watch("k", None).await.unwrap();

    let (code, body) = http(port, "GET", "/health");
    assert_eq!(
        (code, body.as_str()),
        (200, r#"{"health":"true","reason":""}"#)
    );
    let (code, body) = http(port, "GET", "/health?serializable=true");
    assert_eq!(
        (code, body.as_str()),
        (200, r#"{"health":"true","reason":""}"#)
    );
    assert_eq!(http(port, "POST", "/health").0, 405);

    let (code, body) = http(port, "GET", "/version");
    assert_eq!(code, 200);
    assert!(
        body.starts_with(r#"{"etcdserver":"3.5.16","etcdcluster":"3.5.0","keel":""#),
        "{body}"
    );

    // One value read, found in the cache of recent values (the put left it there).
    assert_eq!(c.get("k", None).await.unwrap().kvs()[0].value(), b"v");
    let (code, body) = http(port, "GET", "/metrics");
    assert_eq!(code, 200);
    for name in [
        "keel_value_cache_entries 1",
        "keel_value_cache_hits_total 1",
        "keel_value_cache_misses_total 0",
        "etcd_server_has_leader 1",
        "etcd_server_is_leader 1",
        "etcd_server_leader_changes_seen_total 1",
        "etcd_server_proposals_committed_total",
        "etcd_server_proposals_applied_total",
        "etcd_server_proposals_failed_total 0",
        "etcd_server_proposals_pending 0",
        "etcd_mvcc_db_total_size_in_bytes",
        "etcd_mvcc_db_total_size_in_use_in_bytes",
        "etcd_disk_wal_fsync_duration_seconds_bucket{le=\"0.001\"}",
        "etcd_disk_backend_commit_duration_seconds_count",
        "etcd_debugging_mvcc_keys_total 1",
        "etcd_debugging_mvcc_watcher_total 1",
        "etcd_debugging_lease_granted_total 0",
        "etcd_server_version{server_version=\"3.5.16\"} 1",
        "grpc_server_started_total{grpc_method=\"Put\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 1",
    ] {
        assert!(body.contains(name), "/metrics lacks {name}:\n{body}");
    }
    // gRPC still works on the same port after HTTP/1.1 requests.
    assert_eq!(c.get("k", None).await.unwrap().count(), 1);
    assert_eq!(http(port, "GET", "/nothing-here").0, 404);
}

/// The value of one series in a `/metrics` body (`name{labels}` exactly as printed).
pub(crate) fn metric(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// etcd's gRPC counters (what its dashboards and alerts read), the process metrics and
/// `etcdctl check datascale`, which reads the resident memory from `/metrics`.
#[tokio::test]
async fn grpc_and_process_metrics_as_etcds() {
    let cluster = Cluster::start(1).await;
    let port = cluster.members[0].client_port;
    let mut c = client(&cluster.members[0].endpoint()).await.unwrap();
    // Counts below are changes from here (starting the cluster made calls of its own).
    let before = http(port, "GET", "/metrics").1;
    let put = c.put("a", "1", None).await.unwrap();
    // The byte counters count message bytes, as etcd's: one PutRequest in, one PutResponse out.
    {
        use keel_proto::etcdserverpb::{PutRequest, PutResponse, ResponseHeader};
        use prost::Message as _;
        let h = put.header().unwrap();
        let sent = PutResponse {
            header: Some(ResponseHeader {
                cluster_id: h.cluster_id(),
                member_id: h.member_id(),
                revision: h.revision(),
                raft_term: h.raft_term(),
            }),
            prev_kv: None,
        };
        let received = PutRequest {
            key: b"a".to_vec(),
            value: b"1".to_vec(),
            ..Default::default()
        };
        let after = http(port, "GET", "/metrics").1;
        for (series, bytes) in [
            (
                "etcd_network_client_grpc_received_bytes_total",
                received.encoded_len(),
            ),
            (
                "etcd_network_client_grpc_sent_bytes_total",
                sent.encoded_len(),
            ),
        ] {
            let delta = metric(&after, series).unwrap() - metric(&before, series).unwrap();
            assert_eq!(delta, bytes as f64, "{series}");
        }
    }
    c.put("a", "2", None).await.unwrap();
    let e = c
        .get(
            "a",
            Some(etcd_client::GetOptions::new().with_revision(1000)),
        )
        .await
        .unwrap_err();
    assert_eq!(status_code(&e), Some(tonic::Code::OutOfRange));
    let mut stream = c.watch("a", None).await.unwrap();
    let first = stream.message().await.unwrap().unwrap();
    assert!(first.created());
    c.put("a", "3", None).await.unwrap();
    assert_eq!(stream.message().await.unwrap().unwrap().events().len(), 1);
    drop(stream);

    let kv = |m: &str, t: &str| {
        format!("grpc_method=\"{m}\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"{t}\"")
    };
    let watch =
        "grpc_method=\"Watch\",grpc_service=\"etcdserverpb.Watch\",grpc_type=\"bidi_stream\"";
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let (code, body) = http(port, "GET", "/metrics");
        assert_eq!(code, 200);
        // The stream's end is counted when the server sees the client cancel it.
        if metric(
            &body,
            &format!("grpc_server_handled_total{{grpc_code=\"Canceled\",{watch}}}"),
        ) == Some(1.0)
        {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "watch stream not counted as ended:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let expect = [
        (
            format!("grpc_server_started_total{{{}}}", kv("Put", "unary")),
            3.0,
        ),
        (
            format!(
                "grpc_server_handled_total{{grpc_code=\"OK\",{}}}",
                kv("Put", "unary")
            ),
            3.0,
        ),
        (
            format!("grpc_server_msg_received_total{{{}}}", kv("Put", "unary")),
            3.0,
        ),
        (
            format!("grpc_server_msg_sent_total{{{}}}", kv("Put", "unary")),
            3.0,
        ),
        (
            format!("grpc_server_started_total{{{}}}", kv("Range", "unary")),
            1.0,
        ),
        (
            format!("grpc_server_msg_received_total{{{}}}", kv("Range", "unary")),
            1.0,
        ),
        (
            format!(
                "grpc_server_handled_total{{grpc_code=\"OutOfRange\",{}}}",
                kv("Range", "unary")
            ),
            1.0,
        ),
        (
            format!(
                "grpc_server_handled_total{{grpc_code=\"OK\",{}}}",
                kv("Range", "unary")
            ),
            0.0,
        ),
        (
            format!("grpc_server_msg_sent_total{{{}}}", kv("Range", "unary")),
            0.0,
        ),
        // Every method's series exist before its first call, as etcd's.
        (
            format!(
                "grpc_server_handled_total{{grpc_code=\"Unavailable\",{}}}",
                kv("Txn", "unary")
            ),
            0.0,
        ),
        (format!("grpc_server_started_total{{{watch}}}"), 1.0),
        (format!("grpc_server_msg_received_total{{{watch}}}"), 1.0),
        // The created response and the event.
        (format!("grpc_server_msg_sent_total{{{watch}}}"), 2.0),
    ];
    for (series, delta) in expect {
        let (was, is) = (metric(&before, &series), metric(&body, &series));
        assert!(
            was.is_some(),
            "{series} missing before the calls:\n{before}"
        );
        assert_eq!(
            is.zip(was).map(|(is, was)| is - was),
            Some(delta),
            "{series} in:\n{body}"
        );
    }
    assert_eq!(
        metric(&body, "etcd_server_quota_backend_bytes"),
        Some(2147483648.0)
    );
    // Three puts on a fresh store: revision 4, never compacted.
    assert_eq!(
        metric(&body, "etcd_debugging_mvcc_current_revision"),
        Some(4.0)
    );
    assert_eq!(
        metric(&body, "etcd_debugging_mvcc_compact_revision"),
        Some(0.0)
    );
    assert_eq!(
        metric(&body, "etcd_cluster_version{cluster_version=\"3.5\"}"),
        Some(1.0)
    );
    for series in [
        "etcd_network_client_grpc_received_bytes_total",
        "etcd_network_client_grpc_sent_bytes_total",
        "process_resident_memory_bytes",
        "process_open_fds",
    ] {
        assert!(
            metric(&body, series).is_some_and(|v| v > 0.0),
            "{series} in:\n{body}"
        );
    }

    let (ok, out) = etcdctl(&cluster.endpoints(), &["check", "datascale"]);
    assert!(
        ok && out.contains("PASS: Approximate system memory used"),
        "{out}"
    );
}

/// `grpc.health.v1.Health` as etcd serves it (checked against etcd 3.4 with grpc-go's
/// semantics): the empty name is SERVING, other names are unknown; a Watch stays open and ends
/// when the member stops, so it does not hold a graceful stop.
#[tokio::test]
async fn grpc_health_service_as_etcds() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let mut cluster = Cluster::start(1).await;
    let ch =
        tonic::transport::Channel::from_shared(format!("http://{}", cluster.members[0].endpoint()))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let mut h = HealthClient::new(ch);
    let req = |service: &str| HealthCheckRequest {
        service: service.to_string(),
    };
    let ok = h.check(req("")).await.unwrap().into_inner();
    assert_eq!(ok.status, ServingStatus::Serving as i32);
    for name in ["etcdserverpb.KV", "nope"] {
        let e = h.check(req(name)).await.unwrap_err();
        assert_eq!(
            (e.code(), e.message()),
            (tonic::Code::NotFound, "unknown service")
        );
    }
    let mut unknown = h.watch(req("nope")).await.unwrap().into_inner();
    let first = unknown.message().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::ServiceUnknown as i32);
    let mut all = h.watch(req("")).await.unwrap().into_inner();
    let first = all.message().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);
    // Nothing more while the member runs.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), all.message())
            .await
            .is_err()
    );
    cluster.members[0].signal("TERM");
    let ended = tokio::time::timeout(Duration::from_secs(10), all.message())
        .await
        .expect("health watch still open after the member stopped");
    assert!(!matches!(ended, Ok(Some(_))), "{ended:?}");
    let status = cluster.members[0].wait_exit(Duration::from_secs(15)).await;
    assert!(status.success(), "unclean exit after SIGTERM: {status}");
}

/// etcd's peer metrics, which its alerts read (`etcdMemberCommunicationSlow`,
/// `etcdMembersDown`): every member measures its round trip to each peer, labelled with the
/// peer's ID in hex, and counts sends to a peer that fail.
#[tokio::test]
async fn peer_round_trips_and_send_failures() {
    let mut cluster = Cluster::start(3).await;
    let mut ids = Vec::new();
    for m in &cluster.members {
        let mut c = client(&m.endpoint()).await.unwrap();
        ids.push(c.status().await.unwrap().header().unwrap().member_id());
    }
    let series = |name: &str, to: u64| format!("{name}{{To=\"{to:x}\"}}");
    let rtt = "etcd_network_peer_round_trip_time_seconds_count";
    let failures = "etcd_network_peer_sent_failures_total";
    let deadline = Instant::now() + Duration::from_secs(20);
    for (i, m) in cluster.members.iter().enumerate() {
        loop {
            let body = http(m.client_port, "GET", "/metrics").1;
            let probed = (0..3)
                .filter(|j| *j != i)
                .all(|j| metric(&body, &series(rtt, ids[j])).is_some_and(|n| n >= 1.0));
            // Never a series for the member itself.
            assert!(metric(&body, &series(rtt, ids[i])).is_none(), "{body}");
            if probed {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "member {i} has not probed its peers:\n{body}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    let port = cluster.members[0].client_port;
    let before = metric(&http(port, "GET", "/metrics").1, &series(failures, ids[2])).unwrap_or(0.0);
    cluster.members[2].kill();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let body = http(port, "GET", "/metrics").1;
        if metric(&body, &series(failures, ids[2])).is_some_and(|n| n > before) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no send failure counted to the dead member:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `--listen-metrics-urls` serves `/metrics`, `/health`, `/livez` and `/readyz` only, as
/// etcd's; `--metrics extensive` adds the gRPC handling-time histograms. Without a quorum a
/// member stays live but is not ready, and says why.
#[tokio::test]
async fn metrics_listener_and_probes() {
    let metrics_port = crate::cluster::free_port();
    let url = format!("http://127.0.0.1:{metrics_port}");
    let cluster = Cluster::start_with(
        1,
        &["--listen-metrics-urls", &url, "--metrics", "extensive"],
    )
    .await;
    let mut c = client(&cluster.members[0].endpoint()).await.unwrap();
    c.put("k", "v", None).await.unwrap();
    assert_eq!(
        http(metrics_port, "GET", "/livez"),
        (200, "ok\n".to_string())
    );
    assert_eq!(
        http(metrics_port, "GET", "/livez?verbose"),
        (200, "[+]serializable_read ok\nok\n".to_string())
    );
    assert_eq!(
        http(metrics_port, "GET", "/readyz?verbose"),
        (
            200,
            "[+]data_corruption ok\n[+]serializable_read ok\n[+]linearizable_read ok\nok\n"
                .to_string()
        )
    );
    assert_eq!(
        http(
            metrics_port,
            "GET",
            "/readyz?verbose&exclude=linearizable_read&exclude=nope"
        ),
        (
            200,
            "[+]data_corruption ok\n[+]serializable_read ok\nok\n".to_string()
        )
    );
    assert_eq!(
        http(metrics_port, "GET", "/readyz/linearizable_read?verbose"),
        (200, "[+]linearizable_read ok\nok\n".to_string())
    );
    assert_eq!(http(metrics_port, "GET", "/readyz/nope").0, 404);
    assert_eq!(http(metrics_port, "POST", "/livez").0, 405);
    assert_eq!(
        http(metrics_port, "GET", "/health"),
        (200, r#"{"health":"true","reason":""}"#.to_string())
    );
    // Not the client port's other endpoints, nor gRPC.
    assert_eq!(http(metrics_port, "GET", "/version").0, 404);
    assert_eq!(http(metrics_port, "POST", "/v3/kv/range").0, 404);
    let body = http(metrics_port, "GET", "/metrics").1;
    let put = "grpc_method=\"Put\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"";
    assert_eq!(
        metric(
            &body,
            &format!("grpc_server_handling_seconds_count{{{put}}}")
        ),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        metric(
            &body,
            "etcd_server_healthcheck{name=\"linearizable_read\",type=\"readyz\"}"
        ),
        Some(1.0)
    );
    // The client port serves the probes too; without --metrics extensive, no histograms.
    let plain = Cluster::start(1).await;
    let port = plain.members[0].client_port;
    assert_eq!(http(port, "GET", "/readyz"), (200, "ok\n".to_string()));
    assert!(
        !http(port, "GET", "/metrics")
            .1
            .contains("grpc_server_handling_seconds")
    );
}

#[tokio::test]
async fn a_member_without_quorum_is_live_but_not_ready() {
    let mut cluster = Cluster::start(3).await;
    let port = cluster.members[0].client_port;
    assert_eq!(http(port, "GET", "/readyz"), (200, "ok\n".to_string()));
    cluster.members[1].kill();
    cluster.members[2].kill();
    let (code, body) = http(port, "GET", "/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(
        body.starts_with("[+]data_corruption ok\n[+]serializable_read ok\n[-]linearizable_read failed: etcdserver: "),
        "{body}"
    );
    assert_eq!(http(port, "GET", "/livez"), (200, "ok\n".to_string()));
    assert_eq!(
        http(port, "GET", "/readyz?exclude=linearizable_read"),
        (200, "ok\n".to_string())
    );
    let body = http(port, "GET", "/metrics").1;
    assert_eq!(
        metric(
            &body,
            "etcd_server_healthcheck{name=\"linearizable_read\",type=\"readyz\"}"
        ),
        Some(0.0)
    );
    assert_eq!(
        metric(
            &body,
            "etcd_server_healthchecks_total{name=\"linearizable_read\",status=\"error\",type=\"readyz\"}"
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn etcdctl_maintenance_commands_on_a_cluster() {
    let cluster = Cluster::start(3).await;
    let eps = cluster.endpoints();
    let leader = cluster.leader().await;
    assert!(etcdctl(&eps, &["put", "k", "v"]).0);
    // --cluster dials the client URLs members publish once they run.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, out) = etcdctl(&eps[..1], &["member", "list"]);
        // id, started, name, peer URLs, client URLs, is learner
        if out
            .lines()
            .filter(|l| l.matches("http://").count() == 2)
            .count()
            == 3
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "client URLs not published: {out}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let (ok, out) = etcdctl(&eps[..1], &["endpoint", "health", "--cluster"]);
    assert!(ok && out.matches("is healthy").count() == 3, "{out}");
    let (ok, out) = etcdctl(
        &eps[..1],
        &["endpoint", "hashkv", "--cluster", "-w", "json"],
    );
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    let hashes: Vec<_> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["HashKV"]["hash"].clone())
        .collect();
    assert_eq!(hashes.len(), 3);
    assert!(hashes.iter().all(|h| *h == hashes[0]), "{out}");
    let (ok, out) = etcdctl(&eps, &["alarm", "list"]);
    assert!(ok && out.is_empty(), "{out}");
    let (ok, out) = etcdctl(&eps[..1], &["defrag", "--cluster"]);
    assert!(
        ok && out.matches("Finished defragmenting").count() == 3,
        "{out}"
    );

    // move-leader: etcdctl sends it to the leader; the target becomes leader.
    let target = (leader + 1) % 3;
    let mut tc = client(&eps[target]).await.unwrap();
    let target_id = tc.status().await.unwrap().header().unwrap().member_id();
    let (ok, out) = etcdctl(&eps, &["move-leader", &format!("{target_id:x}")]);
    assert!(ok && out.contains("Leadership transferred"), "{out}");
    // The transferee says it leads (asked directly rather than through `cluster.leader()`,
    // which takes the first member claiming leadership and once, in a full parallel test run,
    // found another one). The old leader answers once it sees the transferee lead; the
    // transferee's own status can lag that by a moment on a loaded machine (once, in a full
    // test run, it still said "no leader"), so it is asked until it names a leader, which must
    // be itself.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let s = loop {
        let s = tc.status().await.unwrap();
        if s.leader() != 0 || tokio::time::Instant::now() > deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        (s.leader(), s.header().unwrap().member_id()),
        (target_id, target_id)
    );
    // Sent to a follower: etcd's error.
    let mut fc = client(&eps[leader]).await.unwrap();
    let e = fc.move_leader(target_id).await.unwrap_err();
    assert_eq!(status_message(&e), "etcdserver: not leader");
    let (ok, out) = etcdctl(&eps, &["move-leader", "1234"]);
    assert!(
        !ok && out.contains("etcdserver: bad leader transferee"),
        "{out}"
    );
    assert!(etcdctl(&eps, &["put", "k", "after"]).0);
}

#[tokio::test]
async fn auto_compaction_in_revision_mode() {
    let cluster = Cluster::start_with(
        1,
        &[
            "--auto-compaction-mode",
            "revision",
            "--auto-compaction-retention",
            "10",
            "--debug-auto-compaction-interval",
            "1s",
        ],
    )
    .await;
    let m = &cluster.members[0];
    let mut c = client(&m.endpoint()).await.unwrap();
    for i in 0..50 {
        c.put("k", format!("v{i}"), None).await.unwrap();
    }
    let rev = c.get("k", None).await.unwrap().header().unwrap().revision();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let compacted = c.hash_kv(0).await.unwrap().compact_version();
        if compacted >= rev - 10 {
            assert_eq!(compacted, rev - 10);
            break;
        }
        assert!(Instant::now() < deadline, "no auto compaction: {compacted}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let e = c
        .get(
            "k",
            Some(etcd_client::GetOptions::new().with_revision(rev - 20)),
        )
        .await
        .unwrap_err();
    assert_eq!(
        status_message(&e),
        "etcdserver: mvcc: required revision has been compacted"
    );
    assert!(m.log().contains("completed auto compaction"), "{}", m.log());
}

#[tokio::test]
async fn auto_compaction_in_periodic_mode() {
    let cluster = Cluster::start_with(
        1,
        &[
            "--auto-compaction-mode",
            "periodic",
            "--auto-compaction-retention",
            "2s",
        ],
    )
    .await;
    let mut c = client(&cluster.members[0].endpoint()).await.unwrap();
    c.put("k", "first", None).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        c.put("k", "more", None).await.unwrap();
        if c.hash_kv(0).await.unwrap().compact_version() > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "no periodic compaction");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `HashKV` is etcd's hash: the same history gives the same value as a real etcd, at every
/// revision, across generations of a key, a multi-operation Txn, leases, and compactions (one
/// at a deletion, one physical).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hashkv_equals_etcds_for_the_same_history() {
    use etcd_client::{CompactionOptions, LeaseGrantOptions, PutOptions};
    let keel = Cluster::start(1).await;
    let etcd = crate::gateway::Etcd::start()
        .await
        .expect("real etcd (scripts/test.sh installs etcd-server)");
    let endpoints = [keel.endpoints()[0].clone(), etcd.addr.clone()];
    let mut clients = Vec::new();
    for ep in &endpoints {
        clients.push(client(ep).await.expect("connect"));
    }
    // (revision it takes, compaction) steps, applied to both.
    for c in clients.iter_mut() {
        c.put("a", "1", None).await.expect("put"); // 2
        c.put("b", "2", None).await.expect("put"); // 3
        c.put("a", "3", None).await.expect("put"); // 4
        let txn = Txn::new().and_then([
            TxnOp::put("c", "4", None),
            TxnOp::put("d", "5", None),
            TxnOp::delete("b", None),
        ]);
        c.txn(txn).await.expect("txn"); // 5
        c.lease_grant(60, Some(LeaseGrantOptions::new().with_id(0x4242)))
            .await
            .expect("lease");
        c.put("e", "6", Some(PutOptions::new().with_lease(0x4242)))
            .await
            .expect("put"); // 6
        c.delete("a", None).await.expect("delete"); // 7
        c.put("a", "8", None).await.expect("put"); // 8
        c.put("c", "9", None).await.expect("put"); // 9
    }
    async fn hashes(
        clients: &mut [etcd_client::Client],
        revs: std::ops::RangeInclusive<i64>,
    ) -> Vec<Vec<String>> {
        let mut all = Vec::new();
        for c in clients.iter_mut() {
            let mut per = Vec::new();
            for rev in revs.clone() {
                per.push(match c.hash_kv(rev).await {
                    Ok(h) => format!("{rev}: {:08x} compact {}", h.hash(), h.compact_version()),
                    Err(e) => format!("{rev}: {}", status_message(&e)),
                });
            }
            all.push(per);
        }
        all
    }
    let before = hashes(&mut clients, 0..=9).await;
    assert_eq!(
        before[0], before[1],
        "Keel (left) and etcd (right), no compaction"
    );
    assert!(before[0][2].contains("compact -1"), "{:?}", before[0]);

    // A compaction at the deletion of `a` (a tombstone at the compact revision).
    for c in clients.iter_mut() {
        c.compact(7, None).await.expect("compact");
        c.put("f", "10", None).await.expect("put"); // 10
    }
    let after = hashes(&mut clients, 6..=10).await;
    assert_eq!(after[0], after[1], "after a compaction at a tombstone");
    // A physical compaction later, and writes after it.
    for c in clients.iter_mut() {
        c.compact(9, Some(CompactionOptions::new().with_physical()))
            .await
            .expect("compact");
        c.delete("e", None).await.expect("delete"); // 11
        c.put("d", "12", None).await.expect("put"); // 12
    }
    let last = hashes(&mut clients, 0..=12).await;
    assert_eq!(last[0], last[1], "after a physical compaction");
    assert!(last[0][12].contains("compact 9"), "{:?}", last[0]);
}

/// etcd's MVCC operation counters (`etcd_mvcc_{range,put,delete,txn}_total`) move as etcd's
/// for the same requests on a one-member cluster: ranges, puts with and without options,
/// deletes, writing and read-only Txns (compares short-circuited, nested), a lease revoked with
/// its keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mvcc_operation_counters_as_etcds() {
    use etcd_client::{DeleteOptions, GetOptions, PutOptions};
    let keel = Cluster::start(1).await;
    let etcd = crate::gateway::Etcd::start()
        .await
        .expect("real etcd (scripts/test.sh installs etcd-server)");
    let counters = |port: u16| -> Vec<(String, u64)> {
        let (_, body) = http(port, "GET", "/metrics");
        [
            "etcd_mvcc_range_total",
            "etcd_mvcc_put_total",
            "etcd_mvcc_delete_total",
            "etcd_mvcc_txn_total",
        ]
        .iter()
        .map(|name| {
            let value = metric(&body, name).unwrap_or_else(|| panic!("{name} missing"));
            (name.to_string(), value as u64)
        })
        .collect()
    };
    let port = |addr: &str| -> u16 {
        addr.rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port")
    };
    let mut deltas = Vec::new();
    for addr in [keel.endpoints()[0].clone(), etcd.addr.clone()] {
        let before = counters(port(&addr));
        let mut c = client(&addr).await.expect("connect");
        c.put("a", "1", None).await.expect("put");
        c.put("a", "2", Some(PutOptions::new().with_prev_key()))
            .await
            .expect("put prev");
        c.put("a", "", Some(PutOptions::new().with_ignore_value()))
            .await
            .expect("put ignore value");
        c.put("b", "x", None).await.expect("put");
        c.get("a", None).await.expect("get");
        c.get("", Some(GetOptions::new().with_all_keys()))
            .await
            .expect("get all");
        // A writing Txn: two compares (the second fails), then the failure branch with a
        // Range, a Put and a nested Txn.
        let nested = Txn::new()
            .when([Compare::value("b", CompareOp::Equal, "x")])
            .and_then([TxnOp::put("n", "1", None)]);
        let txn = Txn::new()
            .when([
                Compare::value("a", CompareOp::Equal, "2"),
                Compare::value("b", CompareOp::Equal, "nope"),
                Compare::version("a", CompareOp::Greater, 0),
            ])
            .or_else([
                TxnOp::get("a", None),
                TxnOp::put("c", "3", None),
                TxnOp::txn(nested),
            ]);
        c.txn(txn).await.expect("txn");
        // A read-only Txn.
        let read = Txn::new()
            .when([Compare::version("a", CompareOp::Greater, 0)])
            .and_then([TxnOp::get("a", None), TxnOp::get("b", None)]);
        c.txn(read).await.expect("read txn");
        c.delete("c", Some(DeleteOptions::new().with_prev_key()))
            .await
            .expect("delete");
        c.delete("nothing", None).await.expect("delete nothing");
        let lease = c.lease_grant(60, None).await.expect("lease").id();
        for k in ["l1", "l2"] {
            c.put(k, "v", Some(PutOptions::new().with_lease(lease)))
                .await
                .expect("put with lease");
        }
        c.lease_revoke(lease).await.expect("revoke");
        let after = counters(port(&addr));
        deltas.push(
            before
                .iter()
                .zip(&after)
                .map(|((name, b), (_, a))| format!("{name} +{}", a - b))
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(deltas[0], deltas[1], "Keel (left) and etcd (right)");
    assert!(
        deltas[0].iter().all(|d| !d.ends_with("+0")),
        "{:?}",
        deltas[0]
    );
}

/// etcd's defragmentation metrics: the duration histogram (etcd's buckets, 0.1 s to 409.6 s)
/// counts each defragmentation, and the in-flight gauge is back at 0 once it returns.
#[tokio::test]
async fn defragmentation_is_timed_as_etcd_times_it() {
    let cluster = Cluster::start(1).await;
    let port = cluster.members[0].client_port;
    let mut c = client(&cluster.members[0].endpoint()).await.unwrap();
    let scrape = || {
        let body = http(port, "GET", "/metrics").1;
        (
            metric(&body, "etcd_disk_backend_defrag_duration_seconds_count"),
            metric(&body, "etcd_disk_defrag_inflight"),
            metric(
                &body,
                "etcd_disk_backend_defrag_duration_seconds_bucket{le=\"409.6\"}",
            ),
        )
    };
    assert_eq!(scrape(), (Some(0.0), Some(0.0), Some(0.0)));
    for i in 0..100 {
        c.put(format!("d{i}"), "v", None).await.unwrap();
    }
    c.defragment().await.unwrap();
    c.defragment().await.unwrap();
    assert_eq!(scrape(), (Some(2.0), Some(0.0), Some(2.0)));
}
