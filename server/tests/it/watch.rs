//! Watch guarantees (ordered, unique, atomic, reliable, resumable, bookmarkable, prev_kv,
//! filters) against real `keel` processes.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{EventType, Txn, TxnOp, WatchFilterType, WatchOptions, WatchStream};

use crate::cluster::{Cluster, Member, client};

/// Reads responses until `n` events arrived (or panics after a timeout); returns
/// (events as (revision, type, key, value, prev value), responses).
async fn collect(
    stream: &mut WatchStream,
    n: usize,
) -> Vec<(i64, EventType, String, String, Option<String>)> {
    let mut out = Vec::new();
    while out.len() < n {
        let msg = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("watch timed out")
            .unwrap()
            .expect("stream ended");
        for ev in msg.events() {
            let kv = ev.kv().unwrap();
            out.push((
                kv.mod_revision(),
                ev.event_type(),
                kv.key_str().unwrap().to_string(),
                kv.value_str().unwrap().to_string(),
                ev.prev_kv().map(|p| p.value_str().unwrap().to_string()),
            ));
        }
    }
    out
}

async fn created(stream: &mut WatchStream) -> i64 {
    let msg = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(msg.created(), "first response must be 'created': {msg:?}");
    msg.watch_id()
}

#[tokio::test]
async fn history_replay_live_events_prev_kv_and_filters() {
    let cluster = Cluster::start(1).await;
    let mut c = client(&cluster.members[0].endpoint()).await.unwrap();
    c.put("w/a", "1", None).await.unwrap(); // rev 2
    c.put("w/b", "2", None).await.unwrap(); // rev 3
    c.put("w/a", "3", None).await.unwrap(); // rev 4
    c.delete("w/b", None).await.unwrap(); // rev 5

    // From an old revision: history first, then live events, in order, with true prev_kv.
    let mut s = c
        .watch(
            "w/",
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(3)
                    .with_prev_key(),
            ),
        )
        .await
        .unwrap();
    created(&mut s).await;
    c.put("w/c", "4", None).await.unwrap(); // rev 6
    let evs = collect(&mut s, 4).await;
    assert_eq!(
        evs,
        vec![
            (3, EventType::Put, "w/b".into(), "2".into(), None),
            (
                4,
                EventType::Put,
                "w/a".into(),
                "3".into(),
                Some("1".into())
            ),
            (
                5,
                EventType::Delete,
                "w/b".into(),
                "".into(),
                Some("2".into())
            ),
            (6, EventType::Put, "w/c".into(), "4".into(), None),
        ]
    );

    // Filters: NOPUT sees only deletes.
    let mut d = c
        .watch(
            "w/",
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_filters([WatchFilterType::NoPut]),
            ),
        )
        .await
        .unwrap();
    created(&mut d).await;
    c.put("w/x", "x", None).await.unwrap();
    c.delete("w/x", None).await.unwrap();
    let evs = collect(&mut d, 1).await;
    assert_eq!(evs[0].1, EventType::Delete);
}

#[tokio::test]
async fn txn_events_are_atomic_and_many_watchers_share_a_stream() {
    let cluster = Cluster::start(1).await;
    let mut c = client(&cluster.members[0].endpoint()).await.unwrap();
    let mut s = c
        .watch("t/", Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    created(&mut s).await;
    // A second watcher on the same stream, on a single key.
    s.watch("t/k2", None).await.unwrap();
    let second = created(&mut s).await;
    let txn = Txn::new().and_then([
        TxnOp::put("t/k1", "a", None),
        TxnOp::put("t/k2", "b", None),
        TxnOp::put("t/k3", "c", None),
    ]);
    c.txn(txn).await.unwrap();
    // All three events of the revision arrive in one response for the prefix watcher.
    let mut by_watcher: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
    while by_watcher
        .values()
        .map(|v| v.iter().sum::<usize>())
        .sum::<usize>()
        < 4
    {
        let msg = tokio::time::timeout(Duration::from_secs(10), s.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        by_watcher
            .entry(msg.watch_id())
            .or_default()
            .push(msg.events().len());
    }
    assert_eq!(by_watcher.get(&second), Some(&vec![1]));
    assert_eq!(
        by_watcher.get(&0),
        Some(&vec![3]),
        "a revision's events were split: {by_watcher:?}"
    );
}

#[tokio::test]
async fn compacted_start_is_canceled_with_compact_revision() {
    let cluster = Cluster::start(1).await;
    let mut c = client(&cluster.members[0].endpoint()).await.unwrap();
    for i in 0..5 {
        c.put("c", i.to_string(), None).await.unwrap();
    }
    c.compact(5, None).await.unwrap();
    let mut s = c
        .watch("c", Some(WatchOptions::new().with_start_revision(2)))
        .await
        .unwrap();
    created(&mut s).await;
    let msg = tokio::time::timeout(Duration::from_secs(10), s.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(msg.canceled());
    assert_eq!(msg.compact_revision(), 5);
    // Exactly at the compact revision is allowed.
    let mut ok = c
        .watch("c", Some(WatchOptions::new().with_start_revision(5)))
        .await
        .unwrap();
    created(&mut ok).await;
    let evs = collect(&mut ok, 1).await;
    assert_eq!(evs[0].0, 5);
}

#[tokio::test]
async fn progress_request_is_a_bookmark_and_resume_is_exact() {
    let cluster = Cluster::start(1).await;
    let mut c = client(&cluster.members[0].endpoint()).await.unwrap();
    let mut s = c
        .watch("p", Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    created(&mut s).await;
    let mut last_rev = 0;
    for i in 0..20 {
        last_rev = c
            .put(format!("p{i}"), "v", None)
            .await
            .unwrap()
            .header()
            .unwrap()
            .revision();
    }
    s.request_progress().await.unwrap();
    let mut seen = Vec::new();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), s.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if msg.events().is_empty() && !msg.created() && !msg.canceled() {
            // Bookmark: everything up to its revision must already have arrived.
            let bookmark = msg.header().unwrap().revision();
            assert_eq!(msg.watch_id(), -1);
            assert!(bookmark >= last_rev);
            assert_eq!(
                seen.len(),
                20,
                "progress claimed revision {bookmark} before its events arrived"
            );
            break;
        }
        seen.extend(msg.events().iter().map(|e| e.kv().unwrap().mod_revision()));
    }
    // Resume from the middle: exactly the remaining events, no duplicates, no gaps.
    let resume_from = seen[10];
    let mut r = c
        .watch(
            "p",
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(resume_from),
            ),
        )
        .await
        .unwrap();
    created(&mut r).await;
    let evs = collect(&mut r, 10).await;
    let revs: Vec<i64> = evs.iter().map(|e| e.0).collect();
    assert_eq!(revs, seen[10..].to_vec());
}

/// A watcher that stops reading: its client's HTTP/2 windows are small (64 KiB), so the
/// server's writes stall and the stream's queue (1024 responses) fills. Writers must not wait
/// for it; it becomes a victim, catches up from history once it reads again, and receives every
/// event exactly once, in order.
#[tokio::test]
async fn slow_watcher_does_not_block_writes_and_loses_nothing() {
    use keel_proto::etcdserverpb::watch_client::WatchClient;

    const WRITERS: usize = 8;
    const PUTS_EACH: usize = 1000;
    let cluster = Cluster::start(1).await;
    let member = &cluster.members[0];
    let endpoint = member.endpoint();
    let c = client(&endpoint).await.unwrap();

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{endpoint}"))
        .unwrap()
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(create_request(b"s/", b"s0")).await.unwrap();
    let mut slow = WatchClient::new(channel)
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    assert!(slow.message().await.unwrap().unwrap().created);

    // Far more than the window, the encoder's buffer and the queue hold, without reading (a
    // queued response carries an applied chunk's events, about four at 8 writers).
    let value = "x".repeat(512);
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let mut writer = c.clone();
        let value = value.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..PUTS_EACH {
                writer
                    .put(format!("s/{w}-{i:04}"), value.clone(), None)
                    .await
                    .unwrap();
            }
        }));
    }
    for wr in writers {
        tokio::time::timeout(Duration::from_secs(120), wr)
            .await
            .expect("writes stalled behind a slow watcher")
            .unwrap();
    }
    assert!(
        member.metric("keel_watch_victims_total") >= 1.0,
        "the watcher never fell behind its queue: the test did not exercise the slow path"
    );
    // Its stream holds what it has not read (at least half a queue: catch-up waits for room),
    // within the byte limit.
    let pending = member.metric("keel_watch_pending_bytes");
    let limit = keel_server::watch::STREAM_QUEUE_BYTES as f64;
    assert!(pending > 0.0 && pending <= limit, "{pending}");

    // Now drain: every event exactly once, in revision order.
    let mut revisions = Vec::new();
    let mut keys = std::collections::BTreeSet::new();
    while revisions.len() < WRITERS * PUTS_EACH {
        let resp = tokio::time::timeout(Duration::from_secs(10), slow.message())
            .await
            .expect("watch timed out")
            .unwrap()
            .expect("stream ended");
        assert!(!resp.canceled, "watch canceled: {resp:?}");
        for ev in resp.events {
            let kv = ev.kv.unwrap();
            revisions.push(kv.mod_revision);
            keys.insert(kv.key);
        }
    }
    assert_eq!(revisions.len(), WRITERS * PUTS_EACH);
    assert!(
        revisions.windows(2).all(|w| w[0] < w[1]),
        "events out of order or duplicated"
    );
    assert_eq!(keys.len(), WRITERS * PUTS_EACH, "events lost");
    assert!(member.metric("keel_watch_catch_up_events_total") >= 1.0);
    assert_eq!(member.metric("keel_watch_pending_bytes"), 0.0);
    drop(tx);
}

#[tokio::test]
async fn watchers_on_followers_survive_a_leader_kill() {
    let mut cluster = Cluster::start(3).await;
    let leader = cluster.leader().await;
    let follower = (leader + 1) % 3;
    let writer_member = (leader + 2) % 3;
    let mut fc = client(&cluster.members[follower].endpoint()).await.unwrap();
    let mut s = fc
        .watch("f/", Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    created(&mut s).await;
    let mut wc = client(&cluster.members[writer_member].endpoint())
        .await
        .unwrap();
    for i in 0..10 {
        wc.put(format!("f/{i:02}"), "before", None).await.unwrap();
    }
    cluster.members[leader].kill();
    let mut i = 10;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while i < 20 {
        match wc.put(format!("f/{i:02}"), "after", None).await {
            Ok(_) => i += 1,
            Err(_) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no progress after leader kill"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    // A write whose reply was lost in the failover may have committed and been retried, so a key
    // may appear twice; but revisions must strictly increase, keys follow write order, and none
    // is missing.
    let mut evs = Vec::new();
    while evs
        .last()
        .map(|e: &(i64, EventType, String, String, Option<String>)| e.2.as_str())
        != Some("f/19")
    {
        evs.extend(collect(&mut s, 1).await);
    }
    assert!(
        evs.windows(2).all(|w| w[0].0 < w[1].0),
        "events out of order or duplicated: {evs:?}"
    );
    let idx: Vec<usize> = evs.iter().map(|e| e.2[2..].parse().unwrap()).collect();
    assert!(
        idx.windows(2).all(|w| w[0] <= w[1]),
        "events out of write order: {idx:?}"
    );
    let distinct: std::collections::BTreeSet<usize> = idx.into_iter().collect();
    assert_eq!(
        distinct.len(),
        20,
        "the follower's watcher missed events across the leader change"
    );
}

/// A raw `WatchRequest` creating a watcher on `key` (to `range_end`, empty for one key).
fn create_request(key: &[u8], range_end: &[u8]) -> keel_proto::etcdserverpb::WatchRequest {
    use keel_proto::etcdserverpb::watch_request::RequestUnion;
    use keel_proto::etcdserverpb::{WatchCreateRequest, WatchRequest};
    WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: key.to_vec(),
            range_end: range_end.to_vec(),
            ..Default::default()
        })),
    }
}

/// A raw Watch call on `endpoint` (the generated client, so the test controls both halves of
/// the stream) that has sent one create request per key: its request sender and responses.
async fn raw_watch(
    endpoint: &str,
    keys: &[Vec<u8>],
) -> (
    tokio::sync::mpsc::Sender<keel_proto::etcdserverpb::WatchRequest>,
    tonic::Streaming<keel_proto::etcdserverpb::WatchResponse>,
) {
    use keel_proto::etcdserverpb::watch_client::WatchClient;

    let mut wc = WatchClient::connect(format!("http://{endpoint}"))
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(keys.len().max(1));
    for key in keys {
        tx.send(create_request(key, b"")).await.unwrap();
    }
    let responses = wc
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, responses)
}

/// A client that closes its sending side (half-close) keeps receiving events, as with etcd;
/// only cancelling the call ends the stream.
#[tokio::test]
async fn half_closed_stream_keeps_delivering() {
    let cluster = Cluster::start(1).await;
    let endpoint = cluster.members[0].endpoint();
    let mut c = client(&endpoint).await.unwrap();
    let (tx, mut responses) = raw_watch(&endpoint, &[b"hc".to_vec()]).await;
    assert!(next_response(&mut responses).await.created);
    drop(tx); // ends the request stream: the client half-closes
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.put("hc", "after-close", None).await.unwrap();
    let got = next_response(&mut responses).await;
    assert_eq!(got.events.len(), 1);
    assert_eq!(got.events[0].kv.as_ref().unwrap().value, b"after-close");
}

/// The member's `etcd_debugging_mvcc_watcher_total`.
fn watcher_total(member: &Member) -> i64 {
    member
        .metric_value("etcd_debugging_mvcc_watcher_total")
        .expect("watcher gauge in /metrics") as i64
}

#[tokio::test]
async fn cancelling_the_call_removes_its_watchers() {
    let cluster = Cluster::start(1).await;
    let member = &cluster.members[0];
    let endpoint = member.endpoint();
    let mut c = client(&endpoint).await.unwrap();
    let keys: Vec<Vec<u8>> = (0..20).map(|i| format!("gone/{i}").into_bytes()).collect();
    let (tx, mut responses) = raw_watch(&endpoint, &keys).await;
    for _ in 0..20 {
        assert!(next_response(&mut responses).await.created);
    }
    c.put("gone/3", "v", None).await.unwrap();
    assert_eq!(next_response(&mut responses).await.events.len(), 1);
    assert_eq!(watcher_total(member), 20);
    // Dropping both halves cancels the call (RST_STREAM), as a client whose context ends does;
    // dropping only the request side would be a half-close, which keeps the watchers.
    drop(responses);
    drop(tx);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while watcher_total(member) != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "watchers of a cancelled call still registered: {}",
            watcher_total(member)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The member still serves writes.
    c.put("gone/3", "w", None).await.unwrap();
}

async fn next_response(
    r: &mut tonic::Streaming<keel_proto::etcdserverpb::WatchResponse>,
) -> keel_proto::etcdserverpb::WatchResponse {
    tokio::time::timeout(Duration::from_secs(10), r.message())
        .await
        .expect("watch timed out")
        .unwrap()
        .expect("stream ended")
}

/// Watch IDs on one stream as etcd assigns and checks them: a client-chosen ID, server-assigned
/// IDs that skip the ones in use, a duplicate refused with etcd's reason, an ID reusable after
/// its cancellation, an empty range refused, a negative ID accepted. Compared with a real etcd when one is installed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_ids_are_assigned_and_checked_as_etcd_does() {
    let cluster = Cluster::start(1).await;
    let keel = watch_id_script(&cluster.members[0].endpoint()).await;
    let expected: Vec<(i64, bool, bool, &str, Vec<&str>)> = vec![
        (1, true, false, "", vec![]),
        (0, true, false, "", vec![]),
        (2, true, false, "", vec![]),
        (
            -1,
            true,
            true,
            "mvcc: duplicate watch ID provided on the WatchStream",
            vec![],
        ),
        (1, false, true, "", vec![]),
        (1, true, false, "", vec![]),
        (-1, true, true, "mvcc: watcher range is empty", vec![]),
        (-5, true, false, "", vec![]),
        (1, false, false, "", vec!["w/f"]),
        (0, false, false, "", vec!["w/b"]),
    ];
    let got: Vec<(i64, bool, bool, &str, Vec<&str>)> = keel
        .iter()
        .map(|s| {
            (
                s.0,
                s.1,
                s.2,
                s.3.as_str(),
                s.4.iter().map(String::as_str).collect(),
            )
        })
        .collect();
    assert_eq!(got, expected);
    if let Some(etcd) = crate::gateway::Etcd::start().await {
        let etcd_steps = watch_id_script(&etcd.addr).await;
        assert_eq!(keel, etcd_steps, "Keel and etcd answered differently");
    }
}

/// (watch id, created, canceled, cancel reason, event keys, header revision) of a response.
type WatchIdStep = (i64, bool, bool, String, Vec<String>, i64);

async fn watch_id_script(endpoint: &str) -> Vec<WatchIdStep> {
    use keel_proto::etcdserverpb::watch_client::WatchClient;
    use keel_proto::etcdserverpb::watch_request::RequestUnion;
    use keel_proto::etcdserverpb::{
        PutRequest, WatchCancelRequest, WatchCreateRequest, WatchRequest, kv_client::KvClient,
    };

    let mut wc = WatchClient::connect(format!("http://{endpoint}"))
        .await
        .unwrap();
    let mut kv = KvClient::connect(format!("http://{endpoint}"))
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let create = |key: &str, range_end: &str, watch_id: i64| WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: key.into(),
            range_end: range_end.into(),
            watch_id,
            ..Default::default()
        })),
    };
    let requests = vec![
        create("w/a", "", 1),
        create("w/b", "", 0),
        create("w/c", "", 0),
        create("w/d", "", 2),
        WatchRequest {
            request_union: Some(RequestUnion::CancelRequest(WatchCancelRequest {
                watch_id: 1,
            })),
        },
        create("w/f", "", 1),
        create("w/z", "w/y", 0),
        create("w/n", "", -5),
    ];
    // etcd sends the call's headers with its first response, so the first request goes out
    // before the call is awaited.
    let mut requests = requests.into_iter();
    tx.send(requests.next().unwrap()).await.unwrap();
    let mut responses = wc
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut steps = Vec::new();
    let mut record = |r: keel_proto::etcdserverpb::WatchResponse| {
        steps.push((
            r.watch_id,
            r.created,
            r.canceled,
            r.cancel_reason,
            r.events
                .iter()
                .filter_map(|e| e.kv.as_ref())
                .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
                .collect(),
            r.header.map(|h| h.revision).unwrap_or_default(),
        ));
    };
    record(next_response(&mut responses).await);
    for req in requests {
        tx.send(req).await.unwrap();
        record(next_response(&mut responses).await);
    }
    // Only the watcher now holding ID 1 (on w/f) and the one on w/b see these puts.
    for key in ["w/a", "w/f", "w/b"] {
        kv.put(PutRequest {
            key: key.into(),
            value: b"v".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    record(next_response(&mut responses).await);
    record(next_response(&mut responses).await);
    steps
}

/// A watch "from now" created right after a write was answered starts after that write, as
/// with etcd, even while the write's events are still being dispatched to many other watchers
/// (a member answers the writer before it dispatches the revision's events).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_from_now_after_an_answered_write_starts_after_it() {
    use keel_proto::etcdserverpb::watch_client::WatchClient;

    let cluster = Cluster::start(1).await;
    let endpoint = cluster.members[0].endpoint();
    let mut c = client(&endpoint).await.unwrap();
    // 4 000 prefix watchers on other streams make each revision's dispatch take a while.
    let mut crowd = Vec::new();
    for _ in 0..4 {
        let mut wc = WatchClient::connect(format!("http://{endpoint}"))
            .await
            .unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(1000);
        for _ in 0..1000 {
            tx.send(create_request(b"now/", b"now0")).await.unwrap();
        }
        let mut responses = wc
            .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        for _ in 0..1000 {
            assert!(next_response(&mut responses).await.created);
        }
        // Drained in the background so the crowd stays synced.
        crowd.push((
            tx,
            tokio::spawn(async move { while let Ok(Some(_)) = responses.message().await {} }),
        ));
    }
    let mut wc = WatchClient::connect(format!("http://{endpoint}"))
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut probe = wc
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for i in 0..40 {
        let key = format!("now/{i}");
        let written = c
            .put(key.as_str(), "before", None)
            .await
            .unwrap()
            .header()
            .unwrap()
            .revision();
        tx.send(create_request(key.as_bytes(), b"")).await.unwrap();
        let created = next_response(&mut probe).await;
        assert!(created.created, "{created:?}");
        let header_rev = created.header.as_ref().map_or(0, |h| h.revision);
        assert!(
            header_rev >= written,
            "created at {header_rev}, before the answered write at {written}"
        );
        let later = c
            .put(key.as_str(), "after", None)
            .await
            .unwrap()
            .header()
            .unwrap()
            .revision();
        let got = next_response(&mut probe).await;
        assert_eq!(got.watch_id, created.watch_id);
        let revs: Vec<i64> = got
            .events
            .iter()
            .filter_map(|e| e.kv.as_ref().map(|kv| kv.mod_revision))
            .collect();
        assert_eq!(
            revs,
            vec![later],
            "iteration {i}: a watch from now created after the write at {written}"
        );
    }
    drop(crowd);
}
