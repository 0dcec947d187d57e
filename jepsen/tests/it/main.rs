//! The checker must reproduce every known verdict of the shared Jepsen etcd histories.

use std::path::PathBuf;

use keel_jepsen::linearizable::{Verdict, check};

#[test]
fn reproduces_every_shared_verdict() {
    // The crate's directory as cargo reports it when running the test, not as compiled in: a
    // target directory shared by clones at different paths can reuse a binary built elsewhere.
    let crate_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    let dir = crate_dir.join("../../shared/histories/etcd-register");
    let verdicts = std::fs::read_to_string(dir.join("verdicts.tsv")).unwrap_or_else(|e| {
        panic!(
            "the shared histories are required beside the clone ({}): {e}",
            dir.display()
        )
    });
    let mut checked = 0;
    for line in verdicts.lines().skip(1) {
        let mut cols = line.split('\t');
        let (Some(file), Some(expected)) = (cols.next(), cols.next()) else {
            continue;
        };
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        let ops = keel_jepsen::jepsen_log::parse(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
        let start = std::time::Instant::now();
        let got = match check(&ops, 50_000_000) {
            Verdict::Linearizable => "true",
            Verdict::Violation { .. } => "false",
            Verdict::Unknown => "unknown",
        };
        assert_eq!(got, expected.trim(), "{file}");
        assert!(
            start.elapsed().as_secs() < 10,
            "{file} took {:?}",
            start.elapsed()
        );
        checked += 1;
    }
    assert_eq!(checked, 69);
}

// ---------------------------------------------------------------------------------------------
// Checkers on small synthetic histories: each must accept a correct history and detect a planted
// anomaly.

use keel_jepsen::checker;
use keel_jepsen::record::{
    CheckResult, FaultWindow, Op, Outcome, Valid, read_history, write_history,
};
use serde_json::{Value, json};

const MS: u64 = 1_000_000;

/// An operation invoked at `t0` ms and completed at `t1` ms.
#[allow(clippy::too_many_arguments)]
fn op(
    index: u64,
    node: usize,
    f: &str,
    value: Value,
    result: Value,
    outcome: Outcome,
    t0: u64,
    t1: u64,
) -> Op {
    Op {
        index,
        process: index,
        node,
        f: f.into(),
        value,
        result,
        outcome,
        error: None,
        invoke: t0 * MS,
        complete: t1 * MS,
    }
}

fn has(r: &CheckResult, anomaly: &str) -> bool {
    r.valid == Valid::False && r.anomalies.contains_key(anomaly)
}

fn by_name<'a>(rs: &'a [CheckResult], name: &str) -> &'a CheckResult {
    rs.iter().find(|r| r.checker == name).unwrap()
}

// --- register ------------------------------------------------------------------------------

fn w(i: u64, key: &str, v: i64, rev: i64, prev: (Option<i64>, i64), t0: u64, t1: u64) -> Op {
    op(
        i,
        0,
        "write",
        json!({"key": key, "value": v}),
        json!({"rev": rev, "prev": {"value": prev.0, "mod_rev": prev.1}}),
        Outcome::Ok,
        t0,
        t1,
    )
}

#[allow(clippy::too_many_arguments)]
fn r(
    i: u64,
    node: usize,
    key: &str,
    v: Option<i64>,
    mod_rev: i64,
    rev: i64,
    t0: u64,
    t1: u64,
) -> Op {
    op(
        i,
        node,
        "read",
        json!({"key": key}),
        json!({"value": v, "mod_rev": mod_rev, "version": 1, "rev": rev}),
        Outcome::Ok,
        t0,
        t1,
    )
}

#[test]
fn register_accepts_a_linearizable_history() {
    let h = vec![
        w(0, "k", 1, 2, (None, 0), 0, 10),
        r(1, 1, "k", Some(1), 2, 2, 5, 15),
        op(
            2,
            2,
            "cas",
            json!({"key": "k", "from": 1, "to": 2, "cmp": "value"}),
            json!({"rev": 3, "prev": {"value": 1, "mod_rev": 2}}),
            Outcome::Ok,
            20,
            30,
        ),
        op(
            3,
            0,
            "write",
            json!({"key": "k", "value": 3}),
            Value::Null,
            Outcome::Info,
            31,
            40,
        ),
        r(4, 1, "k", Some(3), 4, 4, 50, 60),
        op(
            5,
            2,
            "cas",
            json!({"key": "k", "from": 1, "to": 4, "cmp": "value"}),
            json!({"rev": 4}),
            Outcome::Fail,
            61,
            70,
        ),
    ];
    let rs = checker::register::check(&h, 1_000_000);
    for c in &rs {
        assert_eq!(c.valid, Valid::True, "{c:?}");
    }
}

#[test]
fn register_detects_a_stale_read() {
    let h = vec![
        w(0, "k", 1, 2, (None, 0), 0, 10),
        w(1, "k", 2, 3, (Some(1), 2), 11, 20),
        // Invoked after the second write completed, yet returns the first version.
        r(2, 2, "k", Some(1), 2, 2, 30, 40),
    ];
    let rs = checker::register::check(&h, 1_000_000);
    let chain = by_name(&rs, "version-chain");
    assert!(has(chain, "stale-read"), "{chain:?}");
    assert!(has(chain, "revision-regression"), "{chain:?}");
    assert!(!chain.witness.is_empty() && chain.witness_ops.contains(&2));
    assert!(has(by_name(&rs, "linearizable"), "nonlinearizable"));
}

#[test]
fn register_detects_lost_updates_phantoms_and_double_applies() {
    // Two writes both claim to have overwritten version 2.
    let lost = vec![
        w(0, "k", 1, 2, (None, 0), 0, 10),
        w(1, "k", 2, 3, (Some(1), 2), 11, 20),
        w(2, "k", 3, 4, (Some(1), 2), 11, 20),
    ];
    assert!(has(&checker::register::check_chain(&lost), "lost-update"));
    // A value nobody wrote.
    let phantom = vec![
        w(0, "k", 1, 2, (None, 0), 0, 10),
        r(1, 0, "k", Some(9), 5, 5, 20, 30),
    ];
    assert!(has(
        &checker::register::check_chain(&phantom),
        "phantom-read"
    ));
    // A failed write that was observed.
    let aborted = vec![
        op(
            0,
            0,
            "write",
            json!({"key": "k", "value": 7}),
            Value::Null,
            Outcome::Fail,
            0,
            10,
        ),
        r(1, 0, "k", Some(7), 2, 2, 20, 30),
    ];
    assert!(has(
        &checker::register::check_chain(&aborted),
        "aborted-read"
    ));
    assert!(has(
        &checker::register::check_linearizable(&aborted, 1_000_000),
        "nonlinearizable"
    ));
    // One value at two revisions: a write applied twice.
    let twice = vec![
        w(0, "k", 1, 2, (None, 0), 0, 10),
        r(1, 0, "k", Some(1), 3, 3, 20, 30),
    ];
    assert!(has(
        &checker::register::check_chain(&twice),
        "duplicate-write"
    ));
}

// --- set -----------------------------------------------------------------------------------

fn add(i: u64, e: u64, outcome: Outcome, t0: u64, t1: u64) -> Op {
    op(
        i,
        0,
        "add",
        json!({"element": e}),
        json!({}),
        outcome,
        t0,
        t1,
    )
}

fn read_set(i: u64, node: usize, elems: &[u64], fin: bool, t0: u64, t1: u64) -> Op {
    let value = if fin {
        json!({"final": true})
    } else {
        json!({})
    };
    op(
        i,
        node,
        "read",
        value,
        json!({"elements": elems}),
        Outcome::Ok,
        t0,
        t1,
    )
}

#[test]
fn set_checker() {
    let good = vec![
        add(0, 0, Outcome::Ok, 0, 10),
        add(1, 1, Outcome::Info, 0, 10),
        read_set(2, 1, &[0], false, 5, 15),
        add(3, 2, Outcome::Fail, 20, 30),
        read_set(4, 0, &[0, 1], true, 100, 110),
        read_set(5, 1, &[0, 1], true, 100, 110),
    ];
    assert_eq!(checker::set::check(&good).valid, Valid::True);

    let mut lost = good.clone();
    lost[4] = read_set(4, 0, &[1], true, 100, 110);
    lost[5] = read_set(5, 1, &[1], true, 100, 110);
    assert!(has(&checker::set::check(&lost), "lost"));

    let mut phantom = good.clone();
    phantom.push(read_set(6, 2, &[0, 42], false, 50, 60));
    assert!(has(&checker::set::check(&phantom), "phantom"));

    let mut aborted = good.clone();
    aborted.push(read_set(6, 2, &[0, 2], false, 50, 60));
    assert!(has(&checker::set::check(&aborted), "aborted-read"));

    // A read invoked after element 0 was acknowledged that misses it.
    let mut stale = good.clone();
    stale.push(read_set(6, 2, &[], false, 50, 60));
    assert!(has(&checker::set::check(&stale), "stale-read"));

    let mut divergent = good;
    divergent[5] = read_set(5, 1, &[0], true, 100, 110);
    assert!(has(&checker::set::check(&divergent), "divergent-final"));
}

// --- append (Elle) -------------------------------------------------------------------------

/// A list-append txn: `mops` as (f, key, value/read list).
fn txn(i: u64, mops: &[(&str, &str, Value)], outcome: Outcome, t0: u64, t1: u64) -> Op {
    let value: Vec<Value> = mops
        .iter()
        .map(|(f, k, v)| {
            if *f == "r" {
                json!(["r", k, null])
            } else {
                json!([f, k, v])
            }
        })
        .collect();
    let result: Vec<Value> = mops.iter().map(|(f, k, v)| json!([f, k, v])).collect();
    op(
        i,
        0,
        "txn",
        json!({"mops": value}),
        json!({"mops": result}),
        outcome,
        t0,
        t1,
    )
}

fn final_read(i: u64, lists: &[(&str, Value)]) -> Op {
    let mops: Vec<Value> = lists.iter().map(|(k, l)| json!(["r", k, l])).collect();
    op(
        i,
        0,
        "txn",
        json!({"final": true, "mops": "all"}),
        json!({"mops": mops}),
        Outcome::Ok,
        1000,
        1010,
    )
}

#[test]
fn append_accepts_a_serializable_history() {
    let h = vec![
        txn(
            0,
            &[("append", "x", json!(1)), ("r", "y", json!([]))],
            Outcome::Ok,
            0,
            10,
        ),
        txn(
            1,
            &[("r", "x", json!([1])), ("append", "y", json!(2))],
            Outcome::Ok,
            20,
            30,
        ),
        txn(2, &[("append", "x", json!(3))], Outcome::Fail, 20, 30),
        txn(3, &[("append", "x", json!(4))], Outcome::Info, 40, 50),
        final_read(4, &[("x", json!([1, 4])), ("y", json!([2]))]),
    ];
    let r = checker::append::check(&h);
    assert_eq!(r.valid, Valid::True, "{r:?}");
}

#[test]
fn append_detects_g0_g1c_gsingle_g2() {
    // G0: x and y written in opposite orders by T0 and T1.
    let g0 = vec![
        txn(
            0,
            &[("append", "x", json!(1)), ("append", "y", json!(1))],
            Outcome::Ok,
            0,
            100,
        ),
        txn(
            1,
            &[("append", "x", json!(2)), ("append", "y", json!(2))],
            Outcome::Ok,
            0,
            100,
        ),
        final_read(2, &[("x", json!([1, 2])), ("y", json!([2, 1]))]),
    ];
    let r = checker::append::check(&g0);
    assert!(has(&r, "G0"), "{r:?}");

    // G1c: each reads the other's write.
    let g1c = vec![
        txn(
            0,
            &[("append", "x", json!(1)), ("r", "y", json!([1]))],
            Outcome::Ok,
            0,
            100,
        ),
        txn(
            1,
            &[("append", "y", json!(1)), ("r", "x", json!([1]))],
            Outcome::Ok,
            0,
            100,
        ),
        final_read(2, &[("x", json!([1])), ("y", json!([1]))]),
    ];
    let r = checker::append::check(&g1c);
    assert!(has(&r, "G1c"), "{r:?}");

    // G-single (read skew): T0 sees T1's y but not its x.
    let gs = vec![
        txn(
            0,
            &[("r", "x", json!([])), ("r", "y", json!([1]))],
            Outcome::Ok,
            0,
            100,
        ),
        txn(
            1,
            &[("append", "x", json!(1)), ("append", "y", json!(1))],
            Outcome::Ok,
            0,
            100,
        ),
        final_read(2, &[("x", json!([1])), ("y", json!([1]))]),
    ];
    let r = checker::append::check(&gs);
    assert!(has(&r, "G-single"), "{r:?}");

    // G2 (write skew): each reads the key the other appends, before the append.
    let g2 = vec![
        txn(
            0,
            &[("r", "x", json!([])), ("append", "y", json!(1))],
            Outcome::Ok,
            0,
            100,
        ),
        txn(
            1,
            &[("r", "y", json!([])), ("append", "x", json!(1))],
            Outcome::Ok,
            0,
            100,
        ),
        final_read(2, &[("x", json!([1])), ("y", json!([1]))]),
    ];
    let r = checker::append::check(&g2);
    assert!(has(&r, "G2-item"), "{r:?}");
}

#[test]
fn append_detects_realtime_and_non_cycle_anomalies() {
    // T1 starts after T0 finished but does not see T0's append: only real time orders them.
    let rt = vec![
        txn(0, &[("append", "x", json!(1))], Outcome::Ok, 0, 10),
        txn(1, &[("r", "x", json!([]))], Outcome::Ok, 20, 30),
        final_read(2, &[("x", json!([1]))]),
    ];
    let r = checker::append::check(&rt);
    assert!(has(&r, "G-single-realtime"), "{r:?}");

    let incompatible = vec![
        txn(0, &[("append", "x", json!(1))], Outcome::Ok, 0, 10),
        txn(1, &[("append", "x", json!(2))], Outcome::Ok, 0, 10),
        txn(2, &[("r", "x", json!([1]))], Outcome::Ok, 20, 30),
        txn(3, &[("r", "x", json!([2, 1]))], Outcome::Ok, 20, 30),
        final_read(4, &[("x", json!([2, 1]))]),
    ];
    assert!(has(
        &checker::append::check(&incompatible),
        "incompatible-order"
    ));

    let aborted = vec![
        txn(0, &[("append", "x", json!(1))], Outcome::Fail, 0, 10),
        txn(1, &[("r", "x", json!([1]))], Outcome::Ok, 20, 30),
        final_read(2, &[("x", json!([1]))]),
    ];
    assert!(has(&checker::append::check(&aborted), "G1a"));

    let lost = vec![
        txn(0, &[("append", "x", json!(1))], Outcome::Ok, 0, 10),
        txn(1, &[("append", "x", json!(2))], Outcome::Ok, 20, 30),
        final_read(2, &[("x", json!([2]))]),
    ];
    assert!(has(&checker::append::check(&lost), "lost-append"));

    let intermediate = vec![
        txn(
            0,
            &[("append", "x", json!(1)), ("append", "x", json!(2))],
            Outcome::Ok,
            0,
            10,
        ),
        txn(1, &[("r", "x", json!([1]))], Outcome::Ok, 0, 30),
        final_read(2, &[("x", json!([1, 2]))]),
    ];
    assert!(has(&checker::append::check(&intermediate), "G1b"));
}

// --- watch ---------------------------------------------------------------------------------

fn ev(
    t: &str,
    k: &str,
    v: &str,
    create: i64,
    rev: i64,
    ver: i64,
    prev: Option<(&str, i64, i64, i64)>,
) -> Value {
    let prev = prev
        .map(|(pv, c, m, ver)| json!([k, pv, c, m, ver]))
        .unwrap_or(Value::Null);
    json!([t, k, v, create, rev, ver, prev])
}

/// The final history of a small run: put w/0, txn (w/1, w/2), delete w/0, tombstone.
fn watch_events() -> Vec<Value> {
    vec![
        ev("PUT", "w/0", "v1", 2, 2, 1, None),
        ev("PUT", "w/1", "v2", 3, 3, 1, None),
        ev("PUT", "w/2", "v3", 3, 3, 1, None),
        ev("DELETE", "w/0", "", 0, 4, 0, Some(("v1", 2, 2, 1))),
        ev("PUT", "w/~done", "done0", 5, 5, 1, None),
    ]
}

fn session(i: u64, node: usize, value: Value, responses: Vec<Value>, t0: u64, t1: u64) -> Op {
    op(
        i,
        node,
        "watch",
        value,
        json!({"responses": responses}),
        Outcome::Ok,
        t0,
        t1,
    )
}

fn resp(events: &[Value]) -> Value {
    json!({"t": 0, "rev": 5, "events": events})
}

fn watch_history(watcher: Vec<Value>) -> Vec<Op> {
    let all = watch_events();
    let mut h = vec![
        op(
            0,
            0,
            "put",
            json!({"key": "w/0", "value": "v1"}),
            json!({"rev": 2}),
            Outcome::Ok,
            0,
            10,
        ),
        op(
            1,
            0,
            "txn",
            json!({"puts": [["w/1", "v2"], ["w/2", "v3"]]}),
            json!({"rev": 3}),
            Outcome::Ok,
            20,
            30,
        ),
        op(
            2,
            0,
            "delete",
            json!({"key": "w/0"}),
            json!({"rev": 4, "deleted": 1}),
            Outcome::Ok,
            40,
            50,
        ),
        op(
            3,
            0,
            "put",
            json!({"key": "w/~done", "value": "done0", "final": true}),
            json!({"rev": 5}),
            Outcome::Ok,
            60,
            70,
        ),
    ];
    for n in 0..3 {
        h.push(session(
            10 + n,
            n as usize,
            json!({"final": true, "start_rev": 1}),
            vec![
                json!({"t": 0, "rev": 5, "created": true, "events": []}),
                resp(&all[..1]),
                resp(&all[1..3]),
                resp(&all[3..]),
            ],
            80,
            90,
        ));
    }
    h.push(session(
        20,
        1,
        json!({"watcher": 7, "start_rev": 1}),
        watcher,
        0,
        75,
    ));
    h
}

#[test]
fn watch_accepts_a_correct_history() {
    let all = watch_events();
    // Two responses plus a progress notification at revision 5.
    let h = watch_history(vec![
        resp(&all[..3]),
        resp(&all[3..]),
        json!({"t": 1, "rev": 5, "events": []}),
    ]);
    let r = checker::watch::check(&h);
    assert_eq!(r.valid, Valid::True, "{r:?}");
}

#[test]
fn watch_detects_gaps_duplicates_splits_and_bad_prev_kv() {
    let all = watch_events();
    // Missing revision 3 although the session saw revision 4 and 5.
    let gap = watch_history(vec![resp(&all[..1]), resp(&all[3..])]);
    assert!(has(&checker::watch::check(&gap), "gap"));

    // A progress notification at 5 after only revision 2: the rest was skipped.
    let bookmark = watch_history(vec![
        resp(&all[..1]),
        json!({"t": 1, "rev": 5, "events": []}),
    ]);
    assert!(has(&checker::watch::check(&bookmark), "gap"));

    // Revision 2 twice.
    let dup = watch_history(vec![resp(&all[..1]), resp(&all[..])]);
    assert!(has(&checker::watch::check(&dup), "duplicate-event"));

    // The two events of revision 3 split across responses.
    let split = watch_history(vec![resp(&all[..2]), resp(&all[2..])]);
    assert!(has(&checker::watch::check(&split), "split-revision"));

    // Wrong prev_kv on the delete.
    let mut bad = all.clone();
    bad[3] = ev("DELETE", "w/0", "", 0, 4, 0, Some(("v9", 2, 2, 1)));
    let prev = watch_history(vec![resp(&bad)]);
    assert!(has(&checker::watch::check(&prev), "bad-prev-kv"));

    // Out of order.
    let mut swapped = all.clone();
    swapped.swap(0, 4);
    let unordered = watch_history(vec![resp(&swapped)]);
    assert!(has(&checker::watch::check(&unordered), "unordered"));
}

#[test]
fn watch_detects_lost_and_phantom_writes() {
    let all = watch_events();
    let mut h = watch_history(vec![resp(&all)]);
    // An acknowledged put at revision 6 (before a later tombstone) that no history contains.
    h.push(op(
        30,
        0,
        "put",
        json!({"key": "w/3", "value": "v9"}),
        json!({"rev": 6}),
        Outcome::Ok,
        70,
        75,
    ));
    h.push(op(
        31,
        0,
        "put",
        json!({"key": "w/~done", "value": "done1", "final": true}),
        json!({"rev": 7}),
        Outcome::Ok,
        76,
        79,
    ));
    for s in h
        .iter_mut()
        .filter(|o| o.value["final"] == true && o.f == "watch")
    {
        let mut evs = all.clone();
        evs.push(ev(
            "PUT",
            "w/~done",
            "done1",
            5,
            7,
            2,
            Some(("done0", 5, 5, 1)),
        ));
        s.result = json!({"responses": [resp(&evs)]});
    }
    let r = checker::watch::check(&h);
    assert!(has(&r, "lost-write"), "{r:?}");

    // An event nobody wrote.
    let mut evs = all.clone();
    evs.insert(4, ev("PUT", "w/4", "zz", 4, 4, 1, None));
    let mut h = watch_history(vec![resp(&all)]);
    for s in h
        .iter_mut()
        .filter(|o| o.value["final"] == true && o.f == "watch")
    {
        s.result = json!({"responses": [resp(&evs)]});
    }
    assert!(has(&checker::watch::check(&h), "phantom-event"));
}

// --- history files -------------------------------------------------------------------------

#[test]
fn history_round_trips_through_jsonl() {
    let h = vec![
        w(0, "k", 1, 2, (None, 0), 0, 10),
        op(
            1,
            2,
            "write",
            json!({"key": "k", "value": 2}),
            Value::Null,
            Outcome::Info,
            5,
            2000,
        ),
        r(2, 1, "k", Some(1), 2, 2, 20, 30),
    ];
    let faults = vec![FaultWindow {
        kind: "partition".into(),
        description: "isolate n3".into(),
        nodes: vec![2],
        start: 3 * MS,
        end: 40 * MS,
    }];
    let dir = std::env::temp_dir().join(format!("keel-jepsen-rt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("history.jsonl");
    write_history(&path, &h, &faults).unwrap();
    let (back, fb) = read_history(&path).unwrap();
    assert_eq!(back, h);
    assert_eq!(fb, faults);
    std::fs::remove_dir_all(&dir).unwrap();
}

// --- lease ---------------------------------------------------------------------------------

const L1: i64 = 0x11;
const L2: i64 = 0x22;

fn lkey(lease: i64, n: u32) -> String {
    keel_jepsen::workload::lease::key_of(lease, n)
}

fn grant(i: u64, id: i64, ttl: i64, t0: u64, t1: u64) -> Op {
    op(
        i,
        0,
        "grant",
        json!({"ttl": ttl}),
        json!({"id": id, "ttl": ttl}),
        Outcome::Ok,
        t0,
        t1,
    )
}

fn keepalive(i: u64, id: i64, ttl: i64, t0: u64, t1: u64) -> Op {
    op(
        i,
        0,
        "keepalive",
        json!({"lease": id}),
        json!({"ttl": ttl}),
        Outcome::Ok,
        t0,
        t1,
    )
}

fn lput(i: u64, id: i64, n: u32, outcome: Outcome, t0: u64, t1: u64) -> Op {
    op(
        i,
        0,
        "put",
        json!({"key": lkey(id, n), "lease": id}),
        json!({}),
        outcome,
        t0,
        t1,
    )
}

fn lread(i: u64, node: usize, keys: &[String], fin: bool, t0: u64, t1: u64) -> Op {
    op(
        i,
        node,
        "read",
        if fin {
            json!({"final": true})
        } else {
            json!({})
        },
        json!({"keys": keys}),
        Outcome::Ok,
        t0,
        t1,
    )
}

fn revoke(i: u64, id: i64, t0: u64, t1: u64) -> Op {
    op(
        i,
        0,
        "revoke",
        json!({"lease": id}),
        json!({}),
        Outcome::Ok,
        t0,
        t1,
    )
}

/// L1 granted with TTL 2 at 0 ms and kept alive at 1000 ms (alive until 3000 ms), then left to
/// lapse; L2 revoked at 1500 ms.
fn lease_history() -> Vec<Op> {
    vec![
        grant(0, L1, 2, 0, 10),
        grant(1, L2, 2, 0, 10),
        lput(2, L1, 1, Outcome::Ok, 20, 30),
        lput(3, L2, 1, Outcome::Ok, 20, 30),
        keepalive(4, L1, 2, 1000, 1010),
        lread(5, 1, &[lkey(L1, 1), lkey(L2, 1)], false, 1100, 1110),
        revoke(6, L2, 1500, 1510),
        lread(7, 1, &[lkey(L1, 1)], false, 1600, 1610),
        lread(8, 2, &[], false, 3600, 3610),
        lread(9, 0, &[], true, 9000, 9010),
        lread(10, 1, &[], true, 9000, 9010),
    ]
}

#[test]
fn lease_checker_accepts_a_correct_history() {
    let r = checker::lease::check(&lease_history(), &[]);
    assert_eq!(r.valid, Valid::True, "{:?}", r.summary);
}

#[test]
fn lease_checker_detects_early_expiry_and_late_keys() {
    // L1's key gone at 2500 ms although the keep-alive at 1000 ms proves it alive until 3000.
    let mut early = lease_history();
    early[8] = lread(8, 2, &[], false, 2400, 2500);
    let r = checker::lease::check(&early, &[]);
    assert!(has(&r, "early-expiry"), "{:?}", r.summary);
    // The same during a clock-skew window is reported but explained.
    let skew = FaultWindow {
        kind: "clock".into(),
        description: "clock skew n1 +10s".into(),
        nodes: vec![0],
        start: 2000 * MS,
        end: 2300 * MS,
    };
    assert_eq!(
        checker::lease::check(&early, std::slice::from_ref(&skew)).valid,
        Valid::True
    );
    // A keep-alive saying "no such lease" before the proven lifetime ended.
    let mut gone = lease_history();
    gone.push(keepalive(11, L1, 0, 2000, 2010));
    assert!(has(&checker::lease::check(&gone, &[]), "early-expiry"));
    // A revoked lease's key still visible.
    let mut visible = lease_history();
    visible[7] = lread(7, 1, &[lkey(L1, 1), lkey(L2, 1)], false, 1600, 1610);
    assert!(has(
        &checker::lease::check(&visible, &[]),
        "revoked-key-visible"
    ));
    // Keys of leases that ran out must be gone after the final wait.
    let mut late = lease_history();
    late[9] = lread(9, 0, &[lkey(L1, 1)], true, 9000, 9010);
    let r = checker::lease::check(&late, &[]);
    assert!(has(&r, "not-expired"));
    assert!(has(&r, "key-reappeared"));
    assert!(has(&r, "divergent-final"));
}

#[test]
fn lease_checker_detects_renewals_and_attachments_after_the_end() {
    let mut renew = lease_history();
    renew.push(keepalive(11, L2, 2, 2000, 2010));
    assert!(has(
        &checker::lease::check(&renew, &[]),
        "keepalive-after-revoke"
    ));
    // L1 observed gone at 3610 ms, then a put on it acknowledged.
    let mut attach = lease_history();
    attach.push(lput(11, L1, 2, Outcome::Ok, 4000, 4010));
    assert!(has(
        &checker::lease::check(&attach, &[]),
        "attach-after-expiry"
    ));
    let mut phantom = lease_history();
    phantom[7] = lread(7, 1, &[lkey(L1, 1), lkey(L1, 9)], false, 1600, 1610);
    assert!(has(&checker::lease::check(&phantom, &[]), "phantom-key"));
    let mut leases = lease_history();
    leases.push(op(
        11,
        0,
        "leases",
        json!({"final": true}),
        json!({"leases": [L1]}),
        Outcome::Ok,
        9000,
        9010,
    ));
    assert!(has(
        &checker::lease::check(&leases, &[]),
        "lease-not-expired"
    ));
}

// --- lock ----------------------------------------------------------------------------------

fn acquire(i: u64, lease: i64, hold: u64, token: i64, t0: u64, t1: u64) -> Op {
    op(
        i,
        0,
        "acquire",
        json!({"lock": "k/0", "lease": lease, "hold": hold}),
        json!({"key": format!("k/0/{lease:x}"), "token": token}),
        Outcome::Ok,
        t0,
        t1,
    )
}

fn unlock(i: u64, hold: u64, t0: u64, t1: u64) -> Op {
    op(
        i,
        0,
        "unlock",
        json!({"lock": "k/0", "hold": hold}),
        json!({}),
        Outcome::Ok,
        t0,
        t1,
    )
}

fn fenced(i: u64, hold: u64, token: i64, outcome: Outcome, t0: u64, t1: u64) -> Op {
    op(
        i,
        0,
        "write",
        json!({"lock": "k/0", "token": token, "hold": hold, "stalled": false}),
        json!({}),
        outcome,
        t0,
        t1,
    )
}

fn fences(i: u64, fence: i64) -> Op {
    op(
        i,
        0,
        "fences",
        json!({"final": true}),
        json!({"fences": {"f/0": fence}}),
        Outcome::Ok,
        9000,
        9010,
    )
}

/// Two sessions (leases 1 and 2, TTL 3 s) take the lock in turn.
fn lock_history() -> Vec<Op> {
    vec![
        grant(0, 1, 3, 0, 10),
        grant(1, 2, 3, 0, 10),
        acquire(2, 1, 1, 5, 20, 30),
        fenced(3, 1, 5, Outcome::Ok, 40, 50),
        unlock(4, 1, 60, 70),
        acquire(5, 2, 2, 9, 25, 80),
        fenced(6, 2, 9, Outcome::Ok, 90, 100),
        unlock(7, 2, 110, 120),
        fences(8, 9),
    ]
}

#[test]
fn lock_checker_accepts_a_correct_history() {
    let r = checker::lock::check(&lock_history(), &[]);
    assert_eq!(r.valid, Valid::True, "{:?}", r.summary);
}

#[test]
fn lock_checker_reports_overlaps_and_token_order() {
    // Session 2 acquires at 80 ms while session 1 (lease alive until 3000 ms) still holds.
    let mut overlap = lock_history();
    overlap[4] = unlock(4, 1, 200, 210);
    let r = checker::lock::check(&overlap, &[]);
    assert!(has(&r, "unexplained-overlap"), "{:?}", r.summary);
    // Explained when session 1's lease could have run out (acquired after 3000 ms).
    let mut expired = vec![
        grant(0, 1, 3, 0, 10),
        grant(1, 2, 3, 0, 10),
        acquire(2, 1, 1, 5, 20, 30),
        acquire(3, 2, 2, 9, 25, 3500),
        unlock(4, 1, 4000, 4010),
        fenced(5, 1, 5, Outcome::Fail, 3900, 3910),
        unlock(6, 2, 3600, 3610),
        fences(7, 0),
    ];
    let r = checker::lock::check(&expired, &[]);
    assert_eq!(r.valid, Valid::True, "{:?}", r.summary);
    assert!(r.summary.iter().any(|s| s.contains("running out: 1")));
    // ... but the stale holder's fenced write must have been refused.
    expired[5] = fenced(5, 1, 5, Outcome::Ok, 3900, 3910);
    let r = checker::lock::check(&expired, &[]);
    assert!(has(&r, "stale-fenced-write"), "{:?}", r.summary);
    // Tokens must grow in acquisition order, and never repeat.
    let mut order = lock_history();
    order[5] = acquire(5, 2, 2, 3, 75, 80);
    order[6] = fenced(6, 2, 3, Outcome::Fail, 90, 100);
    order[8] = fences(8, 5);
    assert!(has(&checker::lock::check(&order, &[]), "token-order"));
    let mut dup = lock_history();
    dup[5] = acquire(5, 2, 2, 5, 75, 80);
    dup[6] = fenced(6, 2, 5, Outcome::Ok, 90, 100);
    dup[8] = fences(8, 5);
    assert!(has(&checker::lock::check(&dup, &[]), "duplicate-token"));
    // Fenced writes never go backwards, and the last one is not lost.
    let mut regress = lock_history();
    regress[3] = fenced(3, 1, 5, Outcome::Ok, 105, 108);
    assert!(has(
        &checker::lock::check(&regress, &[]),
        "fence-regression"
    ));
    let mut lost = lock_history();
    lost[8] = fences(8, 5);
    assert!(has(&checker::lock::check(&lost, &[]), "lost-fence-write"));
}
