use std::time::Duration;

use keel_client::{Error, LeaseState};

use crate::cluster::{Cluster, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_and_keep_alive() {
    let mut cluster = Cluster::start(3).await;
    let c = cluster.client().await;

    let g = c.lease_grant(2).await.unwrap();
    assert!(g.ttl >= 2);
    c.put("l/a", "1").lease(g.id).await.unwrap();
    let t = c.lease_time_to_live(g.id, true).await.unwrap();
    assert_eq!(t.granted_ttl, g.ttl);
    assert_eq!(t.keys, vec![b"l/a".to_vec()]);
    assert!(c.leases().await.unwrap().contains(&g.id));

    // Kept alive well past its TTL, also across the death of a member.
    let keeper = c.lease_keep_alive(g.id).await.unwrap();
    assert!(keeper.is_alive());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let leader = cluster.leader().await;
    cluster.members[leader].kill();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        c.get("l/a").await.unwrap().first().is_some(),
        "key outlived its TTL"
    );
    assert!(keeper.is_alive(), "{:?}", keeper.state());
    cluster.members[leader].start();

    // Dropping the keeper stops renewals: the lease and its key expire.
    drop(keeper);
    eventually(Duration::from_secs(15), "lease expiry", || {
        let c = c.clone();
        async move { c.get("l/a").await.unwrap().first().is_none() }
    })
    .await;
    assert_eq!(c.lease_time_to_live(g.id, false).await.unwrap().ttl, -1);
    let e = c.lease_keep_alive(g.id).await.unwrap_err();
    assert!(matches!(e, Error::LeaseNotFound), "{e:?}");

    // A revoke by someone else ends the keeper.
    let g = c.lease_grant(30).await.unwrap();
    let keeper = c.lease_keep_alive(g.id).await.unwrap();
    c.lease_revoke(g.id).await.unwrap();
    tokio::time::timeout(Duration::from_secs(15), keeper.lost())
        .await
        .expect("keeper noticed the revoke");
    assert_eq!(keeper.state(), LeaseState::Expired);
    let e = c.lease_revoke(g.id).await.unwrap_err();
    assert!(matches!(e, Error::LeaseNotFound), "{e:?}");

    // keeper.revoke() deletes the keys at once.
    let g = c.lease_grant(30).await.unwrap();
    c.put("l/b", "1").lease(g.id).await.unwrap();
    let keeper = c.lease_keep_alive(g.id).await.unwrap();
    keeper.revoke().await.unwrap();
    assert!(c.get("l/b").await.unwrap().first().is_none());
}
