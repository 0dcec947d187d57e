//! A small Elle for list-append histories: strict serializability through a dependency graph.
//!
//! What is checked (a subset of Elle's list-append checker):
//! - non-cycle anomalies: `duplicate-elements` (a list holding a value twice),
//!   `incompatible-order` (two reads of a key where neither is a prefix of the other),
//!   `garbage-read` (a value nobody appended), `G1a` (aborted read: a value whose append definitely
//!   failed), `G1b` (intermediate read: a read ending at a transaction's non-final append to the
//!   key), `lost-append` (an acknowledged append missing from the final read);
//! - the version order of each key is its longest read; from it the graph gets `ww` (appender of
//!   x(i) -> appender of x(i+1)), `wr` (appender of the last value read -> reader) and `rw`
//!   (reader of a prefix ending at x(i) -> appender of x(i+1)) edges, plus real-time edges
//!   (T1 completed before T2 was invoked) for strict serializability;
//! - cycles are found with Tarjan's SCC algorithm and classified like Elle: `G0` (ww only),
//!   `G1c` (ww + wr), `G-single` (exactly one rw), `G2` (several rw); a cycle that needs a real-time
//!   edge gets the `-realtime` suffix (a strict-serializability violation only).
//!
//! Indeterminate transactions whose appends were observed are included with their appends (their
//! reads are unknown); failed transactions are excluded.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use crate::record::{CheckResult, Op, Outcome};

const WW: u8 = 1;
const WR: u8 = 2;
const RW: u8 = 4;
const RT: u8 = 8;

#[derive(Debug)]
struct Txn<'a> {
    op: &'a Op,
    reads: Vec<(String, Vec<u64>)>,
    appends: Vec<(String, u64)>,
}

fn parse(op: &Op) -> Option<Txn<'_>> {
    if op.f != "txn" {
        return None;
    }
    let mut t = Txn {
        op,
        reads: vec![],
        appends: vec![],
    };
    if let Some(mops) = op.value["mops"].as_array() {
        for m in mops {
            if m[0] == "append" {
                t.appends.push((m[1].as_str()?.to_string(), m[2].as_u64()?));
            }
        }
    }
    if op.outcome == Outcome::Ok
        && let Some(mops) = op.result["mops"].as_array()
    {
        for m in mops {
            if m[0] == "r" {
                let list = m[2]
                    .as_array()
                    .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
                    .unwrap_or_default();
                t.reads.push((m[1].as_str()?.to_string(), list));
            }
        }
    }
    Some(t)
}

fn edge_name(bits: u8) -> &'static str {
    if bits & WW != 0 {
        "ww"
    } else if bits & WR != 0 {
        "wr"
    } else if bits & RW != 0 {
        "rw"
    } else {
        "rt"
    }
}

struct Graph {
    adj: Vec<HashMap<usize, (u8, String)>>,
}

impl Graph {
    fn add(&mut self, a: usize, b: usize, bits: u8, why: String) {
        if a == b {
            return;
        }
        let e = self.adj[a].entry(b).or_insert((0, why));
        e.0 |= bits;
    }

    /// Strongly connected components (iterative Tarjan) over edges with a bit in `mask`.
    fn sccs(&self, mask: u8, within: Option<&HashSet<usize>>) -> Vec<Vec<usize>> {
        let n = self.adj.len();
        let mut index = vec![usize::MAX; n];
        let mut low = vec![0usize; n];
        let mut on = vec![false; n];
        let mut stack = Vec::new();
        let mut out = Vec::new();
        let mut next = 0;
        let allowed = |v: usize| within.is_none_or(|w| w.contains(&v));
        for root in 0..n {
            if index[root] != usize::MAX || !allowed(root) {
                continue;
            }
            let mut call: Vec<(usize, Vec<usize>, usize)> = Vec::new();
            let succ = |v: usize| -> Vec<usize> {
                self.adj[v]
                    .iter()
                    .filter(|(w, (b, _))| b & mask != 0 && allowed(**w))
                    .map(|(w, _)| *w)
                    .collect()
            };
            index[root] = next;
            low[root] = next;
            next += 1;
            stack.push(root);
            on[root] = true;
            call.push((root, succ(root), 0));
            while let Some((v, ws, i)) = call.last_mut() {
                let v = *v;
                if *i < ws.len() {
                    let w = ws[*i];
                    *i += 1;
                    if index[w] == usize::MAX {
                        index[w] = next;
                        low[w] = next;
                        next += 1;
                        stack.push(w);
                        on[w] = true;
                        let s = succ(w);
                        call.push((w, s, 0));
                    } else if on[w] {
                        low[v] = low[v].min(index[w]);
                    }
                } else {
                    call.pop();
                    if let Some((p, _, _)) = call.last() {
                        low[*p] = low[*p].min(low[v]);
                    }
                    if low[v] == index[v] {
                        let mut comp = Vec::new();
                        while let Some(w) = stack.pop() {
                            on[w] = false;
                            comp.push(w);
                            if w == v {
                                break;
                            }
                        }
                        if comp.len() > 1 {
                            out.push(comp);
                        }
                    }
                }
            }
        }
        out
    }

    /// Shortest path from `from` to `to` over `mask` edges inside `within`.
    fn path(
        &self,
        from: usize,
        to: usize,
        mask: u8,
        within: &HashSet<usize>,
    ) -> Option<Vec<usize>> {
        let mut prev: HashMap<usize, usize> = HashMap::new();
        let mut q = VecDeque::from([from]);
        let mut seen = HashSet::from([from]);
        while let Some(v) = q.pop_front() {
            if v == to {
                let mut p = vec![to];
                let mut cur = to;
                while cur != from {
                    cur = prev[&cur];
                    p.push(cur);
                }
                p.reverse();
                return Some(p);
            }
            for (w, (b, _)) in &self.adj[v] {
                if b & mask != 0 && within.contains(w) && seen.insert(*w) {
                    prev.insert(*w, v);
                    q.push_back(*w);
                }
            }
        }
        None
    }

    /// A cycle through the SCC using only `mask` edges, if any.
    fn cycle(&self, comp: &HashSet<usize>, mask: u8) -> Option<Vec<usize>> {
        for sub in self.sccs(mask, Some(comp)) {
            let set: HashSet<usize> = sub.iter().copied().collect();
            let v = sub[0];
            for (w, (b, _)) in &self.adj[v] {
                if b & mask != 0
                    && set.contains(w)
                    && let Some(mut p) = self.path(*w, v, mask, &set)
                {
                    p.insert(0, v);
                    return Some(p); // v -> w -> ... -> v
                }
            }
        }
        None
    }

    /// A cycle with exactly one rw edge (plus `extra` edges).
    fn g_single(&self, comp: &HashSet<usize>, extra: u8) -> Option<Vec<usize>> {
        let mut tried = 0;
        for &a in comp {
            for (b, (bits, _)) in &self.adj[a] {
                if bits & RW != 0 && comp.contains(b) {
                    tried += 1;
                    if tried > 500 {
                        return None;
                    }
                    if let Some(mut p) = self.path(*b, a, WW | WR | extra, comp) {
                        p.insert(0, a);
                        return Some(p);
                    }
                }
            }
        }
        None
    }
}

pub fn check(ops: &[Op]) -> CheckResult {
    let mut res = CheckResult::new("elle-append");
    let txns: Vec<Txn> = ops.iter().filter_map(parse).collect();
    // Who appended what.
    let mut appender: HashMap<(&str, u64), usize> = HashMap::new();
    for (i, t) in txns.iter().enumerate() {
        for (k, v) in &t.appends {
            appender.insert((k.as_str(), *v), i);
        }
    }
    // Reads per key (ok transactions only).
    let mut reads_of: BTreeMap<&str, Vec<(usize, &Vec<u64>)>> = BTreeMap::new();
    for (i, t) in txns.iter().enumerate() {
        if t.op.outcome != Outcome::Ok {
            continue;
        }
        for (k, l) in &t.reads {
            reads_of.entry(k.as_str()).or_default().push((i, l));
        }
    }
    // Included in the graph: ok transactions, and indeterminate ones whose writes were seen.
    let mut included = vec![false; txns.len()];
    for (i, t) in txns.iter().enumerate() {
        included[i] = t.op.outcome == Outcome::Ok;
    }
    let mut order: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    let mut bad_keys: HashSet<&str> = HashSet::new();
    for (k, rs) in &reads_of {
        for (i, l) in rs {
            let mut seen = HashSet::new();
            if let Some(d) = l.iter().find(|v| !seen.insert(**v)) {
                res.anomaly(
                    "duplicate-elements",
                    format!(
                        "key {k}: txn #{} read {l:?} with {d} twice",
                        txns[*i].op.index
                    ),
                    &[txns[*i].op],
                );
                bad_keys.insert(k);
            }
        }
        let (li, longest) = rs.iter().max_by_key(|(_, l)| l.len()).unwrap();
        for (i, l) in rs {
            if longest[..l.len()] != l[..] {
                res.anomaly(
                    "incompatible-order",
                    format!(
                        "key {k}: txn #{} read {l:?}, not a prefix of {longest:?} read by txn #{}",
                        txns[*i].op.index, txns[*li].op.index
                    ),
                    &[txns[*i].op, txns[*li].op],
                );
                bad_keys.insert(k);
            }
        }
        for v in longest.iter() {
            match appender.get(&(*k, *v)) {
                None => res.anomaly(
                    "garbage-read",
                    format!("key {k}: value {v} was read but never appended"),
                    &[txns[*li].op],
                ),
                Some(&w) => match txns[w].op.outcome {
                    Outcome::Fail => {
                        let reader = rs
                            .iter()
                            .find(|(_, l)| l.contains(v))
                            .map(|(i, _)| txns[*i].op)
                            .unwrap_or(txns[*li].op);
                        res.anomaly(
                            "G1a",
                            format!(
                                "key {k}: txn #{} read value {v} of failed txn #{}",
                                reader.index, txns[w].op.index
                            ),
                            &[txns[w].op, reader],
                        )
                    }
                    Outcome::Info => included[w] = true,
                    Outcome::Ok => {}
                },
            }
        }
        order.insert(k, longest.to_vec());
    }
    // G1b: a read ending at a non-final append of another transaction to that key.
    for (k, rs) in &reads_of {
        for (i, l) in rs {
            let Some(last) = l.last() else { continue };
            if let Some(&w) = appender.get(&(*k, *last)) {
                if w == *i {
                    continue;
                }
                let mine: Vec<u64> = txns[w]
                    .appends
                    .iter()
                    .filter(|(kk, _)| kk == k)
                    .map(|(_, v)| *v)
                    .collect();
                if mine.last() != Some(last) {
                    res.anomaly(
                        "G1b",
                        format!(
                            "key {k}: txn #{} read {l:?}, ending at an intermediate append of txn #{}",
                            txns[*i].op.index, txns[w].op.index
                        ),
                        &[txns[w].op, txns[*i].op],
                    );
                }
            }
        }
    }
    // Lost appends: acknowledged but absent from the final read of the key.
    let finals: Vec<&Txn> = txns
        .iter()
        .filter(|t| t.op.value["final"] == true && t.op.outcome == Outcome::Ok)
        .collect();
    if let Some(f) = finals.first() {
        let final_lists: HashMap<&str, &Vec<u64>> =
            f.reads.iter().map(|(k, l)| (k.as_str(), l)).collect();
        for t in txns.iter().filter(|t| t.op.outcome == Outcome::Ok) {
            for (k, v) in &t.appends {
                if !final_lists.get(k.as_str()).is_some_and(|l| l.contains(v)) {
                    res.anomaly(
                        "lost-append",
                        format!(
                            "key {k}: value {v} appended by acknowledged txn #{} is missing from the final read #{}",
                            t.op.index, f.op.index
                        ),
                        &[t.op, f.op],
                    );
                }
            }
        }
    } else {
        res.summary
            .push("no final read: lost appends not checked".into());
    }

    // The dependency graph.
    let mut g = Graph {
        adj: vec![HashMap::new(); txns.len()],
    };
    for (k, ord) in &order {
        if bad_keys.contains(k) {
            continue;
        }
        let who = |i: usize| appender.get(&(*k, ord[i])).copied();
        for i in 1..ord.len() {
            if let (Some(a), Some(b)) = (who(i - 1), who(i))
                && included[a]
                && included[b]
            {
                g.add(a, b, WW, format!("{k}: {} then {}", ord[i - 1], ord[i]));
            }
        }
        for (r, l) in &reads_of[k] {
            let n = l.len();
            if n > 0
                && let Some(w) = who(n - 1)
                && included[w]
            {
                g.add(w, *r, WR, format!("{k}: read {} ", ord[n - 1]));
            }
            if n < ord.len()
                && let Some(w) = who(n)
                && included[w]
            {
                g.add(
                    *r,
                    w,
                    RW,
                    format!(
                        "{k}: read up to {} before {} was appended",
                        l.last().map(|x| x.to_string()).unwrap_or("[]".into()),
                        ord[n]
                    ),
                );
            }
        }
    }
    // Real-time edges to the frontier (a transitive reduction of the real-time order).
    let mut events: Vec<(u64, bool, usize)> = Vec::new();
    for (i, t) in txns.iter().enumerate() {
        if !included[i] {
            continue;
        }
        events.push((t.op.invoke, true, i));
        if t.op.outcome == Outcome::Ok {
            events.push((t.op.complete, false, i));
        }
    }
    events.sort_by_key(|(t, is_invoke, _)| (*t, !*is_invoke));
    let mut frontier: Vec<usize> = Vec::new();
    for (_, is_invoke, i) in events {
        if is_invoke {
            for &a in &frontier {
                g.add(a, i, RT, "real time".into());
            }
        } else {
            let inv = txns[i].op.invoke;
            frontier.retain(|a| txns[*a].op.complete >= inv);
            frontier.push(i);
        }
    }

    // Cycles.
    let mut reported: HashSet<usize> = HashSet::new();
    let mut cycles = 0;
    for (suffix, extra) in [("", 0u8), ("-realtime", RT)] {
        for comp in g.sccs(WW | WR | RW | extra, None) {
            if comp.iter().any(|v| reported.contains(v)) {
                continue;
            }
            let set: HashSet<usize> = comp.iter().copied().collect();
            let found = g
                .cycle(&set, WW | extra)
                .map(|c| ("G0", c))
                .or_else(|| g.cycle(&set, WW | WR | extra).map(|c| ("G1c", c)))
                .or_else(|| g.g_single(&set, extra).map(|c| ("G-single", c)))
                .or_else(|| g.cycle(&set, WW | WR | RW | extra).map(|c| ("G2-item", c)));
            let Some((name, cycle)) = found else { continue };
            cycles += 1;
            reported.extend(comp.iter().copied());
            let mut steps = Vec::new();
            for w in cycle.windows(2) {
                let (bits, why) = &g.adj[w[0]][&w[1]];
                steps.push(format!(
                    "#{} -{}({})-> #{}",
                    txns[w[0]].op.index,
                    edge_name(*bits),
                    why.trim(),
                    txns[w[1]].op.index
                ));
            }
            let witness: Vec<&Op> = cycle[..cycle.len() - 1]
                .iter()
                .map(|&i| txns[i].op)
                .collect();
            res.anomaly(
                &format!("{name}{suffix}"),
                format!(
                    "cycle of {} txns (component of {}): {}",
                    cycle.len() - 1,
                    comp.len(),
                    steps.join(", ")
                ),
                &witness,
            );
        }
    }
    let edges: usize = g.adj.iter().map(HashMap::len).sum();
    res.summary.insert(
        0,
        format!(
            "{} txns ({} in graph), {} keys, {edges} edges, {cycles} cycles",
            txns.len(),
            included.iter().filter(|x| **x).count(),
            order.len()
        ),
    );
    res
}
