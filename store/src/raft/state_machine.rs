//! The replicated state machine: committed Raft entries applied to the MVCC store.
//!
//! Each chunk of entries that openraft hands over is applied in one [`ApplyBatch`] and written
//! with one engine write that also records the last applied log id and the membership, so the
//! applied state and the data can never disagree after a crash. Responses are sent only after
//! that write, and listeners (the watch hub) see the chunk's events in revision order.
//!
//! Applying never reads a clock, randomness or hash-map order: it depends only on the entries.
//!
//! [`ApplyBatch`]: crate::mvcc::ApplyBatch

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::{Stream, StreamExt};
use keel_proto::keelpb::RaftResponse;
use keel_proto::mvccpb::Event;
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend};
use tokio::sync::watch;

use super::snapshot::{SnapshotFile, SnapshotReader, SnapshotWriter, sync_dir};
use super::types::{
    CommandResult, LogId, Snapshot, SnapshotMeta, StoredMembership, TypeConfig, decode, encode,
};
use crate::engine::{Engine, Table, WriteBatch};
use crate::mvcc::MvccStore;

/// Meta-table keys owned by the state machine (written in the same batch as the data).
pub const META_LAST_APPLIED: &[u8] = b"raft/last_applied";
pub const META_MEMBERSHIP: &[u8] = b"raft/membership";
/// Raft-meta key present while a snapshot is being installed (value: the snapshot path).
const RAFT_META_INSTALLING: &[u8] = b"installing_snapshot";

/// Entries applied per engine write at most.
const MAX_CHUNK: usize = 1024;
/// Chunks of at most this many entries are applied without a thread hand-off.
const INLINE_APPLY_MAX: usize = 8;
/// Records loaded per engine write while installing a snapshot.
const INSTALL_BATCH: usize = 8192;

/// What has been applied so far; published after every applied chunk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppliedState {
    /// Index of the last applied log entry (0 before any).
    pub index: u64,
    /// Store revision after it.
    pub revision: i64,
}

/// One applied chunk, as listeners see it.
#[derive(Debug, Clone)]
pub struct AppliedChunk {
    pub applied: AppliedState,
    /// Every event of the chunk in revision order (events of one revision are contiguous).
    pub events: Vec<Event>,
}

/// Called after each applied chunk is durable in the engine, before responses are sent.
pub type ApplyListener = Arc<dyn Fn(&AppliedChunk) + Send + Sync>;

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// The openraft state machine over a [`MvccStore`].
pub struct StateMachine {
    mvcc: Arc<MvccStore>,
    snapshot_dir: PathBuf,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    applied_tx: watch::Sender<AppliedState>,
    listener: Option<ApplyListener>,
    snapshot_seq: u64,
}

impl StateMachine {
    /// Opens the state machine; finishes a snapshot installation a crash interrupted.
    pub fn open(
        mvcc: Arc<MvccStore>,
        snapshot_dir: &Path,
        listener: Option<ApplyListener>,
    ) -> io::Result<Self> {
        std::fs::create_dir_all(snapshot_dir)?;
        let engine = mvcc.engine().clone();
        if let Some(path) = engine
            .get(Table::RaftMeta, RAFT_META_INSTALLING)
            .map_err(io_err)?
        {
            let path = PathBuf::from(String::from_utf8_lossy(&path).into_owned());
            tracing::warn!(path = %path.display(), "resuming an interrupted snapshot installation");
            load_snapshot_into(&engine, &path)?;
            mvcc.reload().map_err(io_err)?;
        }
        let (last_applied, membership) = read_applied(&mvcc)?;
        let applied = AppliedState {
            index: last_applied.as_ref().map(|l| l.index).unwrap_or(0),
            revision: mvcc.current_revision(),
        };
        let (applied_tx, _) = watch::channel(applied);
        Ok(Self {
            mvcc,
            snapshot_dir: snapshot_dir.to_path_buf(),
            last_applied,
            membership,
            applied_tx,
            listener,
            snapshot_seq: 0,
        })
    }

    pub fn mvcc(&self) -> &Arc<MvccStore> {
        &self.mvcc
    }

    /// A receiver that sees the applied state after every chunk.
    pub fn applied_watch(&self) -> watch::Receiver<AppliedState> {
        self.applied_tx.subscribe()
    }

    fn latest_snapshot_files(&self) -> io::Result<Option<(PathBuf, PathBuf)>> {
        let mut best: Option<String> = None;
        for entry in std::fs::read_dir(&self.snapshot_dir)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if let Some(stem) = name.strip_suffix(".snap")
                && self.snapshot_dir.join(format!("{stem}.meta")).exists()
                && best.as_deref().is_none_or(|b| stem > b)
            {
                best = Some(stem.to_string());
            }
        }
        Ok(best.map(|stem| {
            (
                self.snapshot_dir.join(format!("{stem}.snap")),
                self.snapshot_dir.join(format!("{stem}.meta")),
            )
        }))
    }
}

fn read_applied(mvcc: &MvccStore) -> io::Result<(Option<LogId>, StoredMembership)> {
    let last_applied = match mvcc.get_meta(META_LAST_APPLIED).map_err(io_err)? {
        Some(b) => decode::<Option<LogId>>(&b)?,
        None => None,
    };
    let membership = match mvcc.get_meta(META_MEMBERSHIP).map_err(io_err)? {
        Some(b) => decode::<StoredMembership>(&b)?,
        None => StoredMembership::default(),
    };
    Ok((last_applied, membership))
}

/// Deletes every state-machine table and loads the snapshot at `path` in batches; the final
/// batch clears the "installing" marker and is synced. Idempotent, so it can be redone after a
/// crash.
fn load_snapshot_into(engine: &Arc<dyn Engine>, path: &Path) -> io::Result<()> {
    let mut reader = SnapshotReader::open(path)?;
    let mut batch = WriteBatch::new();
    for table in Table::STATE_MACHINE {
        batch.delete_range(table, Vec::new(), vec![0xFF; 64]);
    }
    while let Some((table, key, value)) = reader.next_record()? {
        batch.put(table, key, value);
        if batch.len() >= INSTALL_BATCH {
            engine
                .write(std::mem::take(&mut batch), false)
                .map_err(io_err)?;
        }
    }
    batch.delete(Table::RaftMeta, RAFT_META_INSTALLING);
    engine.write(batch, true).map_err(io_err)
}

/// Builds snapshot files from a consistent view of the engine.
pub struct SnapshotBuilder {
    engine: Arc<dyn Engine>,
    snapshot_dir: PathBuf,
    seq: u64,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotFile;

    async fn build_snapshot(&mut self) -> io::Result<Snapshot> {
        let engine = self.engine.clone();
        let dir = self.snapshot_dir.clone();
        let seq = self.seq;
        tokio::task::spawn_blocking(move || build_snapshot_blocking(&engine, &dir, seq))
            .await
            .map_err(io_err)?
    }
}

fn build_snapshot_blocking(engine: &Arc<dyn Engine>, dir: &Path, seq: u64) -> io::Result<Snapshot> {
    let tmp = dir.join(format!("building-{seq}.tmp"));
    let mut writer = SnapshotWriter::create(&tmp)?;
    let mut last_applied: Option<LogId> = None;
    let mut membership = StoredMembership::default();
    let mut failure: Option<io::Error> = None;
    engine
        .scan_consistent(&Table::STATE_MACHINE, &mut |table, key, value| {
            if table == Table::Meta {
                if key == META_LAST_APPLIED {
                    match decode::<Option<LogId>>(value) {
                        Ok(v) => last_applied = v,
                        Err(e) => failure = Some(e),
                    }
                } else if key == META_MEMBERSHIP {
                    match decode(value) {
                        Ok(v) => membership = v,
                        Err(e) => failure = Some(e),
                    }
                }
            }
            writer
                .record(table, key, value)
                .map_err(crate::engine::EngineError::Io)
        })
        .map_err(io_err)?;
    if let Some(e) = failure {
        return Err(e);
    }
    let (index, term) = last_applied
        .as_ref()
        .map(|l| (l.index, l.leader_id.term))
        .unwrap_or((0, 0));
    let stem = format!("{index:020}-{term:020}-{seq:06}");
    let snap_path = dir.join(format!("{stem}.snap"));
    writer.finish(&snap_path)?;
    let meta = SnapshotMeta {
        last_log_id: last_applied,
        last_membership: membership,
    };
    write_meta_file(&dir.join(format!("{stem}.meta")), &meta)?;
    remove_older_snapshots(dir, &stem)?;
    tracing::info!(snapshot = %stem, "built snapshot");
    Ok(Snapshot {
        meta,
        snapshot: SnapshotFile { path: snap_path },
    })
}

fn write_meta_file(path: &Path, meta: &SnapshotMeta) -> io::Result<()> {
    let tmp = path.with_extension("meta.tmp");
    std::fs::write(&tmp, encode(meta)?)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    sync_dir(path)
}

fn remove_older_snapshots(dir: &Path, keep_stem: &str) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let stem = name.split('.').next().unwrap_or("");
        if (name.ends_with(".snap") || name.ends_with(".meta")) && stem < keep_stem {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(())
}

struct ChunkResult {
    responses: Vec<(
        Option<openraft::storage::ApplyResponder<TypeConfig>>,
        RaftResponse,
    )>,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    events: Vec<Event>,
}

fn apply_chunk(
    mvcc: &MvccStore,
    chunk: Vec<EntryResponder<TypeConfig>>,
    mut last_applied: Option<LogId>,
    mut membership: StoredMembership,
) -> io::Result<ChunkResult> {
    let mut batch = mvcc.begin_apply();
    let mut responses = Vec::with_capacity(chunk.len());
    let mut events = Vec::new();
    for (entry, responder) in chunk {
        let log_id = entry.log_id;
        let response = match entry.payload {
            EntryPayload::Blank => RaftResponse {
                revision: mvcc.current_revision(),
                ..Default::default()
            },
            EntryPayload::Normal(cmd) => {
                let outcome = batch.apply(&cmd.0);
                events.extend(outcome.events);
                outcome.response
            }
            EntryPayload::Membership(m) => {
                membership = StoredMembership::new(Some(log_id), m);
                RaftResponse::default()
            }
        };
        last_applied = Some(log_id);
        responses.push((responder, response));
    }
    batch.put_meta(META_LAST_APPLIED, encode(&last_applied)?);
    batch.put_meta(META_MEMBERSHIP, encode(&membership)?);
    batch.commit(false).map_err(io_err)?;
    Ok(ChunkResult {
        responses,
        last_applied,
        membership,
        events,
    })
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotFile;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> io::Result<(Option<LogId>, StoredMembership)> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<Strm>(&mut self, entries: Strm) -> io::Result<()>
    where
        Strm: Stream<Item = io::Result<EntryResponder<TypeConfig>>> + Unpin + OptionalSend,
    {
        let mut chunks = entries.ready_chunks(MAX_CHUNK);
        while let Some(items) = chunks.next().await {
            let chunk = items.into_iter().collect::<io::Result<Vec<_>>>()?;
            let mvcc = self.mvcc.clone();
            let (last_applied, membership) = (self.last_applied, self.membership.clone());
            // A small chunk (the common case under light load) is applied in place: it takes
            // tens of microseconds, less than handing it to the blocking pool and back.
            let result = if chunk.len() <= INLINE_APPLY_MAX {
                apply_chunk(&mvcc, chunk, last_applied, membership)?
            } else {
                tokio::task::spawn_blocking(move || {
                    apply_chunk(&mvcc, chunk, last_applied, membership)
                })
                .await
                .map_err(io_err)??
            };
            self.last_applied = result.last_applied;
            self.membership = result.membership;
            let applied = AppliedState {
                index: self.last_applied.map(|l| l.index).unwrap_or(0),
                revision: self.mvcc.current_revision(),
            };
            if let Some(listener) = &self.listener {
                listener(&AppliedChunk {
                    applied: applied.clone(),
                    events: result.events,
                });
            }
            self.applied_tx.send_replace(applied);
            for (responder, mut response) in result.responses {
                if response.revision == 0 {
                    response.revision = self.mvcc.current_revision();
                }
                if let Some(r) = responder {
                    r.send(CommandResult(response));
                }
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.snapshot_seq += 1;
        SnapshotBuilder {
            engine: self.mvcc.engine().clone(),
            snapshot_dir: self.snapshot_dir.clone(),
            seq: self.snapshot_seq,
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotFile,
    ) -> io::Result<()> {
        let (index, term) = meta
            .last_log_id
            .as_ref()
            .map(|l| (l.index, l.leader_id.term))
            .unwrap_or((0, 0));
        self.snapshot_seq += 1;
        let stem = format!("{index:020}-{term:020}-{:06}", self.snapshot_seq);
        let final_path = self.snapshot_dir.join(format!("{stem}.snap"));
        let engine = self.mvcc.engine().clone();
        let mvcc = self.mvcc.clone();
        let meta_clone = meta.clone();
        let dir = self.snapshot_dir.clone();
        let stem_for_install = stem.clone();
        tokio::task::spawn_blocking(move || -> io::Result<()> {
            let stem = stem_for_install;
            // Verify the whole file before touching the store.
            let mut check = SnapshotReader::open(&snapshot.path)?;
            while check.next_record()?.is_some() {}
            std::fs::rename(&snapshot.path, &final_path)?;
            sync_dir(&final_path)?;
            let mut marker = WriteBatch::new();
            marker.put(
                Table::RaftMeta,
                RAFT_META_INSTALLING,
                final_path.to_string_lossy().as_bytes().to_vec(),
            );
            engine.write(marker, true).map_err(io_err)?;
            load_snapshot_into(&engine, &final_path)?;
            write_meta_file(&dir.join(format!("{stem}.meta")), &meta_clone)?;
            remove_older_snapshots(&dir, &stem)?;
            mvcc.reload().map_err(io_err)
        })
        .await
        .map_err(io_err)??;
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        let applied = AppliedState {
            index,
            revision: self.mvcc.current_revision(),
        };
        self.applied_tx.send_replace(applied);
        tracing::info!(snapshot = %stem, "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> io::Result<Option<Snapshot>> {
        let Some((snap, meta_path)) = self.latest_snapshot_files()? else {
            return Ok(None);
        };
        let meta: SnapshotMeta = decode(&std::fs::read(&meta_path)?)?;
        Ok(Some(Snapshot {
            meta,
            snapshot: SnapshotFile { path: snap },
        }))
    }
}
