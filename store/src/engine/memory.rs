//! An in-memory [`Engine`] for unit tests: one ordered map per table.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::Path;
use std::sync::RwLock;

use super::{Direction, Engine, EngineError, ScanControl, Table, WriteBatch, WriteOp};

type Tables = BTreeMap<Table, BTreeMap<Vec<u8>, Vec<u8>>>;

#[derive(Default)]
pub struct MemoryEngine {
    tables: RwLock<Tables>,
}

impl MemoryEngine {
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> Result<std::sync::RwLockReadGuard<'_, Tables>, EngineError> {
        self.tables
            .read()
            .map_err(|_| EngineError::Backend("memory engine lock poisoned".into()))
    }
}

impl Engine for MemoryEngine {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
        Ok(self.read()?.get(&table).and_then(|t| t.get(key).cloned()))
    }

    fn scan(
        &self,
        table: Table,
        start: &[u8],
        end: Option<&[u8]>,
        direction: Direction,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> ScanControl,
    ) -> Result<(), EngineError> {
        let tables = self.read()?;
        let Some(t) = tables.get(&table) else {
            return Ok(());
        };
        if end.is_some_and(|e| e <= start) {
            return Ok(());
        }
        let upper = match end {
            Some(e) => Bound::Excluded(e.to_vec()),
            None => Bound::Unbounded,
        };
        let range = t.range::<Vec<u8>, _>((Bound::Included(start.to_vec()), upper));
        let mut run = |k: &Vec<u8>, v: &Vec<u8>| visit(k, v) == ScanControl::Stop;
        match direction {
            Direction::Forward => {
                for (k, v) in range {
                    if run(k, v) {
                        break;
                    }
                }
            }
            Direction::Reverse => {
                for (k, v) in range.rev() {
                    if run(k, v) {
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    fn write(&self, batch: WriteBatch, _sync: bool) -> Result<(), EngineError> {
        let mut tables = self
            .tables
            .write()
            .map_err(|_| EngineError::Backend("memory engine lock poisoned".into()))?;
        for op in batch.ops {
            match op {
                WriteOp::Put { table, key, value } => {
                    tables.entry(table).or_default().insert(key, value);
                }
                WriteOp::Delete { table, key } => {
                    tables.entry(table).or_default().remove(&key);
                }
                WriteOp::DeleteRange { table, start, end } => {
                    let t = tables.entry(table).or_default();
                    let doomed: Vec<Vec<u8>> =
                        t.range(start..end).map(|(k, _)| k.clone()).collect();
                    for k in doomed {
                        t.remove(&k);
                    }
                }
            }
        }
        Ok(())
    }

    fn sync_wal(&self) -> Result<(), EngineError> {
        Ok(())
    }

    fn with_consistent_view(
        &self,
        f: &mut dyn FnMut(&mut super::ViewScanner<'_>) -> Result<(), EngineError>,
    ) -> Result<(), EngineError> {
        let snapshot = self.read()?.clone();
        f(&mut |tables, visit| {
            for table in tables {
                if let Some(t) = snapshot.get(table) {
                    for (k, v) in t {
                        visit(*table, k, v)?;
                    }
                }
            }
            Ok(())
        })
    }

    fn size_bytes(&self) -> u64 {
        self.read()
            .map(|t| {
                t.values()
                    .flat_map(|m| m.iter())
                    .map(|(k, v)| (k.len() + v.len()) as u64)
                    .sum()
            })
            .unwrap_or(0)
    }

    fn table_size(&self, table: Table) -> (u64, u64) {
        let bytes = self
            .read()
            .map(|t| {
                t.get(&table)
                    .map(|m| m.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum())
                    .unwrap_or(0)
            })
            .unwrap_or(0);
        (bytes, bytes)
    }

    fn compact_table(&self, _table: Table) -> Result<(), EngineError> {
        Ok(())
    }

    fn path(&self) -> Option<&Path> {
        None
    }
}
