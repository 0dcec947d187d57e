//! 3-node clusters as real processes: forwarding, read consistency, leader loss, restarts and
//! minority partitions.

use std::time::{Duration, Instant};

use etcd_client::GetOptions;

use crate::cluster::{Cluster, client, status_message};

#[tokio::test]
async fn writes_to_followers_and_linearizable_reads_everywhere() {
    let cluster = Cluster::start(3).await;
    let leader = cluster.leader().await;
    let follower = (leader + 1) % 3;
    let mut fc = client(&cluster.members[follower].endpoint()).await.unwrap();
    // A write sent to a follower is forwarded to the leader.
    let rev = fc
        .put("via-follower", "1", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    assert!(rev >= 2);
    // Every member, read linearizably right after, sees it.
    for m in &cluster.members {
        let mut c = client(&m.endpoint()).await.unwrap();
        let r = c.get("via-follower", None).await.unwrap();
        assert_eq!(
            r.kvs().len(),
            1,
            "member {} missed an acknowledged write",
            m.name
        );
        assert!(r.header().unwrap().revision() >= rev);
    }
    // Response headers name the member that answered, and all agree on the cluster.
    let mut ids = std::collections::BTreeSet::new();
    let mut clusters = std::collections::BTreeSet::new();
    for m in &cluster.members {
        let mut c = client(&m.endpoint()).await.unwrap();
        let h = c
            .get("x", Some(GetOptions::new().with_serializable()))
            .await
            .unwrap()
            .header()
            .unwrap()
            .clone();
        ids.insert(h.member_id());
        clusters.insert(h.cluster_id());
    }
    assert_eq!((ids.len(), clusters.len()), (3, 1));
    let members = fc.member_list().await.unwrap();
    assert_eq!(members.members().len(), 3);
}

#[tokio::test]
async fn leader_kill_loses_no_acknowledged_write() {
    let mut cluster = Cluster::start(3).await;
    let leader = cluster.leader().await;
    let mut acked = Vec::new();
    {
        let mut c = client(&cluster.members[(leader + 1) % 3].endpoint())
            .await
            .unwrap();
        for i in 0..100 {
            c.put(format!("w{i:03}"), "v", None).await.unwrap();
            acked.push(i);
        }
    }
    cluster.members[leader].kill();
    let t0 = Instant::now();
    // Clients that retry continue against the survivors.
    let survivor = (leader + 1) % 3;
    let mut c = client(&cluster.members[survivor].endpoint()).await.unwrap();
    loop {
        match c.put("after-failover", "1", None).await {
            Ok(_) => break,
            Err(e) => {
                assert!(
                    t0.elapsed() < Duration::from_secs(15),
                    "no new leader after 15s: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let failover = t0.elapsed();
    assert!(
        failover < Duration::from_secs(10),
        "failover took {failover:?}"
    );
    let all = c
        .get("w", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(all.count(), 100, "an acknowledged write was lost");

    // The old leader comes back as a follower and catches up.
    cluster.members[leader].start();
    cluster.wait_ready(Duration::from_secs(30)).await;
    let mut old = client(&cluster.members[leader].endpoint()).await.unwrap();
    let r = old.get("after-failover", None).await.unwrap();
    assert_eq!(r.kvs().len(), 1);
}

#[tokio::test]
async fn follower_restart_catches_up() {
    let mut cluster = Cluster::start(3).await;
    let leader = cluster.leader().await;
    let follower = (leader + 1) % 3;
    cluster.members[follower].kill();
    let mut c = client(&cluster.members[leader].endpoint()).await.unwrap();
    for i in 0..200 {
        c.put(format!("r{i:03}"), "v", None).await.unwrap();
    }
    let rev = c
        .get("r000", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    cluster.members[follower].start();
    // Serializable reads on the follower converge to the leader's state.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut fc) = client(&cluster.members[follower].endpoint()).await
            && let Ok(r) = fc
                .get(
                    "r",
                    Some(GetOptions::new().with_prefix().with_serializable()),
                )
                .await
            && r.count() == 200
            && r.header().unwrap().revision() >= rev
        {
            break;
        }
        assert!(Instant::now() < deadline, "follower did not catch up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn minority_refuses_writes_and_linearizable_reads() {
    let mut cluster = Cluster::start(3).await;
    let leader = cluster.leader().await;
    let lone = (leader + 1) % 3;
    let mut c = client(&cluster.members[leader].endpoint()).await.unwrap();
    c.put("before", "1", None).await.unwrap();
    // Leave one member alone: kill the other two.
    for i in 0..3 {
        if i != lone {
            cluster.members[i].kill();
        }
    }
    let mut lc = client(&cluster.members[lone].endpoint()).await.unwrap();
    let e = lc.put("minority", "1", None).await.unwrap_err();
    let msg = status_message(&e);
    assert!(
        msg.contains("no leader") || msg.contains("timed out") || msg.contains("leader changed"),
        "unexpected error: {msg}"
    );
    let e = lc.get("before", None).await.unwrap_err();
    let msg = status_message(&e);
    assert!(
        msg.contains("no leader") || msg.contains("timed out"),
        "a minority served a linearizable read: {msg}"
    );
    // A serializable read is allowed (possibly stale) and must not include the refused write.
    let r = lc
        .get("minority", Some(GetOptions::new().with_serializable()))
        .await
        .unwrap();
    assert!(r.kvs().is_empty());
}
