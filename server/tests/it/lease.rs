//! Leases: grant, keep-alive (also through a follower), time-to-live, revoke, expiry that
//! deletes keys with DELETE events, and leases surviving a leader kill.

use std::time::{Duration, Instant};

use etcd_client::{
    Client, EventType, LeaseKeepAliveStream, LeaseKeeper, LeaseTimeToLiveOptions, PutOptions,
    WatchOptions,
};

use crate::cluster::{Cluster, client, status_message};

/// A lease granted with `ttl` seconds, `key` attached to it and a keep-alive stream opened for
/// it: the granted lease and the stream's two halves.
async fn leased_key(
    c: &mut Client,
    ttl: i64,
    key: &str,
) -> (
    etcd_client::LeaseGrantResponse,
    LeaseKeeper,
    LeaseKeepAliveStream,
) {
    let g = c.lease_grant(ttl, None).await.unwrap();
    c.put(key, "1", Some(PutOptions::new().with_lease(g.id())))
        .await
        .unwrap();
    let (keeper, stream) = c.lease_keep_alive(g.id()).await.unwrap();
    (g, keeper, stream)
}

#[tokio::test]
async fn grant_keepalive_ttl_revoke() {
    let cluster = Cluster::start(1).await;
    let mut c = client(&cluster.members[0].endpoint()).await.unwrap();
    let g = c.lease_grant(30, None).await.unwrap();
    assert!(g.id() > 0);
    assert_eq!(g.ttl(), 30);
    // A TTL below the minimum is raised to it (1.5 election timeouts, here 500 ms → 1 s).
    assert!(c.lease_grant(0, None).await.unwrap().ttl() >= 1);
    // Client-chosen ID, and a duplicate.
    assert_eq!(
        c.lease_grant(
            30,
            Some(etcd_client::LeaseGrantOptions::new().with_id(4242))
        )
        .await
        .unwrap()
        .id(),
        4242
    );
    let e = c
        .lease_grant(
            30,
            Some(etcd_client::LeaseGrantOptions::new().with_id(4242)),
        )
        .await
        .unwrap_err();
    assert_eq!(status_message(&e), "etcdserver: lease already exists");

    c.put("held", "1", Some(PutOptions::new().with_lease(g.id())))
        .await
        .unwrap();
    let ttl = c
        .lease_time_to_live(g.id(), Some(LeaseTimeToLiveOptions::new().with_keys()))
        .await
        .unwrap();
    assert!(ttl.ttl() > 25 && ttl.ttl() <= 30, "{}", ttl.ttl());
    assert_eq!(ttl.granted_ttl(), 30);
    assert_eq!(ttl.keys(), [b"held".to_vec()]);
    let (mut keeper, mut stream) = c.lease_keep_alive(g.id()).await.unwrap();
    keeper.keep_alive().await.unwrap();
    assert_eq!(stream.message().await.unwrap().unwrap().ttl(), 30);
    assert!(
        c.leases()
            .await
            .unwrap()
            .leases()
            .iter()
            .any(|l| l.id() == g.id())
    );

    c.lease_revoke(g.id()).await.unwrap();
    assert!(
        c.get("held", None).await.unwrap().kvs().is_empty(),
        "revoke deletes attached keys"
    );
    assert_eq!(c.lease_time_to_live(g.id(), None).await.unwrap().ttl(), -1);
    let e = c.lease_revoke(g.id()).await.unwrap_err();
    assert_eq!(status_message(&e), "etcdserver: requested lease not found");
}

#[tokio::test]
async fn expiry_deletes_keys_with_delete_events() {
    let cluster = Cluster::start(1).await;
    let mut c = client(&cluster.members[0].endpoint()).await.unwrap();
    let g = c.lease_grant(2, None).await.unwrap();
    c.put("eph/a", "1", Some(PutOptions::new().with_lease(g.id())))
        .await
        .unwrap();
    c.put("eph/b", "2", Some(PutOptions::new().with_lease(g.id())))
        .await
        .unwrap();
    let mut w = c
        .watch(
            "eph/",
            Some(WatchOptions::new().with_prefix().with_prev_key()),
        )
        .await
        .unwrap();
    assert!(w.message().await.unwrap().unwrap().created());
    let start = Instant::now();
    let msg = tokio::time::timeout(Duration::from_secs(10), w.message())
        .await
        .expect("lease never expired")
        .unwrap()
        .unwrap();
    assert!(
        start.elapsed() >= Duration::from_millis(1000),
        "expired too early: {:?}",
        start.elapsed()
    );
    assert_eq!(msg.events().len(), 2, "both keys go in one revision");
    assert!(
        msg.events()
            .iter()
            .all(|e| e.event_type() == EventType::Delete && e.prev_kv().is_some())
    );
    assert!(
        c.get("eph/", Some(etcd_client::GetOptions::new().with_prefix()))
            .await
            .unwrap()
            .kvs()
            .is_empty()
    );
}

#[tokio::test]
async fn leases_survive_a_leader_kill_and_keepalives_reach_the_leader() {
    let mut cluster = Cluster::start(3).await;
    let leader = cluster.leader().await;
    let follower = (leader + 1) % 3;
    let mut fc = client(&cluster.members[follower].endpoint()).await.unwrap();
    // Keep-alive sent to a follower is answered by the leader.
    let (g, mut keeper, mut stream) = leased_key(&mut fc, 6, "owned").await;
    keeper.keep_alive().await.unwrap();
    assert_eq!(stream.message().await.unwrap().unwrap().ttl(), 6);
    drop(keeper);

    cluster.members[leader].kill();
    // The new leader renews every lease on promotion: nothing expires early.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let r = fc
        .get(
            "owned",
            Some(etcd_client::GetOptions::new().with_serializable()),
        )
        .await
        .unwrap();
    assert_eq!(
        r.kvs().len(),
        1,
        "lease expired early across the leader change"
    );
    // Keep it alive through the new leader, then let it lapse.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok((mut k, mut s)) = fc.lease_keep_alive(g.id()).await
            && k.keep_alive().await.is_ok()
            && let Ok(Some(m)) = s.message().await
            && m.ttl() > 0
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no keep-alive after the leader change"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while !fc
        .get("owned", None)
        .await
        .map(|r| r.kvs().is_empty())
        .unwrap_or(false)
    {
        assert!(
            Instant::now() < deadline,
            "lease never expired after keep-alives stopped"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Keep-alives that reach a follower go to the leader on the follower's forwarding stream,
/// many at once: each is answered with its own lease's TTL (0 for a lease that does not
/// exist). After the leader is killed the next leader answers them, and no lease expired in
/// between.
#[tokio::test]
async fn pipelined_follower_keepalives_survive_a_leader_kill() {
    let mut cluster = Cluster::start(3).await;
    let leader = cluster.leader().await;
    let follower = (leader + 1) % 3;
    let endpoint = cluster.members[follower].endpoint();
    let mut fc = client(&endpoint).await.unwrap();
    let mut leases = Vec::new();
    for i in 0..16i64 {
        let ttl = 8 + i % 3;
        let g = fc.lease_grant(ttl, None).await.unwrap();
        fc.put(
            format!("held/{i}"),
            "1",
            Some(PutOptions::new().with_lease(g.id())),
        )
        .await
        .unwrap();
        leases.push((g.id(), ttl));
    }
    let missing = leases.iter().map(|(id, _)| id).max().unwrap() + 1000;

    // Every lease's stream sends 20 keep-alives back to back, all streams at once.
    let mut tasks = tokio::task::JoinSet::new();
    for &(id, ttl) in &leases {
        let endpoint = endpoint.clone();
        tasks.spawn(async move {
            let mut c = client(&endpoint).await.unwrap();
            let (mut keeper, mut stream) = c.lease_keep_alive(id).await.unwrap();
            for _ in 0..20 {
                keeper.keep_alive().await.unwrap();
                let m = stream.message().await.unwrap().unwrap();
                assert_eq!((m.id(), m.ttl()), (id, ttl), "answer of lease {id:x}");
            }
        });
    }
    // The client opens a keep-alive stream with one keep-alive and takes TTL 0 (etcd's answer
    // for an unknown lease) as "lease not found".
    let unknown = fc.lease_keep_alive(missing).await;
    assert!(
        matches!(unknown, Err(etcd_client::Error::LeaseKeepAliveError(ref m)) if m == "lease not found"),
        "{:?}",
        unknown.map(|_| ())
    );
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }

    cluster.members[leader].kill();
    let deadline = Instant::now() + Duration::from_secs(15);
    for &(id, ttl) in &leases {
        loop {
            if let Ok((mut k, mut s)) = fc.lease_keep_alive(id).await
                && k.keep_alive().await.is_ok()
                && let Ok(Some(m)) = s.message().await
                && m.ttl() > 0
            {
                assert_eq!(m.ttl(), ttl);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no keep-alive of {id:x} after the leader change"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let held = fc
        .get("held/", Some(etcd_client::GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(
        held.kvs().len(),
        leases.len(),
        "a lease expired across the leader change"
    );
}

/// A keep-alive sent to a follower while the leader is paused (SIGSTOP: its connections stay
/// open, nothing answers) is answered by the next leader within seconds, not after the
/// follower's HTTP/2 keepalive gives up on the old one (15 s, longer than the lease).
#[tokio::test]
async fn follower_keepalive_moves_on_from_a_paused_leader() {
    let cluster = Cluster::start(3).await;
    let leader = cluster.leader().await;
    let follower = (leader + 1) % 3;
    let mut fc = client(&cluster.members[follower].endpoint()).await.unwrap();
    let (g, mut keeper, mut stream) = leased_key(&mut fc, 6, "paused/held").await;

    cluster.members[leader].signal("STOP");
    let started = Instant::now();
    keeper.keep_alive().await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(6), stream.message()).await;
    cluster.members[leader].signal("CONT");
    let m = answer
        .expect("keep-alive answered while the old leader is paused")
        .unwrap()
        .unwrap();
    assert_eq!(
        (m.id(), m.ttl()),
        (g.id(), 6),
        "after {:?}",
        started.elapsed()
    );
    let held = fc
        .get(
            "paused/held",
            Some(etcd_client::GetOptions::new().with_serializable()),
        )
        .await
        .unwrap();
    assert_eq!(held.kvs().len(), 1, "the lease expired");
}

/// A lease whose deadline passed while its leader could not commit (both followers paused,
/// so no keep-alive could be confirmed either) is expired: a keep-alive that arrives when the
/// followers are back must not renew it, since the revocation the leader proposes for it can
/// commit a moment later and delete its keys while the client believes the lease alive. As
/// with etcd, the keep-alive waits for the revocation and answers TTL 0 (found by keel-jepsen's
/// lease workload under a partition: revocations proposed when the leader could commit again
/// raced with keep-alives arriving at the same moment).
#[tokio::test]
async fn keepalive_after_the_deadline_waits_for_the_revocation() {
    let cluster = Cluster::start(3).await;
    let leader = cluster.leader().await;
    let mut c = client(&cluster.members[leader].endpoint()).await.unwrap();
    let (g, mut keeper, mut stream) = leased_key(&mut c, 1, "expired/held").await;
    let term_before = c.status().await.unwrap().raft_term();
    let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    for &f in &followers {
        cluster.members[f].signal("STOP");
    }
    // Past the deadline (the TTL, here the 1 s minimum) and the expiry loop's next tick.
    tokio::time::sleep(Duration::from_millis(g.ttl() as u64 * 1000 + 600)).await;
    for &f in &followers {
        cluster.members[f].signal("CONT");
    }
    keeper.keep_alive().await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("keep-alive answered");
    let answered_at = Instant::now();
    let ttl = match answer {
        Ok(Some(m)) => m.ttl(),
        Ok(None) => panic!("keep-alive stream ended"),
        // A leader change while the followers resume may fail the call: nothing was promised.
        Err(e) => {
            eprintln!("keep-alive failed: {e}");
            return;
        }
    };
    // The same leader in the same term: a member elected again (a new term, e.g. after the
    // resumed followers split their votes) is a new leader and renews every lease.
    let now_leader = cluster.leader().await;
    let now_term = client(&cluster.members[now_leader].endpoint())
        .await
        .unwrap()
        .status()
        .await
        .unwrap()
        .raft_term();
    let same_leader = now_leader == leader && now_term == term_before;
    let mut other = client(&cluster.members[followers[0]].endpoint())
        .await
        .unwrap();
    let held = other.get("expired/held", None).await.unwrap();
    if ttl > 0 {
        // Only a new leader may renew it (it gives every lease its full TTL again).
        assert!(
            !same_leader,
            "the leader renewed a lease past its deadline (term {term_before} throughout)"
        );
        assert!(answered_at.elapsed() < Duration::from_secs(ttl as u64));
        assert_eq!(
            held.kvs().len(),
            1,
            "renewed for {ttl} s, but the key is gone"
        );
    } else {
        assert!(held.kvs().is_empty(), "TTL 0 answered but the key is there");
    }
}

/// A leader paused past a lease's deadline must not revoke the lease when it resumes: while it
/// was paused another member became leader and renewed the lease (and keeps renewing it on
/// keep-alives), and the resumed member's expiry loop, still believing itself leader for a
/// moment, proposed the revocation and forwarded it to the new leader, which applied it (found
/// by keel-jepsen's lease workload under pauses). Expiry is the decision of the member that
/// leads now; a deposed leader's revocation is dropped, never forwarded.
#[tokio::test]
async fn resumed_old_leader_does_not_revoke_a_lease_the_new_leader_keeps() {
    let cluster = Cluster::start(3).await;
    let old_leader = cluster.leader().await;
    let survivor = (old_leader + 1) % 3;
    let mut c = client(&cluster.members[survivor].endpoint()).await.unwrap();
    let (g, mut keeper, mut stream) = leased_key(&mut c, 2, "kept/held").await;
    keeper.keep_alive().await.unwrap();
    stream.message().await.unwrap().unwrap();

    cluster.members[old_leader].signal("STOP");
    // Past the lease's deadline on the paused leader; meanwhile the others elect a leader,
    // which renews the lease and then hears keep-alives from us.
    let pause_until = Instant::now() + Duration::from_millis(3000);
    while Instant::now() < pause_until {
        let _ = keeper.keep_alive().await;
        let _ = tokio::time::timeout(Duration::from_millis(500), stream.message()).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cluster.members[old_leader].signal("CONT");
    let watch_until = Instant::now() + Duration::from_millis(2500);
    let mut last_ttl = 0;
    while Instant::now() < watch_until {
        keeper.keep_alive().await.unwrap();
        if let Ok(Ok(Some(m))) =
            tokio::time::timeout(Duration::from_secs(2), stream.message()).await
        {
            last_ttl = m.ttl();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(last_ttl, g.ttl(), "the kept-alive lease is gone");
    let held = c.get("kept/held", None).await.unwrap();
    assert_eq!(held.kvs().len(), 1, "the kept-alive lease's key is gone");
}
