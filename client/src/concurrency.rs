//! Locks and elections over the server's `v3lockpb.Lock` and `v3electionpb.Election` services
//! (etcd's `concurrency` recipes run inside the server).
//!
//! A lock or a candidacy lives as long as its lease: keep the lease alive (see
//! [`Client::lease_keep_alive`]) for as long as you hold it, and use the returned revision as a
//! fencing token — guard the protected writes with
//! `Compare::create_revision(key).eq(rev)` so a holder that lost its lease cannot write.
//!
//! [`Client::lock_session`] does it all: a lease of its own, kept alive, and a guard whose
//! [`LockGuard::fence`] is the compare to put in every protected transaction.
//!
//! ```no_run
//! # async fn f(client: keel_client::Client) -> keel_client::Result<()> {
//! use keel_client::Op;
//! let guard = client.lock_session("locks/leader-only-job", 10).await?;
//! let r = client.txn().when([guard.fence()]).and_then([Op::put("job/state", "running")]).await?;
//! assert!(r.succeeded, "false only if the lock was lost meanwhile");
//! guard.unlock().await?;
//! # Ok(()) }
//! ```
//!
//! Or by hand:
//!
//! ```no_run
//! # async fn f(client: keel_client::Client) -> keel_client::Result<()> {
//! let lease = client.lease_grant(10).await?;
//! let _keeper = client.lease_keep_alive(lease.id).await?;
//! let lock = client.lock("locks/db-migration", lease.id).await?; // waits for its turn
//! // ... work, fenced by lock.revision ...
//! client.unlock(lock.key.clone()).await?;
//! # Ok(()) }
//! ```

use futures::Stream;
use keel_proto::v3electionpb::{self as epb, election_client::ElectionClient};
use keel_proto::v3lockpb::{self as lpb, lock_client::LockClient};
use serde::Serialize;

use crate::client::{Client, Kind, MAX_MESSAGE};
use crate::error::{Error, Result};
use crate::kv::{Compare, Header, KeyValue};
use crate::lease::LeaseKeeper;

/// A held lock.
#[derive(Debug, Clone, Serialize)]
pub struct LockKey {
    /// Header.
    pub header: Header,
    /// The lock's key (`<name>/<lease in hex>`); pass it to [`Client::unlock`].
    #[serde(serialize_with = "crate::kv::ser_bytes")]
    pub key: Vec<u8>,
    /// The key's create revision: a fencing token that grows with every new holder.
    pub revision: i64,
}

/// The leader of an election, as [`Client::campaign`] returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LeaderKey {
    /// The election's name.
    #[serde(serialize_with = "crate::kv::ser_bytes")]
    pub name: Vec<u8>,
    /// The leader's key.
    #[serde(serialize_with = "crate::kv::ser_bytes")]
    pub key: Vec<u8>,
    /// Its create revision (a fencing token).
    pub rev: i64,
    /// Its lease.
    pub lease: i64,
}

impl From<epb::LeaderKey> for LeaderKey {
    fn from(k: epb::LeaderKey) -> Self {
        LeaderKey {
            name: k.name,
            key: k.key,
            rev: k.rev,
            lease: k.lease,
        }
    }
}

impl From<&LeaderKey> for epb::LeaderKey {
    fn from(k: &LeaderKey) -> Self {
        epb::LeaderKey {
            name: k.name.clone(),
            key: k.key.clone(),
            rev: k.rev,
            lease: k.lease,
        }
    }
}

fn lock(ch: tonic::transport::Channel) -> LockClient<tonic::transport::Channel> {
    LockClient::new(ch).max_decoding_message_size(MAX_MESSAGE)
}

fn election(ch: tonic::transport::Channel) -> ElectionClient<tonic::transport::Channel> {
    ElectionClient::new(ch).max_decoding_message_size(MAX_MESSAGE)
}

impl Client {
    /// Acquires the lock `name` with lease `lease`, waiting for earlier holders. Not retried
    /// once sent: if the answer is lost ([`Error::Ambiguous`]) the lock key may exist; revoke
    /// the lease to be sure it goes away.
    pub async fn lock(&self, name: impl Into<Vec<u8>>, lease: i64) -> Result<LockKey> {
        let name = name.into();
        let c = self.clone();
        let r = self
            .call_blocking(Kind::Write, move |ch| {
                let req = c.request(
                    lpb::LockRequest {
                        name: name.clone(),
                        lease,
                    },
                    false,
                );
                async move { lock(ch).lock(req).await }
            })
            .await?;
        let key = r.key;
        // The fencing token: the key's create revision.
        let revision = self
            .get(key.clone())
            .await?
            .first()
            .map(|kv| kv.create_revision)
            .ok_or_else(|| Error::SessionExpired("lock key vanished".into()))?;
        Ok(LockKey {
            header: r.header.into(),
            key,
            revision,
        })
    }

    /// Releases a lock (deletes its key; harmless if already gone).
    pub async fn unlock(&self, key: impl Into<Vec<u8>>) -> Result<Header> {
        let key = key.into();
        let c = self.clone();
        let r = self
            .call(Kind::Read, move |ch| {
                let req = c.request(lpb::UnlockRequest { key: key.clone() }, true);
                async move { lock(ch).unlock(req).await }
            })
            .await?;
        Ok(r.header.into())
    }

    /// Campaigns in election `name` with `value`, waiting until elected. The candidacy lives as
    /// long as `lease`. Not retried once sent.
    pub async fn campaign(
        &self,
        name: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        lease: i64,
    ) -> Result<LeaderKey> {
        let (name, value) = (name.into(), value.into());
        let c = self.clone();
        let r = self
            .call_blocking(Kind::Write, move |ch| {
                let req = c.request(
                    epb::CampaignRequest {
                        name: name.clone(),
                        lease,
                        value: value.clone(),
                    },
                    false,
                );
                async move { election(ch).campaign(req).await }
            })
            .await?;
        r.leader.map(Into::into).ok_or(Error::NoElectionLeader)
    }

    /// Updates the leader's value ([`Error::NotElectionLeader`] if `leader` no longer leads).
    pub async fn proclaim(&self, leader: &LeaderKey, value: impl Into<Vec<u8>>) -> Result<Header> {
        let value = value.into();
        let lk: epb::LeaderKey = leader.into();
        let c = self.clone();
        let r = self
            .call(Kind::Write, move |ch| {
                let req = c.request(
                    epb::ProclaimRequest {
                        leader: Some(lk.clone()),
                        value: value.clone(),
                    },
                    true,
                );
                async move { election(ch).proclaim(req).await }
            })
            .await?;
        Ok(r.header.into())
    }

    /// The current leader's key-value ([`Error::NoElectionLeader`] if nobody leads).
    pub async fn election_leader(&self, name: impl Into<Vec<u8>>) -> Result<KeyValue> {
        let name = name.into();
        let c = self.clone();
        let r = self
            .call(Kind::Read, move |ch| {
                let req = c.request(epb::LeaderRequest { name: name.clone() }, true);
                async move { election(ch).leader(req).await }
            })
            .await?;
        r.kv.map(Into::into).ok_or(Error::NoElectionLeader)
    }

    /// Gives up leadership (deletes the leader key; harmless if already gone).
    pub async fn resign(&self, leader: &LeaderKey) -> Result<Header> {
        let lk: epb::LeaderKey = leader.into();
        let c = self.clone();
        let r = self
            .call(Kind::Read, move |ch| {
                let req = c.request(
                    epb::ResignRequest {
                        leader: Some(lk.clone()),
                    },
                    true,
                );
                async move { election(ch).resign(req).await }
            })
            .await?;
        Ok(r.header.into())
    }

    /// A stream of the election's successive leaders (each leader's key-value as it changes).
    /// The stream ends when its connection does; call again to go on.
    pub async fn observe(
        &self,
        name: impl Into<Vec<u8>>,
    ) -> Result<impl Stream<Item = Result<KeyValue>> + Send + 'static> {
        use futures::StreamExt;
        let name = name.into();
        let c = self.clone();
        let s = self
            .call_blocking(Kind::Read, move |ch| {
                let req = c.stream_request(epb::LeaderRequest { name: name.clone() });
                async move { election(ch).observe(req).await }
            })
            .await?;
        Ok(s.map(|r| match r {
            Ok(r) => r.kv.map(Into::into).ok_or(Error::NoElectionLeader),
            Err(s) => Err(Error::from_status(&s)),
        }))
    }
}

/// A lock held on a lease of its own that is kept alive in the background. Dropping the guard
/// stops the keep-alive: the lock is released when the lease expires (up to its TTL later);
/// call [`LockGuard::unlock`] to release it at once.
pub struct LockGuard {
    client: Client,
    lock: LockKey,
    keeper: LeaseKeeper,
}

impl std::fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockGuard")
            .field("key", &String::from_utf8_lossy(&self.lock.key))
            .field("revision", &self.lock.revision)
            .field("lease", &self.keeper.id())
            .finish()
    }
}

impl LockGuard {
    /// The lock key.
    pub fn key(&self) -> &[u8] {
        &self.lock.key
    }
    /// The fencing token (the lock key's create revision).
    pub fn revision(&self) -> i64 {
        self.lock.revision
    }
    /// The lease the lock lives on.
    pub fn lease(&self) -> i64 {
        self.keeper.id()
    }
    /// The condition "this lock is still held": add it to every transaction the lock protects.
    pub fn fence(&self) -> Compare {
        Compare::create_revision(self.lock.key.clone()).eq(self.lock.revision)
    }
    /// True while the lease is known to be alive.
    pub fn is_held(&self) -> bool {
        self.keeper.is_alive()
    }
    /// Resolves when the lock's lease is no longer known to be alive.
    pub async fn lost(&self) {
        self.keeper.lost().await
    }
    /// Releases the lock and revokes its lease.
    pub async fn unlock(self) -> Result<()> {
        let r = self.client.unlock(self.lock.key.clone()).await;
        self.keeper.revoke().await?;
        r.map(|_| ())
    }
}

impl Client {
    /// Acquires lock `name` on a fresh lease of `ttl` seconds that is kept alive until the
    /// guard is dropped or unlocked. Waits for earlier holders. If acquiring fails, the lease is
    /// revoked (so an ambiguous attempt leaves no lock behind).
    pub async fn lock_session(&self, name: impl Into<Vec<u8>>, ttl: i64) -> Result<LockGuard> {
        let lease = self.lease_grant(ttl).await?;
        let keeper = match self.lease_keep_alive(lease.id).await {
            Ok(k) => k,
            Err(e) => {
                let _ = self.lease_revoke(lease.id).await;
                return Err(e);
            }
        };
        let lock = tokio::select! {
            r = self.lock(name, lease.id) => r,
            _ = keeper.lost() => Err(Error::SessionExpired("lease lost while waiting for the lock".into())),
        };
        match lock {
            Ok(lock) => Ok(LockGuard {
                client: self.clone(),
                lock,
                keeper,
            }),
            Err(e) => {
                let _ = keeper.revoke().await;
                Err(e)
            }
        }
    }
}
