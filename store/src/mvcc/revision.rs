//! Revisions and their on-disk encoding.
//!
//! A revision is `(main, sub)`: `main` is the store revision a write took, `sub` orders the
//! writes inside one revision (the operations of a Txn). In the `kv` table the key is
//! `main (8 bytes BE) ‖ sub (8 bytes BE) ‖ kind (1 byte: 0 = put, 1 = tombstone)`, so a forward
//! scan is revision order and a history read is a range scan. etcd's own key of a revision
//! (`main ‖ '_' ‖ sub`, `t` appended for a tombstone) is used where Keel speaks etcd's formats:
//! backups and HashKV.

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Revision {
    pub main: i64,
    pub sub: i64,
}

impl Revision {
    pub const fn new(main: i64, sub: i64) -> Self {
        Self { main, sub }
    }

    /// The `kv` table key of this revision.
    pub fn encode(self, tombstone: bool) -> [u8; 17] {
        let mut out = [0u8; 17];
        out[..8].copy_from_slice(&(self.main as u64).to_be_bytes());
        out[8..16].copy_from_slice(&(self.sub as u64).to_be_bytes());
        out[16] = u8::from(tombstone);
        out
    }

    /// The smallest `kv` table key at or after `(main, 0)`.
    pub fn lower_bound(main: i64) -> [u8; 8] {
        (main.max(0) as u64).to_be_bytes()
    }

    /// Decodes a `kv` table key into the revision and whether it is a tombstone.
    pub fn decode(key: &[u8]) -> Option<(Revision, bool)> {
        if key.len() != 17 {
            return None;
        }
        let main = u64::from_be_bytes(key[..8].try_into().ok()?) as i64;
        let sub = u64::from_be_bytes(key[8..16].try_into().ok()?) as i64;
        Some((Revision { main, sub }, key[16] == 1))
    }

    /// etcd's key of this revision in its `key` bucket (backups, HashKV): `main` (8 bytes BE),
    /// `_`, `sub` (8 bytes BE), and `t` for a tombstone. Sorts like [`Revision::encode`].
    pub fn encode_etcd(self, tombstone: bool) -> Vec<u8> {
        let mut key = Vec::with_capacity(18);
        key.extend_from_slice(&(self.main as u64).to_be_bytes());
        key.push(b'_');
        key.extend_from_slice(&(self.sub as u64).to_be_bytes());
        if tombstone {
            key.push(b't');
        }
        key
    }

    /// Decodes etcd's key of a revision into the revision and whether it is a tombstone.
    pub fn decode_etcd(key: &[u8]) -> Option<(Revision, bool)> {
        let tombstone = match key.len() {
            17 => false,
            18 if key[17] == b't' => true,
            _ => return None,
        };
        if key[8] != b'_' {
            return None;
        }
        let main = u64::from_be_bytes(key[..8].try_into().ok()?) as i64;
        let sub = u64::from_be_bytes(key[9..17].try_into().ok()?) as i64;
        Some((Revision { main, sub }, tombstone))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_sorts_like_revisions() {
        let a = Revision::new(2, 5).encode(false);
        let b = Revision::new(3, 0).encode(true);
        let c = Revision::new(3, 1).encode(false);
        assert!(a < b && b < c);
        assert_eq!(Revision::decode(&b), Some((Revision::new(3, 0), true)));
        assert_eq!(Revision::decode(&b[..16]), None);
        assert!(Revision::lower_bound(3).as_slice() <= b.as_slice());
        assert!(Revision::lower_bound(3).as_slice() > a.as_slice());
    }

    #[test]
    fn etcd_encoding() {
        let t = Revision::new(5, 2).encode_etcd(true);
        assert_eq!(t, b"\0\0\0\0\0\0\0\x05_\0\0\0\0\0\0\0\x02t");
        assert_eq!(Revision::decode_etcd(&t), Some((Revision::new(5, 2), true)));
        let p = Revision::new(5, 2).encode_etcd(false);
        assert_eq!(
            Revision::decode_etcd(&p),
            Some((Revision::new(5, 2), false))
        );
        assert!(
            Revision::new(5, 1).encode_etcd(true) < p && p < Revision::new(6, 0).encode_etcd(false)
        );
        assert_eq!(Revision::decode_etcd(&t[..16]), None);
        let mut bad = p.clone();
        bad[8] = b'-';
        assert_eq!(Revision::decode_etcd(&bad), None);
    }
}
