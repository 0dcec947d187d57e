//! The RocksDB [`Engine`]: one database, one column family per [`Table`].

use std::path::{Path, PathBuf};

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DB, DBCompressionType, Options, ReadOptions,
    WriteOptions,
};

use super::{Direction, Engine, EngineError, ScanControl, Table, WriteBatch, WriteOp};

fn backend(e: rocksdb::Error) -> EngineError {
    EngineError::Backend(e.into_string())
}

pub struct RocksEngine {
    db: DB,
    path: PathBuf,
}

impl RocksEngine {
    pub fn open(path: &Path) -> Result<Self, EngineError> {
        std::fs::create_dir_all(path)?;
        let cache = Cache::new_lru_cache(256 << 20);
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_max_background_jobs(2);
        db_opts.set_compression_type(DBCompressionType::Lz4);
        db_opts.set_keep_log_file_num(4);
        // The write-ahead log is fsynced for every Raft append, so its fsync is on the latency
        // of every write. An fsync that grows the file also commits the file's new size to the
        // filesystem journal; one into a recycled file (overwritten in place, size unchanged)
        // does not, and measured 10-30% cheaper here (docs/benchmarks.md, change 9).
        // Recycling needs retired log files, so the total log is capped: past 64 MiB the
        // column families holding the oldest log are flushed and that file is retired (this
        // also bounds the replay on restart).
        db_opts.set_recycle_log_file_num(4);
        db_opts.set_max_total_wal_size(64 << 20);
        let cfs = Table::ALL.iter().map(|t| {
            let mut o = Options::default();
            o.set_compression_type(DBCompressionType::Lz4);
            let mut bb = BlockBasedOptions::default();
            bb.set_block_cache(&cache);
            if matches!(t, Table::Kv | Table::Lease | Table::Meta) {
                bb.set_bloom_filter(10.0, false);
            }
            if *t == Table::Kv {
                // Values are read by exact revision key: a hash index in each data block, and
                // a whole-key bloom filter in each memtable so a lookup skips the memtables that
                // do not hold the revision (most of them, for older revisions).
                bb.set_data_block_index_type(rocksdb::DataBlockIndexType::BinaryAndHash);
                bb.set_data_block_hash_ratio(0.75);
                o.set_memtable_whole_key_filtering(true);
                o.set_memtable_prefix_bloom_ratio(0.05);
            }
            o.set_block_based_table_factory(&bb);
            if *t == Table::RaftLog {
                o.set_write_buffer_size(64 << 20);
            }
            ColumnFamilyDescriptor::new(t.name(), o)
        });
        let db = DB::open_cf_descriptors(&db_opts, path, cfs).map_err(backend)?;
        Ok(Self {
            db,
            path: path.to_path_buf(),
        })
    }

    fn cf(&self, table: Table) -> Result<&rocksdb::ColumnFamily, EngineError> {
        self.db
            .cf_handle(table.name())
            .ok_or_else(|| EngineError::Backend(format!("missing column family {}", table.name())))
    }
}

impl Engine for RocksEngine {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
        self.db.get_cf(self.cf(table)?, key).map_err(backend)
    }

    fn multi_get(
        &self,
        table: Table,
        keys: &[&[u8]],
        visit: &mut super::MultiGetVisitor<'_>,
    ) -> Result<(), EngineError> {
        let cf = self.cf(table)?;
        let values = self
            .db
            .batched_multi_get_cf(cf, keys.iter().copied(), false);
        for (i, value) in values.into_iter().enumerate() {
            let value = value.map_err(backend)?;
            visit(i, value.as_deref())?;
        }
        Ok(())
    }

    fn scan(
        &self,
        table: Table,
        start: &[u8],
        end: Option<&[u8]>,
        direction: Direction,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> ScanControl,
    ) -> Result<(), EngineError> {
        if end.is_some_and(|e| e <= start) {
            return Ok(());
        }
        let cf = self.cf(table)?;
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(start.to_vec());
        if let Some(e) = end {
            ro.set_iterate_upper_bound(e.to_vec());
        }
        // The raw iterator hands out slices of RocksDB's own buffers; the iterator adapter
        // would copy every key and value into a new allocation first (most of a restart's key
        // index rebuild, which scans every stored revision).
        let mut it = self.db.raw_iterator_cf_opt(cf, ro);
        match direction {
            Direction::Forward => it.seek(start),
            Direction::Reverse => it.seek_to_last(),
        }
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if visit(k, v) == ScanControl::Stop {
                return Ok(());
            }
            match direction {
                Direction::Forward => it.next(),
                Direction::Reverse => it.prev(),
            }
        }
        it.status().map_err(backend)
    }

    fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), EngineError> {
        let mut wb = rocksdb::WriteBatch::default();
        for op in &batch.ops {
            match op {
                WriteOp::Put { table, key, value } => wb.put_cf(self.cf(*table)?, key, value),
                WriteOp::Delete { table, key } => wb.delete_cf(self.cf(*table)?, key),
                WriteOp::DeleteRange { table, start, end } => {
                    wb.delete_range_cf(self.cf(*table)?, start, end)
                }
            }
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db.write_opt(wb, &wo).map_err(backend)
    }

    fn sync_wal(&self) -> Result<(), EngineError> {
        self.db.flush_wal(true).map_err(backend)
    }

    fn with_consistent_view(
        &self,
        f: &mut dyn FnMut(&mut super::ViewScanner<'_>) -> Result<(), EngineError>,
    ) -> Result<(), EngineError> {
        let snapshot = self.db.snapshot();
        f(&mut |tables, visit| {
            for table in tables {
                let cf = self.cf(*table)?;
                let mut ro = ReadOptions::default();
                ro.set_snapshot(&snapshot);
                let mut it = self.db.raw_iterator_cf_opt(cf, ro);
                it.seek_to_first();
                while let (Some(k), Some(v)) = (it.key(), it.value()) {
                    visit(*table, k, v)?;
                    it.next();
                }
                it.status().map_err(backend)?;
            }
            Ok(())
        })
    }

    fn size_bytes(&self) -> u64 {
        let mut total = 0;
        for t in Table::ALL {
            if let Ok(cf) = self.cf(t) {
                for prop in [
                    "rocksdb.total-sst-files-size",
                    "rocksdb.cur-size-all-mem-tables",
                ] {
                    total += self
                        .db
                        .property_int_value_cf(cf, prop)
                        .ok()
                        .flatten()
                        .unwrap_or(0);
                }
            }
        }
        total
    }

    fn table_size(&self, table: Table) -> (u64, u64) {
        let Ok(cf) = self.cf(table) else {
            return (0, 0);
        };
        let prop = |name: &str| {
            self.db
                .property_int_value_cf(cf, name)
                .ok()
                .flatten()
                .unwrap_or(0)
        };
        let mem = prop("rocksdb.cur-size-all-mem-tables");
        let sst = prop("rocksdb.total-sst-files-size");
        let live = prop("rocksdb.estimate-live-data-size").min(sst);
        (sst + mem, live + mem)
    }

    fn compact_table(&self, table: Table) -> Result<(), EngineError> {
        self.db
            .compact_range_cf(self.cf(table)?, None::<&[u8]>, None::<&[u8]>);
        Ok(())
    }

    fn path(&self) -> Option<&Path> {
        Some(&self.path)
    }
}
