//! The lease checker: keys go away only with their lease, and only when the lease is revoked or
//! has really run out; revoked and expired leases take their keys with them.
//!
//! A lease's *proven lifetime*: an acknowledged grant or keep-alive (TTL `t` > 0) invoked at `i`
//! proves the lease lives until at least `i + t` (the leader starts the TTL when it handles the
//! request, after `i`; a new leader renews every lease on promotion, which only extends it), and
//! an acknowledged keep-alive also proves the lease still existed at `i` (a lease never comes
//! back). Times are the harness's monotonic clock, the same clock the members' monotonic
//! timers use on this machine. With `alive(L)` the latest such bound:
//!
//! - `early-expiry`: an acknowledged key of `L` (its put completed before the read was invoked)
//!   is missing from a read that completed before `alive(L)`, and no revoke of `L` was invoked
//!   before the read completed; likewise a keep-alive answering "no such lease" (TTL 0) before
//!   `alive(L)`;
//! - `keepalive-after-revoke` / `keepalive-after-expiry`: a keep-alive invoked after `L`'s
//!   revoke was acknowledged, or after `L` was observed gone, still answered with a TTL;
//! - `attach-after-expiry`: a put with lease `L` acknowledged although `L` was observed gone
//!   (or its revoke acknowledged) before the put was invoked;
//! - `revoked-key-visible`: a read invoked after `L`'s revoke was acknowledged shows a key of
//!   `L`; `key-reappeared`: a key shows up again in a read invoked after a read that missed it
//!   (keys are written once);
//! - `phantom-key` / `aborted-read`: a key nobody put, or whose put definitely failed;
//! - after the final wait (every lease ran out): `not-expired` (a key still present in a final
//!   read), `lease-not-expired` (a lease of the run still listed), `divergent-final`.

use std::collections::{BTreeMap, BTreeSet};

use crate::checker::clock_skew_between;
use crate::record::{CheckResult, FaultWindow, Op, Outcome, Valid};
use crate::workload::lease::lease_of_key;

const S: u64 = 1_000_000_000;

fn keys(op: &Op) -> BTreeSet<String> {
    op.result["keys"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[derive(Default)]
struct LeaseFacts<'a> {
    /// (bound in ns, the op that proves it)
    alive: Option<(u64, &'a Op)>,
    /// Earliest invocation of a revoke that may have taken effect (ok or info).
    revoke_invoked: Option<&'a Op>,
    /// Earliest completion of an acknowledged revoke.
    revoke_acked: Option<&'a Op>,
    /// Earliest completion of an observation that the lease is gone.
    gone_seen: Option<(u64, &'a Op)>,
}

pub fn check(ops: &[Op], faults: &[FaultWindow]) -> CheckResult {
    let mut res = CheckResult::new("lease");
    // Early expiries that a clock-skew window explains (TTLs run on the leader's clock).
    let mut skewed: Vec<String> = Vec::new();
    let mut leases: BTreeMap<i64, LeaseFacts> = BTreeMap::new();
    let mut puts: BTreeMap<String, &Op> = BTreeMap::new();
    let (mut granted, mut revoked, mut renewed) = (0usize, 0usize, 0usize);

    for o in ops {
        match o.f.as_str() {
            "grant" if o.outcome == Outcome::Ok => {
                if let (Some(id), Some(ttl)) = (o.result["id"].as_i64(), o.result["ttl"].as_i64()) {
                    granted += 1;
                    let f = leases.entry(id).or_default();
                    let b = o.invoke + ttl.max(0) as u64 * S;
                    if f.alive.is_none_or(|(x, _)| b > x) {
                        f.alive = Some((b, o));
                    }
                }
            }
            "keepalive" if o.outcome == Outcome::Ok => {
                let (Some(id), Some(ttl)) = (o.value["lease"].as_i64(), o.result["ttl"].as_i64())
                else {
                    continue;
                };
                let f = leases.entry(id).or_default();
                if ttl > 0 {
                    renewed += 1;
                    let b = o.invoke + ttl as u64 * S;
                    if f.alive.is_none_or(|(x, _)| b > x) {
                        f.alive = Some((b, o));
                    }
                } else if f.gone_seen.is_none_or(|(t, _)| o.complete < t) {
                    f.gone_seen = Some((o.complete, o));
                }
            }
            "revoke" => {
                let Some(id) = o.value["lease"].as_i64() else {
                    continue;
                };
                let f = leases.entry(id).or_default();
                if o.outcome != Outcome::Fail
                    && f.revoke_invoked.is_none_or(|r| o.invoke < r.invoke)
                {
                    f.revoke_invoked = Some(o);
                }
                if o.outcome == Outcome::Ok {
                    revoked += 1;
                    if f.revoke_acked.is_none_or(|r| o.complete < r.complete) {
                        f.revoke_acked = Some(o);
                    }
                }
            }
            "put" => {
                if let Some(k) = o.value["key"].as_str() {
                    puts.insert(k.to_string(), o);
                }
            }
            _ => {}
        }
    }

    let reads: Vec<(&Op, BTreeSet<String>)> = ops
        .iter()
        .filter(|o| o.f == "read" && o.outcome == Outcome::Ok)
        .map(|o| (o, keys(o)))
        .collect();

    // Phantom / aborted keys, and revoked keys still visible.
    let mut reported = BTreeSet::new();
    for (r, ks) in &reads {
        for k in ks {
            match puts.get(k) {
                None if reported.insert(k.clone()) => res.anomaly(
                    "phantom-key",
                    format!("read #{} shows key {k}, which nobody put", r.index),
                    &[r],
                ),
                Some(p) if p.outcome == Outcome::Fail && reported.insert(k.clone()) => res.anomaly(
                    "aborted-read",
                    format!(
                        "read #{} shows key {k}, whose put #{} failed",
                        r.index, p.index
                    ),
                    &[p, r],
                ),
                _ => {}
            }
            if let Some(l) = lease_of_key(k)
                && let Some(rv) = leases.get(&l).and_then(|f| f.revoke_acked)
                && rv.complete < r.invoke
            {
                res.anomaly(
                    "revoked-key-visible",
                    format!(
                        "read #{} (invoked at {:.3}s) shows key {k}, but the revoke #{} of its lease completed at {:.3}s",
                        r.index,
                        r.invoke as f64 / 1e9,
                        rv.index,
                        rv.complete as f64 / 1e9
                    ),
                    &[rv, r],
                );
            }
        }
    }

    // Keys missing from reads: early expiry, and observations that a lease is gone.
    // For each key: the earliest read (by completion) that missed it after its put was acked.
    let mut first_miss: BTreeMap<&str, &Op> = BTreeMap::new();
    let mut closest: Option<(i64, u64)> = None; // (ns after the proven lifetime, op index)
    {
        let mut by_completion: Vec<&(&Op, BTreeSet<String>)> = reads.iter().collect();
        by_completion.sort_by_key(|(r, _)| r.complete);
        // Acknowledged keys not yet seen missing, by put completion.
        let mut acked: Vec<(&str, &Op)> = puts
            .iter()
            .filter(|(_, p)| p.outcome == Outcome::Ok)
            .map(|(k, p)| (k.as_str(), *p))
            .collect();
        acked.sort_by_key(|(_, p)| p.complete);
        let mut pending: BTreeSet<(u64, &str)> = BTreeSet::new();
        let mut next = 0;
        // A read can only miss keys whose put completed before it was invoked; reads are
        // visited by completion, keys admitted by the read's invocation.
        for (r, ks) in &by_completion {
            while next < acked.len() && acked[next].1.complete < r.invoke {
                pending.insert((acked[next].1.complete, acked[next].0));
                next += 1;
            }
            let missed: Vec<(u64, &str)> = pending
                .iter()
                .filter(|(t, k)| *t < r.invoke && !ks.contains(*k))
                .copied()
                .collect();
            for (t, k) in missed {
                pending.remove(&(t, k));
                first_miss.insert(k, r);
                if let Some(l) = lease_of_key(k) {
                    let f = leases.entry(l).or_default();
                    if f.gone_seen.is_none_or(|(g, _)| r.complete < g) {
                        f.gone_seen = Some((r.complete, r));
                    }
                }
            }
        }
    }
    for (k, r) in &first_miss {
        let Some(l) = lease_of_key(k) else { continue };
        let f = &leases[&l];
        let revoked_before = f.revoke_invoked.is_some_and(|rv| rv.invoke < r.complete);
        if revoked_before {
            continue;
        }
        if let Some((alive, proof)) = f.alive {
            let margin = r.complete as i64 - alive as i64;
            if closest.is_none_or(|(m, _)| margin < m) {
                closest = Some((margin, r.index));
            }
            if r.complete < alive
                && let Some(w) = clock_skew_between(faults, proof.invoke, r.complete)
            {
                skewed.push(format!(
                    "key {k} of lease {l:x} gone at {:.3}s before its proven lifetime ({:.3}s), during '{}'",
                    r.complete as f64 / 1e9,
                    alive as f64 / 1e9,
                    w.description
                ));
            } else if r.complete < alive {
                let p = puts[*k];
                res.anomaly(
                    "early-expiry",
                    format!(
                        "key {k} of lease {l:x} is missing from read #{} (completed at {:.3}s), but #{} proves the lease alive until {:.3}s and it was never revoked",
                        r.index,
                        r.complete as f64 / 1e9,
                        proof.index,
                        alive as f64 / 1e9
                    ),
                    &[proof, p, r],
                );
            }
        }
    }
    for (l, f) in &leases {
        let Some((alive, proof)) = f.alive else {
            continue;
        };
        // A keep-alive saying "no such lease" before the lease could have run out.
        for o in ops.iter().filter(|o| {
            o.f == "keepalive"
                && o.outcome == Outcome::Ok
                && o.value["lease"].as_i64() == Some(*l)
                && o.result["ttl"].as_i64() == Some(0)
        }) {
            let revoked_before = f.revoke_invoked.is_some_and(|rv| rv.invoke < o.complete);
            if !revoked_before
                && o.complete < alive
                && let Some(w) = clock_skew_between(faults, proof.invoke, o.complete)
            {
                skewed.push(format!(
                    "keep-alive #{} of lease {l:x} found no lease at {:.3}s, before its proven lifetime ({:.3}s), during '{}'",
                    o.index,
                    o.complete as f64 / 1e9,
                    alive as f64 / 1e9,
                    w.description
                ));
            } else if !revoked_before && o.complete < alive {
                res.anomaly(
                    "early-expiry",
                    format!(
                        "keep-alive #{} of lease {l:x} answered 'no such lease' at {:.3}s, but #{} proves it alive until {:.3}s",
                        o.index,
                        o.complete as f64 / 1e9,
                        proof.index,
                        alive as f64 / 1e9
                    ),
                    &[proof, o],
                );
            }
        }
    }

    // Renewals and attachments after the lease was gone.
    for o in ops.iter().filter(|o| o.outcome == Outcome::Ok) {
        let (lease, what) = match o.f.as_str() {
            "keepalive" if o.result["ttl"].as_i64().is_some_and(|t| t > 0) => {
                (o.value["lease"].as_i64(), "keepalive")
            }
            "put" => (o.value["lease"].as_i64(), "put"),
            _ => continue,
        };
        let Some(f) = lease.and_then(|l| leases.get(&l)) else {
            continue;
        };
        let l = lease.unwrap_or(0);
        if let Some(rv) = f.revoke_acked
            && rv.complete < o.invoke
        {
            let name = if what == "put" {
                "attach-after-expiry"
            } else {
                "keepalive-after-revoke"
            };
            res.anomaly(
                name,
                format!(
                    "{what} #{} on lease {l:x} succeeded (invoked at {:.3}s) after the lease's revoke #{} was acknowledged at {:.3}s",
                    o.index,
                    o.invoke as f64 / 1e9,
                    rv.index,
                    rv.complete as f64 / 1e9
                ),
                &[rv, o],
            );
        } else if let Some((t, g)) = f.gone_seen
            && t < o.invoke
        {
            let name = if what == "put" {
                "attach-after-expiry"
            } else {
                "keepalive-after-expiry"
            };
            res.anomaly(
                name,
                format!(
                    "{what} #{} on lease {l:x} succeeded (invoked at {:.3}s) after #{} had observed the lease gone at {:.3}s",
                    o.index,
                    o.invoke as f64 / 1e9,
                    g.index,
                    t as f64 / 1e9
                ),
                &[g, o],
            );
        }
    }

    // Keys never come back.
    for (k, miss) in &first_miss {
        if let Some((r, _)) = reads
            .iter()
            .find(|(r, ks)| r.invoke > miss.complete && ks.contains(*k))
        {
            res.anomaly(
                "key-reappeared",
                format!(
                    "key {k} is missing from read #{} but present in the later read #{}",
                    miss.index, r.index
                ),
                &[miss, r],
            );
        }
    }

    // The final state: every lease ran out.
    let finals: Vec<&(&Op, BTreeSet<String>)> = reads
        .iter()
        .filter(|(o, _)| o.value["final"] == true)
        .collect();
    if finals.is_empty() {
        res.valid = res.valid.and(Valid::Unknown);
        res.summary.push("no successful final read".into());
    }
    for (o, ks) in &finals {
        if let Some(k) = ks.iter().next() {
            res.anomaly(
                "not-expired",
                format!(
                    "final read #{} on n{} still shows {} key(s) (e.g. {k}) after every lease should have run out",
                    o.index,
                    o.node + 1,
                    ks.len()
                ),
                &[o],
            );
        }
    }
    if let (Some((a, sa)), true) = (finals.first().map(|x| (&x.0, &x.1)), finals.len() > 1) {
        for (b, sb) in finals.iter().skip(1).map(|x| (&x.0, &x.1)) {
            if sa != sb {
                res.anomaly(
                    "divergent-final",
                    format!("final reads #{} and #{} differ", a.index, b.index),
                    &[a, b],
                );
            }
        }
    }
    for o in ops
        .iter()
        .filter(|o| o.f == "leases" && o.outcome == Outcome::Ok)
    {
        let ours: Vec<i64> = o.result["leases"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_i64()).collect())
            .unwrap_or_default();
        let left: Vec<String> = ours
            .iter()
            .filter(|l| leases.contains_key(l))
            .map(|l| format!("{l:x}"))
            .collect();
        if !left.is_empty() {
            res.anomaly(
                "lease-not-expired",
                format!(
                    "final lease list #{} on n{} still has {} lease(s) of this run: {}",
                    o.index,
                    o.node + 1,
                    left.len(),
                    left.join(", ")
                ),
                &[o],
            );
        }
    }

    let observed_gone = leases.values().filter(|f| f.gone_seen.is_some()).count();
    res.summary.insert(
        0,
        format!(
            "{granted} leases granted, {renewed} keep-alives acknowledged, {revoked} revoked; {} keys attached, {observed_gone} leases observed gone",
            puts.values().filter(|p| p.outcome == Outcome::Ok).count()
        ),
    );
    if !skewed.is_empty() {
        res.summary.push(format!(
            "{} early expiries explained by clock skew (lease TTLs run on the leader's clock; not counted as violations), e.g. {}",
            skewed.len(),
            skewed[0]
        ));
    }
    if let Some((m, idx)) = closest {
        res.summary.insert(
            1,
            format!(
                "closest call: a key seen gone {:.3} s after its lease's proven lifetime (read #{idx})",
                m as f64 / 1e9
            ),
        );
    }
    res
}
