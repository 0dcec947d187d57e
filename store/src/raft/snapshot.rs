//! Snapshot files of the replicated state machine.
//!
//! A snapshot is every entry of the state-machine tables (`kv`, `meta`, `lease`) read from one
//! consistent engine view, written as a stream of records to a file, so building one never holds
//! the whole database in memory and never stops the state machine from applying.
//!
//! File format (all integers big-endian):
//! ```text
//! "KEELSNAP" u32:version(=1)
//! repeated { u8:table  u32:key_len key  u32:value_len value }
//! u8:0xFF  u64:record_count  u32:crc32(of everything before this trailer)
//! ```
//! A sidecar file `<name>.meta` holds the bincode-encoded openraft `SnapshotMeta`. Files are
//! written under a temporary name, fsynced and renamed, so a crash never leaves a half snapshot
//! under a final name.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::engine::Table;

const MAGIC: &[u8; 8] = b"KEELSNAP";
const VERSION: u32 = 1;
const END: u8 = 0xFF;

/// The data of a snapshot: a file on local disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotFile {
    pub path: PathBuf,
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
        file.sync_all()?;
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
