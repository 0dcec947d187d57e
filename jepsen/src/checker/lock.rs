//! The lock checker: mutual exclusion (unless a lease really ran out), ordered fencing tokens,
//! and fenced writes that a stale holder cannot make.
//!
//! A *hold* runs from the acquire's completion to the invocation of its unlock (or of the
//! revoke ending its session): the client certainly believed it held the lock in between, and
//! the server-side ownership (from some point of the acquire to some point of the unlock)
//! contains that interval. Two holds of one lock that intersect are an *overlap*. An overlap
//! where the earlier holder A's lease is not provably alive when the later holder B finished
//! acquiring (`alive(A.lease) <= B.acquired`, see [`crate::checker::lease`] for the proven
//! lifetime) is explained by a lease expiry: reported (with whether A had stalled), not a
//! violation. Otherwise it is `unexplained-overlap`.
//!
//! Fencing tokens (the lock key's create revision): an acquire that completed before another
//! was invoked has the smaller token (`token-order`), and no two holds share one
//! (`duplicate-token`). Fenced writes: one that completed before another was invoked wrote a
//! token no larger (`fence-regression`); a write by a holder with token `t` invoked after an
//! acquire with a larger token had completed must have been refused (`stale-fenced-write`):
//! the newer holder got the lock only after the older key was gone, and the write compares that
//! key's create revision. After healing, every member's fence is the largest acknowledged
//! fenced token or a later attempted one (`lost-fence-write`, `phantom-fence`,
//! `divergent-final`).

use std::collections::BTreeMap;

use crate::checker::clock_skew_between;
use crate::record::{CheckResult, FaultWindow, Op, Outcome, Valid};

const S: u64 = 1_000_000_000;

struct Hold<'a> {
    acquire: &'a Op,
    lease: i64,
    token: Option<i64>,
    /// Invocation of the unlock / revoke that ended it (u64::MAX: never ended).
    end: u64,
    stalled: bool,
}

pub fn check(ops: &[Op], faults: &[FaultWindow]) -> CheckResult {
    let mut res = CheckResult::new("lock");
    let mut skew_explained = 0usize;
    // Lease lifetimes.
    let mut alive: BTreeMap<i64, u64> = BTreeMap::new();
    for o in ops.iter().filter(|o| o.outcome == Outcome::Ok) {
        let (lease, ttl) = match o.f.as_str() {
            "grant" => (o.result["id"].as_i64(), o.result["ttl"].as_i64()),
            "keepalive" => (o.value["lease"].as_i64(), o.result["ttl"].as_i64()),
            _ => continue,
        };
        if let (Some(l), Some(t)) = (lease, ttl)
            && t > 0
        {
            let b = o.invoke + t as u64 * S;
            let e = alive.entry(l).or_insert(0);
            *e = (*e).max(b);
        }
    }
    // Holds.
    let mut ends: BTreeMap<u64, u64> = BTreeMap::new();
    let mut stalled: BTreeMap<u64, bool> = BTreeMap::new();
    for o in ops {
        let Some(h) = o.value["hold"].as_u64() else {
            continue;
        };
        if o.f == "unlock" || o.f == "revoke" {
            let e = ends.entry(h).or_insert(u64::MAX);
            *e = (*e).min(o.invoke);
        }
        if o.f == "write" && o.value["stalled"] == true {
            stalled.insert(h, true);
        }
    }
    let mut holds: BTreeMap<String, Vec<Hold>> = BTreeMap::new();
    for o in ops
        .iter()
        .filter(|o| o.f == "acquire" && o.outcome == Outcome::Ok)
    {
        let (Some(lock), Some(h), Some(lease)) = (
            o.value["lock"].as_str(),
            o.value["hold"].as_u64(),
            o.value["lease"].as_i64(),
        ) else {
            continue;
        };
        holds.entry(lock.to_string()).or_default().push(Hold {
            acquire: o,
            lease,
            token: o.result["token"].as_i64(),
            end: ends.get(&h).copied().unwrap_or(u64::MAX),
            stalled: stalled.get(&h).copied().unwrap_or(false),
        });
    }

    let mut explained = 0usize;
    let mut explained_stalled = 0usize;
    let mut examples = Vec::new();
    let mut n_holds = 0;
    for (lock, hs) in holds.iter_mut() {
        n_holds += hs.len();
        hs.sort_by_key(|h| h.acquire.complete);
        // Overlaps.
        for i in 0..hs.len() {
            let a = &hs[i];
            for b in hs.iter().skip(i + 1) {
                if b.acquire.complete >= a.end {
                    break;
                }
                let b_at = b.acquire.complete;
                let a_alive = alive.get(&a.lease).copied().unwrap_or(0);
                if a_alive <= b_at {
                    explained += 1;
                    if a.stalled {
                        explained_stalled += 1;
                    }
                    if examples.len() < 3 {
                        examples.push(format!(
                            "{lock}: hold #{} (lease {:x}, proven alive until {:.3}s{}) overlaps hold #{} acquired at {:.3}s: explained by the lease running out",
                            a.acquire.index,
                            a.lease,
                            a_alive as f64 / 1e9,
                            if a.stalled { ", holder stalled" } else { "" },
                            b.acquire.index,
                            b_at as f64 / 1e9
                        ));
                    }
                } else if let Some(w) =
                    clock_skew_between(faults, a.acquire.invoke, b.acquire.complete)
                {
                    skew_explained += 1;
                    if examples.len() < 3 {
                        examples.push(format!(
                            "{lock}: hold #{} overlaps hold #{} acquired at {:.3}s although its lease was proven alive until {:.3}s: explained by the clock skew '{}'",
                            a.acquire.index,
                            b.acquire.index,
                            b_at as f64 / 1e9,
                            a_alive as f64 / 1e9,
                            w.description
                        ));
                    }
                } else {
                    res.anomaly(
                        "unexplained-overlap",
                        format!(
                            "{lock}: #{} acquired at {:.3}s while #{} held it since {:.3}s (until {}), and #{}'s lease {:x} was provably alive until {:.3}s",
                            b.acquire.index,
                            b_at as f64 / 1e9,
                            a.acquire.index,
                            a.acquire.complete as f64 / 1e9,
                            if a.end == u64::MAX {
                                "the end".to_string()
                            } else {
                                format!("{:.3}s", a.end as f64 / 1e9)
                            },
                            a.acquire.index,
                            a.lease,
                            a_alive as f64 / 1e9
                        ),
                        &[a.acquire, b.acquire],
                    );
                }
            }
        }
        // Tokens in acquisition order.
        let with_token: Vec<(&Op, i64)> = hs
            .iter()
            .filter_map(|h| h.token.map(|t| (h.acquire, t)))
            .collect();
        let mut seen: BTreeMap<i64, &Op> = BTreeMap::new();
        for (o, t) in &with_token {
            if let Some(other) = seen.insert(*t, o) {
                res.anomaly(
                    "duplicate-token",
                    format!(
                        "{lock}: acquires #{} and #{} both got token {t}",
                        other.index, o.index
                    ),
                    &[other, o],
                );
            }
        }
        order_check(
            &mut res,
            "token-order",
            lock,
            &with_token,
            &with_token,
            |prev, cur| prev >= cur,
        );
    }

    // Fenced writes.
    let mut writes: BTreeMap<String, Vec<(&Op, i64)>> = BTreeMap::new();
    let (mut w_ok, mut w_refused, mut w_refused_stalled) = (0, 0, 0);
    for o in ops.iter().filter(|o| o.f == "write") {
        match o.outcome {
            Outcome::Ok => w_ok += 1,
            Outcome::Fail => {
                w_refused += 1;
                if o.value["stalled"] == true {
                    w_refused_stalled += 1;
                }
            }
            Outcome::Info => {}
        }
        if o.outcome != Outcome::Ok {
            continue;
        }
        if let (Some(l), Some(t)) = (o.value["lock"].as_str(), o.value["token"].as_i64()) {
            writes.entry(l.to_string()).or_default().push((o, t));
        }
    }
    for (lock, ws) in &writes {
        order_check(&mut res, "fence-regression", lock, ws, ws, |p, c| p > c);
        let acquired: Vec<(&Op, i64)> = holds
            .get(lock)
            .map(|hs| {
                hs.iter()
                    .filter_map(|h| h.token.map(|t| (h.acquire, t)))
                    .collect()
            })
            .unwrap_or_default();
        order_check(
            &mut res,
            "stale-fenced-write",
            lock,
            &acquired,
            ws,
            |p, c| p > c,
        );
    }

    // Final fences.
    let finals: Vec<&Op> = ops
        .iter()
        .filter(|o| o.f == "fences" && o.outcome == Outcome::Ok)
        .collect();
    if finals.is_empty() {
        res.valid = res.valid.and(Valid::Unknown);
        res.summary.push("no successful final read".into());
    }
    for f in &finals {
        if f.result != finals[0].result {
            res.anomaly(
                "divergent-final",
                format!(
                    "final fences differ: #{} {} vs #{} {}",
                    finals[0].index, finals[0].result, f.index, f.result
                ),
                &[finals[0], f],
            );
        }
    }
    if let Some(f) = finals.first() {
        for lock in holds.keys() {
            let n = lock.trim_start_matches("k/");
            let fence = f.result["fences"][format!("f/{n}")].as_i64().unwrap_or(0);
            let max_ok = writes
                .get(lock)
                .and_then(|ws| ws.iter().max_by_key(|(_, t)| *t).copied());
            if let Some((w, t)) = max_ok
                && fence < t
            {
                res.anomaly(
                    "lost-fence-write",
                    format!(
                        "{lock}: the final fence is {fence}, but write #{} with token {t} was acknowledged",
                        w.index
                    ),
                    &[w, f],
                );
            }
            let attempted = ops.iter().any(|o| {
                o.f == "write"
                    && o.outcome != Outcome::Fail
                    && o.value["lock"].as_str() == Some(lock)
                    && o.value["token"].as_i64() == Some(fence)
            });
            if fence != 0 && !attempted {
                res.anomaly(
                    "phantom-fence",
                    format!("{lock}: the final fence {fence} was never written"),
                    &[f],
                );
            }
        }
    }

    let acquires = ops.iter().filter(|o| o.f == "acquire").count();
    res.summary.insert(
        0,
        format!(
            "{n_holds} holds of {acquires} acquires; fenced writes: {w_ok} accepted, {w_refused} refused ({w_refused_stalled} by stalled holders)"
        ),
    );
    res.summary.insert(
        1,
        format!(
            "overlapping pairs of holds explained by a lease running out: {explained} ({explained_stalled} with a stalled holder); by clock skew: {skew_explained}"
        ),
    );
    res.summary.extend(examples);
    res
}

/// For ops `cur` (by invocation): among `prev` completed before it was invoked, the largest
/// value `p` must not be `bad(p, c)` with `c` the value of the op.
fn order_check(
    res: &mut CheckResult,
    name: &str,
    lock: &str,
    prev: &[(&Op, i64)],
    cur: &[(&Op, i64)],
    bad: impl Fn(i64, i64) -> bool,
) {
    let mut by_complete: Vec<&(&Op, i64)> = prev.iter().collect();
    by_complete.sort_by_key(|(o, _)| o.complete);
    let mut by_invoke: Vec<&(&Op, i64)> = cur.iter().collect();
    by_invoke.sort_by_key(|(o, _)| o.invoke);
    let mut next = 0;
    let mut best: Option<(&Op, i64)> = None;
    for (o, c) in by_invoke {
        while next < by_complete.len() && by_complete[next].0.complete < o.invoke {
            let (p, v) = *by_complete[next];
            if best.is_none_or(|(_, b)| v > b) {
                best = Some((p, v));
            }
            next += 1;
        }
        if let Some((p, v)) = best
            && p.index != o.index
            && bad(v, *c)
        {
            res.anomaly(
                name,
                format!(
                    "{lock}: #{} ({} {v}, completed at {:.3}s) came before #{} ({} {c}, invoked at {:.3}s)",
                    p.index,
                    p.f,
                    p.complete as f64 / 1e9,
                    o.index,
                    o.f,
                    o.invoke as f64 / 1e9
                ),
                &[p, o],
            );
        }
    }
}
