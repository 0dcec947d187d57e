//! Checkers for the register workload.
//!
//! 1. **Version chain** (fast, O(n log n), after Gibbons–Korach / fast-jepsen): every version of a
//!    key has a unique `mod_revision`, and Put/Txn with `prev_kv` names the version it overwrote.
//!    Checked per key: one value per revision and one revision per value (no double apply), every
//!    value read was written by some attempted write (no phantom) that did not definitely fail
//!    (no aborted read), every version has at most one successor (no lost update / fork), and in
//!    real time no operation observes a version older than one already known when it was invoked
//!    (no stale read). Across keys: the header revision never goes back in real time and no two
//!    acknowledged writes share a revision.
//! 2. **Linearizability** per key with the Wing–Gong–Lowe search of [`crate::linearizable`]
//!    (compare-and-set register; timed-out writes are indeterminate). Values are unique per key, so
//!    a CAS on `mod_revision` is a CAS on the value that version holds.

use std::collections::{BTreeMap, HashMap};

use crate::history::{Op as RegOp, Operation};
use crate::linearizable::{Verdict, check as wgl};
use crate::record::{CheckResult, Op, Outcome, Valid};

#[derive(Debug, Clone)]
enum Kind {
    Read { value: Option<i64>, mod_rev: i64 },
    Write { value: i64 },
    Cas { from: i64, to: i64 },
}

#[derive(Debug, Clone)]
struct R<'a> {
    op: &'a Op,
    key: String,
    kind: Kind,
    /// Header revision (ok operations).
    rev: Option<i64>,
    /// Overwritten version for ok writes: (value, mod_rev).
    prev: Option<(Option<i64>, i64)>,
}

impl R<'_> {
    /// The value this operation installs.
    fn installs(&self) -> Option<i64> {
        match self.kind {
            Kind::Write { value } => Some(value),
            Kind::Cas { to, .. } => Some(to),
            Kind::Read { .. } => None,
        }
    }
    /// The version (mod_revision) this ok operation observed or created, whichever is later.
    fn known_after(&self) -> i64 {
        match self.kind {
            Kind::Read { mod_rev, .. } => mod_rev,
            _ => self.rev.unwrap_or(0),
        }
    }
    /// The version this ok operation saw as current when it took effect.
    fn observed(&self) -> i64 {
        match self.kind {
            Kind::Read { mod_rev, .. } => mod_rev,
            _ => self.prev.map(|p| p.1).unwrap_or(0),
        }
    }
}

fn parse(op: &Op) -> Option<R<'_>> {
    let key = op.key()?.to_string();
    let v = &op.value;
    let kind = match op.f.as_str() {
        "read" => Kind::Read {
            value: op.result["value"].as_i64(),
            mod_rev: op.result["mod_rev"].as_i64().unwrap_or(0),
        },
        "write" => Kind::Write {
            value: v["value"].as_i64()?,
        },
        "cas" => Kind::Cas {
            from: v["from"].as_i64()?,
            to: v["to"].as_i64()?,
        },
        _ => return None,
    };
    let ok = op.outcome == Outcome::Ok;
    let prev = if ok && op.f != "read" {
        op.result
            .get("prev")
            .filter(|p| !p.is_null())
            .map(|p| (p["value"].as_i64(), p["mod_rev"].as_i64().unwrap_or(0)))
    } else {
        None
    };
    Some(R {
        op,
        key,
        kind,
        rev: if ok { op.result["rev"].as_i64() } else { None },
        prev,
    })
}

/// Operations of `key` overlapping the window around `center` (for a small failing sub-history).
fn around<'a>(ops: &[&'a Op], key: &str, lo: u64, hi: u64) -> Vec<&'a Op> {
    let mut v: Vec<&Op> = ops
        .iter()
        .copied()
        .filter(|o| o.key() == Some(key))
        .filter(|o| o.invoke <= hi && o.complete >= lo)
        .collect();
    v.sort_by_key(|o| o.invoke);
    if v.len() > 24 {
        // Keep the ones closest to the middle of the window.
        let mid = lo / 2 + hi.min(lo.saturating_add(10_000_000_000)) / 2;
        v.sort_by_key(|o| o.invoke.abs_diff(mid));
        v.truncate(24);
        v.sort_by_key(|o| o.invoke);
    }
    v
}

/// Real-time sweep: for each op (in invocation order), the largest `known` value among ops that
/// completed before it was invoked, and the op that supplied it.
fn realtime_floor<'a, T: Copy>(
    items: &[(u64, u64, T, &'a Op)],
    mut greater: impl FnMut(T, T) -> bool,
) -> Vec<Option<(T, &'a Op)>> {
    // items: (invoke, complete, known, op)
    let mut by_complete: Vec<usize> = (0..items.len()).collect();
    by_complete.sort_by_key(|&i| items[i].1);
    let mut by_invoke: Vec<usize> = (0..items.len()).collect();
    by_invoke.sort_by_key(|&i| items[i].0);
    let mut out = vec![None; items.len()];
    let mut best: Option<(T, &Op)> = None;
    let mut j = 0;
    for &i in &by_invoke {
        while j < by_complete.len() && items[by_complete[j]].1 < items[i].0 {
            let c = &items[by_complete[j]];
            if best.is_none_or(|(b, _)| greater(c.2, b)) {
                best = Some((c.2, c.3));
            }
            j += 1;
        }
        out[i] = best;
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn note_version<'a>(
    res: &mut CheckResult,
    rev_value: &mut BTreeMap<i64, (Option<i64>, &'a Op)>,
    value_rev: &mut HashMap<i64, (i64, &'a Op)>,
    key: &str,
    rev: i64,
    value: Option<i64>,
    src: &'a Op,
) {
    if rev == 0 {
        return;
    }
    match rev_value.get(&rev) {
        Some((v, other)) if *v != value => res.anomaly(
            "revision-conflict",
            format!(
                "key {key}: mod_revision {rev} holds value {v:?} (op #{}) and {value:?} (op #{})",
                other.index, src.index
            ),
            &[other, src],
        ),
        Some(_) => {}
        None => {
            rev_value.insert(rev, (value, src));
        }
    }
    if let Some(v) = value {
        match value_rev.get(&v) {
                    Some((r, other)) if *r != rev => res.anomaly(
                        "duplicate-write",
                        format!(
                            "key {key}: value {v} appears at mod_revisions {r} (op #{}) and {rev} (op #{}): one write applied twice?",
                            other.index, src.index
                        ),
                        &[other, src],
                    ),
                    Some(_) => {}
                    None => {
                        value_rev.insert(v, (rev, src));
                    }
                }
    }
}

pub fn check_chain<'a>(ops: &'a [Op]) -> CheckResult {
    let mut res = CheckResult::new("version-chain");
    let parsed: Vec<R> = ops.iter().filter_map(parse).collect();
    let all: Vec<&Op> = parsed.iter().map(|r| r.op).collect();
    let mut by_key: BTreeMap<&str, Vec<&R>> = BTreeMap::new();
    for r in &parsed {
        by_key.entry(r.key.as_str()).or_default().push(r);
    }
    let mut keys_checked = 0;
    for (key, rs) in &by_key {
        keys_checked += 1;
        // Writers by installed value.
        let mut writers: HashMap<i64, Vec<&R>> = HashMap::new();
        for r in rs {
            if let Some(v) = r.installs() {
                writers.entry(v).or_default().push(r);
            }
        }
        // Versions: mod_rev -> (value, source op); value -> mod_rev.
        let mut rev_value: BTreeMap<i64, (Option<i64>, &Op)> = BTreeMap::new();
        let mut value_rev: HashMap<i64, (i64, &Op)> = HashMap::new();
        let mut note = |res: &mut CheckResult, rev: i64, value: Option<i64>, src: &'a Op| {
            note_version(res, &mut rev_value, &mut value_rev, key, rev, value, src)
        };
        for r in rs {
            if r.op.outcome != Outcome::Ok {
                continue;
            }
            match r.kind {
                Kind::Read { value, mod_rev } => note(&mut res, mod_rev, value, r.op),
                _ => {
                    if let Some(rev) = r.rev {
                        note(&mut res, rev, r.installs(), r.op);
                    }
                    if let Some((pv, pm)) = r.prev {
                        note(&mut res, pm, pv, r.op);
                    }
                }
            }
        }
        // Reads (and prev values) must come from attempted, not definitely failed, writes.
        for r in rs {
            if r.op.outcome != Outcome::Ok {
                continue;
            }
            let seen = match r.kind {
                Kind::Read { value, .. } => value,
                _ => r.prev.and_then(|p| p.0),
            };
            let Some(v) = seen else { continue };
            match writers.get(&v) {
                None => res.anomaly(
                    "phantom-read",
                    format!(
                        "key {key}: op #{} observed value {v}, which nobody wrote",
                        r.op.index
                    ),
                    &[r.op],
                ),
                Some(ws) if ws.iter().all(|w| w.op.outcome == Outcome::Fail) => res.anomaly(
                    "aborted-read",
                    format!(
                        "key {key}: op #{} observed value {v}, written only by failed op #{}",
                        r.op.index, ws[0].op.index
                    ),
                    &[ws[0].op, r.op],
                ),
                _ => {}
            }
        }
        // Nothing observes a value before its write was even invoked.
        for ((k, v), (t, observer)) in
            first_observed(&rs.iter().map(|r| (*r).clone()).collect::<Vec<_>>())
        {
            if k != *key {
                continue;
            }
            if let Some(ws) = writers.get(&v)
                && let Some(w) = ws.iter().min_by_key(|w| w.op.invoke)
                && t < w.op.invoke
            {
                res.anomaly(
                    "future-read",
                    format!(
                        "key {key}: op #{} observed value {v} before its write #{} was invoked",
                        observer.index, w.op.index
                    ),
                    &[observer, w.op],
                );
            }
        }
        // Each version has at most one successor.
        let mut successor: HashMap<i64, &R> = HashMap::new();
        for r in rs {
            if r.op.outcome != Outcome::Ok || matches!(r.kind, Kind::Read { .. }) {
                continue;
            }
            let Some((_, pm)) = r.prev else { continue };
            if let Some(other) = successor.get(&pm) {
                if other.rev != r.rev {
                    res.anomaly(
                        "lost-update",
                        format!(
                            "key {key}: ops #{} and #{} both overwrote the version at mod_revision {pm}",
                            other.op.index, r.op.index
                        ),
                        &[other.op, r.op],
                    );
                }
            } else {
                successor.insert(pm, r);
            }
        }
        // Real time: nothing observes a version older than one known at invocation.
        let oks: Vec<&R> = rs
            .iter()
            .copied()
            .filter(|r| r.op.outcome == Outcome::Ok)
            .collect();
        let items: Vec<(u64, u64, i64, &Op)> = oks
            .iter()
            .map(|r| (r.op.invoke, r.op.complete, r.known_after(), r.op))
            .collect();
        let floors = realtime_floor(&items, |a, b| a > b);
        for (r, floor) in oks.iter().zip(floors) {
            let Some((f, src)) = floor else { continue };
            if r.observed() < f {
                let what = if matches!(r.kind, Kind::Read { .. }) {
                    "stale-read"
                } else {
                    "stale-write"
                };
                let ctx = around(&all, key, src.invoke, r.op.complete);
                res.anomaly(
                    what,
                    format!(
                        "key {key}: op #{} (invoked at {:.3}s) observed mod_revision {} but op #{} had already established mod_revision {f} (completed at {:.3}s)",
                        r.op.index,
                        r.op.invoke as f64 / 1e9,
                        r.observed(),
                        src.index,
                        src.complete as f64 / 1e9
                    ),
                    &ctx,
                );
            }
        }
    }
    // Global revision: never backwards in real time; unique per acknowledged write.
    let oks: Vec<&R> = parsed
        .iter()
        .filter(|r| r.op.outcome == Outcome::Ok && r.rev.is_some())
        .collect();
    let items: Vec<(u64, u64, i64, &Op)> = oks
        .iter()
        .map(|r| (r.op.invoke, r.op.complete, r.rev.unwrap_or(0), r.op))
        .collect();
    let floors = realtime_floor(&items, |a, b| a > b);
    for (r, floor) in oks.iter().zip(floors) {
        if let Some((f, src)) = floor
            && r.rev.unwrap_or(0) < f
        {
            res.anomaly(
                    "revision-regression",
                    format!(
                        "op #{} on n{} answered at header revision {} after op #{} had completed at revision {f}",
                        r.op.index,
                        r.op.node + 1,
                        r.rev.unwrap_or(0),
                        src.index
                    ),
                    &[src, r.op],
                );
        }
    }
    let mut write_revs: HashMap<i64, &Op> = HashMap::new();
    for r in &oks {
        if matches!(r.kind, Kind::Read { .. }) {
            continue;
        }
        let rev = r.rev.unwrap_or(0);
        if let Some(other) = write_revs.insert(rev, r.op) {
            res.anomaly(
                "duplicate-revision",
                format!(
                    "acknowledged writes #{} and #{} both got revision {rev}",
                    other.index, r.op.index
                ),
                &[other, r.op],
            );
        }
    }
    res.summary.insert(
        0,
        format!(
            "{keys_checked} keys, {} ok operations checked",
            parsed
                .iter()
                .filter(|r| r.op.outcome == Outcome::Ok)
                .count()
        ),
    );
    res
}

/// For every (key, value): the earliest completion of an acknowledged operation that observed
/// the value (a read returning it, a write or cas overwriting it, a cas comparing against it).
fn first_observed<'a>(parsed: &[R<'a>]) -> HashMap<(&'a str, i64), (u64, &'a Op)> {
    let mut seen: HashMap<(&str, i64), (u64, &Op)> = HashMap::new();
    for r in parsed.iter().filter(|r| r.op.outcome == Outcome::Ok) {
        let mut vals = Vec::new();
        match r.kind {
            Kind::Read { value: Some(v), .. } => vals.push(v),
            Kind::Cas { from, .. } => vals.push(from),
            _ => {}
        }
        if let Some((Some(v), _)) = r.prev {
            vals.push(v);
        }
        for v in vals {
            let key = r.op.key().unwrap_or("");
            let e = seen.entry((key, v)).or_insert((r.op.complete, r.op));
            if r.op.complete < e.0 {
                *e = (r.op.complete, r.op);
            }
        }
    }
    seen
}

/// Converts the register operations to the WGL checker's model.
///
/// Indeterminate writes are resolved first (etcd's robustness tests "patch" histories the same
/// way): values are unique, so an indeterminate write or cas whose value nobody ever observed
/// (no read, no overwriting write's prev_kv, no cas compare, not the final reads) can be dropped
/// (had it taken effect, no operation depended on it), and one whose value was observed certainly
/// took effect before the first observer returned, which becomes its completion.
pub fn to_wgl(ops: &[Op]) -> Vec<Operation> {
    let parsed: Vec<R> = ops.iter().filter_map(parse).collect();
    let seen = first_observed(&parsed);
    parsed
        .iter()
        .filter_map(|r| {
            let mut outcome = r.op.outcome;
            let mut complete = r.op.effective_complete();
            if outcome == Outcome::Info
                && let Some(v) = r.installs()
            {
                let (t, _) = seen.get(&(r.key.as_str(), v))?;
                outcome = Outcome::Ok;
                complete = (*t).max(r.op.invoke + 1);
            }
            Some(Operation {
                process: r.op.index, // unique per operation; the search does not need processes
                key: r.key.clone(),
                op: match r.kind {
                    Kind::Read { value, .. } => RegOp::Read { value },
                    Kind::Write { value } => RegOp::Write { value },
                    Kind::Cas { from, to } => RegOp::Cas { from, to },
                },
                outcome,
                invoke: r.op.invoke,
                complete,
            })
        })
        .collect()
}

pub fn check_linearizable(ops: &[Op], max_steps: u64) -> CheckResult {
    let mut res = CheckResult::new("linearizable");
    let wops = to_wgl(ops);
    let keys: std::collections::BTreeSet<&str> = wops.iter().map(|o| o.key.as_str()).collect();
    let by_index: HashMap<u64, &Op> = ops.iter().map(|o| (o.index, o)).collect();
    let infos = ops
        .iter()
        .filter(|o| o.outcome == Outcome::Info && matches!(o.f.as_str(), "write" | "cas"))
        .count();
    let resolved_infos = wops
        .iter()
        .filter(|o| {
            o.outcome == Outcome::Ok
                && by_index
                    .get(&o.process)
                    .is_some_and(|x| x.outcome == Outcome::Info)
        })
        .count();
    match wgl(&wops, max_steps) {
        Verdict::Linearizable => {}
        Verdict::Unknown => {
            res.valid = Valid::Unknown;
            res.summary.push(format!(
                "search budget ({max_steps} steps per key) exhausted"
            ));
        }
        Verdict::Violation {
            key,
            stuck_at,
            linearized,
        } => {
            let all: Vec<&Op> = ops.iter().collect();
            // The search got stuck right after the longest linearizable prefix: show the
            // key's operations around the last operation it could place.
            let last = linearized.last().and_then(|o| by_index.get(&o.process));
            let (lo, hi) = match last {
                Some(l) => (
                    l.invoke.saturating_sub(500_000_000),
                    l.complete.saturating_add(1_000_000_000),
                ),
                None => (0, u64::MAX),
            };
            let window = around(&all, &key, lo, hi);
            let msg = match (&stuck_at, last) {
                (Some(s), Some(l)) => format!(
                    "key {key}: no linearization; the longest linearizable prefix has {} operations, ending with #{} (the search finally backtracked to op #{})",
                    linearized.len(),
                    l.index,
                    s.process
                ),
                _ => format!("key {key}: no linearization"),
            };
            res.anomaly("nonlinearizable", msg, &window);
        }
    }
    res.summary.insert(
        0,
        format!(
            "{} keys, {} operations searched; {infos} indeterminate writes: {resolved_infos} observed (so they took effect before their first observer returned), {} never observed (dropped)",
            keys.len(),
            wops.len(),
            infos - resolved_infos
        ),
    );
    res
}

pub fn check(ops: &[Op], max_steps: u64) -> Vec<CheckResult> {
    vec![check_chain(ops), check_linearizable(ops, max_steps)]
}
