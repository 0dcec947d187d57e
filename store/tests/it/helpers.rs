use std::sync::Arc;

use keel_proto::etcdserverpb::*;
use keel_proto::keelpb::raft_request::Request as Cmd;
use keel_proto::keelpb::{RaftRequest, RaftResponse};
use keel_proto::mvccpb::Event;
use keel_store::engine::Engine;
use keel_store::engine::memory::MemoryEngine;
use keel_store::engine::rocks::RocksEngine;
use keel_store::mvcc::MvccStore;
use keel_store::{ApplyError, ApplyErrorKind};

/// Runs `f` on a store over each engine: in memory with the default cache of recent values,
/// in memory without the cache, and on RocksDB with a cache of a few hundred bytes (so values
/// are dropped from it and read back through it all the time).
pub fn on_engines(f: impl Fn(&str, &MvccStore)) {
    let mem: Arc<dyn Engine> = Arc::new(MemoryEngine::new());
    f("memory", &MvccStore::open(mem).unwrap());
    let mem: Arc<dyn Engine> = Arc::new(MemoryEngine::new());
    f(
        "memory, no value cache",
        &MvccStore::open_with(mem, 0).unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let rocks: Arc<dyn Engine> = Arc::new(RocksEngine::open(dir.path()).unwrap());
    f(
        "rocksdb, tiny value cache",
        &MvccStore::open_with(rocks, 400).unwrap(),
    );
}

pub fn apply(store: &MvccStore, cmd: Cmd) -> (RaftResponse, Vec<Event>) {
    let mut b = store.begin_apply();
    let out = b.apply(&RaftRequest {
        request: Some(cmd),
        origin: None,
    });
    b.commit(false).unwrap();
    (out.response, out.events)
}

pub fn put(store: &MvccStore, k: &str, v: &str) -> i64 {
    let (r, _) = apply(
        store,
        Cmd::Put(PutRequest {
            key: k.into(),
            value: v.into(),
            ..Default::default()
        }),
    );
    assert!(r.error.is_none(), "{r:?}");
    r.revision
}

pub fn put_lease(store: &MvccStore, k: &str, v: &str, lease: i64) -> RaftResponse {
    apply(
        store,
        Cmd::Put(PutRequest {
            key: k.into(),
            value: v.into(),
            lease,
            ..Default::default()
        }),
    )
    .0
}

pub fn del(store: &MvccStore, k: &str, end: &str) -> DeleteRangeResponse {
    match apply(
        store,
        Cmd::DeleteRange(DeleteRangeRequest {
            key: k.into(),
            range_end: end.into(),
            prev_kv: true,
        }),
    )
    .0
    .response
    {
        Some(keel_proto::keelpb::raft_response::Response::DeleteRange(d)) => d,
        other => panic!("{other:?}"),
    }
}

pub fn txn(store: &MvccStore, t: TxnRequest) -> Result<TxnResponse, ApplyError> {
    let (r, _) = apply(store, Cmd::Txn(t));
    if let Some(e) = r.error {
        return Err(ApplyError::from_proto(&e));
    }
    match r.response {
        Some(keel_proto::keelpb::raft_response::Response::Txn(t)) => Ok(t),
        other => panic!("{other:?}"),
    }
}

pub fn error_kind(r: &RaftResponse) -> Option<ApplyErrorKind> {
    r.error.as_ref().map(|e| ApplyError::from_proto(e).kind)
}

pub fn get(store: &MvccStore, k: &str, end: &str, rev: i64) -> Result<RangeResponse, ApplyError> {
    store.range(&RangeRequest {
        key: k.into(),
        range_end: end.into(),
        revision: rev,
        ..Default::default()
    })
}

pub fn keys(r: &RangeResponse) -> Vec<String> {
    r.kvs
        .iter()
        .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
        .collect()
}
