use std::future::IntoFuture;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_client::{Informer, InformerEvent};

use crate::cluster::{Cluster, eventually, opts, put_retry, retry};

fn summary(ev: &InformerEvent) -> String {
    match ev {
        InformerEvent::Added(kv) => format!("+{}={}", kv.key_str(), kv.value_str()),
        InformerEvent::Updated { old, new } => {
            format!("~{}={}>{}", new.key_str(), old.value_str(), new.value_str())
        }
        InformerEvent::Deleted(kv) => format!("-{}", kv.key_str()),
        InformerEvent::Synced { .. } => "synced".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn informer_lists_watches_and_relists_after_compaction() {
    let mut cluster = Cluster::start(3).await;
    let c = cluster.client().await;
    for i in 0..7 {
        c.put(format!("inf/{i}"), "a").await.unwrap();
    }
    c.put("other", "x").await.unwrap();

    // The informer talks to member 0 only, so we can cut it off.
    let pinned = keel_client::Client::connect([cluster.members[0].endpoint()], opts())
        .await
        .unwrap();
    let events = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = events.clone();
    let inf = Informer::new(pinned, "inf/")
        .page_size(2)
        .spawn(move |ev: InformerEvent| sink.lock().unwrap().push(summary(&ev)));
    inf.wait_synced().await;
    let store = inf.store();
    assert_eq!(store.len(), 7);
    assert_eq!(inf.lists(), 1);
    {
        let ev = events.lock().unwrap();
        assert_eq!(ev.len(), 8, "{ev:?}");
        assert_eq!(ev[7], "synced");
    }
    events.lock().unwrap().clear();

    // Watch: add, update, delete.
    c.put("inf/7", "a").await.unwrap();
    c.put("inf/0", "b").await.unwrap();
    let last = c.delete("inf/1").await.unwrap().header.revision;
    eventually(Duration::from_secs(10), "watch events", || {
        let s = store.clone();
        async move { s.revision() >= last }
    })
    .await;
    assert_eq!(
        *events.lock().unwrap(),
        vec!["+inf/7=a", "~inf/0=a>b", "-inf/1"]
    );
    assert_eq!(store.get("inf/0").unwrap().value_str(), "b");
    events.lock().unwrap().clear();

    // Cut the informer off, change things, compact past its position, bring it back: its
    // watch resumes from a compacted revision, so it relists and reports only differences.
    cluster.members[0].kill();
    put_retry(&c, "inf/2", "c").await;
    retry(|| c.delete("inf/3").into_future()).await;
    put_retry(&c, "inf/8", "a").await;
    let head = put_retry(&c, "inf/other-change", "z").await;
    retry(|| c.delete("inf/other-change").into_future()).await;
    c.compact(head, true).await.unwrap();
    // Let member 0 catch up (compaction included) on another client port first, so that the
    // informer's watch resumes only on a member that has compacted its history.
    let port = cluster.members[0].client_port;
    cluster.members[0].client_port = crate::cluster::free_port();
    cluster.members[0].start();
    cluster.wait_ready(Duration::from_secs(30)).await;
    let m0 = keel_client::Client::connect([cluster.members[0].endpoint()], opts())
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "member 0 caught up", || {
        let m0 = m0.clone();
        async move { matches!(m0.get("inf/8").serializable().await, Ok(r) if r.first().is_some()) }
    })
    .await;
    assert!(matches!(
        m0.get("inf/0").serializable().revision(head - 1).await,
        Err(keel_client::Error::Compacted { .. })
    ));
    cluster.members[0].kill();
    cluster.members[0].client_port = port;
    cluster.members[0].start();
    eventually(Duration::from_secs(30), "relist", || {
        let n = inf.lists();
        async move { n >= 2 }
    })
    .await;
    eventually(Duration::from_secs(10), "converged cache", || {
        let s = store.clone();
        async move { s.len() == 7 && s.get("inf/8").is_some() }
    })
    .await;
    let mut ev = events.lock().unwrap().clone();
    ev.retain(|e| e != "synced");
    ev.sort();
    assert_eq!(ev, vec!["+inf/8=a", "-inf/3", "~inf/2=a>c"]);
    let keys: Vec<String> = store
        .list()
        .iter()
        .map(|kv| kv.key_str().to_string())
        .collect();
    let expected: Vec<String> = (0..9)
        .filter(|i| *i != 1 && *i != 3)
        .map(|i| format!("inf/{i}"))
        .collect();
    assert_eq!(keys, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn informer_resyncs_periodically() {
    let cluster = Cluster::start(1).await;
    let c = cluster.client().await;
    c.put("rs/a", "1").await.unwrap();
    let events = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = events.clone();
    let inf = Informer::new(c.clone(), "rs/")
        .resync_every(Duration::from_millis(300))
        .spawn(move |ev: InformerEvent| sink.lock().unwrap().push(summary(&ev)));
    inf.wait_synced().await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let n = events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| *e == "~rs/a=1>1")
        .count();
    assert!(n >= 2, "{:?}", events.lock().unwrap());
}
