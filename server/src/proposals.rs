//! Proposal batching: the client writes that reach the leader together share one Raft entry.
//!
//! Every write this member proposes (its own clients' writes, those its followers forward, and
//! its own decisions such as lease expiry) goes through `ProposalBatcher::write`. One entry
//! is in flight at a time; writes that arrive meanwhile queue. A write that finds no entry in
//! flight and none queued never waits: its caller proposes it at once, itself. When an entry
//! has been applied (or has failed), the task that learns it proposes whatever queued
//! meanwhile as the next entry, at once and before it answers the entry's writers: a single
//! request as itself, several as a `keelpb.ProposalBatch`. No task sits between entries, so
//! the next proposal waits for no wake-up (a batching task did this until 2026-11-29; under
//! load it waited behind the hundreds of writers the previous entry had just woken, 0.1–0.5
//! ms per entry). Apply gives each request of a batch its own revision,
//! events and response, exactly as if it had been an entry of its own
//! ([`keel_store::mvcc::ApplyBatch::apply`]); the batch's response is split here and each
//! writer gets its own, with the entry's log index.
//!
//! What this saves: openraft's handling of an entry, its encoding, replication bookkeeping
//! and log-cache slot, the apply's per-entry work and the reply are paid once per entry on
//! each member, not once per request. Under light load entries carry one request each and
//! nothing changes; under load requests pile up while an entry is in flight (about one
//! replication round trip and fsync) and the next one takes them all, so the batches grow with
//! the load (on the benchmark machine, 2026-11-29: about 13 requests per entry at 32 clients,
//! 80–100 at 256).
//! Without the limit of one entry in flight entries were proposed as soon as a request was
//! queued and held one request each: nothing was saved.
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

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use keel_proto::keelpb::raft_request::Request as Cmd;
use keel_proto::keelpb::{ProposalBatch, RaftRequest, RaftResponse};
use keel_proto::member_features;
use keel_store::raft::{Command, MemberNode, NodeId, Raft, TypeConfig};
use openraft::async_runtime::WatchReceiver as _;
use openraft::error::{ClientWriteError, RaftError};
use prometheus::Histogram;
use prost::Message;
use tokio::sync::oneshot;

use crate::error::ServerError;

/// Requests in one entry at most.
const MAX_BATCH_REQUESTS: usize = 256;
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
    shared: Arc<Shared>,
}

/// What the writers and the entries in flight share.
struct Shared {
    raft: Raft,
    own_id: NodeId,
    gate: BatchGate,
    queue: Mutex<Queue>,
    sizes: Histogram,
}

/// The writes waiting for the entry in flight to be applied.
#[derive(Default)]
struct Queue {
    /// An entry is proposed and not yet applied. One at a time: while it is, requests queue
    /// and the next entry takes them all. One made the largest batches and the most
    /// throughput (`put --clients 256`: 26.5 k ops/s at 54 µs of server CPU each with one,
    /// 24.9 k at 58 µs with two, 24.6 k at 59 µs with four, 21.0 k at 72 µs with 64, when
    /// entries held one request each; see docs/benchmarks.md).
    in_flight: bool,
    waiting: VecDeque<Pending>,
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

/// The entry in flight: when it is dropped (its entry was applied or failed, or the writer
/// proposing it alone went away), the writes queued meanwhile are proposed as the next entry.
struct InFlight(Arc<Shared>);

impl Drop for InFlight {
    fn drop(&mut self) {
        Shared::propose_next(&self.0);
    }
}

impl ProposalBatcher {
    /// A batcher proposing through `raft`; `sizes` observes the requests per proposed entry.
    pub(crate) fn start(raft: Raft, own_id: NodeId, enabled: bool, sizes: Histogram) -> Self {
        ProposalBatcher {
            shared: Arc::new(Shared {
                raft,
                own_id,
                gate: BatchGate {
                    enabled,
                    peer_features: Mutex::new(BTreeMap::new()),
                },
                queue: Mutex::new(Queue::default()),
                sizes,
            }),
        }
    }

    pub(crate) fn gate(&self) -> &BatchGate {
        &self.shared.gate
    }

    /// Proposes `request` (alone or with others that arrive at the same time) and returns its
    /// applied response, its `error` included.
    ///
    /// When no entry is in flight and no write waits, the caller proposes its request itself:
    /// a lone write is not handed to another task and back, two task wake-ups on the path of
    /// every write of a lightly loaded cluster. Otherwise it queues, and the entry in flight,
    /// once applied, proposes it with the others queued (see [`Shared::propose_next`]).
    pub(crate) async fn write(&self, request: RaftRequest) -> Result<RaftResponse, WriteFailure> {
        // Ok: nothing in flight, this caller proposes its request; Err: queued, the answer.
        let path = match self.shared.queue.lock() {
            Err(_) => {
                return Err(WriteFailure::Failed(ServerError::Internal(
                    "proposal queue poisoned".into(),
                )));
            }
            Ok(mut queue) if queue.in_flight || !queue.waiting.is_empty() => {
                let (reply, answer) = oneshot::channel();
                let bytes = request.encoded_len();
                queue.waiting.push_back(Pending {
                    request,
                    bytes,
                    reply,
                });
                Err(answer)
            }
            Ok(mut queue) => {
                queue.in_flight = true;
                Ok(request)
            }
        };
        let request = match path {
            Ok(request) => request,
            Err(answer) => {
                return answer
                    .await
                    .unwrap_or(Err(WriteFailure::Failed(ServerError::Stopped)));
            }
        };
        let in_flight = InFlight(self.shared.clone());
        self.shared.sizes.observe(1.0);
        let result = write_one(&self.shared.raft, request).await;
        // The next entry is proposed before this writer goes on.
        drop(in_flight);
        result
    }
}

impl Shared {
    /// Called when the entry in flight is done: proposes what queued meanwhile as the next
    /// entry, from the task that saw the entry applied (no hand-over to another task before
    /// the next proposal), or records that nothing is in flight. With batches not allowed,
    /// every queued write becomes an entry of its own at once (they need not wait for each
    /// other).
    fn propose_next(shared: &Arc<Shared>) {
        // Most entries of a lightly loaded member end with nothing queued: no gate to ask.
        {
            let Ok(mut queue) = shared.queue.lock() else {
                return;
            };
            if queue.waiting.is_empty() {
                queue.in_flight = false;
                return;
            }
        }
        // Only this call takes from the queue while the entry is still in flight, so what was
        // queued above is still there (and perhaps more).
        let open = shared.gate.open(&shared.raft, shared.own_id);
        let runtime = tokio::runtime::Handle::try_current();
        let batch = {
            let Ok(mut queue) = shared.queue.lock() else {
                return;
            };
            let mut batch = Vec::new();
            let mut bytes = 0;
            while let Some(p) = queue.waiting.pop_front() {
                // A writer that gave up (its client's deadline passed, or the client left
                // while the request queued) was told nothing about the outcome; its write is
                // dropped unproposed.
                if p.reply.is_closed() {
                    continue;
                }
                if open
                    && !batch.is_empty()
                    && (batch.len() >= MAX_BATCH_REQUESTS || bytes + p.bytes > MAX_BATCH_BYTES)
                {
                    queue.waiting.push_front(p);
                    break;
                }
                bytes += p.bytes;
                batch.push(p);
            }
            // Without a runtime (the member is shutting down) nothing more is proposed: the
            // queued writers' replies are dropped, which answers them "stopped".
            queue.in_flight = open && !batch.is_empty() && runtime.is_ok();
            batch
        };
        let Ok(runtime) = runtime else {
            return;
        };
        if batch.is_empty() {
            return;
        }
        if !open {
            for p in batch {
                shared.sizes.observe(1.0);
                runtime.spawn(propose_one(shared.raft.clone(), p));
            }
            return;
        }
        shared.sizes.observe(batch.len() as f64);
        let in_flight = InFlight(shared.clone());
        runtime.spawn(propose(shared.raft.clone(), batch, in_flight));
    }
}

/// One entry: a single request as itself, several as a batch.
async fn propose(raft: Raft, mut batch: Vec<Pending>, in_flight: InFlight) {
    if batch.len() > 1 {
        propose_batch(raft, batch, in_flight).await;
    } else if let Some(p) = batch.pop() {
        let result = write_one(&raft, p.request).await;
        // The next entry first, then the answer to this one's writer.
        drop(in_flight);
        let _ = p.reply.send(result);
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

async fn propose_batch(raft: Raft, batch: Vec<Pending>, in_flight: InFlight) {
    let (requests, replies): (Vec<RaftRequest>, Vec<Reply>) =
        batch.into_iter().map(|p| (p.request, p.reply)).unzip();
    let command = Command::new(RaftRequest {
        request: Some(Cmd::Batch(ProposalBatch { requests })),
        origin: None,
    });
    let written = raft.client_write(command.clone()).await;
    // The next entry first, then the answers to this one's writers.
    drop(in_flight);
    match written {
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
