//! `etcdserverpb.KV`: thin handlers — validate, then one proposal (writes) or a read barrier and
//! a local read (reads).

use std::sync::Arc;

use keel_proto::etcdserverpb::kv_server::Kv;
use keel_proto::etcdserverpb::request_op::Request as RequestOpKind;
use keel_proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, TxnRequest, TxnResponse,
};
use keel_proto::keelpb::RaftResponse;
use keel_proto::keelpb::raft_request::Request as Cmd;
use keel_proto::keelpb::raft_response::Response as Res;
use keel_store::mvcc::apply::txn_read_only;
use tonic::{Request, Response, Status};

use crate::auth::{self, Caller};
use crate::error::ServerError;
use crate::node::KeelNode;
use crate::validate;

pub struct KvService {
    node: Arc<KeelNode>,
}

impl KvService {
    pub fn new(node: Arc<KeelNode>) -> Self {
        Self { node }
    }

    /// Proposes `cmd` on behalf of `caller`; applying it checks the caller's permissions.
    async fn propose(&self, caller: &Caller, cmd: Cmd) -> Result<(Res, i64), Status> {
        let resp: RaftResponse = auth::propose_as(&self.node, caller, cmd).await?;
        let revision = resp.revision;
        let body = resp
            .response
            .ok_or_else(|| ServerError::Internal("empty apply response".into()))?;
        Ok((body, revision))
    }
}

impl KvService {
    /// A Txn without puts or deletes, served as etcd serves it: on this member, after a read
    /// barrier unless every range of both branches is serializable, at one revision, with no
    /// log entry.
    async fn read_txn(&self, caller: &Caller, r: &TxnRequest) -> Result<TxnResponse, Status> {
        let started = std::time::Instant::now();
        if !txn_serializable(r) {
            self.node.read_barrier().await?;
        }
        let info = caller.check_txn_read(&self.node, r).await?;
        let mut resp = self.node.mvcc.read_txn(r).map_err(ServerError::from)?;
        auth::check_unchanged(&self.node, &info)?;
        let revision = resp.header.as_ref().map(|h| h.revision).unwrap_or(0);
        resp.header = Some(self.node.header_at(revision));
        crate::metrics::read_served("read-only txn", started.elapsed());
        Ok(resp)
    }
}

/// etcd's `isTxnSerializable`: every operation of both branches is a serializable range (a
/// nested Txn makes it linearizable).
fn txn_serializable(r: &TxnRequest) -> bool {
    r.success.iter().chain(&r.failure).all(
        |op| matches!(&op.request, Some(RequestOpKind::RequestRange(range)) if range.serializable),
    )
}

fn unexpected() -> Status {
    ServerError::Internal("unexpected apply response".into()).into()
}

/// How long a `physical` compaction request waits for this member's store to finish removing
/// the compacted revisions.
const PHYSICAL_COMPACTION_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

impl KvService {
    /// etcd's `physical`: the request returns once this member has removed the revisions up to
    /// `revision` from its store (compaction is otherwise finished in the background).
    async fn wait_physical_compaction(&self, revision: i64) -> Result<(), ServerError> {
        let mut done = self.node.mvcc.compaction_progress();
        match tokio::time::timeout(PHYSICAL_COMPACTION_WAIT, done.wait_for(|d| *d >= revision))
            .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(ServerError::Stopped),
            Err(_) => Err(ServerError::Timeout),
        }
    }
}

#[tonic::async_trait]
impl Kv for KvService {
    #[tracing::instrument(level = "debug", skip_all)]
    async fn range(&self, req: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let started = std::time::Instant::now();
        let caller = Caller::of(&req);
        let r = req.into_inner();
        validate::check_range(&r)?;
        if !r.serializable {
            self.node.read_barrier().await?;
        }
        let info = caller.check_read(&self.node, &r.key, &r.range_end).await?;
        let mut resp = self.node.mvcc.range(&r).map_err(ServerError::from)?;
        auth::check_unchanged(&self.node, &info)?;
        let revision = resp
            .header
            .as_ref()
            .map(|h| h.revision)
            .filter(|r| *r > 0)
            .unwrap_or_else(|| self.node.mvcc.current_revision());
        resp.header = Some(self.node.header_at(revision));
        crate::metrics::read_served("range", started.elapsed());
        Ok(Response::new(resp))
    }

    type RangeStreamStream = std::pin::Pin<
        Box<
            dyn futures::Stream<
                    Item = Result<keel_proto::etcdserverpb::RangeStreamResponse, Status>,
                > + Send,
        >,
    >;

    async fn range_stream(
        &self,
        _req: Request<RangeRequest>,
    ) -> Result<Response<Self::RangeStreamStream>, Status> {
        Err(ServerError::Unimplemented(
            "keel: RangeStream is not implemented yet; use Range".into(),
        )
        .into())
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let caller = Caller::of(&req);
        let r = req.into_inner();
        validate::check_put(&r)?;
        match self.propose(&caller, Cmd::Put(r)).await? {
            (Res::Put(mut p), rev) => {
                p.header = Some(self.node.header_at(rev));
                Ok(Response::new(p))
            }
            _ => Err(unexpected()),
        }
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn delete_range(
        &self,
        req: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let caller = Caller::of(&req);
        let r = req.into_inner();
        validate::check_delete(&r)?;
        match self.propose(&caller, Cmd::DeleteRange(r)).await? {
            (Res::DeleteRange(mut d), rev) => {
                d.header = Some(self.node.header_at(rev));
                Ok(Response::new(d))
            }
            _ => Err(unexpected()),
        }
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn txn(&self, req: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let caller = Caller::of(&req);
        let r = req.into_inner();
        validate::check_txn(&r, self.node.config.max_txn_ops)?;
        if txn_read_only(&r) {
            return self.read_txn(&caller, &r).await.map(Response::new);
        }
        match self.propose(&caller, Cmd::Txn(r)).await? {
            (Res::Txn(mut t), rev) => {
                t.header = Some(self.node.header_at(rev));
                Ok(Response::new(t))
            }
            _ => Err(unexpected()),
        }
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn compact(
        &self,
        req: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        let caller = Caller::of(&req);
        let r = req.into_inner();
        let (physical, revision) = (r.physical, r.revision);
        match self.propose(&caller, Cmd::Compaction(r)).await? {
            (Res::Compaction(mut c), rev) => {
                if physical {
                    self.wait_physical_compaction(revision).await?;
                }
                c.header = Some(self.node.header_at(rev));
                Ok(Response::new(c))
            }
            _ => Err(unexpected()),
        }
    }
}
