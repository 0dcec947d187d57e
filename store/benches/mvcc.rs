//! Component benchmarks of the MVCC store on RocksDB (a temporary directory).
//!
//! `cargo bench -p keel-store --bench mvcc`; set `KEEL_BENCH_KEYS` to change the number of keys
//! loaded before the read benchmarks (default 100 000) and `KEEL_BENCH_COMPACT_KEYS` for the
//! compaction benchmark (default 1 000 000 keys with two versions each). The `index/` group
//! compares one key's lookup in the key index with a B-tree of the same keys alone, at 10 000
//! and 1 000 000 keys (docs/benchmarks.md, change 27).

use std::sync::Arc;
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use keel_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use keel_proto::etcdserverpb::request_op::Request as Op;
use keel_proto::etcdserverpb::*;
use keel_proto::keelpb::RaftRequest;
use keel_proto::keelpb::raft_request::Request as Cmd;
use keel_store::engine::Engine;
use keel_store::engine::rocks::RocksEngine;
use keel_store::mvcc::MvccStore;

fn keys() -> u64 {
    std::env::var("KEEL_BENCH_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

fn key(i: u64) -> Vec<u8> {
    format!("/registry/pods/{i:012}").into_bytes()
}

fn put_req(i: u64) -> RaftRequest {
    RaftRequest {
        request: Some(Cmd::Put(PutRequest {
            key: key(i),
            value: vec![b'v'; 256],
            ..Default::default()
        })),
        origin: None,
    }
}

fn open() -> (tempfile::TempDir, MvccStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine: Arc<dyn Engine> = Arc::new(RocksEngine::open(dir.path()).expect("rocksdb"));
    (dir, MvccStore::open(engine).expect("store"))
}

fn load(store: &MvccStore, n: u64, versions: u64) {
    for _ in 0..versions {
        for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
            let mut b = store.begin_apply();
            for i in chunk {
                b.apply(&put_req(*i));
            }
            b.commit(false).expect("commit");
        }
    }
}

fn benches(c: &mut Criterion) {
    let n = keys();
    let (_dir, store) = open();
    load(&store, n, 2);
    let old_rev = store.current_revision() - n as i64;

    let mut g = c.benchmark_group("mvcc");
    g.sample_size(20)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));

    let mut next = n;
    g.bench_function("apply_put_batch_100", |b| {
        b.iter(|| {
            let mut batch = store.begin_apply();
            for _ in 0..100 {
                next += 1;
                batch.apply(&put_req(next % (2 * n)));
            }
            batch.commit(false).expect("commit");
        })
    });
    let mut i = 0u64;
    g.bench_function("get_single_key", |b| {
        b.iter(|| {
            i = (i + 7919) % n;
            store
                .range(&RangeRequest {
                    key: key(i),
                    ..Default::default()
                })
                .expect("range")
        })
    });
    g.bench_function("range_100_keys", |b| {
        b.iter(|| {
            i = (i + 7919) % (n - 100);
            store
                .range(&RangeRequest {
                    key: key(i),
                    range_end: key(i + 100),
                    ..Default::default()
                })
                .expect("range")
        })
    });
    g.bench_function("range_100_keys_historical", |b| {
        b.iter(|| {
            i = (i + 7919) % (n - 100);
            store
                .range(&RangeRequest {
                    key: key(i),
                    range_end: key(i + 100),
                    revision: old_rev,
                    ..Default::default()
                })
                .expect("range")
        })
    });
    g.bench_function("txn_cas_put", |b| {
        b.iter(|| {
            i = (i + 7919) % n;
            let mut batch = store.begin_apply();
            let t = TxnRequest {
                compare: vec![Compare {
                    key: key(i),
                    target: CompareTarget::Mod as i32,
                    result: CompareResult::Greater as i32,
                    target_union: Some(TargetUnion::ModRevision(0)),
                    range_end: vec![],
                }],
                success: vec![RequestOp {
                    request: Some(Op::RequestPut(PutRequest {
                        key: key(i),
                        value: vec![b'w'; 256],
                        ..Default::default()
                    })),
                }],
                failure: vec![],
            };
            batch.apply(&RaftRequest {
                request: Some(Cmd::Txn(t)),
                origin: None,
            });
            batch.commit(false).expect("commit");
        })
    });
    g.finish();

    let n = std::env::var("KEEL_BENCH_COMPACT_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000u64);
    let mut g = c.benchmark_group("compaction");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.bench_function(format!("compact_{n}_keys_2_versions"), |b| {
        b.iter_batched(
            || {
                let (dir, s) = open();
                load(&s, n, 2);
                (dir, s)
            },
            |(dir, s)| {
                let at = s.current_revision();
                let mut batch = s.begin_apply();
                batch.apply(&RaftRequest {
                    request: Some(Cmd::Compaction(CompactionRequest {
                        revision: at,
                        physical: true,
                    })),
                    origin: None,
                });
                batch.commit(false).expect("commit");
                let mut rx = s.compaction_progress();
                while *rx.borrow_and_update() < at {
                    std::thread::sleep(Duration::from_millis(1));
                }
                (dir, s)
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

/// A lookup of one key, answering with its number of revisions.
type Lookup<'a> = dyn Fn(&[u8]) -> Option<usize> + 'a;

/// One key's lookup: the key index (hash table of slot numbers) against a `BTreeMap` of the
/// same keys, as the index was before change 27. Keys are looked up in a scattered order, as a
/// busy store's puts arrive.
fn index_lookups(c: &mut Criterion) {
    use std::collections::BTreeMap;

    use keel_store::mvcc::index::{IndexEntry, KeyIndex};
    use keel_store::mvcc::revision::Revision;

    let mut g = c.benchmark_group("index");
    for n in [10_000u64, 1_000_000] {
        let entry = |i: u64| {
            IndexEntry::from_fields(Revision::new(i as i64 + 1, 0), false, i as i64 + 1, 1, 0)
        };
        let lists: Vec<(Vec<u8>, Vec<IndexEntry>)> =
            (0..n).map(|i| (key(i), vec![entry(i)])).collect();
        let btree: BTreeMap<Vec<u8>, Vec<IndexEntry>> = lists.iter().cloned().collect();
        let index = KeyIndex::from_lists(lists);
        // A fixed stride through the keys: every lookup lands far from the one before.
        let probe = |i: u64| key(i.wrapping_mul(7_919) % n);
        let lookups: [(&str, &Lookup); 2] = [
            ("btree", &|k| btree.get(k).map(Vec::len)),
            ("key_index", &|k| index.get(k).map(Vec::len)),
        ];
        let mut i = 0u64;
        for (name, lookup) in lookups {
            g.bench_function(format!("{name}_lookup_{n}_keys"), |b| {
                b.iter_batched(
                    || {
                        i += 1;
                        probe(i)
                    },
                    |k| lookup(&k),
                    BatchSize::SmallInput,
                )
            });
        }
    }
    g.finish();
}

criterion_group!(mvcc, benches, index_lookups);
criterion_main!(mvcc);
