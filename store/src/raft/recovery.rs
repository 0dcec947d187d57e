//! Disaster recovery: `--force-new-cluster`, etcd's way back from a lost quorum.
//!
//! When most members of a cluster are gone for good, the survivors cannot commit anything,
//! not even the membership change that would remove the dead. etcd's answer is to restart one
//! survivor with `--force-new-cluster`: it keeps the member's data and makes it the only
//! member of its cluster. Keel does the same in two steps (the server drives them):
//!
//! 1. The member starts as before and applies every entry its log says is committed (an entry
//!    it has but does not know to be committed is discarded, as etcd discards uncommitted
//!    entries); then Raft is stopped.
//! 2. [`forget_raft_state`] removes the Raft state — the log, the vote, the committed and
//!    purged markers, the applied log id, the membership and snapshot files — and keeps every
//!    table the state machine applied to (keys and their history, revisions, leases, auth,
//!    alarms). The member then starts a new one-member Raft group with the same member ID and
//!    cluster ID, as a member restored from a backup does.
//!
//! Worked example: members A, B, C; B and C are lost. A's log holds entries 1..=120, it knows
//! 118 to be committed and has applied 115. Step 1 applies 116..=118; 119 and 120 were perhaps
//! never committed and are dropped. Step 2 leaves A's store at the state of entry 118 with an
//! empty log; A initializes a group of {A}, elects itself, and serves every key it had; new
//! members are added with `member add` as in any cluster. B or C must never be started again
//! with their old data: they would still believe in the old three-member cluster.

use std::io;
use std::path::Path;
use std::sync::Arc;

use crate::engine::{Engine, Table, WriteBatch};
use crate::raft::state_machine::{META_LAST_APPLIED, META_MEMBERSHIP};
use crate::raft::types::{MemberNode, NodeId, StoredMembership, decode};

/// Step 2 above: forgets this member's Raft state, keeping what it applied. Returns what the
/// old membership recorded about `member` (its name and URLs), if it was a member.
pub fn forget_raft_state(
    engine: &Arc<dyn Engine>,
    snapshot_dir: &Path,
    member: NodeId,
) -> io::Result<Option<MemberNode>> {
    let io_err = |e: crate::engine::EngineError| io::Error::other(e.to_string());
    let node = match engine.get(Table::Meta, META_MEMBERSHIP).map_err(io_err)? {
        Some(bytes) => {
            let stored: StoredMembership = decode(&bytes)?;
            stored.membership().get_node(&member).cloned()
        }
        None => None,
    };
    let mut batch = WriteBatch::new();
    batch.clear_table(Table::RaftLog);
    batch.clear_table(Table::RaftMeta);
    batch.delete(Table::Meta, META_LAST_APPLIED.to_vec());
    batch.delete(Table::Meta, META_MEMBERSHIP.to_vec());
    engine.write(batch, true).map_err(io_err)?;
    if snapshot_dir.exists() {
        crate::raft::state_machine::remove_stale_snapshot_files(snapshot_dir)?;
    }
    Ok(node)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::memory::MemoryEngine;
    use crate::raft::types::encode;

    #[test]
    fn raft_state_goes_and_applied_data_stays() {
        let engine: Arc<dyn Engine> = Arc::new(MemoryEngine::new());
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("old.snap"), b"x").expect("write");
        let mut nodes = std::collections::BTreeMap::new();
        let a = MemberNode {
            name: "a".into(),
            peer_urls: vec!["http://a:2380".into()],
            ..Default::default()
        };
        nodes.insert(1u64, a.clone());
        nodes.insert(2u64, MemberNode::default());
        let membership = StoredMembership::new(
            None,
            openraft::Membership::new(vec![[1u64, 2].into_iter().collect()], nodes)
                .expect("membership"),
        );
        let mut batch = WriteBatch::new();
        batch.put(
            Table::RaftLog,
            5u64.to_be_bytes().to_vec(),
            b"entry".to_vec(),
        );
        batch.put(Table::RaftMeta, b"vote".to_vec(), b"v".to_vec());
        batch.put(
            Table::Meta,
            META_MEMBERSHIP.to_vec(),
            encode(&membership).expect("encode"),
        );
        batch.put(Table::Meta, META_LAST_APPLIED.to_vec(), b"applied".to_vec());
        batch.put(
            Table::Meta,
            b"mvcc/rev".to_vec(),
            7i64.to_be_bytes().to_vec(),
        );
        batch.put(Table::Kv, b"k".to_vec(), b"v".to_vec());
        batch.put(Table::Lease, b"l".to_vec(), b"t".to_vec());
        engine.write(batch, true).expect("write");

        let me = forget_raft_state(&engine, dir.path(), 1).expect("forget");
        assert_eq!(me, Some(a));
        for (table, key) in [
            (Table::RaftLog, 5u64.to_be_bytes().to_vec()),
            (Table::RaftMeta, b"vote".to_vec()),
            (Table::Meta, META_MEMBERSHIP.to_vec()),
            (Table::Meta, META_LAST_APPLIED.to_vec()),
        ] {
            assert_eq!(engine.get(table, &key).expect("get"), None, "{table:?}");
        }
        for (table, key) in [
            (Table::Meta, b"mvcc/rev".to_vec()),
            (Table::Kv, b"k".to_vec()),
            (Table::Lease, b"l".to_vec()),
        ] {
            assert!(
                engine.get(table, &key).expect("get").is_some(),
                "{table:?} kept"
            );
        }
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 0);
        assert_eq!(
            forget_raft_state(&engine, dir.path(), 1).expect("again"),
            None
        );
    }
}
