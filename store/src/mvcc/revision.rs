//! Revisions and their on-disk encoding.
//!
//! A revision is `(main, sub)`: `main` is the store revision a write took, `sub` orders the
//! writes inside one revision (the operations of a Txn). In the `kv` table the key is
//! `main (8 bytes BE) ‖ sub (8 bytes BE) ‖ kind (1 byte: 0 = put, 1 = tombstone)`, so a forward
//! scan is revision order and a history read is a range scan.

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
}
