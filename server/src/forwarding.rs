//! How a follower hands work to the leader without one RPC per client request.
//!
//! - **Writes and lease keep-alives** ([`WritePipes`]): one long-lived `ForwardStream` per
//!   leader carries every forwarded write and every keep-alive that reached this member. Each
//!   gets an id; the leader handles them concurrently and answers each one when it completes,
//!   in any order. A unary call per request cost an HTTP/2 stream (headers, trailers,
//!   flow-control window updates) on both members; on the stream a request is one DATA frame
//!   each way. (A leader that predates keep-alives on the stream rejects them; the lessor then
//!   uses the unary `LeaseRenew`.)
//! - **Read indexes** ([`ReadIndexBatcher`]): linearizable reads arriving while a `ReadIndex`
//!   call to the leader is in flight wait for the *next* call, which answers all of them.
//!   Linearizable because every read is answered by a call the leader received after the
//!   read arrived (etcd's follower read loop works the same way).
//!
//! When a forwarding stream breaks, the writes in flight on it fail with "request timed out"
//! (they may or may not have been applied, as with a broken unary call); the next write opens
//! a new stream.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use keel_proto::keelpb::{ForwardEnvelope, ForwardReply, RaftRequest, RaftResponse};
use keel_store::raft::{MemberNode, NodeId};
use tokio::sync::{mpsc, oneshot};

use crate::error::ServerError;
use crate::network::Peers;
use crate::node::status_to_error;

type WriteReply = oneshot::Sender<Result<RaftResponse, ServerError>>;
/// `Ok(None)`: the leader does not take keep-alives on the stream.
type RenewReply = oneshot::Sender<Result<Option<i64>, ServerError>>;

/// What a follower hands to the leader on its forwarding stream.
enum Forwarded {
    Write(RaftRequest, WriteReply),
    /// A keep-alive of this lease.
    Renew(i64, RenewReply),
}

/// Who waits for the reply to one envelope.
enum Waiter {
    Write(WriteReply),
    Renew(RenewReply),
}

impl Forwarded {
    fn into_parts(self, id: u64) -> (ForwardEnvelope, Waiter) {
        match self {
            Forwarded::Write(request, reply) => (
                ForwardEnvelope {
                    id,
                    request: Some(request),
                    lease_renew: 0,
                },
                Waiter::Write(reply),
            ),
            Forwarded::Renew(lease, reply) => (
                ForwardEnvelope {
                    id,
                    request: None,
                    lease_renew: lease,
                },
                Waiter::Renew(reply),
            ),
        }
    }

    /// Answers a request that never reached a stream (see [`Waiter::fail`]).
    fn fail(self, e: ServerError) {
        self.into_parts(0).1.fail(e)
    }
}

impl Waiter {
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

/// The forwarding streams of one member, one per leader it has forwarded to.
#[derive(Default)]
pub struct WritePipes {
    pipes: Mutex<BTreeMap<NodeId, (String, WriteQueue)>>,
}

impl WritePipes {
    /// Forwards `req` to `leader` on its stream and waits for the leader's answer.
    pub async fn forward(
        &self,
        peers: &Arc<Peers>,
        leader: NodeId,
        node: &MemberNode,
        req: RaftRequest,
    ) -> Result<RaftResponse, ServerError> {
        let (reply_tx, reply_rx) = oneshot::channel();
        self.submit(peers, leader, node, Forwarded::Write(req, reply_tx))?;
        reply_rx.await.unwrap_or(Err(ServerError::Timeout))
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
        self.submit(peers, leader, node, Forwarded::Renew(lease, reply_tx))?;
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
    let mut next_id: u64 = 0;
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
        next_id += 1;
        let (envelope, waiter) = first.into_parts(next_id);
        waiting.insert(next_id, waiter);
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
                        next_id += 1;
                        let (envelope, waiter) = item.into_parts(next_id);
                        waiting.insert(next_id, waiter);
                        let _ = out_tx.send(envelope);
                    }
                    // Nobody can forward through this pipe any more; answer what is in flight.
                    None if waiting.is_empty() => return,
                    None => {
                        while let Ok(Some(reply)) = replies.message().await {
                            deliver(&mut waiting, reply);
                            if waiting.is_empty() {
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
        for _ in 0..3 {
            let (reply_tx, reply_rx) = oneshot::channel();
            tx.send(Forwarded::Write(RaftRequest::default(), reply_tx))
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
            tx.send(Forwarded::Write(RaftRequest::default(), reply_tx))
                .is_err(),
            "the ended pipe takes no more writes"
        );
    }
}
