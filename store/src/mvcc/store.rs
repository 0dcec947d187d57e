//! [`MvccStore`]: the committed state, reads (range, history, hash) and physical compaction.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock, mpsc};

use keel_proto::etcdserverpb::request_op::Request as OpReq;
use keel_proto::etcdserverpb::response_op::Response as OpResp;
use keel_proto::etcdserverpb::{
    AlarmMember, AlarmResponse, RangeRequest, RangeResponse, ResponseHeader, ResponseOp,
    TxnRequest, TxnResponse, range_request,
};
use keel_proto::mvccpb::{Event, KeyValue, event::EventType};
use prost::Message;

use super::apply::ApplyBatch;
use super::index::{IndexEntry, KeyIndex, compact_entries, visible_at};
use super::recent::{DEFAULT_BUDGET_BYTES, RecentValues};
use super::revision::Revision;
use crate::auth::{AuthState, TokenTable};
use crate::engine::{Direction, Engine, ScanControl, Table, WriteBatch};
use crate::error::{ApplyError, ApplyErrorKind, StoreError};

pub(crate) const META_REV: &[u8] = b"mvcc/rev";
pub(crate) const META_COMPACT: &[u8] = b"mvcc/compact_rev";
pub(crate) const META_COMPACT_DONE: &[u8] = b"mvcc/compact_done";
pub(crate) const META_ALARMS: &[u8] = b"mvcc/alarms";

/// Revisions whose deletions are written per engine write during physical compaction.
const COMPACT_BATCH_KEYS: usize = 1000;

/// A lease as the store keeps it.
#[derive(Debug, Clone, Default)]
pub(crate) struct LeaseState {
    pub ttl: i64,
    pub remaining: Option<i64>,
    pub keys: BTreeSet<Vec<u8>>,
}

impl LeaseState {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = self.ttl.to_be_bytes().to_vec();
        v.extend_from_slice(&self.remaining.unwrap_or(-1).to_be_bytes());
        v
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let ttl = i64::from_be_bytes(bytes.get(..8)?.try_into().ok()?);
        let rem = i64::from_be_bytes(bytes.get(8..16)?.try_into().ok()?);
        Some(Self {
            ttl,
            remaining: (rem >= 0).then_some(rem),
            keys: BTreeSet::new(),
        })
    }
}

/// A lease as callers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseInfo {
    pub id: i64,
    pub ttl: i64,
    pub remaining_ttl: Option<i64>,
    pub keys: Vec<Vec<u8>>,
}

/// A history read: events with revisions in `[start_revision, end_revision]`.
#[derive(Debug, Clone, Default)]
pub struct HistoryRequest {
    pub start_revision: i64,
    /// Inclusive; 0 = the current revision.
    pub end_revision: i64,
    pub key: Vec<u8>,
    pub range_end: Vec<u8>,
    pub prev_kv: bool,
    /// Stop after at least this many events, at a revision boundary.
    pub max_events: usize,
    /// Stop after at least this many bytes of the events' keys and values (0: no limit), at a
    /// revision boundary: a reader catching up over large values holds a bounded batch.
    pub max_bytes: usize,
}

#[derive(Debug, Clone, Default)]
pub struct HistoryBatch {
    pub events: Vec<Event>,
    /// The first revision not covered by this batch.
    pub next_revision: i64,
}

/// Which hash [`MvccStore::hash_kv`] computes. Both cover the same revisions: those up to
/// the hashed revision, and below the compaction only the versions that still count, so every
/// member that applied the same log computes the same hash whatever its physical compaction has
/// done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashKvFormat {
    /// etcd's: CRC-32C of `key`, then of etcd's key-bucket key and value of every counted
    /// revision (below the compaction: each key's version visible at the hashed revision; a
    /// tombstone at the compact revision is left out, as etcd 3.5.16 does). For the same
    /// history it equals etcd's `HashKV`; `Maintenance.HashKV` answers with it.
    Etcd,
    /// Keel's own: CRC-32 of its `kv` rows (below the compaction: each key's version visible at
    /// the compact revision). The corruption check compares this one between members, so that
    /// members of different Keel versions (a rolling upgrade) keep agreeing.
    Internal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashKvResult {
    pub hash: u32,
    pub compact_revision: i64,
    pub hash_revision: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreStats {
    pub keys: usize,
    pub revisions: usize,
    /// Rough bytes held by the key index.
    pub index_bytes_estimate: usize,
}

/// Lower and upper bound of a key span.
pub(crate) type KeyBounds<'a> = (Bound<&'a [u8]>, Bound<&'a [u8]>);

/// etcd's key-range convention: empty end = one key; end "\0" = every key from `key`.
#[derive(Debug, Clone)]
pub(crate) enum KeySpan<'a> {
    Single(&'a [u8]),
    From(&'a [u8]),
    Between(&'a [u8], &'a [u8]),
    Empty,
}

impl<'a> KeySpan<'a> {
    pub fn new(key: &'a [u8], end: &'a [u8]) -> Self {
        if end.is_empty() {
            KeySpan::Single(key)
        } else if end == [0] {
            KeySpan::From(key)
        } else if end <= key {
            KeySpan::Empty
        } else {
            KeySpan::Between(key, end)
        }
    }

    pub fn contains(&self, k: &[u8]) -> bool {
        match self {
            KeySpan::Single(s) => *s == k,
            KeySpan::From(s) => *s <= k,
            KeySpan::Between(s, e) => *s <= k && k < *e,
            KeySpan::Empty => false,
        }
    }

    pub fn bounds(&self) -> Option<KeyBounds<'a>> {
        match *self {
            KeySpan::Single(s) => Some((Bound::Included(s), Bound::Included(s))),
            KeySpan::From(s) => Some((Bound::Included(s), Bound::Unbounded)),
            KeySpan::Between(s, e) => Some((Bound::Included(s), Bound::Excluded(e))),
            KeySpan::Empty => None,
        }
    }
}

pub(crate) type Index = KeyIndex;

/// A read view: what keys are live at a revision, and the value at a revision.
pub(crate) trait View {
    /// The keys live at `at` in the span, with their index entries, in key order.
    fn live(&self, span: &KeySpan<'_>, at: i64) -> Vec<(Vec<u8>, IndexEntry)>;
    /// The index entries of [`View::live`] without the keys (nothing copied per key).
    fn live_entries(&self, span: &KeySpan<'_>, at: i64) -> Vec<IndexEntry> {
        self.live(span, at).into_iter().map(|(_, e)| e).collect()
    }
    fn load(&self, rev: Revision) -> Result<Option<KeyValue>, StoreError>;
    /// [`View::load`] of many revisions, in order.
    fn load_many(&self, revs: &[Revision]) -> Result<Vec<Option<KeyValue>>, StoreError> {
        revs.iter().map(|r| self.load(*r)).collect()
    }
}

pub(crate) fn live_in_index(
    index: &Index,
    span: &KeySpan<'_>,
    at: i64,
    out: &mut BTreeMap<Vec<u8>, Option<IndexEntry>>,
) {
    let Some(bounds) = span.bounds() else { return };
    for (k, entries) in index.range(bounds) {
        out.insert(k.to_vec(), visible_at(entries, at));
    }
}

/// The fields of a stored `KeyValue` that the key index and the lease table are rebuilt from
/// (field numbers as in `mvccpb.KeyValue`). Decoding skips the value, most of a record's
/// bytes, so a restart does not copy every stored value once.
#[derive(Clone, PartialEq, prost::Message)]
struct IndexedFields {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    #[prost(int64, tag = "2")]
    create_revision: i64,
    #[prost(int64, tag = "4")]
    version: i64,
    #[prost(int64, tag = "6")]
    lease: i64,
}

/// The key index of `records`, every stored revision in revision order. They are sorted by
/// key (a stable sort, so each key's entries stay in revision order) and the map is built
/// from the sorted run in one pass: inserting a million keys one by one into the B-tree cost
/// most of a restart (a tree descent and cache misses each, then a reallocation per key to
/// trim its entry vector). Each key's vector is allocated at its exact length.
fn index_from(mut records: Vec<(Vec<u8>, IndexEntry)>) -> Index {
    records.sort_by(|a, b| a.0.cmp(&b.0));
    let mut grouped: Vec<(Vec<u8>, Vec<IndexEntry>)> = Vec::new();
    let mut records = records.into_iter().peekable();
    while let Some((key, first)) = records.next() {
        let mut entries = vec![first];
        while let Some((_, e)) = records.next_if(|(k, _)| *k == key) {
            entries.push(e);
        }
        entries.shrink_to_fit();
        grouped.push((key, entries));
    }
    // Already sorted and without duplicate keys: the B-tree is built bottom-up.
    KeyIndex::from_lists(grouped)
}

pub(crate) fn decode_kv(bytes: &[u8]) -> Result<KeyValue, StoreError> {
    KeyValue::decode(bytes).map_err(|e| StoreError::Corrupt {
        table: "kv",
        detail: e.to_string(),
    })
}

pub(crate) struct Inner {
    pub engine: Arc<dyn Engine>,
    pub index: RwLock<Index>,
    pub leases: RwLock<BTreeMap<i64, LeaseState>>,
    pub alarms: RwLock<Vec<AlarmMember>>,
    /// The replicated auth state, replaced whole by each apply batch that changes it.
    pub auth: RwLock<Arc<AuthState>>,
    /// Simple tokens (in memory only).
    pub tokens: TokenTable,
    /// The values of the newest writes (see [`RecentValues`]).
    pub recent: RecentValues,
    pub current: AtomicI64,
    /// The compact revision; -1 before the first compaction, as etcd's (so a first compaction
    /// to revision 0 succeeds and a second one is refused).
    pub compacted: AtomicI64,
    pub compact_done: tokio::sync::watch::Sender<i64>,
    /// etcd's MVCC operation counters (see [`OpCounts`]).
    pub ops: OpCounters,
}

/// What this member's MVCC layer has done, counted as etcd counts it for
/// `etcd_mvcc_{range,put,delete,txn}_total`: every range, put and delete-range call, and every
/// MVCC transaction with more than one of them. A client Range is one range; a Put one put (and
/// one range with `prev_kv`, `ignore_value` or `ignore_lease`); a DeleteRange one delete (and a
/// range with `prev_kv`); a lease revocation one delete per attached key; a Txn counts each
/// compare it evaluates as a range, then its operations, and a Txn that writes is two MVCC
/// transactions (compares and checks, then the operations), as in etcd's applier. Writes are
/// counted where they are applied, on every member, as etcd does. One difference: etcd serves a
/// read-only Txn on the member that received it, Keel applies it through the log, so every
/// member counts it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpCounts {
    pub ranges: u64,
    pub puts: u64,
    pub deletes: u64,
    pub txns: u64,
    /// Bytes of the keys and values put (etcd's `total_put_size_in_bytes`).
    pub put_bytes: u64,
}

#[derive(Debug, Default)]
pub(crate) struct OpCounters {
    ranges: std::sync::atomic::AtomicU64,
    puts: std::sync::atomic::AtomicU64,
    deletes: std::sync::atomic::AtomicU64,
    txns: std::sync::atomic::AtomicU64,
    put_bytes: std::sync::atomic::AtomicU64,
}

impl OpCounters {
    /// Ends one MVCC transaction that made these calls.
    pub(crate) fn end_txn(&self, ranges: u64, puts: u64, deletes: u64) {
        for (counter, n) in [
            (&self.ranges, ranges),
            (&self.puts, puts),
            (&self.deletes, deletes),
        ] {
            if n > 0 {
                counter.fetch_add(n, Ordering::Relaxed);
            }
        }
        if ranges + puts + deletes > 1 {
            self.txns.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn put_bytes(&self, n: u64) {
        if n > 0 {
            self.put_bytes.fetch_add(n, Ordering::Relaxed);
        }
    }

    fn get(&self) -> OpCounts {
        OpCounts {
            ranges: self.ranges.load(Ordering::Relaxed),
            puts: self.puts.load(Ordering::Relaxed),
            deletes: self.deletes.load(Ordering::Relaxed),
            txns: self.txns.load(Ordering::Relaxed),
            put_bytes: self.put_bytes.load(Ordering::Relaxed),
        }
    }
}

impl Inner {
    pub fn read_index(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|p| p.into_inner())
    }
    pub fn write_index(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|p| p.into_inner())
    }
    /// The `KeyValue` written at `rev`: from the recent values, else the `kv` table.
    pub fn load_kv(&self, rev: Revision) -> Result<Option<KeyValue>, StoreError> {
        Ok(self.load_many(&[rev])?.pop().flatten())
    }

    /// [`Inner::load_kv`] of many revisions, in order; the misses read with one multi-get.
    pub fn load_many(&self, revs: &[Revision]) -> Result<Vec<Option<KeyValue>>, StoreError> {
        let mut out: Vec<Option<KeyValue>> = Vec::with_capacity(revs.len());
        let mut missing: Vec<usize> = Vec::new();
        self.recent.read_many(revs, |i, bytes| {
            match bytes {
                Some(b) => out.push(Some(decode_kv(b)?)),
                None => {
                    missing.push(i);
                    out.push(None);
                }
            }
            Ok::<(), StoreError>(())
        })?;
        if missing.is_empty() {
            return Ok(out);
        }
        let keys: Vec<[u8; 17]> = missing.iter().map(|i| revs[*i].encode(false)).collect();
        let key_refs: Vec<&[u8]> = keys.iter().map(|k| &k[..]).collect();
        let mut failure = None;
        let keep = self.recent.budget() > 0;
        let mut fetched: Vec<(Revision, Arc<[u8]>)> = Vec::new();
        self.engine
            .multi_get(Table::Kv, &key_refs, &mut |n, value| {
                let Some(bytes) = value else { return Ok(()) };
                match decode_kv(bytes) {
                    Ok(kv) => {
                        out[missing[n]] = Some(kv);
                        if keep {
                            fetched.push((revs[missing[n]], bytes.into()));
                        }
                    }
                    Err(e) => {
                        failure.get_or_insert(e);
                    }
                }
                Ok(())
            })?;
        if let Some(e) = failure {
            return Err(e);
        }
        self.recent.insert(fetched);
        Ok(out)
    }

    pub fn read_leases(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<i64, LeaseState>> {
        self.leases.read().unwrap_or_else(|p| p.into_inner())
    }
}

struct CommittedView<'a>(&'a Inner);

impl CommittedView<'_> {
    /// `f(key, entry)` for every key in the span live at `at`, in key order.
    fn visible<T>(
        &self,
        span: &KeySpan<'_>,
        at: i64,
        f: impl Fn(&[u8], IndexEntry) -> T,
    ) -> Vec<T> {
        let Some(bounds) = span.bounds() else {
            return Vec::new();
        };
        let index = self.0.read_index();
        index
            .range(bounds)
            .filter_map(|(k, entries)| visible_at(entries, at).map(|e| f(k, e)))
            .collect()
    }
}

impl View for CommittedView<'_> {
    fn live(&self, span: &KeySpan<'_>, at: i64) -> Vec<(Vec<u8>, IndexEntry)> {
        self.visible(span, at, |k, e| (k.to_vec(), e))
    }
    fn live_entries(&self, span: &KeySpan<'_>, at: i64) -> Vec<IndexEntry> {
        self.visible(span, at, |_, e| e)
    }
    fn load(&self, rev: Revision) -> Result<Option<KeyValue>, StoreError> {
        self.0.load_kv(rev)
    }
    fn load_many(&self, revs: &[Revision]) -> Result<Vec<Option<KeyValue>>, StoreError> {
        self.0.load_many(revs)
    }
}

fn other(e: StoreError) -> ApplyError {
    ApplyError {
        kind: ApplyErrorKind::Other,
        message: e.to_string(),
    }
}

/// The revision a read asking for `requested` (0 or less: the newest) reads at, given the
/// store's `current` and `compacted` revisions: etcd's "future revision" and "compacted" errors.
pub(crate) fn revision_to_read(
    requested: i64,
    current: i64,
    compacted: i64,
) -> Result<i64, ApplyError> {
    let at = if requested <= 0 { current } else { requested };
    if at > current {
        return Err(ApplyError::new(ApplyErrorKind::FutureRevision));
    }
    if at < compacted {
        return Err(ApplyError::new(ApplyErrorKind::Compacted));
    }
    Ok(at)
}

/// What [`MvccStore::read_txn`] answers to a Txn that writes.
fn writes_refused() -> ApplyError {
    ApplyError {
        kind: ApplyErrorKind::Other,
        message: "keel: a Txn that writes cannot be served as a read".into(),
    }
}

/// [`MvccStore::read_txn`] at revision `at`, nested Txns included; `ranges` counts the ranges
/// and compares evaluated (etcd's MVCC counters).
fn read_txn_at(
    view: &dyn View,
    t: &TxnRequest,
    at: i64,
    compacted: i64,
    ranges: &mut u64,
) -> Result<TxnResponse, ApplyError> {
    let mut succeeded = true;
    for c in &t.compare {
        *ranges += 1;
        if !super::apply::compare_at(view, c, at) {
            succeeded = false;
            break;
        }
    }
    let header = || {
        Some(ResponseHeader {
            revision: at,
            ..Default::default()
        })
    };
    let mut responses = Vec::new();
    for op in if succeeded { &t.success } else { &t.failure } {
        let response = match &op.request {
            Some(OpReq::RequestRange(r)) => {
                *ranges += 1;
                let read_at = revision_to_read(r.revision, at, compacted)?;
                let mut rr = range_view(view, r, read_at, compacted)?;
                rr.header = header();
                Some(OpResp::ResponseRange(rr))
            }
            Some(OpReq::RequestTxn(nested)) => {
                let mut tr = read_txn_at(view, nested, at, compacted, ranges)?;
                tr.header = header();
                Some(OpResp::ResponseTxn(tr))
            }
            None => None,
            Some(_) => return Err(writes_refused()),
        };
        responses.push(ResponseOp { response });
    }
    Ok(TxnResponse {
        header: None,
        succeeded,
        responses,
    })
}

/// etcd's Range over any view at `at` (already validated against compaction and the future).
pub(crate) fn range_view(
    view: &dyn View,
    r: &RangeRequest,
    at: i64,
    compacted: i64,
) -> Result<RangeResponse, ApplyError> {
    let span = KeySpan::new(&r.key, &r.range_end);
    let sort_order =
        range_request::SortOrder::try_from(r.sort_order).unwrap_or(range_request::SortOrder::None);
    let sort_target = range_request::SortTarget::try_from(r.sort_target)
        .unwrap_or(range_request::SortTarget::Key);
    // Only a keys-only response takes its keys from the index; values carry their own.
    let keys_only = r.keys_only && !r.count_only && sort_target != range_request::SortTarget::Value;
    let (keys, live): (Vec<Vec<u8>>, Vec<IndexEntry>) = if keys_only {
        view.live(&span, at).into_iter().unzip()
    } else {
        (Vec::new(), view.live_entries(&span, at))
    };
    let count = live.len() as i64;
    let filtered = r.min_mod_revision != 0
        || r.max_mod_revision != 0
        || r.min_create_revision != 0
        || r.max_create_revision != 0;
    let sorted = sort_order != range_request::SortOrder::None
        || sort_target != range_request::SortTarget::Key;
    let mut resp = RangeResponse {
        header: Some(ResponseHeader {
            revision: at,
            ..Default::default()
        }),
        count,
        ..Default::default()
    };
    if r.count_only {
        return Ok(resp);
    }
    // Without sorting or filtering only limit+1 values are needed.
    let fetch = if r.limit > 0 && !filtered && !sorted {
        (r.limit as usize).saturating_add(1).min(live.len())
    } else {
        live.len()
    };
    let mut kvs = Vec::with_capacity(fetch);
    let live = &live[..fetch];
    let loaded = if keys_only {
        // Everything but the value is in the index.
        keys.iter()
            .zip(live)
            .map(|(key, entry)| Some(entry.key_value_without_value(key)))
            .collect()
    } else {
        let revs: Vec<Revision> = live.iter().map(|e| e.rev).collect();
        view.load_many(&revs).map_err(other)?
    };
    for (entry, kv) in live.iter().zip(loaded) {
        let rev = entry.rev;
        match kv {
            Some(kv) => kvs.push(kv),
            None if at < compacted || rev.main < compacted => {
                return Err(ApplyError::new(ApplyErrorKind::Compacted));
            }
            None => {
                return Err(ApplyError {
                    kind: ApplyErrorKind::Other,
                    message: format!("mvcc: missing revision {rev:?}"),
                });
            }
        }
    }
    if filtered {
        kvs.retain(|kv| {
            (r.min_mod_revision == 0 || kv.mod_revision >= r.min_mod_revision)
                && (r.max_mod_revision == 0 || kv.mod_revision <= r.max_mod_revision)
                && (r.min_create_revision == 0 || kv.create_revision >= r.min_create_revision)
                && (r.max_create_revision == 0 || kv.create_revision <= r.max_create_revision)
        });
    }
    let order = if sort_order == range_request::SortOrder::None
        && sort_target != range_request::SortTarget::Key
    {
        range_request::SortOrder::Ascend
    } else {
        sort_order
    };
    if order != range_request::SortOrder::None {
        use range_request::SortTarget as T;
        let cmp = |a: &KeyValue, b: &KeyValue| match sort_target {
            T::Key => a.key.cmp(&b.key),
            T::Version => a.version.cmp(&b.version),
            T::Create => a.create_revision.cmp(&b.create_revision),
            T::Mod => a.mod_revision.cmp(&b.mod_revision),
            T::Value => a.value.cmp(&b.value),
        };
        if order == range_request::SortOrder::Descend {
            kvs.sort_by(|a, b| cmp(b, a));
        } else {
            kvs.sort_by(cmp);
        }
    }
    if r.limit > 0 && kvs.len() > r.limit as usize {
        kvs.truncate(r.limit as usize);
        resp.more = true;
    }
    if r.keys_only {
        for kv in &mut kvs {
            kv.value.clear();
        }
    }
    resp.kvs = kvs;
    Ok(resp)
}

/// The MVCC store. Readers never wait for an apply batch or a compaction for long: the index is
/// behind a lock taken briefly, and reads only see revisions already published.
pub struct MvccStore {
    pub(crate) inner: Arc<Inner>,
    pub(crate) apply_lock: Mutex<()>,
    compactor: Mutex<Option<mpsc::Sender<i64>>>,
    compactor_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for MvccStore {
    /// Stops the compactor and waits for it, so no thread touches the engine after the store
    /// is gone (RocksDB aborts if used during process teardown).
    fn drop(&mut self) {
        if let Ok(mut tx) = self.compactor.lock() {
            tx.take();
        }
        if let Some(handle) = self.compactor_thread.lock().ok().and_then(|mut h| h.take()) {
            let _ = handle.join();
        }
    }
}

impl MvccStore {
    /// Opens the store with the default budget of recent values in memory.
    pub fn open(engine: Arc<dyn Engine>) -> Result<MvccStore, StoreError> {
        Self::open_with(engine, DEFAULT_BUDGET_BYTES)
    }

    /// Opens the store keeping up to `recent_values_bytes` of the newest writes' values in
    /// memory (0: none; see [`RecentValues`]).
    pub fn open_with(
        engine: Arc<dyn Engine>,
        recent_values_bytes: usize,
    ) -> Result<MvccStore, StoreError> {
        let (done_tx, _) = tokio::sync::watch::channel(0);
        let inner = Arc::new(Inner {
            engine,
            index: RwLock::new(KeyIndex::default()),
            leases: RwLock::new(BTreeMap::new()),
            alarms: RwLock::new(Vec::new()),
            auth: RwLock::new(Arc::new(AuthState::default())),
            tokens: TokenTable::default(),
            recent: RecentValues::new(recent_values_bytes),
            current: AtomicI64::new(1),
            compacted: AtomicI64::new(-1),
            compact_done: done_tx,
            ops: OpCounters::default(),
        });
        let (tx, rx) = mpsc::channel::<i64>();
        let worker = inner.clone();
        let handle = std::thread::Builder::new()
            .name("mvcc-compactor".into())
            .spawn(move || {
                while let Ok(at) = rx.recv() {
                    if let Err(e) = physical_compact(&worker, at) {
                        tracing::error!(error = %e, revision = at, "physical compaction failed");
                    }
                }
            })
            .map_err(crate::engine::EngineError::Io)?;
        let store = MvccStore {
            inner,
            apply_lock: Mutex::new(()),
            compactor: Mutex::new(Some(tx)),
            compactor_thread: Mutex::new(Some(handle)),
        };
        store.reload()?;
        Ok(store)
    }

    /// Rebuilds every in-memory structure from the engine (after open, or after a Raft
    /// snapshot replaced the tables).
    pub fn reload(&self) -> Result<(), StoreError> {
        let _apply = self.apply_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.inner.recent.clear();
        let engine = self.inner.engine.clone();
        // Every stored revision as (key, entry), in revision order as the table is scanned;
        // sorted by key afterwards and built into the index in one pass (see `index_from`).
        let mut records: Vec<(Vec<u8>, IndexEntry)> = Vec::new();
        // Keys whose newest revision so far carries a lease, and that lease.
        let mut leased: BTreeMap<Vec<u8>, i64> = BTreeMap::new();
        let mut max_rev = 1;
        let mut failure = None;
        engine.scan(Table::Kv, &[], None, Direction::Forward, &mut |k, v| {
            let Some((rev, tombstone)) = Revision::decode(k) else {
                failure = Some(StoreError::Corrupt {
                    table: "kv",
                    detail: "bad revision key".into(),
                });
                return ScanControl::Stop;
            };
            match IndexedFields::decode(v) {
                Ok(f) => {
                    max_rev = max_rev.max(rev.main);
                    let lease = if tombstone { 0 } else { f.lease };
                    if lease != 0 {
                        leased.insert(f.key.clone(), lease);
                    } else if !leased.is_empty() {
                        leased.remove(&f.key);
                    }
                    let entry = IndexEntry::from_fields(
                        rev,
                        tombstone,
                        f.create_revision,
                        f.version,
                        f.lease,
                    );
                    records.push((f.key, entry));
                    ScanControl::Continue
                }
                Err(e) => {
                    failure = Some(StoreError::Corrupt {
                        table: "kv",
                        detail: e.to_string(),
                    });
                    ScanControl::Stop
                }
            }
        })?;
        if let Some(e) = failure {
            return Err(e);
        }
        let index = index_from(records);
        let mut leases: BTreeMap<i64, LeaseState> = BTreeMap::new();
        engine.scan(Table::Lease, &[], None, Direction::Forward, &mut |k, v| {
            if let (Ok(id), Some(l)) = (<[u8; 8]>::try_from(k), LeaseState::decode(v)) {
                leases.insert(i64::from_be_bytes(id), l);
            }
            ScanControl::Continue
        })?;
        for (key, lease) in leased {
            if let Some(l) = leases.get_mut(&lease) {
                l.keys.insert(key);
            }
        }
        let meta_i64 = |key: &[u8]| -> Result<i64, StoreError> {
            Ok(engine
                .get(Table::Meta, key)?
                .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
                .map(i64::from_be_bytes)
                .unwrap_or(0))
        };
        let current = meta_i64(META_REV)?.max(max_rev).max(1);
        let compacted = match engine.get(Table::Meta, META_COMPACT)? {
            None => -1,
            Some(_) => meta_i64(META_COMPACT)?,
        };
        let done = meta_i64(META_COMPACT_DONE)?;
        let alarms = match engine.get(Table::Meta, META_ALARMS)? {
            Some(b) => {
                AlarmResponse::decode(b.as_slice())
                    .map_err(|e| StoreError::Corrupt {
                        table: "meta",
                        detail: e.to_string(),
                    })?
                    .alarms
            }
            None => Vec::new(),
        };
        let auth = AuthState::load(engine.as_ref())?;
        *self.inner.write_index() = index;
        *self.inner.leases.write().unwrap_or_else(|p| p.into_inner()) = leases;
        *self.inner.alarms.write().unwrap_or_else(|p| p.into_inner()) = alarms;
        *self.inner.auth.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(auth);
        self.inner.current.store(current, Ordering::Release);
        self.inner.compacted.store(compacted, Ordering::Release);
        self.inner.compact_done.send_replace(done);
        if compacted > done {
            self.schedule_compaction(compacted);
        }
        Ok(())
    }

    pub fn engine(&self) -> &Arc<dyn Engine> {
        &self.inner.engine
    }

    /// The cache of recent values: what it holds and its hits and misses.
    pub fn value_cache_stats(&self) -> super::recent::RecentValuesStats {
        self.inner.recent.stats()
    }

    /// etcd's MVCC operation counts so far (see [`OpCounts`]).
    pub fn op_counts(&self) -> OpCounts {
        self.inner.ops.get()
    }

    pub fn current_revision(&self) -> i64 {
        self.inner.current.load(Ordering::Acquire)
    }

    pub fn compact_revision(&self) -> i64 {
        self.inner.compacted.load(Ordering::Acquire)
    }

    /// A receiver of the last revision whose physical compaction finished.
    pub fn compaction_progress(&self) -> tokio::sync::watch::Receiver<i64> {
        self.inner.compact_done.subscribe()
    }

    pub(crate) fn schedule_compaction(&self, at: i64) {
        if let Ok(tx) = self.compactor.lock()
            && let Some(tx) = tx.as_ref()
        {
            let _ = tx.send(at);
        }
    }

    fn check_rev(&self, requested: i64) -> Result<i64, ApplyError> {
        revision_to_read(requested, self.current_revision(), self.compact_revision())
    }

    /// etcd's Range at `req.revision` (0 = current). The header carries the current revision.
    pub fn range(&self, req: &RangeRequest) -> Result<RangeResponse, ApplyError> {
        self.inner.ops.end_txn(1, 0, 0);
        let current = self.current_revision();
        let at = self.check_rev(req.revision)?;
        let mut resp = range_view(
            &CommittedView(&self.inner),
            req,
            at,
            self.compact_revision(),
        )?;
        resp.header = Some(ResponseHeader {
            revision: current,
            ..Default::default()
        });
        Ok(resp)
    }

    /// A read-only Txn ([`txn_read_only`](super::apply::txn_read_only)) evaluated on the
    /// committed state at its current revision, as etcd serves such a Txn on the member that
    /// receives it (after a read barrier unless every range is serializable), without a log
    /// entry. Compares and ranges see one revision; the header carries it. A Txn that writes is
    /// refused here: it must go through the log.
    pub fn read_txn(&self, t: &TxnRequest) -> Result<TxnResponse, ApplyError> {
        if !super::apply::txn_read_only(t) {
            return Err(writes_refused());
        }
        let at = self.current_revision();
        let compacted = self.compact_revision();
        let mut ranges = 0;
        let result = read_txn_at(&CommittedView(&self.inner), t, at, compacted, &mut ranges);
        self.inner.ops.end_txn(ranges, 0, 0);
        let mut resp = result?;
        resp.header = Some(ResponseHeader {
            revision: at,
            ..Default::default()
        });
        Ok(resp)
    }

    /// Events in revision order from the `kv` table, scanning only the requested revisions.
    pub fn history(&self, req: &HistoryRequest) -> Result<HistoryBatch, ApplyError> {
        let current = self.current_revision();
        let end = if req.end_revision <= 0 {
            current
        } else {
            req.end_revision.min(current)
        };
        let start = req.start_revision.max(1);
        if start < self.compact_revision() {
            return Err(ApplyError::new(ApplyErrorKind::Compacted));
        }
        let mut batch = HistoryBatch {
            events: Vec::new(),
            next_revision: end + 1,
        };
        if start > end {
            batch.next_revision = start;
            return Ok(batch);
        }
        let span = KeySpan::new(&req.key, &req.range_end);
        let mut raw: Vec<(Revision, bool, KeyValue)> = Vec::new();
        let mut failure = None;
        let mut stop_at = None;
        let max = req.max_events.max(1);
        let mut bytes = 0usize;
        self.inner
            .engine
            .scan(
                Table::Kv,
                &Revision::lower_bound(start),
                Some(&Revision::lower_bound(end + 1)),
                Direction::Forward,
                &mut |k, v| {
                    let Some((rev, tomb)) = Revision::decode(k) else {
                        return ScanControl::Continue;
                    };
                    let full = raw.len() >= max || (req.max_bytes > 0 && bytes >= req.max_bytes);
                    if full && raw.last().is_some_and(|(r, _, _)| r.main != rev.main) {
                        stop_at = Some(rev.main);
                        return ScanControl::Stop;
                    }
                    match KeyValue::decode(v) {
                        Ok(kv) => {
                            if span.contains(&kv.key) {
                                bytes += kv.key.len() + kv.value.len();
                                raw.push((rev, tomb, kv));
                            }
                            ScanControl::Continue
                        }
                        Err(e) => {
                            failure = Some(e);
                            ScanControl::Stop
                        }
                    }
                },
            )
            .map_err(|e| other(e.into()))?;
        if let Some(e) = failure {
            return Err(ApplyError {
                kind: ApplyErrorKind::Other,
                message: e.to_string(),
            });
        }
        if let Some(next) = stop_at {
            batch.next_revision = next;
        }
        for (rev, tomb, kv) in raw {
            let prev_kv = if req.prev_kv {
                self.prev_version(&kv.key, rev).map_err(other)?
            } else {
                None
            };
            let ty = if tomb {
                EventType::Delete
            } else {
                EventType::Put
            };
            batch.events.push(Event {
                r#type: ty as i32,
                kv: Some(kv),
                prev_kv,
            });
        }
        Ok(batch)
    }

    /// The version an applied event replaced (its `prev_kv`): none for a put that created the
    /// key (version 1), else the key's previous entry in the index, read from the `kv` table.
    /// (Writes no longer read the previous value, so their events leave `prev_kv` empty.)
    pub fn replaced_version(
        &self,
        kv: &KeyValue,
        is_delete: bool,
    ) -> Result<Option<KeyValue>, StoreError> {
        if !is_delete && kv.version == 1 {
            return Ok(None);
        }
        // A key is written at most once per revision, so its previous entry is the last one
        // before sub-revision 0 of the event's revision.
        self.prev_version(&kv.key, Revision::new(kv.mod_revision, 0))
    }

    fn prev_version(&self, key: &[u8], rev: Revision) -> Result<Option<KeyValue>, StoreError> {
        let prev = {
            let index = self.inner.read_index();
            index
                .get(key)
                .and_then(|entries| super::index::before(entries, rev))
        };
        match prev {
            Some(e) if !e.tombstone => self.inner.load_kv(e.rev),
            _ => Ok(None),
        }
    }

    pub fn lease(&self, id: i64) -> Option<LeaseInfo> {
        self.inner.read_leases().get(&id).map(|l| LeaseInfo {
            id,
            ttl: l.ttl,
            remaining_ttl: l.remaining,
            keys: l.keys.iter().cloned().collect(),
        })
    }

    pub fn leases(&self) -> Vec<LeaseInfo> {
        self.inner
            .read_leases()
            .iter()
            .map(|(id, l)| LeaseInfo {
                id: *id,
                ttl: l.ttl,
                remaining_ttl: l.remaining,
                keys: l.keys.iter().cloned().collect(),
            })
            .collect()
    }

    /// Keys in the index (live ones and deleted ones whose history is not compacted yet).
    pub fn key_count(&self) -> usize {
        self.inner.read_index().len()
    }

    pub fn alarms(&self) -> Vec<AlarmMember> {
        self.inner
            .alarms
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The applied auth state (users, roles, permissions, enabled flag, auth revision).
    pub fn auth(&self) -> Arc<AuthState> {
        self.inner
            .auth
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The simple tokens assigned by applied `Authenticate` commands.
    pub fn auth_tokens(&self) -> &TokenTable {
        &self.inner.tokens
    }

    /// Starts an apply batch; only one exists at a time.
    pub fn begin_apply(&self) -> ApplyBatch<'_> {
        ApplyBatch::new(self)
    }

    pub fn get_meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.inner.engine.get(Table::Meta, key)?)
    }

    /// A CRC-32 (Castagnoli-free IEEE) over every `kv` table entry visible in the compacted
    /// history up to `revision`: entries above the compact revision, plus for each key the
    /// version kept at the compact revision. It does not depend on how far physical compaction
    /// has progressed, so every member that applied the same log computes the same hash.
    pub fn hash_kv(&self, revision: i64, format: HashKvFormat) -> Result<HashKvResult, ApplyError> {
        let current = self.current_revision();
        let at = if revision <= 0 { current } else { revision };
        if at > current {
            return Err(ApplyError::new(ApplyErrorKind::FutureRevision));
        }
        let compacted = self.compact_revision();
        // As etcd: an explicit revision at or below the compact revision is compacted.
        if at < compacted || (revision > 0 && revision <= compacted) {
            return Err(ApplyError::new(ApplyErrorKind::Compacted));
        }
        // The revisions below the compaction that count: each key's version visible at the
        // compact revision (Keel's own hash), or at the hashed revision (etcd's `Keep`).
        let keep_at = match format {
            HashKvFormat::Etcd => at,
            HashKvFormat::Internal => compacted,
        };
        let kept: BTreeSet<Revision> = {
            let index = self.inner.read_index();
            index
                .values()
                .filter_map(|entries| visible_at(entries, keep_at).map(|e| e.rev))
                .collect()
        };
        let mut internal = crc32fast::Hasher::new();
        let mut etcd = crc32c::crc32c(b"key");
        let mut failure = None;
        self.inner
            .engine
            .scan(
                Table::Kv,
                &[],
                Some(&Revision::lower_bound(at + 1)),
                Direction::Forward,
                &mut |k, v| {
                    let Some((rev, tombstone)) = Revision::decode(k) else {
                        return ScanControl::Continue;
                    };
                    match format {
                        HashKvFormat::Internal => {
                            if rev.main > compacted || kept.contains(&rev) {
                                internal.update(k);
                                internal.update(v);
                            }
                        }
                        HashKvFormat::Etcd => {
                            let below = rev.main <= compacted;
                            if (below && !kept.is_empty() && !kept.contains(&rev))
                                || (tombstone && rev.main == compacted)
                            {
                                return ScanControl::Continue;
                            }
                            etcd = crc32c::crc32c_append(etcd, &rev.encode_etcd(tombstone));
                            if tombstone {
                                // etcd's tombstone holds the key only; Keel's also its revision.
                                match KeyValue::decode(v) {
                                    Ok(kv) => {
                                        let bare = KeyValue {
                                            key: kv.key,
                                            ..Default::default()
                                        };
                                        etcd = crc32c::crc32c_append(etcd, &bare.encode_to_vec());
                                    }
                                    Err(e) => {
                                        failure = Some(e.to_string());
                                        return ScanControl::Stop;
                                    }
                                }
                            } else {
                                etcd = crc32c::crc32c_append(etcd, v);
                            }
                        }
                    }
                    ScanControl::Continue
                },
            )
            .map_err(|e| other(e.into()))?;
        if let Some(e) = failure {
            return Err(other(StoreError::Corrupt {
                table: "kv",
                detail: e,
            }));
        }
        Ok(HashKvResult {
            hash: match format {
                HashKvFormat::Etcd => etcd,
                HashKvFormat::Internal => internal.finalize(),
            },
            compact_revision: compacted,
            hash_revision: at,
        })
    }

    pub fn stats(&self) -> StoreStats {
        let index = self.inner.read_index();
        let revisions: usize = index.values().map(Vec::len).sum();
        StoreStats {
            keys: index.len(),
            revisions,
            index_bytes_estimate: index.bytes_estimate(),
        }
    }
}

/// Deletes superseded revisions at or below `at`, a chunk of keys at a time, releasing the index
/// lock between chunks so readers and the applier keep going.
fn physical_compact(inner: &Inner, at: i64) -> Result<(), StoreError> {
    use crate::observe::{CompactionStep, compaction};
    let started = std::time::Instant::now();
    let mut cursor: Option<Vec<u8>> = None;
    loop {
        let mut batch = WriteBatch::new();
        let mut last = None;
        let mut deleted = 0u64;
        {
            let mut index = inner.write_index();
            let held = std::time::Instant::now();
            let lower = match &cursor {
                Some(c) => Bound::Excluded(c.as_slice()),
                None => Bound::Unbounded,
            };
            let keys: Vec<Vec<u8>> = index
                .range((lower, Bound::Unbounded))
                .take(COMPACT_BATCH_KEYS)
                .map(|(k, _)| k.to_vec())
                .collect();
            for k in keys {
                if let Some(entries) = index.get_mut(&k) {
                    for gone in compact_entries(entries, at) {
                        batch.delete(Table::Kv, gone.rev.encode(gone.tombstone).to_vec());
                        deleted += 1;
                    }
                    if entries.is_empty() {
                        index.remove(&k);
                    }
                }
                last = Some(k);
            }
            compaction(CompactionStep::IndexPause(held.elapsed()));
        }
        if !batch.is_empty() {
            let writing = std::time::Instant::now();
            inner.engine.write(batch, false)?;
            compaction(CompactionStep::DbPause(writing.elapsed()));
            compaction(CompactionStep::Deleted(deleted));
        }
        match last {
            Some(k) => cursor = Some(k),
            None => break,
        }
    }
    let mut done = WriteBatch::new();
    done.put(Table::Meta, META_COMPACT_DONE, at.to_be_bytes().to_vec());
    inner.engine.write(done, false)?;
    inner.compact_done.send_replace(at);
    compaction(CompactionStep::Finished(started.elapsed()));
    Ok(())
}
