//! How a follower hands work to the leader without one RPC per client request.
//!
//! - **Writes and lease keep-alives** ([`WritePipes`]): one long-lived `ForwardStream` per
//!   leader carries every forwarded write and every keep-alive that reached this member. Each
//!   gets an id; the leader handles them concurrently and answers each keep-alive when it
//!   completes, in any order. A unary call per request cost an HTTP/2 stream (headers,
//!   trailers, flow-control window updates) on both members; on the stream a request is one
//!   DATA frame. (A leader that predates keep-alives on the stream rejects them; the lessor
//!   then uses the unary `LeaseRenew`.)
//! - **A forwarded write is answered from this member's own apply** ([`ForwardAnswers`]), as
//!   etcd's members answer their requests by ID: the write carries a `ForwardOrigin` (this
//!   member, this process's incarnation, the id) into the log, and when this member applies
//!   it, its state machine hands the response to [`ForwardAnswers::deliver`], which wakes the
//!   waiting handler. The leader replies on the stream only when the write fails (not leader,
//!   timed out, ...). This saves the reply's encoding, its trip back and a task hand-off on
//!   both members for every forwarded write. A leader that predates this replies anyway
//!   ([`Answer::FromLeader`]); a snapshot installed instead of the entries fails the writes
//!   still waiting with "request timed out" (their outcome is unknown to this member).
//! - **Read indexes** ([`ReadIndexBatcher`]): linearizable reads arriving while a `ReadIndex`
//!   call to the leader is in flight wait for the *next* call, which answers all of them.
//!   Linearizable because every read is answered by a call the leader received after the
//!   read arrived (etcd's follower read loop works the same way).
//!
//! When a forwarding stream breaks, the writes in flight on it fail with "request timed out"
//! (they may or may not have been applied, as with a broken unary call); the next write opens
//! a new stream.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use keel_proto::keelpb::{ForwardEnvelope, ForwardOrigin, ForwardReply, RaftRequest, RaftResponse};
use keel_store::raft::state_machine::AppliedChunk;
use keel_store::raft::{MemberNode, NodeId};
use tokio::sync::{mpsc, oneshot};

use crate::error::ServerError;
use crate::network::Peers;
use crate::node::status_to_error;

type WriteReply = oneshot::Sender<Result<RaftResponse, ServerError>>;
/// `Ok(None)`: the leader does not take keep-alives on the stream.
type RenewReply = oneshot::Sender<Result<Option<i64>, ServerError>>;

/// What a follower hands to the leader on its forwarding stream, with its id.
enum Forwarded {
    /// A write answered from this member's apply; the reply comes only if it fails (or the
    /// leader predates answers on apply).
    Write(u64, RaftRequest, WriteReply),
    /// A keep-alive of this lease.
    Renew(u64, i64, RenewReply),
}

/// Who waits for the reply to one envelope.
enum Waiter {
    Write(WriteReply),
    Renew(RenewReply),
}

impl Forwarded {
    fn into_parts(self) -> (ForwardEnvelope, Waiter) {
        match self {
            Forwarded::Write(id, request, reply) => (
                ForwardEnvelope {
                    id,
                    request: Some(request),
                    lease_renew: 0,
                    answered_on_apply: true,
                },
                Waiter::Write(reply),
            ),
            Forwarded::Renew(id, lease, reply) => (
                ForwardEnvelope {
                    id,
                    request: None,
                    lease_renew: lease,
                    answered_on_apply: false,
                },
                Waiter::Renew(reply),
            ),
        }
    }

    /// Answers a request that never reached a stream (see [`Waiter::fail`]).
    fn fail(self, e: ServerError) {
        self.into_parts().1.fail(e)
    }
}

impl Waiter {
    /// Whether nobody waits any more (a write answered from the apply, a caller gone).
    fn is_closed(&self) -> bool {
        match self {
            Waiter::Write(reply) => reply.is_closed(),
            Waiter::Renew(reply) => reply.is_closed(),
        }
    }

    /// Answers a request whose stream broke or could not be opened. A write may or may not
    /// have been applied, so it gets `e`; a keep-alive can safely be sent again, so it gets
    /// "no leader", which the lessor retries (on the next leader).
    fn fail(self, e: ServerError) {
        match self {
            Waiter::Write(reply) => drop(reply.send(Err(e))),
            Waiter::Renew(reply) => drop(reply.send(Err(ServerError::NoLeader))),
        }
    }
}

/// The queue of a leader's forwarding stream.
type WriteQueue = mpsc::UnboundedSender<Forwarded>;

/// How a forwarded write was answered.
#[derive(Debug)]
pub enum Answer {
    /// By this member's own apply of it: this member's state includes it.
    Applied(RaftResponse),
    /// By a leader that predates answers on apply, with the entry's log index: the caller
    /// waits until this member has applied it.
    FromLeader(RaftResponse),
}

type AppliedReply = oneshot::Sender<Result<RaftResponse, ServerError>>;

/// The forwarded writes of this member process waiting for their answer from its apply.
pub struct ForwardAnswers {
    /// Chosen at start: an entry forwarded by an earlier run of this member (ids start again
    /// at 1) never answers a request of this one.
    incarnation: u64,
    waiting: Mutex<HashMap<u64, AppliedReply>>,
}

impl ForwardAnswers {
    fn new() -> Self {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        ForwardAnswers {
            incarnation: h.finish(),
            waiting: Mutex::new(HashMap::new()),
        }
    }

    /// Called with every applied chunk (before the watch hub sees it): answers this member's
    /// forwarded writes that the chunk applied. After a snapshot was installed the writes
    /// still waiting are failed with "request timed out": their entries may be inside the
    /// snapshot, and their responses are not.
    pub fn deliver(&self, chunk: &AppliedChunk) {
        if chunk.answers.is_empty() && !chunk.installed_snapshot {
            return;
        }
        let Ok(mut waiting) = self.waiting.lock() else {
            return;
        };
        for (origin, response) in &chunk.answers {
            if origin.incarnation == self.incarnation
                && let Some(reply) = waiting.remove(&origin.id)
            {
                let _ = reply.send(Ok(response.clone()));
            }
        }
        if chunk.installed_snapshot {
            for (_, reply) in waiting.drain() {
                let _ = reply.send(Err(ServerError::Timeout));
            }
        }
    }

    fn register(&self, id: u64) -> oneshot::Receiver<Result<RaftResponse, ServerError>> {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut waiting) = self.waiting.lock() {
            waiting.insert(id, tx);
        }
        rx
    }

    fn unregister(&self, id: u64) {
        if let Ok(mut waiting) = self.waiting.lock() {
            waiting.remove(&id);
        }
    }

    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.waiting.lock().map(|w| w.len()).unwrap_or(0)
    }
}

/// Removes a forwarded write's registration however its wait ends.
struct Registered<'a>(&'a ForwardAnswers, u64);

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.0.unregister(self.1);
    }
}

/// The forwarding streams of one member, one per leader it has forwarded to.
pub struct WritePipes {
    /// The member these pipes forward for (the `member` of every `ForwardOrigin`).
    own_id: NodeId,
    pipes: Mutex<BTreeMap<NodeId, (String, WriteQueue)>>,
    /// Ids of envelopes (writes and keep-alives), unique in this process.
    next_id: AtomicU64,
    answers: Arc<ForwardAnswers>,
}

impl WritePipes {
    /// The pipes of member `own_id`.
    pub fn new(own_id: NodeId) -> Self {
        WritePipes {
            own_id,
            pipes: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(0),
            answers: Arc::new(ForwardAnswers::new()),
        }
    }

    /// What the state machine's listener hands applied chunks to.
    pub fn answers(&self) -> Arc<ForwardAnswers> {
        self.answers.clone()
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Forwards `req` to `leader` on its stream and waits for its answer: from this member's
    /// apply of it, or from the leader if it failed there or the leader predates answers on
    /// apply.
    pub async fn forward(
        &self,
        peers: &Arc<Peers>,
        leader: NodeId,
        node: &MemberNode,
        mut req: RaftRequest,
    ) -> Result<Answer, ServerError> {
        let id = self.next_id();
        let applied = self.answers.register(id);
        let _registered = Registered(&self.answers, id);
        req.origin = Some(ForwardOrigin {
            member: self.own_id,
            incarnation: self.answers.incarnation,
            id,
        });
        let (reply_tx, reply_rx) = oneshot::channel();
        self.submit(peers, leader, node, Forwarded::Write(id, req, reply_tx))?;
        // A pipe that drops the reply without an answer (it was replaced) leaves the write to
        // its apply, or to the caller's request timeout.
        tokio::select! {
            applied = applied => match applied {
                Ok(Ok(resp)) => Ok(Answer::Applied(resp)),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(ServerError::Timeout),
            },
            Ok(reply) = reply_rx => reply.map(Answer::FromLeader),
        }
    }

    /// Sends a keep-alive of `lease` to `leader` on its stream; the lease's TTL (0: no such
    /// lease), or `None` if this leader does not take keep-alives on the stream.
    pub async fn renew(
        &self,
        peers: &Arc<Peers>,
        leader: NodeId,
        node: &MemberNode,
        lease: i64,
    ) -> Result<Option<i64>, ServerError> {
        let (reply_tx, reply_rx) = oneshot::channel();
        let id = self.next_id();
        self.submit(peers, leader, node, Forwarded::Renew(id, lease, reply_tx))?;
        // A keep-alive can be sent again: a pipe that went away without answering is
        // "no leader", which the lessor retries.
        reply_rx.await.unwrap_or(Err(ServerError::NoLeader))
    }

    fn submit(
        &self,
        peers: &Arc<Peers>,
        leader: NodeId,
        node: &MemberNode,
        mut item: Forwarded,
    ) -> Result<(), ServerError> {
        let url = node.peer_urls.first().cloned().unwrap_or_default();
        // A pipe whose task has ended (its peer client could not be built) is replaced once.
        for _ in 0..2 {
            let sender = self.pipe(peers, leader, node, &url)?;
            match sender.send(item) {
                Ok(()) => return Ok(()),
                Err(mpsc::error::SendError(back)) => {
                    item = back;
                    if let Ok(mut pipes) = self.pipes.lock() {
                        pipes.remove(&leader);
                    }
                }
            }
        }
        Err(ServerError::NoLeader)
    }

    fn pipe(
        &self,
        peers: &Arc<Peers>,
        leader: NodeId,
        node: &MemberNode,
        url: &str,
    ) -> Result<WriteQueue, ServerError> {
        let mut pipes = self
            .pipes
            .lock()
            .map_err(|_| ServerError::Internal("forwarding pipes poisoned".into()))?;
        if let Some((known, tx)) = pipes.get(&leader)
            && known == url
            && !tx.is_closed()
        {
            return Ok(tx.clone());
        }
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run_pipe(peers.clone(), leader, node.clone(), rx));
        pipes.insert(leader, (url.to_string(), tx.clone()));
        Ok(tx)
    }
}

/// Owns one leader's forwarding stream: opens it when a write is waiting, sends writes, matches
/// replies to their waiters, and fails the waiters of a stream that breaks.
async fn run_pipe(
    peers: Arc<Peers>,
    leader: NodeId,
    node: MemberNode,
    mut writes: mpsc::UnboundedReceiver<Forwarded>,
) {
    while let Some(first) = writes.recv().await {
        let mut client = match peers.client(leader, &node) {
            Ok(c) => c,
            Err(_) => {
                // The leader cannot be reached at the URL this member knows: everything
                // queued here is answered "no leader" (not left to time out), and the pipe ends
                // so that the next request builds a new one from the current membership.
                first.fail(ServerError::NoLeader);
                writes.close();
                while let Ok(item) = writes.try_recv() {
                    item.fail(ServerError::NoLeader);
                }
                return;
            }
        };
        let (out_tx, out_rx) = mpsc::unbounded_channel::<ForwardEnvelope>();
        let mut waiting: HashMap<u64, Waiter> = HashMap::new();
        // Writes answered from the apply leave their waiter here, closed; they are swept out
        // whenever the map has doubled since the last sweep.
        let mut sweep_at = SWEEP_MIN;
        let (envelope, waiter) = first.into_parts();
        waiting.insert(envelope.id, waiter);
        let _ = out_tx.send(envelope);
        let opened = client
            .forward_stream(peers.request(
                leader,
                tokio_stream::wrappers::UnboundedReceiverStream::new(out_rx),
            ))
            .await;
        let mut replies = match opened {
            Ok(r) => r.into_inner(),
            Err(status) => {
                let e = status_to_error(&status);
                for (_, w) in waiting.drain() {
                    w.fail(e.clone());
                }
                continue;
            }
        };
        let broken = loop {
            tokio::select! {
                write = writes.recv() => match write {
                    Some(item) => {
                        let (envelope, waiter) = item.into_parts();
                        waiting.insert(envelope.id, waiter);
                        let _ = out_tx.send(envelope);
                        if waiting.len() >= sweep_at {
                            waiting.retain(|_, w| !w.is_closed());
                            sweep_at = (waiting.len() * 2).max(SWEEP_MIN);
                        }
                    }
                    // Nobody can forward through this pipe any more. Writes will be answered
                    // by the apply, or time out, without it: their waiters are dropped (the
                    // writer then waits for its apply only). Keep-alives in flight are still
                    // answered here.
                    None => {
                        waiting.retain(|_, w| matches!(w, Waiter::Renew(r) if !r.is_closed()));
                        if waiting.is_empty() {
                            return;
                        }
                        while let Ok(Some(reply)) = replies.message().await {
                            deliver(&mut waiting, reply);
                            if waiting.values().all(Waiter::is_closed) {
                                return;
                            }
                        }
                        break ServerError::Timeout;
                    }
                },
                reply = replies.message() => match reply {
                    Ok(Some(reply)) => deliver(&mut waiting, reply),
                    Ok(None) => break ServerError::Timeout,
                    Err(status) => break match status_to_error(&status) {
                        ServerError::NoLeader => ServerError::Timeout,
                        e => e,
                    },
                },
            }
        };
        tracing::debug!(leader = %format!("{leader:x}"), in_flight = waiting.len(), "forwarding stream ended: {broken}");
        for (_, w) in waiting.drain() {
            w.fail(broken.clone());
        }
    }
}

/// Waiters a pipe holds before it first sweeps out the closed ones.
const SWEEP_MIN: usize = 1024;

/// What a leader that predates keep-alives on the stream answers one.
pub(crate) const NOT_A_REQUEST: &str = "forward without a request";

fn deliver(waiting: &mut HashMap<u64, Waiter>, reply: ForwardReply) {
    let ForwardReply {
        id,
        response,
        code,
        message,
        ttl,
    } = reply;
    let Some(waiter) = waiting.remove(&id) else {
        return;
    };
    let failed = (code != 0).then(|| tonic::Status::new(tonic::Code::from_i32(code), message));
    match (waiter, failed) {
        (Waiter::Write(w), None) => drop(w.send(
            response.ok_or_else(|| ServerError::Internal("empty forwarded response".into())),
        )),
        (Waiter::Renew(w), None) => drop(w.send(Ok(Some(ttl)))),
        (Waiter::Renew(w), Some(s))
            if s.code() == tonic::Code::InvalidArgument && s.message() == NOT_A_REQUEST =>
        {
            drop(w.send(Ok(None)))
        }
        (Waiter::Write(w), Some(s)) => drop(w.send(Err(status_to_error(&s)))),
        (Waiter::Renew(w), Some(s)) => drop(w.send(Err(status_to_error(&s)))),
    }
}

type IndexReply = oneshot::Sender<Result<u64, ServerError>>;

/// Coalesces a follower's read-index calls to the leader (see the module docs).
#[derive(Default)]
pub struct ReadIndexBatcher {
    state: Mutex<BatchState>,
}

#[derive(Default)]
struct BatchState {
    in_flight: bool,
    waiting: Vec<IndexReply>,
    /// The leader as the latest waiter saw it (a call goes to whoever leads when it starts).
    leader: Option<(NodeId, MemberNode)>,
}

impl ReadIndexBatcher {
    /// The leader's read index, from a call the leader receives after this one started.
    pub async fn read_index(
        self: &Arc<Self>,
        peers: &Arc<Peers>,
        leader: NodeId,
        node: &MemberNode,
    ) -> Result<u64, ServerError> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut st = self
                .state
                .lock()
                .map_err(|_| ServerError::Internal("read index batcher poisoned".into()))?;
            st.waiting.push(tx);
            st.leader = Some((leader, node.clone()));
            !std::mem::replace(&mut st.in_flight, true)
        };
        if start {
            tokio::spawn(self.clone().run(peers.clone()));
        }
        rx.await.unwrap_or(Err(ServerError::Stopped))
    }

    /// Issues calls until nobody is waiting; each call answers the reads queued before it.
    async fn run(self: Arc<Self>, peers: Arc<Peers>) {
        loop {
            let (batch, target) = match self.state.lock() {
                Ok(mut st) if st.waiting.is_empty() => {
                    st.in_flight = false;
                    return;
                }
                Ok(mut st) => (std::mem::take(&mut st.waiting), st.leader.clone()),
                Err(_) => return,
            };
            let result = match target {
                Some((leader, node)) => fetch_read_index(&peers, leader, &node).await,
                None => Err(ServerError::NoLeader),
            };
            for w in batch {
                let _ = w.send(result.clone());
            }
        }
    }
}

async fn fetch_read_index(
    peers: &Peers,
    leader: NodeId,
    node: &MemberNode,
) -> Result<u64, ServerError> {
    let mut client = peers
        .client(leader, node)
        .map_err(|_| ServerError::NoLeader)?;
    let reply = client
        .read_index(peers.request(leader, keel_proto::keelpb::ReadIndexRequest {}))
        .await
        .map_err(|s| status_to_error(&s))?;
    let data = reply.into_inner().data;
    let bytes: [u8; 8] = data
        .as_slice()
        .try_into()
        .map_err(|_| ServerError::Internal("bad read index".into()))?;
    Ok(u64::from_be_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A leader whose peer URL cannot be used: every write already queued on its pipe is
    /// answered "no leader" at once, none waits for a timeout.
    #[tokio::test]
    async fn writes_queued_for_an_unusable_leader_url_get_no_leader() {
        let peers = Peers::new(7, 1);
        let node = MemberNode {
            peer_urls: vec!["not a url".into()],
            ..Default::default()
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let mut answers = Vec::new();
        for id in 1..=3 {
            let (reply_tx, reply_rx) = oneshot::channel();
            tx.send(Forwarded::Write(id, RaftRequest::default(), reply_tx))
                .map_err(|_| "pipe closed")
                .expect("queue a write");
            answers.push(reply_rx);
        }
        let pipe = tokio::spawn(run_pipe(peers, 2, node, rx));
        for answer in answers {
            let got = tokio::time::timeout(std::time::Duration::from_secs(5), answer)
                .await
                .expect("answered without waiting for a timeout")
                .expect("answered, not dropped");
            assert!(matches!(got, Err(ServerError::NoLeader)), "{got:?}");
        }
        pipe.await.expect("pipe task ends");
        let (reply_tx, _reply_rx) = oneshot::channel();
        assert!(
            tx.send(Forwarded::Write(4, RaftRequest::default(), reply_tx))
                .is_err(),
            "the ended pipe takes no more writes"
        );
    }

    fn put_response(revision: i64) -> RaftResponse {
        RaftResponse {
            revision,
            ..Default::default()
        }
    }

    fn chunk(
        answers: Vec<(ForwardOrigin, RaftResponse)>,
        installed_snapshot: bool,
    ) -> AppliedChunk {
        AppliedChunk {
            answers,
            installed_snapshot,
            ..Default::default()
        }
    }

    /// An applied answer reaches the writer registered under its id, only from this process's
    /// incarnation; a snapshot fails the writers still waiting; nothing stays registered.
    #[tokio::test]
    async fn applied_answers_reach_their_writers_and_a_snapshot_fails_the_rest() {
        let answers = ForwardAnswers::new();
        let origin = |incarnation, id| ForwardOrigin {
            member: 9,
            incarnation,
            id,
        };
        let mut first = answers.register(1);
        let mut second = answers.register(2);
        let third = answers.register(3);
        // An entry forwarded by an earlier run of this member, with the same id: ignored.
        answers.deliver(&chunk(
            vec![(
                origin(answers.incarnation.wrapping_add(1), 1),
                put_response(5),
            )],
            false,
        ));
        assert!(
            first.try_recv().is_err(),
            "answered by another incarnation's entry"
        );
        answers.deliver(&chunk(
            vec![(origin(answers.incarnation, 1), put_response(6))],
            false,
        ));
        let got = first.await.expect("answered").expect("a response");
        assert_eq!(got.revision, 6);
        assert!(second.try_recv().is_err());
        assert_eq!(answers.waiting(), 2);
        answers.deliver(&chunk(Vec::new(), true));
        assert!(matches!(second.await, Ok(Err(ServerError::Timeout))));
        assert!(matches!(third.await, Ok(Err(ServerError::Timeout))));
        assert_eq!(answers.waiting(), 0);
        // A writer that gave up is unregistered by its guard.
        let _gone = answers.register(4);
        drop(Registered(&answers, 4));
        assert_eq!(answers.waiting(), 0);
    }
}
