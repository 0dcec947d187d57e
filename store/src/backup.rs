//! Backup files: what `Maintenance.Snapshot` streams to `etcdctl snapshot save`, and what
//! `keel snapshot restore` turns into the data directory of a new cluster.
//!
//! A backup is what etcd's is: a bbolt database ([`crate::bbolt`]) laid out as etcd lays out
//! its own, followed by the SHA-256 of the database:
//!
//! ```text
//! | bbolt database (pages of 4096 bytes) | sha256 (32 bytes) |
//! ```
//!
//! so `etcdctl snapshot save` accepts the stream (it wants `512 * n + 32` bytes), `etcdctl
//! snapshot status` reads the file, and `etcdctl snapshot restore` makes a real etcd member of
//! it; and `keel snapshot restore` takes backups of real etcd clusters (or, with
//! `--skip-hash-check`, an etcd member's `member/snap/db`).
//!
//! | etcd bucket | key | value | Keel (table: key) |
//! |---|---|---|---|
//! | `key` | main (8 BE) `_` sub (8 BE), `t` appended for a tombstone | `mvccpb.KeyValue` (a tombstone: the key only) | `kv`: main ‖ sub ‖ kind |
//! | `lease` | lease ID (8 BE) | `leasepb.Lease {ID, TTL, RemainingTTL}` | `lease`: ID → TTL ‖ remaining (−1 = none) |
//! | `meta` | `scheduledCompactRev`, `finishedCompactRev` (a revision key, sub 0), `consistent_index` (8 BE) | | `meta`: `mvcc/compact_rev`, `mvcc/compact_done`; the applied log index |
//! | `auth` | `authEnabled` (1 byte), `authRevision` (8 BE) | | `meta`: `auth/enabled`, `auth/revision` |
//! | `authUsers`, `authRoles` | name | `authpb.User`, `authpb.Role` | `meta`: `auth/user/<name>`, `auth/role/<name>` |
//! | `members` | member ID in hex | JSON `{id, peerURLs, isLearner, name, clientURLs}` | the Raft membership |
//! | `alarm` | `etcdserverpb.AlarmMember` | empty | `meta`: `mvcc/alarms` |
//!
//! `members_removed` is written empty. Restoring loads the MVCC data (keys, history, leases,
//! compaction state) and auth, but not the source cluster's members, applied index or alarms:
//! the restored data directory starts a new cluster whose membership comes from the restore
//! flags, as etcd's restore does with the members. Files written by Keel before it wrote bbolt
//! (its own snapshot format, starting `KEELSNAP`) are still restored.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::path::Path;
use std::sync::Arc;

use keel_proto::authpb::{Role, User};
use keel_proto::etcdserverpb::AlarmResponse;
use keel_proto::mvccpb::KeyValue;
use prost::Message;
use sha2::{Digest, Sha256};

use crate::auth::{META_AUTH_ENABLED, META_AUTH_REVISION, META_AUTH_ROLE, META_AUTH_USER};
use crate::bbolt::{BoltError, BoltReader, BoltWriter, BucketRoot};
use crate::engine::{Engine, EngineError, Table, ViewScanner, WriteBatch};
use crate::mvcc::MvccStore;
use crate::mvcc::Revision;
use crate::mvcc::store::{META_ALARMS, META_COMPACT, META_COMPACT_DONE, META_REV};
use crate::raft::snapshot::SnapshotReader;
use crate::raft::state_machine::{META_LAST_APPLIED, META_MEMBERSHIP};
use crate::raft::types::{LogId, StoredMembership, decode};

/// Size of the SHA-256 trailer.
pub const CHECKSUM_LEN: u64 = 32;
/// A file of `ALIGN * n + CHECKSUM_LEN` bytes carries a checksum (etcd's rule).
pub const ALIGN: u64 = 512;
/// Records written to the engine per batch while restoring.
const RESTORE_BATCH: usize = 8192;

/// etcd's bucket names and the keys of its `meta` and `auth` buckets.
mod etcd {
    pub const KEY: &[u8] = b"key";
    pub const META: &[u8] = b"meta";
    pub const LEASE: &[u8] = b"lease";
    pub const ALARM: &[u8] = b"alarm";
    pub const AUTH: &[u8] = b"auth";
    pub const AUTH_USERS: &[u8] = b"authUsers";
    pub const AUTH_ROLES: &[u8] = b"authRoles";
    pub const MEMBERS: &[u8] = b"members";
    pub const MEMBERS_REMOVED: &[u8] = b"members_removed";
    pub const CONSISTENT_INDEX: &[u8] = b"consistent_index";
    pub const SCHEDULED_COMPACT: &[u8] = b"scheduledCompactRev";
    pub const FINISHED_COMPACT: &[u8] = b"finishedCompactRev";
    pub const AUTH_ENABLED: &[u8] = b"authEnabled";
    pub const AUTH_REVISION: &[u8] = b"authRevision";
}

/// etcd's `leasepb.Lease`, as its `lease` bucket stores it.
#[derive(Clone, PartialEq, prost::Message)]
struct EtcdLease {
    #[prost(int64, tag = "1")]
    id: i64,
    #[prost(int64, tag = "2")]
    ttl: i64,
    #[prost(int64, tag = "3")]
    remaining_ttl: i64,
}

/// etcd's member record in its `members` bucket (field order as etcd writes it).
#[derive(serde::Serialize)]
struct EtcdMember<'a> {
    id: u64,
    #[serde(rename = "peerURLs")]
    peer_urls: &'a [String],
    #[serde(rename = "isLearner", skip_serializing_if = "std::ops::Not::not")]
    is_learner: bool,
    name: &'a str,
    #[serde(rename = "clientURLs", skip_serializing_if = "<[String]>::is_empty")]
    client_urls: &'a [String],
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn be_i64(bytes: &[u8]) -> Option<i64> {
    Some(i64::from_be_bytes(bytes.try_into().ok()?))
}

/// What [`write_backup`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupInfo {
    /// Total file size, checksum included.
    pub size: u64,
    /// Records (table entries) read from the store.
    pub records: u64,
}

/// Writes a backup of `engine`'s state-machine tables to `path` (through a temporary file next
/// to it, synced, then renamed). `progress` is called with the number of records written so far.
pub fn write_backup(
    engine: &Arc<dyn Engine>,
    path: &Path,
    progress: impl FnMut(u64),
) -> io::Result<BackupInfo> {
    let tmp = path.with_extension("part");
    let result = stream_backup(
        engine,
        |_| Ok(io::BufWriter::with_capacity(1 << 20, File::create(&tmp)?)),
        progress,
    )
    .and_then(|(info, out)| {
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        Ok(info)
    });
    match result {
        Ok(info) => {
            std::fs::rename(&tmp, path)?;
            Ok(info)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Passes writes through, hashing them.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Streams a backup of `engine`'s state-machine tables, front to back, from one consistent view
/// of the engine, without a temporary file: a first pass over the view lays the database out
/// (its size is then known), `open(size)` gives the output (`size` counts the checksum too), and
/// a second pass writes it, followed by its SHA-256. `progress` gets the records written so far.
/// The view is held until the last byte is written, so a slow reader holds it as long (as an
/// etcd snapshot holds its read transaction).
pub fn stream_backup<W: Write>(
    engine: &Arc<dyn Engine>,
    open: impl FnOnce(u64) -> io::Result<W>,
    mut progress: impl FnMut(u64),
) -> io::Result<(BackupInfo, W)> {
    let mut open = Some(open);
    let mut done = None;
    let io = |e: io::Error| EngineError::Io(e);
    engine
        .with_consistent_view(&mut |scan| {
            let mut first = BoltWriter::layout();
            build_database(scan, &mut first, &mut |_| {}).map_err(io)?;
            let layout = first.finish().map_err(|e| io(e.into()))?;
            let size = layout.size() + CHECKSUM_LEN;
            let Some(open) = open.take() else {
                return Err(io(io::Error::other("the consistent view was taken twice")));
            };
            let mut out = Hashing {
                inner: open(size).map_err(io)?,
                hasher: Sha256::new(),
            };
            let mut second = BoltWriter::write(&mut out, layout).map_err(|e| io(e.into()))?;
            let records = build_database(scan, &mut second, &mut progress).map_err(io)?;
            second.finish().map_err(|e| io(e.into()))?;
            // The database is whole pages of 4096 bytes: a multiple of 512, as etcd's client
            // requires before the checksum.
            let digest = out.hasher.finalize();
            let mut inner = out.inner;
            inner.write_all(&digest).map_err(io)?;
            inner.flush().map_err(io)?;
            done = Some((BackupInfo { size, records }, inner));
            Ok(())
        })
        .map_err(|e| match e {
            EngineError::Io(e) => e,
            other => io::Error::other(other.to_string()),
        })?;
    done.ok_or_else(|| io::Error::other("the consistent view was not scanned"))
}

/// Writes the bbolt database of a backup from a scanner of one view; returns the records read.
/// Called twice per backup (see [`BoltWriter`]), making the same calls both times.
fn build_database(
    scan: &mut ViewScanner<'_>,
    db: &mut BoltWriter<'_>,
    progress: &mut dyn FnMut(u64),
) -> io::Result<u64> {
    db.begin_bucket(etcd::KEY)?;
    let mut meta = BTreeMap::new();
    let mut leases = Vec::new();
    let mut records = 0u64;
    let bolt = |e: BoltError| EngineError::Io(e.into());
    scan(&Table::STATE_MACHINE, &mut |table, key, value| {
        records += 1;
        if records.is_multiple_of(100_000) {
            progress(records);
        }
        match table {
            Table::Kv => {
                let (rev, tombstone) = Revision::decode(key)
                    .ok_or_else(|| EngineError::Io(invalid("a malformed kv key")))?;
                let etcd_key = rev.encode_etcd(tombstone);
                if tombstone {
                    // etcd's tombstone holds the key only.
                    let kv = KeyValue::decode(value)
                        .map_err(|e| EngineError::Io(invalid(e.to_string())))?;
                    let bare = KeyValue {
                        key: kv.key,
                        ..Default::default()
                    };
                    db.put(&etcd_key, &bare.encode_to_vec()).map_err(bolt)
                } else {
                    db.put(&etcd_key, value).map_err(bolt)
                }
            }
            Table::Meta => {
                meta.insert(key.to_vec(), value.to_vec());
                Ok(())
            }
            _ => {
                leases.push((key.to_vec(), value.to_vec()));
                Ok(())
            }
        }
    })
    .map_err(|e| match e {
        EngineError::Io(e) => e,
        other => io::Error::other(other.to_string()),
    })?;
    progress(records);

    db.begin_bucket(etcd::LEASE)?;
    for (key, value) in &leases {
        let id = be_i64(key).ok_or_else(|| invalid("a malformed lease key"))?;
        let (ttl, remaining) = match (value.get(..8), value.get(8..16)) {
            (Some(t), Some(r)) => (be_i64(t).unwrap_or(0), be_i64(r).unwrap_or(-1)),
            _ => return Err(invalid("a malformed lease record")),
        };
        let lease = EtcdLease {
            id,
            ttl,
            remaining_ttl: remaining.max(0),
        };
        db.put(key, &lease.encode_to_vec())?;
    }

    db.begin_bucket(etcd::META)?;
    let applied = match meta.get(META_LAST_APPLIED) {
        Some(b) => decode::<Option<LogId>>(b)?.map(|id| id.index),
        None => None,
    };
    if let Some(index) = applied {
        db.put(etcd::CONSISTENT_INDEX, &index.to_be_bytes())?;
    }
    let compact = meta.get(META_COMPACT).and_then(|b| be_i64(b));
    let done = meta
        .get(META_COMPACT_DONE)
        .and_then(|b| be_i64(b))
        .unwrap_or(0);
    if let Some(compact) = compact {
        if done > 0 {
            db.put(
                etcd::FINISHED_COMPACT,
                &Revision::new(done.min(compact), 0).encode_etcd(false),
            )?;
        }
        db.put(
            etcd::SCHEDULED_COMPACT,
            &Revision::new(compact, 0).encode_etcd(false),
        )?;
    }

    db.begin_bucket(etcd::AUTH)?;
    if let Some(enabled) = meta.get(META_AUTH_ENABLED) {
        db.put(etcd::AUTH_ENABLED, enabled)?;
    }
    if let Some(revision) = meta.get(META_AUTH_REVISION) {
        db.put(etcd::AUTH_REVISION, revision)?;
    }
    for (bucket, prefix) in [
        (etcd::AUTH_USERS, META_AUTH_USER),
        (etcd::AUTH_ROLES, META_AUTH_ROLE),
    ] {
        db.begin_bucket(bucket)?;
        for (key, value) in meta.range(prefix.to_vec()..) {
            let Some(name) = key.strip_prefix(prefix) else {
                break;
            };
            db.put(name, value)?;
        }
    }

    db.begin_bucket(etcd::ALARM)?;
    if let Some(b) = meta.get(META_ALARMS) {
        let alarms = AlarmResponse::decode(b.as_slice()).map_err(|e| invalid(e.to_string()))?;
        let keys: std::collections::BTreeSet<Vec<u8>> =
            alarms.alarms.iter().map(|a| a.encode_to_vec()).collect();
        for key in keys {
            db.put(&key, &[])?;
        }
    }

    db.begin_bucket(etcd::MEMBERS)?;
    if let Some(b) = meta.get(META_MEMBERSHIP) {
        let stored: StoredMembership = decode(b)?;
        let membership = stored.membership();
        let learners: std::collections::BTreeSet<u64> = membership.learner_ids().collect();
        let mut members = BTreeMap::new();
        for (id, node) in membership.nodes() {
            let record = EtcdMember {
                id: *id,
                peer_urls: &node.peer_urls,
                is_learner: learners.contains(id),
                name: &node.name,
                client_urls: &node.client_urls,
            };
            members.insert(
                format!("{id:x}"),
                serde_json::to_vec(&record).map_err(io::Error::other)?,
            );
        }
        for (key, value) in members {
            db.put(key.as_bytes(), &value)?;
        }
    }
    db.begin_bucket(etcd::MEMBERS_REMOVED)?;
    Ok(records)
}

/// How much of the file at `path` is the database: `(database bytes, has a checksum)`. A file
/// of `512 * n + 32` bytes ends with a SHA-256 (etcd's rule).
fn database_len(path: &Path) -> io::Result<(u64, bool)> {
    let total = std::fs::metadata(path)?.len();
    let has_checksum = total >= CHECKSUM_LEN && (total - CHECKSUM_LEN).is_multiple_of(ALIGN);
    Ok(if has_checksum {
        (total - CHECKSUM_LEN, true)
    } else {
        (total, false)
    })
}

/// Checks a backup file's size rule and SHA-256. `progress` gets (bytes checked, total).
pub fn verify_backup(path: &Path, mut progress: impl FnMut(u64, u64)) -> io::Result<()> {
    let (body, has_checksum) = database_len(path)?;
    let total = body + if has_checksum { CHECKSUM_LEN } else { 0 };
    if !has_checksum {
        return Err(invalid(format!(
            "{}: snapshot missing hash but --skip-hash-check=false (size {total} is not 512*n + 32)",
            path.display()
        )));
    }
    let mut input = BufReader::with_capacity(1 << 20, File::open(path)?);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    while done < body {
        let want = ((body - done) as usize).min(buf.len());
        input.read_exact(&mut buf[..want])?;
        hasher.update(&buf[..want]);
        done += want as u64;
        progress(done, total);
    }
    let mut expected = [0u8; CHECKSUM_LEN as usize];
    input.read_exact(&mut expected)?;
    if hasher.finalize().as_slice() != expected {
        return Err(invalid(format!(
            "{}: SHA-256 mismatch: the file is corrupt or truncated",
            path.display()
        )));
    }
    Ok(())
}

/// Whether [`restore_backup`] checks the file's SHA-256 first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashCheck {
    /// The file must end with a matching SHA-256.
    Verify,
    /// Not checked (the caller did, or the file is a database copied from a data directory;
    /// a checksum at its end is still recognised and left out).
    Skip,
}

/// What [`restore_backup`] loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreInfo {
    pub records: u64,
    /// The store's revision after the restore.
    pub revision: i64,
    pub keys: usize,
}

/// Loads the backup at `path` (a bbolt database from Keel or etcd, or a backup in Keel's
/// earlier format) into `engine`, which must be empty. `progress` gets the number of records
/// loaded so far.
pub fn restore_backup(
    path: &Path,
    engine: &Arc<dyn Engine>,
    check: HashCheck,
    mut progress: impl FnMut(u64),
) -> io::Result<RestoreInfo> {
    let mut non_empty = false;
    for table in Table::STATE_MACHINE {
        engine
            .scan(
                table,
                &[],
                None,
                crate::engine::Direction::Forward,
                &mut |_, _| {
                    non_empty = true;
                    crate::engine::ScanControl::Stop
                },
            )
            .map_err(|e| io::Error::other(e.to_string()))?;
    }
    if non_empty {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "refusing to restore into a non-empty store",
        ));
    }
    if check == HashCheck::Verify {
        verify_backup(path, |_, _| {})?;
    }
    let mut magic = [0u8; 8];
    let legacy = File::open(path)?.read_exact(&mut magic).is_ok() && &magic == b"KEELSNAP";
    let records = if legacy {
        load_keel_snapshot(path, engine, &mut progress)?
    } else {
        let (len, _) = database_len(path)?;
        load_bbolt(path, len, engine, &mut progress)?
    };
    let mvcc = MvccStore::open(engine.clone()).map_err(|e| io::Error::other(e.to_string()))?;
    Ok(RestoreInfo {
        records,
        revision: mvcc.current_revision(),
        keys: mvcc.stats().keys,
    })
}

/// Writes batches of records into the engine, reporting progress.
struct Loader<'a, P: FnMut(u64)> {
    engine: &'a Arc<dyn Engine>,
    batch: WriteBatch,
    records: u64,
    progress: &'a mut P,
}

impl<P: FnMut(u64)> Loader<'_, P> {
    fn put(&mut self, table: Table, key: Vec<u8>, value: Vec<u8>) -> io::Result<()> {
        self.records += 1;
        self.batch.put(table, key, value);
        if self.batch.len() >= RESTORE_BATCH {
            self.engine
                .write(std::mem::take(&mut self.batch), false)
                .map_err(|e| io::Error::other(e.to_string()))?;
            (self.progress)(self.records);
        }
        Ok(())
    }

    fn finish(self) -> io::Result<u64> {
        self.engine
            .write(self.batch, true)
            .map_err(|e| io::Error::other(e.to_string()))?;
        (self.progress)(self.records);
        Ok(self.records)
    }
}

/// Loads an etcd-layout bbolt database (the table at the top of this module).
fn load_bbolt(
    path: &Path,
    len: u64,
    engine: &Arc<dyn Engine>,
    progress: &mut impl FnMut(u64),
) -> io::Result<u64> {
    let db = BoltReader::open(path, len)?;
    let buckets: BTreeMap<Vec<u8>, BucketRoot> = db.buckets()?.into_iter().collect();
    let Some(key_bucket) = buckets.get(etcd::KEY) else {
        return Err(invalid(format!(
            "{}: a bbolt database without etcd's `key` bucket",
            path.display()
        )));
    };
    let mut loader = Loader {
        engine,
        batch: WriteBatch::new(),
        records: 0,
        progress,
    };
    let bad = |what: &str| BoltError::Corrupt(what.to_string());
    let mut last_revision = 0i64;
    db.for_each(key_bucket, &mut |e| {
        let (rev, tombstone) =
            Revision::decode_etcd(e.key).ok_or_else(|| bad("a malformed key in bucket `key`"))?;
        let mut kv =
            KeyValue::decode(e.value).map_err(|_| bad("a malformed KeyValue in bucket `key`"))?;
        last_revision = last_revision.max(rev.main);
        let value = if tombstone {
            // Keel's tombstone also carries its revision.
            kv = KeyValue {
                key: kv.key,
                mod_revision: rev.main,
                ..Default::default()
            };
            kv.encode_to_vec()
        } else {
            if kv.mod_revision != rev.main {
                return Err(bad("a KeyValue whose mod_revision is not its revision"));
            }
            e.value.to_vec()
        };
        loader
            .put(Table::Kv, rev.encode(tombstone).to_vec(), value)
            .map_err(BoltError::Io)
    })?;

    let mut scheduled = None;
    let mut finished = None;
    if let Some(meta) = buckets.get(etcd::META) {
        db.for_each(meta, &mut |e| {
            let rev = || {
                Revision::decode_etcd(e.value)
                    .map(|(r, _)| r.main)
                    .ok_or_else(|| bad("a malformed compaction revision"))
            };
            match e.key {
                k if k == etcd::SCHEDULED_COMPACT => scheduled = Some(rev()?),
                k if k == etcd::FINISHED_COMPACT => finished = Some(rev()?),
                _ => {}
            }
            Ok(())
        })?;
    }
    if let Some(lease) = buckets.get(etcd::LEASE) {
        db.for_each(lease, &mut |e| {
            let l = EtcdLease::decode(e.value).map_err(|_| bad("a malformed lease"))?;
            if e.key.len() != 8 {
                return Err(bad("a malformed lease ID"));
            }
            let mut value = l.ttl.to_be_bytes().to_vec();
            let remaining = if l.remaining_ttl > 0 {
                l.remaining_ttl
            } else {
                -1
            };
            value.extend_from_slice(&remaining.to_be_bytes());
            loader
                .put(Table::Lease, e.key.to_vec(), value)
                .map_err(BoltError::Io)
        })?;
    }
    if let Some(auth) = buckets.get(etcd::AUTH) {
        db.for_each(auth, &mut |e| {
            let target = match e.key {
                k if k == etcd::AUTH_ENABLED => META_AUTH_ENABLED,
                k if k == etcd::AUTH_REVISION => META_AUTH_REVISION,
                _ => return Ok(()),
            };
            loader
                .put(Table::Meta, target.to_vec(), e.value.to_vec())
                .map_err(BoltError::Io)
        })?;
    }
    for (bucket, prefix) in [
        (etcd::AUTH_USERS, META_AUTH_USER),
        (etcd::AUTH_ROLES, META_AUTH_ROLE),
    ] {
        if let Some(root) = buckets.get(bucket) {
            db.for_each(root, &mut |e| {
                let valid = if bucket == etcd::AUTH_USERS {
                    User::decode(e.value).is_ok()
                } else {
                    Role::decode(e.value).is_ok()
                };
                if !valid {
                    return Err(bad("a malformed auth user or role"));
                }
                let mut key = prefix.to_vec();
                key.extend_from_slice(e.key);
                loader
                    .put(Table::Meta, key, e.value.to_vec())
                    .map_err(BoltError::Io)
            })?;
        }
    }
    // etcd's compaction state: a compaction scheduled past the finished one is resumed on open.
    if let Some(compact) = scheduled.or(finished) {
        loader.put(
            Table::Meta,
            META_COMPACT.to_vec(),
            compact.to_be_bytes().to_vec(),
        )?;
        let done = finished.unwrap_or(0).min(compact);
        loader.put(
            Table::Meta,
            META_COMPACT_DONE.to_vec(),
            done.to_be_bytes().to_vec(),
        )?;
    }
    let current = last_revision
        .max(scheduled.unwrap_or(0))
        .max(finished.unwrap_or(0));
    loader.put(
        Table::Meta,
        META_REV.to_vec(),
        current.to_be_bytes().to_vec(),
    )?;
    loader.finish()
}

/// Loads a backup in Keel's earlier format (a state-machine snapshot file, padded, with the
/// SHA-256 at its end), skipping the source cluster's Raft state and alarms.
fn load_keel_snapshot(
    path: &Path,
    engine: &Arc<dyn Engine>,
    progress: &mut impl FnMut(u64),
) -> io::Result<u64> {
    const SKIPPED_META: [&[u8]; 3] = [META_LAST_APPLIED, META_MEMBERSHIP, META_ALARMS];
    let mut reader = SnapshotReader::open(path)?;
    let mut loader = Loader {
        engine,
        batch: WriteBatch::new(),
        records: 0,
        progress,
    };
    while let Some((table, key, value)) = reader.next_record()? {
        if table == Table::Meta && SKIPPED_META.contains(&key.as_slice()) {
            continue;
        }
        loader.put(table, key, value)?;
    }
    loader.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::EngineError;
    use crate::engine::memory::MemoryEngine;
    use keel_proto::etcdserverpb::{PutRequest, RangeRequest};
    use keel_proto::keelpb::{RaftRequest, raft_request::Request};

    /// A store on a fresh in-memory engine.
    fn memory_store() -> (Arc<dyn Engine>, MvccStore) {
        let engine: Arc<dyn Engine> = Arc::new(MemoryEngine::new());
        let store = MvccStore::open(engine.clone()).expect("open");
        (engine, store)
    }

    fn apply(store: &MvccStore, request: Request) {
        let mut batch = store.begin_apply();
        let outcome = batch.apply(&RaftRequest {
            request: Some(request),
            origin: None,
        });
        assert!(
            outcome.response.error.is_none(),
            "{:?}",
            outcome.response.error
        );
        batch.commit(true).expect("commit");
    }

    fn put(store: &MvccStore, key: &str, value: &str) {
        apply(
            store,
            Request::Put(PutRequest {
                key: key.into(),
                value: value.into(),
                ..Default::default()
            }),
        );
    }

    #[test]
    fn backup_round_trip_keeps_data_and_history() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (source, store) = memory_store();
        put(&store, "a", "1");
        put(&store, "a", "2");
        put(&store, "b", "3");
        let path = dir.path().join("backup.db");
        let info = write_backup(&source, &path, |_| {}).expect("backup");
        assert_eq!(info.size, std::fs::metadata(&path).expect("meta").len());
        assert_eq!((info.size - CHECKSUM_LEN) % ALIGN, 0);

        let target: Arc<dyn Engine> = Arc::new(MemoryEngine::new());
        let restored = restore_backup(&path, &target, HashCheck::Verify, |_| {}).expect("restore");
        assert_eq!(restored.revision, 4);
        assert_eq!(restored.keys, 2);
        let store = MvccStore::open(target.clone()).expect("open restored");
        let old = store
            .range(&RangeRequest {
                key: b"a".to_vec(),
                revision: 2,
                ..Default::default()
            })
            .expect("historical read");
        assert_eq!(old.kvs[0].value, b"1");
        // A second restore into the same (now non-empty) engine is refused.
        assert!(restore_backup(&path, &target, HashCheck::Verify, |_| {}).is_err());
    }

    #[test]
    fn corrupt_or_truncated_backups_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (source, store) = memory_store();
        put(&store, "k", "v");
        let path = dir.path().join("backup.db");
        write_backup(&source, &path, |_| {}).expect("backup");
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[20] ^= 0x01;
        std::fs::write(&path, &bytes).expect("write");
        let err = verify_backup(&path, |_, _| {}).expect_err("corruption detected");
        assert!(err.to_string().contains("SHA-256"), "{err}");
        std::fs::write(&path, &bytes[..bytes.len() - 1]).expect("write");
        let err = verify_backup(&path, |_, _| {}).expect_err("truncation detected");
        assert!(err.to_string().contains("512"), "{err}");
        assert!(err.to_string().contains("snapshot missing hash"), "{err}");
        let target: Arc<dyn Engine> = Arc::new(MemoryEngine::new());
        assert!(restore_backup(&path, &target, HashCheck::Verify, |_| {}).is_err());
    }

    /// Every bucket etcd's snapshot has, in etcd's encoding, and back again.
    #[test]
    fn backups_use_etcds_buckets_and_restore_everything() {
        use keel_proto::authpb::permission::Type as PermType;
        use keel_proto::etcdserverpb::{
            AuthRoleAddRequest, AuthRoleGrantPermissionRequest, AuthUserAddRequest,
            AuthUserGrantRoleRequest, CompactionRequest, DeleteRangeRequest, LeaseGrantRequest,
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let (source, store) = memory_store();
        put(&store, "a", "1"); // 2
        put(&store, "a", "2"); // 3
        put(&store, "b", "3"); // 4
        apply(
            &store,
            Request::DeleteRange(DeleteRangeRequest {
                key: b"a".to_vec(),
                ..Default::default()
            }),
        ); // 5
        apply(
            &store,
            Request::LeaseGrant(LeaseGrantRequest { id: 0x77, ttl: 600 }),
        );
        apply(
            &store,
            Request::Put(PutRequest {
                key: b"c".to_vec(),
                value: b"4".to_vec(),
                lease: 0x77,
                ..Default::default()
            }),
        ); // 6
        apply(
            &store,
            Request::Compaction(CompactionRequest {
                revision: 3,
                physical: false,
            }),
        );
        apply(
            &store,
            Request::AuthRoleAdd(AuthRoleAddRequest { name: "r1".into() }),
        );
        apply(
            &store,
            Request::AuthRoleGrantPermission(AuthRoleGrantPermissionRequest {
                name: "r1".into(),
                perm: Some(keel_proto::authpb::Permission {
                    perm_type: PermType::Readwrite as i32,
                    key: b"/app/".to_vec(),
                    range_end: b"/app0".to_vec(),
                }),
            }),
        );
        apply(
            &store,
            Request::AuthUserAdd(AuthUserAddRequest {
                name: "alice".into(),
                hashed_password: "JDJhJDA0JGhhc2g=".into(), /* base64 of a bcrypt hash */
                ..Default::default()
            }),
        );
        apply(
            &store,
            Request::AuthUserGrantRole(AuthUserGrantRoleRequest {
                user: "alice".into(),
                role: "r1".into(),
            }),
        );
        let auth_revision = store.auth().revision();
        // Let the physical compaction finish, so the file's content does not depend on timing.
        let progress = store.compaction_progress();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while *progress.borrow() < 3 {
            assert!(
                std::time::Instant::now() < deadline,
                "compaction did not finish"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let path = dir.path().join("backup.db");
        write_backup(&source, &path, |_| {}).expect("backup");

        // The database, as etcd would read it.
        let len = std::fs::metadata(&path).expect("meta").len() - CHECKSUM_LEN;
        let db = BoltReader::open(&path, len).expect("a bbolt database");
        let buckets = db.buckets().expect("buckets");
        let names: Vec<String> = buckets
            .iter()
            .map(|(n, _)| String::from_utf8_lossy(n).into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "alarm",
                "auth",
                "authRoles",
                "authUsers",
                "key",
                "lease",
                "members",
                "members_removed",
                "meta"
            ]
        );
        let entries = |name: &str| {
            let root = &buckets
                .iter()
                .find(|(n, _)| n == name.as_bytes())
                .expect("bucket")
                .1;
            let mut out = Vec::new();
            db.for_each(root, &mut |e| {
                out.push((e.key.to_vec(), e.value.to_vec()));
                Ok(())
            })
            .expect("walk");
            out
        };
        let keys = entries("key");
        let revs: Vec<Vec<u8>> = keys.iter().map(|(k, _)| k.clone()).collect();
        // Compacted at 3: revision 2 is gone, 3 is what revision 3 shows of `a`.
        assert_eq!(
            revs,
            [
                Revision::new(3, 0).encode_etcd(false),
                Revision::new(4, 0).encode_etcd(false),
                Revision::new(5, 0).encode_etcd(true),
                Revision::new(6, 0).encode_etcd(false),
            ]
        );
        assert_eq!(revs[2].len(), 18);
        assert_eq!(revs[2][8], b'_');
        assert_eq!(revs[2][17], b't');
        assert_eq!(
            KeyValue::decode(keys[2].1.as_slice()).expect("tombstone"),
            KeyValue {
                key: b"a".to_vec(),
                ..Default::default()
            }
        );
        let c = KeyValue::decode(keys[3].1.as_slice()).expect("kv");
        assert_eq!(
            (
                c.key.as_slice(),
                c.value.as_slice(),
                c.lease,
                c.create_revision,
                c.version
            ),
            (&b"c"[..], &b"4"[..], 0x77, 6, 1)
        );
        let leases = entries("lease");
        assert_eq!(leases[0].0, 0x77i64.to_be_bytes());
        assert_eq!(
            EtcdLease::decode(leases[0].1.as_slice()).expect("lease"),
            EtcdLease {
                id: 0x77,
                ttl: 600,
                remaining_ttl: 0
            }
        );
        let meta = entries("meta");
        let three = Revision::new(3, 0).encode_etcd(false);
        assert_eq!(
            meta,
            [
                (etcd::FINISHED_COMPACT.to_vec(), three.clone()),
                (etcd::SCHEDULED_COMPACT.to_vec(), three)
            ]
        );
        let auth = entries("auth");
        assert_eq!(
            auth,
            [(
                etcd::AUTH_REVISION.to_vec(),
                auth_revision.to_be_bytes().to_vec()
            )]
        );
        let users = entries("authUsers");
        let alice = User::decode(users[0].1.as_slice()).expect("user");
        assert_eq!(
            (users[0].0.as_slice(), alice.roles.as_slice()),
            (&b"alice"[..], &["r1".to_string()][..])
        );
        assert_eq!(
            alice.password, b"$2a$04$hash",
            "the hash itself, as etcd stores it"
        );
        assert_eq!(entries("authRoles")[0].0, b"r1");

        // And back.
        let target: Arc<dyn Engine> = Arc::new(MemoryEngine::new());
        let info = restore_backup(&path, &target, HashCheck::Verify, |_| {}).expect("restore");
        // Keys in the index: b, c, and a, deleted at 5 (its history is kept).
        assert_eq!((info.revision, info.keys), (6, 3));
        let restored = MvccStore::open(target).expect("open restored");
        assert_eq!(restored.compact_revision(), 3);
        let at = |rev: i64, key: &str| {
            restored.range(&RangeRequest {
                key: key.into(),
                revision: rev,
                ..Default::default()
            })
        };
        assert!(at(2, "a").is_err(), "compacted");
        assert_eq!(at(3, "a").expect("read").kvs[0].value, b"2");
        assert!(at(5, "a").expect("read").kvs.is_empty(), "deleted at 5");
        assert_eq!(at(0, "c").expect("read").kvs[0].lease, 0x77);
        let lease = restored.lease(0x77).expect("lease restored");
        assert_eq!((lease.ttl, lease.keys.clone()), (600, vec![b"c".to_vec()]));
        let auth = restored.auth();
        assert_eq!(auth.revision(), auth_revision);
        assert!(auth.has_role("alice", "r1"));
        assert_eq!(auth.role_get("r1").expect("role")[0].key, b"/app/");
    }

    /// Backups written before Keel wrote bbolt: its own snapshot file, padded, then SHA-256.
    #[test]
    fn backups_in_keels_earlier_format_still_restore() {
        use crate::raft::snapshot::SnapshotWriter;
        let dir = tempfile::tempdir().expect("tempdir");
        let (source, store) = memory_store();
        put(&store, "a", "1");
        put(&store, "a", "2");
        let path = dir.path().join("old.db");
        let tmp = dir.path().join("old.part");
        let mut writer = SnapshotWriter::create(&tmp).expect("create");
        source
            .scan_consistent(&Table::STATE_MACHINE, &mut |table, key, value| {
                writer.record(table, key, value).map_err(EngineError::Io)
            })
            .expect("scan");
        writer.finish(&tmp).expect("finish");
        let mut bytes = std::fs::read(&tmp).expect("read");
        bytes.resize(bytes.len().div_ceil(512) * 512, 0);
        let digest = Sha256::digest(&bytes);
        bytes.extend_from_slice(&digest);
        std::fs::write(&path, &bytes).expect("write");
        let target: Arc<dyn Engine> = Arc::new(MemoryEngine::new());
        let info = restore_backup(&path, &target, HashCheck::Verify, |_| {}).expect("restore");
        assert_eq!((info.revision, info.keys), (3, 1));
    }

    #[test]
    fn a_database_without_checksum_needs_skip_hash_check() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (source, store) = memory_store();
        put(&store, "k", "v");
        let path = dir.path().join("backup.db");
        write_backup(&source, &path, |_| {}).expect("backup");
        // What an etcd member's `member/snap/db` is: the database alone.
        let bytes = std::fs::read(&path).expect("read");
        let bare = dir.path().join("db");
        std::fs::write(&bare, &bytes[..bytes.len() - CHECKSUM_LEN as usize]).expect("write");
        let target: Arc<dyn Engine> = Arc::new(MemoryEngine::new());
        let err = restore_backup(&bare, &target, HashCheck::Verify, |_| {}).expect_err("no hash");
        assert!(err.to_string().contains("--skip-hash-check"), "{err}");
        let info = restore_backup(&bare, &target, HashCheck::Skip, |_| {}).expect("restore");
        assert_eq!((info.revision, info.keys), (2, 1));
    }
}
