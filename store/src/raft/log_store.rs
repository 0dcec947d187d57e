//! The Raft log on the engine's `raft_log` and `raft_meta` tables, with group commit.
//!
//! Layout: `raft_log` maps the big-endian `u64` log index to the bincode encoding of the
//! openraft entry, so a forward scan is log order. `raft_meta` holds `vote`, `committed` and
//! `last_purged`.
//!
//! Group commit: [`LogStore::append`] writes the entries without syncing (they are readable at
//! once) and queues its completion callback for the sync thread. The sync thread takes every
//! callback queued so far, issues one write-ahead-log fsync for all of them, and only then tells
//! openraft the entries are durable, in the order they were appended. Under load many client
//! writes therefore share one fsync. The vote is written with a synchronous fsync before
//! `save_vote` returns, as Raft requires.
//!
//! Followers sync inline ([`LogStore::syncing_follower_appends_inline`]): on a follower the
//! fsync is on the write's critical path (the leader waits for the follower's answer, which
//! waits for the fsync), and handing it to the sync thread costs two thread wake-ups on that
//! path (the sync thread's, then openraft's core task's when the callback fires), each tens of
//! microseconds on a loaded two-core machine. A follower's append therefore fsyncs before it
//! returns and completes its callback itself. A leader keeps the sync thread: openraft starts
//! replicating an entry only after `append` returns, so an inline fsync there would put the
//! leader's fsync before the followers' instead of beside it. Who is leader is read from the
//! vote this store last saved (openraft saves the vote of every new leader it follows before
//! it appends that leader's entries); a wrong guess costs latency, never durability. While
//! callbacks wait in the sync thread's queue, appends queue behind them, so callbacks always
//! complete in append order.
//!
//! Reads: the newest entries (up to 4096, 8 MiB) are also kept in memory, changed under one
//! lock together with the engine, because each follower's replication and the apply read every
//! entry back right after it is appended (see `log_cache`). Older ranges come from RocksDB.
//!
//! The committed log id is advisory (openraft re-learns it from the leader), so it is not a
//! write of its own on every commit: it rides in the next append's batch, and closing the store
//! writes the last one.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};

use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};

use super::log_cache::LogCache;
use super::types::{Entry, LogId, NodeId, TypeConfig, Vote, decode, encode};
use crate::engine::{Direction, Engine, EngineError, ScanControl, Table, WriteBatch};

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_LAST_PURGED: &[u8] = b"last_purged";

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// Entries kept in memory at most, and their encoded bytes at most.
const CACHE_MAX_ENTRIES: usize = 4096;
const CACHE_MAX_BYTES: usize = 8 << 20;

/// Reads the Raft log; cheap to clone.
#[derive(Clone)]
pub struct LogReader {
    engine: Arc<dyn Engine>,
    cache: Arc<Mutex<LogCache>>,
}

impl LogReader {
    fn cache(&self) -> MutexGuard<'_, LogCache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn entries(&self, start: u64, end: Option<u64>) -> io::Result<Vec<Entry>> {
        if let Some(cached) = self.cache().get(start, end) {
            return Ok(cached);
        }
        let mut out = Vec::new();
        let mut failure = None;
        let end_key = end.map(index_key);
        self.engine
            .scan(
                Table::RaftLog,
                &index_key(start),
                end_key.as_ref().map(|k| &k[..]),
                Direction::Forward,
                &mut |_, v| match decode::<Entry>(v) {
                    Ok(e) => {
                        out.push(e);
                        ScanControl::Continue
                    }
                    Err(e) => {
                        failure = Some(e);
                        ScanControl::Stop
                    }
                },
            )
            .map_err(io_err)?;
        match failure {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    fn meta<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> io::Result<Option<T>> {
        match self.engine.get(Table::RaftMeta, key).map_err(io_err)? {
            Some(bytes) => decode(&bytes).map(Some),
            None => Ok(None),
        }
    }
}

impl RaftLogReader<TypeConfig> for LogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> io::Result<Vec<Entry>> {
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&e) => e.checked_add(1),
            Bound::Excluded(&e) => Some(e),
            Bound::Unbounded => None,
        };
        self.entries(start, end)
    }

    async fn read_vote(&mut self) -> io::Result<Option<Vote>> {
        self.meta(KEY_VOTE)
    }
}

/// The Raft log store.
pub struct LogStore {
    reader: LogReader,
    sync_queue: Option<mpsc::Sender<IOFlushed<TypeConfig>>>,
    sync_thread: Option<std::thread::JoinHandle<()>>,
    /// The committed log id openraft last saved, until a write carries it to the engine.
    unsaved_committed: Option<Option<LogId>>,
    /// This member's id, once its appends as a follower are fsynced inline (module docs).
    inline_as_follower_of_others: Option<NodeId>,
    /// The leader named by the vote last saved (or read when inline syncing was turned on).
    vote_leader: Option<NodeId>,
    /// Callbacks handed to the sync thread and not completed yet.
    queued: Arc<AtomicUsize>,
}

impl Drop for LogStore {
    /// Writes the last committed log id openraft saved, and lets the sync thread finish its
    /// last fsync before the engine can go away.
    fn drop(&mut self) {
        let mut batch = WriteBatch::new();
        if self.take_unsaved_committed(&mut batch).is_ok() && !batch.is_empty() {
            let _ = self.engine().write(batch, false);
        }
        self.sync_queue.take();
        if let Some(t) = self.sync_thread.take() {
            let _ = t.join();
        }
    }
}

impl LogStore {
    /// Opens the log on `engine` and starts its sync thread.
    pub fn new(engine: Arc<dyn Engine>) -> io::Result<Self> {
        let (tx, rx) = mpsc::channel::<IOFlushed<TypeConfig>>();
        let sync_engine = engine.clone();
        let queued = Arc::new(AtomicUsize::new(0));
        let sync_queued = queued.clone();
        let handle = std::thread::Builder::new()
            .name("raft-log-sync".into())
            .spawn(move || sync_loop(sync_engine, rx, sync_queued))?;
        Ok(Self {
            reader: LogReader {
                engine,
                cache: Arc::new(Mutex::new(LogCache::new(
                    CACHE_MAX_ENTRIES,
                    CACHE_MAX_BYTES,
                ))),
            },
            sync_queue: Some(tx),
            sync_thread: Some(handle),
            unsaved_committed: None,
            inline_as_follower_of_others: None,
            vote_leader: None,
            queued,
        })
    }

    /// From now on, appends made while the saved vote names a leader other than `own_id` are
    /// fsynced before `append` returns, on the caller's thread (module docs). That blocks the
    /// caller (openraft's core task) for the fsync, so a runtime with a single worker should
    /// not turn this on: its other tasks would wait too.
    pub fn syncing_follower_appends_inline(mut self, own_id: NodeId) -> io::Result<Self> {
        let vote: Option<Vote> = self.reader.meta(KEY_VOTE)?;
        self.vote_leader = vote.map(|v| v.leader_id.voted_for);
        self.inline_as_follower_of_others = Some(own_id);
        Ok(self)
    }

    /// Whether an append now is a follower's that may be fsynced inline.
    fn syncs_inline(&self) -> bool {
        self.inline_as_follower_of_others
            .is_some_and(|own| self.vote_leader != Some(own))
            && self.queued.load(Ordering::Acquire) == 0
    }

    /// Adds the committed log id openraft saved since the last write to `batch`.
    fn take_unsaved_committed(&mut self, batch: &mut WriteBatch) -> io::Result<()> {
        match self.unsaved_committed.take() {
            Some(Some(c)) => batch.put(Table::RaftMeta, KEY_COMMITTED, encode(&c)?),
            Some(None) => batch.delete(Table::RaftMeta, KEY_COMMITTED),
            None => {}
        }
        Ok(())
    }

    fn engine(&self) -> &Arc<dyn Engine> {
        &self.reader.engine
    }

    async fn write_blocking(&self, batch: WriteBatch, sync: bool) -> io::Result<()> {
        let engine = self.engine().clone();
        tokio::task::spawn_blocking(move || engine.write(batch, sync))
            .await
            .map_err(io_err)?
            .map_err(io_err)
    }
}

/// Fsyncs the engine's WAL and reports how long it took (`observe::wal_fsync`).
fn timed_sync_wal(engine: &dyn Engine) -> Result<(), EngineError> {
    let started = std::time::Instant::now();
    let result = engine.sync_wal();
    crate::observe::wal_fsync(started.elapsed());
    result
}

/// Waits for queued append callbacks, fsyncs once for all that are queued, then completes them.
fn sync_loop(
    engine: Arc<dyn Engine>,
    queue: mpsc::Receiver<IOFlushed<TypeConfig>>,
    queued: Arc<AtomicUsize>,
) {
    while let Ok(first) = queue.recv() {
        let mut pending = vec![first];
        while let Ok(more) = queue.try_recv() {
            pending.push(more);
        }
        let result = timed_sync_wal(engine.as_ref()).map_err(|e| e.to_string());
        let n = pending.len();
        for callback in pending {
            callback.io_completed(result.clone().map_err(io::Error::other));
        }
        // Counted off only after completing: while the count is above zero, appends queue here
        // instead of syncing inline, so none completes before a callback appended earlier.
        queued.fetch_sub(n, Ordering::AcqRel);
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogReader;

    async fn get_log_state(&mut self) -> io::Result<LogState<TypeConfig>> {
        let last_purged: Option<LogId> = self.reader.meta(KEY_LAST_PURGED)?;
        let mut last = None;
        let mut failure = None;
        self.engine()
            .scan(
                Table::RaftLog,
                &[],
                None,
                Direction::Reverse,
                &mut |_, v| {
                    match decode::<Entry>(v) {
                        Ok(e) => last = Some(e.log_id),
                        Err(e) => failure = Some(e),
                    }
                    ScanControl::Stop
                },
            )
            .map_err(io_err)?;
        if let Some(e) = failure {
            return Err(e);
        }
        let last_log_id = last.or(last_purged);
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.reader.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> io::Result<()> {
        let mut batch = WriteBatch::new();
        batch.put(Table::RaftMeta, KEY_VOTE, encode(vote)?);
        self.write_blocking(batch, true).await?;
        self.vote_leader = Some(vote.leader_id.voted_for);
        Ok(())
    }

    /// Advisory (a lost committed index only means re-learning it from the leader), so it is
    /// not written here, on the commit path of every write: the next append's batch carries
    /// it, and closing the store writes the last one.
    async fn save_committed(&mut self, committed: Option<LogId>) -> io::Result<()> {
        self.unsaved_committed = Some(committed);
        Ok(())
    }

    async fn read_committed(&mut self) -> io::Result<Option<LogId>> {
        match self.unsaved_committed {
            Some(committed) => Ok(committed),
            None => self.reader.meta(KEY_COMMITTED),
        }
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> io::Result<()>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = WriteBatch::new();
        self.take_unsaved_committed(&mut batch)?;
        let mut sized = Vec::new();
        for entry in entries {
            let bytes = encode(&entry)?;
            let size = bytes.len();
            batch.put(
                Table::RaftLog,
                index_key(entry.log_id.index).to_vec(),
                bytes,
            );
            sized.push((entry, size));
        }
        // Visible now (in the engine and the cache together, under the cache's lock); durable
        // once the next fsync completes.
        {
            let mut cache = self.reader.cache();
            self.engine().write(batch, false).map_err(io_err)?;
            crate::observe::wal_written(sized.iter().map(|(_, size)| *size as u64).sum());
            for (entry, size) in sized {
                cache.push(entry, size);
            }
        }
        if self.syncs_inline() {
            let result = timed_sync_wal(self.engine().as_ref()).map_err(io_err);
            callback.io_completed(result);
            return Ok(());
        }
        match &self.sync_queue {
            Some(q) => {
                self.queued.fetch_add(1, Ordering::AcqRel);
                q.send(callback).map_err(|_| {
                    self.queued.fetch_sub(1, Ordering::AcqRel);
                    io::Error::other("raft log sync thread stopped")
                })
            }
            None => Err(io::Error::other("raft log store is closed")),
        }
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> io::Result<()> {
        let from = last_log_id.map(|l| l.index + 1).unwrap_or(0);
        let mut batch = WriteBatch::new();
        batch.delete_range(Table::RaftLog, index_key(from).to_vec(), vec![0xFF; 9]);
        // Ordered before any later append in the write-ahead log, so the next append's fsync
        // makes it durable before anything that depends on it.
        let mut cache = self.reader.cache();
        self.engine().write(batch, false).map_err(io_err)?;
        cache.truncate_from(from);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> io::Result<()> {
        let mut batch = WriteBatch::new();
        batch.put(Table::RaftMeta, KEY_LAST_PURGED, encode(&log_id)?);
        batch.delete_range(
            Table::RaftLog,
            index_key(0).to_vec(),
            index_key(log_id.index.saturating_add(1)).to_vec(),
        );
        let mut cache = self.reader.cache();
        self.engine().write(batch, false).map_err(io_err)?;
        cache.purge_through(log_id.index);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::{Condvar, Mutex};

    use openraft::entry::RaftEntry;
    use openraft::type_config::TypeConfigExt;

    use super::*;
    use crate::engine::ViewScanner;
    use crate::engine::memory::MemoryEngine;

    /// The memory engine, recording which thread called each `sync_wal`; the sync thread's
    /// `sync_wal` waits while the test holds the gate closed.
    #[derive(Default)]
    struct WatchedEngine {
        inner: MemoryEngine,
        synced_on: Mutex<Vec<String>>,
        gate_closed: Mutex<bool>,
        gate_opened: Condvar,
    }

    impl WatchedEngine {
        fn set_gate(&self, closed: bool) {
            *self.gate_closed.lock().unwrap() = closed;
            self.gate_opened.notify_all();
        }

        fn synced_on(&self) -> Vec<String> {
            self.synced_on.lock().unwrap().clone()
        }
    }

    impl Engine for WatchedEngine {
        fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
            self.inner.get(table, key)
        }
        fn scan(
            &self,
            table: Table,
            start: &[u8],
            end: Option<&[u8]>,
            direction: Direction,
            visit: &mut dyn FnMut(&[u8], &[u8]) -> ScanControl,
        ) -> Result<(), EngineError> {
            self.inner.scan(table, start, end, direction, visit)
        }
        fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), EngineError> {
            self.inner.write(batch, sync)
        }
        fn sync_wal(&self) -> Result<(), EngineError> {
            let thread = std::thread::current().name().unwrap_or("").to_string();
            let mut closed = self.gate_closed.lock().unwrap();
            while *closed && thread == "raft-log-sync" {
                closed = self.gate_opened.wait(closed).unwrap();
            }
            drop(closed);
            self.synced_on.lock().unwrap().push(thread);
            self.inner.sync_wal()
        }
        fn with_consistent_view(
            &self,
            f: &mut dyn FnMut(&mut ViewScanner<'_>) -> Result<(), EngineError>,
        ) -> Result<(), EngineError> {
            self.inner.with_consistent_view(f)
        }
        fn size_bytes(&self) -> u64 {
            self.inner.size_bytes()
        }
        fn table_size(&self, table: Table) -> (u64, u64) {
            self.inner.table_size(table)
        }
        fn compact_table(&self, table: Table) -> Result<(), EngineError> {
            self.inner.compact_table(table)
        }
        fn path(&self) -> Option<&Path> {
            self.inner.path()
        }
    }

    const ME: NodeId = 1;
    const OTHER: NodeId = 2;

    fn blank(index: u64) -> Entry {
        Entry::new_blank(openraft::LogId::new_term_index(1, index))
    }

    /// A store on a watched engine, syncing inline as member `ME`, that follows `leader`.
    async fn store_following(leader: NodeId) -> (Arc<WatchedEngine>, LogStore) {
        let engine = Arc::new(WatchedEngine::default());
        let mut store = LogStore::new(engine.clone())
            .unwrap()
            .syncing_follower_appends_inline(ME)
            .unwrap();
        store
            .save_vote(&Vote::new_committed(1, leader))
            .await
            .unwrap();
        (engine, store)
    }

    /// Appends entry `index`; the receiver gets the callback's result.
    async fn append(
        store: &mut LogStore,
        index: u64,
    ) -> tokio::sync::oneshot::Receiver<io::Result<()>> {
        let (tx, rx) = TypeConfig::oneshot();
        store
            .append([blank(index)], IOFlushed::signal(tx))
            .await
            .unwrap();
        rx
    }

    #[tokio::test]
    async fn a_followers_append_is_synced_and_completed_before_it_returns() {
        let (engine, mut store) = store_following(OTHER).await;
        let mut done = append(&mut store, 1).await;
        assert!(
            matches!(done.try_recv(), Ok(Ok(()))),
            "completed by append itself"
        );
        let caller = std::thread::current().name().unwrap_or("").to_string();
        assert_eq!(
            engine.synced_on(),
            vec![caller],
            "fsynced on the caller's thread"
        );
    }

    #[tokio::test]
    async fn a_leaders_append_is_synced_by_the_sync_thread() {
        let (engine, mut store) = store_following(ME).await;
        let done = append(&mut store, 1).await;
        done.await.unwrap().unwrap();
        assert_eq!(engine.synced_on(), vec!["raft-log-sync".to_string()]);
    }

    #[tokio::test]
    async fn a_follower_queues_behind_callbacks_still_waiting_for_the_sync_thread() {
        // Leader: the first append waits in the sync thread (its fsync is held back).
        let (engine, mut store) = store_following(ME).await;
        engine.set_gate(true);
        let mut first = append(&mut store, 1).await;
        // Now a follower: its append must not complete before the first one does.
        store
            .save_vote(&Vote::new_committed(2, OTHER))
            .await
            .unwrap();
        let mut second = append(&mut store, 2).await;
        let early = (first.try_recv().is_ok(), second.try_recv().is_ok());
        engine.set_gate(false); // before asserting: dropping the store joins the sync thread
        assert_eq!(
            early,
            (false, false),
            "neither completed while the first fsync waits"
        );
        first.await.unwrap().unwrap();
        second.await.unwrap().unwrap();
        assert!(engine.synced_on().iter().all(|t| t == "raft-log-sync"));
        // The sync thread completes its callbacks before it counts them off the queue (so no
        // inline append can overtake them); wait for that count, which follows at once.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while store.queued.load(Ordering::Acquire) != 0 {
            assert!(std::time::Instant::now() < deadline, "queue never emptied");
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        // With the queue empty again, the next append is synced inline.
        let mut third = append(&mut store, 3).await;
        assert!(matches!(third.try_recv(), Ok(Ok(()))));
    }
}
