//! A slim declarative control plane on Keel, in three parts:
//!
//! - [`Api`]: a declarative API server over JSON objects. `ReplicaSet`s live under
//!   `/cp/replicasets/<name>`; every object has a `generation` (bumped when its spec changes) and a
//!   resource version (the key's mod revision); updates are compare-and-swap on that version, so
//!   concurrent writers never lose each other's changes (they get [`ApiError::Conflict`]).
//! - [`NodeAgent`]: a simulated kubelet. It registers `/cp/nodes/<name>` on a lease and keeps
//!   alive the lease of every "pod" scheduled on it. Pods are keys `/cp/pods/<rs>/<pod>` bound to
//!   their own lease: when their node dies they expire by themselves.
//! - [`Controller`]: the ReplicaSet controller. Replicas elect a leader ([`LeaderElector`]); the
//!   leader runs informers over replica sets, pods and nodes, diffs desired against actual,
//!   creates or deletes pods, writes status, and requeues on failure. Every write it makes is
//!   fenced by its leadership (`create_revision(leader key) == token`), so a deposed leader
//!   cannot act.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_client::{
    Client, Compare, Error, Informer, InformerEvent, KeyValue, LeaderElector, Leadership,
    LeaseKeeper, Op,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

pub const RS_PREFIX: &str = "/cp/replicasets/";
pub const POD_PREFIX: &str = "/cp/pods/";
pub const NODE_PREFIX: &str = "/cp/nodes/";
pub const ELECTION: &str = "/cp/election/replicaset-controller";

pub fn rs_key(name: &str) -> String {
    format!("{RS_PREFIX}{name}")
}
pub fn pods_of(rs: &str) -> String {
    format!("{POD_PREFIX}{rs}/")
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Spec {
    pub replicas: u32,
    pub image: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RsStatus {
    /// Pods running the current image.
    pub replicas: u32,
    /// The generation this status describes.
    pub observed_generation: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ReplicaSet {
    pub name: String,
    pub generation: i64,
    pub spec: Spec,
    #[serde(default)]
    pub status: RsStatus,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pod {
    pub name: String,
    pub owner: String,
    pub image: String,
    pub node: String,
}

/// An object with its resource version (the key's mod revision).
#[derive(Debug, Clone)]
pub struct Versioned<T> {
    pub object: T,
    pub resource_version: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("conflict: the object changed since it was read")]
    Conflict,
    #[error("not found")]
    NotFound,
    #[error("fenced: no longer the leader")]
    Fenced,
    #[error("invalid object: {0}")]
    Invalid(String),
    #[error(transparent)]
    Keel(#[from] Error),
}

fn decode<T: for<'de> Deserialize<'de>>(kv: &KeyValue) -> Result<T, ApiError> {
    serde_json::from_slice(&kv.value)
        .map_err(|e| ApiError::Invalid(format!("{}: {e}", kv.key_str())))
}

fn fence(l: &Leadership) -> Compare {
    Compare::create_revision(l.key.clone()).eq(l.rev)
}

/// The declarative API.
#[derive(Clone)]
pub struct Api {
    pub client: Client,
}

impl Api {
    pub fn new(client: Client) -> Self {
        Api { client }
    }

    pub async fn get(&self, name: &str) -> Result<Option<Versioned<ReplicaSet>>, ApiError> {
        let r = self.client.get(rs_key(name)).await?;
        match r.first() {
            None => Ok(None),
            Some(kv) => Ok(Some(Versioned {
                object: decode(kv)?,
                resource_version: kv.mod_revision,
            })),
        }
    }

    pub async fn list(&self) -> Result<Vec<Versioned<ReplicaSet>>, ApiError> {
        let (kvs, _) = self.client.list_prefix(RS_PREFIX, 100).await?;
        kvs.iter()
            .map(|kv| {
                Ok(Versioned {
                    object: decode(kv)?,
                    resource_version: kv.mod_revision,
                })
            })
            .collect()
    }

    pub async fn pods(&self, rs: &str) -> Result<Vec<Pod>, ApiError> {
        let (kvs, _) = self.client.list_prefix(pods_of(rs), 100).await?;
        kvs.iter().map(decode).collect()
    }

    /// Declarative apply: creates the object, or sets its spec (bumping the generation when
    /// the spec changes). Retries on conflicts; an ambiguous write is resolved by reading back.
    pub async fn apply(&self, name: &str, spec: Spec) -> Result<Versioned<ReplicaSet>, ApiError> {
        if name.is_empty() || name.contains('/') {
            return Err(ApiError::Invalid(format!("bad name {name:?}")));
        }
        loop {
            let current = self.get(name).await?;
            let (rs, cmp) = match &current {
                None => (
                    ReplicaSet {
                        name: name.to_string(),
                        generation: 1,
                        spec: spec.clone(),
                        status: RsStatus::default(),
                    },
                    Compare::absent(rs_key(name)),
                ),
                Some(v) if v.object.spec == spec => return Ok(v.clone()),
                Some(v) => {
                    let mut rs = v.object.clone();
                    rs.spec = spec.clone();
                    rs.generation += 1;
                    (
                        rs,
                        Compare::mod_revision(rs_key(name)).eq(v.resource_version),
                    )
                }
            };
            let body = serde_json::to_vec(&rs).expect("json");
            match self
                .client
                .txn()
                .when([cmp])
                .and_then([Op::put(rs_key(name), body)])
                .await
            {
                Ok(r) if r.succeeded => {
                    return Ok(Versioned {
                        object: rs,
                        resource_version: r.header.revision,
                    });
                }
                Ok(_) => continue, // conflict: read again
                Err(e) if e.is_transient() => {
                    // Ambiguous or unavailable: the next read tells whether it was applied.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Compare-and-swap update of the whole object, optionally fenced by a leadership.
    pub async fn update(
        &self,
        rs: &ReplicaSet,
        resource_version: i64,
        fenced_by: Option<&Leadership>,
    ) -> Result<i64, ApiError> {
        let key = rs_key(&rs.name);
        let mut cmp = vec![Compare::mod_revision(key.clone()).eq(resource_version)];
        if let Some(l) = fenced_by {
            cmp.push(fence(l));
        }
        let r = self
            .client
            .txn()
            .when(cmp)
            .and_then([Op::put(key.clone(), serde_json::to_vec(rs).expect("json"))])
            .or_else([Op::get(key)])
            .await?;
        if r.succeeded {
            return Ok(r.header.revision);
        }
        if let Some(l) = fenced_by {
            // Tell a lost leadership from a conflict.
            let still = self.client.get(l.key.clone()).await?;
            if still.first().is_none_or(|kv| kv.create_revision != l.rev) {
                return Err(ApiError::Fenced);
            }
        }
        Err(ApiError::Conflict)
    }

    pub async fn delete(&self, name: &str) -> Result<(), ApiError> {
        self.client.delete(rs_key(name)).await?;
        Ok(())
    }
}

/// A simulated node: registers itself and keeps its pods' leases alive.
pub struct NodeAgent {
    pub client: Client,
    pub name: String,
    pub ttl: i64,
}

impl NodeAgent {
    pub async fn run(self) {
        loop {
            if let Err(e) = self.run_once().await {
                tracing::warn!(node = %self.name, error = %e, "node agent restarting");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }

    async fn run_once(&self) -> Result<(), Error> {
        let lease = self.client.lease_grant(self.ttl).await?;
        let node_keeper = self.client.lease_keep_alive(lease.id).await?;
        self.client
            .put(format!("{NODE_PREFIX}{}", self.name), self.name.clone())
            .lease(lease.id)
            .await?;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let informer = Informer::new(self.client.clone(), POD_PREFIX)
            .page_size(100)
            .spawn(move |ev: InformerEvent| {
                let _ = tx.send(ev);
            });
        let mut pods: HashMap<Vec<u8>, LeaseKeeper> = HashMap::new();
        loop {
            tokio::select! {
                _ = node_keeper.lost() => return Err(Error::LeaseExpired(lease.id)),
                ev = rx.recv() => {
                    let Some(ev) = ev else { return Ok(()) };
                    match ev {
                        InformerEvent::Added(kv) | InformerEvent::Updated { new: kv, .. } => {
                            let Ok(pod) = serde_json::from_slice::<Pod>(&kv.value) else { continue };
                            if pod.node != self.name || pods.contains_key(&kv.key) || kv.lease == 0 {
                                continue;
                            }
                            match self.client.lease_keep_alive(kv.lease).await {
                                Ok(k) => {
                                    pods.insert(kv.key.clone(), k);
                                }
                                Err(e) => tracing::info!(pod = %pod.name, error = %e, "pod lease gone"),
                            }
                        }
                        InformerEvent::Deleted(kv) => {
                            pods.remove(&kv.key);
                        }
                        InformerEvent::Synced { .. } => {
                            let live: HashSet<Vec<u8>> =
                                informer.store().list().into_iter().map(|kv| kv.key).collect();
                            pods.retain(|k, _| live.contains(k));
                        }
                    }
                }
            }
        }
    }
}

/// The ReplicaSet controller (run several; one leads).
pub struct Controller {
    pub client: Client,
    pub id: String,
    /// Leader lease TTL, seconds.
    pub leader_ttl: i64,
    /// Pod lease TTL, seconds.
    pub pod_ttl: i64,
    /// Current leader or not, for observers (tests, metrics).
    pub leading: Arc<Mutex<bool>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Keel(#[from] Error),
    #[error("no node to schedule on")]
    NoNodes,
}

impl Controller {
    pub fn new(client: Client, id: impl Into<String>) -> Self {
        Controller {
            client,
            id: id.into(),
            leader_ttl: 3,
            pod_ttl: 3,
            leading: Arc::new(Mutex::new(false)),
        }
    }

    pub async fn run(self) {
        let leading = self.leading.clone();
        let id = self.id.clone();
        let elector = LeaderElector::new(self.client.clone(), ELECTION, self.id.clone())
            .ttl(self.leader_ttl)
            .on_elected({
                let leading = leading.clone();
                let id = id.clone();
                move |l| {
                    tracing::info!(controller = %id, token = l.rev, "controller elected");
                    *leading.lock().expect("lock") = true;
                }
            })
            .on_lost({
                let leading = leading.clone();
                move || {
                    tracing::info!(controller = %id, "controller lost leadership");
                    *leading.lock().expect("lock") = false;
                }
            })
            .spawn();
        loop {
            let leadership = elector.wait_leader().await;
            tokio::select! {
                _ = elector.wait_lost() => {}
                _ = self.lead(&leadership) => {}
            }
        }
    }

    /// The leader's work loop; returns only if its informers stop.
    async fn lead(&self, lead: &Leadership) {
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        let owner_of = |key: &[u8]| -> Option<String> {
            let k = std::str::from_utf8(key).ok()?;
            if let Some(rest) = k.strip_prefix(RS_PREFIX) {
                return Some(rest.to_string());
            }
            k.strip_prefix(POD_PREFIX)?
                .split('/')
                .next()
                .map(str::to_string)
        };
        let enqueue = move |tx: mpsc::UnboundedSender<String>| {
            move |ev: InformerEvent| {
                let key = match &ev {
                    InformerEvent::Added(kv) | InformerEvent::Deleted(kv) => &kv.key,
                    InformerEvent::Updated { new, .. } => &new.key,
                    InformerEvent::Synced { .. } => return,
                };
                if let Some(o) = owner_of(key) {
                    let _ = tx.send(o);
                }
            }
        };
        let rs_inf = Informer::new(self.client.clone(), RS_PREFIX)
            .page_size(100)
            .resync_every(Duration::from_secs(5))
            .spawn(enqueue(tx.clone()));
        let pod_inf = Informer::new(self.client.clone(), POD_PREFIX)
            .page_size(100)
            .spawn(enqueue(tx.clone()));
        let node_inf = Informer::new(self.client.clone(), NODE_PREFIX).spawn(|_| {});
        rs_inf.wait_synced().await;
        pod_inf.wait_synced().await;
        node_inf.wait_synced().await;
        let api = Api::new(self.client.clone());
        let (rs_store, pod_store, node_store) = (rs_inf.store(), pod_inf.store(), node_inf.store());
        // Dedup: a name is queued at most once.
        let mut queued: HashSet<String> = HashSet::new();
        let mut backlog: Vec<String> = Vec::new();
        loop {
            // Drain what is queued, then reconcile each name once.
            let Some(first) = rx.recv().await else { return };
            backlog.push(first);
            while let Ok(n) = rx.try_recv() {
                backlog.push(n);
            }
            for name in backlog.drain(..) {
                queued.insert(name);
            }
            for name in std::mem::take(&mut queued) {
                let r = self
                    .reconcile(&api, lead, &name, &rs_store, &pod_store, &node_store)
                    .await;
                if let Err(e) = r {
                    if matches!(e, ReconcileError::Api(ApiError::Fenced)) {
                        tracing::info!(controller = %self.id, "fenced; stepping down");
                        return;
                    }
                    tracing::info!(controller = %self.id, rs = %name, error = %e, "reconcile failed; requeue");
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        let _ = tx.send(name);
                    });
                }
            }
        }
    }

    async fn reconcile(
        &self,
        api: &Api,
        lead: &Leadership,
        name: &str,
        rs_store: &keel_client::Store,
        pod_store: &keel_client::Store,
        node_store: &keel_client::Store,
    ) -> Result<(), ReconcileError> {
        let pods: Vec<(KeyValue, Pod)> = pod_store
            .list_prefix(pods_of(name))
            .into_iter()
            .filter_map(|kv| serde_json::from_slice(&kv.value).ok().map(|p| (kv, p)))
            .collect();
        let Some(rs_kv) = rs_store.get(rs_key(name)) else {
            // Deleted: remove its pods.
            if !pods.is_empty() {
                self.fenced(lead, vec![Op::delete_prefix(pods_of(name))])
                    .await?;
            }
            return Ok(());
        };
        let rs: ReplicaSet = decode(&rs_kv)?;
        let want = rs.spec.replicas as usize;
        let (good, stale): (Vec<_>, Vec<_>) = pods
            .into_iter()
            .partition(|(_, p)| p.image == rs.spec.image);
        let mut ops = Vec::new();
        // Pods with an old image go; extra pods go (newest first).
        for (kv, _) in &stale {
            ops.push(Op::delete(kv.key.clone()));
        }
        let mut good = good;
        good.sort_by_key(|(kv, _)| kv.create_revision);
        while good.len() > want {
            let (kv, _) = good.pop().expect("non-empty");
            ops.push(Op::delete(kv.key));
        }
        let mut last_write = 0;
        if !ops.is_empty() {
            last_write = self.fenced(lead, ops).await?;
        }
        // Missing pods: schedule on the least loaded live node.
        let missing = want.saturating_sub(good.len());
        if missing > 0 {
            let mut load: BTreeMap<String, usize> = node_store
                .list()
                .into_iter()
                .map(|kv| (kv.key_str().trim_start_matches(NODE_PREFIX).to_string(), 0))
                .collect();
            if load.is_empty() {
                return Err(ReconcileError::NoNodes);
            }
            for kv in pod_store.list() {
                if let Ok(p) = serde_json::from_slice::<Pod>(&kv.value)
                    && let Some(n) = load.get_mut(&p.node)
                {
                    *n += 1;
                }
            }
            for _ in 0..missing {
                let node = load
                    .iter()
                    .min_by_key(|(_, n)| **n)
                    .map(|(k, _)| k.clone())
                    .expect("non-empty");
                *load.get_mut(&node).expect("present") += 1;
                let pod = Pod {
                    name: format!("{name}-{:08x}", rand::random::<u32>()),
                    owner: name.to_string(),
                    image: rs.spec.image.clone(),
                    node,
                };
                let lease = self.client.lease_grant(self.pod_ttl).await?;
                let key = format!("{}{}", pods_of(name), pod.name);
                let body = serde_json::to_vec(&pod).expect("json");
                last_write = self
                    .fenced(lead, vec![Op::put_with_lease(key, body, lease.id)])
                    .await?;
            }
        }
        // Let the pod cache catch up with our own writes before the next pass, so it does not
        // create the same pods twice (client-go's "expectations").
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while pod_store.revision() < last_write && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Status: what the cache shows now; the events of our own changes requeue us, and
        // the next pass reports them.
        let status = RsStatus {
            replicas: good.len().min(want) as u32,
            observed_generation: rs.generation,
        };
        if status != rs.status {
            let mut updated = rs.clone();
            updated.status = status;
            match api.update(&updated, rs_kv.mod_revision, Some(lead)).await {
                Ok(_) => {}
                Err(ApiError::Conflict) => {
                    // The spec changed meanwhile: the informer requeues us with the new one.
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Runs `ops` only while `lead` is still the leadership; returns the write's revision.
    async fn fenced(&self, lead: &Leadership, ops: Vec<Op>) -> Result<i64, ReconcileError> {
        let r = self.client.txn().when([fence(lead)]).and_then(ops).await?;
        if !r.succeeded {
            return Err(ApiError::Fenced.into());
        }
        Ok(r.header.revision)
    }
}
