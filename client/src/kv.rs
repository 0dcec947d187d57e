//! Key-value requests: builders for get / put / delete / txn that you `.await`.
//!
//! ```no_run
//! # async fn f(client: keel_client::Client) -> keel_client::Result<()> {
//! use keel_client::{Compare, Op};
//! client.put("config/a", "1").await?;
//! let all = client.get("config/").prefix().await?;
//! let kv = client.get("config/a").await?.into_first().expect("just put");
//! // Compare-and-swap on the mod revision:
//! let r = client
//!     .txn()
//!     .when([Compare::mod_revision("config/a").eq(kv.mod_revision)])
//!     .and_then([Op::put("config/a", "2")])
//!     .await?;
//! assert!(r.succeeded);
//! # Ok(()) }
//! ```

use std::future::{Future, IntoFuture};
use std::pin::Pin;

use keel_proto::etcdserverpb::{
    self as pb, compare::CompareResult, compare::CompareTarget, compare::TargetUnion,
    kv_client::KvClient, range_request, request_op, response_op,
};
use keel_proto::mvccpb;
use serde::Serialize;

use crate::client::{Client, Kind, MAX_MESSAGE};
use crate::error::Result;

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The end of the range of every key starting with `prefix` (etcd's `GetPrefixRangeEnd`); for
/// the empty prefix, `\0` (every key).
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

/// A key and its value at some revision.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct KeyValue {
    /// The key.
    #[serde(serialize_with = "ser_bytes")]
    pub key: Vec<u8>,
    /// The value.
    #[serde(serialize_with = "ser_bytes")]
    pub value: Vec<u8>,
    /// Revision of the key's creation (0: the key does not exist).
    pub create_revision: i64,
    /// Revision of the last change.
    pub mod_revision: i64,
    /// Number of changes since creation (1 after the first put).
    pub version: i64,
    /// The lease the key is attached to (0: none).
    pub lease: i64,
}

pub(crate) fn ser_bytes<S: serde::Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&String::from_utf8_lossy(b))
}

impl KeyValue {
    /// The key as UTF-8 (lossy).
    pub fn key_str(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.key)
    }
    /// The value as UTF-8 (lossy).
    pub fn value_str(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.value)
    }
}

impl From<mvccpb::KeyValue> for KeyValue {
    fn from(kv: mvccpb::KeyValue) -> Self {
        KeyValue {
            key: kv.key,
            value: kv.value,
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            version: kv.version,
            lease: kv.lease,
        }
    }
}

/// Response header: which member answered and the store's revision then.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Header {
    /// The cluster's ID.
    pub cluster_id: u64,
    /// The answering member's ID.
    pub member_id: u64,
    /// The store's revision when the request was served.
    pub revision: i64,
    /// The Raft term.
    pub raft_term: u64,
}

impl From<Option<pb::ResponseHeader>> for Header {
    fn from(h: Option<pb::ResponseHeader>) -> Self {
        let h = h.unwrap_or_default();
        Header {
            cluster_id: h.cluster_id,
            member_id: h.member_id,
            revision: h.revision,
            raft_term: h.raft_term,
        }
    }
}

/// The answer to a get.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GetResponse {
    /// Header; `header.revision` is the revision the read was served at.
    pub header: Header,
    /// The keys found (none with `count_only`).
    pub kvs: Vec<KeyValue>,
    /// More keys matched than `limit` allowed.
    pub more: bool,
    /// How many keys matched in total.
    pub count: i64,
}

impl GetResponse {
    /// The first key found.
    pub fn first(&self) -> Option<&KeyValue> {
        self.kvs.first()
    }
    /// The first key found, by value.
    pub fn into_first(self) -> Option<KeyValue> {
        self.kvs.into_iter().next()
    }
}

impl From<pb::RangeResponse> for GetResponse {
    fn from(r: pb::RangeResponse) -> Self {
        GetResponse {
            header: r.header.into(),
            kvs: r.kvs.into_iter().map(Into::into).collect(),
            more: r.more,
            count: r.count,
        }
    }
}

/// The answer to a put.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PutResponse {
    /// Header; `header.revision` is the revision the put created.
    pub header: Header,
    /// The previous key-value, with `prev_kv()`.
    pub prev_kv: Option<KeyValue>,
}

impl From<pb::PutResponse> for PutResponse {
    fn from(r: pb::PutResponse) -> Self {
        PutResponse {
            header: r.header.into(),
            prev_kv: r.prev_kv.map(Into::into),
        }
    }
}

/// The answer to a delete.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DeleteResponse {
    /// Header.
    pub header: Header,
    /// How many keys were deleted.
    pub deleted: i64,
    /// The deleted key-values, with `prev_kv()`.
    pub prev_kvs: Vec<KeyValue>,
}

impl From<pb::DeleteRangeResponse> for DeleteResponse {
    fn from(r: pb::DeleteRangeResponse) -> Self {
        DeleteResponse {
            header: r.header.into(),
            deleted: r.deleted,
            prev_kvs: r.prev_kvs.into_iter().map(Into::into).collect(),
        }
    }
}

/// Sort order of a get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortOrder {
    /// Ascending.
    Ascend,
    /// Descending.
    Descend,
}

/// Sort key of a get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortTarget {
    /// By key.
    Key,
    /// By version.
    Version,
    /// By create revision.
    Create,
    /// By mod revision.
    Mod,
    /// By value.
    Value,
}

/// etcd's convention for "every key": the empty prefix is sent as key `\0`, range end `\0`.
pub(crate) fn prefix_key(key: Vec<u8>) -> Vec<u8> {
    if key.is_empty() { vec![0] } else { key }
}

fn range_end_for(key: &[u8], prefix: bool, from_key: bool, range_end: Option<Vec<u8>>) -> Vec<u8> {
    if let Some(end) = range_end {
        end
    } else if prefix {
        prefix_end(key)
    } else if from_key {
        vec![0]
    } else {
        Vec::new()
    }
}

/// A get being built; `.await` sends it. Made by [`Client::get`].
#[must_use = "a request does nothing until awaited"]
pub struct Get {
    client: Client,
    req: pb::RangeRequest,
    prefix: bool,
    from_key: bool,
    range_end: Option<Vec<u8>>,
}

impl Get {
    /// Every key starting with the key.
    pub fn prefix(mut self) -> Self {
        self.prefix = true;
        self
    }
    /// Keys in `[key, end)`.
    pub fn range_end(mut self, end: impl Into<Vec<u8>>) -> Self {
        self.range_end = Some(end.into());
        self
    }
    /// Every key `>= key`.
    pub fn from_key(mut self) -> Self {
        self.from_key = true;
        self
    }
    /// Read at this revision (0: latest).
    pub fn revision(mut self, rev: i64) -> Self {
        self.req.revision = rev;
        self
    }
    /// At most `n` keys (0: no limit); `more` says whether there were more.
    pub fn limit(mut self, n: i64) -> Self {
        self.req.limit = n;
        self
    }
    /// Keys without values.
    pub fn keys_only(mut self) -> Self {
        self.req.keys_only = true;
        self
    }
    /// Only the count.
    pub fn count_only(mut self) -> Self {
        self.req.count_only = true;
        self
    }
    /// Serve from the answering member's state without a quorum round (may be stale).
    pub fn serializable(mut self) -> Self {
        self.req.serializable = true;
        self
    }
    /// Sort the result.
    pub fn sort(mut self, target: SortTarget, order: SortOrder) -> Self {
        self.req.sort_target = match target {
            SortTarget::Key => range_request::SortTarget::Key,
            SortTarget::Version => range_request::SortTarget::Version,
            SortTarget::Create => range_request::SortTarget::Create,
            SortTarget::Mod => range_request::SortTarget::Mod,
            SortTarget::Value => range_request::SortTarget::Value,
        } as i32;
        self.req.sort_order = match order {
            SortOrder::Ascend => range_request::SortOrder::Ascend,
            SortOrder::Descend => range_request::SortOrder::Descend,
        } as i32;
        self
    }
    /// Only keys whose mod revision is `>= rev`.
    pub fn min_mod_revision(mut self, rev: i64) -> Self {
        self.req.min_mod_revision = rev;
        self
    }
    /// Only keys whose mod revision is `<= rev`.
    pub fn max_mod_revision(mut self, rev: i64) -> Self {
        self.req.max_mod_revision = rev;
        self
    }

    fn build(mut self) -> (Client, pb::RangeRequest) {
        self.req.range_end =
            range_end_for(&self.req.key, self.prefix, self.from_key, self.range_end);
        if self.prefix {
            self.req.key = prefix_key(std::mem::take(&mut self.req.key));
        }
        (self.client, self.req)
    }

    /// As a transaction operation.
    pub fn into_op(self) -> Op {
        let (_, req) = self.build();
        Op(request_op::Request::RequestRange(req))
    }
}

impl IntoFuture for Get {
    type Output = Result<GetResponse>;
    type IntoFuture = BoxFuture<'static, Result<GetResponse>>;
    fn into_future(self) -> Self::IntoFuture {
        let (client, req) = self.build();
        Box::pin(async move {
            let c = client.clone();
            let r = client
                .call(Kind::Read, move |ch| {
                    let req = c.request(req.clone(), true);
                    async move { kv(ch).range(req).await }
                })
                .await?;
            Ok(r.into())
        })
    }
}

/// A put being built; `.await` sends it. Made by [`Client::put`].
#[must_use = "a request does nothing until awaited"]
pub struct Put {
    client: Client,
    req: pb::PutRequest,
}

impl Put {
    /// Attach the key to a lease (it is deleted when the lease ends).
    pub fn lease(mut self, id: i64) -> Self {
        self.req.lease = id;
        self
    }
    /// Return the previous key-value.
    pub fn prev_kv(mut self) -> Self {
        self.req.prev_kv = true;
        self
    }
    /// Keep the current value (update the lease only).
    pub fn ignore_value(mut self) -> Self {
        self.req.ignore_value = true;
        self
    }
    /// Keep the current lease.
    pub fn ignore_lease(mut self) -> Self {
        self.req.ignore_lease = true;
        self
    }
    /// As a transaction operation.
    pub fn into_op(self) -> Op {
        Op(request_op::Request::RequestPut(self.req))
    }
}

impl IntoFuture for Put {
    type Output = Result<PutResponse>;
    type IntoFuture = BoxFuture<'static, Result<PutResponse>>;
    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let c = self.client.clone();
            let req = self.req;
            let r = self
                .client
                .call(Kind::Write, move |ch| {
                    let req = c.request(req.clone(), true);
                    async move { kv(ch).put(req).await }
                })
                .await?;
            Ok(r.into())
        })
    }
}

/// A delete being built; `.await` sends it. Made by [`Client::delete`].
#[must_use = "a request does nothing until awaited"]
pub struct Delete {
    client: Client,
    req: pb::DeleteRangeRequest,
    prefix: bool,
    from_key: bool,
    range_end: Option<Vec<u8>>,
}

impl Delete {
    /// Every key starting with the key.
    pub fn prefix(mut self) -> Self {
        self.prefix = true;
        self
    }
    /// Keys in `[key, end)`.
    pub fn range_end(mut self, end: impl Into<Vec<u8>>) -> Self {
        self.range_end = Some(end.into());
        self
    }
    /// Every key `>= key`.
    pub fn from_key(mut self) -> Self {
        self.from_key = true;
        self
    }
    /// Return the deleted key-values.
    pub fn prev_kv(mut self) -> Self {
        self.req.prev_kv = true;
        self
    }
    fn build(mut self) -> (Client, pb::DeleteRangeRequest) {
        self.req.range_end =
            range_end_for(&self.req.key, self.prefix, self.from_key, self.range_end);
        if self.prefix {
            self.req.key = prefix_key(std::mem::take(&mut self.req.key));
        }
        (self.client, self.req)
    }
    /// As a transaction operation.
    pub fn into_op(self) -> Op {
        let (_, req) = self.build();
        Op(request_op::Request::RequestDeleteRange(req))
    }
}

impl IntoFuture for Delete {
    type Output = Result<DeleteResponse>;
    type IntoFuture = BoxFuture<'static, Result<DeleteResponse>>;
    fn into_future(self) -> Self::IntoFuture {
        let (client, req) = self.build();
        Box::pin(async move {
            let c = client.clone();
            let r = client
                .call(Kind::Write, move |ch| {
                    let req = c.request(req.clone(), true);
                    async move { kv(ch).delete_range(req).await }
                })
                .await?;
            Ok(r.into())
        })
    }
}

pub(crate) fn kv(ch: tonic::transport::Channel) -> KvClient<tonic::transport::Channel> {
    KvClient::new(ch).max_decoding_message_size(MAX_MESSAGE)
}

/// One condition of a transaction: `Compare::<target>(key).<eq|ne|gt|lt>(x)`.
///
/// ```
/// use keel_client::Compare;
/// let absent = Compare::version("k").eq(0);          // the key does not exist
/// let unchanged = Compare::mod_revision("k").eq(42); // nobody wrote it since revision 42
/// let v = Compare::value("k").ne("x");
/// let leased = Compare::lease("k").eq(0x1234);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Compare(pub(crate) pb::Compare);

/// The left side of a [`Compare`]; pick the operator next.
#[must_use]
pub struct CompareTo<T> {
    key: Vec<u8>,
    range_end: Vec<u8>,
    target: CompareTarget,
    make: fn(T) -> TargetUnion,
}

impl<T> CompareTo<T> {
    /// Compare every key with this prefix (all must satisfy the condition).
    pub fn prefix(mut self) -> Self {
        self.range_end = prefix_end(&self.key);
        self.key = prefix_key(std::mem::take(&mut self.key));
        self
    }
    fn finish(self, result: CompareResult, x: T) -> Compare {
        Compare(pb::Compare {
            result: result as i32,
            target: self.target as i32,
            key: self.key,
            range_end: self.range_end,
            target_union: Some((self.make)(x)),
        })
    }
    /// `==`
    pub fn eq(self, x: impl Into<T>) -> Compare {
        self.finish(CompareResult::Equal, x.into())
    }
    /// `!=`
    pub fn ne(self, x: impl Into<T>) -> Compare {
        self.finish(CompareResult::NotEqual, x.into())
    }
    /// `>`
    pub fn gt(self, x: impl Into<T>) -> Compare {
        self.finish(CompareResult::Greater, x.into())
    }
    /// `<`
    pub fn lt(self, x: impl Into<T>) -> Compare {
        self.finish(CompareResult::Less, x.into())
    }
}

impl Compare {
    fn to<T>(
        key: impl Into<Vec<u8>>,
        target: CompareTarget,
        make: fn(T) -> TargetUnion,
    ) -> CompareTo<T> {
        CompareTo {
            key: key.into(),
            range_end: Vec::new(),
            target,
            make,
        }
    }
    /// The key's version (0: absent).
    pub fn version(key: impl Into<Vec<u8>>) -> CompareTo<i64> {
        Self::to(key, CompareTarget::Version, TargetUnion::Version)
    }
    /// The key's create revision (0: absent).
    pub fn create_revision(key: impl Into<Vec<u8>>) -> CompareTo<i64> {
        Self::to(key, CompareTarget::Create, TargetUnion::CreateRevision)
    }
    /// The key's mod revision (0: absent).
    pub fn mod_revision(key: impl Into<Vec<u8>>) -> CompareTo<i64> {
        Self::to(key, CompareTarget::Mod, TargetUnion::ModRevision)
    }
    /// The key's value.
    pub fn value(key: impl Into<Vec<u8>>) -> CompareTo<Vec<u8>> {
        Self::to(key, CompareTarget::Value, TargetUnion::Value)
    }
    /// The key's lease.
    pub fn lease(key: impl Into<Vec<u8>>) -> CompareTo<i64> {
        Self::to(key, CompareTarget::Lease, TargetUnion::Lease)
    }
    /// The key exists.
    pub fn exists(key: impl Into<Vec<u8>>) -> Compare {
        Self::version(key).gt(0)
    }
    /// The key does not exist.
    pub fn absent(key: impl Into<Vec<u8>>) -> Compare {
        Self::version(key).eq(0)
    }
}

/// One operation of a transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct Op(pub(crate) request_op::Request);

impl Op {
    /// Put a key.
    pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Op {
        Op(request_op::Request::RequestPut(pb::PutRequest {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        }))
    }
    /// Put a key attached to a lease.
    pub fn put_with_lease(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>, lease: i64) -> Op {
        Op(request_op::Request::RequestPut(pb::PutRequest {
            key: key.into(),
            value: value.into(),
            lease,
            ..Default::default()
        }))
    }
    /// Read a key.
    pub fn get(key: impl Into<Vec<u8>>) -> Op {
        Op(request_op::Request::RequestRange(pb::RangeRequest {
            key: key.into(),
            ..Default::default()
        }))
    }
    /// Read every key with a prefix.
    pub fn get_prefix(prefix: impl Into<Vec<u8>>) -> Op {
        let key = prefix.into();
        Op(request_op::Request::RequestRange(pb::RangeRequest {
            range_end: prefix_end(&key),
            key: prefix_key(key),
            ..Default::default()
        }))
    }
    /// Delete a key.
    pub fn delete(key: impl Into<Vec<u8>>) -> Op {
        Op(request_op::Request::RequestDeleteRange(
            pb::DeleteRangeRequest {
                key: key.into(),
                ..Default::default()
            },
        ))
    }
    /// Delete every key with a prefix.
    pub fn delete_prefix(prefix: impl Into<Vec<u8>>) -> Op {
        let key = prefix.into();
        Op(request_op::Request::RequestDeleteRange(
            pb::DeleteRangeRequest {
                range_end: prefix_end(&key),
                key: prefix_key(key),
                ..Default::default()
            },
        ))
    }
    /// A nested transaction.
    pub fn txn(
        compare: impl IntoIterator<Item = Compare>,
        success: impl IntoIterator<Item = Op>,
        failure: impl IntoIterator<Item = Op>,
    ) -> Op {
        Op(request_op::Request::RequestTxn(txn_request(
            compare, success, failure,
        )))
    }

    fn is_read_only(&self) -> bool {
        match &self.0 {
            request_op::Request::RequestRange(_) => true,
            request_op::Request::RequestTxn(t) => txn_is_read_only(t),
            _ => false,
        }
    }
}

fn txn_request(
    compare: impl IntoIterator<Item = Compare>,
    success: impl IntoIterator<Item = Op>,
    failure: impl IntoIterator<Item = Op>,
) -> pb::TxnRequest {
    let ops = |o: Op| pb::RequestOp { request: Some(o.0) };
    pb::TxnRequest {
        compare: compare.into_iter().map(|c| c.0).collect(),
        success: success.into_iter().map(ops).collect(),
        failure: failure.into_iter().map(ops).collect(),
    }
}

fn txn_is_read_only(t: &pb::TxnRequest) -> bool {
    t.success
        .iter()
        .chain(&t.failure)
        .all(|o| match &o.request {
            Some(r) => Op(r.clone()).is_read_only(),
            None => true,
        })
}

/// The answer to one transaction operation.
#[derive(Debug, Clone, Serialize)]
pub enum OpResponse {
    /// A get's.
    Get(GetResponse),
    /// A put's.
    Put(PutResponse),
    /// A delete's.
    Delete(DeleteResponse),
    /// A nested transaction's.
    Txn(TxnResponse),
}

impl OpResponse {
    /// The get response, if this was a get.
    pub fn as_get(&self) -> Option<&GetResponse> {
        match self {
            OpResponse::Get(g) => Some(g),
            _ => None,
        }
    }
}

/// The answer to a transaction.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TxnResponse {
    /// Header; `header.revision` is the revision after the transaction.
    pub header: Header,
    /// True when every comparison held (the `and_then` branch ran).
    pub succeeded: bool,
    /// One response per operation of the branch that ran.
    pub responses: Vec<OpResponse>,
}

impl From<pb::TxnResponse> for TxnResponse {
    fn from(r: pb::TxnResponse) -> Self {
        TxnResponse {
            header: r.header.into(),
            succeeded: r.succeeded,
            responses: r
                .responses
                .into_iter()
                .filter_map(|o| {
                    Some(match o.response? {
                        response_op::Response::ResponseRange(g) => OpResponse::Get(g.into()),
                        response_op::Response::ResponsePut(p) => OpResponse::Put(p.into()),
                        response_op::Response::ResponseDeleteRange(d) => {
                            OpResponse::Delete(d.into())
                        }
                        response_op::Response::ResponseTxn(t) => OpResponse::Txn(t.into()),
                    })
                })
                .collect(),
        }
    }
}

/// A transaction being built; `.await` sends it. Made by [`Client::txn`].
///
/// A transaction with only reads is retried like a read; one with a write is never retried
/// once sent (see [`crate::Error::Ambiguous`]).
#[must_use = "a request does nothing until awaited"]
pub struct Txn {
    client: Client,
    compare: Vec<Compare>,
    success: Vec<Op>,
    failure: Vec<Op>,
}

impl Txn {
    /// Conditions (all must hold).
    pub fn when(mut self, c: impl IntoIterator<Item = Compare>) -> Self {
        self.compare.extend(c);
        self
    }
    /// Operations when every condition holds.
    pub fn and_then(mut self, ops: impl IntoIterator<Item = Op>) -> Self {
        self.success.extend(ops);
        self
    }
    /// Operations otherwise.
    pub fn or_else(mut self, ops: impl IntoIterator<Item = Op>) -> Self {
        self.failure.extend(ops);
        self
    }
}

impl IntoFuture for Txn {
    type Output = Result<TxnResponse>;
    type IntoFuture = BoxFuture<'static, Result<TxnResponse>>;
    fn into_future(self) -> Self::IntoFuture {
        let req = txn_request(self.compare, self.success, self.failure);
        let kind = if txn_is_read_only(&req) {
            Kind::Read
        } else {
            Kind::Write
        };
        let client = self.client;
        Box::pin(async move {
            let c = client.clone();
            let r = client
                .call(kind, move |ch| {
                    let req = c.request(req.clone(), true);
                    async move { kv(ch).txn(req).await }
                })
                .await?;
            Ok(r.into())
        })
    }
}

impl Client {
    /// Reads a key (add `.prefix()`, `.revision(r)`, `.limit(n)`, ... before `.await`).
    /// Linearizable unless `.serializable()`. Retried on transient failures.
    pub fn get(&self, key: impl Into<Vec<u8>>) -> Get {
        Get {
            client: self.clone(),
            req: pb::RangeRequest {
                key: key.into(),
                ..Default::default()
            },
            prefix: false,
            from_key: false,
            range_end: None,
        }
    }

    /// Writes a key (add `.lease(id)`, `.prev_kv()` before `.await`). Not retried once sent.
    pub fn put(&self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Put {
        Put {
            client: self.clone(),
            req: pb::PutRequest {
                key: key.into(),
                value: value.into(),
                ..Default::default()
            },
        }
    }

    /// Deletes a key (add `.prefix()`, `.prev_kv()` before `.await`). Not retried once sent.
    pub fn delete(&self, key: impl Into<Vec<u8>>) -> Delete {
        Delete {
            client: self.clone(),
            req: pb::DeleteRangeRequest {
                key: key.into(),
                ..Default::default()
            },
            prefix: false,
            from_key: false,
            range_end: None,
        }
    }

    /// Starts a transaction: `.when([...]).and_then([...]).or_else([...]).await`.
    pub fn txn(&self) -> Txn {
        Txn {
            client: self.clone(),
            compare: Vec::new(),
            success: Vec::new(),
            failure: Vec::new(),
        }
    }

    /// Compacts the history up to `revision` (older revisions become unreadable; watches from
    /// before it are cancelled with [`crate::WatchEvent::Compacted`]).
    pub async fn compact(&self, revision: i64, physical: bool) -> Result<Header> {
        let c = self.clone();
        let r = self
            .call(Kind::Write, move |ch| {
                let req = c.request(pb::CompactionRequest { revision, physical }, true);
                async move { kv(ch).compact(req).await }
            })
            .await?;
        Ok(r.header.into())
    }

    /// Reads every key under `prefix` at one revision, `page_size` keys per request (0: all at
    /// once). Returns the keys and that revision: watch from `revision + 1` to follow changes.
    pub async fn list_prefix(
        &self,
        prefix: impl Into<Vec<u8>>,
        page_size: i64,
    ) -> Result<(Vec<KeyValue>, i64)> {
        let prefix = prefix.into();
        let end = prefix_end(&prefix);
        let mut out = Vec::new();
        let mut start = prefix_key(prefix);
        let mut revision = 0;
        loop {
            let r = self
                .get(start.clone())
                .range_end(end.clone())
                .revision(revision)
                .limit(page_size)
                .await?;
            if revision == 0 {
                revision = r.header.revision;
            }
            let more = r.more;
            if let Some(last) = r.kvs.last() {
                start = last.key.clone();
                start.push(0);
            }
            out.extend(r.kvs);
            if !more || page_size == 0 {
                return Ok((out, revision));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"a"), b"b");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
        assert_eq!(prefix_end(b""), b"\0");
        let Op(request_op::Request::RequestRange(r)) = Op::get_prefix("") else {
            panic!()
        };
        assert_eq!((r.key, r.range_end), (vec![0], vec![0]));
    }

    #[test]
    fn compares_build_etcd_messages() {
        let c = Compare::mod_revision("k").eq(5);
        assert_eq!(c.0.target(), CompareTarget::Mod);
        assert_eq!(c.0.result(), CompareResult::Equal);
        assert_eq!(c.0.target_union, Some(TargetUnion::ModRevision(5)));
        let c = Compare::value("k").prefix().ne("v");
        assert_eq!(c.0.range_end, b"l");
        assert_eq!(c.0.target_union, Some(TargetUnion::Value(b"v".to_vec())));
        assert_eq!(
            Compare::absent("k").0.target_union,
            Some(TargetUnion::Version(0))
        );
    }

    #[test]
    fn read_only_txns_are_reads() {
        let t = txn_request(
            [],
            [Op::get("a"), Op::txn([], [Op::get_prefix("b")], [])],
            [],
        );
        assert!(txn_is_read_only(&t));
        let t = txn_request([], [Op::get("a")], [Op::txn([], [], [Op::delete("b")])]);
        assert!(!txn_is_read_only(&t));
    }
}
