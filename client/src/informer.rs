//! Informers: a local, always-converging copy of every key under a prefix, with change
//! notifications (client-go's list-watch pattern over Keel).
//!
//! An informer lists the prefix at one revision (page by page, every page at that same
//! revision), then watches from that revision + 1. Changes update a local `BTreeMap` cache
//! ([`Store`]) and call the handler with [`InformerEvent`]s. If the watch's history is compacted
//! away, or the watch fails, it lists again and reports only the differences, so handlers see
//! each key's changes in order and the cache always converges to the cluster's state. An
//! optional periodic resync replays every cached key as an `Updated` with `old == new`, which
//! makes level-triggered controllers re-check everything now and then.
//!
//! ```no_run
//! # async fn f(client: keel_client::Client) -> keel_client::Result<()> {
//! use keel_client::{Informer, InformerEvent};
//! let informer = Informer::new(client, "services/")
//!     .page_size(500)
//!     .spawn(|ev: InformerEvent| match ev {
//!         InformerEvent::Added(kv) => println!("+ {}", kv.key_str()),
//!         InformerEvent::Updated { new, .. } => println!("~ {}", new.key_str()),
//!         InformerEvent::Deleted(kv) => println!("- {}", kv.key_str()),
//!         InformerEvent::Synced { revision } => println!("in sync at {revision}"),
//!     });
//! informer.wait_synced().await;
//! let services = informer.store().list();
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use tokio::sync::watch;

use crate::client::Client;
use crate::kv::KeyValue;
use crate::watch::{EventKind, WatchEvent, WatchOptions};

/// A change seen by an informer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InformerEvent {
    /// A key appeared.
    Added(KeyValue),
    /// A key changed (or, on a resync, `old == new`).
    Updated {
        /// Before.
        old: KeyValue,
        /// After.
        new: KeyValue,
    },
    /// A key went away (`old` is its last known state).
    Deleted(KeyValue),
    /// The cache holds exactly the state at `revision` (after each list or relist).
    Synced {
        /// The list's revision.
        revision: i64,
    },
}

/// Receives an informer's events, in order, from its task. Keep it quick (queue work
/// elsewhere). Implemented for `FnMut(InformerEvent)` closures.
pub trait Handler: Send + 'static {
    /// Called for each change.
    fn handle(&mut self, event: InformerEvent);
}

impl<F: FnMut(InformerEvent) + Send + 'static> Handler for F {
    fn handle(&mut self, event: InformerEvent) {
        self(event)
    }
}

/// The informer's cache: every key under the prefix as of [`Store::revision`].
#[derive(Clone, Default)]
pub struct Store {
    map: Arc<RwLock<BTreeMap<Vec<u8>, KeyValue>>>,
    revision: Arc<AtomicI64>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("len", &self.len())
            .field("revision", &self.revision())
            .finish()
    }
}

impl Store {
    /// One key.
    pub fn get(&self, key: impl AsRef<[u8]>) -> Option<KeyValue> {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key.as_ref())
            .cloned()
    }
    /// Every key, in key order.
    pub fn list(&self) -> Vec<KeyValue> {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }
    /// Every key starting with `prefix`, in key order.
    pub fn list_prefix(&self, prefix: impl AsRef<[u8]>) -> Vec<KeyValue> {
        let p = prefix.as_ref();
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .range(p.to_vec()..)
            .take_while(|(k, _)| k.starts_with(p))
            .map(|(_, v)| v.clone())
            .collect()
    }
    /// Number of keys.
    pub fn len(&self) -> usize {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The revision the cache reflects.
    pub fn revision(&self) -> i64 {
        self.revision.load(Ordering::Acquire)
    }
}

/// Builder of an informer over a prefix.
pub struct Informer {
    client: Client,
    prefix: Vec<u8>,
    page_size: i64,
    resync: Option<Duration>,
}

impl Informer {
    /// An informer over every key starting with `prefix`.
    pub fn new(client: Client, prefix: impl Into<Vec<u8>>) -> Self {
        Informer {
            client,
            prefix: prefix.into(),
            page_size: 1000,
            resync: None,
        }
    }
    /// Keys per list request (default 1000; 0: all at once).
    pub fn page_size(mut self, n: i64) -> Self {
        self.page_size = n;
        self
    }
    /// Replays every cached key as `Updated { old == new }` this often.
    pub fn resync_every(mut self, d: Duration) -> Self {
        self.resync = Some(d);
        self
    }
    /// Starts the informer's task. Dropping the handle stops it.
    pub fn spawn(self, handler: impl Handler) -> InformerHandle {
        let store = Store::default();
        let (synced_tx, synced_rx) = watch::channel(0i64);
        let relists = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(run(
            self,
            Box::new(handler),
            store.clone(),
            synced_tx,
            relists.clone(),
        ));
        InformerHandle {
            store,
            synced: synced_rx,
            relists,
            task,
        }
    }
}

/// A running informer; dropping it stops it.
pub struct InformerHandle {
    store: Store,
    synced: watch::Receiver<i64>,
    relists: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for InformerHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl InformerHandle {
    /// The cache.
    pub fn store(&self) -> Store {
        self.store.clone()
    }
    /// Waits for the first complete list.
    pub async fn wait_synced(&self) {
        let mut rx = self.synced.clone();
        let _ = rx.wait_for(|r| *r > 0).await;
    }
    /// Lists done so far (1 after the initial list; more after compactions or failures).
    pub fn lists(&self) -> u64 {
        self.relists.load(Ordering::Acquire)
    }
    /// Stops the informer.
    pub fn stop(self) {}
}

async fn run(
    cfg: Informer,
    mut handler: Box<dyn Handler>,
    store: Store,
    synced: watch::Sender<i64>,
    lists: Arc<AtomicU64>,
) {
    let client = &cfg.client;
    let mut failures = 0u32;
    let mut resync = cfg.resync.map(|d| {
        let mut i = tokio::time::interval_at(tokio::time::Instant::now() + d, d);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    loop {
        if failures > 0 {
            tokio::time::sleep(client.inner.opts.retry.backoff(failures.min(6))).await;
        }
        // List.
        let (kvs, revision) = match client.list_prefix(cfg.prefix.clone(), cfg.page_size).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "informer list failed");
                failures += 1;
                continue;
            }
        };
        let fresh: BTreeMap<Vec<u8>, KeyValue> =
            kvs.into_iter().map(|kv| (kv.key.clone(), kv)).collect();
        let old = std::mem::replace(
            &mut *store.map.write().unwrap_or_else(PoisonError::into_inner),
            fresh.clone(),
        );
        store.revision.store(revision, Ordering::Release);
        for (k, new) in &fresh {
            match old.get(k) {
                None => handler.handle(InformerEvent::Added(new.clone())),
                Some(o) if o.mod_revision != new.mod_revision => {
                    handler.handle(InformerEvent::Updated {
                        old: o.clone(),
                        new: new.clone(),
                    })
                }
                Some(_) => {}
            }
        }
        for (k, o) in &old {
            if !fresh.contains_key(k) {
                handler.handle(InformerEvent::Deleted(o.clone()));
            }
        }
        lists.fetch_add(1, Ordering::AcqRel);
        handler.handle(InformerEvent::Synced { revision });
        let _ = synced.send(revision);

        // Watch from the list's revision + 1.
        let mut watcher = match client
            .watch(
                cfg.prefix.clone(),
                WatchOptions::new()
                    .prefix()
                    .start_revision(revision + 1)
                    .progress_notify(),
            )
            .await
        {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "informer watch failed");
                failures += 1;
                continue;
            }
        };
        failures = 0;
        loop {
            let tick = async {
                match resync.as_mut() {
                    Some(i) => {
                        i.tick().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                ev = watcher.next() => match ev {
                    Some(Ok(WatchEvent::Events { events, .. })) => {
                        for e in events {
                            let rev = e.kv.mod_revision;
                            match e.kind {
                                EventKind::Put => {
                                    let prev = store
                                        .map
                                        .write()
                                        .unwrap_or_else(PoisonError::into_inner)
                                        .insert(e.kv.key.clone(), e.kv.clone());
                                    store.revision.store(rev, Ordering::Release);
                                    handler.handle(match prev {
                                        None => InformerEvent::Added(e.kv),
                                        Some(old) => InformerEvent::Updated { old, new: e.kv },
                                    });
                                }
                                EventKind::Delete => {
                                    let prev = store.map.write().unwrap_or_else(PoisonError::into_inner).remove(&e.kv.key);
                                    store.revision.store(rev, Ordering::Release);
                                    if let Some(old) = prev {
                                        handler.handle(InformerEvent::Deleted(old));
                                    }
                                }
                            }
                        }
                    }
                    Some(Ok(WatchEvent::Progress { revision })) => {
                        store.revision.fetch_max(revision, Ordering::AcqRel);
                    }
                    Some(Ok(WatchEvent::Compacted { compact_revision })) => {
                        tracing::info!(compact_revision, "informer watch compacted; relisting");
                        break;
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "informer watch failed; relisting");
                        failures += 1;
                        break;
                    }
                    None => {
                        failures += 1;
                        break;
                    }
                },
                _ = tick => {
                    for kv in store.list() {
                        handler.handle(InformerEvent::Updated { old: kv.clone(), new: kv });
                    }
                }
            }
        }
    }
}
