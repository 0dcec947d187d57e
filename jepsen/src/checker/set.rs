//! The set checker (Jepsen's `set-full`, simplified).
//!
//! - lost: an acknowledged add missing from the final read (every member's final read must be
//!   identical, otherwise `divergent-final`);
//! - phantom: an element read that nobody tried to add; aborted-read: an element whose add
//!   definitely failed;
//! - stale-read: a linearizable read missing an element whose add was acknowledged before the
//!   read was invoked, or one that a read completed before had already returned.

use std::collections::{BTreeMap, BTreeSet};

use crate::record::{CheckResult, Op, Outcome};

fn elements(op: &Op) -> BTreeSet<u64> {
    op.result["elements"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
        .unwrap_or_default()
}

pub fn check(ops: &[Op]) -> CheckResult {
    let mut res = CheckResult::new("set");
    let mut adds: BTreeMap<u64, &Op> = BTreeMap::new();
    for o in ops.iter().filter(|o| o.f == "add") {
        if let Some(e) = o.value["element"].as_u64() {
            adds.insert(e, o);
        }
    }
    let reads: Vec<(&Op, BTreeSet<u64>)> = ops
        .iter()
        .filter(|o| o.f == "read" && o.outcome == Outcome::Ok)
        .map(|o| (o, elements(o)))
        .collect();
    let finals: Vec<&(&Op, BTreeSet<u64>)> = reads
        .iter()
        .filter(|(o, _)| o.value["final"] == true)
        .collect();

    // Phantom and aborted elements.
    let mut reported = BTreeSet::new();
    for (r, set) in &reads {
        for e in set {
            if !reported.insert(*e) {
                continue;
            }
            match adds.get(e) {
                None => res.anomaly(
                    "phantom",
                    format!("read #{} returned element {e}, which nobody added", r.index),
                    &[r],
                ),
                Some(a) if a.outcome == Outcome::Fail => res.anomaly(
                    "aborted-read",
                    format!(
                        "read #{} returned element {e}, whose add #{} failed",
                        r.index, a.index
                    ),
                    &[a, r],
                ),
                _ => {}
            }
        }
    }

    // Final reads.
    let Some((f0, final_set)) = finals.first().map(|x| (&x.0, &x.1)) else {
        res.valid = res.valid.and(crate::record::Valid::Unknown);
        res.summary.push("no successful final read".into());
        return res;
    };
    for (o, s) in finals.iter().skip(1).map(|x| (&x.0, &x.1)) {
        if s != final_set {
            let only_a: Vec<_> = final_set.difference(s).take(5).collect();
            let only_b: Vec<_> = s.difference(final_set).take(5).collect();
            res.anomaly(
                "divergent-final",
                format!(
                    "final reads on n{} and n{} differ (only first: {only_a:?}, only second: {only_b:?})",
                    f0.node + 1,
                    o.node + 1
                ),
                &[f0, o],
            );
        }
    }
    let mut lost = 0;
    let mut recovered = 0;
    let mut acked = 0;
    for (e, a) in &adds {
        match a.outcome {
            Outcome::Ok => {
                acked += 1;
                if !final_set.contains(e) {
                    lost += 1;
                    res.anomaly(
                        "lost",
                        format!(
                            "element {e} was acknowledged (add #{}) but is missing from the final read #{}",
                            a.index, f0.index
                        ),
                        &[a, f0],
                    );
                }
            }
            Outcome::Info if final_set.contains(e) => recovered += 1,
            _ => {}
        }
    }

    // Stale reads: in real time.
    let mut acked_by_completion: Vec<(&u64, &&Op)> = adds
        .iter()
        .filter(|(_, a)| a.outcome == Outcome::Ok)
        .collect();
    acked_by_completion.sort_by_key(|(_, a)| a.complete);
    let mut reads_by_completion: Vec<&(&Op, BTreeSet<u64>)> = reads.iter().collect();
    reads_by_completion.sort_by_key(|(o, _)| o.complete);
    let mut reads_by_invoke: Vec<&(&Op, BTreeSet<u64>)> = reads.iter().collect();
    reads_by_invoke.sort_by_key(|(o, _)| o.invoke);
    let mut required: BTreeMap<u64, &Op> = BTreeMap::new();
    let (mut i, mut j) = (0, 0);
    for (r, set) in reads_by_invoke {
        while i < acked_by_completion.len() && acked_by_completion[i].1.complete < r.invoke {
            required.insert(*acked_by_completion[i].0, acked_by_completion[i].1);
            i += 1;
        }
        while j < reads_by_completion.len() && reads_by_completion[j].0.complete < r.invoke {
            let (src, s) = reads_by_completion[j];
            for e in s {
                required.entry(*e).or_insert(src);
            }
            j += 1;
        }
        let missing: Vec<(&u64, &&Op)> = required
            .iter()
            .filter(|(e, _)| !set.contains(e))
            .take(3)
            .collect();
        if let Some((e, src)) = missing.first() {
            res.anomaly(
                "stale-read",
                format!(
                    "read #{} on n{} (invoked {:.3}s) misses element {e}, already acknowledged/read by #{} at {:.3}s ({} missing)",
                    r.index,
                    r.node + 1,
                    r.invoke as f64 / 1e9,
                    src.index,
                    src.complete as f64 / 1e9,
                    required.keys().filter(|e| !set.contains(e)).count()
                ),
                &[src, r],
            );
        }
    }
    res.summary.insert(
        0,
        format!(
            "{} adds attempted, {acked} acknowledged, {lost} lost, {recovered} indeterminate adds present, {} reads, final set {} elements",
            adds.len(),
            reads.len(),
            final_set.len()
        ),
    );
    res
}
