//! The replicated state machine: committed Raft entries applied to the MVCC store.
//!
//! Each chunk of entries that openraft hands over is applied in one [`ApplyBatch`] and written
//! with one engine write that also records the last applied log id and the membership, so the
//! applied state and the data can never disagree after a crash. Responses are sent only after
//! that write, and listeners (the watch hub) see the chunk's events in revision order.
//!
//! Requests a member forwarded to the leader carry a `ForwardOrigin`; the state machine of
//! that member (set with [`StateMachine::answering_forwards_of`]) hands their responses to the
//! listener ([`AppliedChunk::answers`]), which answers the waiting clients, as etcd's members
//! answer their requests by ID from their own apply.
//!
//! Applying never reads a clock, randomness or hash-map order: it depends only on the entries.
//!
//! Snapshots are pinned views of this store (see [`crate::raft::snapshot`]): building one, so
//! that openraft can purge the log, takes a view and an fsync, whatever the size of the
//! database; a file is written only when a snapshot is sent to a member that needs it. A
//! received snapshot is loaded into the store and its file deleted.
//!
//! [`ApplyBatch`]: crate::mvcc::ApplyBatch

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::{Stream, StreamExt};
use keel_proto::keelpb::raft_request::Request as Cmd;
use keel_proto::keelpb::{ForwardOrigin, RaftRequest, RaftResponse};
use keel_proto::mvccpb::Event;
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend};
use tokio::sync::watch;

use super::snapshot::{RecordCheck, SnapshotFile, SnapshotReader, sync_dir};
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
#[derive(Debug, Clone, Default)]
pub struct AppliedChunk {
    pub applied: AppliedState,
    /// Every event of the chunk in revision order (events of one revision are contiguous).
    pub events: Vec<Event>,
    /// The responses to the requests this member forwarded (see the module docs), each with
    /// its entry's log index; empty unless [`StateMachine::answering_forwards_of`] was set.
    pub answers: Vec<(ForwardOrigin, RaftResponse)>,
    /// A snapshot was installed instead of applying entries: the requests this member
    /// forwarded that it did not see applied never will be (no events or answers come with it).
    pub installed_snapshot: bool,
}

/// Called after each applied chunk is durable in the engine and its writers were answered
/// (and after a snapshot was installed, with [`AppliedChunk::installed_snapshot`]).
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
    /// The member whose forwarded requests' responses go to the listener (0: none).
    answer_member: u64,
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
        remove_stale_snapshot_files(snapshot_dir)?;
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
            answer_member: 0,
            snapshot_seq: 0,
        })
    }

    /// Hands the responses to the requests `member` forwarded to the listener
    /// ([`AppliedChunk::answers`]).
    pub fn answering_forwards_of(mut self, member: u64) -> Self {
        self.answer_member = member;
        self
    }

    pub fn mvcc(&self) -> &Arc<MvccStore> {
        &self.mvcc
    }

    /// A receiver that sees the applied state after every chunk.
    pub fn applied_watch(&self) -> watch::Receiver<AppliedState> {
        self.applied_tx.subscribe()
    }

    /// Pins a view of the state machine as it is now (no apply runs meanwhile: openraft calls
    /// this on the state machine's task), announced with the current applied log id and
    /// membership. The view is written to a file only if the snapshot is sent or installed.
    async fn pin_current(&mut self) -> io::Result<Snapshot> {
        self.snapshot_seq += 1;
        let meta = SnapshotMeta {
            last_log_id: self.last_applied,
            last_membership: self.membership.clone(),
        };
        let index = self.last_applied.map(|l| l.index).unwrap_or(0);
        let path = self
            .snapshot_dir
            .join(format!("view-{index:020}-{:06}.snap", self.snapshot_seq));
        // The view must hold exactly what the meta announces; a file that does not is refused
        // while it is written rather than sent.
        let expected = encode(&self.last_applied)?;
        let check: RecordCheck = Box::new(move |table, key, value| {
            if table == Table::Meta && key == META_LAST_APPLIED && value != expected.as_slice() {
                return Err(io::Error::other(
                    "snapshot view is not at the applied index its meta announces",
                ));
            }
            Ok(())
        });
        let file = SnapshotFile::pin(self.mvcc.engine().clone(), path, check).await?;
        Ok(Snapshot {
            meta,
            snapshot: file,
        })
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
        batch.clear_table(table);
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

/// Removes every file of the snapshot directory except the one an interrupted installation
/// still needs: views written for a send that never finished, received files that were never
/// installed, and the snapshot files of versions that kept one per snapshot.
pub(crate) fn remove_stale_snapshot_files(dir: &Path) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// Completes a snapshot whose view was pinned on the state machine's task.
pub struct SnapshotBuilder {
    engine: Arc<dyn Engine>,
    snapshot: Option<io::Result<Snapshot>>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotFile;

    async fn build_snapshot(&mut self) -> io::Result<Snapshot> {
        let snapshot = self
            .snapshot
            .take()
            .ok_or_else(|| io::Error::other("snapshot builder used twice"))??;
        // openraft purges the log up to (a margin before) this snapshot once it is built, so
        // everything applied up to it must be durable first. It is already, in practice (the
        // state machine shares the engine's write-ahead log with the Raft log, whose later
        // appends are fsynced); one more fsync per snapshot makes it independent of that.
        let engine = self.engine.clone();
        tokio::task::spawn_blocking(move || engine.sync_wal())
            .await
            .map_err(io_err)?
            .map_err(io_err)?;
        tracing::info!(
            index = snapshot.meta.last_log_id.map(|l| l.index).unwrap_or(0),
            "snapshot taken (a pinned view, written to a file only if it is sent)"
        );
        Ok(snapshot)
    }
}

struct ChunkResult {
    responses: Vec<(
        Option<openraft::storage::ApplyResponder<TypeConfig>>,
        RaftResponse,
    )>,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    events: Vec<Event>,
    answers: Vec<(ForwardOrigin, RaftResponse)>,
}

/// The forwarded requests of `member` in `request` (itself, or the requests of its batch),
/// with their responses out of `response`.
fn collect_answers(
    member: u64,
    index: u64,
    request: &RaftRequest,
    response: &RaftResponse,
    answers: &mut Vec<(ForwardOrigin, RaftResponse)>,
) {
    let mut answer = |req: &RaftRequest, resp: &RaftResponse| {
        if let Some(origin) = req.origin.as_ref().filter(|o| o.member == member) {
            let mut resp = resp.clone();
            resp.index = index;
            answers.push((*origin, resp));
        }
    };
    match &request.request {
        Some(Cmd::Batch(b)) => {
            for (req, resp) in b.requests.iter().zip(&response.batch) {
                answer(req, resp);
            }
        }
        _ => answer(request, response),
    }
}

fn apply_chunk(
    mvcc: &MvccStore,
    answer_member: u64,
    chunk: Vec<EntryResponder<TypeConfig>>,
    mut last_applied: Option<LogId>,
    mut membership: StoredMembership,
) -> io::Result<ChunkResult> {
    let mut batch = mvcc.begin_apply();
    let mut responses = Vec::with_capacity(chunk.len());
    let mut events = Vec::new();
    let mut answers = Vec::new();
    for (entry, responder) in chunk {
        let log_id = entry.log_id;
        let mut response = match entry.payload {
            EntryPayload::Blank => RaftResponse {
                revision: mvcc.current_revision(),
                ..Default::default()
            },
            EntryPayload::Normal(cmd) => {
                let observer = crate::observe::apply_entry_observer();
                let started = observer.map(|_| std::time::Instant::now());
                let outcome = batch.apply(cmd.request());
                if let (Some(observe), Some(started)) = (observer, started) {
                    observe(log_id.index, started.elapsed());
                }
                events.extend(outcome.events);
                if answer_member != 0 {
                    collect_answers(
                        answer_member,
                        log_id.index,
                        cmd.request(),
                        &outcome.response,
                        &mut answers,
                    );
                }
                outcome.response
            }
            EntryPayload::Membership(m) => {
                membership = StoredMembership::new(Some(log_id), m);
                RaftResponse::default()
            }
        };
        response.index = log_id.index;
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
        answers,
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
            let answer_member = self.answer_member;
            // A small chunk (the common case under light load) is applied in place: it takes
            // tens of microseconds, less than handing it to the blocking pool and back.
            let result = if chunk.len() <= INLINE_APPLY_MAX {
                apply_chunk(&mvcc, answer_member, chunk, last_applied, membership)?
            } else {
                tokio::task::spawn_blocking(move || {
                    apply_chunk(&mvcc, answer_member, chunk, last_applied, membership)
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
            // Writers first, then the listener (the watch hub, whose dispatch to thousands of
            // watchers can take a millisecond): a writer's answer does not wait for the fan-out
            // of its own events. `applied_tx` moves last, so what waits for an applied index
            // (a linearizable read, a write forwarded to a leader that predates answers on
            // apply) still finds the events dispatched.
            for (responder, mut response) in result.responses {
                if response.revision == 0 {
                    response.revision = self.mvcc.current_revision();
                }
                if let Some(r) = responder {
                    r.send(CommandResult(response));
                }
            }
            if let Some(listener) = &self.listener {
                listener(&AppliedChunk {
                    applied: applied.clone(),
                    events: result.events,
                    answers: result.answers,
                    installed_snapshot: false,
                });
            }
            self.applied_tx.send_replace(applied);
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        let snapshot = self.pin_current().await;
        SnapshotBuilder {
            engine: self.mvcc.engine().clone(),
            snapshot: Some(snapshot),
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
        let _installing = crate::observe::InstallingSnapshot::start();
        let stem = format!("{index:020}-{term:020}-{:06}", self.snapshot_seq);
        let installing = self.snapshot_dir.join(format!("installing-{stem}.snap"));
        // A received file is installed as it is; a pinned view (another state machine's, in
        // tests) is written out first.
        let source = snapshot.into_file().await?.keep();
        let engine = self.mvcc.engine().clone();
        let mvcc = self.mvcc.clone();
        tokio::task::spawn_blocking(move || -> io::Result<()> {
            // Verify the whole file before touching the store.
            let mut check = SnapshotReader::open(&source)?;
            while check.next_record()?.is_some() {}
            std::fs::rename(&source, &installing)?;
            sync_dir(&installing)?;
            // From here a crash resumes the installation at the next start (see `open`).
            let mut marker = WriteBatch::new();
            marker.put(
                Table::RaftMeta,
                RAFT_META_INSTALLING,
                installing.to_string_lossy().as_bytes().to_vec(),
            );
            engine.write(marker, true).map_err(io_err)?;
            load_snapshot_into(&engine, &installing)?;
            // The store now holds the snapshot; the file is no longer needed (a snapshot of
            // this member is a view of its store).
            std::fs::remove_file(&installing)?;
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
        if let Some(listener) = &self.listener {
            listener(&AppliedChunk {
                applied: applied.clone(),
                installed_snapshot: true,
                ..Default::default()
            });
        }
        self.applied_tx.send_replace(applied);
        tracing::info!(snapshot = %stem, "installed snapshot");
        Ok(())
    }

    /// The state machine as it is now, as a pinned view: every member's store is its own
    /// latest snapshot, so this is never older than the last one built or installed.
    async fn get_current_snapshot(&mut self) -> io::Result<Option<Snapshot>> {
        if self.last_applied.is_none() {
            return Ok(None);
        }
        self.pin_current().await.map(Some)
    }
}
