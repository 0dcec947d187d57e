//! openraft's storage conformance suite against the RocksDB-backed log store and state machine.

use std::sync::Arc;

use keel_store::engine::Engine;
use keel_store::engine::rocks::RocksEngine;
use keel_store::mvcc::MvccStore;
use keel_store::raft::{LogStore, StateMachine, TypeConfig};
use openraft::StorageError;
use openraft::testing::log::{StoreBuilder, Suite};

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine: Arc<dyn Engine> =
            Arc::new(RocksEngine::open(&dir.path().join("db")).expect("open rocksdb"));
        let mvcc = Arc::new(MvccStore::open(engine.clone()).expect("open mvcc"));
        let log = LogStore::new(engine).expect("log store");
        let sm =
            StateMachine::open(mvcc, &dir.path().join("snapshots"), None).expect("state machine");
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite() {
    Suite::test_all(Builder)
        .await
        .expect("openraft storage suite");
}
