//! The in-memory key index: for every key, the revisions at which it was written.
//!
//! Each key maps to its list of [`IndexEntry`]s in revision order; an entry is a put or a
//! tombstone (delete). The value itself lives in the `kv` table under the entry's revision, so
//! a read at the current revision is one index lookup and one point read, and a read at a past
//! revision is a binary search in the key's list.
//!
//! Worked example. The writes
//! ```text
//! rev 2: put  foo=a          rev 5: delete foo
//! rev 3: put  foo=b          rev 7: put  foo=c
//! ```
//! leave `foo -> [2 put, 3 put, 5 tombstone, 7 put]`. Reading `foo`:
//! - at revision 4: the last entry at or below 4 is `3 put` → value `b` (version 2);
//! - at revision 6: the last entry at or below 6 is `5 tombstone` → not found;
//! - at revision 8: `7 put` → `c`, a new generation (create_revision 7, version 1).
//!
//! Compacting at revision 6 drops every entry below 6 except the last one at or below 6, and
//! drops that one too when it is a tombstone: the list becomes `[7 put]`. Compacting at 4 would
//! leave `[3 put, 5 tombstone, 7 put]`: `3` is still the value visible at revision 4.
//!
//! The versions and create revisions are not kept here; they are in the stored `KeyValue`,
//! which keeps the index at about 16 bytes per revision plus the key.

use super::revision::Revision;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub rev: Revision,
    pub tombstone: bool,
}

/// The entry visible at revision `at`: the last one with `main <= at`, if it is not a tombstone.
pub fn visible_at(entries: &[IndexEntry], at: i64) -> Option<Revision> {
    let idx = entries.partition_point(|e| e.rev.main <= at);
    let e = entries.get(idx.checked_sub(1)?)?;
    (!e.tombstone).then_some(e.rev)
}

/// The last entry strictly before revision `rev` (for a historical event's prev_kv).
pub fn before(entries: &[IndexEntry], rev: Revision) -> Option<IndexEntry> {
    let idx = entries.partition_point(|e| e.rev < rev);
    entries.get(idx.checked_sub(1)?).copied()
}

/// Compacts one key's list at revision `at`; returns the revisions to delete from the `kv` table.
pub fn compact_entries(entries: &mut Vec<IndexEntry>, at: i64) -> Vec<IndexEntry> {
    let cut = entries.partition_point(|e| e.rev.main <= at);
    if cut == 0 {
        return Vec::new();
    }
    let keep_last = !entries[cut - 1].tombstone;
    let remove_upto = if keep_last { cut - 1 } else { cut };
    entries.drain(..remove_upto).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(main: i64, tombstone: bool) -> IndexEntry {
        IndexEntry {
            rev: Revision::new(main, 0),
            tombstone,
        }
    }

    #[test]
    fn worked_example() {
        let entries = vec![e(2, false), e(3, false), e(5, true), e(7, false)];
        assert_eq!(visible_at(&entries, 1), None);
        assert_eq!(visible_at(&entries, 4), Some(Revision::new(3, 0)));
        assert_eq!(visible_at(&entries, 6), None);
        assert_eq!(visible_at(&entries, 8), Some(Revision::new(7, 0)));
        assert_eq!(before(&entries, Revision::new(5, 0)), Some(e(3, false)));

        let mut at6 = entries.clone();
        let gone = compact_entries(&mut at6, 6);
        assert_eq!(at6, vec![e(7, false)]);
        assert_eq!(gone.len(), 3);

        let mut at4 = entries.clone();
        compact_entries(&mut at4, 4);
        assert_eq!(at4, vec![e(3, false), e(5, true), e(7, false)]);
        assert_eq!(visible_at(&at4, 4), Some(Revision::new(3, 0)));

        let mut at1 = entries;
        assert!(compact_entries(&mut at1, 1).is_empty());
    }
}
