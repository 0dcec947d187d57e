//! Wing–Gong–Lowe linearizability checking of a compare-and-set register, with Lowe's cache.
//!
//! Every operation becomes a call event and a return event on a doubly linked list in real-time
//! order (an indeterminate operation returns after everything). The search walks the list: at a
//! call it tries to linearize that operation now (the model accepts it and the pair
//! (set of linearized operations, model state) was not explored before), removing its call and
//! return from the list; at a return whose operation is not linearized yet it backtracks. The
//! history is linearizable when the list empties.

use std::collections::{BTreeMap, HashSet};

use crate::history::{Op, Operation, Outcome};

/// The verdict for a history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// Not linearizable: the key and the operations of the longest prefix that could be
    /// linearized plus the one that could not be placed.
    Violation {
        key: String,
        stuck_at: Option<Operation>,
        linearized: Vec<Operation>,
    },
    /// The step budget ran out.
    Unknown,
}

type State = Option<i64>;

struct Entry {
    op: usize,
    is_call: bool,
    prev: usize,
    next: usize,
    /// For a call: the index of its return entry.
    partner: usize,
}

/// Applies `op` to `state`; `None` if the model rejects it.
fn step(state: State, op: &Operation) -> Option<State> {
    let indeterminate = op.outcome == Outcome::Info;
    match op.op {
        Op::Read { value } => (state == value).then_some(state),
        Op::Write { value } => Some(Some(value)),
        Op::Cas { from, to } => {
            if state == Some(from) {
                Some(Some(to))
            } else if indeterminate {
                // An indeterminate cas that found another value simply had no effect.
                Some(state)
            } else {
                None
            }
        }
    }
}

/// Checks one key's operations.
fn check_key(key: &str, ops: &[Operation], max_steps: u64) -> Verdict {
    // Drop what did not happen or constrains nothing.
    let ops: Vec<Operation> = ops
        .iter()
        .filter(|o| {
            o.outcome != Outcome::Fail
                && !(o.outcome == Outcome::Info && matches!(o.op, Op::Read { .. }))
        })
        .cloned()
        .collect();
    let n = ops.len();
    if n == 0 {
        return Verdict::Linearizable;
    }
    // Events ordered by time; at equal times returns go first (the operations did not overlap).
    let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * n);
    for (i, o) in ops.iter().enumerate() {
        events.push((o.invoke, true, i));
        events.push((o.complete, false, i));
    }
    events.sort_by_key(|(t, is_call, i)| (*t, *is_call, *i));
    let head = 2 * n; // sentinel index
    let mut list: Vec<Entry> = events
        .iter()
        .map(|(_, is_call, op)| Entry {
            op: *op,
            is_call: *is_call,
            prev: 0,
            next: 0,
            partner: 0,
        })
        .collect();
    list.push(Entry {
        op: usize::MAX,
        is_call: false,
        prev: 0,
        next: 0,
        partner: 0,
    });
    let mut ret_of = vec![0usize; n];
    for (idx, (_, is_call, op)) in events.iter().enumerate() {
        if !is_call {
            ret_of[*op] = idx;
        }
    }
    for idx in 0..2 * n {
        list[idx].prev = if idx == 0 { head } else { idx - 1 };
        list[idx].next = if idx + 1 == 2 * n {
            usize::MAX
        } else {
            idx + 1
        };
        if list[idx].is_call {
            list[idx].partner = ret_of[list[idx].op];
        }
    }
    list[head].next = 0;

    let words = n.div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut cache: HashSet<(Vec<u64>, State)> = HashSet::new();
    let mut stack: Vec<(usize, State)> = Vec::new();
    let mut state: State = None;
    let mut entry = list[head].next;
    let mut steps = 0u64;
    let mut best: Vec<usize> = Vec::new();
    let mut stuck: Option<usize> = None;

    fn lift(list: &mut [Entry], e: usize) {
        let (p, nx) = (list[e].prev, list[e].next);
        list[p].next = nx;
        if nx != usize::MAX {
            list[nx].prev = p;
        }
        let r = list[e].partner;
        let (rp, rn) = (list[r].prev, list[r].next);
        list[rp].next = rn;
        if rn != usize::MAX {
            list[rn].prev = rp;
        }
    }
    fn unlift(list: &mut [Entry], e: usize) {
        let r = list[e].partner;
        let (rp, rn) = (list[r].prev, list[r].next);
        list[rp].next = r;
        if rn != usize::MAX {
            list[rn].prev = r;
        }
        let (p, nx) = (list[e].prev, list[e].next);
        list[p].next = e;
        if nx != usize::MAX {
            list[nx].prev = e;
        }
    }

    while list[head].next != usize::MAX {
        steps += 1;
        if steps > max_steps {
            return Verdict::Unknown;
        }
        if entry == usize::MAX {
            // Only reachable if every remaining entry is a call that cannot be placed.
            entry = list[head].next;
        }
        let e = &list[entry];
        if e.is_call {
            let op = e.op;
            let mut placed = false;
            if let Some(next_state) = step(state, &ops[op]) {
                let mut bits = linearized.clone();
                bits[op / 64] |= 1 << (op % 64);
                if cache.insert((bits.clone(), next_state)) {
                    stack.push((entry, state));
                    state = next_state;
                    linearized = bits;
                    lift(&mut list, entry);
                    if stack.len() > best.len() {
                        best = stack.iter().map(|(e, _)| list[*e].op).collect();
                    }
                    entry = list[head].next;
                    placed = true;
                }
            }
            if !placed {
                entry = list[entry].next;
            }
        } else {
            // A return of an operation not yet linearized: backtrack.
            let Some((top, prev_state)) = stack.pop() else {
                stuck = Some(list[entry].op);
                break;
            };
            state = prev_state;
            let op = list[top].op;
            linearized[op / 64] &= !(1 << (op % 64));
            unlift(&mut list, top);
            entry = list[top].next;
        }
    }
    if list[head].next == usize::MAX {
        return Verdict::Linearizable;
    }
    Verdict::Violation {
        key: key.to_string(),
        stuck_at: stuck.map(|i| ops[i].clone()),
        linearized: best.into_iter().map(|i| ops[i].clone()).collect(),
    }
}

/// Checks a history, partitioned by key.
pub fn check(ops: &[Operation], max_steps: u64) -> Verdict {
    let mut by_key: BTreeMap<&str, Vec<Operation>> = BTreeMap::new();
    for o in ops {
        by_key.entry(o.key.as_str()).or_default().push(o.clone());
    }
    let mut unknown = false;
    for (key, ops) in by_key {
        match check_key(key, &ops, max_steps) {
            Verdict::Linearizable => {}
            Verdict::Unknown => unknown = true,
            v => return v,
        }
    }
    if unknown {
        Verdict::Unknown
    } else {
        Verdict::Linearizable
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(process: u64, invoke: u64, complete: u64, op: Op, outcome: Outcome) -> Operation {
        Operation {
            process,
            key: "k".into(),
            op,
            outcome,
            invoke,
            complete,
        }
    }

    #[test]
    fn small_histories() {
        use Op::*;
        use Outcome::*;
        // Sequential write then read.
        let ok = vec![
            op(0, 1, 2, Write { value: 1 }, Ok),
            op(1, 3, 4, Read { value: Some(1) }, Ok),
        ];
        assert_eq!(check(&ok, 1_000_000), Verdict::Linearizable);
        // Stale read after a completed write.
        let stale = vec![
            op(0, 1, 2, Write { value: 1 }, Ok),
            op(0, 3, 4, Write { value: 2 }, Ok),
            op(1, 5, 6, Read { value: Some(1) }, Ok),
        ];
        assert!(matches!(
            check(&stale, 1_000_000),
            Verdict::Violation { .. }
        ));
        // A cas that succeeded on a value never written.
        let bad_cas = vec![
            op(0, 1, 2, Write { value: 1 }, Ok),
            op(1, 3, 4, Cas { from: 5, to: 6 }, Ok),
        ];
        assert!(matches!(
            check(&bad_cas, 1_000_000),
            Verdict::Violation { .. }
        ));
        // Concurrent writes, reads in both orders.
        let conc = vec![
            op(0, 1, 10, Write { value: 1 }, Ok),
            op(1, 2, 9, Write { value: 2 }, Ok),
            op(2, 3, 4, Read { value: Some(2) }, Ok),
            op(3, 5, 6, Read { value: Some(1) }, Ok),
        ];
        assert_eq!(check(&conc, 1_000_000), Verdict::Linearizable);
        // An indeterminate write that took effect later.
        let info = vec![
            op(0, 1, u64::MAX, Write { value: 7 }, Info),
            op(1, 5, 6, Read { value: None }, Ok),
            op(1, 7, 8, Read { value: Some(7) }, Ok),
        ];
        assert_eq!(check(&info, 1_000_000), Verdict::Linearizable);
        // A failed write did not happen.
        let failed = vec![
            op(0, 1, 2, Write { value: 7 }, Fail),
            op(1, 5, 6, Read { value: Some(7) }, Ok),
        ];
        assert!(matches!(
            check(&failed, 1_000_000),
            Verdict::Violation { .. }
        ));
        // An indeterminate cas that could not apply does not block the check.
        let info_cas = vec![
            op(0, 1, u64::MAX, Cas { from: 3, to: 4 }, Info),
            op(1, 2, 3, Read { value: None }, Ok),
        ];
        assert_eq!(check(&info_cas, 1_000_000), Verdict::Linearizable);
    }
}
