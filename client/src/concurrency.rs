//! Locks and elections over the server's `v3lockpb.Lock` and `v3electionpb.Election` services
//! (etcd's `concurrency` recipes run inside the server).
//!
//! A lock or a candidacy lives as long as its lease: keep the lease alive (see
//! [`Client::lease_keep_alive`]) for as long as you hold it, and use the returned revision as a
//! fencing token — guard the protected writes with
//! `Compare::create_revision(key).eq(rev)` so a holder that lost its lease cannot write.
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
use crate::kv::{Header, KeyValue};

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
