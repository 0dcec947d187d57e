//! Component benchmarks of the server's hot paths that are not in `keel-store`'s benchmarks:
//! the watch hub's fan-out of one applied revision (and of a chunk of several) to many
//! watchers, its dispatch of an event that concerns one watcher among many (distinct keys or
//! prefixes), its catch-up of many watchers from history, and encoding/decoding the etcd
//! messages every request and event goes through.
//!
//! `cargo bench -p keel-server --bench hotpaths` (results in docs/benchmarks.md).

use std::sync::Arc;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use keel_proto::etcdserverpb::{PutRequest, RangeResponse, ResponseHeader, WatchResponse};
use keel_proto::mvccpb::{Event, KeyValue};
use keel_server::lock::prefix_end;
use keel_server::watch::{InternalWatch, WatchHub};
use keel_store::engine::memory::MemoryEngine;
use keel_store::mvcc::MvccStore;
use keel_store::raft::state_machine::{AppliedChunk, AppliedState};
use prost::Message;

fn kv(key: &[u8], rev: i64) -> KeyValue {
    KeyValue {
        key: key.to_vec(),
        create_revision: 2,
        mod_revision: rev,
        version: rev - 1,
        value: vec![b'v'; 256],
        lease: 0,
    }
}

/// One revision with one Put event on `key`, as the state machine hands it to the hub.
fn chunk(key: &[u8], rev: i64) -> AppliedChunk {
    chunk_of(key, rev, 1)
}

/// `puts` revisions from `first_rev` on, each one Put event on `key`: one applied chunk of
/// several writes, as the state machine hands it to the hub when writes are batched.
fn chunk_of(key: &[u8], first_rev: i64, puts: i64) -> AppliedChunk {
    let last = first_rev + puts - 1;
    AppliedChunk {
        applied: AppliedState {
            index: last as u64,
            revision: last,
        },
        events: (first_rev..=last)
            .map(|rev| Event {
                r#type: 0,
                kv: Some(kv(key, rev)),
                prev_kv: None,
            })
            .collect(),
        ..Default::default()
    }
}

/// The runtime the hub's background tasks run on (one worker, as a member's share of a core).
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A watch hub fed by an empty in-memory store, its tasks spawned on `rt`.
fn hub_on_memory_store(rt: &tokio::runtime::Runtime) -> Arc<WatchHub> {
    let hub = WatchHub::new(1_572_864, Duration::from_secs(600));
    let mvcc = Arc::new(MvccStore::open(Arc::new(MemoryEngine::new())).expect("store"));
    let _guard = rt.enter();
    hub.attach(mvcc);
    hub
}

/// The member fields a gRPC stream puts in every response header.
const HEADER: ResponseHeader = ResponseHeader {
    cluster_id: 1,
    member_id: 2,
    revision: 0,
    raft_term: 3,
};

/// A hub with `watchers` synced watchers of `/registry/pods/a`, each on a stream of its own.
fn watchers_of_one_key(
    rt: &tokio::runtime::Runtime,
    watchers: usize,
) -> (Arc<WatchHub>, Vec<InternalWatch>) {
    let hub = hub_on_memory_store(rt);
    let streams = (0..watchers)
        .map(|_| hub.watch_internal(b"/registry/pods/a", b"", 0))
        .collect();
    (hub, streams)
}

/// What a gRPC stream does per watcher: take the queued response and encode it (the events'
/// encodings are shared, the header and watch ID are not).
fn receive_and_encode(rt: &tokio::runtime::Runtime, streams: &mut [InternalWatch], min_len: usize) {
    rt.block_on(async {
        for w in streams.iter_mut() {
            let out = w.next_queued().await.expect("events");
            let wire = out.encode(&HEADER);
            assert!(wire.len() > min_len);
        }
    });
}

fn watch_fanout(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("watch");
    for watchers in [1usize, 100, 1000] {
        let (hub, mut streams) = watchers_of_one_key(&rt, watchers);
        let mut rev = 1i64;
        group.throughput(Throughput::Elements(watchers as u64));
        group.bench_function(format!("fanout_one_put_to_{watchers}_watchers"), |b| {
            b.iter(|| {
                rev += 1;
                hub.on_applied(&chunk(b"/registry/pods/a", rev));
                receive_and_encode(&rt, &mut streams, 256);
            })
        });
    }
    group.finish();
}

/// A chunk of four puts (about what a chunk holds under the 8-writer fan-out of
/// `benches/compare.sh`) to 1 000 watchers: each receives one response with four events, so
/// this measures the hub's grouping of deliveries per watcher and the responses' event lists,
/// which a one-event chunk does not exercise.
fn watch_fanout_chunk(c: &mut Criterion) {
    const PUTS: i64 = 4;
    let rt = runtime();
    let mut group = c.benchmark_group("watch");
    let watchers = 1000usize;
    let (hub, mut streams) = watchers_of_one_key(&rt, watchers);
    let mut next_rev = 2i64;
    group.throughput(Throughput::Elements(watchers as u64 * PUTS as u64));
    group.bench_function(
        format!("fanout_chunk_of_{PUTS}_puts_to_{watchers}_watchers"),
        |b| {
            b.iter(|| {
                hub.on_applied(&chunk_of(b"/registry/pods/a", next_rev, PUTS));
                next_rev += PUTS;
                receive_and_encode(&rt, &mut streams, PUTS as usize * 256);
            })
        },
    );
    group.finish();
}

/// One put that concerns one watcher among many, each watching its own key or its own prefix:
/// the cost should not grow with the watchers the event does not concern.
fn watch_many_keys(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("watch");
    for (kind, watchers) in [
        ("keys", 100usize),
        ("keys", 10_000),
        ("prefixes", 100),
        ("prefixes", 10_000),
    ] {
        let hub = hub_on_memory_store(&rt);
        let keys: Vec<Vec<u8>> = (0..watchers)
            .map(|i| format!("/registry/pods/ns/pod-{i:06}").into_bytes())
            .collect();
        let mut streams: Vec<_> = keys
            .iter()
            .map(|k| {
                let end = if kind == "prefixes" {
                    prefix_end(k)
                } else {
                    Vec::new()
                };
                hub.watch_internal(k, &end, 0)
            })
            .collect();
        let mut rev = 1i64;
        group.throughput(Throughput::Elements(1));
        group.bench_function(
            format!("one_put_among_{watchers}_watchers_on_distinct_{kind}"),
            |b| {
                b.iter(|| {
                    rev += 1;
                    let target = rev as usize % watchers;
                    hub.on_applied(&chunk(&keys[target], rev));
                    let out = rt.block_on(streams[target].next_queued()).expect("event");
                    assert!(out.into_response().events.len() == 1);
                })
            },
        );
    }
    group.finish();
}

/// Watchers that start in the past, all at once on one prefix (controllers resuming after a
/// restart, or the victims of one slow stream): 100 watchers replay the same 1 000 revisions
/// from history. The syncer reads each step once for every watcher it covers.
fn watch_catch_up(c: &mut Criterion) {
    use keel_proto::keelpb::{RaftRequest, raft_request::Request};
    const WATCHERS: usize = 100;
    const REVISIONS: usize = 1000;
    let rt = runtime();
    let store = Arc::new(MvccStore::open(Arc::new(MemoryEngine::new())).expect("store"));
    let first = store.current_revision() + 1;
    for i in 0..REVISIONS {
        let mut batch = store.begin_apply();
        let outcome = batch.apply(&RaftRequest {
            request: Some(Request::Put(PutRequest {
                key: format!("/registry/pods/ns/pod-{:03}", i % 100).into_bytes(),
                value: vec![b'v'; 256],
                ..Default::default()
            })),
            origin: None,
        });
        assert!(outcome.response.error.is_none());
        batch.commit(false).expect("commit");
    }
    let hub = WatchHub::new(1_572_864, Duration::from_secs(600));
    {
        let _guard = rt.enter();
        hub.attach(store);
    }
    let mut group = c.benchmark_group("watch");
    group.throughput(Throughput::Elements((WATCHERS * REVISIONS) as u64));
    group.sample_size(20);
    group.bench_function(
        format!("catch_up_{WATCHERS}_watchers_from_{REVISIONS}_revisions"),
        |b| {
            b.iter(|| {
                let mut streams: Vec<InternalWatch> = {
                    let _guard = rt.enter();
                    (0..WATCHERS)
                        .map(|_| hub.watch_internal(b"/registry/pods/", b"/registry/pods0", first))
                        .collect()
                };
                rt.block_on(async {
                    for w in streams.iter_mut() {
                        let mut seen = 0;
                        while seen < REVISIONS {
                            let out = w.next_queued().await.expect("events");
                            seen += out.into_response().events.len();
                        }
                    }
                });
            })
        },
    );
    group.finish();
}

fn proto_codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("proto");
    let put = PutRequest {
        key: b"/registry/pods/ns-001/pod-00000042".to_vec(),
        value: vec![b'v'; 1024],
        lease: 0,
        prev_kv: false,
        ignore_value: false,
        ignore_lease: false,
    };
    group.bench_function("put_request_encode_1k", |b| b.iter(|| put.encode_to_vec()));
    let bytes = put.encode_to_vec();
    group.bench_function("put_request_decode_1k", |b| {
        b.iter(|| PutRequest::decode(bytes.as_slice()).expect("decode"))
    });
    let range = RangeResponse {
        kvs: (0..100)
            .map(|i| kv(format!("/registry/pods/{i:012}").as_bytes(), 10))
            .collect(),
        count: 100,
        ..Default::default()
    };
    group.bench_function("range_response_encode_100_kvs", |b| {
        b.iter(|| range.encode_to_vec())
    });
    let watch = WatchResponse {
        watch_id: 7,
        events: vec![Event {
            r#type: 0,
            kv: Some(kv(b"/registry/pods/a", 10)),
            prev_kv: Some(kv(b"/registry/pods/a", 9)),
        }],
        ..Default::default()
    };
    group.bench_function("watch_response_encode_1_event_prev_kv", |b| {
        b.iter_batched(
            || watch.clone(),
            |w| w.encode_to_vec(),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(
    benches,
    watch_fanout,
    watch_fanout_chunk,
    watch_many_keys,
    watch_catch_up,
    proto_codec
);
criterion_main!(benches);
