//! Lock and Election services (`etcd-client`'s lock and election clients): waiters serialize
//! and queue by create revision, a holder that stops keeping its lease alive loses the lock to
//! the next waiter (whose key has a larger create revision: a fencing token), cancelled waiters
//! leave no key behind, the election's campaign / leader / proclaim / resign / observe order,
//! and etcd's errors.
//!
//! Every expectation here is etcd's: with `KEEL_IT_ETCD=host:port` these tests run against that
//! (real, single-member) etcd instead of starting Keel members.

use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, LeaderKey, LockOptions, ObserveStream,
    ProclaimOptions, ResignOptions, Txn, TxnOp,
};

use crate::cluster::{Cluster, client, status_code, status_message};

/// Endpoints to test against: `n` fresh Keel members, or the etcd named by `KEEL_IT_ETCD`
/// (repeated). The cluster must be kept alive by the caller.
async fn target(n: usize) -> (Option<Cluster>, Vec<String>) {
    if let Ok(etcd) = std::env::var("KEEL_IT_ETCD") {
        return (None, vec![etcd; n]);
    }
    let cluster = Cluster::start(n).await;
    let endpoints = cluster.endpoints();
    (Some(cluster), endpoints)
}

/// A name no other test run uses (needed when sharing one etcd).
fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{name}-{}-{nanos:x}", std::process::id())
}

fn lock_with(lease: i64) -> Option<LockOptions> {
    Some(LockOptions::new().with_lease(lease))
}

/// The create revision of `key`, or `None` when it does not exist.
async fn create_revision(c: &mut Client, key: &[u8]) -> Option<i64> {
    let resp = c.get(key, None).await.expect("get");
    resp.kvs().first().map(|kv| kv.create_revision())
}

/// Keys under `prefix`.
async fn keys(c: &mut Client, prefix: &str) -> Vec<String> {
    let resp = c
        .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
        .await
        .expect("get prefix");
    resp.kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .collect()
}

/// Asserts that `task` is still waiting after `wait`.
async fn still_waiting<T>(task: &tokio::task::JoinHandle<T>, wait: Duration) {
    tokio::time::sleep(wait).await;
    assert!(!task.is_finished(), "should still be waiting");
}

#[tokio::test]
async fn lockers_serialize() {
    let (_cluster, eps) = target(1).await;
    let name = unique("serial");
    let mut a = client(&eps[0]).await.unwrap();
    let mut b = client(&eps[0]).await.unwrap();
    let la = a.lease_grant(30, None).await.unwrap().id();
    let lb = b.lease_grant(30, None).await.unwrap().id();

    let ka = a.lock(name.as_str(), lock_with(la)).await.unwrap();
    assert_eq!(ka.key(), format!("{name}/{la:x}").as_bytes());
    let rev_a = create_revision(&mut a, ka.key()).await.expect("holder key");
    assert_eq!(ka.header().unwrap().revision(), rev_a);
    // Locking again with the same lease is the same acquisition.
    let again = a.lock(name.as_str(), lock_with(la)).await.unwrap();
    assert_eq!(again.key(), ka.key());
    assert_eq!(create_revision(&mut a, ka.key()).await, Some(rev_a));

    let waiter = {
        let name = name.clone();
        tokio::spawn(async move {
            let r = b.lock(name.as_str(), lock_with(lb)).await;
            (r, Instant::now(), b)
        })
    };
    still_waiting(&waiter, Duration::from_millis(700)).await;
    // The waiter queued its key behind the holder's.
    assert_eq!(keys(&mut a, &format!("{name}/")).await.len(), 2);

    let unlocked_at = Instant::now();
    let unlock = a.unlock(ka.key()).await.unwrap();
    let (got, acquired_at, mut b) = waiter.await.unwrap();
    let kb = got.unwrap();
    assert!(acquired_at >= unlocked_at);
    assert_eq!(kb.key(), format!("{name}/{lb:x}").as_bytes());
    let rev_b = create_revision(&mut b, kb.key())
        .await
        .expect("new holder key");
    assert!(rev_b > rev_a, "fencing token grows: {rev_b} > {rev_a}");
    assert!(kb.header().unwrap().revision() >= unlock.header().unwrap().revision());
    assert_eq!(create_revision(&mut b, ka.key()).await, None);

    b.unlock(kb.key()).await.unwrap();
    assert!(keys(&mut b, &format!("{name}/")).await.is_empty());
}

/// Lockers on every member, each doing an unguarded read-modify-write while holding the lock:
/// no update is lost, and each holder's fencing token is larger than the previous one's.
#[tokio::test]
async fn many_lockers_exclude_each_other() {
    let (_cluster, eps) = target(3).await;
    let name = unique("many");
    let counter = format!("{name}-counter");
    let mut tasks = Vec::new();
    for i in 0..12 {
        let (ep, name, counter) = (eps[i % eps.len()].clone(), name.clone(), counter.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = client(&ep).await.unwrap();
            let lease = c.lease_grant(30, None).await.unwrap().id();
            let held = c.lock(name.as_str(), lock_with(lease)).await.unwrap();
            let token = create_revision(&mut c, held.key()).await.expect("held key");
            let seen = c.get(counter.as_str(), None).await.unwrap();
            let n: u64 = seen
                .kvs()
                .first()
                .map(|kv| String::from_utf8_lossy(kv.value()).parse().unwrap())
                .unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(20)).await;
            c.put(counter.as_str(), (n + 1).to_string(), None)
                .await
                .unwrap();
            c.unlock(held.key()).await.unwrap();
            c.lease_revoke(lease).await.unwrap();
            (n, token)
        }));
    }
    let mut order = Vec::new();
    for t in tasks {
        order.push(t.await.unwrap());
    }
    order.sort();
    let counts: Vec<u64> = order.iter().map(|(n, _)| *n).collect();
    assert_eq!(counts, (0..12).collect::<Vec<u64>>(), "lost updates");
    assert!(
        order.windows(2).all(|w| w[0].1 < w[1].1),
        "tokens grow with each holder: {order:?}"
    );
}

/// A holder that "pauses" (stops keeping its lease alive) loses the lock when the lease
/// expires, and a waiter on another member acquires it with a larger create revision: a write
/// fenced on the old holder's key revision is refused.
#[tokio::test]
async fn paused_holder_loses_lock_to_waiter() {
    let (_cluster, eps) = target(3).await;
    let name = unique("paused");
    let mut holder = client(&eps[0]).await.unwrap();
    let mut waiter_client = client(&eps[1]).await.unwrap();

    let paused = holder.lease_grant(2, None).await.unwrap().id();
    // Outlives the test: the waiter needs no keep-alives.
    let alive = waiter_client.lease_grant(60, None).await.unwrap().id();

    let held = holder.lock(name.as_str(), lock_with(paused)).await.unwrap();
    let fence = create_revision(&mut holder, held.key())
        .await
        .expect("holder key");
    let started = Instant::now();
    let waiter = {
        let name = name.clone();
        let mut c = waiter_client.clone();
        tokio::spawn(async move { c.lock(name.as_str(), lock_with(alive)).await })
    };
    let acquired = tokio::time::timeout(Duration::from_secs(9), waiter)
        .await
        .expect("waiter acquires once the paused holder's lease expires")
        .unwrap()
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "not before the lease could expire ({:?})",
        started.elapsed()
    );
    assert_eq!(acquired.key(), format!("{name}/{alive:x}").as_bytes());
    let new_fence = create_revision(&mut waiter_client, acquired.key())
        .await
        .expect("new holder key");
    assert!(new_fence > fence);
    assert_eq!(create_revision(&mut waiter_client, held.key()).await, None);

    // The old holder wakes up and writes, fenced on its key: refused.
    let resource = format!("{name}-resource");
    let fenced = |key: &[u8], rev: i64, value: &str| {
        Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, rev)])
            .and_then([TxnOp::put(resource.as_str(), value, None)])
    };
    let stale = holder
        .txn(fenced(held.key(), fence, "old holder"))
        .await
        .unwrap();
    assert!(!stale.succeeded());
    let fresh = waiter_client
        .txn(fenced(acquired.key(), new_fence, "new holder"))
        .await
        .unwrap();
    assert!(fresh.succeeded());

    waiter_client.unlock(acquired.key()).await.unwrap();
    waiter_client.lease_revoke(alive).await.unwrap();
}

/// A waiter whose call is cancelled (client deadline) removes its key; a waiter whose own
/// lease expires while it waits gets etcd's `mutex: session is expired`.
#[tokio::test]
async fn cancelled_and_expired_waiters() {
    let (_cluster, eps) = target(1).await;
    let name = unique("cancel");
    let prefix = format!("{name}/");
    let mut c = client(&eps[0]).await.unwrap();
    let holder_lease = c.lease_grant(30, None).await.unwrap().id();
    let held = c
        .lock(name.as_str(), lock_with(holder_lease))
        .await
        .unwrap();

    let impatient_lease = c.lease_grant(30, None).await.unwrap().id();
    let opts = ConnectOptions::new().with_timeout(Duration::from_millis(800));
    let mut impatient = Client::connect([eps[0].as_str()], Some(opts))
        .await
        .unwrap();
    let e = impatient
        .lock(name.as_str(), lock_with(impatient_lease))
        .await
        .unwrap_err();
    assert!(
        matches!(
            status_code(&e),
            Some(tonic::Code::Cancelled | tonic::Code::DeadlineExceeded)
        ),
        "{e:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while keys(&mut c, &prefix).await.len() > 1 {
        assert!(Instant::now() < deadline, "cancelled waiter's key stayed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        keys(&mut c, &prefix).await,
        [String::from_utf8_lossy(held.key()).into_owned()]
    );

    // A waiter with a short lease that nobody keeps alive.
    let short = c.lease_grant(2, None).await.unwrap().id();
    let waiter = {
        let name = name.clone();
        let mut c = c.clone();
        tokio::spawn(async move { c.lock(name.as_str(), lock_with(short)).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let gone = format!("{name}/{short:x}");
    let deadline = Instant::now() + Duration::from_secs(8);
    while create_revision(&mut c, gone.as_bytes()).await.is_some() {
        assert!(Instant::now() < deadline, "short lease did not expire");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!waiter.is_finished(), "still waiting for the holder");
    c.unlock(held.key()).await.unwrap();
    match waiter.await.unwrap() {
        Err(e) => {
            assert_eq!(status_message(&e), "mutex: session is expired");
            assert_eq!(status_code(&e), Some(tonic::Code::Unknown));
        }
        // etcd 3.4 predates this check (added in 3.5) and hands out the lost lock.
        Ok(_) => assert!(
            std::env::var("KEEL_IT_ETCD").is_ok(),
            "lost key was not noticed"
        ),
    }
}

#[tokio::test]
async fn lock_errors_and_default_lease() {
    let (_cluster, eps) = target(1).await;
    let name = unique("errors");
    let mut c = client(&eps[0]).await.unwrap();

    let e = c.lock(name.as_str(), lock_with(1234)).await.unwrap_err();
    assert_eq!(status_message(&e), "etcdserver: requested lease not found");
    assert_eq!(status_code(&e), Some(tonic::Code::Unknown));
    let e = c.unlock("").await.unwrap_err();
    assert_eq!(status_message(&e), "etcdserver: key is not provided");
    assert_eq!(status_code(&e), Some(tonic::Code::Unknown));
    // Unlocking a key that does not exist is fine.
    c.unlock(format!("{name}/nothing")).await.unwrap();

    // Lease 0: the server grants a 60-second lease for the lock (nobody keeps it alive).
    let l = c.lock(name.as_str(), None).await.unwrap();
    let kv = c.get(l.key(), None).await.unwrap().kvs()[0].clone();
    assert_ne!(kv.lease(), 0);
    assert_eq!(l.key(), format!("{name}/{:x}", kv.lease()).as_bytes());
    let ttl = c.lease_time_to_live(kv.lease(), None).await.unwrap();
    assert_eq!(ttl.granted_ttl(), 60);
    c.lease_revoke(kv.lease()).await.unwrap();
}

/// Reads the next observed (key, value) or panics after a timeout.
async fn observed(stream: &mut ObserveStream) -> (String, String) {
    let msg = tokio::time::timeout(Duration::from_secs(8), stream.message())
        .await
        .expect("observe timed out")
        .expect("observe failed")
        .expect("observe ended");
    let kv = msg.kv().expect("kv");
    (
        String::from_utf8_lossy(kv.key()).into_owned(),
        String::from_utf8_lossy(kv.value()).into_owned(),
    )
}

#[tokio::test]
async fn election_order() {
    let (_cluster, eps) = target(3).await;
    let name = unique("elect");
    let mut a = client(&eps[0]).await.unwrap();
    let mut b = client(&eps[1]).await.unwrap();
    let mut watcher = client(&eps[2]).await.unwrap();

    let e = a.leader(name.as_str()).await.unwrap_err();
    assert_eq!(status_message(&e), "election: no leader");
    assert_eq!(status_code(&e), Some(tonic::Code::Unknown));
    // Observe answers (sends response headers) only once there is a leader to report.
    let observing = {
        let name = name.clone();
        tokio::spawn(async move { watcher.observe(name.as_str()).await })
    };
    still_waiting(&observing, Duration::from_millis(300)).await;

    let la = a.lease_grant(30, None).await.unwrap().id();
    let lb = b.lease_grant(30, None).await.unwrap().id();
    let won = a.campaign(name.as_str(), "v1", la).await.unwrap();
    let leader_a: LeaderKey = won.leader().expect("leader key").clone();
    let key_a = format!("{name}/{la:x}");
    assert_eq!(leader_a.name(), name.as_bytes());
    assert_eq!(leader_a.key(), key_a.as_bytes());
    assert_eq!(leader_a.lease(), la);
    assert_eq!(
        create_revision(&mut a, key_a.as_bytes()).await,
        Some(leader_a.rev())
    );
    assert_eq!(won.header().unwrap().revision(), leader_a.rev());
    let mut observe = observing.await.unwrap().unwrap();
    assert_eq!(observed(&mut observe).await, (key_a.clone(), "v1".into()));

    // A second candidate waits for the first to resign.
    let candidate = {
        let name = name.clone();
        tokio::spawn(async move { (b.campaign(name.as_str(), "v2", lb).await, b) })
    };
    still_waiting(&candidate, Duration::from_millis(700)).await;
    let current = a.leader(name.as_str()).await.unwrap();
    assert_eq!(current.kv().unwrap().value(), b"v1");

    a.proclaim(
        "v1b",
        Some(ProclaimOptions::new().with_leader(leader_a.clone())),
    )
    .await
    .unwrap();
    assert_eq!(observed(&mut observe).await, (key_a.clone(), "v1b".into()));
    assert!(!candidate.is_finished());

    a.resign(Some(ResignOptions::new().with_leader(leader_a.clone())))
        .await
        .unwrap();
    let (won_b, mut b) = candidate.await.unwrap();
    let leader_b = won_b.unwrap().leader().expect("leader key").clone();
    let key_b = format!("{name}/{lb:x}");
    assert_eq!(leader_b.key(), key_b.as_bytes());
    assert!(leader_b.rev() > leader_a.rev());
    assert_eq!(observed(&mut observe).await, (key_b.clone(), "v2".into()));
    let current = a.leader(name.as_str()).await.unwrap();
    assert_eq!(current.kv().unwrap().key(), key_b.as_bytes());

    // The old leader can no longer proclaim; resigning again is harmless.
    let e = a
        .proclaim(
            "stale",
            Some(ProclaimOptions::new().with_leader(leader_a.clone())),
        )
        .await
        .unwrap_err();
    assert_eq!(status_message(&e), "election: not leader");
    assert_eq!(status_code(&e), Some(tonic::Code::Unknown));
    a.resign(Some(ResignOptions::new().with_leader(leader_a.clone())))
        .await
        .unwrap();
    let e = a.proclaim("x", None).await.unwrap_err();
    assert_eq!(status_message(&e), r#""leader" field must be provided"#);
    let e = a.resign(None).await.unwrap_err();
    assert_eq!(status_message(&e), r#""leader" field must be provided"#);

    // Campaigning again with the same lease keeps the key and proclaims the new value.
    let again = b.campaign(name.as_str(), "v2b", lb).await.unwrap();
    let again = again.leader().expect("leader key");
    assert_eq!(again.key(), key_b.as_bytes());
    assert_eq!(again.rev(), leader_b.rev());
    assert_eq!(observed(&mut observe).await, (key_b.clone(), "v2b".into()));

    // A campaigner whose call is cancelled resigns: its key is removed.
    let lc = a.lease_grant(30, None).await.unwrap().id();
    let opts = ConnectOptions::new().with_timeout(Duration::from_millis(800));
    let mut impatient = Client::connect([eps[0].as_str()], Some(opts))
        .await
        .unwrap();
    impatient
        .campaign(name.as_str(), "v3", lc)
        .await
        .unwrap_err();
    let key_c = format!("{name}/{lc:x}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while create_revision(&mut a, key_c.as_bytes()).await.is_some() {
        assert!(
            Instant::now() < deadline,
            "cancelled candidate's key stayed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The leader's lease ends: the observer sees nobody until a new candidate is elected.
    b.lease_revoke(lb).await.unwrap();
    let ld = a.lease_grant(30, None).await.unwrap().id();
    let won_d = a.campaign(name.as_str(), "v4", ld).await.unwrap();
    let key_d = format!("{name}/{ld:x}");
    assert_eq!(won_d.leader().unwrap().key(), key_d.as_bytes());
    assert_eq!(observed(&mut observe).await, (key_d, "v4".into()));
    a.lease_revoke(ld).await.unwrap();
    a.lease_revoke(la).await.unwrap();
    a.lease_revoke(lc).await.unwrap();
}
