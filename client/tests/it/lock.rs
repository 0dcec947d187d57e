use std::time::Duration;

use futures::StreamExt;
use keel_client::{Compare, Error, LeaderElector, Op, Role};

use crate::cluster::{Cluster, eventually};

/// Skips (returns true) when the server has no Lock/Election service yet.
fn unimplemented(e: &Error) -> bool {
    if matches!(e, Error::Unimplemented(_)) {
        eprintln!("SKIPPED: the server does not implement this service yet ({e})");
        return true;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_are_exclusive_and_fenced() {
    let cluster = Cluster::start(1).await;
    let c = cluster.client().await;
    let l1 = c.lease_grant(30).await.unwrap();
    let first = match c.lock("locks/x", l1.id).await {
        Ok(k) => k,
        Err(e) if unimplemented(&e) => return,
        Err(e) => panic!("{e:?}"),
    };
    assert!(first.key.starts_with(b"locks/x/"));
    let l2 = c.lease_grant(30).await.unwrap();
    let c2 = c.clone();
    let mut second = tokio::spawn(async move { c2.lock("locks/x", l2.id).await });
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut second)
            .await
            .is_err(),
        "second lock must wait"
    );
    c.unlock(first.key.clone()).await.unwrap();
    let second = second.await.unwrap().unwrap();
    assert!(second.revision > first.revision, "fencing token grows");
    // A write fenced by the old holder's token fails now.
    let r = c
        .txn()
        .when([Compare::create_revision(first.key.clone()).eq(first.revision)])
        .and_then([Op::put("protected", "stale")])
        .await
        .unwrap();
    assert!(!r.succeeded);
    // Revoking the holder's lease releases the lock.
    c.lease_revoke(l2.id).await.unwrap();

    // Lock sessions: own lease, kept alive, fence helper; a dropped guard releases the lock
    // once its lease expires, an unlocked one at once.
    let g1 = c.lock_session("locks/s", 2).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(g1.is_held(), "kept alive past its TTL");
    let r = c
        .txn()
        .when([g1.fence()])
        .and_then([Op::put("protected", "g1")])
        .await
        .unwrap();
    assert!(r.succeeded);
    let c2 = c.clone();
    let waiter = tokio::spawn(async move { c2.lock_session("locks/s", 2).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished());
    let old_fence = g1.fence();
    drop(g1); // like a crash: released when the lease expires
    let g2 = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("released after the TTL")
        .unwrap()
        .unwrap();
    let r = c
        .txn()
        .when([old_fence])
        .and_then([Op::put("protected", "stale")])
        .await
        .unwrap();
    assert!(!r.succeeded, "the old holder is fenced off");
    let key = g2.key().to_vec();
    g2.unlock().await.unwrap();
    assert!(c.get(key).await.unwrap().first().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elections_and_leader_elector_failover() {
    let cluster = Cluster::start(3).await;
    let c = cluster.client().await;
    let lease = c.lease_grant(30).await.unwrap();
    let leader = match c.campaign("elect/a", "one", lease.id).await {
        Ok(l) => l,
        Err(e) if unimplemented(&e) => return,
        Err(e) => panic!("{e:?}"),
    };
    assert_eq!(
        c.election_leader("elect/a").await.unwrap().value_str(),
        "one"
    );
    let mut obs = c.observe("elect/a").await.unwrap();
    assert_eq!(obs.next().await.unwrap().unwrap().value_str(), "one");
    c.proclaim(&leader, "uno").await.unwrap();
    assert_eq!(obs.next().await.unwrap().unwrap().value_str(), "uno");
    c.resign(&leader).await.unwrap();
    let e = c.election_leader("elect/a").await.unwrap_err();
    assert!(matches!(e, Error::NoElectionLeader), "{e:?}");
    let e = c.proclaim(&leader, "late").await.unwrap_err();
    assert!(matches!(e, Error::NotElectionLeader), "{e:?}");

    // Two replicas: one leads; stopping it abruptly (no resign) hands over after the TTL.
    let gained = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let g = gained.clone();
    let a = LeaderElector::new(cluster.client().await, "elect/ctl", "a")
        .ttl(2)
        .on_elected(move |_| {
            g.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        })
        .spawn();
    let la = tokio::time::timeout(Duration::from_secs(10), a.wait_leader())
        .await
        .expect("a leads");
    let b = LeaderElector::new(cluster.client().await, "elect/ctl", "b")
        .ttl(2)
        .spawn();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(b.role(), Role::Candidate);
    assert_eq!(gained.load(std::sync::atomic::Ordering::SeqCst), 1);
    drop(a); // a crash: no resign, its lease expires
    let lb = tokio::time::timeout(Duration::from_secs(15), b.wait_leader())
        .await
        .expect("b takes over");
    assert!(lb.rev > la.rev);
    assert_eq!(
        c.election_leader("elect/ctl").await.unwrap().value_str(),
        "b"
    );

    // Deleting the leader key (an operator, or a resign by someone else) deposes b; it
    // campaigns again and leads anew with a larger token.
    c.delete(lb.key.clone()).await.unwrap();
    let mut roles = b.subscribe();
    eventually(Duration::from_secs(10), "b re-elected", || {
        let r = roles.borrow_and_update().clone();
        async move { matches!(r, Role::Leader(l) if l.rev > lb.rev) }
    })
    .await;
    // A graceful stop resigns at once.
    b.stop().await;
    let e = c.election_leader("elect/ctl").await.unwrap_err();
    assert!(matches!(e, Error::NoElectionLeader), "{e:?}");
}
