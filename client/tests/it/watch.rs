use std::time::Duration;

use keel_client::{EventKind, WatchEvent, WatchOptions, Watcher};

use crate::cluster::{Cluster, put_retry};

async fn next_event(w: &mut Watcher) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(20), w.next())
        .await
        .expect("watch event in time")
        .expect("watch open")
        .expect("watch ok")
}

/// Collects put values until `n` have arrived (skipping progress notifications).
async fn collect_puts(w: &mut Watcher, n: usize) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    while out.len() < n {
        if let WatchEvent::Events { events, .. } = next_event(w).await {
            for e in events {
                assert_eq!(e.kind, EventKind::Put);
                out.push((e.kv.value_str().to_string(), e.kv.mod_revision));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resumes_after_its_member_restarts() {
    let mut cluster = Cluster::start(3).await;
    let c = cluster.client().await;
    let mut w = c
        .watch("w/", WatchOptions::new().prefix().prev_kv())
        .await
        .unwrap();
    let writer = cluster.client().await;
    for i in 0..5 {
        put_retry(&writer, format!("w/{}", i % 2), i.to_string()).await;
    }
    let mut seen = collect_puts(&mut w, 5).await;

    // Kill the member the watch is connected to; write while it is down and after it is back.
    let victim = cluster.member_by_url(&w.endpoint());
    cluster.members[victim].kill();
    for i in 5..10 {
        put_retry(&writer, format!("w/{}", i % 2), i.to_string()).await;
    }
    seen.extend(collect_puts(&mut w, 5).await);
    assert_ne!(
        cluster.member_by_url(&w.endpoint()),
        victim,
        "moved to another member"
    );
    cluster.members[victim].start();
    cluster.wait_ready(Duration::from_secs(30)).await;
    // And once more with the member it moved to.
    let second = cluster.member_by_url(&w.endpoint());
    cluster.members[second].kill();
    for i in 10..15 {
        put_retry(&writer, format!("w/{}", i % 2), i.to_string()).await;
    }
    seen.extend(collect_puts(&mut w, 5).await);
    cluster.members[second].start();

    // Every event exactly once, in order.
    let values: Vec<String> = seen.iter().map(|(v, _)| v.clone()).collect();
    let expected: Vec<String> = (0..15).map(|i| i.to_string()).collect();
    assert_eq!(values, expected);
    assert!(
        seen.windows(2).all(|p| p[0].1 < p[1].1),
        "revisions increase: {seen:?}"
    );
    assert_eq!(w.next_revision(), seen.last().unwrap().1 + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_reports_compaction_and_progress() {
    let cluster = Cluster::start(1).await;
    let c = cluster.client().await;
    let first = c.put("c/k", "0").await.unwrap().header.revision;
    for i in 1..5 {
        c.put("c/k", i.to_string()).await.unwrap();
    }
    let head = c.put("c/k", "5").await.unwrap().header.revision;
    c.compact(head - 1, true).await.unwrap();

    // From a compacted revision: told explicitly, then the watch ends.
    let mut w = c
        .watch("c/", WatchOptions::new().prefix().start_revision(first))
        .await
        .unwrap();
    match next_event(&mut w).await {
        WatchEvent::Compacted { compact_revision } => assert_eq!(compact_revision, head - 1),
        other => panic!("expected Compacted, got {other:?}"),
    }
    assert!(w.next().await.is_none());

    // From the compaction revision on: replays what is left.
    let mut w = c
        .watch("c/", WatchOptions::new().prefix().start_revision(head - 1))
        .await
        .unwrap();
    let got = collect_puts(&mut w, 2).await;
    assert_eq!(got, vec![("4".into(), head - 1), ("5".into(), head)]);

    // Progress on request: everything up to the head has been delivered.
    w.request_progress().unwrap();
    loop {
        if let WatchEvent::Progress { revision } = next_event(&mut w).await {
            assert!(revision >= head);
            break;
        }
    }
    // Filters.
    let mut d = c
        .watch("c/", WatchOptions::new().prefix().no_put())
        .await
        .unwrap();
    c.put("c/k", "6").await.unwrap();
    c.delete("c/k").await.unwrap();
    match next_event(&mut d).await {
        WatchEvent::Events { events, .. } => {
            assert_eq!(events.len(), 1);
            assert_eq!(events[0].kind, EventKind::Delete);
        }
        other => panic!("{other:?}"),
    }
}
