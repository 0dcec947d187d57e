//! openraft's storage conformance suite against the RocksDB-backed log store and state machine.

use std::sync::Arc;

use keel_store::engine::Engine;
use keel_store::engine::rocks::RocksEngine;
use keel_store::mvcc::MvccStore;
use keel_store::raft::{LogStore, StateMachine, TypeConfig};
use openraft::StorageError;
use openraft::testing::log::{StoreBuilder, Suite};

/// Builds stores for the suite; `inline_as: Some(id)` makes the log store fsync a follower's
/// appends inline as member `id` (an id no vote of the suite names, so every append is a
/// follower's).
struct Builder {
    inline_as: Option<u64>,
}

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine: Arc<dyn Engine> =
            Arc::new(RocksEngine::open(&dir.path().join("db")).expect("open rocksdb"));
        let mvcc = Arc::new(MvccStore::open(engine.clone()).expect("open mvcc"));
        let mut log = LogStore::new(engine).expect("log store");
        if let Some(id) = self.inline_as {
            log = log
                .syncing_follower_appends_inline(id)
                .expect("inline syncing");
        }
        let sm =
            StateMachine::open(mvcc, &dir.path().join("snapshots"), None).expect("state machine");
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite() {
    Suite::test_all(Builder { inline_as: None })
        .await
        .expect("openraft storage suite");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite_with_follower_appends_synced_inline() {
    Suite::test_all(Builder {
        inline_as: Some(0xFEED),
    })
    .await
    .expect("openraft storage suite (inline syncing)");
}

fn open_log(dir: &std::path::Path) -> LogStore {
    let engine: Arc<dyn Engine> =
        Arc::new(RocksEngine::open(&dir.join("db")).expect("open rocksdb"));
    LogStore::new(engine).expect("log store")
}

fn blank(term: u64, index: u64) -> keel_store::raft::types::Entry {
    use openraft::entry::RaftEntry;
    keel_store::raft::types::Entry::new_blank(openraft::LogId::new_term_index(term, index))
}

async fn log_ids(
    log: &mut LogStore,
    range: std::ops::Range<u64>,
) -> Vec<keel_store::raft::types::LogId> {
    use openraft::RaftLogReader;
    use openraft::storage::RaftLogStorage;
    let mut reader = log.get_log_reader().await;
    reader
        .try_get_log_entries(range)
        .await
        .expect("read log")
        .into_iter()
        .map(|e| e.log_id)
        .collect()
}

/// The in-memory cache of recent entries serves exactly what the engine holds: after appends
/// beyond its capacity, a truncation by a new leader, a purge, and after reopening (empty
/// cache, every read from RocksDB). The committed log id, no longer written on its own, is
/// carried by the next append or written when the store closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_log_reads_match_the_engine_and_committed_survives_reopen() {
    use openraft::storage::{RaftLogStorage, RaftLogStorageExt};
    let id = |t: u64, i: u64| openraft::LogId::new_term_index(t, i);
    let dir = tempfile::tempdir().expect("tempdir");
    let expected_after_truncate: Vec<_> = (1..=4000)
        .map(|i| id(1, i))
        .chain((4001..=4100).map(|i| id(2, i)))
        .collect();
    {
        let mut log = open_log(dir.path());
        // More than the cache holds (4096 entries), in batches as openraft appends them.
        for start in (1..=5000).step_by(100) {
            log.blocking_append((start..start + 100).map(|i| blank(1, i)))
                .await
                .expect("append");
        }
        assert_eq!(
            log_ids(&mut log, 1..5001).await,
            (1..=5000).map(|i| id(1, i)).collect::<Vec<_>>()
        );
        assert_eq!(
            log_ids(&mut log, 4990..6000).await,
            (4990..=5000).map(|i| id(1, i)).collect::<Vec<_>>()
        );
        // A new leader replaces the tail from 4001.
        log.truncate_after(Some(id(1, 4000)))
            .await
            .expect("truncate");
        assert_eq!(
            log_ids(&mut log, 3999..4002).await,
            vec![id(1, 3999), id(1, 4000)]
        );
        log.blocking_append((4001..=4100).map(|i| blank(2, i)))
            .await
            .expect("append");
        assert_eq!(log_ids(&mut log, 1..10_000).await, expected_after_truncate);
        log.save_committed(Some(id(2, 4050)))
            .await
            .expect("save committed");
        assert_eq!(
            log.read_committed().await.expect("read committed"),
            Some(id(2, 4050))
        );
        log.blocking_append([blank(2, 4101)]).await.expect("append");
        log.save_committed(Some(id(2, 4101)))
            .await
            .expect("save committed");
        log.purge(id(1, 2000)).await.expect("purge");
        assert_eq!(log_ids(&mut log, 1..2002).await, vec![id(1, 2001)]);
        assert_eq!(
            log_ids(&mut log, 4099..4200).await,
            vec![id(2, 4099), id(2, 4100), id(2, 4101)]
        );
    }
    let mut log = open_log(dir.path());
    let mut expected: Vec<_> = expected_after_truncate[2000..].to_vec();
    expected.push(id(2, 4101));
    assert_eq!(log_ids(&mut log, 1..10_000).await, expected);
    assert_eq!(
        log.read_committed().await.expect("read committed"),
        Some(id(2, 4101))
    );
    let state = log.get_log_state().await.expect("log state");
    assert_eq!(state.last_log_id, Some(id(2, 4101)));
    assert_eq!(state.last_purged_log_id, Some(id(1, 2000)));
}

/// A command travels as its protobuf encoding (the format logs already on disk hold), made
/// once and shared by every clone; one decoded from the wire keeps the bytes it arrived as.
#[test]
fn a_command_travels_as_the_bytes_it_was_encoded_or_received_as() {
    use keel_proto::etcdserverpb::PutRequest;
    use keel_proto::keelpb::RaftRequest;
    use keel_proto::keelpb::raft_request::Request;
    use keel_store::raft::Command;
    use keel_store::raft::types::{decode, encode};
    use prost::Message;

    let request = RaftRequest {
        request: Some(Request::Put(PutRequest {
            key: b"/a".to_vec(),
            value: b"v".to_vec(),
            ..Default::default()
        })),
        origin: None,
    };
    let protobuf = request.encode_to_vec();
    let command = Command::new(request.clone());
    // bincode's byte string: a little-endian u64 length, then the bytes.
    let wire = [(protobuf.len() as u64).to_le_bytes().as_slice(), &protobuf].concat();
    assert_eq!(encode(&command).expect("encode"), wire);
    let clone = command.clone();
    assert_eq!(
        clone.encoded().as_ptr(),
        command.encoded().as_ptr(),
        "one encoding, shared"
    );

    // The same put with `lease = 0` written out (prost leaves defaults out): a follower that
    // receives these bytes logs them as they are, not a re-encoding of what it decoded.
    let put_with_lease_zero = {
        let mut put = PutRequest {
            key: b"/a".to_vec(),
            value: b"v".to_vec(),
            ..Default::default()
        }
        .encode_to_vec();
        put.extend_from_slice(&[0x18, 0x00]); // field 3 (lease), varint 0
        let mut outer = vec![0x0a, put.len() as u8]; // RaftRequest field 1 (put), length
        outer.extend_from_slice(&put);
        outer
    };
    assert_ne!(put_with_lease_zero, protobuf, "not the canonical encoding");
    let received_wire = [
        (put_with_lease_zero.len() as u64).to_le_bytes().as_slice(),
        &put_with_lease_zero,
    ]
    .concat();
    let received: Command = decode(&received_wire).expect("decode");
    assert_eq!(received.request(), &request);
    assert_eq!(received.encoded(), put_with_lease_zero.as_slice());
    assert_eq!(encode(&received).expect("encode"), received_wire);
    assert_eq!(received.into_request(), request);
}
