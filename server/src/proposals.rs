//! Proposal batching: the client writes that reach the leader together share one Raft entry.
//!
//! Every write this member proposes (its own clients' writes, those its followers forward, and
//! its own decisions such as lease expiry) goes through [`ProposalBatcher::write`]. Writes
//! queue; one task proposes one entry at a time: whatever is queued when the previous entry
//! has been applied, a single request as itself, several as a `keelpb.ProposalBatch`. A write
//! that finds no entry in flight and none queued never waits: its caller proposes it at once,
//! itself, without handing it to the task and back (two task wake-ups saved on every write of
//! a lightly loaded leader). Apply gives each request of a batch its own revision,
//! events and response, exactly as if it had been an entry of its own
//! ([`keel_store::mvcc::ApplyBatch::apply`]); the batch's response is split here and each
//! writer gets its own, with the entry's log index.
//!
//! What this saves: openraft's handling of an entry, its encoding, replication bookkeeping
//! and log-cache slot, the apply's per-entry work and the reply are paid once per entry on
//! each member, not once per request. Under light load entries carry one request each and
//! nothing changes; under load requests pile up while an entry is in flight (about one
//! replication round trip and fsync) and the next one takes them all, so the batches grow with
//! the load (14 requests per entry on average at 256 clients on the benchmark machine).
//! Without the limit of one entry in flight the task ran as soon as a request was queued and
//! entries held one request each: nothing was saved.
//!
//! Worked example, a leader with 3 clients and 2 followers forwarding writes:
//!
//! ```text
//! t0  client A's put arrives, nothing in flight   -> entry 41 = A (proposed by A's handler)
//! t1  B, C (clients) and F1 (forwarded) arrive while entry 41 is replicated: they queue
//! t2  entry 41 is applied, A answered             -> entry 42 = batch(B, C, F1)
//! t3  entry 42 is applied: B at revision 101, C at 102, F1 at 103; each gets its own response
//!     (index 42); F1 carries its follower's `ForwardOrigin`, so that follower answers F1
//!     when it applies entry 42 itself (the leader sends it nothing; see crate::forwarding).
//! ```
//!
//! Safety: a member of an older version would not understand a batch (it would read an empty
//! request and diverge), so batches are proposed only while every member of the current
//! membership has told the peer prober that it applies them (`MemberIdentity.features`, see
//! [`crate::network::spawn_prober`]); until then, and with `--proposal-batching=false` on this
//! member, every request is an entry of its own. A member started with
//! `--proposal-batching=false` does not advertise the feature, which turns batching off for the
//! whole cluster. A binary that predates batching cannot replay a log that holds batches, so a
//! member must not be downgraded past this change (etcd refuses downgrades in the same way).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use keel_proto::keelpb::raft_request::Request as Cmd;
use keel_proto::keelpb::{ProposalBatch, RaftRequest, RaftResponse};
use keel_proto::member_features;
use keel_store::raft::{Command, MemberNode, NodeId, Raft, TypeConfig};
use openraft::async_runtime::WatchReceiver as _;
use openraft::error::{ClientWriteError, RaftError};
use prometheus::Histogram;
use prost::Message;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::error::ServerError;

/// Requests in one entry at most.
const MAX_BATCH_REQUESTS: usize = 256;
/// Entries proposed and not yet applied at most. While one is, requests queue and the next
/// entry takes them all; one at a time made the largest batches and the most throughput
/// (`put --clients 256`: 26.5 k ops/s at 54 µs of server CPU each with one, 24.9 k at 58 µs
/// with two, 24.6 k at 59 µs with four, 21.0 k at 72 µs with 64, when entries held one
/// request each; see docs/benchmarks.md).
const MAX_ENTRIES_IN_FLIGHT: usize = 1;
/// Encoded bytes of the requests in one entry at most (a single larger request goes alone).
const MAX_BATCH_BYTES: usize = 1 << 20;

/// Why a write was not applied.
#[derive(Debug)]
pub(crate) enum WriteFailure {
    /// This member is not the leader: the leader openraft knows of, and the request back, so
    /// the caller can forward it.
    NotLeader {
        leader: Option<(NodeId, MemberNode)>,
        request: RaftRequest,
    },
    Failed(ServerError),
}

/// A failure shared by every request of an entry.
#[derive(Debug, Clone)]
enum EntryFailure {
    NotLeader(Option<(NodeId, MemberNode)>),
    Discarded,
    Internal(String),
    Stopped,
}

impl EntryFailure {
    fn of(e: RaftError<TypeConfig, ClientWriteError<TypeConfig>>) -> Self {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
                EntryFailure::NotLeader(f.leader_id.zip(f.leader_node))
            }
            RaftError::APIError(ClientWriteError::LogEntryDiscarded(_)) => EntryFailure::Discarded,
            RaftError::APIError(e) => EntryFailure::Internal(e.to_string()),
            RaftError::Fatal(_) => EntryFailure::Stopped,
        }
    }

    fn for_request(&self, request: RaftRequest) -> WriteFailure {
        match self {
            EntryFailure::NotLeader(leader) => WriteFailure::NotLeader {
                leader: leader.clone(),
                request,
            },
            EntryFailure::Discarded => WriteFailure::Failed(ServerError::LeaderChanged),
            EntryFailure::Internal(m) => WriteFailure::Failed(ServerError::Internal(m.clone())),
            EntryFailure::Stopped => WriteFailure::Failed(ServerError::Stopped),
        }
    }
}

type Reply = oneshot::Sender<Result<RaftResponse, WriteFailure>>;

struct Pending {
    request: RaftRequest,
    bytes: usize,
    reply: Reply,
}

/// See the module docs.
pub(crate) struct ProposalBatcher {
    queue: mpsc::UnboundedSender<Pending>,
    gate: Arc<BatchGate>,
    /// One permit per entry that may be in flight ([`MAX_ENTRIES_IN_FLIGHT`]).
    in_flight: Arc<Semaphore>,
    raft: Raft,
    sizes: Histogram,
}

/// Whether batches may be proposed: this member's flag and what the other members said.
pub(crate) struct BatchGate {
    enabled: bool,
    /// Each other member's `features`, as its last answer to the peer prober gave them.
    peer_features: Mutex<BTreeMap<NodeId, u64>>,
}

impl BatchGate {
    /// What this member tells others it applies.
    pub(crate) fn own_features(&self) -> u64 {
        if self.enabled {
            member_features::PROPOSAL_BATCHES
        } else {
            0
        }
    }

    /// Records what the prober learnt: `answers` are the members that answered and their
    /// features; `members` every other member of the current membership (members no longer in
    /// it are forgotten, so one added again must answer again).
    pub(crate) fn update(&self, members: &[NodeId], answers: &[(NodeId, u64)]) {
        let Ok(mut known) = self.peer_features.lock() else {
            return;
        };
        for (id, features) in answers {
            known.insert(*id, *features);
        }
        known.retain(|id, _| members.contains(id));
    }

    /// Whether an entry may hold a batch: every member of the membership in force now is known
    /// to apply batches (a member added since the prober's last round is not known yet).
    fn open(&self, raft: &Raft, own_id: NodeId) -> bool {
        if !self.enabled {
            return false;
        }
        let Ok(known) = self.peer_features.lock() else {
            return false;
        };
        let metrics = raft.metrics();
        let m = metrics.borrow_watched();
        m.membership_config.membership().nodes().all(|(id, _)| {
            *id == own_id
                || known
                    .get(id)
                    .is_some_and(|f| f & member_features::PROPOSAL_BATCHES != 0)
        })
    }
}

impl ProposalBatcher {
    /// Starts the batching task; `sizes` observes the requests per proposed entry.
    pub(crate) fn start(raft: Raft, own_id: NodeId, enabled: bool, sizes: Histogram) -> Self {
        let (queue, rx) = mpsc::unbounded_channel();
        let gate = Arc::new(BatchGate {
            enabled,
            peer_features: Mutex::new(BTreeMap::new()),
        });
        let in_flight = Arc::new(Semaphore::new(MAX_ENTRIES_IN_FLIGHT));
        tokio::spawn(run(
            raft.clone(),
            own_id,
            gate.clone(),
            in_flight.clone(),
            rx,
            sizes.clone(),
        ));
        ProposalBatcher {
            queue,
            gate,
            in_flight,
            raft,
            sizes,
        }
    }

    pub(crate) fn gate(&self) -> &BatchGate {
        &self.gate
    }

    /// Proposes `request` (alone or with others that arrive at the same time) and returns its
    /// applied response, its `error` included.
    ///
    /// When no entry is in flight and no write waits (the semaphore is fair: once the batching
    /// task waits for the permit, this cannot take it), the caller proposes its request itself:
    /// a lone write skips the hand-over to the batching task and back, two task wake-ups on
    /// the path of every write of a lightly loaded cluster.
    pub(crate) async fn write(&self, request: RaftRequest) -> Result<RaftResponse, WriteFailure> {
        if let Ok(permit) = self.in_flight.clone().try_acquire_owned() {
            self.sizes.observe(1.0);
            let result = write_one(&self.raft, request).await;
            drop(permit);
            return result;
        }
        let (reply, answer) = oneshot::channel();
        let bytes = request.encoded_len();
        let pending = Pending {
            request,
            bytes,
            reply,
        };
        if self.queue.send(pending).is_err() {
            return Err(WriteFailure::Failed(ServerError::Stopped));
        }
        answer
            .await
            .unwrap_or(Err(WriteFailure::Failed(ServerError::Stopped)))
    }
}

/// The batching task: takes what is queued, proposes it, repeats.
async fn run(
    raft: Raft,
    own_id: NodeId,
    gate: Arc<BatchGate>,
    in_flight: Arc<Semaphore>,
    mut queue: mpsc::UnboundedReceiver<Pending>,
    sizes: Histogram,
) {
    let mut held: Option<Pending> = None;
    loop {
        // The first request, then the permit: while this task waits for a request the permit
        // is free for a lone writer to propose its own (see `write`).
        let first = match held.take() {
            Some(p) => p,
            None => match queue.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        // A writer that gave up (its client's deadline passed, or the client left while the
        // request queued) was told nothing about the outcome; its write is dropped unproposed.
        if first.reply.is_closed() {
            continue;
        }
        let mut bytes = first.bytes;
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH_REQUESTS {
            match queue.try_recv() {
                Ok(p) if p.reply.is_closed() => {}
                Ok(p) if bytes + p.bytes <= MAX_BATCH_BYTES => {
                    bytes += p.bytes;
                    batch.push(p);
                }
                Ok(p) => {
                    held = Some(p);
                    break;
                }
                Err(_) => break,
            }
        }
        if !gate.open(&raft, own_id) {
            // Without batches, entries need not wait for each other.
            for p in batch {
                sizes.observe(1.0);
                tokio::spawn(propose_one(raft.clone(), p));
            }
            drop(permit);
            continue;
        }
        sizes.observe(batch.len() as f64);
        let raft = raft.clone();
        tokio::spawn(async move {
            propose(raft, batch).await;
            drop(permit);
        });
    }
}

/// One entry: a single request as itself, several as a batch.
async fn propose(raft: Raft, mut batch: Vec<Pending>) {
    if batch.len() > 1 {
        propose_batch(raft, batch).await;
    } else if let Some(p) = batch.pop() {
        propose_one(raft, p).await;
    }
}

async fn propose_one(raft: Raft, p: Pending) {
    let _ = p.reply.send(write_one(&raft, p.request).await);
}

/// One request as an entry of its own.
async fn write_one(raft: &Raft, request: RaftRequest) -> Result<RaftResponse, WriteFailure> {
    let command = Command::new(request);
    match raft.client_write(command.clone()).await {
        Ok(resp) => Ok(resp.data.0),
        Err(e) => Err(EntryFailure::of(e).for_request(command.into_request())),
    }
}

async fn propose_batch(raft: Raft, batch: Vec<Pending>) {
    let (requests, replies): (Vec<RaftRequest>, Vec<Reply>) =
        batch.into_iter().map(|p| (p.request, p.reply)).unzip();
    let command = Command::new(RaftRequest {
        request: Some(Cmd::Batch(ProposalBatch { requests })),
        origin: None,
    });
    match raft.client_write(command.clone()).await {
        Ok(resp) => {
            let entry = resp.data.0;
            if entry.batch.len() != replies.len() {
                let message = format!(
                    "a batch of {} requests was answered with {} responses",
                    replies.len(),
                    entry.batch.len()
                );
                for reply in replies {
                    let _ = reply.send(Err(WriteFailure::Failed(ServerError::Internal(
                        message.clone(),
                    ))));
                }
                return;
            }
            for (reply, mut response) in replies.into_iter().zip(entry.batch) {
                response.index = entry.index;
                let _ = reply.send(Ok(response));
            }
        }
        Err(e) => {
            let failure = EntryFailure::of(e);
            let requests = match command.into_request().request {
                Some(Cmd::Batch(b)) => b.requests,
                _ => Vec::new(),
            };
            for (reply, request) in replies.into_iter().zip(requests) {
                let _ = reply.send(Err(failure.for_request(request)));
            }
        }
    }
}
