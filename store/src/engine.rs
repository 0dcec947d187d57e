//! The storage-engine boundary: a narrow, synchronous key-value interface over named tables.
//!
//! Everything above this module (MVCC, leases, Raft log and state machine) talks to an
//! [`Engine`]; RocksDB is confined to [`rocks`]. [`memory`] is an in-memory engine for unit tests.
//!
//! Tables are RocksDB column families in the RocksDB engine. Keys sort bytewise.

use std::path::Path;

pub mod memory;
pub mod rocks;

/// The tables Keel keeps. Each is a RocksDB column family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    /// MVCC data: key = encoded revision, value = encoded `mvccpb::KeyValue`.
    Kv,
    /// State-machine metadata: applied log id, membership, compaction state.
    Meta,
    /// Leases: key = lease id (big-endian), value = encoded lease.
    Lease,
    /// Raft log entries: key = log index (big-endian u64).
    RaftLog,
    /// Raft log metadata: vote, committed, last purged.
    RaftMeta,
}

impl Table {
    pub const ALL: [Table; 5] = [
        Table::Kv,
        Table::Meta,
        Table::Lease,
        Table::RaftLog,
        Table::RaftMeta,
    ];
    /// Tables that belong to the replicated state machine (part of a snapshot).
    pub const STATE_MACHINE: [Table; 3] = [Table::Kv, Table::Meta, Table::Lease];

    pub fn name(self) -> &'static str {
        match self {
            Table::Kv => "kv",
            Table::Meta => "meta",
            Table::Lease => "lease",
            Table::RaftLog => "raft_log",
            Table::RaftMeta => "raft_meta",
        }
    }
}

/// Failures of the storage engine itself (I/O, corruption). Request-level failures are not
/// engine errors.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("storage engine: {0}")]
    Backend(String),
    #[error("storage engine I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// One write in a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOp {
    Put {
        table: Table,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        table: Table,
        key: Vec<u8>,
    },
    /// Deletes `[start, end)`.
    DeleteRange {
        table: Table,
        start: Vec<u8>,
        end: Vec<u8>,
    },
}

/// An ordered set of writes applied atomically by [`Engine::write`].
#[derive(Debug, Clone, Default)]
pub struct WriteBatch {
    pub ops: Vec<WriteOp>,
}

impl WriteBatch {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn put(&mut self, table: Table, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push(WriteOp::Put {
            table,
            key: key.into(),
            value: value.into(),
        });
    }
    pub fn delete(&mut self, table: Table, key: impl Into<Vec<u8>>) {
        self.ops.push(WriteOp::Delete {
            table,
            key: key.into(),
        });
    }
    pub fn delete_range(
        &mut self,
        table: Table,
        start: impl Into<Vec<u8>>,
        end: impl Into<Vec<u8>>,
    ) {
        self.ops.push(WriteOp::DeleteRange {
            table,
            start: start.into(),
            end: end.into(),
        });
    }
    /// Deletes every entry of `table` (every key of every table sorts below 64 bytes of 0xFF).
    pub fn clear_table(&mut self, table: Table) {
        self.delete_range(table, Vec::new(), vec![0xFF; 64]);
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
    pub fn len(&self) -> usize {
        self.ops.len()
    }
}

/// Scan direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Forward,
    Reverse,
}

/// What a scan callback tells the engine to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanControl {
    Continue,
    Stop,
}

/// The callback of [`Engine::multi_get`]: the key's position and its value.
pub type MultiGetVisitor<'a> = dyn FnMut(usize, Option<&[u8]>) -> Result<(), EngineError> + 'a;

/// The callback of [`Engine::scan_consistent`]: table, key, value.
pub type ConsistentVisitor<'a> = dyn FnMut(Table, &[u8], &[u8]) -> Result<(), EngineError> + 'a;

/// Scans tables of one consistent view (see [`Engine::with_consistent_view`]): every entry of
/// each table, in table order then key order.
pub type ViewScanner<'a> =
    dyn FnMut(&[Table], &mut ConsistentVisitor<'_>) -> Result<(), EngineError> + 'a;

/// A synchronous, thread-safe key-value engine with named tables.
///
/// Durability contract: `write(batch, true)` returns only after the batch is on stable storage;
/// `write(batch, false)` makes the batch visible to reads at once and durable at the next
/// `sync_wal()` (or the next synced write). Writes are durable in the order they were made.
pub trait Engine: Send + Sync + 'static {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError>;

    /// Point reads of `keys` (any order): `visit(i, value)` for each `keys[i]`, in order.
    /// RocksDB batches the lookups (MultiGet) and lends the values without copying them.
    fn multi_get(
        &self,
        table: Table,
        keys: &[&[u8]],
        visit: &mut MultiGetVisitor<'_>,
    ) -> Result<(), EngineError> {
        for (i, key) in keys.iter().enumerate() {
            let value = self.get(table, key)?;
            visit(i, value.as_deref())?;
        }
        Ok(())
    }

    /// Visits keys in `[start, end)` (`end = None`: to the end of the table) in `direction`
    /// order until the callback returns [`ScanControl::Stop`].
    fn scan(
        &self,
        table: Table,
        start: &[u8],
        end: Option<&[u8]>,
        direction: Direction,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> ScanControl,
    ) -> Result<(), EngineError>;

    /// Applies the batch atomically.
    fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), EngineError>;

    /// Makes every earlier write durable (one fsync of the write-ahead log).
    fn sync_wal(&self) -> Result<(), EngineError>;

    /// Visits every entry of `tables`, in table order then key order, from one consistent
    /// point-in-time view (writes made during the visit are not seen).
    fn scan_consistent(
        &self,
        tables: &[Table],
        visit: &mut ConsistentVisitor<'_>,
    ) -> Result<(), EngineError> {
        self.scan_consistent_when(tables, &mut || true, visit)
    }

    /// Like [`Engine::scan_consistent`], but calls `view_taken` once the view exists and
    /// before anything is read from it. `view_taken` may block (writes go on meanwhile and are
    /// not seen by the view); if it returns false the view is released unread. This lets a
    /// caller pin the state of one moment cheaply and decide later whether to read it.
    fn scan_consistent_when(
        &self,
        tables: &[Table],
        view_taken: &mut dyn FnMut() -> bool,
        visit: &mut ConsistentVisitor<'_>,
    ) -> Result<(), EngineError> {
        self.with_consistent_view(&mut |scan| {
            if !view_taken() {
                return Ok(());
            }
            scan(tables, visit)
        })
    }

    /// Pins the state of this moment (RocksDB: a snapshot) and calls `f` with a scanner of it,
    /// which `f` may run any number of times (writes made meanwhile are not seen); the view is
    /// released when `f` returns. Backups scan it twice: once to lay the file out, once to
    /// stream it.
    fn with_consistent_view(
        &self,
        f: &mut dyn FnMut(&mut ViewScanner<'_>) -> Result<(), EngineError>,
    ) -> Result<(), EngineError>;

    /// Approximate bytes on disk (or in memory) for `Status.dbSize`.
    fn size_bytes(&self) -> u64;

    /// The size of one table: `(allocated, live)` bytes. RocksDB: SST files plus memtables,
    /// and its estimate of live data plus memtables (space that a full compaction of the table
    /// would keep).
    fn table_size(&self, table: Table) -> (u64, u64);

    /// Reclaims space after deletions (RocksDB: a manual compaction of `table`).
    fn compact_table(&self, table: Table) -> Result<(), EngineError>;

    /// The directory the engine lives in, if it is on disk.
    fn path(&self) -> Option<&Path>;
}
