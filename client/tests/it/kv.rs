use std::time::Duration;

use keel_client::{Compare, Error, Op, OpResponse};

use crate::cluster::{Cluster, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_txn_and_typed_errors() {
    let cluster = Cluster::start(1).await;
    let c = cluster.client().await;

    // Put / get / prefix / limit / count.
    for i in 0..5 {
        c.put(format!("kv/{i}"), format!("v{i}")).await.unwrap();
    }
    let r = c.put("kv/0", "new").prev_kv().await.unwrap();
    assert_eq!(r.prev_kv.unwrap().value_str(), "v0");
    let kv = c.get("kv/0").await.unwrap().into_first().unwrap();
    assert_eq!(kv.value_str(), "new");
    assert_eq!(kv.version, 2);
    let all = c.get("kv/").prefix().await.unwrap();
    assert_eq!(all.kvs.len(), 5);
    let page = c.get("kv/").prefix().limit(2).await.unwrap();
    assert_eq!(page.kvs.len(), 2);
    assert!(page.more);
    assert_eq!(page.count, 5);
    assert_eq!(c.get("kv/").prefix().count_only().await.unwrap().count, 5);
    let (listed, rev) = c.list_prefix("kv/", 2).await.unwrap();
    assert_eq!(listed.len(), 5);
    assert_eq!(rev, all.header.revision);
    assert!(c.get("missing").await.unwrap().first().is_none());

    // Txn: compare-and-swap on the mod revision, typed compares, else branch.
    let r = c
        .txn()
        .when([Compare::mod_revision("kv/0").eq(kv.mod_revision)])
        .and_then([Op::put("kv/0", "cas"), Op::get("kv/1")])
        .or_else([Op::get("kv/0")])
        .await
        .unwrap();
    assert!(r.succeeded);
    assert!(matches!(&r.responses[1], OpResponse::Get(g) if g.kvs[0].value_str() == "v1"));
    let r = c
        .txn()
        .when([Compare::mod_revision("kv/0").eq(kv.mod_revision)])
        .and_then([Op::put("kv/0", "lost")])
        .or_else([Op::get("kv/0")])
        .await
        .unwrap();
    assert!(!r.succeeded);
    assert_eq!(r.responses[0].as_get().unwrap().kvs[0].value_str(), "cas");
    let r = c
        .txn()
        .when([
            Compare::absent("kv/new"),
            Compare::value("kv/1").eq("v1"),
            Compare::version("kv/2").gt(0),
            Compare::create_revision("kv/3").lt(10_000),
            Compare::lease("kv/4").eq(0),
        ])
        .and_then([Op::put("kv/new", "x")])
        .await
        .unwrap();
    assert!(r.succeeded);

    // Deletes.
    let d = c.delete("kv/").prefix().prev_kv().await.unwrap();
    assert_eq!(d.deleted, 6);
    assert_eq!(d.prev_kvs.len(), 6);

    // Typed errors decoded from etcd's codes and messages.
    let head = c.put("e", "1").await.unwrap().header.revision;
    let e = c.get("e").revision(head + 1000).await.unwrap_err();
    assert!(matches!(e, Error::FutureRevision), "{e:?}");
    c.put("e", "2").await.unwrap();
    c.compact(head, false).await.unwrap();
    let e = c.get("e").revision(head - 1).await.unwrap_err();
    assert!(matches!(e, Error::Compacted { .. }), "{e:?}");
    let e = c.put("e", "x").lease(0x1234).await.unwrap_err();
    assert!(matches!(e, Error::LeaseNotFound), "{e:?}");
    let e = c
        .txn()
        .and_then([Op::put("d", "1"), Op::put("d", "2")])
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::InvalidArgument(m) if m.contains("duplicate key")),
        "{e:?}"
    );
    let e = c.put("", "x").await.unwrap_err();
    assert!(
        matches!(&e, Error::InvalidArgument(m) if m.contains("key is not provided")),
        "{e:?}"
    );
    assert!(!e.is_ambiguous());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_retries_reads_and_reports_ambiguous_writes() {
    let mut cluster = Cluster::start(3).await;
    let c = cluster.client().await;
    c.put("f", "1").await.unwrap();

    // Kill each member in turn: requests keep working through the others (reads retried,
    // writes retried only while they were certainly not sent).
    for i in 0..3 {
        cluster.members[i].kill();
        for j in 0..5 {
            // A write sent on the connection to the member just killed (before the client
            // noticed it died), or while the cluster elects a new leader (Keel's "no leader"
            // may come from a forward that failed mid-flight), is ambiguous; writing the same
            // value again is safe here.
            let mut ambiguous = 0;
            loop {
                match c.put("f", format!("{i}-{j}")).await {
                    Ok(_) => break,
                    Err(e) if e.is_ambiguous() && ambiguous < 50 => {
                        ambiguous += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => panic!("put after killing m{i}: {e:?}"),
                }
            }
            let got = c.get("f").await.unwrap().into_first().unwrap();
            assert_eq!(got.value_str(), format!("{i}-{j}"));
        }
        cluster.members[i].start();
        cluster.wait_ready(Duration::from_secs(30)).await;
    }

    // A write in flight when its member dies: ambiguous, never silently retried. A lock call
    // blocks while another holder has the lock, so it is in flight when we kill its member.
    let holder = c.lease_grant(30).await.unwrap();
    c.lock("amb", holder.id).await.unwrap();
    let target = cluster.members[0].endpoint();
    let pinned = keel_client::Client::connect([target], crate::cluster::opts())
        .await
        .unwrap();
    let waiter_lease = c.lease_grant(30).await.unwrap();
    let call = tokio::spawn(async move { pinned.lock("amb", waiter_lease.id).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.members[0].kill();
    let e = call.await.unwrap().unwrap_err();
    assert!(e.is_ambiguous(), "{e:?}");
    match c.lease_revoke(waiter_lease.id).await {
        Ok(_) | Err(Error::LeaseNotFound) => {}
        Err(e) => panic!("{e:?}"),
    }
    cluster.members[0].start();

    // Quorum lost: a write fails as ambiguous (or unavailable when no member could take it),
    // a read fails after its retries; both recover once the quorum is back.
    cluster.wait_ready(Duration::from_secs(30)).await;
    cluster.members[1].kill();
    cluster.members[2].kill();
    let short = keel_client::Client::connect(
        cluster.endpoints(),
        crate::cluster::opts()
            .with_request_timeout(Duration::from_secs(2))
            .with_retry(keel_client::RetryPolicy {
                max_attempts: 3,
                initial_backoff: Duration::from_millis(50),
                max_backoff: Duration::from_millis(200),
            }),
    )
    .await
    .unwrap();
    let e = short.put("f", "no quorum").await.unwrap_err();
    assert!(
        e.is_ambiguous() || matches!(e, Error::Unavailable(_)),
        "write without quorum: {e:?}"
    );
    let e = short.get("f").await.unwrap_err();
    assert!(e.is_transient(), "read without quorum: {e:?}");
    cluster.members[1].start();
    cluster.members[2].start();
    eventually(Duration::from_secs(30), "quorum back", || {
        let c = c.clone();
        async move { c.put("f", "back").await.is_ok() }
    })
    .await;
}
