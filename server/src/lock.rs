//! `v3lockpb.Lock`, and the recipe machinery it shares with [`crate::election`].
//!
//! etcd serves Lock and Election by running its Go client's `concurrency` recipes (`Mutex`,
//! `Election`) against itself; Keel runs the same steps over its own proposal, linearizable-read
//! and watch paths, so the keys, revisions, headers and errors a client sees are etcd's:
//!
//! - A lock `N` taken with lease `L` is the key `N/<L in hex>`, created (with lease `L` and an
//!   empty value) by one Txn "if create_revision(key) == 0 then put else get", which also reads
//!   the oldest key under `N/`. Waiters queue by create revision: the key with the smallest one
//!   holds the lock. Locking again with the same lease finds the existing key (no new waiter).
//! - A waiter repeatedly finds the newest key under `N/` created before its own and waits,
//!   through an in-process watch ([`crate::watch::InternalWatch`]) started at the read's
//!   revision, for that key's deletion (unlock, lease revoked or expired). Then it checks that
//!   its own key still exists (otherwise `mutex: session is expired`).
//! - A waiter whose caller goes away (the gRPC call is cancelled) deletes its key, as etcd does.
//! - Lease `0` means "a new lease": a 60-second lease is granted and never kept alive.
//! - Errors reach the caller with code `Unknown` ([`ServerError::into_recipe_status`]).
//!
//! The lock is only as good as its lease: a holder that stalls longer than the TTL loses the key
//! while it may still believe it holds the lock. The key's create revision (a Range on the
//! returned key; Campaign returns it as `rev`) grows with every new holder: use it as a fencing
//! token, e.g. in a Txn comparing it before writing.

use std::sync::Arc;

use keel_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use keel_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use keel_proto::etcdserverpb::request_op::Request as Op;
use keel_proto::etcdserverpb::response_op::Response as OpResponse;
use keel_proto::etcdserverpb::{
    Compare, DeleteRangeRequest, DeleteRangeResponse, LeaseGrantRequest, PutRequest, RangeRequest,
    RangeResponse, RequestOp, TxnRequest, TxnResponse,
};
use keel_proto::keelpb::raft_request::Request as Cmd;
use keel_proto::keelpb::raft_response::Response as Res;
use keel_proto::keelpb::{RaftRequest, RaftResponse};
use keel_proto::mvccpb::KeyValue;
use keel_proto::mvccpb::event::EventType;
use keel_proto::v3lockpb::lock_server::Lock;
use keel_proto::v3lockpb::{LockRequest, LockResponse, UnlockRequest, UnlockResponse};
use tonic::{Request, Response, Status};

use crate::error::ServerError;
use crate::lease::Lessor;
use crate::node::KeelNode;
use crate::validate;
use crate::watch::WatchHub;

/// TTL of the lease granted for a request with lease `0` (etcd's default session TTL).
const SESSION_TTL: i64 = 60;

/// What the lock and election services share: the building blocks of etcd's `concurrency`
/// recipes over this member's proposal, read and watch paths.
#[derive(Clone)]
pub(crate) struct Recipes {
    pub(crate) node: Arc<KeelNode>,
    pub(crate) hub: Arc<WatchHub>,
    lessor: Arc<Lessor>,
}

impl Recipes {
    pub(crate) fn new(node: Arc<KeelNode>, hub: Arc<WatchHub>, lessor: Arc<Lessor>) -> Self {
        Self { node, hub, lessor }
    }

    /// etcd's `concurrency.NewSession(WithLease(lease))`: lease `0` grants a fresh lease of
    /// [`SESSION_TTL`] seconds (nobody keeps it alive); any other ID is used as given, whether
    /// or not it exists (a missing lease fails the put that uses it).
    pub(crate) async fn session(&self, lease: i64) -> Result<i64, ServerError> {
        if lease != 0 {
            return Ok(lease);
        }
        let ttl = SESSION_TTL.max(self.lessor.min_ttl());
        for _ in 0..5 {
            let id = (rand::random::<u64>() >> 1).max(1) as i64;
            let grant = Cmd::LeaseGrant(LeaseGrantRequest { ttl, id });
            match self.propose(grant).await {
                Ok(_) => return Ok(id),
                Err(ServerError::LeaseExists) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(ServerError::LeaseExists)
    }

    async fn propose(&self, cmd: Cmd) -> Result<(Res, i64), ServerError> {
        let resp: RaftResponse = self
            .node
            .propose(RaftRequest {
                request: Some(cmd),
                origin: None,
            })
            .await?;
        let body = resp
            .response
            .ok_or_else(|| ServerError::Internal("empty apply response".into()))?;
        Ok((body, resp.revision))
    }

    /// A Txn as a client would send it (validated with etcd's rules); returns the response and
    /// its header revision.
    pub(crate) async fn txn(&self, txn: TxnRequest) -> Result<(TxnResponse, i64), ServerError> {
        validate::check_txn(&txn, self.node.config.max_txn_ops)?;
        match self.propose(Cmd::Txn(txn)).await? {
            (Res::Txn(t), rev) => Ok((t, rev)),
            _ => Err(unexpected()),
        }
    }

    /// A DeleteRange of one key.
    pub(crate) async fn delete(
        &self,
        key: Vec<u8>,
    ) -> Result<(DeleteRangeResponse, i64), ServerError> {
        let del = DeleteRangeRequest {
            key,
            ..Default::default()
        };
        validate::check_delete(&del)?;
        match self.propose(Cmd::DeleteRange(del)).await? {
            (Res::DeleteRange(d), rev) => Ok((d, rev)),
            _ => Err(unexpected()),
        }
    }

    /// A linearizable Range; returns the response and its header revision.
    pub(crate) async fn range(
        &self,
        r: &RangeRequest,
    ) -> Result<(RangeResponse, i64), ServerError> {
        validate::check_range(r)?;
        self.node.read_barrier().await?;
        let resp = self.node.mvcc.range(r)?;
        let revision = resp
            .header
            .as_ref()
            .map(|h| h.revision)
            .filter(|r| *r > 0)
            .unwrap_or_else(|| self.node.mvcc.current_revision());
        Ok((resp, revision))
    }

    /// etcd's `waitDeletes`: returns once no key under `prefix` has a create revision at or
    /// below `max_create_rev`, waiting each time for the newest such key to be deleted.
    pub(crate) async fn wait_deletes(
        &self,
        prefix: &[u8],
        max_create_rev: i64,
    ) -> Result<(), ServerError> {
        let mut newest = by_create_revision(prefix, SortOrder::Descend);
        newest.max_create_revision = max_create_rev;
        loop {
            let (resp, rev) = self.range(&newest).await?;
            let Some(last) = resp.kvs.first() else {
                return Ok(());
            };
            self.wait_delete(&last.key, rev).await?;
        }
    }

    /// etcd's `waitDelete`: waits for a DELETE event of `key` at or after `rev`.
    async fn wait_delete(&self, key: &[u8], rev: i64) -> Result<(), ServerError> {
        let mut watch = self.hub.watch_internal(key, b"", rev);
        while let Some(resp) = watch.next().await {
            if resp.canceled {
                return Err(if resp.compact_revision != 0 {
                    ServerError::Compacted
                } else {
                    ServerError::LostWatcher
                });
            }
            if resp
                .events
                .iter()
                .any(|e| e.r#type == EventType::Delete as i32)
            {
                return Ok(());
            }
        }
        Err(ServerError::LostWatcher)
    }

    /// A guard that proposes `cleanup` if it is dropped while still armed.
    pub(crate) fn cleanup_on_drop(&self, cleanup: Cmd) -> CleanupOnDrop {
        CleanupOnDrop {
            node: self.node.clone(),
            cleanup: Some(cleanup),
        }
    }

    /// Disarms `guard` and proposes its cleanup now (its outcome does not matter to the caller,
    /// as in etcd, which ignores the error of this cleanup).
    pub(crate) async fn clean_up_now(&self, mut guard: CleanupOnDrop) {
        if let Some(cmd) = guard.cleanup.take()
            && let Err(e) = self.propose(cmd).await
        {
            tracing::warn!(error = %e, "lock/election cleanup failed");
        }
    }

    /// etcd's `Mutex.Lock`, with the key and header of the acquisition.
    async fn lock(&self, name: &[u8], lease: i64) -> Result<LockResponse, ServerError> {
        let lease = self.session(lease).await?;
        let prefix = prefix_of(name);
        let key = lease_key(&prefix, lease);
        let txn = TxnRequest {
            compare: vec![create_revision_is(&key, 0)],
            success: vec![
                put_op(&key, Vec::new(), lease),
                range_op(by_create_revision(&prefix, SortOrder::Ascend)),
            ],
            failure: vec![
                range_op(single(&key)),
                range_op(by_create_revision(&prefix, SortOrder::Ascend)),
            ],
        };
        let (resp, rev) = self.txn(txn).await?;
        let my_rev = if resp.succeeded {
            rev
        } else {
            range_kvs(&resp, 0)?
                .first()
                .map(|kv| kv.create_revision)
                .ok_or_else(unexpected)?
        };
        let owner = range_kvs(&resp, 1)?;
        if owner.first().is_none_or(|kv| kv.create_revision == my_rev) {
            return Ok(LockResponse {
                header: Some(self.node.header_at(rev)),
                key,
            });
        }
        tracing::debug!(rev = my_rev, "waiting for the lock");
        let guard = self.cleanup_on_drop(delete_cmd(&key));
        if let Err(e) = self.wait_deletes(&prefix, my_rev - 1).await {
            self.clean_up_now(guard).await;
            return Err(e);
        }
        // The session may have expired while waiting: the key must still be there.
        let (got, rev) = match self.range(&single(&key)).await {
            Ok(r) => r,
            Err(e) => {
                self.clean_up_now(guard).await;
                return Err(e);
            }
        };
        guard.disarm();
        if got.kvs.is_empty() {
            return Err(ServerError::SessionExpired);
        }
        Ok(LockResponse {
            header: Some(self.node.header_at(rev)),
            key,
        })
    }
}

/// Proposes a cleanup (delete the waiter's key, or resign) when dropped while armed. tonic
/// drops a handler's future when its caller cancels or disconnects; etcd then removes the
/// waiter, and so does this.
pub(crate) struct CleanupOnDrop {
    node: Arc<KeelNode>,
    cleanup: Option<Cmd>,
}

impl CleanupOnDrop {
    /// The wait is over: nothing to clean up.
    pub(crate) fn disarm(mut self) {
        self.cleanup = None;
    }
}

impl Drop for CleanupOnDrop {
    fn drop(&mut self) {
        let Some(cmd) = self.cleanup.take() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let node = self.node.clone();
        rt.spawn(async move {
            tracing::debug!("caller went away while waiting; removing its key");
            if let Err(e) = node
                .propose(RaftRequest {
                    request: Some(cmd),
                    origin: None,
                })
                .await
            {
                tracing::warn!(error = %e, "lock/election cleanup failed");
            }
        });
    }
}

fn unexpected() -> ServerError {
    ServerError::Internal("unexpected apply response".into())
}

/// `name + "/"`: the prefix under which a lock's or an election's keys live.
pub(crate) fn prefix_of(name: &[u8]) -> Vec<u8> {
    let mut p = name.to_vec();
    p.push(b'/');
    p
}

/// `prefix` followed by the lease ID as Go's `%x` prints an int64.
pub(crate) fn lease_key(prefix: &[u8], lease: i64) -> Vec<u8> {
    let hex = if lease < 0 {
        format!("-{:x}", lease.unsigned_abs())
    } else {
        format!("{lease:x}")
    };
    let mut k = prefix.to_vec();
    k.extend_from_slice(hex.as_bytes());
    k
}

/// The end of the range of keys starting with `prefix` (etcd's `GetPrefixRangeEnd`).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// A Range of one key.
pub(crate) fn single(key: &[u8]) -> RangeRequest {
    RangeRequest {
        key: key.to_vec(),
        ..Default::default()
    }
}

/// The key under `prefix` with the smallest (`Ascend`, clientv3's `WithFirstCreate`) or
/// largest (`Descend`, `WithLastCreate`) create revision.
pub(crate) fn by_create_revision(prefix: &[u8], order: SortOrder) -> RangeRequest {
    RangeRequest {
        key: prefix.to_vec(),
        range_end: prefix_end(prefix),
        limit: 1,
        sort_order: order as i32,
        sort_target: SortTarget::Create as i32,
        ..Default::default()
    }
}

pub(crate) fn create_revision_is(key: &[u8], rev: i64) -> Compare {
    Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Create as i32,
        key: key.to_vec(),
        target_union: Some(TargetUnion::CreateRevision(rev)),
        ..Default::default()
    }
}

pub(crate) fn put_op(key: &[u8], value: Vec<u8>, lease: i64) -> RequestOp {
    RequestOp {
        request: Some(Op::RequestPut(PutRequest {
            key: key.to_vec(),
            value,
            lease,
            ..Default::default()
        })),
    }
}

pub(crate) fn range_op(r: RangeRequest) -> RequestOp {
    RequestOp {
        request: Some(Op::RequestRange(r)),
    }
}

pub(crate) fn delete_op(key: &[u8]) -> RequestOp {
    RequestOp {
        request: Some(Op::RequestDeleteRange(DeleteRangeRequest {
            key: key.to_vec(),
            ..Default::default()
        })),
    }
}

fn delete_cmd(key: &[u8]) -> Cmd {
    Cmd::DeleteRange(DeleteRangeRequest {
        key: key.to_vec(),
        ..Default::default()
    })
}

/// The kvs of the `i`-th response of a Txn, which must be a range.
pub(crate) fn range_kvs(resp: &TxnResponse, i: usize) -> Result<&[KeyValue], ServerError> {
    match resp.responses.get(i).and_then(|r| r.response.as_ref()) {
        Some(OpResponse::ResponseRange(r)) => Ok(&r.kvs),
        _ => Err(unexpected()),
    }
}

/// `v3lockpb.Lock`.
pub struct LockService {
    recipes: Recipes,
}

impl LockService {
    pub fn new(node: Arc<KeelNode>, hub: Arc<WatchHub>, lessor: Arc<Lessor>) -> Self {
        Self {
            recipes: Recipes::new(node, hub, lessor),
        }
    }
}

#[tonic::async_trait]
impl Lock for LockService {
    #[tracing::instrument(level = "debug", skip_all, fields(name = %String::from_utf8_lossy(&req.get_ref().name), lease = req.get_ref().lease))]
    async fn lock(&self, req: Request<LockRequest>) -> Result<Response<LockResponse>, Status> {
        let r = req.into_inner();
        self.recipes
            .lock(&r.name, r.lease)
            .await
            .map(Response::new)
            .map_err(ServerError::into_recipe_status)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(key = %String::from_utf8_lossy(&req.get_ref().key)))]
    async fn unlock(
        &self,
        req: Request<UnlockRequest>,
    ) -> Result<Response<UnlockResponse>, Status> {
        let r = req.into_inner();
        let (_, rev) = self
            .recipes
            .delete(r.key)
            .await
            .map_err(ServerError::into_recipe_status)?;
        Ok(Response::new(UnlockResponse {
            header: Some(self.recipes.node.header_at(rev)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_named_like_etcd() {
        assert_eq!(
            lease_key(b"mylock/", 0x694d_81a2_3c7b_0a05),
            b"mylock/694d81a23c7b0a05"
        );
        assert_eq!(lease_key(b"/", 7), b"/7");
        // Go's %x of a negative int64.
        assert_eq!(lease_key(b"n/", -1), b"n/-1");
        assert_eq!(lease_key(b"n/", i64::MIN), b"n/-8000000000000000");
        assert_eq!(prefix_of(b"lk"), b"lk/");
    }

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"a/"), b"a0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
    }
}
