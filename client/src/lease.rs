//! Leases: grant, revoke, time-to-live, list, and a background keep-alive.
//!
//! ```no_run
//! # async fn f(client: keel_client::Client) -> keel_client::Result<()> {
//! let lease = client.lease_grant(10).await?;
//! let keeper = client.lease_keep_alive(lease.id).await?; // renewed every ttl/3 until dropped
//! client.put("workers/me", "alive").lease(lease.id).await?;
//! // ... the key lives as long as `keeper` does (plus the TTL once it is dropped).
//! keeper.lost().await; // resolves if the lease ends (expired, revoked, or unreachable past TTL)
//! # Ok(()) }
//! ```

use std::time::Duration;

use keel_proto::etcdserverpb::{self as pb, lease_client::LeaseClient};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;

use crate::client::{Client, Kind, MAX_MESSAGE};
use crate::error::{Error, Failure, Result, classify};
use crate::kv::Header;

fn lease(ch: tonic::transport::Channel) -> LeaseClient<tonic::transport::Channel> {
    LeaseClient::new(ch).max_decoding_message_size(MAX_MESSAGE)
}

/// A granted lease.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct LeaseGrant {
    /// Header.
    pub header: Header,
    /// The lease ID.
    pub id: i64,
    /// The TTL the server granted, in seconds.
    pub ttl: i64,
}

/// A lease's remaining time.
#[derive(Debug, Clone, Serialize)]
pub struct LeaseTimeToLive {
    /// Header.
    pub header: Header,
    /// The lease ID.
    pub id: i64,
    /// Seconds left; -1 when the lease does not exist (expired or revoked).
    pub ttl: i64,
    /// The TTL it was granted with.
    pub granted_ttl: i64,
    /// The keys attached (when asked for).
    #[serde(serialize_with = "ser_keys")]
    pub keys: Vec<Vec<u8>>,
}

fn ser_keys<S: serde::Serializer>(keys: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq;
    let mut seq = s.serialize_seq(Some(keys.len()))?;
    for k in keys {
        seq.serialize_element(&String::from_utf8_lossy(k))?;
    }
    seq.end()
}

impl Client {
    /// Grants a lease of `ttl` seconds with a server-chosen ID.
    pub async fn lease_grant(&self, ttl: i64) -> Result<LeaseGrant> {
        self.lease_grant_with_id(ttl, 0).await
    }

    /// Grants a lease with the given ID (0: server-chosen). Not retried once sent.
    pub async fn lease_grant_with_id(&self, ttl: i64, id: i64) -> Result<LeaseGrant> {
        let c = self.clone();
        let r = self
            .call(Kind::Write, move |ch| {
                let req = c.request(pb::LeaseGrantRequest { ttl, id }, true);
                async move { lease(ch).lease_grant(req).await }
            })
            .await?;
        if !r.error.is_empty() {
            return Err(Error::from_status(&tonic::Status::unknown(r.error)));
        }
        Ok(LeaseGrant {
            header: r.header.into(),
            id: r.id,
            ttl: r.ttl,
        })
    }

    /// Revokes a lease, deleting its keys. Revoking twice is harmless, so this is retried like
    /// a read; a retry that finds the lease gone answers [`Error::LeaseNotFound`].
    pub async fn lease_revoke(&self, id: i64) -> Result<Header> {
        let c = self.clone();
        let r = self
            .call(Kind::Read, move |ch| {
                let req = c.request(pb::LeaseRevokeRequest { id }, true);
                async move { lease(ch).lease_revoke(req).await }
            })
            .await?;
        Ok(r.header.into())
    }

    /// Remaining time of a lease (`ttl == -1`: it does not exist), and its keys if `keys`.
    pub async fn lease_time_to_live(&self, id: i64, keys: bool) -> Result<LeaseTimeToLive> {
        let c = self.clone();
        let r = self
            .call(Kind::Read, move |ch| {
                let req = c.request(pb::LeaseTimeToLiveRequest { id, keys }, true);
                async move { lease(ch).lease_time_to_live(req).await }
            })
            .await?;
        Ok(LeaseTimeToLive {
            header: r.header.into(),
            id: r.id,
            ttl: r.ttl,
            granted_ttl: r.granted_ttl,
            keys: r.keys,
        })
    }

    /// IDs of every live lease.
    pub async fn leases(&self) -> Result<Vec<i64>> {
        let c = self.clone();
        let r = self
            .call(Kind::Read, move |ch| {
                let req = c.request(pb::LeaseLeasesRequest {}, true);
                async move { lease(ch).lease_leases(req).await }
            })
            .await?;
        Ok(r.leases.into_iter().map(|l| l.id).collect())
    }

    /// Renews a lease once; returns the new TTL ([`Error::LeaseNotFound`] if it is gone).
    pub async fn lease_keep_alive_once(&self, id: i64) -> Result<i64> {
        let c = self.clone();
        let r = self
            .call(Kind::Read, move |ch| {
                let req =
                    c.stream_request(futures::stream::iter([pb::LeaseKeepAliveRequest { id }]));
                async move {
                    let mut s = lease(ch).lease_keep_alive(req).await?.into_inner();
                    match s.message().await? {
                        Some(r) => Ok(tonic::Response::new(r)),
                        None => Err(tonic::Status::unavailable("keep-alive stream closed")),
                    }
                }
            })
            .await?;
        if r.ttl <= 0 {
            return Err(Error::LeaseNotFound);
        }
        Ok(r.ttl)
    }

    /// Starts renewing lease `id` in the background (every third of its TTL, over one stream
    /// that moves to another endpoint when its member fails). Renews once before returning, so
    /// a lease that is already gone fails here with [`Error::LeaseNotFound`]. Dropping the
    /// returned [`LeaseKeeper`] stops the renewals (the lease then expires after its TTL).
    pub async fn lease_keep_alive(&self, id: i64) -> Result<LeaseKeeper> {
        let sent = Instant::now();
        let ttl = self.lease_keep_alive_once(id).await?;
        let (state_tx, state_rx) = watch::channel(LeaseState::Alive {
            ttl,
            deadline: sent + Duration::from_secs(ttl as u64),
        });
        let task = tokio::spawn(keep_alive_task(self.clone(), id, ttl, state_tx));
        Ok(LeaseKeeper {
            id,
            state: state_rx,
            task,
            client: self.clone(),
        })
    }
}

/// What a [`LeaseKeeper`] knows about its lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// Renewed: the lease lives at least until `deadline` (measured from when the renewal was
    /// sent, so it is never later than the server's own deadline).
    Alive {
        /// The TTL of the last renewal, seconds.
        ttl: i64,
        /// The lease lives at least until then.
        deadline: Instant,
    },
    /// No renewal reached the cluster before the deadline passed: the lease has probably
    /// expired (a new Raft leader may have extended it; renewals go on in case).
    Unknown,
    /// The server says the lease no longer exists.
    Expired,
}

/// Keeps a lease alive in the background; dropping it stops the renewals.
pub struct LeaseKeeper {
    id: i64,
    state: watch::Receiver<LeaseState>,
    task: tokio::task::JoinHandle<()>,
    client: Client,
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl std::fmt::Debug for LeaseKeeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseKeeper")
            .field("id", &self.id)
            .field("state", &*self.state.borrow())
            .finish()
    }
}

impl LeaseKeeper {
    /// The lease ID.
    pub fn id(&self) -> i64 {
        self.id
    }
    /// The current state.
    pub fn state(&self) -> LeaseState {
        let s = *self.state.borrow();
        match s {
            LeaseState::Alive { deadline, .. } if deadline <= Instant::now() => LeaseState::Unknown,
            s => s,
        }
    }
    /// True while the lease is known to be alive.
    pub fn is_alive(&self) -> bool {
        matches!(self.state(), LeaseState::Alive { .. })
    }
    /// A receiver of state changes.
    pub fn subscribe(&self) -> watch::Receiver<LeaseState> {
        self.state.clone()
    }
    /// Resolves once the lease is no longer known to be alive: the server said it expired, or
    /// its deadline passed without a renewal.
    pub async fn lost(&self) {
        let mut rx = self.state.clone();
        loop {
            let s = *rx.borrow_and_update();
            match s {
                LeaseState::Alive { deadline, .. } => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(deadline) => {
                            if let LeaseState::Alive { deadline: d2, .. } = *rx.borrow() && d2 > Instant::now() {
                                continue;
                            }
                            return;
                        }
                        r = rx.changed() => if r.is_err() { return },
                    }
                }
                _ => return,
            }
        }
    }
    /// Stops the renewals and revokes the lease (deleting its keys).
    pub async fn revoke(self) -> Result<()> {
        self.task.abort();
        match self.client.lease_revoke(self.id).await {
            Ok(_) | Err(Error::LeaseNotFound) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

async fn keep_alive_task(client: Client, id: i64, mut ttl: i64, state: watch::Sender<LeaseState>) {
    let mut failures = 0u32;
    loop {
        let (idx, ch) = client.pick();
        let (req_tx, req_rx) = mpsc::channel(4);
        let stream = lease(ch)
            .lease_keep_alive(client.stream_request(ReceiverStream::new(req_rx)))
            .await;
        let mut stream = match stream {
            Ok(s) => s.into_inner(),
            Err(status) => {
                if classify(&status) == Failure::BadToken {
                    let _ = client.authenticate(client.token_generation()).await;
                } else {
                    client.mark_down(idx);
                }
                failures += 1;
                tokio::time::sleep(client.inner.opts.retry.backoff(failures.min(5))).await;
                continue;
            }
        };
        // Renew at once on a new stream, then every third of the TTL.
        let mut next = Instant::now();
        let mut sent_at = Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {
                    sent_at = Instant::now();
                    if req_tx.send(pb::LeaseKeepAliveRequest { id }).await.is_err() {
                        break;
                    }
                    next = sent_at + Duration::from_millis((ttl.max(1) as u64) * 1000 / 3);
                }
                msg = stream.message() => match msg {
                    Ok(Some(r)) => {
                        failures = 0;
                        if r.ttl <= 0 {
                            let _ = state.send(LeaseState::Expired);
                            return;
                        }
                        ttl = r.ttl;
                        let _ = state.send(LeaseState::Alive {
                            ttl,
                            deadline: sent_at + Duration::from_secs(ttl as u64),
                        });
                    }
                    Ok(None) | Err(_) => {
                        client.mark_down(idx);
                        break;
                    }
                },
            }
        }
        failures += 1;
        tokio::time::sleep(client.inner.opts.retry.backoff(failures.min(5))).await;
    }
}
