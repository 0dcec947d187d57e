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
//! `3 put` holds create revision 2, version 2. An entry is 48 bytes.
//!
//! [`KeyIndex`] holds the lists: a B-tree in key order for ranges, and a hash table for the
//! lookups of one key that every put, delete, compare and single-key read makes (one hash
//! and one probe, instead of a descent through the tree that compares the key with a dozen
//! others in scattered memory: the criterion group `index/` in `store/benches/mvcc.rs` measures
//! both; docs/benchmarks.md change 27).

use std::collections::BTreeMap;
use std::hash::BuildHasher;
use std::ops::Bound;
use std::sync::Arc;

use hashbrown::HashTable;
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

/// The key index: every key with its [`IndexEntry`] list (module docs).
///
/// Each key and its list live in a slot of `slots`; the B-tree (key order, for ranges) maps the
/// key to its slot and shares the key's bytes with the slot, and the hash table holds only slot
/// numbers (4 bytes a bucket), hashed by the slot's key. Only the B-tree is ever iterated, so
/// nothing depends on the hash table's order (the apply stays deterministic); its hasher is
/// seeded at random, so keys chosen to collide cannot be prepared in advance.
#[derive(Default)]
pub struct KeyIndex {
    ordered: BTreeMap<Arc<[u8]>, u32>,
    by_key: HashTable<u32>,
    hasher: foldhash::fast::RandomState,
    slots: Vec<Slot>,
    /// Slots of removed keys (their `key` is `None`), reused first.
    free: Vec<u32>,
}

/// One key and its list; a free slot has no key and an empty list.
#[derive(Default)]
struct Slot {
    key: Option<Arc<[u8]>>,
    entries: Vec<IndexEntry>,
}

/// The keys of a [`KeyIndex::range`] with their lists, in key order.
pub struct IndexRange<'a>(RangeKind<'a>);

enum RangeKind<'a> {
    One(Option<(&'a [u8], &'a Vec<IndexEntry>)>),
    Many {
        keys: std::collections::btree_map::Range<'a, Arc<[u8]>, u32>,
        slots: &'a [Slot],
    },
}

impl<'a> Iterator for IndexRange<'a> {
    type Item = (&'a [u8], &'a Vec<IndexEntry>);

    fn next(&mut self) -> Option<Self::Item> {
        match &mut self.0 {
            RangeKind::One(one) => one.take(),
            RangeKind::Many { keys, slots } => {
                let (k, slot) = keys.next()?;
                Some((&**k, &slots[*slot as usize].entries))
            }
        }
    }
}

/// Whether a slot number in the hash table is `key`'s slot.
fn holds<'a>(slots: &'a [Slot], key: &'a [u8]) -> impl Fn(&u32) -> bool + 'a {
    move |&slot| slots[slot as usize].key.as_deref() == Some(key)
}

impl KeyIndex {
    /// The index of `(key, entries)` pairs (any order; a key given twice keeps its last list).
    pub fn from_lists(lists: Vec<(Vec<u8>, Vec<IndexEntry>)>) -> KeyIndex {
        let mut index = KeyIndex {
            by_key: HashTable::with_capacity(lists.len()),
            slots: Vec::with_capacity(lists.len()),
            ..KeyIndex::default()
        };
        let sorted = lists.is_sorted_by(|a, b| a.0 < b.0);
        if sorted {
            // A sorted run without duplicates: the B-tree is built bottom-up, not key by key.
            let mut ordered = Vec::with_capacity(lists.len());
            for (key, entries) in lists {
                let hash = index.hasher.hash_one(&key[..]);
                let key: Arc<[u8]> = key.into();
                let slot = index.push_slot(hash, key.clone(), entries);
                ordered.push((key, slot));
            }
            index.ordered = ordered.into_iter().collect();
        } else {
            for (key, entries) in lists {
                index.insert(key, entries);
            }
        }
        index
    }

    pub fn len(&self) -> usize {
        self.ordered.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ordered.is_empty()
    }

    /// The slot of `key`, if it is in the index.
    fn slot_of(&self, key: &[u8]) -> Option<u32> {
        self.find_slot(self.hasher.hash_one(key), key)
    }

    /// The slot of `key`, whose hash is `hash`, if it is in the index.
    fn find_slot(&self, hash: u64, key: &[u8]) -> Option<u32> {
        self.by_key.find(hash, holds(&self.slots, key)).copied()
    }

    /// Puts `key` (whose hash is `hash`) and its list in a slot (a free one first) and the
    /// slot in the hash table; the caller adds the key to the B-tree. `key` must not be in the
    /// index.
    fn push_slot(&mut self, hash: u64, key: Arc<[u8]>, entries: Vec<IndexEntry>) -> u32 {
        let filled = Slot {
            key: Some(key),
            entries,
        };
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot as usize] = filled;
                slot
            }
            None => {
                // A slot number is 32 bits: 4 billion keys would need over 600 GiB of index
                // (about 168 bytes a key), far past any member's memory.
                self.slots.push(filled);
                (self.slots.len() - 1) as u32
            }
        };
        let (slots, hasher) = (&self.slots, &self.hasher);
        self.by_key.insert_unique(hash, slot, |&s| {
            hasher.hash_one(slots[s as usize].key.as_deref().unwrap_or_default())
        });
        slot
    }

    pub fn get(&self, key: &[u8]) -> Option<&Vec<IndexEntry>> {
        let slot = self.slot_of(key)?;
        Some(&self.slots[slot as usize].entries)
    }

    pub fn get_mut(&mut self, key: &[u8]) -> Option<&mut Vec<IndexEntry>> {
        let slot = self.slot_of(key)?;
        Some(&mut self.slots[slot as usize].entries)
    }

    /// Sets `key`'s list (a new key, or a replacement of its list).
    pub fn insert(&mut self, key: Vec<u8>, entries: Vec<IndexEntry>) {
        let hash = self.hasher.hash_one(&key[..]);
        if let Some(slot) = self.find_slot(hash, &key) {
            self.slots[slot as usize].entries = entries;
            return;
        }
        let key: Arc<[u8]> = key.into();
        let slot = self.push_slot(hash, key.clone(), entries);
        self.ordered.insert(key, slot);
    }

    /// Removes `key` and its list.
    pub fn remove(&mut self, key: &[u8]) {
        let hash = self.hasher.hash_one(key);
        let Ok(found) = self.by_key.find_entry(hash, holds(&self.slots, key)) else {
            return;
        };
        let (slot, _) = found.remove();
        self.ordered.remove(key);
        self.slots[slot as usize] = Slot::default();
        self.free.push(slot);
    }

    /// About how many bytes the index holds on the heap: every key's bytes with its shared
    /// allocation's two counters, every list's capacity, the slots, the hash table's buckets
    /// (a slot number and a control byte each) and the B-tree's key and slot pairs (a node is
    /// about two thirds full when keys arrive in random order, so half as much again).
    pub fn bytes_estimate(&self) -> usize {
        let keys: usize = self.ordered.keys().map(|k| 16 + k.len()).sum();
        let entries: usize = self
            .slots
            .iter()
            .map(|s| s.entries.capacity() * std::mem::size_of::<IndexEntry>())
            .sum();
        let slots = self.slots.capacity() * std::mem::size_of::<Slot>();
        // hashbrown keeps at most 7 of every 8 buckets full.
        let buckets = self.by_key.capacity() * 8 / 7;
        let hash = buckets * (std::mem::size_of::<u32>() + 1);
        let btree = self.ordered.len() * std::mem::size_of::<(Arc<[u8]>, u32)>() * 3 / 2;
        keys + entries + slots + hash + btree
    }

    /// The keys within `bounds`, in key order; a range of one key is a hash lookup.
    pub fn range<'a>(&'a self, bounds: (Bound<&[u8]>, Bound<&[u8]>)) -> IndexRange<'a> {
        if let (Bound::Included(a), Bound::Included(b)) = bounds
            && a == b
        {
            return IndexRange(RangeKind::One(self.slot_of(a).and_then(|slot| {
                let Slot { key, entries } = &self.slots[slot as usize];
                Some((key.as_deref()?, entries))
            })));
        }
        if let (Bound::Included(a) | Bound::Excluded(a), Bound::Included(b) | Bound::Excluded(b)) =
            bounds
            && (a > b || (a == b && !matches!(bounds, (Bound::Included(_), Bound::Included(_)))))
        {
            // BTreeMap::range panics on a start past the end (or equal to it, both excluded);
            // such a range is empty.
            return IndexRange(RangeKind::One(None));
        }
        IndexRange(RangeKind::Many {
            keys: self.ordered.range::<[u8], _>(bounds),
            slots: &self.slots,
        })
    }

    /// Every key with its list, in key order.
    pub fn iter(&self) -> IndexRange<'_> {
        self.range((Bound::Unbounded, Bound::Unbounded))
    }

    /// Every key's list, in key order.
    pub fn values(&self) -> impl Iterator<Item = &Vec<IndexEntry>> {
        self.iter().map(|(_, v)| v)
    }
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

    fn keys_of(r: IndexRange<'_>) -> Vec<(Vec<u8>, i64)> {
        r.map(|(k, e)| (k.to_vec(), e[0].rev.main)).collect()
    }

    #[test]
    fn key_index_agrees_with_a_btree_through_growth_removal_and_slot_reuse() {
        // Thousands of random inserts, replacements and removes over a small key space: the
        // hash table grows (rehashing every slot number by its slot's key) and freed slots are
        // reused many times over; lookups and ranges must agree with a plain B-tree throughout.
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut index = KeyIndex::default();
        let mut model: BTreeMap<Vec<u8>, Vec<IndexEntry>> = BTreeMap::new();
        for step in 0..40_000i64 {
            let key = format!("k{:05}", rng.random_range(0..3_000)).into_bytes();
            if rng.random_range(0..4) == 0 {
                index.remove(&key);
                model.remove(&key);
            } else {
                let list = vec![put(step + 1, step + 1, 1)];
                index.insert(key.clone(), list.clone());
                model.insert(key, list);
            }
            if step % 5_000 == 4_999 {
                assert_eq!(index.len(), model.len());
                for i in 0..3_000 {
                    let key = format!("k{i:05}").into_bytes();
                    assert_eq!(index.get(&key), model.get(&key), "step {step}, {i}");
                }
                let all: Vec<_> = model
                    .iter()
                    .map(|(k, v)| (k.clone(), v[0].rev.main))
                    .collect();
                assert_eq!(keys_of(index.iter()), all);
            }
        }
        assert!(index.free.len() + index.len() == index.slots.len());
    }

    #[test]
    fn key_index_point_lookups_and_ranges_agree_with_a_btree() {
        // Built from an unsorted run (one key given twice keeps its last list), then changed.
        let mut index = KeyIndex::from_lists(vec![
            (b"b".to_vec(), vec![put(2, 2, 1)]),
            (b"a".to_vec(), vec![put(1, 1, 1)]),
            (b"d".to_vec(), vec![put(4, 4, 1)]),
            (b"a".to_vec(), vec![put(3, 3, 1)]),
        ]);
        let mut model: BTreeMap<Vec<u8>, Vec<IndexEntry>> = BTreeMap::new();
        model.insert(b"a".to_vec(), vec![put(3, 3, 1)]);
        model.insert(b"b".to_vec(), vec![put(2, 2, 1)]);
        model.insert(b"d".to_vec(), vec![put(4, 4, 1)]);
        index.insert(b"c".to_vec(), vec![put(5, 5, 1)]);
        model.insert(b"c".to_vec(), vec![put(5, 5, 1)]);
        index.remove(b"b");
        model.remove(&b"b"[..]);
        index.remove(b"zz"); // not there: nothing changes
        // The freed slot is reused by the next new key and holds only that key's list.
        index.insert(b"e".to_vec(), vec![put(6, 6, 1)]);
        model.insert(b"e".to_vec(), vec![put(6, 6, 1)]);
        assert_eq!(index.free.len(), 0);
        index.get_mut(b"a").expect("a").push(tomb(7));
        model.get_mut(&b"a"[..]).expect("a").push(tomb(7));

        assert_eq!(index.len(), model.len());
        for (k, v) in &model {
            assert_eq!(index.get(k), Some(v));
        }
        assert_eq!(index.get(b"b"), None);
        let all: Vec<_> = model
            .iter()
            .map(|(k, v)| (k.clone(), v[0].rev.main))
            .collect();
        assert_eq!(keys_of(index.iter()), all);
        let b = |x: &'static [u8]| x;
        for bounds in [
            (Bound::Included(b(b"a")), Bound::Included(b(b"a"))),
            (Bound::Included(b(b"b")), Bound::Included(b(b"b"))),
            (Bound::Included(b(b"b")), Bound::Excluded(b(b"e"))),
            (Bound::Excluded(b(b"a")), Bound::Unbounded),
            (Bound::Unbounded, Bound::Excluded(b(b"d"))),
            (Bound::Included(b(b"c")), Bound::Excluded(b(b"c"))),
        ] {
            let want: Vec<_> = model
                .range::<[u8], _>(bounds)
                .map(|(k, v)| (k.clone(), v[0].rev.main))
                .collect();
            assert_eq!(keys_of(index.range(bounds)), want, "{bounds:?}");
        }
        // Ranges a B-tree refuses (start past the end; equal and both excluded) are empty.
        assert!(
            index
                .range((Bound::Included(b(b"d")), Bound::Excluded(b(b"a"))))
                .next()
                .is_none()
        );
        assert!(
            index
                .range((Bound::Excluded(b(b"a")), Bound::Excluded(b(b"a"))))
                .next()
                .is_none()
        );
    }
}
