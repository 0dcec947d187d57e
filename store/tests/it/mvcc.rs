//! etcd v3 MVCC semantics, each test on the in-memory and the RocksDB engine.

use std::sync::Arc;

use keel_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use keel_proto::etcdserverpb::request_op::Request as Op;
use keel_proto::etcdserverpb::*;
use keel_proto::keelpb::raft_request::Request as Cmd;
use keel_proto::keelpb::{LeaseCheckpoint, LeaseCheckpointBatch};
use keel_proto::mvccpb::KeyValue;
use keel_proto::mvccpb::event::EventType;
use keel_store::ApplyErrorKind;
use keel_store::engine::Engine;
use keel_store::engine::rocks::RocksEngine;
use keel_store::mvcc::{HashKvFormat, HistoryRequest, MvccStore};

use crate::helpers::*;

fn op_put(k: &str, v: &str) -> RequestOp {
    RequestOp {
        request: Some(Op::RequestPut(PutRequest {
            key: k.into(),
            value: v.into(),
            ..Default::default()
        })),
    }
}
fn op_get(k: &str) -> RequestOp {
    RequestOp {
        request: Some(Op::RequestRange(RangeRequest {
            key: k.into(),
            ..Default::default()
        })),
    }
}
fn cmp(k: &str, target: CompareTarget, result: CompareResult, u: TargetUnion) -> Compare {
    Compare {
        key: k.into(),
        target: target as i32,
        result: result as i32,
        target_union: Some(u),
        range_end: vec![],
    }
}

#[test]
fn revisions_versions_and_generations() {
    on_engines(|name, s| {
        assert_eq!(
            s.current_revision(),
            1,
            "{name}: a fresh store is at revision 1"
        );
        assert_eq!(put(s, "foo", "a"), 2);
        assert_eq!(put(s, "foo", "b"), 3);
        let kv = get(s, "foo", "", 0).unwrap().kvs[0].clone();
        assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (2, 3, 2));
        // Deleting nothing takes no revision; deleting something takes one.
        assert_eq!(del(s, "nothing", "").deleted, 0);
        assert_eq!(s.current_revision(), 3);
        let d = del(s, "foo", "");
        assert_eq!(
            (d.deleted, d.prev_kvs.len(), s.current_revision()),
            (1, 1, 4)
        );
        assert!(get(s, "foo", "", 0).unwrap().kvs.is_empty());
        // Recreated: a new generation.
        put(s, "foo", "c");
        let kv = get(s, "foo", "", 0).unwrap().kvs[0].clone();
        assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (5, 5, 1));
        // History is still readable.
        assert_eq!(get(s, "foo", "", 2).unwrap().kvs[0].value, b"a");
        assert!(get(s, "foo", "", 4).unwrap().kvs.is_empty());
        assert_eq!(get(s, "foo", "", 0).unwrap().header.unwrap().revision, 5);
    });
}

#[test]
fn range_conventions_limit_sort_and_filters() {
    on_engines(|name, s| {
        for (k, v) in [("a", "3"), ("b", "1"), ("c", "2"), ("b", "4"), ("d", "0")] {
            put(s, k, v);
        }
        put(s, "\0", "nul");
        assert_eq!(keys(&get(s, "a", "c", 0).unwrap()), ["a", "b"], "{name}");
        assert_eq!(keys(&get(s, "b", "\0", 0).unwrap()), ["b", "c", "d"]);
        assert_eq!(
            get(s, "\0", "\0", 0).unwrap().count,
            5,
            "\\0..\\0 is every key"
        );
        assert!(
            get(s, "c", "a", 0).unwrap().kvs.is_empty(),
            "end <= key is empty"
        );
        let r = s
            .range(&RangeRequest {
                key: "a".into(),
                range_end: "z".into(),
                limit: 2,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(
            (keys(&r), r.more, r.count),
            (vec!["a".to_string(), "b".to_string()], true, 4)
        );
        let r = s
            .range(&RangeRequest {
                key: "a".into(),
                range_end: "z".into(),
                sort_target: 4,
                sort_order: 2,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(keys(&r), ["b", "a", "c", "d"], "by value descending");
        let r = s
            .range(&RangeRequest {
                key: "a".into(),
                range_end: "z".into(),
                sort_target: 3,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(
            keys(&r),
            ["a", "c", "b", "d"],
            "target MOD with order NONE sorts ascending"
        );
        let r = s
            .range(&RangeRequest {
                key: "a".into(),
                range_end: "z".into(),
                min_mod_revision: 5,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(
            (keys(&r), r.count),
            (vec!["b".to_string(), "d".to_string()], 4),
            "count ignores filters"
        );
        let r = s
            .range(&RangeRequest {
                key: "a".into(),
                range_end: "z".into(),
                count_only: true,
                ..Default::default()
            })
            .unwrap();
        assert_eq!((r.kvs.len(), r.count), (0, 4));
        let r = s
            .range(&RangeRequest {
                key: "a".into(),
                range_end: "z".into(),
                keys_only: true,
                ..Default::default()
            })
            .unwrap();
        assert!(r.kvs.iter().all(|kv| kv.value.is_empty()));
        // Empty key: the server rejects it; the store must simply not panic.
        let _ = get(s, "", "", 0);
        let _ = s.range(&RangeRequest {
            key: vec![],
            range_end: vec![0],
            revision: -5,
            ..Default::default()
        });
    });
}

#[test]
fn compacted_and_future_revisions() {
    on_engines(|name, s| {
        for i in 0..5 {
            put(s, "k", &i.to_string());
        }
        put(s, "other", "x");
        assert_eq!(
            get(s, "k", "", 100).unwrap_err().kind,
            ApplyErrorKind::FutureRevision,
            "{name}"
        );
        let (r, _) = apply(
            s,
            Cmd::Compaction(CompactionRequest {
                revision: 4,
                physical: true,
            }),
        );
        assert!(r.error.is_none());
        assert_eq!(
            get(s, "k", "", 3).unwrap_err().kind,
            ApplyErrorKind::Compacted
        );
        assert_eq!(
            get(s, "k", "", 4).unwrap().kvs[0].value,
            b"2",
            "reading at the compact revision works"
        );
        let (r, _) = apply(
            s,
            Cmd::Compaction(CompactionRequest {
                revision: 4,
                physical: false,
            }),
        );
        assert_eq!(error_kind(&r), Some(ApplyErrorKind::Compacted));
        let (r, _) = apply(
            s,
            Cmd::Compaction(CompactionRequest {
                revision: 99,
                physical: false,
            }),
        );
        assert_eq!(error_kind(&r), Some(ApplyErrorKind::FutureRevision));
        let h = s.history(&HistoryRequest {
            start_revision: 2,
            key: "k".into(),
            max_events: 100,
            ..Default::default()
        });
        assert_eq!(h.unwrap_err().kind, ApplyErrorKind::Compacted);
        let h = s
            .history(&HistoryRequest {
                start_revision: 4,
                key: "k".into(),
                max_events: 100,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(h.events.len(), 3, "revisions 4..6 of k");
        // Physical compaction finishes in the background.
        let mut rx = s.compaction_progress();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while *rx.borrow_and_update() < 4 {
            assert!(
                std::time::Instant::now() < deadline,
                "physical compaction did not finish"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(get(s, "k", "", 0).unwrap().kvs[0].value, b"4");
        assert_eq!(
            s.stats().revisions,
            4,
            "k keeps revisions 4, 5, 6 and other keeps 7"
        );
    });
}

#[test]
fn txn_compares_branches_and_nesting() {
    on_engines(|name, s| {
        let rev = put(s, "k1", "v1");
        let t = TxnRequest {
            compare: vec![cmp(
                "k1",
                CompareTarget::Mod,
                CompareResult::Equal,
                TargetUnion::ModRevision(rev),
            )],
            success: vec![op_put("k1", "v2"), op_get("k1"), op_put("k2", "x")],
            failure: vec![op_get("k1")],
        };
        let r = txn(s, t.clone()).unwrap();
        assert!(r.succeeded, "{name}");
        assert_eq!(
            r.header.as_ref().unwrap().revision,
            rev + 1,
            "all ops of a txn share one revision"
        );
        match &r.responses[1].response {
            Some(keel_proto::etcdserverpb::response_op::Response::ResponseRange(rr)) => {
                assert_eq!(
                    rr.kvs[0].value, b"v2",
                    "reads inside a write txn see its own writes"
                )
            }
            other => panic!("{other:?}"),
        }
        let k2 = get(s, "k2", "", 0).unwrap().kvs[0].clone();
        assert_eq!(k2.mod_revision, rev + 1);
        // Same txn again fails (stale mod revision) and does not bump the revision.
        let r = txn(s, t).unwrap();
        assert!(!r.succeeded);
        assert_eq!(r.header.unwrap().revision, rev + 1);
        // Missing keys compare as zero, except VALUE which is always false.
        let absent = TxnRequest {
            compare: vec![cmp(
                "nope",
                CompareTarget::Version,
                CompareResult::Equal,
                TargetUnion::Version(0),
            )],
            ..Default::default()
        };
        assert!(txn(s, absent).unwrap().succeeded);
        let absent_value = TxnRequest {
            compare: vec![cmp(
                "nope",
                CompareTarget::Value,
                CompareResult::NotEqual,
                TargetUnion::Value(b"x".to_vec()),
            )],
            ..Default::default()
        };
        assert!(!txn(s, absent_value).unwrap().succeeded);
        // A compare over a range holds only if every key satisfies it.
        let mut range_cmp = cmp(
            "k",
            CompareTarget::Version,
            CompareResult::Greater,
            TargetUnion::Version(0),
        );
        range_cmp.range_end = "l".into();
        assert!(
            txn(
                s,
                TxnRequest {
                    compare: vec![range_cmp.clone()],
                    ..Default::default()
                }
            )
            .unwrap()
            .succeeded
        );
        range_cmp.result = CompareResult::Greater as i32;
        range_cmp.target_union = Some(TargetUnion::Version(1));
        assert!(
            !txn(
                s,
                TxnRequest {
                    compare: vec![range_cmp],
                    ..Default::default()
                }
            )
            .unwrap()
            .succeeded,
            "k2 has version 1"
        );
        // Nested txn: the inner branch is chosen by its own compares, all at one revision.
        let before = s.current_revision();
        let nested = TxnRequest {
            compare: vec![],
            success: vec![
                op_put("n1", "a"),
                RequestOp {
                    request: Some(Op::RequestTxn(TxnRequest {
                        compare: vec![cmp(
                            "k1",
                            CompareTarget::Value,
                            CompareResult::Equal,
                            TargetUnion::Value(b"v2".to_vec()),
                        )],
                        success: vec![op_put("n2", "yes")],
                        failure: vec![op_put("n2", "no")],
                    })),
                },
            ],
            failure: vec![],
        };
        txn(s, nested).unwrap();
        let n2 = get(s, "n2", "", 0).unwrap().kvs[0].clone();
        assert_eq!(
            (n2.value.as_slice(), n2.mod_revision),
            (&b"yes"[..], before + 1)
        );
        // A lease that does not exist in the taken branch fails the whole txn and changes nothing.
        let bad = TxnRequest {
            success: vec![
                op_put("t1", "x"),
                RequestOp {
                    request: Some(Op::RequestPut(PutRequest {
                        key: "t2".into(),
                        lease: 77,
                        ..Default::default()
                    })),
                },
            ],
            ..Default::default()
        };
        assert_eq!(txn(s, bad).unwrap_err().kind, ApplyErrorKind::LeaseNotFound);
        assert!(get(s, "t1", "", 0).unwrap().kvs.is_empty());
        // 128 ops in one txn.
        let many = TxnRequest {
            success: (0..128).map(|i| op_put(&format!("m{i:03}"), "v")).collect(),
            ..Default::default()
        };
        let r = txn(s, many).unwrap();
        assert_eq!(r.responses.len(), 128);
        assert_eq!(get(s, "m", "n", 0).unwrap().count, 128);
        assert!(
            get(s, "m", "n", 0)
                .unwrap()
                .kvs
                .iter()
                .all(|kv| kv.mod_revision == s.current_revision())
        );
    });
}

#[test]
fn put_flags_and_leases() {
    on_engines(|name, s| {
        let r = apply(
            s,
            Cmd::Put(PutRequest {
                key: "x".into(),
                ignore_value: true,
                ..Default::default()
            }),
        )
        .0;
        assert_eq!(error_kind(&r), Some(ApplyErrorKind::KeyNotFound), "{name}");
        assert_eq!(
            error_kind(&put_lease(s, "x", "v", 5)),
            Some(ApplyErrorKind::LeaseNotFound)
        );
        for id in [5, 6] {
            let (r, _) = apply(s, Cmd::LeaseGrant(LeaseGrantRequest { ttl: 10, id }));
            assert!(r.error.is_none());
        }
        let (r, _) = apply(s, Cmd::LeaseGrant(LeaseGrantRequest { ttl: 10, id: 5 }));
        assert_eq!(error_kind(&r), Some(ApplyErrorKind::LeaseExists));
        let (r, _) = apply(
            s,
            Cmd::LeaseGrant(LeaseGrantRequest {
                ttl: 9_000_000_001,
                id: 9,
            }),
        );
        assert_eq!(error_kind(&r), Some(ApplyErrorKind::LeaseTtlTooLarge));
        assert!(put_lease(s, "a", "1", 5).error.is_none());
        assert!(put_lease(s, "b", "1", 5).error.is_none());
        // ignore_value keeps the value, ignore_lease keeps the lease.
        apply(
            s,
            Cmd::Put(PutRequest {
                key: "a".into(),
                ignore_value: true,
                ignore_lease: true,
                ..Default::default()
            }),
        );
        let a = get(s, "a", "", 0).unwrap().kvs[0].clone();
        assert_eq!((a.value.as_slice(), a.lease, a.version), (&b"1"[..], 5, 2));
        // Moving b to lease 6.
        put_lease(s, "b", "2", 6);
        assert_eq!(s.lease(5).unwrap().keys, vec![b"a".to_vec()]);
        assert_eq!(s.lease(6).unwrap().keys, vec![b"b".to_vec()]);
        // Revoking deletes every attached key in one revision.
        put_lease(s, "c", "3", 6);
        let before = s.current_revision();
        let (r, events) = apply(s, Cmd::LeaseRevoke(LeaseRevokeRequest { id: 6 }));
        assert!(r.error.is_none());
        assert_eq!(s.current_revision(), before + 1);
        assert_eq!(events.len(), 2);
        assert!(events.iter().all(|e| e.r#type == EventType::Delete as i32
            && e.kv.as_ref().unwrap().mod_revision == before + 1));
        assert!(
            get(s, "b", "", 0).unwrap().kvs.is_empty()
                && get(s, "c", "", 0).unwrap().kvs.is_empty()
        );
        assert!(s.lease(6).is_none());
        let (r, _) = apply(s, Cmd::LeaseRevoke(LeaseRevokeRequest { id: 6 }));
        assert_eq!(error_kind(&r), Some(ApplyErrorKind::LeaseNotFound));
        // Checkpoints record the remaining TTL.
        apply(
            s,
            Cmd::LeaseCheckpoint(LeaseCheckpointBatch {
                checkpoints: vec![LeaseCheckpoint {
                    id: 5,
                    remaining_ttl: 4,
                }],
            }),
        );
        assert_eq!(s.lease(5).unwrap().remaining_ttl, Some(4));
        assert_eq!(s.lease(5).unwrap().keys, vec![b"a".to_vec()]);
    });
}

#[test]
fn events_and_history_with_prev_kv() {
    on_engines(|name, s| {
        put(s, "w/a", "1");
        put(s, "w/b", "2");
        put(s, "w/a", "3");
        let (_, ev) = apply(
            s,
            Cmd::DeleteRange(DeleteRangeRequest {
                key: "w/b".into(),
                ..Default::default()
            }),
        );
        // Applied events do not read the replaced value; replaced_version reads it on demand.
        assert_eq!(ev[0].prev_kv, None, "{name}");
        let deleted = ev[0].kv.as_ref().unwrap();
        let replaced = s.replaced_version(deleted, true).unwrap().unwrap();
        assert_eq!(
            (replaced.value.as_slice(), replaced.mod_revision),
            (&b"2"[..], 3),
            "{name}"
        );
        let h = s
            .history(&HistoryRequest {
                start_revision: 3,
                key: "w/".into(),
                range_end: "w0".into(),
                prev_kv: true,
                max_events: 100,
                end_revision: 0,
                max_bytes: 0,
            })
            .unwrap();
        let summary: Vec<(i64, i32, Option<Vec<u8>>)> = h
            .events
            .iter()
            .map(|e| {
                (
                    e.kv.as_ref().unwrap().mod_revision,
                    e.r#type,
                    e.prev_kv.as_ref().map(|p| p.value.clone()),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                (3, 0, None),
                (4, 0, Some(b"1".to_vec())),
                (5, 1, Some(b"2".to_vec()))
            ]
        );
        assert_eq!(h.next_revision, 6);
        // Batches stop at a revision boundary.
        let h = s
            .history(&HistoryRequest {
                start_revision: 2,
                key: "w/".into(),
                range_end: "w0".into(),
                max_events: 1,
                ..Default::default()
            })
            .unwrap();
        assert_eq!((h.events.len(), h.next_revision), (1, 3));
        // And after `max_bytes` of keys and values: 4 bytes (w/a = 1) fill 4, not 5.
        let by_bytes = |max_bytes| {
            let h = s
                .history(&HistoryRequest {
                    start_revision: 2,
                    key: "w/".into(),
                    range_end: "w0".into(),
                    max_events: 100,
                    max_bytes,
                    ..Default::default()
                })
                .unwrap();
            (h.events.len(), h.next_revision)
        };
        assert_eq!(by_bytes(4), (1, 3), "{name}");
        assert_eq!(by_bytes(5), (2, 4), "{name}");
        assert_eq!(by_bytes(0), (4, 6), "{name}: 0 is no limit");
        let (_, ev) = apply(
            s,
            Cmd::Put(PutRequest {
                key: "w/a".into(),
                value: "4".into(),
                ..Default::default()
            }),
        );
        let updated = ev[0].kv.as_ref().unwrap();
        assert_eq!(updated.version, 3, "{name}");
        let replaced = s.replaced_version(updated, false).unwrap().unwrap();
        assert_eq!(replaced.value, b"3", "{name}");
        let created = KeyValue {
            key: "w/new".into(),
            mod_revision: updated.mod_revision,
            version: 1,
            ..Default::default()
        };
        assert_eq!(s.replaced_version(&created, false).unwrap(), None, "{name}");
    });
}

#[test]
fn dropped_batch_changes_nothing_and_alarms_gate_writes() {
    on_engines(|name, s| {
        put(s, "k", "v");
        {
            let mut b = s.begin_apply();
            b.apply(&keel_proto::keelpb::RaftRequest {
                request: Some(Cmd::Put(PutRequest {
                    key: "k".into(),
                    value: "lost".into(),
                    ..Default::default()
                })),
                origin: None,
            });
        }
        assert_eq!(get(s, "k", "", 0).unwrap().kvs[0].value, b"v", "{name}");
        assert_eq!(s.current_revision(), 2);
        let (r, _) = apply(
            s,
            Cmd::Alarm(AlarmRequest {
                action: 1,
                member_id: 7,
                alarm: 1,
            }),
        );
        assert!(r.error.is_none());
        assert_eq!(
            error_kind(
                &apply(
                    s,
                    Cmd::Put(PutRequest {
                        key: "k".into(),
                        value: "x".into(),
                        ..Default::default()
                    })
                )
                .0
            ),
            Some(ApplyErrorKind::NoSpace)
        );
        assert_eq!(
            del(s, "k", "").deleted,
            1,
            "deletes still work under NOSPACE"
        );
        apply(
            s,
            Cmd::Alarm(AlarmRequest {
                action: 2,
                member_id: 7,
                alarm: 1,
            }),
        );
        put(s, "k", "again");
    });
}

/// etcd's compact revision starts at -1: on a store never compacted, a compaction to revision 0
/// succeeds (and removes nothing); once any compaction was applied, another one to 0 is
/// refused as compacted, also after a restart.
#[test]
fn a_first_compaction_to_revision_zero_succeeds_once() {
    let compact = |s: &MvccStore, revision: i64| {
        let (r, _) = apply(
            s,
            Cmd::Compaction(CompactionRequest {
                revision,
                physical: false,
            }),
        );
        error_kind(&r)
    };
    on_engines(|name, s| {
        put(s, "k", "v");
        assert_eq!(s.compact_revision(), -1, "{name}");
        assert_eq!(compact(s, -1), Some(ApplyErrorKind::Compacted), "{name}");
        assert_eq!(compact(s, 0), None, "{name}");
        assert_eq!(s.compact_revision(), 0, "{name}");
        assert_eq!(compact(s, 0), Some(ApplyErrorKind::Compacted), "{name}");
        assert_eq!(
            get(s, "k", "", 0).unwrap().kvs.len(),
            1,
            "{name}: nothing removed"
        );
        assert_eq!(compact(s, 1), None, "{name}");
        assert_eq!(compact(s, 1), Some(ApplyErrorKind::Compacted), "{name}");
    });
    let dir = tempfile::tempdir().unwrap();
    {
        let engine: Arc<dyn Engine> = Arc::new(RocksEngine::open(dir.path()).unwrap());
        let s = MvccStore::open(engine).unwrap();
        assert_eq!(compact(&s, 0), None);
    }
    let engine: Arc<dyn Engine> = Arc::new(RocksEngine::open(dir.path()).unwrap());
    let s = MvccStore::open(engine).unwrap();
    assert_eq!(s.compact_revision(), 0);
    assert_eq!(compact(&s, 0), Some(ApplyErrorKind::Compacted));
}

#[test]
fn rocksdb_reopen_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let rev;
    {
        let engine: Arc<dyn Engine> = Arc::new(RocksEngine::open(dir.path()).unwrap());
        let s = MvccStore::open(engine).unwrap();
        apply(&s, Cmd::LeaseGrant(LeaseGrantRequest { ttl: 30, id: 42 }));
        for i in 0..100 {
            put(&s, &format!("key{i:03}"), &format!("v{i}"));
        }
        put_lease(&s, "leased", "x", 42);
        del(&s, "key050", "");
        apply(
            &s,
            Cmd::Compaction(CompactionRequest {
                revision: 20,
                physical: false,
            }),
        );
        rev = s.current_revision();
    }
    let engine: Arc<dyn Engine> = Arc::new(RocksEngine::open(dir.path()).unwrap());
    let s = MvccStore::open(engine).unwrap();
    assert_eq!(s.current_revision(), rev);
    assert_eq!(s.compact_revision(), 20);
    assert_eq!(get(&s, "key", "kez", 0).unwrap().count, 99);
    assert_eq!(get(&s, "key099", "", 0).unwrap().kvs[0].value, b"v99");
    assert_eq!(s.lease(42).unwrap().keys, vec![b"leased".to_vec()]);
    assert_eq!(
        get(&s, "key010", "", 19).unwrap_err().kind,
        ApplyErrorKind::Compacted
    );
    let mut rx = s.compaction_progress();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while *rx.borrow_and_update() < 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "unfinished compaction did not resume"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// A reopened store rebuilds its key index from the `kv` table alone (sorted by key, built in
/// one pass): every revision must read as it did before, with keys written out of key order,
/// several revisions per key, deletes and re-creates, and leases moved between keys.
#[test]
fn reopen_rebuilds_the_index_and_leases_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let before;
    // Every key-value pair (value, revisions, version, lease) as of each revision.
    let ranges = |s: &MvccStore| -> Vec<Vec<keel_proto::mvccpb::KeyValue>> {
        (1..=s.current_revision())
            .map(|rev| get(s, "\0", "\0", rev).map(|r| r.kvs).unwrap_or_default())
            .collect()
    };
    {
        let engine: Arc<dyn Engine> = Arc::new(RocksEngine::open(dir.path()).unwrap());
        let s = MvccStore::open(engine).unwrap();
        apply(&s, Cmd::LeaseGrant(LeaseGrantRequest { ttl: 30, id: 7 }));
        apply(&s, Cmd::LeaseGrant(LeaseGrantRequest { ttl: 30, id: 8 }));
        for round in 0..4 {
            // Keys in an order unlike their sort order, each written every round.
            for i in [5, 1, 9, 3, 7, 0, 8, 2, 6, 4] {
                put(&s, &format!("k{i}"), &format!("{round}-{i}"));
            }
            del(&s, &format!("k{}", round * 2), "");
        }
        put_lease(&s, "a-leased-then-not", "x", 7);
        put(&s, "a-leased-then-not", "y");
        put_lease(&s, "b-moved", "x", 7);
        put_lease(&s, "b-moved", "y", 8);
        put_lease(&s, "c-kept", "x", 8);
        put_lease(&s, "d-deleted", "x", 7);
        del(&s, "d-deleted", "");
        before = (
            ranges(&s),
            s.lease(7).unwrap().keys,
            s.lease(8).unwrap().keys,
            s.current_revision(),
        );
        assert!(before.0.iter().any(|r| !r.is_empty()));
    }
    let engine: Arc<dyn Engine> = Arc::new(RocksEngine::open(dir.path()).unwrap());
    let s = MvccStore::open(engine).unwrap();
    assert_eq!(s.current_revision(), before.3);
    assert_eq!(s.lease(7).unwrap().keys, before.1);
    assert_eq!(
        s.lease(8).unwrap().keys,
        vec![b"b-moved".to_vec(), b"c-kept".to_vec()]
    );
    assert_eq!(s.lease(8).unwrap().keys, before.2);
    assert!(before.1.is_empty(), "lease 7 holds no key any more");
    assert_eq!(ranges(&s), before.0, "every revision reads as before");
}

#[test]
fn hash_is_identical_for_the_same_commands_and_readers_run_during_compaction() {
    let run = |s: &MvccStore| {
        for i in 0..3000 {
            put(s, &format!("h{:04}", i % 500), &i.to_string());
        }
        apply(
            s,
            Cmd::Compaction(CompactionRequest {
                revision: 2500,
                physical: false,
            }),
        );
    };
    let dir = tempfile::tempdir().unwrap();
    let a = MvccStore::open(Arc::new(RocksEngine::open(dir.path()).unwrap())).unwrap();
    let b = MvccStore::open(Arc::new(keel_store::engine::memory::MemoryEngine::new())).unwrap();
    run(&a);
    // Readers keep working while compaction runs.
    for _ in 0..50 {
        assert_eq!(get(&a, "h", "i", 0).unwrap().count, 500);
    }
    run(&b);
    for format in [HashKvFormat::Internal, HashKvFormat::Etcd] {
        let ha = a.hash_kv(0, format).unwrap();
        let hb = b.hash_kv(0, format).unwrap();
        assert_eq!(
            ha, hb,
            "{format:?}: same log, same hash, whatever physical compaction has done"
        );
    }
    assert_ne!(
        a.hash_kv(0, HashKvFormat::Internal).unwrap().hash,
        a.hash_kv(0, HashKvFormat::Etcd).unwrap().hash,
        "two different hashes"
    );
    put(&b, "diverge", "1");
    for format in [HashKvFormat::Internal, HashKvFormat::Etcd] {
        assert_ne!(
            a.hash_kv(0, format).unwrap().hash,
            b.hash_kv(0, format).unwrap().hash,
            "{format:?}: different data, different hash"
        );
    }
}

#[test]
fn index_bytes_per_key_report() {
    // Reported, not asserted tightly: the figure goes into docs/benchmarks.md.
    let s = MvccStore::open(Arc::new(keel_store::engine::memory::MemoryEngine::new())).unwrap();
    let mut b = s.begin_apply();
    for i in 0..1_000_000u32 {
        b.apply(&keel_proto::keelpb::RaftRequest {
            request: Some(Cmd::Put(PutRequest {
                key: format!("{i:016}").into_bytes(),
                value: vec![1],
                ..Default::default()
            })),
            origin: None,
        });
    }
    b.commit(false).unwrap();
    let st = s.stats();
    let per_key = st.index_bytes_estimate / st.keys;
    println!(
        "index: {} keys, about {per_key} bytes per 16-byte key",
        st.keys
    );
    assert!(per_key < 180, "index too large: {per_key} bytes/key");
}

/// Puts, non-value compares and keys-only reads take create revision, version and lease from the
/// index; the index is rebuilt from the `kv` table on open, so they survive a restart.
#[test]
fn index_metadata_serves_puts_compares_and_keys_only_reads() {
    let dir = tempfile::tempdir().unwrap();
    {
        let rocks: Arc<dyn Engine> = Arc::new(RocksEngine::open(dir.path()).unwrap());
        let s = MvccStore::open(rocks).unwrap();
        put(&s, "m", "a"); // rev 2: create 2, version 1
        put(&s, "m", "bb"); // rev 3: version 2
    }
    let rocks: Arc<dyn Engine> = Arc::new(RocksEngine::open(dir.path()).unwrap());
    let s = MvccStore::open(rocks).unwrap();
    let rev = put(&s, "m", "ccc");
    let kv = get(&s, "m", "", 0).unwrap().kvs.remove(0);
    assert_eq!(
        (
            kv.create_revision,
            kv.mod_revision,
            kv.version,
            kv.value.as_slice()
        ),
        (2, rev, 3, &b"ccc"[..])
    );
    let keys_only = s
        .range(&RangeRequest {
            key: "m".into(),
            keys_only: true,
            ..Default::default()
        })
        .unwrap();
    let k = &keys_only.kvs[0];
    assert_eq!(
        (
            k.key.as_slice(),
            k.create_revision,
            k.mod_revision,
            k.version,
            k.value.len()
        ),
        (&b"m"[..], 2, rev, 3, 0)
    );
    let cmp = |target: CompareTarget, union: TargetUnion| Compare {
        key: "m".into(),
        target: target as i32,
        result: CompareResult::Equal as i32,
        target_union: Some(union),
        ..Default::default()
    };
    for (c, want) in [
        (cmp(CompareTarget::Version, TargetUnion::Version(3)), true),
        (
            cmp(CompareTarget::Create, TargetUnion::CreateRevision(2)),
            true,
        ),
        (cmp(CompareTarget::Mod, TargetUnion::ModRevision(rev)), true),
        (
            cmp(CompareTarget::Mod, TargetUnion::ModRevision(rev - 1)),
            false,
        ),
        (
            cmp(CompareTarget::Value, TargetUnion::Value(b"ccc".to_vec())),
            true,
        ),
        (
            cmp(CompareTarget::Value, TargetUnion::Value(b"bb".to_vec())),
            false,
        ),
    ] {
        let (r, _) = apply(
            &s,
            Cmd::Txn(TxnRequest {
                compare: vec![c.clone()],
                ..Default::default()
            }),
        );
        let keel_proto::keelpb::raft_response::Response::Txn(t) = r.response.unwrap() else {
            panic!("not a txn response")
        };
        assert_eq!(t.succeeded, want, "{c:?}");
    }
}

#[test]
fn values_are_right_whether_or_not_the_value_cache_holds_them() {
    on_engines(|name, s| {
        // Three generations of 50 keys, each value naming its key and round.
        let mut revs = Vec::new();
        for round in 0..3 {
            for k in 0..50 {
                revs.push(put(s, &format!("k{k:02}"), &format!("k{k:02}-r{round}")));
            }
        }
        // Current values, as one range and key by key (latest first, so a small cache has
        // dropped the older ones).
        for check in 0..2 {
            let all = get(s, "k", "l", 0).unwrap();
            assert_eq!(all.kvs.len(), 50, "{name}");
            for (k, kv) in all.kvs.iter().enumerate() {
                assert_eq!(
                    kv.value,
                    format!("k{k:02}-r2").into_bytes(),
                    "{name} {check}"
                );
                assert_eq!(kv.version, 3, "{name}");
            }
        }
        for k in (0..50).rev() {
            let one = get(s, &format!("k{k:02}"), "", 0).unwrap();
            assert_eq!(
                one.kvs[0].value,
                format!("k{k:02}-r2").into_bytes(),
                "{name}"
            );
        }
        // The past: at the end of round 0 and in the middle of round 1.
        let end_of_round_0 = revs[49];
        let past = get(s, "k", "l", end_of_round_0).unwrap();
        assert!(
            past.kvs
                .iter()
                .enumerate()
                .all(|(k, kv)| kv.value == format!("k{k:02}-r0").into_bytes()
                    && kv.mod_revision == revs[k])
        );
        let mid = get(s, "k", "l", revs[74]).unwrap();
        for (k, kv) in mid.kvs.iter().enumerate() {
            let round = if k <= 24 { 1 } else { 0 };
            assert_eq!(
                kv.value,
                format!("k{k:02}-r{round}").into_bytes(),
                "{name} k{k}"
            );
        }
        // Deleted keys stay deleted, rewritten keys show the new value.
        del(s, "k00", "k10");
        put(s, "k05", "again");
        let now = get(s, "k", "l", 0).unwrap();
        assert_eq!(now.kvs.len(), 41, "{name}");
        assert_eq!(now.kvs[0].key, b"k05");
        assert_eq!(now.kvs[0].value, b"again");
        assert_eq!(now.kvs[0].version, 1);
        // A reload (as after a Raft snapshot) empties the cache; reads are the same.
        s.reload().unwrap();
        assert_eq!(get(s, "k", "l", 0).unwrap().kvs, now.kvs, "{name}");
    });
}

/// A `ProposalBatch` applies its requests exactly as separate commands would: each its own
/// revision, response and events, a failing one leaving the others alone, and the same store
/// (hash, history) as applying them one by one.
#[test]
fn a_proposal_batch_applies_like_separate_commands() {
    use keel_proto::keelpb::raft_response::Response as Res;
    use keel_proto::keelpb::{ProposalBatch, RaftRequest};

    let requests: Vec<Cmd> = vec![
        Cmd::Put(PutRequest {
            key: "a".into(),
            value: "1".into(),
            ..Default::default()
        }),
        // Fails: `ignore_value` on a key that does not exist.
        Cmd::Put(PutRequest {
            key: "missing".into(),
            ignore_value: true,
            ..Default::default()
        }),
        Cmd::Txn(TxnRequest {
            compare: vec![cmp(
                "a",
                CompareTarget::Version,
                CompareResult::Equal,
                TargetUnion::Version(1),
            )],
            success: vec![op_put("b", "2"), op_get("a")],
            failure: vec![],
        }),
        Cmd::DeleteRange(DeleteRangeRequest {
            key: "a".into(),
            prev_kv: true,
            ..Default::default()
        }),
        // A nested batch is refused, and nothing else is affected.
        Cmd::Batch(ProposalBatch {
            requests: vec![RaftRequest {
                request: Some(Cmd::Put(PutRequest {
                    key: "nested".into(),
                    ..Default::default()
                })),
                origin: None,
            }],
        }),
        Cmd::Put(PutRequest {
            key: "a".into(),
            value: "3".into(),
            prev_kv: true,
            ..Default::default()
        }),
    ];
    on_engines(|engine, batched| {
        let separate =
            MvccStore::open(Arc::new(keel_store::engine::memory::MemoryEngine::new())).unwrap();
        put(batched, "z", "0");
        put(&separate, "z", "0");
        let (resp, events) = apply(
            batched,
            Cmd::Batch(ProposalBatch {
                requests: requests
                    .iter()
                    .map(|c| RaftRequest {
                        request: Some(c.clone()),
                        origin: None,
                    })
                    .collect(),
            }),
        );
        let mut separate_events = Vec::new();
        let mut separate_responses = Vec::new();
        // (The nested batch has no separate counterpart: on its own it would be a batch.)
        for c in requests.iter().filter(|c| !matches!(c, Cmd::Batch(_))) {
            let (r, e) = apply(&separate, c.clone());
            separate_events.extend(e);
            separate_responses.push(r);
        }
        assert!(resp.error.is_none(), "{engine}: {resp:?}");
        let mut unnested = resp.batch.clone();
        unnested.remove(4);
        assert_eq!(unnested, separate_responses, "{engine}");
        assert_eq!(events, separate_events, "{engine}");
        // z@2, a@3, (refused), txn b@4, delete a@5, (refused), a@6.
        let revisions: Vec<i64> = resp.batch.iter().map(|r| r.revision).collect();
        assert_eq!(revisions, vec![3, 3, 4, 5, 5, 6], "{engine}");
        assert_eq!(resp.revision, 6, "{engine}");
        assert_eq!(
            resp.batch[1].error.as_ref().map(|e| e.message.as_str()),
            Some("etcdserver: key not found"),
            "{engine}"
        );
        assert!(
            resp.batch[4]
                .error
                .as_ref()
                .is_some_and(|e| e.message.contains("nested")),
            "{engine}: {:?}",
            resp.batch[4]
        );
        match &resp.batch[5].response {
            Some(Res::Put(p)) => assert_eq!(p.prev_kv, None, "{engine}: a was deleted"),
            other => panic!("{engine}: {other:?}"),
        }
        let event_revisions: Vec<i64> = events
            .iter()
            .map(|e| e.kv.as_ref().unwrap().mod_revision)
            .collect();
        assert_eq!(event_revisions, vec![3, 4, 5, 6], "{engine}");
        assert_eq!(batched.current_revision(), 6, "{engine}");
        assert!(
            batched
                .range(&RangeRequest {
                    key: "nested".into(),
                    ..Default::default()
                })
                .unwrap()
                .kvs
                .is_empty(),
            "{engine}"
        );
        for format in [HashKvFormat::Internal, HashKvFormat::Etcd] {
            assert_eq!(
                batched.hash_kv(0, format).unwrap().hash,
                separate.hash_kv(0, format).unwrap().hash,
                "{engine}"
            );
        }
    });
}

/// A read-only Txn served from the committed state (`MvccStore::read_txn`, as etcd serves
/// such Txns without a log entry) answers exactly what applying it through the log answers.
#[test]
fn a_read_only_txn_served_as_a_read_answers_as_applied() {
    on_engines(|engine, store| {
        put(store, "a", "1"); // 2
        put(store, "b", "2"); // 3
        put(store, "a", "3"); // 4
        let (r, _) = apply(
            store,
            Cmd::Compaction(CompactionRequest {
                revision: 3,
                physical: false,
            }),
        );
        assert!(r.error.is_none(), "{engine}: {r:?}");
        put(store, "c", "4"); // 5
        let get_at = |k: &str, revision: i64| RequestOp {
            request: Some(Op::RequestRange(RangeRequest {
                key: k.into(),
                revision,
                ..Default::default()
            })),
        };
        let nested = |t: TxnRequest| RequestOp {
            request: Some(Op::RequestTxn(t)),
        };
        let txns = vec![
            // Succeeds: a's value and version; both branches read.
            TxnRequest {
                compare: vec![
                    cmp(
                        "a",
                        CompareTarget::Value,
                        CompareResult::Equal,
                        TargetUnion::Value("3".into()),
                    ),
                    cmp(
                        "b",
                        CompareTarget::Version,
                        CompareResult::Equal,
                        TargetUnion::Version(1),
                    ),
                ],
                success: vec![
                    op_get("a"),
                    get_at("a", 3),
                    nested(TxnRequest {
                        compare: vec![cmp(
                            "zz",
                            CompareTarget::Create,
                            CompareResult::Equal,
                            TargetUnion::CreateRevision(0),
                        )],
                        success: vec![op_get("c")],
                        failure: vec![op_get("b")],
                    }),
                ],
                failure: vec![op_get("b")],
            },
            // Fails on a value compare of a missing key; reads a range.
            TxnRequest {
                compare: vec![cmp(
                    "zz",
                    CompareTarget::Value,
                    CompareResult::Equal,
                    TargetUnion::Value(vec![]),
                )],
                success: vec![],
                failure: vec![RequestOp {
                    request: Some(Op::RequestRange(RangeRequest {
                        key: "a".into(),
                        range_end: "z".into(),
                        ..Default::default()
                    })),
                }],
            },
            // A range compare (mod revision below 5 for a..c) and no operations.
            TxnRequest {
                compare: vec![Compare {
                    range_end: "c".into(),
                    ..cmp(
                        "a",
                        CompareTarget::Mod,
                        CompareResult::Less,
                        TargetUnion::ModRevision(5),
                    )
                }],
                success: vec![],
                failure: vec![],
            },
        ];
        for t in &txns {
            let read = store.read_txn(t).unwrap();
            let (applied, events) = apply(store, Cmd::Txn(t.clone()));
            assert!(events.is_empty(), "{engine}");
            match applied.response {
                Some(keel_proto::keelpb::raft_response::Response::Txn(a)) => {
                    assert_eq!(read, a, "{engine}: {t:?}")
                }
                other => panic!("{engine}: {other:?}"),
            }
        }
        assert_eq!(store.current_revision(), 5, "{engine}: reads wrote nothing");
        // The errors are the applied ones: a compacted and a future revision.
        for (revision, kind) in [
            (2, ApplyErrorKind::Compacted),
            (6, ApplyErrorKind::FutureRevision),
        ] {
            let t = TxnRequest {
                success: vec![get_at("a", revision)],
                ..Default::default()
            };
            assert_eq!(store.read_txn(&t).unwrap_err().kind, kind, "{engine}");
            let (applied, _) = apply(store, Cmd::Txn(t));
            assert_eq!(applied.error.unwrap().kind, kind as u32, "{engine}");
        }
        // A Txn that writes must go through the log.
        let writes = TxnRequest {
            success: vec![op_put("x", "1")],
            ..Default::default()
        };
        assert!(store.read_txn(&writes).is_err(), "{engine}");
        assert_eq!(store.current_revision(), 5, "{engine}");
    });
}
