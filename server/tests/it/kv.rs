//! KV semantics and errors on a single-node cluster, through the etcd-client crate.

use etcd_client::{Compare, CompareOp, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp};
use tonic::Code;

use crate::cluster::{Cluster, client, current_revision, status_code, status_message};

#[tokio::test]
async fn put_get_delete_and_revisions() {
    let cluster = Cluster::start(1).await;
    let mut c = client(&cluster.members[0].endpoint()).await.unwrap();

    let r0 = c.get("nothing", None).await.unwrap();
    assert_eq!(
        r0.header().unwrap().revision(),
        1,
        "a fresh store is at revision 1"
    );
    assert_eq!(r0.count(), 0);

    let p = c.put("foo", "bar", None).await.unwrap();
    assert_eq!(p.header().unwrap().revision(), 2);
    let p = c
        .put("foo", "baz", Some(PutOptions::new().with_prev_key()))
        .await
        .unwrap();
    assert_eq!(p.prev_key().unwrap().value(), b"bar");

    let g = c.get("foo", None).await.unwrap();
    let kv = &g.kvs()[0];
    assert_eq!(
        (kv.create_revision(), kv.mod_revision(), kv.version()),
        (2, 3, 2)
    );
    assert_eq!(kv.value(), b"baz");
    assert!(g.header().unwrap().cluster_id() != 0);
    assert!(g.header().unwrap().member_id() != 0);
    assert!(g.header().unwrap().raft_term() >= 1);

    // Past revision, prefix, serializable.
    let old = c
        .get("foo", Some(GetOptions::new().with_revision(2)))
        .await
        .unwrap();
    assert_eq!(old.kvs()[0].value(), b"bar");
    c.put("foo2", "x", None).await.unwrap();
    let pre = c
        .get(
            "foo",
            Some(GetOptions::new().with_prefix().with_serializable()),
        )
        .await
        .unwrap();
    assert_eq!(pre.count(), 2);

    // Delete of nothing does not bump the revision; delete of something does.
    let before = c
        .get("foo", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let d = c.delete("absent", None).await.unwrap();
    assert_eq!((d.deleted(), d.header().unwrap().revision()), (0, before));
    let d = c
        .delete(
            "foo",
            Some(DeleteOptions::new().with_prefix().with_prev_key()),
        )
        .await
        .unwrap();
    assert_eq!(d.deleted(), 2);
    assert_eq!(d.prev_kvs().len(), 2);
    assert_eq!(d.header().unwrap().revision(), before + 1);

    // Recreate: a new generation starts at version 1.
    c.put("foo", "again", None).await.unwrap();
    let kv = c.get("foo", None).await.unwrap().kvs()[0].clone();
    assert_eq!(kv.version(), 1);
    assert_eq!(kv.create_revision(), kv.mod_revision());
}

#[tokio::test]
async fn txn_compare_and_swap() {
    let cluster = Cluster::start(1).await;
    let mut c = client(&cluster.members[0].endpoint()).await.unwrap();
    let rev = c
        .put("cas", "v1", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();

    // Succeeds when mod_revision matches...
    let t = Txn::new()
        .when([Compare::mod_revision("cas", CompareOp::Equal, rev)])
        .and_then([TxnOp::put("cas", "v2", None), TxnOp::get("cas", None)])
        .or_else([TxnOp::get("cas", None)]);
    let r = c.txn(t).await.unwrap();
    assert!(r.succeeded());
    assert_eq!(r.header().unwrap().revision(), rev + 1);

    // ...and fails with the stale one, running the else branch without a new revision.
    let t = Txn::new()
        .when([Compare::mod_revision("cas", CompareOp::Equal, rev)])
        .and_then([TxnOp::put("cas", "v3", None)])
        .or_else([TxnOp::get("cas", None)]);
    let r = c.txn(t).await.unwrap();
    assert!(!r.succeeded());
    assert_eq!(r.header().unwrap().revision(), rev + 1);
    let v = c.get("cas", None).await.unwrap();
    assert_eq!(v.kvs()[0].value(), b"v2");

    // Creating only if absent: version == 0.
    let t = Txn::new()
        .when([Compare::version("new", CompareOp::Equal, 0)])
        .and_then([TxnOp::put("new", "1", None)]);
    assert!(c.txn(t.clone()).await.unwrap().succeeded());
    assert!(!c.txn(t).await.unwrap().succeeded());
}

#[tokio::test]
async fn etcd_errors() {
    let cluster = Cluster::start(1).await;
    let mut c = client(&cluster.members[0].endpoint()).await.unwrap();

    let e = c.put("", "x", None).await.unwrap_err();
    assert_eq!(
        (status_code(&e), status_message(&e).as_str()),
        (
            Some(Code::InvalidArgument),
            "etcdserver: key is not provided"
        )
    );

    let e = c.get("", None).await.unwrap_err();
    assert_eq!(status_message(&e), "etcdserver: key is not provided");

    let e = c
        .put("k", "v", Some(PutOptions::new().with_ignore_value()))
        .await
        .unwrap_err();
    assert_eq!(status_message(&e), "etcdserver: value is provided");

    let e = c
        .put("missing", "", Some(PutOptions::new().with_ignore_value()))
        .await
        .unwrap_err();
    assert_eq!(status_message(&e), "etcdserver: key not found");

    let e = c
        .put("k", "v", Some(PutOptions::new().with_lease(12345)))
        .await
        .unwrap_err();
    assert_eq!(
        (status_code(&e), status_message(&e).as_str()),
        (
            Some(Code::NotFound),
            "etcdserver: requested lease not found"
        )
    );

    let ops: Vec<TxnOp> = (0..129)
        .map(|i| TxnOp::put(format!("k{i}"), "v", None))
        .collect();
    let e = c.txn(Txn::new().and_then(ops)).await.unwrap_err();
    assert_eq!(
        status_message(&e),
        "etcdserver: too many operations in txn request"
    );
    let ops: Vec<TxnOp> = (0..128)
        .map(|i| TxnOp::put(format!("k{i}"), "v", None))
        .collect();
    let r = c.txn(Txn::new().and_then(ops)).await.unwrap();
    assert_eq!(r.op_responses().len(), 128, "128 ops are allowed");

    let e = c
        .txn(Txn::new().and_then([TxnOp::put("d", "1", None), TxnOp::put("d", "2", None)]))
        .await
        .unwrap_err();
    assert_eq!(
        status_message(&e),
        "etcdserver: duplicate key given in txn request"
    );

    let e = c
        .get("k1", Some(GetOptions::new().with_revision(1_000_000)))
        .await
        .unwrap_err();
    assert_eq!(
        (status_code(&e), status_message(&e).as_str()),
        (
            Some(Code::OutOfRange),
            "etcdserver: mvcc: required revision is a future revision"
        )
    );

    let rev = c
        .put("k1", "x", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    c.compact(rev, None).await.unwrap();
    let e = c
        .get("k1", Some(GetOptions::new().with_revision(rev - 1)))
        .await
        .unwrap_err();
    assert_eq!(
        (status_code(&e), status_message(&e).as_str()),
        (
            Some(Code::OutOfRange),
            "etcdserver: mvcc: required revision has been compacted"
        )
    );
    let e = c.compact(rev, None).await.unwrap_err();
    assert_eq!(
        status_message(&e),
        "etcdserver: mvcc: required revision has been compacted"
    );
    let e = c.compact(rev + 100, None).await.unwrap_err();
    assert_eq!(
        status_message(&e),
        "etcdserver: mvcc: required revision is a future revision"
    );
    assert_eq!(
        c.get("k1", Some(GetOptions::new().with_revision(rev)))
            .await
            .unwrap()
            .kvs()[0]
            .value(),
        b"x"
    );

    // Too large: over --max-request-bytes (1.5 MiB) but under the gRPC limit.
    let big = vec![b'x'; 1_600_000];
    let e = c.put("big", big, None).await.unwrap_err();
    assert_eq!(status_message(&e), "etcdserver: request is too large");
    // Over the gRPC limit (max-request-bytes + 512 KiB).
    let huge = vec![b'x'; 2_200_000];
    let e = c.put("huge", huge, None).await.unwrap_err();
    // etcd (grpc-go) answers ResourceExhausted here; tonic's decoder answers OutOfRange. Both
    // refuse the request before it reaches Keel (documented in the README).
    assert!(
        matches!(
            status_code(&e),
            Some(Code::ResourceExhausted) | Some(Code::OutOfRange)
        ),
        "{e}"
    );
    assert!(
        status_message(&e).contains("larger than max") || status_message(&e).contains("too large"),
        "{e}"
    );

    // Nothing above changed the data.
    assert!(c.get("big", None).await.unwrap().kvs().is_empty());
    assert!(c.get("d", None).await.unwrap().kvs().is_empty());
}

#[tokio::test]
async fn restart_keeps_data_and_revision() {
    let mut cluster = Cluster::start(1).await;
    let ep = cluster.members[0].endpoint();
    let mut c = client(&ep).await.unwrap();
    for i in 0..50 {
        c.put(format!("key{i:02}"), format!("v{i}"), None)
            .await
            .unwrap();
    }
    let rev = current_revision(&mut c).await;
    // Only what was fsynced survives a SIGKILL, and everything acknowledged was.
    cluster.kill_and_restart(0).await;
    let mut c = client(&ep).await.unwrap();
    let all = c
        .get("key", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(all.count(), 50);
    assert_eq!(all.header().unwrap().revision(), rev);
    assert_eq!(all.kvs()[49].value(), b"v49");
}

/// The write-ahead log reuses retired files (an fsync into a reused file does not grow it).
/// Recovery must tell a reused file's new records from the old ones it overwrites: after a
/// kill -9 with the last writes in a reused file, every acknowledged write is there and no
/// stale record came back.
#[tokio::test]
async fn restart_after_log_files_are_reused_keeps_acknowledged_writes() {
    const KEYS: usize = 40;
    const PUTS: usize = 640;
    let mut cluster = Cluster::start(1).await;
    let ep = cluster.members[0].endpoint();
    let mut c = client(&ep).await.unwrap();
    // Every put is in the log twice (Raft entry, then the applied write): ~200 MB in all, past
    // the 64 MiB cap twice, so the last ~70 MB go into a reused file.
    let value = |i: usize| {
        let mut v = format!("put {i} ").into_bytes();
        v.resize(160 << 10, b'a' + (i % 26) as u8);
        v
    };
    let mut last = vec![0; KEYS];
    for i in 0..PUTS {
        c.put(format!("key{:02}", i % KEYS), value(i), None)
            .await
            .unwrap();
        last[i % KEYS] = i;
    }
    let rev = current_revision(&mut c).await;
    let rocks_log = std::fs::read_to_string(cluster.members[0].data_dir.join("db/LOG")).unwrap();
    assert!(
        rocks_log.contains("reusing log"),
        "the test wrote too little for a log file to be reused"
    );

    cluster.kill_and_restart(0).await;
    let mut c = client(&ep).await.unwrap();
    for (k, &i) in last.iter().enumerate() {
        let got = c.get(format!("key{k:02}"), None).await.unwrap();
        assert_eq!(got.header().unwrap().revision(), rev);
        assert_eq!(got.kvs()[0].value(), value(i), "key{k:02}");
        assert_eq!(got.kvs()[0].version(), (PUTS / KEYS) as i64, "key{k:02}");
    }
}
