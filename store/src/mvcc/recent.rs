//! The values of recently written or read revisions, in memory.
//!
//! A revision's `KeyValue` never changes once written (the log is the same on every member),
//! so these values need no invalidation: the cache holds encoded `KeyValue`s by revision,
//! first in first out, within a byte budget. Every applied put enters it, and so does every
//! value a read had to fetch from the storage engine. Reads of a key's latest version — nearly
//! every read of a control plane — then skip RocksDB, whose lookup searches its memtables (a skip
//! list of every write since the last flush) and then its files: the largest cost of a 100-key
//! range before this cache (see `docs/benchmarks.md`).
//!
//! Worked example, with a budget of 330 bytes and 100-byte values (plus [`ENTRY_OVERHEAD`]
//! each, so two fit):
//! ```text
//! apply rev 5 put a  → held [5]
//! apply rev 6 put b  → held [5, 6]
//! read rev 3 (from RocksDB; added) → held [6, 3]   5 dropped: it entered first
//! get(6) → hit, get(3) → hit, get(5) → miss (read from RocksDB again), get(8) → miss
//! ```
//! Tombstones are not held (no range reads them). Values are found through a hash map by
//! revision (one probe; a binary search over a few hundred thousand revisions missed the CPU
//! cache a dozen times per lookup); a queue in insertion order says which to drop first.
//! Readers decode under the read lock instead of taking a reference each, so readers never
//! write to the shared values.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use rustc_hash::FxHashMap;

use super::revision::Revision;

/// Bookkeeping bytes charged per entry besides the value (map slot, queue slot, allocation).
pub const ENTRY_OVERHEAD: usize = 64;

/// Default budget of [`RecentValues`] (bytes of encoded values plus overhead).
pub const DEFAULT_BUDGET_BYTES: usize = 64 << 20;

#[derive(Default)]
struct Held {
    values: FxHashMap<Revision, Arc<[u8]>>,
    /// The held revisions, in the order they entered.
    order: VecDeque<Revision>,
    bytes: usize,
}

impl Held {
    fn remove(&mut self, rev: Revision) {
        if let Some(v) = self.values.remove(&rev) {
            self.bytes -= v.len() + ENTRY_OVERHEAD;
        }
    }
}

/// See the module documentation.
pub struct RecentValues {
    budget: usize,
    held: RwLock<Held>,
    hits: AtomicU64,
    misses: AtomicU64,
}

/// What the cache holds and how reads fared (for `/metrics`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RecentValuesStats {
    pub entries: usize,
    pub bytes: usize,
    /// Values found in the cache, and values that had to be read from the engine.
    pub hits: u64,
    pub misses: u64,
}

impl RecentValues {
    /// A cache of at most `budget` bytes; 0 disables it.
    pub fn new(budget: usize) -> Self {
        RecentValues {
            budget,
            held: RwLock::new(Held::default()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Adds values (an applied batch's puts, or values read from the engine).
    pub fn insert(&self, values: Vec<(Revision, Arc<[u8]>)>) {
        if self.budget == 0 || values.is_empty() {
            return;
        }
        let mut held = self.held.write().unwrap_or_else(|p| p.into_inner());
        for (rev, value) in values {
            let added = value.len() + ENTRY_OVERHEAD;
            match held.values.insert(rev, value) {
                // Already held (two readers fetched it at once): same value, same queue slot.
                Some(old) => held.bytes = held.bytes - (old.len() + ENTRY_OVERHEAD) + added,
                None => {
                    held.bytes += added;
                    held.order.push_back(rev);
                }
            }
        }
        while held.bytes > self.budget {
            match held.order.pop_front() {
                Some(oldest) => held.remove(oldest),
                None => break,
            }
        }
        // Do not hold on to the capacity of a burst.
        if held.values.capacity() > 4 * held.values.len().max(1024) {
            held.values.shrink_to_fit();
            held.order.shrink_to_fit();
        }
    }

    fn count(&self, hits: usize, lookups: usize) {
        if self.budget > 0 {
            self.hits.fetch_add(hits as u64, Ordering::Relaxed);
            self.misses
                .fetch_add((lookups - hits) as u64, Ordering::Relaxed);
        }
    }

    /// Calls `visit(i, value)` for each `revs[i]` under one read lock, `None` when not held.
    pub fn read_many<E>(
        &self,
        revs: &[Revision],
        mut visit: impl FnMut(usize, Option<&[u8]>) -> Result<(), E>,
    ) -> Result<(), E> {
        let held = self.held.read().unwrap_or_else(|p| p.into_inner());
        let mut hits = 0;
        for (i, rev) in revs.iter().enumerate() {
            let found = held.values.get(rev).map(|v| &v[..]);
            hits += usize::from(found.is_some());
            visit(i, found)?;
        }
        self.count(hits, revs.len());
        Ok(())
    }

    /// Drops everything (the tables were replaced, e.g. by a Raft snapshot).
    pub fn clear(&self) {
        let mut held = self.held.write().unwrap_or_else(|p| p.into_inner());
        *held = Held::default();
    }

    /// (entries, bytes) held.
    pub fn usage(&self) -> (usize, usize) {
        let held = self.held.read().unwrap_or_else(|p| p.into_inner());
        (held.values.len(), held.bytes)
    }

    pub fn stats(&self) -> RecentValuesStats {
        let (entries, bytes) = self.usage();
        RecentValuesStats {
            entries,
            bytes,
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(n: usize) -> Arc<[u8]> {
        vec![7u8; n].into()
    }

    fn rev(main: i64) -> Revision {
        Revision::new(main, 0)
    }

    impl RecentValues {
        fn get(&self, rev: Revision) -> Option<Vec<u8>> {
            let mut found = None;
            self.read_many(&[rev], |_, v| {
                found = v.map(<[u8]>::to_vec);
                Ok::<(), ()>(())
            })
            .expect("read");
            found
        }
    }

    #[test]
    fn worked_example() {
        let cache = RecentValues::new(330);
        cache.insert(vec![(rev(5), value(100))]);
        cache.insert(vec![(rev(6), value(100))]);
        assert!(cache.get(rev(5)).is_some());
        cache.insert(vec![(rev(3), value(100))]);
        assert!(cache.get(rev(5)).is_none(), "the first in is dropped first");
        assert!(cache.get(rev(6)).is_some());
        assert!(cache.get(rev(3)).is_some());
        assert!(cache.get(rev(8)).is_none());
        assert_eq!(cache.usage(), (2, 2 * (100 + ENTRY_OVERHEAD)));
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.misses), (3, 2), "{stats:?}");
    }

    #[test]
    fn many_lookups_keep_their_order_and_sub_revisions_are_distinct() {
        let cache = RecentValues::new(1 << 20);
        let written: Vec<_> = (0..3)
            .map(|sub| (Revision::new(10, sub), vec![sub as u8; 3].into()))
            .collect();
        cache.insert(written);
        let mut got: Vec<Option<Vec<u8>>> = Vec::new();
        let revs = [Revision::new(10, 2), rev(9), Revision::new(10, 0), rev(11)];
        cache
            .read_many(&revs, |i, v| {
                assert_eq!(i, got.len());
                got.push(v.map(|v| v.to_vec()));
                Ok::<(), ()>(())
            })
            .expect("read");
        assert_eq!(
            got,
            vec![Some(vec![2, 2, 2]), None, Some(vec![0, 0, 0]), None]
        );
    }

    #[test]
    fn a_value_inserted_twice_is_held_and_counted_once() {
        let cache = RecentValues::new(2 * (10 + ENTRY_OVERHEAD));
        cache.insert(vec![(rev(3), value(10))]);
        cache.insert(vec![(rev(3), value(10))]);
        assert_eq!(cache.usage(), (1, 10 + ENTRY_OVERHEAD));
        cache.insert(vec![(rev(4), value(10))]);
        assert_eq!(cache.usage(), (2, 2 * (10 + ENTRY_OVERHEAD)));
        cache.insert(vec![(rev(5), value(10))]);
        assert!(cache.get(rev(3)).is_none());
        assert_eq!(cache.usage(), (2, 2 * (10 + ENTRY_OVERHEAD)));
    }

    #[test]
    fn a_zero_budget_holds_nothing_and_clear_empties() {
        let off = RecentValues::new(0);
        off.insert(vec![(rev(1), value(1))]);
        assert_eq!(off.usage(), (0, 0));
        let cache = RecentValues::new(1 << 20);
        cache.insert(vec![(rev(1), value(1))]);
        cache.clear();
        assert!(cache.get(rev(1)).is_none());
        assert_eq!(cache.usage(), (0, 0));
    }

    #[test]
    fn a_value_larger_than_the_budget_is_not_kept() {
        let cache = RecentValues::new(100);
        cache.insert(vec![(rev(1), value(200))]);
        assert_eq!(cache.usage(), (0, 0));
    }
}
