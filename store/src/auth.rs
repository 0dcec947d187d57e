//! Authentication and role-based access control: etcd's auth store, replicated through Raft
//! like the rest of the state machine.
//!
//! [`AuthState`] is the replicated part: the enabled flag, the auth revision (bumped by every
//! change to users, roles or permissions, so a request checked against an older revision can be
//! recognised), the users (name, password hash, roles) and the roles (key permissions). It only
//! changes by applying Raft commands ([`crate::mvcc::ApplyBatch`]), and it is written in the same
//! engine batch as the rest of the apply, in the `meta` table:
//!
//! | key | value |
//! |---|---|
//! | `auth/enabled` | one byte, 1 = enabled |
//! | `auth/revision` | big-endian u64 (absent: 1, etcd's first revision) |
//! | `auth/user/<name>` | `authpb.User` |
//! | `auth/role/<name>` | `authpb.Role` |
//!
//! Nothing here reads a clock or randomness: passwords arrive already hashed (the member that
//! received the request hashed them before proposing) and tokens arrive already chosen.
//!
//! [`TokenTable`] holds etcd's "simple" tokens: token → user name, in memory only. Like etcd, a
//! token is assigned by applying the `Authenticate` command, so every member knows it; each
//! member expires it on its own after the token TTL without use, and a restart forgets them all.
//!
//! Permission checks follow etcd's `auth/store.go` and `range_perm_cache.go`: a user's
//! permissions are the union of its roles' key intervals; a single-key request needs one
//! interval holding the key, a range request needs the union to cover the whole range.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use keel_proto::authpb::{Permission, Role, User, UserAddOptions, permission::Type as PermType};
use keel_proto::etcdserverpb::request_op::Request as OpReq;
use keel_proto::etcdserverpb::{
    AuthRoleAddRequest, AuthRoleDeleteRequest, AuthRoleGrantPermissionRequest,
    AuthRoleRevokePermissionRequest, AuthUserAddRequest, AuthUserChangePasswordRequest,
    AuthUserDeleteRequest, AuthUserGrantRoleRequest, AuthUserRevokeRoleRequest, TxnRequest,
};
use prost::Message;

use crate::engine::{Direction, Engine, ScanControl, Table, WriteBatch};
use crate::error::{ApplyError, ApplyErrorKind, StoreError};

pub const ROOT_USER: &str = "root";
pub const ROOT_ROLE: &str = "root";

pub(crate) const META_AUTH_ENABLED: &[u8] = b"auth/enabled";
pub(crate) const META_AUTH_REVISION: &[u8] = b"auth/revision";
pub(crate) const META_AUTH_USER: &[u8] = b"auth/user/";
pub(crate) const META_AUTH_ROLE: &[u8] = b"auth/role/";

/// Who sent a request, for permission checks: the user name and the auth revision at which the
/// member accepted the user's token (0: no credentials).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthInfo {
    pub username: String,
    pub revision: u64,
}

/// The kind of access a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

fn err(kind: ApplyErrorKind) -> ApplyError {
    ApplyError::new(kind)
}

/// The end of a key interval; `None` is past every key.
type End = Option<Vec<u8>>;

fn cmp_end(a: &End, b: &End) -> Ordering {
    match (a, b) {
        (None, None) => Ordering::Equal,
        (None, Some(_)) => Ordering::Greater,
        (Some(_), None) => Ordering::Less,
        (Some(a), Some(b)) => a.cmp(b),
    }
}

/// `key` < `end`.
fn before_end(key: &[u8], end: &End) -> bool {
    end.as_ref().is_none_or(|e| key < e.as_slice())
}

/// The key after `key` in byte order: `key` + 0x00.
fn successor(key: &[u8]) -> Vec<u8> {
    let mut k = key.to_vec();
    k.push(0);
    k
}

/// The half-open interval a permission covers, as etcd reads `key` / `range_end`.
fn permission_interval(p: &Permission) -> (Vec<u8>, End) {
    if p.range_end.is_empty() {
        (p.key.clone(), Some(successor(&p.key)))
    } else if p.range_end == [0] {
        (p.key.clone(), None)
    } else {
        (p.key.clone(), Some(p.range_end.clone()))
    }
}

/// A set of key intervals, sorted by start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Intervals(Vec<(Vec<u8>, End)>);

impl Intervals {
    fn insert(&mut self, ivl: (Vec<u8>, End)) {
        let pos = self.0.partition_point(|(b, _)| *b <= ivl.0);
        self.0.insert(pos, ivl);
    }

    /// Some interval holds `key`.
    fn holds(&self, key: &[u8]) -> bool {
        self.0
            .iter()
            .take_while(|(b, _)| b.as_slice() <= key)
            .any(|(_, e)| before_end(key, e))
    }

    /// The intervals overlapping `[begin, end)` cover it without a gap (etcd's
    /// `IntervalTree.Contains`).
    fn covers(&self, begin: &[u8], end: &End) -> bool {
        let mut min_begin: Option<&[u8]> = None;
        let mut max_end: End = Some(Vec::new());
        for (b, e) in &self.0 {
            let overlaps = before_end(b, end) && before_end(begin, e);
            if !overlaps {
                continue;
            }
            match min_begin {
                None => {
                    min_begin = Some(b);
                    max_end = e.clone();
                }
                Some(_) => {
                    if cmp_end(&max_end, &Some(b.clone())) == Ordering::Less {
                        return false;
                    }
                    if cmp_end(e, &max_end) == Ordering::Greater {
                        max_end = e.clone();
                    }
                }
            }
        }
        match min_begin {
            None => false,
            Some(min) => cmp_end(&max_end, end) != Ordering::Less && min <= begin,
        }
    }
}

/// One user's permissions, merged over its roles.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct UserPerms {
    read: Intervals,
    write: Intervals,
}

/// A permission may name one key, a range `[key, range_end)` with `key < range_end`, or every
/// key from `key` (`range_end` = "\0"); the key is never empty.
pub fn valid_permission_range(key: &[u8], range_end: &[u8]) -> bool {
    !key.is_empty() && (range_end.is_empty() || key < range_end || range_end == [0])
}

/// What applying an auth command does to the in-memory tokens (applied on commit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenOp {
    Assign { token: String, user: String },
    InvalidateUser(String),
    Clear,
}

/// The replicated auth state.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthState {
    enabled: bool,
    revision: u64,
    users: BTreeMap<String, User>,
    roles: BTreeMap<String, Role>,
    perms: BTreeMap<String, UserPerms>,
}

impl Default for AuthState {
    fn default() -> Self {
        AuthState {
            enabled: false,
            revision: 1,
            users: BTreeMap::new(),
            roles: BTreeMap::new(),
            perms: BTreeMap::new(),
        }
    }
}

fn corrupt(detail: impl ToString) -> StoreError {
    StoreError::Corrupt {
        table: "meta",
        detail: detail.to_string(),
    }
}

fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}

impl AuthState {
    /// Reads the auth state from the engine's `meta` table.
    pub fn load(engine: &dyn Engine) -> Result<AuthState, StoreError> {
        let mut state = AuthState {
            enabled: engine
                .get(Table::Meta, META_AUTH_ENABLED)?
                .is_some_and(|v| v == [1]),
            ..Default::default()
        };
        if let Some(v) = engine.get(Table::Meta, META_AUTH_REVISION)? {
            let bytes: [u8; 8] = v
                .as_slice()
                .try_into()
                .map_err(|_| corrupt("bad auth revision"))?;
            state.revision = u64::from_be_bytes(bytes);
        }
        let mut failure = None;
        engine.scan(
            Table::Meta,
            META_AUTH_USER,
            Some(&prefix_end(META_AUTH_USER)),
            Direction::Forward,
            &mut |_, v| match User::decode(v) {
                Ok(u) => {
                    state
                        .users
                        .insert(String::from_utf8_lossy(&u.name).into_owned(), u);
                    ScanControl::Continue
                }
                Err(e) => {
                    failure = Some(corrupt(e));
                    ScanControl::Stop
                }
            },
        )?;
        engine.scan(
            Table::Meta,
            META_AUTH_ROLE,
            Some(&prefix_end(META_AUTH_ROLE)),
            Direction::Forward,
            &mut |_, v| match Role::decode(v) {
                Ok(r) => {
                    state
                        .roles
                        .insert(String::from_utf8_lossy(&r.name).into_owned(), r);
                    ScanControl::Continue
                }
                Err(e) => {
                    failure = Some(corrupt(e));
                    ScanControl::Stop
                }
            },
        )?;
        if let Some(e) = failure {
            return Err(e);
        }
        state.rebuild();
        Ok(state)
    }

    /// Recomputes every user's merged permissions (after any change).
    fn rebuild(&mut self) {
        let mut perms = BTreeMap::new();
        for (name, user) in &self.users {
            let mut p = UserPerms::default();
            for role in user.roles.iter().filter_map(|r| self.roles.get(r)) {
                for perm in &role.key_permission {
                    let ivl = permission_interval(perm);
                    match PermType::try_from(perm.perm_type) {
                        Ok(PermType::Read) => p.read.insert(ivl),
                        Ok(PermType::Write) => p.write.insert(ivl),
                        Ok(PermType::Readwrite) => {
                            p.read.insert(ivl.clone());
                            p.write.insert(ivl);
                        }
                        Err(_) => {}
                    }
                }
            }
            perms.insert(name.clone(), p);
        }
        self.perms = perms;
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn user(&self, name: &str) -> Option<&User> {
        self.users.get(name)
    }

    pub fn role(&self, name: &str) -> Option<&Role> {
        self.roles.get(name)
    }

    /// User names in byte order.
    pub fn user_names(&self) -> Vec<String> {
        self.users.keys().cloned().collect()
    }

    /// Role names in byte order.
    pub fn role_names(&self) -> Vec<String> {
        self.roles.keys().cloned().collect()
    }

    pub fn has_role(&self, user: &str, role: &str) -> bool {
        self.users
            .get(user)
            .is_some_and(|u| u.roles.iter().any(|r| r == role))
    }

    /// etcd's `UserGet`: the user's roles.
    pub fn user_get(&self, name: &str) -> Result<Vec<String>, ApplyError> {
        self.users
            .get(name)
            .map(|u| u.roles.clone())
            .ok_or_else(|| err(ApplyErrorKind::UserNotFound))
    }

    /// etcd 3.5's `RoleGet`: the role's stored permissions (the `root` role needs none: it
    /// grants everything).
    pub fn role_get(&self, name: &str) -> Result<Vec<Permission>, ApplyError> {
        self.roles
            .get(name)
            .map(|r| r.key_permission.clone())
            .ok_or_else(|| err(ApplyErrorKind::RoleNotFound))
    }

    /// The password hash to check a login against (etcd's `CheckPassword`, minus the hash
    /// comparison, which the caller does outside the apply path).
    pub fn password_hash(&self, name: &str) -> Result<&[u8], ApplyError> {
        if !self.enabled {
            return Err(err(ApplyErrorKind::AuthNotEnabled));
        }
        let user = self
            .users
            .get(name)
            .ok_or_else(|| err(ApplyErrorKind::AuthFailed))?;
        if user.options.as_ref().is_some_and(|o| o.no_password) {
            return Err(err(ApplyErrorKind::AuthFailed));
        }
        Ok(&user.password)
    }

    // ----- permission checks (etcd's IsAdminPermitted / isOpPermitted) -----

    /// Admin operations: the user must have the `root` role (anyone when auth is off).
    pub fn check_admin(&self, info: &AuthInfo) -> Result<(), ApplyError> {
        if !self.enabled {
            return Ok(());
        }
        if info.username.is_empty() {
            return Err(err(ApplyErrorKind::UserEmpty));
        }
        let user = self
            .users
            .get(&info.username)
            .ok_or_else(|| err(ApplyErrorKind::UserNotFound))?;
        if !user.roles.iter().any(|r| r == ROOT_ROLE) {
            return Err(err(ApplyErrorKind::PermissionDenied));
        }
        Ok(())
    }

    /// Access to `key` (`range_end` empty) or `[key, range_end)` (`"\0"`: every key from `key`).
    pub fn check(
        &self,
        info: &AuthInfo,
        key: &[u8],
        range_end: &[u8],
        access: Access,
    ) -> Result<(), ApplyError> {
        if !self.enabled {
            return Ok(());
        }
        if info.revision == 0 {
            return Err(err(ApplyErrorKind::UserEmpty));
        }
        if info.revision < self.revision {
            return Err(err(ApplyErrorKind::AuthOldRevision));
        }
        let Some(user) = self.users.get(&info.username) else {
            return Err(err(ApplyErrorKind::PermissionDenied));
        };
        if user.roles.iter().any(|r| r == ROOT_ROLE) {
            return Ok(());
        }
        let Some(perms) = self.perms.get(&info.username) else {
            return Err(err(ApplyErrorKind::PermissionDenied));
        };
        let set = match access {
            Access::Read => &perms.read,
            Access::Write => &perms.write,
        };
        let ok = if range_end.is_empty() {
            set.holds(key)
        } else if range_end == [0] {
            set.covers(key, &None)
        } else {
            set.covers(key, &Some(range_end.to_vec()))
        };
        if ok {
            Ok(())
        } else {
            Err(err(ApplyErrorKind::PermissionDenied))
        }
    }

    /// Every compare and every operation of both branches, nested transactions included
    /// (`lease_keys` gives the keys attached to a lease, for puts that attach one).
    pub fn check_txn(
        &self,
        info: &AuthInfo,
        txn: &TxnRequest,
        lease_keys: &dyn Fn(i64) -> Option<Vec<Vec<u8>>>,
    ) -> Result<(), ApplyError> {
        for c in &txn.compare {
            self.check(info, &c.key, &c.range_end, Access::Read)?;
        }
        for op in txn.success.iter().chain(&txn.failure) {
            match &op.request {
                Some(OpReq::RequestRange(r)) => {
                    self.check(info, &r.key, &r.range_end, Access::Read)?
                }
                Some(OpReq::RequestPut(p)) => {
                    self.check_put(info, &p.key, p.prev_kv, lease_keys(p.lease))?
                }
                Some(OpReq::RequestDeleteRange(d)) => {
                    if d.prev_kv {
                        self.check(info, &d.key, &d.range_end, Access::Read)?;
                    }
                    self.check(info, &d.key, &d.range_end, Access::Write)?;
                }
                Some(OpReq::RequestTxn(t)) => self.check_txn(info, t, lease_keys)?,
                None => {}
            }
        }
        Ok(())
    }

    /// A put: write access to the key, read access too when the previous value is returned,
    /// and write access to every key already attached to the lease it attaches.
    pub fn check_put(
        &self,
        info: &AuthInfo,
        key: &[u8],
        prev_kv: bool,
        lease_keys: Option<Vec<Vec<u8>>>,
    ) -> Result<(), ApplyError> {
        self.check(info, key, &[], Access::Write)?;
        if let Some(keys) = lease_keys {
            self.check_lease_keys(info, &keys)?;
        }
        if prev_kv {
            self.check(info, key, &[], Access::Read)?;
        }
        Ok(())
    }

    /// Write access to every key attached to a lease (revoking it deletes them); an admin may.
    pub fn check_lease_keys(&self, info: &AuthInfo, keys: &[Vec<u8>]) -> Result<(), ApplyError> {
        if self.check_admin(info).is_ok() {
            return Ok(());
        }
        for key in keys {
            self.check(info, key, &[], Access::Write)?;
        }
        Ok(())
    }

    // ----- changes (applied through Raft only) -----

    fn bump(&mut self, wb: &mut WriteBatch) {
        self.revision += 1;
        wb.put(
            Table::Meta,
            META_AUTH_REVISION.to_vec(),
            self.revision.to_be_bytes().to_vec(),
        );
    }

    fn save_user(&mut self, wb: &mut WriteBatch, user: User) {
        let name = String::from_utf8_lossy(&user.name).into_owned();
        let mut key = META_AUTH_USER.to_vec();
        key.extend_from_slice(name.as_bytes());
        wb.put(Table::Meta, key, user.encode_to_vec());
        self.users.insert(name, user);
    }

    fn save_role(&mut self, wb: &mut WriteBatch, role: Role) {
        let name = String::from_utf8_lossy(&role.name).into_owned();
        let mut key = META_AUTH_ROLE.to_vec();
        key.extend_from_slice(name.as_bytes());
        wb.put(Table::Meta, key, role.encode_to_vec());
        self.roles.insert(name, role);
    }

    /// Changes made: bump the revision and refresh the permission cache.
    fn changed(&mut self, wb: &mut WriteBatch) {
        self.bump(wb);
        self.rebuild();
    }

    pub fn enable(&mut self, wb: &mut WriteBatch) -> Result<(), ApplyError> {
        if self.enabled {
            return Ok(());
        }
        let root = self
            .users
            .get(ROOT_USER)
            .ok_or_else(|| err(ApplyErrorKind::RootUserNotExist))?;
        if !root.roles.iter().any(|r| r == ROOT_ROLE) {
            return Err(err(ApplyErrorKind::RootRoleNotExist));
        }
        self.enabled = true;
        wb.put(Table::Meta, META_AUTH_ENABLED.to_vec(), vec![1]);
        Ok(())
    }

    pub fn disable(&mut self, wb: &mut WriteBatch, tokens: &mut Vec<TokenOp>) {
        if !self.enabled {
            return;
        }
        self.enabled = false;
        wb.put(Table::Meta, META_AUTH_ENABLED.to_vec(), vec![0]);
        self.changed(wb);
        tokens.push(TokenOp::Clear);
    }

    /// Assigns a token chosen by the proposer (who checked the password).
    pub fn authenticate(
        &self,
        name: &str,
        token: &str,
        tokens: &mut Vec<TokenOp>,
    ) -> Result<(), ApplyError> {
        self.password_hash(name)?;
        if token.is_empty() {
            return Err(ApplyError {
                kind: ApplyErrorKind::Other,
                message: "etcdserver: authenticate without a token".into(),
            });
        }
        tokens.push(TokenOp::Assign {
            token: token.to_string(),
            user: name.to_string(),
        });
        Ok(())
    }

    /// The stored hash: `hashedPassword` is the base64 of a bcrypt hash (as etcd's API sends
    /// it); a clear-text password never reaches the state machine.
    fn password_from(hashed: &str, password: &str) -> Result<Vec<u8>, ApplyError> {
        use base64::Engine as _;
        if !password.is_empty() || hashed.is_empty() {
            return Err(ApplyError {
                kind: ApplyErrorKind::Other,
                message: "etcdserver: password must be hashed before proposing".into(),
            });
        }
        base64::engine::general_purpose::STANDARD
            .decode(hashed)
            .map_err(|_| ApplyError {
                kind: ApplyErrorKind::Other,
                message: "auth: authentication failed, password was given for no password user"
                    .into(),
            })
    }

    pub fn user_add(
        &mut self,
        r: &AuthUserAddRequest,
        wb: &mut WriteBatch,
    ) -> Result<(), ApplyError> {
        if r.name.is_empty() {
            return Err(err(ApplyErrorKind::UserEmpty));
        }
        if self.users.contains_key(&r.name) {
            return Err(err(ApplyErrorKind::UserAlreadyExist));
        }
        let options = r.options.unwrap_or(UserAddOptions { no_password: false });
        let password = if options.no_password {
            Vec::new()
        } else {
            Self::password_from(&r.hashed_password, &r.password)?
        };
        self.save_user(
            wb,
            User {
                name: r.name.as_bytes().to_vec(),
                password,
                roles: Vec::new(),
                options: Some(options),
            },
        );
        self.changed(wb);
        Ok(())
    }

    pub fn user_delete(
        &mut self,
        r: &AuthUserDeleteRequest,
        wb: &mut WriteBatch,
        tokens: &mut Vec<TokenOp>,
    ) -> Result<(), ApplyError> {
        if self.enabled && r.name == ROOT_USER {
            return Err(err(ApplyErrorKind::InvalidAuthMgmt));
        }
        if self.users.remove(&r.name).is_none() {
            return Err(err(ApplyErrorKind::UserNotFound));
        }
        let mut key = META_AUTH_USER.to_vec();
        key.extend_from_slice(r.name.as_bytes());
        wb.delete(Table::Meta, key);
        self.changed(wb);
        tokens.push(TokenOp::InvalidateUser(r.name.clone()));
        Ok(())
    }

    pub fn user_change_password(
        &mut self,
        r: &AuthUserChangePasswordRequest,
        wb: &mut WriteBatch,
        tokens: &mut Vec<TokenOp>,
    ) -> Result<(), ApplyError> {
        let mut user = self
            .users
            .get(&r.name)
            .cloned()
            .ok_or_else(|| err(ApplyErrorKind::UserNotFound))?;
        if !user.options.as_ref().is_some_and(|o| o.no_password) {
            user.password = Self::password_from(&r.hashed_password, &r.password)?;
        }
        self.save_user(wb, user);
        self.changed(wb);
        tokens.push(TokenOp::InvalidateUser(r.name.clone()));
        Ok(())
    }

    pub fn user_grant_role(
        &mut self,
        r: &AuthUserGrantRoleRequest,
        wb: &mut WriteBatch,
    ) -> Result<(), ApplyError> {
        let mut user = self
            .users
            .get(&r.user)
            .cloned()
            .ok_or_else(|| err(ApplyErrorKind::UserNotFound))?;
        if r.role != ROOT_ROLE && !self.roles.contains_key(&r.role) {
            return Err(err(ApplyErrorKind::RoleNotFound));
        }
        match user.roles.binary_search(&r.role) {
            Ok(_) => return Ok(()),
            Err(pos) => user.roles.insert(pos, r.role.clone()),
        }
        self.save_user(wb, user);
        self.changed(wb);
        Ok(())
    }

    pub fn user_revoke_role(
        &mut self,
        r: &AuthUserRevokeRoleRequest,
        wb: &mut WriteBatch,
    ) -> Result<(), ApplyError> {
        if self.enabled && r.name == ROOT_USER && r.role == ROOT_ROLE {
            return Err(err(ApplyErrorKind::InvalidAuthMgmt));
        }
        let mut user = self
            .users
            .get(&r.name)
            .cloned()
            .ok_or_else(|| err(ApplyErrorKind::UserNotFound))?;
        let before = user.roles.len();
        user.roles.retain(|x| *x != r.role);
        if user.roles.len() == before {
            return Err(err(ApplyErrorKind::RoleNotGranted));
        }
        self.save_user(wb, user);
        self.changed(wb);
        Ok(())
    }

    pub fn role_add(
        &mut self,
        r: &AuthRoleAddRequest,
        wb: &mut WriteBatch,
    ) -> Result<(), ApplyError> {
        if r.name.is_empty() {
            return Err(err(ApplyErrorKind::RoleEmpty));
        }
        if self.roles.contains_key(&r.name) {
            return Err(err(ApplyErrorKind::RoleAlreadyExist));
        }
        self.save_role(
            wb,
            Role {
                name: r.name.as_bytes().to_vec(),
                key_permission: Vec::new(),
            },
        );
        self.changed(wb);
        Ok(())
    }

    pub fn role_delete(
        &mut self,
        r: &AuthRoleDeleteRequest,
        wb: &mut WriteBatch,
    ) -> Result<(), ApplyError> {
        if self.enabled && r.role == ROOT_ROLE {
            return Err(err(ApplyErrorKind::InvalidAuthMgmt));
        }
        if self.roles.remove(&r.role).is_none() {
            return Err(err(ApplyErrorKind::RoleNotFound));
        }
        let mut key = META_AUTH_ROLE.to_vec();
        key.extend_from_slice(r.role.as_bytes());
        wb.delete(Table::Meta, key);
        let holders: Vec<User> = self
            .users
            .values()
            .filter(|u| u.roles.contains(&r.role))
            .cloned()
            .collect();
        for mut user in holders {
            user.roles.retain(|x| *x != r.role);
            self.save_user(wb, user);
        }
        self.changed(wb);
        Ok(())
    }

    pub fn role_grant_permission(
        &mut self,
        r: &AuthRoleGrantPermissionRequest,
        wb: &mut WriteBatch,
    ) -> Result<(), ApplyError> {
        let Some(perm) = &r.perm else {
            return Err(err(ApplyErrorKind::PermissionNotGiven));
        };
        if !valid_permission_range(&perm.key, &perm.range_end) {
            return Err(err(ApplyErrorKind::InvalidAuthMgmt));
        }
        let mut role = self
            .roles
            .get(&r.name)
            .cloned()
            .ok_or_else(|| err(ApplyErrorKind::RoleNotFound))?;
        match role
            .key_permission
            .iter_mut()
            .find(|p| p.key == perm.key && p.range_end == perm.range_end)
        {
            Some(existing) => existing.perm_type = perm.perm_type,
            None => {
                role.key_permission.push(Permission {
                    perm_type: perm.perm_type,
                    key: perm.key.clone(),
                    range_end: perm.range_end.clone(),
                });
                role.key_permission.sort_by(|a, b| a.key.cmp(&b.key));
            }
        }
        self.save_role(wb, role);
        self.changed(wb);
        Ok(())
    }

    pub fn role_revoke_permission(
        &mut self,
        r: &AuthRoleRevokePermissionRequest,
        wb: &mut WriteBatch,
    ) -> Result<(), ApplyError> {
        let mut role = self
            .roles
            .get(&r.role)
            .cloned()
            .ok_or_else(|| err(ApplyErrorKind::RoleNotFound))?;
        let before = role.key_permission.len();
        role.key_permission
            .retain(|p| p.key != r.key || p.range_end != r.range_end);
        if role.key_permission.len() == before {
            return Err(err(ApplyErrorKind::PermissionNotGranted));
        }
        self.save_role(wb, role);
        self.changed(wb);
        Ok(())
    }
}

struct TokenEntry {
    user: String,
    /// Set when the member first sees the token used or swept; refreshed on every use.
    deadline: Option<Instant>,
}

/// etcd's simple tokens: token → user, in memory on every member. Deadlines are this member's
/// own (the caller passes the clock, so applying stays free of it).
#[derive(Default)]
pub struct TokenTable {
    map: Mutex<HashMap<String, TokenEntry>>,
}

impl TokenTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, TokenEntry>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn apply(&self, ops: Vec<TokenOp>) {
        if ops.is_empty() {
            return;
        }
        let mut map = self.lock();
        for op in ops {
            match op {
                TokenOp::Assign { token, user } => {
                    map.insert(
                        token,
                        TokenEntry {
                            user,
                            deadline: None,
                        },
                    );
                }
                TokenOp::InvalidateUser(user) => map.retain(|_, e| e.user != user),
                TokenOp::Clear => map.clear(),
            }
        }
    }

    /// The user `token` belongs to, if it is known and unexpired; a use pushes its deadline to
    /// `now + ttl`.
    pub fn lookup(&self, token: &str, now: Instant, ttl: Duration) -> Option<String> {
        let mut map = self.lock();
        let entry = map.get_mut(token)?;
        if entry.deadline.is_some_and(|d| d <= now) {
            map.remove(token);
            return None;
        }
        entry.deadline = Some(now + ttl);
        Some(entry.user.clone())
    }

    /// Drops tokens unused for `ttl`; returns how many are left.
    pub fn expire(&self, now: Instant, ttl: Duration) -> usize {
        let mut map = self.lock();
        map.retain(|_, e| match e.deadline {
            Some(d) => d > now,
            None => {
                e.deadline = Some(now + ttl);
                true
            }
        });
        map.len()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_proto::etcdserverpb::{Compare, RequestOp, request_op};

    fn perm(t: PermType, key: &str, end: &str) -> Permission {
        Permission {
            perm_type: t as i32,
            key: key.as_bytes().to_vec(),
            range_end: end.as_bytes().to_vec(),
        }
    }

    fn hashed() -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(b"$2b$04$not-a-real-hash")
    }

    /// root (root role), alice with role r1: readwrite prefix foo, read bar, write [a, b).
    fn setup() -> (AuthState, WriteBatch) {
        let mut s = AuthState::default();
        let mut wb = WriteBatch::new();
        for name in ["root", "alice"] {
            s.user_add(
                &AuthUserAddRequest {
                    name: name.into(),
                    hashed_password: hashed(),
                    ..Default::default()
                },
                &mut wb,
            )
            .unwrap();
        }
        s.user_grant_role(
            &AuthUserGrantRoleRequest {
                user: "root".into(),
                role: "root".into(),
            },
            &mut wb,
        )
        .unwrap();
        s.role_add(&AuthRoleAddRequest { name: "r1".into() }, &mut wb)
            .unwrap();
        for p in [
            perm(PermType::Readwrite, "foo", "fop"),
            perm(PermType::Read, "bar", ""),
            perm(PermType::Write, "a", "b"),
        ] {
            s.role_grant_permission(
                &AuthRoleGrantPermissionRequest {
                    name: "r1".into(),
                    perm: Some(p),
                },
                &mut wb,
            )
            .unwrap();
        }
        s.user_grant_role(
            &AuthUserGrantRoleRequest {
                user: "alice".into(),
                role: "r1".into(),
            },
            &mut wb,
        )
        .unwrap();
        s.enable(&mut wb).unwrap();
        (s, wb)
    }

    fn alice(s: &AuthState) -> AuthInfo {
        AuthInfo {
            username: "alice".into(),
            revision: s.revision(),
        }
    }

    #[test]
    fn permission_edges() {
        let (s, _) = setup();
        let a = alice(&s);
        let ok = |k: &str, e: &str, acc| s.check(&a, k.as_bytes(), e.as_bytes(), acc).is_ok();
        assert!(ok("foo", "", Access::Read) && ok("foo1", "", Access::Write));
        assert!(ok("foo", "fop", Access::Read), "the whole prefix");
        assert!(ok("foo/a", "foo/b", Access::Read), "inside the prefix");
        assert!(!ok("foo", "foq", Access::Read), "past the range end");
        assert!(!ok("fo", "fop", Access::Read), "before the range start");
        assert!(!ok("fop", "", Access::Read), "the range end is excluded");
        assert!(ok("bar", "", Access::Read) && !ok("bar", "", Access::Write));
        assert!(!ok("bar", "bas", Access::Read), "one key is not a range");
        assert!(
            ok("bar", "bar\0", Access::Read),
            "the range of exactly one key"
        );
        assert!(ok("a", "", Access::Write) && ok("az", "", Access::Write));
        assert!(!ok("a", "", Access::Read) && !ok("b", "", Access::Write));
        assert!(!ok("foo", "\0", Access::Read), "open-ended range");
        // Adjacent intervals merge: [a, b) + [b, c) cover [a, c).
        let mut s2 = s.clone();
        let mut wb = WriteBatch::new();
        s2.role_grant_permission(
            &AuthRoleGrantPermissionRequest {
                name: "r1".into(),
                perm: Some(perm(PermType::Write, "b", "c")),
            },
            &mut wb,
        )
        .unwrap();
        let a2 = alice(&s2);
        assert!(s2.check(&a2, b"a", b"c", Access::Write).is_ok());
        assert!(s2.check(&a2, b"a", b"c\0", Access::Write).is_err());
        // Root may do anything; unknown users nothing.
        let root = AuthInfo {
            username: "root".into(),
            revision: s.revision(),
        };
        assert!(s.check(&root, b"x", b"\0", Access::Write).is_ok());
        let bob = AuthInfo {
            username: "bob".into(),
            revision: s.revision(),
        };
        assert_eq!(
            s.check(&bob, b"foo", b"", Access::Read).unwrap_err().kind,
            ApplyErrorKind::PermissionDenied
        );
    }

    #[test]
    fn revision_and_empty_user() {
        let (mut s, mut wb) = setup();
        let old = alice(&s);
        assert_eq!(
            s.check(&AuthInfo::default(), b"foo", b"", Access::Read)
                .unwrap_err()
                .kind,
            ApplyErrorKind::UserEmpty
        );
        s.role_revoke_permission(
            &AuthRoleRevokePermissionRequest {
                role: "r1".into(),
                key: b"bar".to_vec(),
                range_end: Vec::new(),
            },
            &mut wb,
        )
        .unwrap();
        assert_eq!(
            s.check(&old, b"foo", b"", Access::Read).unwrap_err().kind,
            ApplyErrorKind::AuthOldRevision
        );
        let new = alice(&s);
        assert!(s.check(&new, b"foo", b"", Access::Read).is_ok());
        assert!(s.check(&new, b"bar", b"", Access::Read).is_err());
        assert_eq!(
            s.check_admin(&new).unwrap_err().kind,
            ApplyErrorKind::PermissionDenied
        );
    }

    #[test]
    fn txn_checks_every_op_and_nested() {
        let (s, _) = setup();
        let a = alice(&s);
        let none = |_: i64| None;
        let put = |k: &str| RequestOp {
            request: Some(request_op::Request::RequestPut(
                keel_proto::etcdserverpb::PutRequest {
                    key: k.as_bytes().to_vec(),
                    ..Default::default()
                },
            )),
        };
        let ok_txn = TxnRequest {
            compare: vec![Compare {
                key: b"foo1".to_vec(),
                ..Default::default()
            }],
            success: vec![put("foo2")],
            failure: vec![put("a1")],
        };
        assert!(s.check_txn(&a, &ok_txn, &none).is_ok());
        let mut bad = ok_txn.clone();
        bad.failure.push(put("bar"));
        assert!(s.check_txn(&a, &bad, &none).is_err(), "failure branch too");
        let mut bad = ok_txn.clone();
        bad.compare.push(Compare {
            key: b"a".to_vec(),
            ..Default::default()
        });
        assert!(s.check_txn(&a, &bad, &none).is_err(), "compares need read");
        let nested = TxnRequest {
            success: vec![RequestOp {
                request: Some(request_op::Request::RequestTxn(TxnRequest {
                    success: vec![put("zzz")],
                    ..Default::default()
                })),
            }],
            ..Default::default()
        };
        assert!(s.check_txn(&a, &nested, &none).is_err(), "nested txn");
        let leased = |id: i64| (id != 0).then(|| vec![b"bar".to_vec()]);
        assert!(
            s.check_txn(&a, &ok_txn, &leased).is_ok(),
            "no lease attached"
        );
        let mut with_lease = ok_txn.clone();
        if let Some(request_op::Request::RequestPut(p)) = &mut with_lease.success[0].request {
            p.lease = 5;
        }
        assert!(
            s.check_txn(&a, &with_lease, &|id| (id == 5)
                .then(|| vec![b"bar".to_vec()]))
                .is_err(),
            "a lease holding a key alice cannot write"
        );
    }

    #[test]
    fn management_errors_and_persistence() {
        let (mut s, mut wb) = setup();
        let kind = |r: Result<(), ApplyError>| r.unwrap_err().kind;
        assert_eq!(
            kind(s.user_delete(
                &AuthUserDeleteRequest {
                    name: "root".into()
                },
                &mut wb,
                &mut Vec::new()
            )),
            ApplyErrorKind::InvalidAuthMgmt
        );
        assert_eq!(
            kind(s.role_delete(
                &AuthRoleDeleteRequest {
                    role: "root".into()
                },
                &mut wb
            )),
            ApplyErrorKind::InvalidAuthMgmt
        );
        assert_eq!(
            kind(s.role_add(&AuthRoleAddRequest { name: "r1".into() }, &mut wb)),
            ApplyErrorKind::RoleAlreadyExist
        );
        assert_eq!(
            kind(s.role_grant_permission(
                &AuthRoleGrantPermissionRequest {
                    name: "r1".into(),
                    perm: Some(perm(PermType::Read, "b", "a")),
                },
                &mut wb
            )),
            ApplyErrorKind::InvalidAuthMgmt
        );
        let mut tokens = Vec::new();
        s.role_delete(&AuthRoleDeleteRequest { role: "r1".into() }, &mut wb)
            .unwrap();
        assert!(s.user_get("alice").unwrap().is_empty(), "role removed");
        s.disable(&mut wb, &mut tokens);
        assert_eq!(tokens, vec![TokenOp::Clear]);

        let engine = crate::engine::memory::MemoryEngine::new();
        engine.write(wb, false).unwrap();
        let loaded = AuthState::load(&engine).unwrap();
        assert_eq!(loaded, s);
        assert_eq!(loaded.user_names(), vec!["alice", "root"]);
    }

    #[test]
    fn tokens_expire_and_are_invalidated() {
        let t = TokenTable::default();
        t.apply(vec![
            TokenOp::Assign {
                token: "a.1".into(),
                user: "alice".into(),
            },
            TokenOp::Assign {
                token: "b.2".into(),
                user: "bob".into(),
            },
        ]);
        let now = Instant::now();
        let ttl = Duration::from_secs(10);
        assert_eq!(t.lookup("a.1", now, ttl).as_deref(), Some("alice"));
        assert_eq!(t.lookup("x.1", now, ttl), None);
        assert_eq!(t.expire(now + Duration::from_secs(5), ttl), 2);
        assert_eq!(
            t.lookup("a.1", now + Duration::from_secs(11), ttl),
            None,
            "unused for the TTL"
        );
        t.apply(vec![TokenOp::InvalidateUser("bob".into())]);
        assert!(t.is_empty());
    }
}
