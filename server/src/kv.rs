//! `etcdserverpb.KV`: thin handlers — validate, then one proposal (writes) or a read barrier and
//! a local read (reads).

use std::sync::Arc;

use keel_proto::etcdserverpb::kv_server::Kv;
use keel_proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, TxnRequest, TxnResponse,
};
use keel_proto::keelpb::raft_request::Request as Cmd;
use keel_proto::keelpb::raft_response::Response as Res;
use keel_proto::keelpb::{RaftRequest, RaftResponse};
use tonic::{Request, Response, Status};

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

    async fn propose(&self, cmd: Cmd) -> Result<(Res, i64), Status> {
        let resp: RaftResponse = self
            .node
            .propose(RaftRequest { request: Some(cmd) })
            .await?;
        let revision = resp.revision;
        let body = resp
            .response
            .ok_or_else(|| ServerError::Internal("empty apply response".into()))?;
        Ok((body, revision))
    }
}

fn unexpected() -> Status {
    ServerError::Internal("unexpected apply response".into()).into()
}

#[tonic::async_trait]
impl Kv for KvService {
    #[tracing::instrument(level = "debug", skip_all)]
    async fn range(&self, req: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let r = req.into_inner();
        validate::check_range(&r)?;
        if !r.serializable {
            self.node.read_barrier().await?;
        }
        let mut resp = self.node.mvcc.range(&r).map_err(ServerError::from)?;
        let revision = resp
            .header
            .as_ref()
            .map(|h| h.revision)
            .filter(|r| *r > 0)
            .unwrap_or_else(|| self.node.mvcc.current_revision());
        resp.header = Some(self.node.header_at(revision));
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
        let r = req.into_inner();
        validate::check_put(&r)?;
        match self.propose(Cmd::Put(r)).await? {
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
        let r = req.into_inner();
        validate::check_delete(&r)?;
        match self.propose(Cmd::DeleteRange(r)).await? {
            (Res::DeleteRange(mut d), rev) => {
                d.header = Some(self.node.header_at(rev));
                Ok(Response::new(d))
            }
            _ => Err(unexpected()),
        }
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn txn(&self, req: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let r = req.into_inner();
        validate::check_txn(&r, self.node.config.max_txn_ops)?;
        match self.propose(Cmd::Txn(r)).await? {
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
        let r = req.into_inner();
        match self.propose(Cmd::Compaction(r)).await? {
            (Res::Compaction(mut c), rev) => {
                c.header = Some(self.node.header_at(rev));
                Ok(Response::new(c))
            }
            _ => Err(unexpected()),
        }
    }
}
