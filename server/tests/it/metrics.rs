//! etcd's metrics of traffic and work (peer bytes, watch streams and events, leases,
//! compaction, hashes, backups, client API versions): each one moves with what it counts.
//! Their names, types and labels are compared with real etcd's by
//! `tests/compat/metrics-parity.sh`.

use std::time::{Duration, Instant};

use etcd_client::{CompactionOptions, PutOptions};
use keel_proto::etcdserverpb::RangeRequest;
use keel_proto::etcdserverpb::kv_client::KvClient;

use crate::cluster::{Cluster, Member, client, current_revision};

/// Every member's ID, in the cluster's order.
async fn member_ids(cluster: &Cluster) -> Vec<u64> {
    let mut ids = Vec::new();
    for m in &cluster.members {
        let mut c = client(&m.endpoint()).await.unwrap();
        let status = c.status().await.unwrap();
        ids.push(status.header().unwrap().member_id());
    }
    ids
}

/// Waits (at most 10 s) until `check` holds; panics with `what` otherwise.
pub(crate) async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "never true: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn sent(m: &Member, to: u64) -> f64 {
    m.metric(&format!(
        "etcd_network_peer_sent_bytes_total{{To=\"{to:x}\"}}"
    ))
}

fn received(m: &Member, from: u64) -> f64 {
    m.metric(&format!(
        "etcd_network_peer_received_bytes_total{{From=\"{from:x}\"}}"
    ))
}

#[tokio::test]
async fn peer_traffic_is_counted_per_peer_both_ways() {
    let cluster = Cluster::start(3).await;
    let ids = member_ids(&cluster).await;
    let leader = cluster.leader().await;
    let follower = (leader + 1) % 3;
    let (l, f) = (&cluster.members[leader], &cluster.members[follower]);

    // A 200 kB value is replicated to each follower: the leader sends it, the follower receives
    // it (replication to this follower may end just after the put's quorum).
    let before = (sent(l, ids[follower]), received(f, ids[leader]));
    let mut c = client(&l.endpoint()).await.unwrap();
    c.put("big", vec![7u8; 200_000], None).await.unwrap();
    eventually(
        "the leader's bytes to the follower counted on both sides",
        || {
            sent(l, ids[follower]) - before.0 >= 200_000.0
                && received(f, ids[leader]) - before.1 >= 200_000.0
        },
    )
    .await;

    // A write sent to the follower is forwarded to the leader: the other direction.
    let before = (sent(f, ids[leader]), received(l, ids[follower]));
    let mut cf = client(&f.endpoint()).await.unwrap();
    cf.put("big2", vec![8u8; 100_000], None).await.unwrap();
    assert!(sent(f, ids[leader]) - before.0 >= 100_000.0);
    assert!(received(l, ids[follower]) - before.1 >= 100_000.0);

    // Every member has answered every other member's probe.
    eventually("every peer is active", || {
        cluster.members.iter().enumerate().all(|(i, m)| {
            (0..3).filter(|j| *j != i).all(|j| {
                m.metric(&format!(
                    "etcd_network_active_peers{{Local=\"{:x}\",Remote=\"{:x}\"}}",
                    ids[i], ids[j]
                )) == 1.0
            })
        })
    })
    .await;
}

#[tokio::test]
async fn watch_put_and_log_counters_move_with_the_traffic() {
    let cluster = Cluster::start(1).await;
    let m = &cluster.members[0];
    let mut c = client(&m.endpoint()).await.unwrap();
    let streams = m.metric("etcd_debugging_mvcc_watch_stream_total");
    let mut stream = c.watch("w", None).await.unwrap();
    let created = stream.message().await.unwrap().unwrap();
    assert!(created.created());
    assert_eq!(
        m.metric("etcd_debugging_mvcc_watch_stream_total"),
        streams + 1.0
    );

    let events = m.metric("etcd_debugging_mvcc_events_total");
    let put_bytes = m.metric("etcd_debugging_mvcc_total_put_size_in_bytes");
    let wal_bytes = m.metric("etcd_disk_wal_write_bytes_total");
    c.put("w", "12345", None).await.unwrap();
    let got = stream.message().await.unwrap().unwrap();
    assert_eq!(got.events().len(), 1);
    eventually("the event is counted as sent", || {
        m.metric("etcd_debugging_mvcc_events_total") == events + 1.0
    })
    .await;
    // etcd counts a put's key and value bytes: 1 + 5.
    assert_eq!(
        m.metric("etcd_debugging_mvcc_total_put_size_in_bytes"),
        put_bytes + 6.0
    );
    assert!(m.metric("etcd_disk_wal_write_bytes_total") >= wal_bytes + 6.0);
    // Present (not only 0 because missing) and empty once the event went out.
    assert_eq!(
        m.metric_value("etcd_debugging_mvcc_pending_events_total"),
        Some(0.0)
    );
    // etcd 3.4 exports the operation counters under two names.
    for op in ["put", "range", "delete", "txn"] {
        assert_eq!(
            m.metric(&format!("etcd_debugging_mvcc_{op}_total")),
            m.metric(&format!("etcd_mvcc_{op}_total")),
            "{op}"
        );
    }
    let fds = m.metric("os_fd_used");
    assert!(fds > 0.0 && m.metric("os_fd_limit") >= fds);
}

#[tokio::test]
async fn lease_grants_renewals_and_expiries_are_counted() {
    let cluster = Cluster::start(1).await;
    let m = &cluster.members[0];
    let mut c = client(&m.endpoint()).await.unwrap();
    let (grants, ttls) = (
        m.metric("etcd_debugging_lease_ttl_total_count"),
        m.metric("etcd_debugging_lease_ttl_total_sum"),
    );
    let lease = c.lease_grant(7, None).await.unwrap();
    assert_eq!(
        m.metric("etcd_debugging_lease_ttl_total_count"),
        grants + 1.0
    );
    assert_eq!(m.metric("etcd_debugging_lease_ttl_total_sum"), ttls + 7.0);

    let renewed = m.metric("etcd_debugging_lease_renewed_total");
    // Opening the stream sends one keep-alive and reads its answer (etcd-client's way), the
    // keeper a second.
    let (mut keeper, mut answers) = c.lease_keep_alive(lease.id()).await.unwrap();
    keeper.keep_alive().await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), answers.message())
        .await
        .expect("keep-alive answered")
        .unwrap()
        .unwrap();
    assert_eq!(answer.ttl(), 7);
    assert_eq!(
        m.metric("etcd_debugging_lease_renewed_total"),
        renewed + 2.0
    );

    let expired = m.metric("etcd_debugging_server_lease_expired_total");
    let short = c.lease_grant(2, None).await.unwrap();
    c.put(
        "leased",
        "v",
        Some(PutOptions::new().with_lease(short.id())),
    )
    .await
    .unwrap();
    eventually("the short lease expired and was counted", || {
        m.metric("etcd_debugging_server_lease_expired_total") >= expired + 1.0
    })
    .await;
}

#[tokio::test]
async fn compaction_hashes_and_backups_are_measured() {
    let cluster = Cluster::start(1).await;
    let m = &cluster.members[0];
    let mut c = client(&m.endpoint()).await.unwrap();
    for i in 0..10 {
        c.put("k", format!("v{i}"), None).await.unwrap();
    }
    let rev = current_revision(&mut c).await;
    let deleted = m.metric("etcd_debugging_mvcc_db_compaction_keys_total");
    c.compact(rev, Some(CompactionOptions::new().with_physical()))
        .await
        .unwrap();
    // Nine superseded versions of "k" (and any other key's) were removed.
    assert!(m.metric("etcd_debugging_mvcc_db_compaction_keys_total") >= deleted + 9.0);
    assert!(m.metric("etcd_debugging_mvcc_db_compaction_total_duration_milliseconds_count") >= 1.0);
    assert!(
        m.metric("etcd_debugging_mvcc_index_compaction_pause_duration_milliseconds_count") >= 1.0
    );
    assert!(m.metric("etcd_debugging_mvcc_db_compaction_pause_duration_milliseconds_count") >= 1.0);

    let hashes = m.metric("etcd_mvcc_hash_rev_duration_seconds_count");
    c.hash_kv(0).await.unwrap();
    assert_eq!(
        m.metric("etcd_mvcc_hash_rev_duration_seconds_count"),
        hashes + 1.0
    );
    let hashes = m.metric("etcd_mvcc_hash_duration_seconds_count");
    c.hash().await.unwrap();
    assert_eq!(
        m.metric("etcd_mvcc_hash_duration_seconds_count"),
        hashes + 1.0
    );

    let backups = m.metric("etcd_disk_backend_snapshot_duration_seconds_count");
    let mut backup = c.snapshot().await.unwrap();
    while backup.message().await.unwrap().is_some() {}
    eventually("the backup is timed", || {
        m.metric("etcd_disk_backend_snapshot_duration_seconds_count") == backups + 1.0
    })
    .await;
}

#[tokio::test]
async fn client_requests_are_counted_by_the_api_version_they_announce() {
    let cluster = Cluster::start(1).await;
    let m = &cluster.members[0];
    let series = |version: &str| {
        m.metric(&format!(
            "etcd_server_client_requests_total{{client_api_version=\"{version}\",type=\"unary\"}}"
        ))
    };
    let mut kv = KvClient::connect(format!("http://{}", m.endpoint()))
        .await
        .unwrap();
    let range = |version: &str| {
        let mut req = tonic::Request::new(RangeRequest {
            key: b"a".to_vec(),
            ..Default::default()
        });
        req.metadata_mut()
            .insert("client-api-version", version.parse().unwrap());
        req
    };
    let (v34, unknown) = (series("3.4"), series("unknown"));
    kv.range(range("3.4")).await.unwrap();
    kv.range(range("3.4")).await.unwrap();
    // A value that is not a short version number is not made into a label.
    kv.range(range("3.4; and more")).await.unwrap();
    kv.range(tonic::Request::new(RangeRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(series("3.4"), v34 + 2.0);
    assert_eq!(series("unknown"), unknown + 2.0);
    assert!(
        !crate::maintenance::http(m.client_port, "GET", "/metrics")
            .1
            .contains("and more")
    );
}

#[tokio::test]
async fn a_dead_peer_is_inactive_and_fails_the_leaders_heartbeats() {
    let mut cluster = Cluster::start(3).await;
    let ids = member_ids(&cluster).await;
    let leader = cluster.leader().await;
    let dead = (leader + 1) % 3;
    let active = |m: &Member| {
        m.metric(&format!(
            "etcd_network_active_peers{{Local=\"{:x}\",Remote=\"{:x}\"}}",
            ids[leader], ids[dead]
        ))
    };
    eventually("the peer is active", || {
        active(&cluster.members[leader]) == 1.0
    })
    .await;
    let failures = cluster.members[leader].metric("etcd_server_heartbeat_send_failures_total");
    cluster.members[dead].kill();
    let l = &cluster.members[leader];
    eventually("heartbeats to the dead peer fail", || {
        l.metric("etcd_server_heartbeat_send_failures_total") > failures
    })
    .await;
    eventually("the dead peer is inactive", || active(l) == 0.0).await;
}
