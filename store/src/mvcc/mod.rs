//! etcd v3 MVCC on top of an [`Engine`](crate::engine::Engine).
//!
//! API CONTRACT (filled in by the implementation; signatures are fixed — the Raft state machine
//! and the server code against them):
//!
//! ```ignore
//! pub struct MvccStore { .. }                       // Send + Sync; shared as Arc<MvccStore>
//! impl MvccStore {
//!     pub fn open(engine: Arc<dyn Engine>) -> Result<MvccStore, StoreError>;
//!     pub fn reload(&self) -> Result<(), StoreError>;   // rebuild in-memory state from the engine
//!                                                        // (after a Raft snapshot was installed)
//!     pub fn engine(&self) -> &Arc<dyn Engine>;
//!     pub fn current_revision(&self) -> i64;        // committed (visible) revision; 1 when fresh
//!     pub fn compact_revision(&self) -> i64;        // 0 when never compacted
//!     pub fn range(&self, req: &RangeRequest) -> Result<RangeResponse, ApplyError>;
//!     pub fn history(&self, req: &HistoryRequest) -> Result<HistoryBatch, ApplyError>;
//!     pub fn lease(&self, id: i64) -> Option<LeaseInfo>;
//!     pub fn leases(&self) -> Vec<LeaseInfo>;       // ordered by id
//!     pub fn begin_apply(&self) -> ApplyBatch<'_>;
//!     pub fn get_meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
//!     pub fn hash_kv(&self, revision: i64) -> Result<HashKvResult, ApplyError>;
//! }
//! impl ApplyBatch<'_> {
//!     pub fn apply(&mut self, req: &RaftRequest) -> ApplyOutcome;   // never panics on input
//!     pub fn put_meta(&mut self, key: &[u8], value: Vec<u8>);      // same atomic batch
//!     pub fn commit(self, sync: bool) -> Result<(), StoreError>;   // one engine write, then
//!                                                                   // publish to readers
//! }
//! ```
