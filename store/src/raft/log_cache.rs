//! The newest Raft log entries, kept in memory as openraft reads them back.
//!
//! Every entry a leader appends is read back at once by each follower's replication task and
//! again by the state machine's apply; a follower reads it back for apply. From RocksDB each
//! such read costs an iterator (a super-version reference, memtable and file iterators) and a
//! bincode decode, on the commit path of every write. The cache holds clones of the newest
//! entries so those reads are a lock and a clone.
//!
//! Invariant: when not empty, the cache holds the contiguous entries `[first, next)` and
//! `next - 1` is the last entry of the log, exactly as stored. [`super::log_store::LogStore`]
//! keeps it so by changing the cache under the same lock as the engine in every append,
//! truncation and purge. A read the cache does not fully cover goes to the engine.
//!
//! Worked example (capacity 4 entries):
//!
//! ```text
//! append 1..=3        cache [1, 2, 3]           first 1, next 4
//! append 4..=5        cache [2, 3, 4, 5]        1 evicted (over capacity)
//! read 3..6           served: [3, 4, 5]
//! read 1..3           not covered (1 was evicted): read from the engine
//! truncate_after(3)   cache [2, 3]              4 and 5 were replaced by a new leader's
//! append 4..=4 (t2)   cache [2, 3, 4']          the new entry 4
//! append 9..=9        cache [9]                 not contiguous (after a snapshot install):
//!                                               start again from this append
//! purge(9)            cache []                  purged entries are never served
//! ```

use std::collections::VecDeque;

use super::types::Entry;

/// Recent log entries; see the module documentation.
pub(crate) struct LogCache {
    entries: VecDeque<(Entry, usize)>,
    /// Index of `entries[0]`.
    first: u64,
    bytes: usize,
    max_entries: usize,
    max_bytes: usize,
}

impl LogCache {
    /// A cache of at most `max_entries` entries whose encodings add up to at most `max_bytes`.
    pub(crate) fn new(max_entries: usize, max_bytes: usize) -> Self {
        Self {
            entries: VecDeque::new(),
            first: 0,
            bytes: 0,
            max_entries,
            max_bytes,
        }
    }

    /// One past the last cached index (meaningless when empty).
    fn next(&self) -> u64 {
        self.first + self.entries.len() as u64
    }

    /// Records an appended entry whose encoding is `size` bytes. Entries are appended in
    /// index order; one that does not follow the cached ones starts the cache again.
    pub(crate) fn push(&mut self, entry: Entry, size: usize) {
        let index = entry.log_id.index;
        if self.entries.is_empty() || index != self.next() {
            self.clear();
            self.first = index;
        }
        self.bytes += size;
        self.entries.push_back((entry, size));
        while self.entries.len() > self.max_entries
            || (self.bytes > self.max_bytes && self.entries.len() > 1)
        {
            self.pop_front();
        }
    }

    fn pop_front(&mut self) {
        if let Some((_, size)) = self.entries.pop_front() {
            self.bytes -= size;
            self.first += 1;
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// Forgets the entries from index `from` on (they were truncated from the log).
    pub(crate) fn truncate_from(&mut self, from: u64) {
        while !self.entries.is_empty() && self.next() > from {
            if let Some((_, size)) = self.entries.pop_back() {
                self.bytes -= size;
            }
        }
    }

    /// Forgets the entries up to and including `upto` (they were purged from the log).
    pub(crate) fn purge_through(&mut self, upto: u64) {
        while !self.entries.is_empty() && self.first <= upto {
            self.pop_front();
        }
    }

    /// Clones of the entries `[start, end)` (`end` None: through the last entry) if the cache
    /// holds all of them; None sends the read to the engine.
    pub(crate) fn get(&self, start: u64, end: Option<u64>) -> Option<Vec<Entry>> {
        if self.entries.is_empty() {
            return None;
        }
        let next = self.next();
        let end = end.unwrap_or(next).min(next);
        if start < self.first {
            return None;
        }
        if start >= end {
            // Nothing in the log there: the engine would return no entries as well.
            return Some(Vec::new());
        }
        let from = (start - self.first) as usize;
        let to = (end - self.first) as usize;
        Some(
            self.entries
                .range(from..to)
                .map(|(e, _)| e.clone())
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::entry::RaftEntry;

    fn log_id(term: u64, index: u64) -> crate::raft::types::LogId {
        openraft::LogId::new_term_index(term, index)
    }

    fn entry(term: u64, index: u64) -> Entry {
        Entry::new_blank(log_id(term, index))
    }

    /// The log ids of what the cache served, and the expected ones from (term, index) pairs.
    fn ids(v: Option<Vec<Entry>>) -> Option<Vec<crate::raft::types::LogId>> {
        v.map(|v| v.iter().map(|e| e.log_id).collect())
    }

    fn expect(pairs: &[(u64, u64)]) -> Option<Vec<crate::raft::types::LogId>> {
        Some(pairs.iter().map(|&(t, i)| log_id(t, i)).collect())
    }

    #[test]
    fn follows_the_worked_example() {
        let mut c = LogCache::new(4, usize::MAX);
        for i in 1..=3 {
            c.push(entry(1, i), 10);
        }
        assert_eq!(ids(c.get(1, Some(4))), expect(&[(1, 1), (1, 2), (1, 3)]));
        for i in 4..=5 {
            c.push(entry(1, i), 10);
        }
        assert_eq!(ids(c.get(3, Some(6))), expect(&[(1, 3), (1, 4), (1, 5)]));
        assert_eq!(ids(c.get(3, None)), expect(&[(1, 3), (1, 4), (1, 5)]));
        assert_eq!(c.get(1, Some(3)), None, "evicted entries go to the engine");
        c.truncate_from(4);
        assert_eq!(ids(c.get(2, None)), expect(&[(1, 2), (1, 3)]));
        c.push(entry(2, 4), 10);
        assert_eq!(ids(c.get(4, Some(5))), expect(&[(2, 4)]));
        assert_eq!(
            ids(c.get(5, Some(9))),
            expect(&[]),
            "past the end of the log"
        );
        c.push(entry(2, 9), 10);
        assert_eq!(c.get(4, Some(5)), None, "a gap restarts the cache");
        assert_eq!(ids(c.get(9, None)), expect(&[(2, 9)]));
        c.purge_through(9);
        assert_eq!(c.get(9, None), None);
        assert_eq!(c.get(10, None), None, "an empty cache serves nothing");
    }

    #[test]
    fn keeps_within_its_byte_budget_but_always_the_last_entry() {
        let mut c = LogCache::new(100, 25);
        for i in 1..=3 {
            c.push(entry(1, i), 10);
        }
        assert_eq!(ids(c.get(2, None)), expect(&[(1, 2), (1, 3)]));
        assert_eq!(c.get(1, None), None);
        c.push(entry(1, 4), 1000);
        assert_eq!(ids(c.get(4, None)), expect(&[(1, 4)]));
        assert_eq!(c.bytes, 1000);
        c.truncate_from(1);
        assert_eq!(c.bytes, 0);
        assert_eq!(c.get(1, None), None);
    }
}
