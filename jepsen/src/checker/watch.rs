//! The watch checker: etcd's watch guarantees, against the final history of writes.
//!
//! The *final history* is a watch from revision 1 on each member after healing, up to the
//! tombstone; all members' final histories must be identical (`divergent-history`). It is then
//! checked on its own (revisions ordered, versions / create revisions / prev_kv consistent with a
//! replay: `inconsistent-history`) and against the clients' writes: every acknowledged write is in
//! it at its revision with exactly its keys (`lost-write`, `non-atomic-write`), and every event in
//! it comes from a write that was attempted and did not definitely fail (`phantom-event`,
//! `aborted-write-visible`).
//!
//! Every watch session is then compared with the final history:
//! - ordered: revisions never go back and (revision, key) never repeats (`unordered`,
//!   `duplicate-event`, also across the sessions of one watcher);
//! - atomic: all events of a revision arrive in one response (`split-revision`);
//! - correct: each event equals the final history's event, prev_kv included (`wrong-event`,
//!   `bad-prev-kv`);
//! - reliable + resumable + bookmarkable: a session that started at revision s and saw events or
//!   progress notifications up to revision e received *every* event of the final history in
//!   [s, e] (`gap`); events not in the final history are `phantom-event`;
//! - every watcher caught up to the tombstone after healing (`not-converged`).

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;

use crate::record::{CheckResult, Op, Outcome, Valid};

#[derive(Debug, Clone, PartialEq)]
struct Ev {
    typ: String,
    key: String,
    value: String,
    create: i64,
    rev: i64,
    version: i64,
    /// (value, mod_rev) of prev_kv.
    prev: Option<(String, i64)>,
}

impl Ev {
    fn show(&self) -> String {
        format!(
            "{}@{} {}={} (v{}, created {}, prev {:?})",
            self.typ, self.rev, self.key, self.value, self.version, self.create, self.prev
        )
    }
}

fn parse_ev(e: &Value) -> Option<Ev> {
    Some(Ev {
        typ: e[0].as_str()?.to_string(),
        key: e[1].as_str()?.to_string(),
        value: e[2].as_str()?.to_string(),
        create: e[3].as_i64()?,
        rev: e[4].as_i64()?,
        version: e[5].as_i64()?,
        prev: e[6].as_array().map(|p| {
            (
                p[1].as_str().unwrap_or("").to_string(),
                p[3].as_i64().unwrap_or(0),
            )
        }),
    })
}

struct Session<'a> {
    op: &'a Op,
    start: i64,
    /// (response index, event).
    events: Vec<(usize, Ev)>,
    /// Highest progress-notification revision.
    progress: i64,
}

fn parse_session(op: &Op) -> Session<'_> {
    let mut s = Session {
        op,
        start: op.value["start_rev"].as_i64().unwrap_or(1),
        events: vec![],
        progress: 0,
    };
    if let Some(rs) = op.result["responses"].as_array() {
        for (i, r) in rs.iter().enumerate() {
            let evs = r["events"].as_array().cloned().unwrap_or_default();
            if evs.is_empty() && r["created"] != true && r["canceled"] != true {
                s.progress = s.progress.max(r["rev"].as_i64().unwrap_or(0));
            }
            for e in &evs {
                if let Some(ev) = parse_ev(e) {
                    s.events.push((i, ev));
                }
            }
        }
    }
    s
}

pub fn check(ops: &[Op]) -> CheckResult {
    let mut res = CheckResult::new("watch");
    let sessions: Vec<Session> = ops
        .iter()
        .filter(|o| o.f == "watch" && o.outcome == Outcome::Ok)
        .map(parse_session)
        .collect();
    let tomb = ops
        .iter()
        .filter(|o| o.f == "put" && o.value["final"] == true && o.outcome == Outcome::Ok)
        .filter_map(|o| o.result["rev"].as_i64())
        .max();
    let Some(tomb) = tomb else {
        res.valid = Valid::Unknown;
        res.summary
            .push("no tombstone write succeeded: nothing to compare with".into());
        return res;
    };
    let finals: Vec<&Session> = sessions
        .iter()
        .filter(|s| s.op.value["final"] == true)
        .filter(|s| s.events.last().is_some_and(|(_, e)| e.rev >= tomb))
        .collect();
    let Some(canon_s) = finals.first() else {
        res.valid = Valid::Unknown;
        res.summary
            .push("no final watch reached the tombstone".into());
        return res;
    };
    let canon: Vec<Ev> = canon_s
        .events
        .iter()
        .map(|(_, e)| e.clone())
        .filter(|e| e.rev <= tomb)
        .collect();
    for f in finals.iter().skip(1) {
        let other: Vec<&Ev> = f
            .events
            .iter()
            .map(|(_, e)| e)
            .filter(|e| e.rev <= tomb)
            .collect();
        if let Some(i) =
            (0..canon.len().max(other.len())).find(|&i| canon.get(i) != other.get(i).copied())
        {
            res.anomaly(
                "divergent-history",
                format!(
                    "final histories of n{} and n{} differ at event {i}: {:?} vs {:?}",
                    canon_s.op.node + 1,
                    f.op.node + 1,
                    canon.get(i).map(Ev::show),
                    other.get(i).map(|e| e.show())
                ),
                &[canon_s.op, f.op],
            );
        }
    }
    // The final history on its own: replay.
    let mut state: HashMap<&str, (String, i64, i64, i64)> = HashMap::new(); // value, create, mod, version
    let mut last_rev = 0;
    for e in &canon {
        let prior = state.get(e.key.as_str()).cloned();
        let mut problems = Vec::new();
        if e.rev < last_rev {
            problems.push(format!("revision {} after {last_rev}", e.rev));
        }
        last_rev = e.rev;
        if e.prev.as_ref().map(|p| (&p.0, p.1)) != prior.as_ref().map(|p| (&p.0, p.2)) {
            problems.push(format!(
                "prev_kv {:?} but the replay has {:?}",
                e.prev,
                prior.as_ref().map(|p| (&p.0, p.2))
            ));
        }
        match e.typ.as_str() {
            "PUT" => {
                let (ver, create) = match &prior {
                    Some(p) => (p.3 + 1, p.1),
                    None => (1, e.rev),
                };
                if e.version != ver || e.create != create {
                    problems.push(format!(
                        "version {} / create {} but the replay expects {ver} / {create}",
                        e.version, e.create
                    ));
                }
                state.insert(&e.key, (e.value.clone(), e.create, e.rev, e.version));
            }
            _ => {
                if prior.is_none() {
                    problems.push("delete of an absent key".into());
                }
                state.remove(e.key.as_str());
            }
        }
        if !problems.is_empty() {
            res.anomaly(
                "inconsistent-history",
                format!("final history event {}: {}", e.show(), problems.join("; ")),
                &[canon_s.op],
            );
        }
    }
    let mut by_rev: BTreeMap<i64, Vec<&Ev>> = BTreeMap::new();
    for e in &canon {
        by_rev.entry(e.rev).or_default().push(e);
    }
    // Against the writes.
    let mut writer_of_value: HashMap<String, &Op> = HashMap::new();
    let mut deletes: HashMap<(String, i64), &Op> = HashMap::new();
    let mut info_deletes: HashMap<&str, usize> = HashMap::new();
    let mut lost = 0;
    for o in ops {
        let expected: Vec<(String, String, String)> = match o.f.as_str() {
            "put" => vec![(
                "PUT".into(),
                o.value["key"].as_str().unwrap_or("").into(),
                o.value["value"].as_str().unwrap_or("").into(),
            )],
            "txn" => o.value["puts"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|p| {
                            (
                                "PUT".to_string(),
                                p[0].as_str().unwrap_or("").to_string(),
                                p[1].as_str().unwrap_or("").to_string(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default(),
            "delete" => {
                let k = o.value["key"].as_str().unwrap_or("");
                match o.outcome {
                    Outcome::Ok if o.result["deleted"].as_i64().unwrap_or(0) > 0 => {
                        let rev = o.result["rev"].as_i64().unwrap_or(0);
                        deletes.insert((k.to_string(), rev), o);
                        vec![("DELETE".into(), k.into(), String::new())]
                    }
                    Outcome::Info => {
                        *info_deletes.entry(k).or_default() += 1;
                        vec![]
                    }
                    _ => vec![],
                }
            }
            _ => continue,
        };
        for (t, _, v) in &expected {
            if t == "PUT" {
                writer_of_value.insert(v.clone(), o);
            }
        }
        if o.outcome != Outcome::Ok || expected.is_empty() {
            continue;
        }
        let Some(rev) = o.result["rev"].as_i64() else {
            continue;
        };
        if rev > tomb {
            continue;
        }
        let mut got: Vec<(String, String, String)> = by_rev
            .get(&rev)
            .map(|v| {
                v.iter()
                    .map(|e| {
                        (
                            e.typ.clone(),
                            e.key.clone(),
                            if e.typ == "PUT" {
                                e.value.clone()
                            } else {
                                String::new()
                            },
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut want = expected.clone();
        got.sort();
        want.sort();
        if got != want {
            let name = if got.is_empty() {
                lost += 1;
                "lost-write"
            } else {
                "non-atomic-write"
            };
            res.anomaly(
                name,
                format!(
                    "acknowledged write #{} at revision {rev} expected {want:?}, the final history has {got:?}",
                    o.index
                ),
                &[o, canon_s.op],
            );
        }
    }
    for e in &canon {
        if e.typ == "PUT" {
            match writer_of_value.get(&e.value) {
                None => res.anomaly(
                    "phantom-event",
                    format!("final history has {} which nobody wrote", e.show()),
                    &[canon_s.op],
                ),
                Some(w) if w.outcome == Outcome::Fail => res.anomaly(
                    "aborted-write-visible",
                    format!(
                        "final history has {} from write #{}, which failed",
                        e.show(),
                        w.index
                    ),
                    &[w, canon_s.op],
                ),
                _ => {}
            }
        } else if !deletes.contains_key(&(e.key.clone(), e.rev))
            && !info_deletes.contains_key(e.key.as_str())
        {
            res.anomaly(
                "phantom-event",
                format!(
                    "final history has {} matching no acknowledged or indeterminate delete",
                    e.show()
                ),
                &[canon_s.op],
            );
        }
    }
    // Sessions.
    let canon_at: HashMap<(i64, &str), &Ev> =
        canon.iter().map(|e| ((e.rev, e.key.as_str()), e)).collect();
    let mut seen_by_watcher: HashMap<i64, HashMap<(i64, String), u64>> = HashMap::new();
    let mut reach: HashMap<i64, i64> = HashMap::new();
    let mut checked_events = 0usize;
    for s in &sessions {
        let watcher = s.op.value["watcher"].as_i64();
        let mut last: Option<&Ev> = None;
        let mut resp_of_rev: HashMap<i64, usize> = HashMap::new();
        let mut mine: HashMap<(i64, &str), ()> = HashMap::new();
        for (ri, e) in &s.events {
            checked_events += 1;
            if let Some(l) = last
                && (e.rev < l.rev || (e.rev == l.rev && e.key == l.key))
            {
                res.anomaly(
                    if e.rev == l.rev {
                        "duplicate-event"
                    } else {
                        "unordered"
                    },
                    format!(
                        "watch session #{} on n{}: {} after {}",
                        s.op.index,
                        s.op.node + 1,
                        e.show(),
                        l.show()
                    ),
                    &[s.op],
                );
            }
            last = Some(e);
            if let Some(r0) = resp_of_rev.insert(e.rev, *ri)
                && r0 != *ri
            {
                res.anomaly(
                        "split-revision",
                        format!(
                            "watch session #{}: events of revision {} arrived in responses {r0} and {ri}",
                            s.op.index, e.rev
                        ),
                        &[s.op],
                    );
            }
            mine.insert((e.rev, e.key.as_str()), ());
            if let Some(w) = watcher
                && let Some(prev) = seen_by_watcher
                    .entry(w)
                    .or_default()
                    .insert((e.rev, e.key.clone()), s.op.index)
                && prev != s.op.index
            {
                res.anomaly(
                    "duplicate-event",
                    format!(
                        "watcher {w}: {} delivered in sessions #{prev} and #{}",
                        e.show(),
                        s.op.index
                    ),
                    &[s.op],
                );
            }
            if e.rev > tomb {
                continue;
            }
            match canon_at.get(&(e.rev, e.key.as_str())) {
                None => res.anomaly(
                    "phantom-event",
                    format!(
                        "watch session #{} on n{} got {}, absent from the final history",
                        s.op.index,
                        s.op.node + 1,
                        e.show()
                    ),
                    &[s.op],
                ),
                Some(c) if *c != e => {
                    let name = if c.prev != e.prev && c.value == e.value {
                        "bad-prev-kv"
                    } else {
                        "wrong-event"
                    };
                    res.anomaly(
                        name,
                        format!(
                            "watch session #{} on n{} got {}, the final history has {}",
                            s.op.index,
                            s.op.node + 1,
                            e.show(),
                            c.show()
                        ),
                        &[s.op],
                    )
                }
                _ => {}
            }
        }
        let covered = s
            .events
            .last()
            .map(|(_, e)| e.rev)
            .unwrap_or(0)
            .max(s.progress)
            .min(tomb);
        if let Some(w) = watcher {
            let r = reach.entry(w).or_insert(0);
            *r = (*r).max(covered);
        }
        // Reliable / resumable / bookmarkable.
        if covered >= s.start {
            for (rev, evs) in by_rev.range(s.start..=covered) {
                for e in evs {
                    if !mine.contains_key(&(*rev, e.key.as_str())) {
                        res.anomaly(
                            "gap",
                            format!(
                                "watch session #{} on n{} (from revision {}, covered up to {covered}) missed {}",
                                s.op.index,
                                s.op.node + 1,
                                s.start,
                                e.show()
                            ),
                            &[s.op],
                        );
                    }
                }
            }
        }
    }
    for (w, r) in &reach {
        if *r < tomb {
            res.anomaly(
                "not-converged",
                format!("watcher {w} reached revision {r}, not the tombstone {tomb}"),
                &[],
            );
        }
    }
    res.summary.insert(
        0,
        format!(
            "final history {} events up to revision {tomb}; {} sessions, {} events checked, {} watchers; {lost} acknowledged writes lost",
            canon.len(),
            sessions.len(),
            checked_events,
            reach.len()
        ),
    );
    res
}
