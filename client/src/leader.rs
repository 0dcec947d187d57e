//! Leader election for controller replicas.
//!
//! Built on the server's `v3electionpb.Election` service: each replica grants a lease of `ttl`
//! seconds, keeps it alive, and campaigns with it (the server queues candidates by the create
//! revision of their key `<name>/<lease>`; the oldest leads). A replica **gains** leadership
//! when its campaign returns, and **loses** it when
//! - its lease is no longer known to be alive (expired, or no renewal acknowledged before the
//!   lease's deadline as measured locally from when the renewal was sent — a replica cut off
//!   from the cluster steps down by itself no later than the cluster expires its lease),
//! - its leader key is deleted (someone resigned it for us, or an operator deleted it), or
//! - it resigns ([`ElectorHandle::resign`]) or is stopped.
//!
//! After a loss it campaigns again with a fresh lease. A replica that crashes stops renewing;
//! the others take over once its lease expires (at most `ttl` seconds).
//!
//! Leadership is advisory, like every lease-based lock: guard the writes a leader makes with
//! the fencing token [`Leadership::rev`] (the leader key's create revision), e.g.
//! `Compare::create_revision(&leadership.key).eq(leadership.rev)` in each transaction, so a
//! deposed leader's late writes fail instead of overwriting its successor's.
//!
//! ```no_run
//! # async fn f(client: keel_client::Client) -> keel_client::Result<()> {
//! use keel_client::LeaderElector;
//! let elector = LeaderElector::new(client, "controllers/replicaset", "replica-1")
//!     .ttl(5)
//!     .on_elected(|l| println!("leading with token {}", l.rev))
//!     .on_lost(|| println!("lost leadership"))
//!     .spawn();
//! loop {
//!     let leadership = elector.wait_leader().await;
//!     tokio::select! {
//!         _ = elector.wait_lost() => continue,        // stop acting at once
//!         _ = async { /* reconcile, fenced by leadership.rev */ } => {}
//!     }
//! }
//! # }
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::watch;

use crate::client::Client;
use crate::concurrency::LeaderKey;
use crate::watch::{EventKind, WatchEvent, WatchOptions};

/// This replica's leadership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leadership {
    /// The leader key (`<name>/<lease in hex>`).
    pub key: Vec<u8>,
    /// Its create revision: the fencing token.
    pub rev: i64,
    /// The lease the leadership lives on.
    pub lease: i64,
    /// The election's name.
    pub name: Vec<u8>,
}

/// Where a replica stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Campaigning (or between campaigns).
    Candidate,
    /// Leading.
    Leader(Leadership),
    /// The elector was stopped.
    Stopped,
}

type ElectedFn = Arc<dyn Fn(&Leadership) + Send + Sync>;
type LostFn = Arc<dyn Fn() + Send + Sync>;

/// Builder of a leader elector.
pub struct LeaderElector {
    client: Client,
    name: Vec<u8>,
    value: Vec<u8>,
    ttl: i64,
    on_elected: Option<ElectedFn>,
    on_lost: Option<LostFn>,
}

impl LeaderElector {
    /// Campaign in election `name`, announcing `value` (this replica's identity) as leader.
    pub fn new(client: Client, name: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        LeaderElector {
            client,
            name: name.into(),
            value: value.into(),
            ttl: 10,
            on_elected: None,
            on_lost: None,
        }
    }
    /// Lease TTL in seconds (default 10): how long a crashed leader blocks the others.
    pub fn ttl(mut self, secs: i64) -> Self {
        self.ttl = secs;
        self
    }
    /// Called (from the elector's task) on gaining leadership.
    pub fn on_elected(mut self, f: impl Fn(&Leadership) + Send + Sync + 'static) -> Self {
        self.on_elected = Some(Arc::new(f));
        self
    }
    /// Called (from the elector's task) on losing leadership.
    pub fn on_lost(mut self, f: impl Fn() + Send + Sync + 'static) -> Self {
        self.on_lost = Some(Arc::new(f));
        self
    }
    /// Starts campaigning. Dropping the handle stops (without resigning: the lease expires).
    pub fn spawn(self) -> ElectorHandle {
        let (role_tx, role_rx) = watch::channel(Role::Candidate);
        let (resign_tx, resign_rx) = watch::channel(0u64);
        let stopping = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(run(self, role_tx, resign_rx, stopping.clone()));
        ElectorHandle {
            role: role_rx,
            resign: resign_tx,
            stopping,
            task,
        }
    }
}

/// A running elector.
pub struct ElectorHandle {
    role: watch::Receiver<Role>,
    resign: watch::Sender<u64>,
    stopping: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ElectorHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ElectorHandle {
    /// The current role.
    pub fn role(&self) -> Role {
        self.role.borrow().clone()
    }
    /// The current leadership, if leading.
    pub fn leadership(&self) -> Option<Leadership> {
        match &*self.role.borrow() {
            Role::Leader(l) => Some(l.clone()),
            _ => None,
        }
    }
    /// True while leading.
    pub fn is_leader(&self) -> bool {
        self.leadership().is_some()
    }
    /// Role changes as they happen.
    pub fn subscribe(&self) -> watch::Receiver<Role> {
        self.role.clone()
    }
    /// Waits until this replica leads.
    pub async fn wait_leader(&self) -> Leadership {
        let mut rx = self.role.clone();
        loop {
            if let Role::Leader(l) = &*rx.borrow_and_update() {
                return l.clone();
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
    /// Waits until this replica does not lead (at once if it does not).
    pub async fn wait_lost(&self) {
        let mut rx = self.role.clone();
        let _ = rx.wait_for(|r| !matches!(r, Role::Leader(_))).await;
    }
    /// Gives up leadership now (others may take it); this replica campaigns again afterwards.
    pub fn resign(&self) {
        self.resign.send_modify(|n| *n += 1);
    }
    /// Stops campaigning: resigns if leading and revokes the lease, so another replica can
    /// take over at once (waits up to 5 s for that).
    pub async fn stop(mut self) {
        self.stopping.store(true, Ordering::Release);
        self.resign();
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.task).await;
    }
}

async fn run(
    cfg: LeaderElector,
    role: watch::Sender<Role>,
    mut resign: watch::Receiver<u64>,
    stopping: Arc<AtomicBool>,
) {
    let client = &cfg.client;
    let mut failures = 0u32;
    loop {
        if stopping.load(Ordering::Acquire) {
            let _ = role.send(Role::Stopped);
            return;
        }
        if failures > 0 {
            tokio::time::sleep(client.inner.opts.retry.backoff(failures.min(6))).await;
        }
        let lease = match client.lease_grant(cfg.ttl).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "elector: lease grant failed");
                failures += 1;
                continue;
            }
        };
        let keeper = match client.lease_keep_alive(lease.id).await {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(error = %e, "elector: keep-alive failed");
                failures += 1;
                continue;
            }
        };
        resign.borrow_and_update();
        let campaign = tokio::select! {
            r = client.campaign(cfg.name.clone(), cfg.value.clone(), lease.id) => r,
            _ = keeper.lost() => {
                tracing::info!("elector: lease lost while campaigning");
                failures += 1;
                continue;
            }
            _ = resign.changed() => {
                // Stopping (or a resign while not leading): drop the candidacy.
                let _ = keeper.revoke().await;
                continue;
            }
        };
        let leader: LeaderKey = match campaign {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "elector: campaign failed");
                // The candidacy key may exist (ambiguous); revoking the lease removes it.
                let _ = keeper.revoke().await;
                failures += 1;
                continue;
            }
        };
        failures = 0;
        let leadership = Leadership {
            key: leader.key.clone(),
            rev: leader.rev,
            lease: lease.id,
            name: cfg.name.clone(),
        };
        // Watch our key before announcing, so a deletion cannot slip by.
        let watch = client
            .watch(
                leader.key.clone(),
                WatchOptions::new().start_revision(leader.rev),
            )
            .await;
        let mut watcher = match watch {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "elector: cannot watch the leader key");
                let _ = client.resign(&leader).await;
                let _ = keeper.revoke().await;
                failures += 1;
                continue;
            }
        };
        tracing::info!(rev = leader.rev, "elector: elected");
        let _ = role.send(Role::Leader(leadership.clone()));
        if let Some(f) = &cfg.on_elected {
            f(&leadership);
        }
        let resigned = loop {
            tokio::select! {
                _ = keeper.lost() => break false,
                _ = resign.changed() => break true,
                ev = watcher.next() => match ev {
                    Some(Ok(WatchEvent::Events { events, .. }))
                        if events.iter().any(|e| e.kind == EventKind::Delete) => break false,
                    Some(Ok(WatchEvent::Compacted { .. })) | Some(Err(_)) | None => {
                        // Cannot follow the key any more: check it once, else step down.
                        match client.get(leader.key.clone()).await {
                            Ok(r) if r.first().is_some_and(|kv| kv.create_revision == leader.rev) => {
                                match client.watch(leader.key.clone(), WatchOptions::new()).await {
                                    Ok(w) => watcher = w,
                                    Err(_) => break false,
                                }
                            }
                            _ => break false,
                        }
                    }
                    _ => {}
                },
            }
        };
        let _ = role.send(Role::Candidate);
        tracing::info!(resigned, "elector: leadership lost");
        if let Some(f) = &cfg.on_lost {
            f();
        }
        let _ = client.resign(&leader).await;
        let _ = keeper.revoke().await;
        if resigned {
            // Let another replica take over before campaigning again.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
