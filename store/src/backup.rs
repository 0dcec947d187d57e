//! Backup files: what `Maintenance.Snapshot` streams to `etcdctl snapshot save`, and what
//! `keel snapshot restore` turns into the data directory of a new cluster.
//!
//! A backup is a state-machine snapshot file (the format in [`crate::raft::snapshot`]: every
//! `kv`, `meta` and `lease` entry from one consistent engine view, with a record count and a
//! CRC-32 trailer), then zero padding up to a multiple of 512 bytes, then the SHA-256 of
//! everything before it:
//!
//! ```text
//! | snapshot file (KEELSNAP ... trailer) | 0x00 padding | sha256 (32 bytes) |
//! |<------------- a multiple of 512 bytes ------------>|
//! ```
//!
//! The padding exists for etcd's client: `etcdctl snapshot save` accepts a stream only when its
//! size is `512 * n + 32` (it expects a database file followed by its SHA-256). The content is
//! Keel's, not bbolt's, so `etcdctl snapshot status/restore` cannot read it; `keel snapshot
//! restore` can, and it verifies the SHA-256 before writing anything.
//!
//! Restoring loads the MVCC data (keys, history, leases, compaction state) but not the Raft
//! identity of the source cluster (applied log id, membership) nor its alarms: the restored data
//! directory starts a new cluster whose membership comes from the restore flags.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::engine::{Engine, Table, WriteBatch};
use crate::mvcc::MvccStore;
use crate::raft::snapshot::{SnapshotReader, SnapshotWriter};
use crate::raft::state_machine::{META_LAST_APPLIED, META_MEMBERSHIP};

/// Size of the SHA-256 trailer.
pub const CHECKSUM_LEN: u64 = 32;
/// Backup files (without the checksum) are padded to a multiple of this.
pub const ALIGN: u64 = 512;
/// Records written to the engine per batch while restoring.
const RESTORE_BATCH: usize = 8192;

/// Meta keys that belong to the source cluster's Raft state or its alarms, not to the data.
const SKIPPED_META: [&[u8]; 3] = [META_LAST_APPLIED, META_MEMBERSHIP, b"mvcc/alarms"];

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// What [`write_backup`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupInfo {
    /// Total file size, checksum included.
    pub size: u64,
    /// Records (table entries) in the file.
    pub records: u64,
}

/// Writes a backup of `engine`'s state-machine tables to `path` (through a temporary file next
/// to it). `progress` is called with the number of records written so far.
pub fn write_backup(
    engine: &Arc<dyn Engine>,
    path: &Path,
    mut progress: impl FnMut(u64),
) -> io::Result<BackupInfo> {
    let tmp = path.with_extension("part");
    let mut writer = SnapshotWriter::create(&tmp)?;
    let mut records = 0u64;
    engine
        .scan_consistent(&Table::STATE_MACHINE, &mut |table, key, value| {
            records += 1;
            if records.is_multiple_of(100_000) {
                progress(records);
            }
            writer
                .record(table, key, value)
                .map_err(crate::engine::EngineError::Io)
        })
        .map_err(|e| io::Error::other(e.to_string()))?;
    writer.finish(&tmp)?;
    progress(records);

    // Hash the snapshot file, pad it, append the digest.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&tmp)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    let padding = (ALIGN - len % ALIGN) % ALIGN;
    let zeros = vec![0u8; padding as usize];
    hasher.update(&zeros);
    file.seek(SeekFrom::End(0))?;
    file.write_all(&zeros)?;
    file.write_all(&hasher.finalize())?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    Ok(BackupInfo {
        size: len + padding + CHECKSUM_LEN,
        records,
    })
}

/// Checks a backup file's size rule and SHA-256. `progress` gets (bytes checked, total).
pub fn verify_backup(path: &Path, mut progress: impl FnMut(u64, u64)) -> io::Result<()> {
    let total = std::fs::metadata(path)?.len();
    if total < CHECKSUM_LEN || !(total - CHECKSUM_LEN).is_multiple_of(ALIGN) {
        return Err(invalid(format!(
            "{}: not a backup file (size {total} is not 512*n + 32)",
            path.display()
        )));
    }
    let body = total - CHECKSUM_LEN;
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

/// What [`restore_backup`] loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreInfo {
    pub records: u64,
    /// The store's revision after the restore.
    pub revision: i64,
    pub keys: usize,
}

/// Verifies `path` and loads it into `engine`, which must be empty. `progress` gets the number
/// of records loaded so far.
pub fn restore_backup(
    path: &Path,
    engine: &Arc<dyn Engine>,
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
    verify_backup(path, |_, _| {})?;
    let mut reader = SnapshotReader::open(path)?;
    let mut batch = WriteBatch::new();
    let mut records = 0u64;
    while let Some((table, key, value)) = reader.next_record()? {
        records += 1;
        if table == Table::Meta && SKIPPED_META.contains(&key.as_slice()) {
            continue;
        }
        batch.put(table, key, value);
        if batch.len() >= RESTORE_BATCH {
            engine
                .write(std::mem::take(&mut batch), false)
                .map_err(|e| io::Error::other(e.to_string()))?;
            progress(records);
        }
    }
    engine
        .write(batch, true)
        .map_err(|e| io::Error::other(e.to_string()))?;
    progress(records);
    let mvcc = MvccStore::open(engine.clone()).map_err(|e| io::Error::other(e.to_string()))?;
    Ok(RestoreInfo {
        records,
        revision: mvcc.current_revision(),
        keys: mvcc.stats().keys,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::memory::MemoryEngine;
    use keel_proto::etcdserverpb::{PutRequest, RangeRequest};
    use keel_proto::keelpb::{RaftRequest, raft_request::Request};

    fn put(store: &MvccStore, key: &str, value: &str) {
        let mut batch = store.begin_apply();
        let outcome = batch.apply(&RaftRequest {
            request: Some(Request::Put(PutRequest {
                key: key.into(),
                value: value.into(),
                ..Default::default()
            })),
        });
        assert!(outcome.response.error.is_none());
        batch.commit(true).expect("commit");
    }

    #[test]
    fn backup_round_trip_keeps_data_and_history() {
        let dir = tempfile::tempdir().expect("tempdir");
        let source: Arc<dyn Engine> = Arc::new(MemoryEngine::new());
        let store = MvccStore::open(source.clone()).expect("open");
        put(&store, "a", "1");
        put(&store, "a", "2");
        put(&store, "b", "3");
        let path = dir.path().join("backup.db");
        let info = write_backup(&source, &path, |_| {}).expect("backup");
        assert_eq!(info.size, std::fs::metadata(&path).expect("meta").len());
        assert_eq!((info.size - CHECKSUM_LEN) % ALIGN, 0);

        let target: Arc<dyn Engine> = Arc::new(MemoryEngine::new());
        let restored = restore_backup(&path, &target, |_| {}).expect("restore");
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
        assert!(restore_backup(&path, &target, |_| {}).is_err());
    }

    #[test]
    fn corrupt_or_truncated_backups_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let source: Arc<dyn Engine> = Arc::new(MemoryEngine::new());
        let store = MvccStore::open(source.clone()).expect("open");
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
        let target: Arc<dyn Engine> = Arc::new(MemoryEngine::new());
        assert!(restore_backup(&path, &target, |_| {}).is_err());
    }
}
