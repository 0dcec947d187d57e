//! [`ApplyBatch`]: applying Raft commands with etcd's semantics.
//!
//! A batch stages every change — engine writes, new index entries, lease changes — in an overlay
//! that later commands of the same batch read through, while readers keep seeing only the
//! published state. [`ApplyBatch::commit`] makes one engine write, then publishes the overlay
//! and the new revision. A batch dropped without commit changes nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::MutexGuard;
use std::sync::atomic::Ordering;

use keel_proto::etcdserverpb::request_op::Request as OpReq;
use keel_proto::etcdserverpb::response_op::Response as OpResp;
use keel_proto::etcdserverpb::{
    AlarmMember, AlarmRequest, AlarmResponse, CompactionRequest, CompactionResponse, Compare,
    DeleteRangeRequest, DeleteRangeResponse, LeaseGrantRequest, LeaseGrantResponse,
    LeaseRevokeRequest, LeaseRevokeResponse, PutRequest, PutResponse, RangeRequest, ResponseHeader,
    ResponseOp, TxnRequest, TxnResponse, alarm_request, compare,
};
use keel_proto::etcdserverpb::{
    AuthDisableResponse, AuthEnableResponse, AuthRoleAddResponse, AuthRoleDeleteResponse,
    AuthRoleGrantPermissionResponse, AuthRoleRevokePermissionResponse, AuthUserAddResponse,
    AuthUserChangePasswordResponse, AuthUserDeleteResponse, AuthUserGrantRoleResponse,
    AuthUserRevokeRoleResponse, AuthenticateResponse,
};
use keel_proto::keelpb::raft_request::Request as Cmd;
use keel_proto::keelpb::raft_response::Response as Res;
use keel_proto::keelpb::{
    AuthorizedRequest, Empty, LeaseCheckpointBatch, ProposalBatch, RaftRequest, RaftResponse,
};
use keel_proto::mvccpb::{Event, KeyValue, event::EventType};
use prost::Message;

use super::index::{IndexEntry, visible_at};
use super::revision::Revision;
use super::store::{
    KeySpan, LeaseState, META_ALARMS, META_COMPACT, META_REV, MvccStore, View, decode_kv,
    live_in_index, range_view, revision_to_read,
};
use crate::auth::{Access, AuthInfo, AuthState, TokenOp};
use crate::engine::{Table, WriteBatch};
use crate::error::{ApplyError, ApplyErrorKind, StoreError};

/// etcd's largest lease TTL in seconds.
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;
const ALARM_NOSPACE: i32 = 1;
const ALARM_CORRUPT: i32 = 2;

/// The result of applying one command.
#[derive(Debug, Clone, Default)]
pub struct ApplyOutcome {
    pub response: RaftResponse,
    /// Events in revision order (all of one revision together).
    pub events: Vec<Event>,
}

/// Where the writes of one command go: revision `main`, sub-revisions in order.
struct WriteCtx {
    main: i64,
    sub: i64,
}

impl WriteCtx {
    fn next(&mut self) -> Revision {
        let r = Revision::new(self.main, self.sub);
        self.sub += 1;
        r
    }
    fn changed(&self) -> bool {
        self.sub > 0
    }
}

fn header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        revision,
        ..Default::default()
    })
}

fn lease_key(id: i64) -> Vec<u8> {
    id.to_be_bytes().to_vec()
}

pub struct ApplyBatch<'a> {
    store: &'a MvccStore,
    _exclusive: MutexGuard<'a, ()>,
    wb: WriteBatch,
    rev: i64,
    compacted: i64,
    new_compaction: Option<i64>,
    index: BTreeMap<Vec<u8>, Vec<IndexEntry>>,
    /// Encoded values written by this batch (read back by its later requests).
    kvs: BTreeMap<Revision, std::sync::Arc<[u8]>>,
    /// Encoded values of this batch's puts, in revision order, for the recent-values cache.
    recent: Vec<(Revision, std::sync::Arc<[u8]>)>,
    /// Granted (Some) or revoked (None) in this batch.
    leases: BTreeMap<i64, Option<LeaseState>>,
    /// Key attachments in order: (lease, key, attach?).
    lease_keys: Vec<(i64, Vec<u8>, bool)>,
    alarms: Option<Vec<AlarmMember>>,
    /// The auth state as changed by this batch (a copy of the published one).
    auth: Option<AuthState>,
    /// Token changes, applied on commit.
    token_ops: Vec<TokenOp>,
    events: Vec<Event>,
    failure: Option<StoreError>,
    /// Range, put and delete-range calls of the current MVCC transaction, and the bytes of
    /// the keys and values it put (see [`crate::mvcc::store::OpCounts`]).
    ops: [u64; 4],
}

/// The auth state a command is checked against: this batch's changes, or the published state.
enum AuthView<'a> {
    Overlay(&'a AuthState),
    Published(std::sync::Arc<AuthState>),
}

impl std::ops::Deref for AuthView<'_> {
    type Target = AuthState;
    fn deref(&self) -> &AuthState {
        match self {
            AuthView::Overlay(s) => s,
            AuthView::Published(s) => s,
        }
    }
}

impl View for ApplyBatch<'_> {
    fn live(&self, span: &KeySpan<'_>, at: i64) -> Vec<(Vec<u8>, IndexEntry)> {
        let mut m = BTreeMap::new();
        live_in_index(&self.store.inner.read_index(), span, at, &mut m);
        if let Some(bounds) = span.bounds() {
            for (k, entries) in self.index.range::<[u8], _>(bounds) {
                // Pending entries are newer than every committed one.
                if let Some(last) = entries.iter().rev().find(|e| e.rev.main <= at) {
                    m.insert(k.clone(), (!last.tombstone).then_some(*last));
                }
            }
        }
        m.into_iter()
            .filter_map(|(k, r)| r.map(|r| (k, r)))
            .collect()
    }

    fn load(&self, rev: Revision) -> Result<Option<KeyValue>, StoreError> {
        match self.kvs.get(&rev) {
            Some(bytes) => decode_kv(bytes).map(Some),
            None => self.store.inner.load_kv(rev),
        }
    }
}

impl<'a> ApplyBatch<'a> {
    pub(crate) fn new(store: &'a MvccStore) -> Self {
        let guard = store.apply_lock.lock().unwrap_or_else(|p| p.into_inner());
        ApplyBatch {
            rev: store.current_revision(),
            compacted: store.compact_revision(),
            store,
            _exclusive: guard,
            wb: WriteBatch::new(),
            new_compaction: None,
            index: BTreeMap::new(),
            kvs: BTreeMap::new(),
            recent: Vec::new(),
            leases: BTreeMap::new(),
            lease_keys: Vec::new(),
            alarms: None,
            auth: None,
            token_ops: Vec::new(),
            events: Vec::new(),
            failure: None,
            ops: [0; 4],
        }
    }

    /// Ends the current MVCC transaction for etcd's operation counters.
    fn end_mvcc_txn(&mut self) {
        let [ranges, puts, deletes, put_bytes] = std::mem::take(&mut self.ops);
        self.store.inner.ops.end_txn(ranges, puts, deletes);
        self.store.inner.ops.put_bytes(put_bytes);
    }

    /// The store revision including this batch's writes so far.
    pub fn revision(&self) -> i64 {
        self.rev
    }

    /// Stages a meta-table write in the same atomic batch.
    pub fn put_meta(&mut self, key: &[u8], value: Vec<u8>) {
        self.wb.put(Table::Meta, key.to_vec(), value);
    }

    /// Applies one command; request-level failures are in `response.error`.
    ///
    /// A [`ProposalBatch`] is applied request by request, exactly as if each had been a command
    /// of its own (its own revision, events and response, one failing without touching the
    /// others); its response lists theirs in `batch`.
    pub fn apply(&mut self, req: &RaftRequest) -> ApplyOutcome {
        match &req.request {
            Some(Cmd::Batch(batch)) => self.apply_batch(batch),
            _ => self.apply_one(req),
        }
    }

    fn apply_batch(&mut self, batch: &ProposalBatch) -> ApplyOutcome {
        let mut events = Vec::new();
        let mut responses = Vec::with_capacity(batch.requests.len());
        for req in &batch.requests {
            // A nested batch is refused by `dispatch` like any request it cannot apply.
            let outcome = self.apply_one(req);
            events.extend(outcome.events);
            responses.push(outcome.response);
        }
        ApplyOutcome {
            response: RaftResponse {
                revision: self.rev,
                batch: responses,
                ..Default::default()
            },
            events,
        }
    }

    fn apply_one(&mut self, req: &RaftRequest) -> ApplyOutcome {
        self.events.clear();
        let result = match &req.request {
            Some(cmd) => self.dispatch(cmd),
            None => Err(empty_request()),
        };
        self.end_mvcc_txn();
        let events = std::mem::take(&mut self.events);
        let response = match result {
            Ok(r) => RaftResponse {
                response: Some(r),
                error: None,
                revision: self.rev,
                index: 0, // set by the state machine, which knows the entry
                batch: Vec::new(),
            },
            Err(e) => RaftResponse {
                response: None,
                error: Some(e.to_proto()),
                revision: self.rev,
                index: 0,
                batch: Vec::new(),
            },
        };
        ApplyOutcome { response, events }
    }

    fn dispatch(&mut self, cmd: &Cmd) -> Result<Res, ApplyError> {
        if refused_when_corrupt(cmd) && self.has_alarm(ALARM_CORRUPT) {
            return Err(ApplyError::new(ApplyErrorKind::Corrupt));
        }
        let h = header(self.rev);
        Ok(match cmd {
            Cmd::Put(p) => Res::Put(self.put_cmd(p)?),
            Cmd::DeleteRange(d) => Res::DeleteRange(self.delete_cmd(d)),
            Cmd::Txn(t) => Res::Txn(self.txn_cmd(t)?),
            Cmd::Compaction(c) => Res::Compaction(self.compact_cmd(c)?),
            Cmd::LeaseGrant(g) => Res::LeaseGrant(self.lease_grant(g)?),
            Cmd::LeaseRevoke(r) => Res::LeaseRevoke(self.lease_revoke(r)?),
            Cmd::LeaseCheckpoint(c) => {
                self.lease_checkpoint(c);
                Res::LeaseCheckpoint(Empty {})
            }
            Cmd::Alarm(a) => Res::Alarm(self.alarm(a)),
            Cmd::Authorized(a) => return self.authorized(a),
            Cmd::Batch(_) => {
                return Err(ApplyError {
                    kind: ApplyErrorKind::Other,
                    message: "keel: a proposal batch cannot be nested".into(),
                });
            }
            Cmd::Authenticate(a) => {
                let mut ops = Vec::new();
                self.auth_view()
                    .authenticate(&a.name, &a.simple_token, &mut ops)?;
                self.token_ops.extend(ops);
                Res::Authenticate(AuthenticateResponse {
                    header: h,
                    token: a.simple_token.clone(),
                })
            }
            Cmd::AuthEnable(_) => {
                self.auth_change(|s, wb, _| s.enable(wb))?;
                Res::AuthEnable(AuthEnableResponse { header: h })
            }
            Cmd::AuthDisable(_) => {
                self.auth_change(|s, wb, t| {
                    s.disable(wb, t);
                    Ok(())
                })?;
                Res::AuthDisable(AuthDisableResponse { header: h })
            }
            Cmd::AuthUserAdd(r) => {
                self.auth_change(|s, wb, _| s.user_add(r, wb))?;
                Res::AuthUserAdd(AuthUserAddResponse { header: h })
            }
            Cmd::AuthUserDelete(r) => {
                self.auth_change(|s, wb, t| s.user_delete(r, wb, t))?;
                Res::AuthUserDelete(AuthUserDeleteResponse { header: h })
            }
            Cmd::AuthUserChangePassword(r) => {
                self.auth_change(|s, wb, t| s.user_change_password(r, wb, t))?;
                Res::AuthUserChangePassword(AuthUserChangePasswordResponse { header: h })
            }
            Cmd::AuthUserGrantRole(r) => {
                self.auth_change(|s, wb, _| s.user_grant_role(r, wb))?;
                Res::AuthUserGrantRole(AuthUserGrantRoleResponse { header: h })
            }
            Cmd::AuthUserRevokeRole(r) => {
                self.auth_change(|s, wb, _| s.user_revoke_role(r, wb))?;
                Res::AuthUserRevokeRole(AuthUserRevokeRoleResponse { header: h })
            }
            Cmd::AuthRoleAdd(r) => {
                self.auth_change(|s, wb, _| s.role_add(r, wb))?;
                Res::AuthRoleAdd(AuthRoleAddResponse { header: h })
            }
            Cmd::AuthRoleDelete(r) => {
                self.auth_change(|s, wb, _| s.role_delete(r, wb))?;
                Res::AuthRoleDelete(AuthRoleDeleteResponse { header: h })
            }
            Cmd::AuthRoleGrantPermission(r) => {
                self.auth_change(|s, wb, _| s.role_grant_permission(r, wb))?;
                Res::AuthRoleGrantPermission(AuthRoleGrantPermissionResponse { header: h })
            }
            Cmd::AuthRoleRevokePermission(r) => {
                self.auth_change(|s, wb, _| s.role_revoke_permission(r, wb))?;
                Res::AuthRoleRevokePermission(AuthRoleRevokePermissionResponse { header: h })
            }
        })
    }

    // ----- auth -----

    fn auth_view(&self) -> AuthView<'_> {
        match &self.auth {
            Some(s) => AuthView::Overlay(s),
            None => AuthView::Published(self.store.auth()),
        }
    }

    /// Runs one auth store change on this batch's copy of the auth state. Every change checks
    /// its request before touching anything, so a failed one leaves no trace.
    fn auth_change<T>(
        &mut self,
        f: impl FnOnce(&mut AuthState, &mut WriteBatch, &mut Vec<TokenOp>) -> Result<T, ApplyError>,
    ) -> Result<T, ApplyError> {
        if self.auth.is_none() {
            self.auth = Some((*self.store.auth()).clone());
        }
        let state = self.auth.as_mut().expect("auth overlay was just set");
        f(state, &mut self.wb, &mut self.token_ops)
    }

    /// The keys attached to lease `id`, if it exists.
    fn lease_keys(&self, id: i64) -> Option<Vec<Vec<u8>>> {
        if id == 0 {
            return None;
        }
        self.lease_state(id).map(|l| l.keys.into_iter().collect())
    }

    /// A client request: its sender's permissions are checked against the auth state at this
    /// point of the log (etcd's authApplierV3), then it is applied.
    fn authorized(&mut self, a: &AuthorizedRequest) -> Result<Res, ApplyError> {
        let info = a
            .header
            .as_ref()
            .map(|h| AuthInfo {
                username: h.username.clone(),
                revision: h.auth_revision,
            })
            .unwrap_or_default();
        let Some(cmd) = a.request.as_ref().and_then(|r| r.request.as_ref()) else {
            return Err(empty_request());
        };
        if matches!(cmd, Cmd::Authorized(_)) {
            return Err(ApplyError {
                kind: ApplyErrorKind::Other,
                message: "etcdserver: nested authorized request".into(),
            });
        }
        self.authorize(&info, cmd)?;
        self.dispatch(cmd)
    }

    fn authorize(&self, info: &AuthInfo, cmd: &Cmd) -> Result<(), ApplyError> {
        let auth = self.auth_view();
        if !auth.enabled() {
            return Ok(());
        }
        match cmd {
            Cmd::Put(p) => auth.check_put(info, &p.key, p.prev_kv, self.lease_keys(p.lease)),
            Cmd::DeleteRange(d) => {
                auth.check(info, &d.key, &d.range_end, Access::Write)?;
                if d.prev_kv {
                    auth.check(info, &d.key, &d.range_end, Access::Read)?;
                }
                Ok(())
            }
            Cmd::Txn(t) => auth.check_txn(info, t, &|id| self.lease_keys(id)),
            Cmd::LeaseRevoke(r) => match self.lease_keys(r.id) {
                Some(keys) => auth.check_lease_keys(info, &keys),
                None => Ok(()),
            },
            Cmd::LeaseGrant(_) | Cmd::Authenticate(_) => Ok(()),
            // Compaction, alarms and every auth store change are for admins (the root role).
            _ => auth.check_admin(info),
        }
    }

    /// Writes everything with one engine write, then publishes it to readers.
    pub fn commit(mut self, sync: bool) -> Result<(), StoreError> {
        if let Some(e) = self.failure.take() {
            return Err(e);
        }
        let inner = &self.store.inner;
        self.wb.put(
            Table::Meta,
            META_REV.to_vec(),
            self.rev.to_be_bytes().to_vec(),
        );
        let started = std::time::Instant::now();
        inner.engine.write(std::mem::take(&mut self.wb), sync)?;
        crate::observe::backend_commit(started.elapsed());
        {
            let mut index = inner.write_index();
            for (k, mut entries) in std::mem::take(&mut self.index) {
                match index.get_mut(&k) {
                    Some(existing) => existing.extend(entries),
                    None => {
                        // Most keys have one or two revisions: do not keep spare capacity.
                        entries.shrink_to_fit();
                        index.insert(k, entries);
                    }
                }
            }
        }
        {
            let mut leases = inner.leases.write().unwrap_or_else(|p| p.into_inner());
            for (id, l) in std::mem::take(&mut self.leases) {
                match l {
                    Some(l) => {
                        leases.insert(id, l);
                    }
                    None => {
                        leases.remove(&id);
                    }
                }
            }
            for (id, key, attach) in std::mem::take(&mut self.lease_keys) {
                if let Some(l) = leases.get_mut(&id) {
                    if attach {
                        l.keys.insert(key);
                    } else {
                        l.keys.remove(&key);
                    }
                }
            }
        }
        if let Some(alarms) = self.alarms.take() {
            *inner.alarms.write().unwrap_or_else(|p| p.into_inner()) = alarms;
        }
        if let Some(auth) = self.auth.take() {
            *inner.auth.write().unwrap_or_else(|p| p.into_inner()) = std::sync::Arc::new(auth);
        }
        inner.recent.insert(std::mem::take(&mut self.recent));
        inner.tokens.apply(std::mem::take(&mut self.token_ops));
        inner.compacted.store(self.compacted, Ordering::Release);
        inner.current.store(self.rev, Ordering::Release);
        if let Some(at) = self.new_compaction {
            self.store.schedule_compaction(at);
        }
        Ok(())
    }

    fn fail_storage(&mut self, e: StoreError) -> ApplyError {
        let err = ApplyError {
            kind: ApplyErrorKind::Other,
            message: e.to_string(),
        };
        self.failure.get_or_insert(e);
        err
    }

    // ----- reads through the overlay -----

    /// The index entry of `key`'s live version, if it has one.
    fn latest_entry(&self, key: &[u8]) -> Option<IndexEntry> {
        match self.index.get(key).and_then(|e| e.last()) {
            Some(e) => (!e.tombstone).then_some(*e),
            None => self
                .store
                .inner
                .read_index()
                .get(key)
                .and_then(|e| visible_at(e, i64::MAX)),
        }
    }

    /// `key`'s live version with its value (a read from the `kv` table unless written in this
    /// batch).
    fn latest(&mut self, key: &[u8]) -> Option<KeyValue> {
        let rev = self.latest_entry(key)?.rev;
        match self.load(rev) {
            Ok(kv) => kv,
            Err(e) => {
                self.fail_storage(e);
                None
            }
        }
    }

    fn lease_exists(&self, id: i64) -> bool {
        match self.leases.get(&id) {
            Some(l) => l.is_some(),
            None => self.store.inner.read_leases().contains_key(&id),
        }
    }

    fn lease_state(&self, id: i64) -> Option<LeaseState> {
        let mut l = match self.leases.get(&id) {
            Some(l) => l.clone()?,
            None => self.store.inner.read_leases().get(&id).cloned()?,
        };
        for (lid, key, attach) in &self.lease_keys {
            if *lid == id {
                if *attach {
                    l.keys.insert(key.clone());
                } else {
                    l.keys.remove(key);
                }
            }
        }
        Some(l)
    }

    fn nospace(&self) -> bool {
        self.has_alarm(ALARM_NOSPACE)
    }

    fn has_alarm(&self, alarm: i32) -> bool {
        match &self.alarms {
            Some(a) => a.iter().any(|m| m.alarm == alarm),
            None => self
                .store
                .inner
                .alarms
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .any(|m| m.alarm == alarm),
        }
    }

    // ----- writes -----

    fn write_kv(&mut self, rev: Revision, kv: &KeyValue, tombstone: bool) {
        let encoded = kv.encode_to_vec();
        let shared: std::sync::Arc<[u8]> = encoded.as_slice().into();
        if !tombstone && self.store.inner.recent.budget() > 0 {
            self.recent.push((rev, shared.clone()));
        }
        self.wb
            .put(Table::Kv, rev.encode(tombstone).to_vec(), encoded);
        self.index
            .entry(kv.key.clone())
            .or_default()
            .push(IndexEntry::of(rev, tombstone, kv));
        self.kvs.insert(rev, shared);
    }

    fn check_put(&mut self, p: &PutRequest) -> Result<(), ApplyError> {
        if p.lease != 0 && !p.ignore_lease && !self.lease_exists(p.lease) {
            return Err(ApplyError::new(ApplyErrorKind::LeaseNotFound));
        }
        if (p.ignore_value || p.ignore_lease) && self.latest_entry(&p.key).is_none() {
            return Err(ApplyError::new(ApplyErrorKind::KeyNotFound));
        }
        Ok(())
    }

    fn put_cmd(&mut self, p: &PutRequest) -> Result<PutResponse, ApplyError> {
        if self.nospace() {
            return Err(ApplyError::new(ApplyErrorKind::NoSpace));
        }
        self.check_put(p)?;
        let mut w = WriteCtx {
            main: self.rev + 1,
            sub: 0,
        };
        let resp = self.put(&mut w, p);
        self.rev = w.main;
        Ok(resp)
    }

    /// A put needs the previous version's create revision, version and lease, all in the
    /// index; its value is read only for `prev_kv` or `ignore_value`. The event carries the
    /// previous version only when it was read (the watch hub reads it for watchers that ask).
    fn put(&mut self, w: &mut WriteCtx, p: &PutRequest) -> PutResponse {
        // etcd reads the previous version with a range for these options.
        self.ops[0] += u64::from(p.prev_kv || p.ignore_value || p.ignore_lease);
        self.ops[1] += 1;
        let prev_entry = self.latest_entry(&p.key);
        let prev = if p.prev_kv || p.ignore_value {
            self.latest(&p.key)
        } else {
            None
        };
        let value = match (&prev, p.ignore_value) {
            (Some(prev), true) => prev.value.clone(),
            _ => p.value.clone(),
        };
        let lease = match (&prev_entry, p.ignore_lease) {
            (Some(prev), true) => prev.lease,
            _ => p.lease,
        };
        let rev = w.next();
        let kv = KeyValue {
            key: p.key.clone(),
            create_revision: prev_entry
                .as_ref()
                .map(|e| e.create_revision)
                .unwrap_or(w.main),
            mod_revision: w.main,
            version: prev_entry.as_ref().map(|e| e.version + 1).unwrap_or(1),
            value,
            lease,
        };
        self.ops[3] += (kv.key.len() + kv.value.len()) as u64;
        let old_lease = prev_entry.as_ref().map(|e| e.lease).unwrap_or(0);
        if old_lease != 0 && old_lease != lease {
            self.lease_keys.push((old_lease, p.key.clone(), false));
        }
        if lease != 0 {
            self.lease_keys.push((lease, p.key.clone(), true));
        }
        self.write_kv(rev, &kv, false);
        self.events.push(Event {
            r#type: EventType::Put as i32,
            kv: Some(kv),
            prev_kv: prev.clone(),
        });
        PutResponse {
            header: header(w.main),
            prev_kv: if p.prev_kv { prev } else { None },
        }
    }

    fn delete_cmd(&mut self, d: &DeleteRangeRequest) -> DeleteRangeResponse {
        let mut w = WriteCtx {
            main: self.rev + 1,
            sub: 0,
        };
        let resp = self.delete(&mut w, &d.key, &d.range_end, d.prev_kv);
        if w.changed() {
            self.rev = w.main;
        }
        resp
    }

    fn delete(
        &mut self,
        w: &mut WriteCtx,
        key: &[u8],
        end: &[u8],
        want_prev: bool,
    ) -> DeleteRangeResponse {
        self.ops[0] += u64::from(want_prev);
        self.ops[2] += 1;
        let live = self.live(&KeySpan::new(key, end), i64::MAX);
        let mut prev_kvs = Vec::new();
        let deleted = live.len() as i64;
        for (k, entry) in live {
            // The deleted value is read only for the response (the watch hub reads it for
            // watchers that ask for prev_kv).
            let prev = if want_prev {
                match self.load(entry.rev) {
                    Ok(p) => p,
                    Err(e) => {
                        self.fail_storage(e);
                        None
                    }
                }
            } else {
                None
            };
            if entry.lease != 0 {
                self.lease_keys.push((entry.lease, k.clone(), false));
            }
            let trev = w.next();
            let tomb = KeyValue {
                key: k,
                mod_revision: w.main,
                ..Default::default()
            };
            self.write_kv(trev, &tomb, true);
            self.events.push(Event {
                r#type: EventType::Delete as i32,
                kv: Some(tomb),
                prev_kv: prev.clone(),
            });
            if want_prev {
                prev_kvs.extend(prev);
            }
        }
        let rev = if w.changed() { w.main } else { self.rev };
        DeleteRangeResponse {
            header: header(rev),
            deleted,
            prev_kvs,
        }
    }

    fn read_rev(&self, req: &RangeRequest, base: i64) -> Result<i64, ApplyError> {
        revision_to_read(req.revision, base, self.compacted)
    }

    // ----- txn -----

    fn compare(&self, c: &Compare) -> bool {
        compare_at(self, c, i64::MAX)
    }

    /// The branch each (nested) txn takes, decided before anything is written, in etcd's order.
    fn txn_path(&mut self, t: &TxnRequest, path: &mut Vec<bool>) {
        // Each compare evaluated (up to the first that fails) is a range, as in etcd.
        let mut ok = true;
        for c in &t.compare {
            self.ops[0] += 1;
            if !self.compare(c) {
                ok = false;
                break;
            }
        }
        path.push(ok);
        for op in if ok { &t.success } else { &t.failure } {
            if let Some(OpReq::RequestTxn(nested)) = &op.request {
                self.txn_path(nested, path);
            }
        }
    }

    fn check_txn(
        &mut self,
        t: &TxnRequest,
        path: &[bool],
        pos: &mut usize,
    ) -> Result<(), ApplyError> {
        let ok = path.get(*pos).copied().unwrap_or(false);
        *pos += 1;
        for op in if ok { &t.success } else { &t.failure } {
            match &op.request {
                Some(OpReq::RequestRange(r)) => {
                    self.read_rev(r, self.rev)?;
                }
                Some(OpReq::RequestPut(p)) => {
                    if self.nospace() {
                        return Err(ApplyError::new(ApplyErrorKind::NoSpace));
                    }
                    // etcd's check reads the key for these options.
                    self.ops[0] += u64::from(p.ignore_value || p.ignore_lease);
                    self.check_put(p)?;
                }
                Some(OpReq::RequestTxn(nested)) => self.check_txn(nested, path, pos)?,
                _ => {}
            }
        }
        Ok(())
    }

    fn txn_cmd(&mut self, t: &TxnRequest) -> Result<TxnResponse, ApplyError> {
        let mut path = Vec::new();
        self.txn_path(t, &mut path);
        self.check_txn(t, &path, &mut 0)?;
        if !txn_read_only(t) {
            // etcd evaluates a writing Txn's compares and checks in a read transaction of
            // their own, then writes in another.
            self.end_mvcc_txn();
        }
        let base = self.rev;
        let mut w = WriteCtx {
            main: base + 1,
            sub: 0,
        };
        let mut resp = self.exec_txn(&mut w, t, &path, &mut 0, base)?;
        if w.changed() {
            self.rev = w.main;
        }
        resp.header = header(self.rev);
        Ok(resp)
    }

    fn exec_txn(
        &mut self,
        w: &mut WriteCtx,
        t: &TxnRequest,
        path: &[bool],
        pos: &mut usize,
        base: i64,
    ) -> Result<TxnResponse, ApplyError> {
        let ok = path.get(*pos).copied().unwrap_or(false);
        *pos += 1;
        let mut responses = Vec::new();
        for op in if ok { &t.success } else { &t.failure } {
            let response = match &op.request {
                Some(OpReq::RequestRange(r)) => {
                    self.ops[0] += 1;
                    // Reads inside a write txn see its earlier writes.
                    let now = if w.changed() { w.main } else { base };
                    let at = self.read_rev(r, now)?;
                    let mut rr = range_view(&*self, r, at, self.compacted)?;
                    rr.header = header(now);
                    Some(OpResp::ResponseRange(rr))
                }
                Some(OpReq::RequestPut(p)) => Some(OpResp::ResponsePut(self.put(w, p))),
                Some(OpReq::RequestDeleteRange(d)) => {
                    let mut dr = self.delete(w, &d.key, &d.range_end, d.prev_kv);
                    if w.changed() {
                        dr.header = header(w.main);
                    }
                    Some(OpResp::ResponseDeleteRange(dr))
                }
                Some(OpReq::RequestTxn(nested)) => {
                    let mut tr = self.exec_txn(w, nested, path, pos, base)?;
                    tr.header = header(if w.changed() { w.main } else { base });
                    Some(OpResp::ResponseTxn(tr))
                }
                None => None,
            };
            responses.push(ResponseOp { response });
        }
        Ok(TxnResponse {
            header: None,
            succeeded: ok,
            responses,
        })
    }

    // ----- compaction, leases, alarms -----

    fn compact_cmd(&mut self, c: &CompactionRequest) -> Result<CompactionResponse, ApplyError> {
        // The compact revision starts at -1 (see `Inner::compacted`): a first compaction to 0
        // succeeds, removing nothing.
        if c.revision <= self.compacted {
            return Err(ApplyError::new(ApplyErrorKind::Compacted));
        }
        if c.revision > self.rev {
            return Err(ApplyError::new(ApplyErrorKind::FutureRevision));
        }
        self.compacted = c.revision;
        self.new_compaction = Some(c.revision);
        self.wb.put(
            Table::Meta,
            META_COMPACT.to_vec(),
            c.revision.to_be_bytes().to_vec(),
        );
        Ok(CompactionResponse {
            header: header(self.rev),
        })
    }

    fn lease_grant(&mut self, g: &LeaseGrantRequest) -> Result<LeaseGrantResponse, ApplyError> {
        if self.nospace() {
            return Err(ApplyError::new(ApplyErrorKind::NoSpace));
        }
        if g.id <= 0 {
            return Err(ApplyError {
                kind: ApplyErrorKind::Other,
                message: "etcdserver: lease ID must be set by the proposer".into(),
            });
        }
        if g.ttl > MAX_LEASE_TTL {
            return Err(ApplyError::new(ApplyErrorKind::LeaseTtlTooLarge));
        }
        if self.lease_exists(g.id) {
            return Err(ApplyError::new(ApplyErrorKind::LeaseExists));
        }
        let l = LeaseState {
            ttl: g.ttl,
            remaining: None,
            keys: BTreeSet::new(),
        };
        self.wb.put(Table::Lease, lease_key(g.id), l.encode());
        self.leases.insert(g.id, Some(l));
        Ok(LeaseGrantResponse {
            header: header(self.rev),
            id: g.id,
            ttl: g.ttl,
            error: String::new(),
        })
    }

    fn lease_revoke(&mut self, r: &LeaseRevokeRequest) -> Result<LeaseRevokeResponse, ApplyError> {
        let Some(state) = self.lease_state(r.id) else {
            return Err(ApplyError::new(ApplyErrorKind::LeaseNotFound));
        };
        // Every attached key goes in one revision.
        let mut w = WriteCtx {
            main: self.rev + 1,
            sub: 0,
        };
        for key in &state.keys {
            self.delete(&mut w, key, &[], false);
        }
        if w.changed() {
            self.rev = w.main;
        }
        self.wb.delete(Table::Lease, lease_key(r.id));
        self.leases.insert(r.id, None);
        self.lease_keys.retain(|(id, _, _)| *id != r.id);
        Ok(LeaseRevokeResponse {
            header: header(self.rev),
        })
    }

    fn lease_checkpoint(&mut self, c: &LeaseCheckpointBatch) {
        for cp in &c.checkpoints {
            let Some(mut state) = self.lease_state(cp.id) else {
                continue;
            };
            state.remaining = Some(cp.remaining_ttl.max(0));
            self.wb.put(Table::Lease, lease_key(cp.id), state.encode());
            // Keys stay tracked through the committed state and pending attachments.
            state.keys = self
                .store
                .inner
                .read_leases()
                .get(&cp.id)
                .map(|l| l.keys.clone())
                .unwrap_or_default();
            self.leases.insert(cp.id, Some(state));
        }
    }

    fn alarm(&mut self, a: &AlarmRequest) -> AlarmResponse {
        let mut alarms = match &self.alarms {
            Some(a) => a.clone(),
            None => self.store.alarms(),
        };
        let member = AlarmMember {
            member_id: a.member_id,
            alarm: a.alarm,
        };
        let mut resp = AlarmResponse {
            header: header(self.rev),
            alarms: Vec::new(),
        };
        match alarm_request::AlarmAction::try_from(a.action) {
            Ok(alarm_request::AlarmAction::Get) => {
                resp.alarms = alarms
                    .iter()
                    .filter(|m| a.alarm == 0 || m.alarm == a.alarm)
                    .cloned()
                    .collect();
                return resp;
            }
            Ok(alarm_request::AlarmAction::Activate) => {
                if a.alarm == 0 {
                    return resp;
                }
                // etcd answers with the alarm whether it was raised now or before.
                resp.alarms.push(member);
                if alarms.contains(&member) {
                    return resp;
                }
                alarms.push(member);
            }
            Ok(alarm_request::AlarmAction::Deactivate) => {
                if let Some(pos) = alarms.iter().position(|m| *m == member) {
                    alarms.remove(pos);
                    resp.alarms.push(member);
                }
            }
            Err(_) => return resp,
        }
        alarms.sort_by_key(|m| (m.member_id, m.alarm));
        self.wb.put(
            Table::Meta,
            META_ALARMS.to_vec(),
            AlarmResponse {
                header: None,
                alarms: alarms.clone(),
            }
            .encode_to_vec(),
        );
        self.alarms = Some(alarms);
        resp
    }
}

/// What etcd's corrupt-cluster applier refuses while a CORRUPT alarm is raised: every write
/// (read-only transactions still run).
fn refused_when_corrupt(cmd: &Cmd) -> bool {
    match cmd {
        Cmd::Put(_)
        | Cmd::DeleteRange(_)
        | Cmd::Compaction(_)
        | Cmd::LeaseGrant(_)
        | Cmd::LeaseRevoke(_) => true,
        Cmd::Txn(t) => !txn_read_only(t),
        _ => false,
    }
}

/// Whether compare `c` holds at revision `at` of `view`, as etcd evaluates it: a compare on a
/// range must hold for every key in it; a missing key compares as a zero KeyValue, except for a
/// value compare, which then fails.
pub(crate) fn compare_at(view: &dyn View, c: &Compare, at: i64) -> bool {
    let live = view.live(&KeySpan::new(&c.key, &c.range_end), at);
    // Only a value compare needs the values; the rest is in the index.
    let kvs: Vec<KeyValue> = if c.target == compare::CompareTarget::Value as i32 {
        live.into_iter()
            .filter_map(|(_, e)| view.load(e.rev).ok().flatten())
            .collect()
    } else {
        live.into_iter()
            .map(|(k, e)| e.key_value_without_value(&k))
            .collect()
    };
    if kvs.is_empty() {
        if c.target == compare::CompareTarget::Value as i32 {
            return false;
        }
        return compare_kv(c, &KeyValue::default());
    }
    kvs.iter().all(|kv| compare_kv(c, kv))
}

/// Whether a Txn only reads: no put or delete in any branch, nested ones included (etcd's
/// `isTxnReadonly`).
pub fn txn_read_only(t: &TxnRequest) -> bool {
    t.success
        .iter()
        .chain(&t.failure)
        .all(|op| match &op.request {
            Some(OpReq::RequestRange(_)) | None => true,
            Some(OpReq::RequestTxn(nested)) => txn_read_only(nested),
            Some(_) => false,
        })
}

fn empty_request() -> ApplyError {
    ApplyError {
        kind: ApplyErrorKind::Other,
        message: "etcdserver: empty request".into(),
    }
}

fn compare_kv(c: &Compare, kv: &KeyValue) -> bool {
    use compare::{CompareResult, CompareTarget, TargetUnion};
    let ord = match CompareTarget::try_from(c.target) {
        Ok(CompareTarget::Value) => {
            let v: &[u8] = match &c.target_union {
                Some(TargetUnion::Value(v)) => v,
                _ => &[],
            };
            kv.value.as_slice().cmp(v)
        }
        Ok(t) => {
            let want = match (&c.target_union, t) {
                (Some(TargetUnion::Version(v)), CompareTarget::Version) => *v,
                (Some(TargetUnion::CreateRevision(v)), CompareTarget::Create) => *v,
                (Some(TargetUnion::ModRevision(v)), CompareTarget::Mod) => *v,
                (Some(TargetUnion::Lease(v)), CompareTarget::Lease) => *v,
                _ => 0,
            };
            let have = match t {
                CompareTarget::Version => kv.version,
                CompareTarget::Create => kv.create_revision,
                CompareTarget::Mod => kv.mod_revision,
                CompareTarget::Lease => kv.lease,
                CompareTarget::Value => 0,
            };
            have.cmp(&want)
        }
        Err(_) => return false,
    };
    match CompareResult::try_from(c.result) {
        Ok(CompareResult::Equal) => ord.is_eq(),
        Ok(CompareResult::NotEqual) => ord.is_ne(),
        Ok(CompareResult::Greater) => ord.is_gt(),
        Ok(CompareResult::Less) => ord.is_lt(),
        Err(_) => false,
    }
}
