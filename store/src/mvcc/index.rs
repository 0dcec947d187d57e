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
//! Each entry also carries the written `KeyValue`'s create revision, version and lease (all 0
//! for a tombstone), so a put (which needs the previous version's create revision, version and
//! lease), a compare on anything but the value, and a keys-only or count read need no value
//! read from the `kv` table. In the example, `7 put` holds create revision 7, version 1;
//! `3 put` holds create revision 2, version 2. An entry is 40 bytes plus the key.

use keel_proto::mvccpb::KeyValue;

use super::revision::Revision;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub rev: Revision,
    pub tombstone: bool,
    pub create_revision: i64,
    pub version: i64,
    pub lease: i64,
}

impl IndexEntry {
    /// The entry for `kv` written at `rev`.
    pub fn of(rev: Revision, tombstone: bool, kv: &KeyValue) -> IndexEntry {
        Self::from_fields(rev, tombstone, kv.create_revision, kv.version, kv.lease)
    }

    /// The entry for a `KeyValue` with these fields written at `rev` (a tombstone keeps none).
    pub fn from_fields(
        rev: Revision,
        tombstone: bool,
        create_revision: i64,
        version: i64,
        lease: i64,
    ) -> IndexEntry {
        if tombstone {
            return IndexEntry {
                rev,
                tombstone,
                create_revision: 0,
                version: 0,
                lease: 0,
            };
        }
        IndexEntry {
            rev,
            tombstone,
            create_revision,
            version,
            lease,
        }
    }

    /// The `KeyValue` this entry describes, without its value.
    pub fn key_value_without_value(&self, key: &[u8]) -> KeyValue {
        KeyValue {
            key: key.to_vec(),
            create_revision: self.create_revision,
            mod_revision: self.rev.main,
            version: self.version,
            value: Vec::new(),
            lease: self.lease,
        }
    }
}

/// The entry visible at revision `at`: the last one with `main <= at`, if it is not a tombstone.
pub fn visible_at(entries: &[IndexEntry], at: i64) -> Option<IndexEntry> {
    // Most reads are at the current revision: the last entry, without a search through a long
    // history (one cache line instead of several).
    if let Some(last) = entries.last()
        && last.rev.main <= at
    {
        return (!last.tombstone).then_some(*last);
    }
    let idx = entries.partition_point(|e| e.rev.main <= at);
    let e = entries.get(idx.checked_sub(1)?)?;
    (!e.tombstone).then_some(*e)
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

    fn put(main: i64, create_revision: i64, version: i64) -> IndexEntry {
        let kv = KeyValue {
            create_revision,
            version,
            ..Default::default()
        };
        IndexEntry::of(Revision::new(main, 0), false, &kv)
    }

    fn tomb(main: i64) -> IndexEntry {
        IndexEntry::of(Revision::new(main, 0), true, &KeyValue::default())
    }

    #[test]
    fn worked_example() {
        let entries = vec![put(2, 2, 1), put(3, 2, 2), tomb(5), put(7, 7, 1)];
        assert_eq!(visible_at(&entries, 1), None);
        let at4 = visible_at(&entries, 4).expect("visible at 4");
        assert_eq!(
            (at4.rev, at4.create_revision, at4.version),
            (Revision::new(3, 0), 2, 2)
        );
        assert_eq!(visible_at(&entries, 6), None);
        let at8 = visible_at(&entries, 8).expect("visible at 8");
        assert_eq!(
            (at8.rev, at8.create_revision, at8.version),
            (Revision::new(7, 0), 7, 1)
        );
        assert_eq!(before(&entries, Revision::new(5, 0)), Some(put(3, 2, 2)));
        let kv = at8.key_value_without_value(b"foo");
        assert_eq!(
            (kv.key.as_slice(), kv.mod_revision, kv.version),
            (&b"foo"[..], 7, 1)
        );

        let mut at6 = entries.clone();
        let gone = compact_entries(&mut at6, 6);
        assert_eq!(at6, vec![put(7, 7, 1)]);
        assert_eq!(gone.len(), 3);

        let mut c4 = entries.clone();
        compact_entries(&mut c4, 4);
        assert_eq!(c4, vec![put(3, 2, 2), tomb(5), put(7, 7, 1)]);
        assert_eq!(visible_at(&c4, 4), Some(put(3, 2, 2)));

        let mut at1 = entries;
        assert!(compact_entries(&mut at1, 1).is_empty());
    }
}
