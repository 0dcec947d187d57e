//! Snapshots of the replicated state machine.
//!
//! A Raft snapshot here is a *pinned view*: a consistent point-in-time view of the
//! state-machine tables (`kv`, `meta`, `lease`), taken in microseconds (a RocksDB snapshot)
//! and written out as a file only if the snapshot is actually sent to a member that fell
//! behind the purged log (or installed from another state machine in tests). Taking a
//! snapshot so that the log can be purged therefore costs nothing in proportion to the
//! database: the state machine is already durable in the engine, which is all that purging
//! needs (etcd works the same way: its backend is the state, and a snapshot file is made only
//! for a follower that needs one). A view nobody reads is released when its
//! [`SnapshotFile`] is dropped.
//!
//! File format (all integers big-endian):
//! ```text
//! "KEELSNAP" u32:version(=1)
//! repeated { u8:table  u32:key_len key  u32:value_len value }
//! u8:0xFF  u64:record_count  u32:crc32(of everything before this trailer)
//! ```
//! Files are written under a temporary name, fsynced and renamed, so a crash never leaves a
//! half snapshot under a final name. Writing one reads the view record by record, so it never
//! holds the database in memory and never stops the state machine from applying.

use std::cell::RefCell;
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::engine::{Engine, EngineError, Table};

const MAGIC: &[u8; 8] = b"KEELSNAP";
const VERSION: u32 = 1;
const END: u8 = 0xFF;

/// Checks every record of a pinned view as it is written (e.g. that the view's applied index
/// is the one its snapshot meta announces).
pub type RecordCheck = Box<dyn FnMut(Table, &[u8], &[u8]) -> io::Result<()> + Send>;

/// The data of a snapshot: a file on local disk, or a pinned engine view that becomes one
/// when [`SnapshotFile::into_file`] is called.
#[derive(Debug)]
pub struct SnapshotFile {
    source: Source,
}

#[derive(Debug)]
enum Source {
    File(WrittenSnapshot),
    Pinned(PinnedView),
}

/// A snapshot file on disk, removed on drop if it was written here from a view (for a send),
/// unless [`WrittenSnapshot::keep`] takes it.
#[derive(Debug)]
pub struct WrittenSnapshot {
    path: PathBuf,
    remove_on_drop: bool,
}

impl WrittenSnapshot {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's path; the file stays on disk after this value is gone.
    pub fn keep(mut self) -> PathBuf {
        self.remove_on_drop = false;
        std::mem::take(&mut self.path)
    }
}

impl Drop for WrittenSnapshot {
    fn drop(&mut self) {
        if self.remove_on_drop {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// The handle of a view held by a blocking thread that waits for the order to write it.
#[derive(Debug)]
struct PinnedView {
    /// Sending the target path starts the write; dropping the sender releases the view unread.
    start: std::sync::mpsc::Sender<PathBuf>,
    done: tokio::sync::oneshot::Receiver<io::Result<u64>>,
    path: PathBuf,
}

impl SnapshotFile {
    /// A finished snapshot file (e.g. received from the leader); never removed by this value.
    pub fn from_path(path: PathBuf) -> Self {
        Self {
            source: Source::File(WrittenSnapshot {
                path,
                remove_on_drop: false,
            }),
        }
    }

    /// Pins a consistent view of the state-machine tables of `engine` now; it is written to
    /// `path` only by [`SnapshotFile::into_file`]. `check` sees every record as it is written
    /// and can refuse the view.
    pub async fn pin(
        engine: Arc<dyn Engine>,
        path: PathBuf,
        mut check: RecordCheck,
    ) -> io::Result<Self> {
        let (taken_tx, taken_rx) = tokio::sync::oneshot::channel::<()>();
        let (start_tx, start_rx) = std::sync::mpsc::channel::<PathBuf>();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<io::Result<u64>>();
        tokio::task::spawn_blocking(move || {
            let mut taken_tx = Some(taken_tx);
            // Both callbacks reach the writer: the first creates it, the second fills it.
            let writer: RefCell<Option<(SnapshotWriter, PathBuf)>> = RefCell::new(None);
            let mut create_error: Option<io::Error> = None;
            let scanned = engine.scan_consistent_when(
                &Table::STATE_MACHINE,
                &mut || {
                    if let Some(tx) = taken_tx.take() {
                        let _ = tx.send(());
                    }
                    let Ok(path) = start_rx.recv() else {
                        return false; // dropped unread
                    };
                    match SnapshotWriter::create(&path.with_extension("tmp")) {
                        Ok(w) => {
                            *writer.borrow_mut() = Some((w, path));
                            true
                        }
                        Err(e) => {
                            create_error = Some(e);
                            false
                        }
                    }
                },
                &mut |table, key, value| {
                    check(table, key, value).map_err(EngineError::Io)?;
                    match writer.borrow_mut().as_mut() {
                        Some((w, _)) => w.record(table, key, value).map_err(EngineError::Io),
                        None => Ok(()),
                    }
                },
            );
            let result = match (scanned, create_error, writer.into_inner()) {
                (Err(e), _, writer) => {
                    if let Some((_, path)) = writer {
                        let _ = fs::remove_file(path.with_extension("tmp"));
                    }
                    Err(io::Error::other(e.to_string()))
                }
                (Ok(()), Some(e), _) => Err(e),
                (Ok(()), None, Some((w, path))) => {
                    let written = w.finish(&path);
                    if written.is_err() {
                        let _ = fs::remove_file(path.with_extension("tmp"));
                    } else if done_tx.is_closed() {
                        // Nobody waits for the file any more (the send was cancelled).
                        let _ = fs::remove_file(&path);
                    }
                    written
                }
                (Ok(()), None, None) => Ok(0),
            };
            let _ = done_tx.send(result);
        });
        if taken_rx.await.is_err() {
            // The thread ended before taking the view: report why.
            return Err(match done_rx.await {
                Ok(Err(e)) => e,
                _ => io::Error::other("snapshot view could not be taken"),
            });
        }
        Ok(Self {
            source: Source::Pinned(PinnedView {
                start: start_tx,
                done: done_rx,
                path,
            }),
        })
    }

    /// The snapshot as a finished file: a file as it is, a pinned view written out now (to the
    /// path given when it was pinned).
    pub async fn into_file(self) -> io::Result<WrittenSnapshot> {
        match self.source {
            Source::File(written) => Ok(written),
            Source::Pinned(view) => {
                let PinnedView { start, done, path } = view;
                start
                    .send(path.clone())
                    .map_err(|_| io::Error::other("snapshot view was released"))?;
                drop(start);
                done.await
                    .map_err(|_| io::Error::other("snapshot writer ended without an answer"))??;
                Ok(WrittenSnapshot {
                    path,
                    remove_on_drop: true,
                })
            }
        }
    }

    /// The file's path (`None` for a view not yet written).
    pub fn path(&self) -> Option<&Path> {
        match &self.source {
            Source::File(written) => Some(written.path()),
            Source::Pinned(_) => None,
        }
    }
}

fn table_code(t: Table) -> u8 {
    match t {
        Table::Kv => 1,
        Table::Meta => 2,
        Table::Lease => 3,
        Table::RaftLog => 4,
        Table::RaftMeta => 5,
    }
}

fn table_from_code(c: u8) -> io::Result<Table> {
    Ok(match c {
        1 => Table::Kv,
        2 => Table::Meta,
        3 => Table::Lease,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("snapshot: bad table code {c}"),
            ));
        }
    })
}

/// Writes a snapshot file record by record.
pub struct SnapshotWriter {
    out: BufWriter<File>,
    crc: crc32fast::Hasher,
    records: u64,
    tmp_path: PathBuf,
}

impl SnapshotWriter {
    pub fn create(tmp_path: &Path) -> io::Result<Self> {
        let file = File::create(tmp_path)?;
        let mut w = Self {
            out: BufWriter::with_capacity(1 << 20, file),
            crc: crc32fast::Hasher::new(),
            records: 0,
            tmp_path: tmp_path.to_path_buf(),
        };
        w.write_raw(MAGIC)?;
        w.write_raw(&VERSION.to_be_bytes())?;
        Ok(w)
    }

    fn write_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.crc.update(bytes);
        self.out.write_all(bytes)
    }

    pub fn record(&mut self, table: Table, key: &[u8], value: &[u8]) -> io::Result<()> {
        let too_big = |_| io::Error::new(io::ErrorKind::InvalidInput, "snapshot record over 4 GiB");
        self.write_raw(&[table_code(table)])?;
        self.write_raw(&u32::try_from(key.len()).map_err(too_big)?.to_be_bytes())?;
        self.write_raw(key)?;
        self.write_raw(&u32::try_from(value.len()).map_err(too_big)?.to_be_bytes())?;
        self.write_raw(value)?;
        self.records += 1;
        Ok(())
    }

    /// Writes the trailer, fsyncs and renames the file to `final_path`.
    pub fn finish(mut self, final_path: &Path) -> io::Result<u64> {
        self.out.write_all(&[END])?;
        self.out.write_all(&self.records.to_be_bytes())?;
        let crc = self.crc.clone().finalize();
        self.out.write_all(&crc.to_be_bytes())?;
        let file = self.out.into_inner().map_err(|e| e.into_error())?;
        let syncing = std::time::Instant::now();
        file.sync_all()?;
        crate::observe::snapshot_fsync(syncing.elapsed());
        fs::rename(&self.tmp_path, final_path)?;
        sync_dir(final_path)?;
        Ok(self.records)
    }
}

/// fsyncs the directory holding `path`, so a rename into it is durable.
pub fn sync_dir(path: &Path) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// One snapshot record: table, key, value.
pub type Record = (Table, Vec<u8>, Vec<u8>);

/// Reads a snapshot file, verifying its trailer.
pub struct SnapshotReader {
    input: BufReader<File>,
    crc: crc32fast::Hasher,
    records: u64,
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("snapshot: {msg}"))
}

impl SnapshotReader {
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        let mut r = Self {
            input: BufReader::with_capacity(1 << 20, file),
            crc: crc32fast::Hasher::new(),
            records: 0,
        };
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic)?;
        if &magic != MAGIC {
            return Err(invalid("not a Keel snapshot file"));
        }
        let mut version = [0u8; 4];
        r.read_exact(&mut version)?;
        if u32::from_be_bytes(version) != VERSION {
            return Err(invalid("unsupported snapshot version"));
        }
        Ok(r)
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.input.read_exact(buf)?;
        self.crc.update(buf);
        Ok(())
    }

    fn read_len(&mut self) -> io::Result<usize> {
        let mut b = [0u8; 4];
        self.read_exact(&mut b)?;
        Ok(u32::from_be_bytes(b) as usize)
    }

    /// The next record, or `None` at a verified end of file.
    pub fn next_record(&mut self) -> io::Result<Option<Record>> {
        let mut code = [0u8; 1];
        self.input.read_exact(&mut code)?;
        if code[0] == END {
            let expected_crc = self.crc.clone().finalize();
            let mut count = [0u8; 8];
            self.input.read_exact(&mut count)?;
            let mut crc = [0u8; 4];
            self.input.read_exact(&mut crc)?;
            if u64::from_be_bytes(count) != self.records {
                return Err(invalid("record count mismatch"));
            }
            if u32::from_be_bytes(crc) != expected_crc {
                return Err(invalid("checksum mismatch"));
            }
            return Ok(None);
        }
        self.crc.update(&code);
        let table = table_from_code(code[0])?;
        let klen = self.read_len()?;
        let mut key = vec![0u8; klen];
        self.read_exact(&mut key)?;
        let vlen = self.read_len()?;
        let mut value = vec![0u8; vlen];
        self.read_exact(&mut value)?;
        self.records += 1;
        Ok(Some((table, key, value)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption_detected() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join("s.tmp");
        let fin = dir.path().join("s.snap");
        let mut w = SnapshotWriter::create(&tmp).unwrap();
        w.record(Table::Kv, b"k1", b"v1").unwrap();
        w.record(Table::Meta, b"", b"").unwrap();
        w.record(Table::Lease, &[0xFF; 3], &vec![7u8; 100_000])
            .unwrap();
        assert_eq!(w.finish(&fin).unwrap(), 3);
        assert!(!tmp.exists());

        let mut r = SnapshotReader::open(&fin).unwrap();
        assert_eq!(
            r.next_record().unwrap(),
            Some((Table::Kv, b"k1".to_vec(), b"v1".to_vec()))
        );
        assert_eq!(
            r.next_record().unwrap(),
            Some((Table::Meta, vec![], vec![]))
        );
        let (t, k, v) = r.next_record().unwrap().unwrap();
        assert_eq!((t, k.len(), v.len()), (Table::Lease, 3, 100_000));
        assert_eq!(r.next_record().unwrap(), None);

        // Flip one byte in the middle: the checksum must catch it.
        let mut bytes = fs::read(&fin).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x01;
        fs::write(&fin, &bytes).unwrap();
        let mut r = SnapshotReader::open(&fin).unwrap();
        let mut result = Ok(None);
        for _ in 0..4 {
            result = r.next_record();
            if !matches!(result, Ok(Some(_))) {
                break;
            }
        }
        assert!(result.is_err(), "corruption not detected: {result:?}");
    }
}
