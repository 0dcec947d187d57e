//! Faults and their seeded schedule.
//!
//! The schedule is drawn up front from the seed: the first fault starts 3–5 s into the run, then
//! faults alternate with quiet periods (hold U(3, 8) s, quiet U(2, 4) s) until the time limit,
//! one fault at a time. The same seed gives the same schedule and the same targets; only targets
//! named "the leader" depend on which member leads when the fault starts. Every applied fault is
//! recorded as a [`FaultWindow`] in the history.

use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use keel_proto::etcdserverpb::cluster_client::ClusterClient;
use keel_proto::etcdserverpb::kv_client::KvClient;
use keel_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use keel_proto::etcdserverpb::{
    CompactionRequest, DefragmentRequest, MemberAddRequest, MemberListRequest, MemberRemoveRequest,
    RangeRequest,
};
use tonic::transport::{Channel, Endpoint};

use crate::cluster::Cluster;
use crate::record::FaultWindow;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum NemesisKind {
    None,
    Kill,
    /// SIGTERM: a graceful stop (a leader hands leadership over first), as in a rolling restart.
    Stop,
    Pause,
    Partition,
    Latency,
    /// Remove a member over the Cluster API, then add it back as a fresh member.
    Member,
    /// Compaction and defragmentation under load.
    Compact,
    /// Clock skew through libfaketime.
    Clock,
    /// Every fault above, interleaved.
    All,
}

impl NemesisKind {
    pub fn name(self) -> &'static str {
        match self {
            NemesisKind::None => "none",
            NemesisKind::Kill => "kill",
            NemesisKind::Stop => "stop",
            NemesisKind::Pause => "pause",
            NemesisKind::Partition => "partition",
            NemesisKind::Latency => "latency",
            NemesisKind::Member => "member",
            NemesisKind::Compact => "compact",
            NemesisKind::Clock => "clock",
            NemesisKind::All => "all",
        }
    }
}

/// Which members a process fault hits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    One(usize),
    Leader,
    Majority(Vec<usize>),
}

/// The shape of a network partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PartitionKind {
    /// The current leader alone on one side.
    IsolateLeader,
    /// One member alone.
    IsolateOne(usize),
    /// A random minority against the majority.
    Halves(Vec<usize>),
    /// Two halves that cannot talk to each other but both talk to a bridge member.
    Bridge(usize),
    /// Majorities ring (5+ members): each member sees its two neighbours on each side only
    /// as far as needed for a majority, so every member sees a majority and no two the same.
    Ring,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "fault")]
pub enum Fault {
    Kill {
        target: Target,
    },
    /// SIGTERM to `target` (SIGKILL if a member has not exited after 5 s); restarted on its
    /// data directory at the end of the hold.
    Stop {
        target: Target,
    },
    Pause {
        target: Target,
    },
    Partition {
        kind: PartitionKind,
    },
    Latency {
        delay_ms: u64,
        jitter_ms: u64,
    },
    /// Remove `target` with MemberRemove, kill it and wipe its data; at the end of the hold add
    /// it back with MemberAdd under a new peer URL and start it on an empty data directory
    /// with `--initial-cluster-state existing`.
    Member {
        target: Target,
    },
    /// Compact the keyspace to `keep` revisions behind the head (physical), then defragment
    /// every member one after the other; again at the end of the hold.
    Compact {
        keep: i64,
    },
    /// Offset the clocks of `target` by these milliseconds (one per member, in order); back to
    /// 0 at the end of the hold.
    Clock {
        target: Target,
        offsets_ms: Vec<i64>,
    },
}

impl Fault {
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Kill { .. } => "kill",
            Fault::Stop { .. } => "stop",
            Fault::Pause { .. } => "pause",
            Fault::Partition { .. } => "partition",
            Fault::Latency { .. } => "latency",
            Fault::Member { .. } => "member",
            Fault::Compact { .. } => "compact",
            Fault::Clock { .. } => "clock",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Step {
    pub at_ms: u64,
    pub hold_ms: u64,
    pub fault: Fault,
}

fn random_target(rng: &mut StdRng, n: usize) -> Target {
    match rng.random_range(0..3) {
        0 => Target::One(rng.random_range(0..n)),
        1 => Target::Leader,
        _ => {
            let mut all: Vec<usize> = (0..n).collect();
            all.shuffle(rng);
            let mut maj: Vec<usize> = all[..n / 2 + 1].to_vec();
            maj.sort();
            Target::Majority(maj)
        }
    }
}

/// The faults `all` draws from, minus `exclude`.
pub fn all_kinds(exclude: &[NemesisKind]) -> Vec<NemesisKind> {
    [
        NemesisKind::Kill,
        NemesisKind::Stop,
        NemesisKind::Pause,
        NemesisKind::Partition,
        NemesisKind::Latency,
        NemesisKind::Member,
        NemesisKind::Compact,
        NemesisKind::Clock,
    ]
    .into_iter()
    .filter(|k| !exclude.contains(k))
    .collect()
}

fn random_fault(
    rng: &mut StdRng,
    kind: NemesisKind,
    n: usize,
    exclude: &[NemesisKind],
) -> Option<Fault> {
    let kind = match kind {
        NemesisKind::None => return None,
        NemesisKind::All => {
            let kinds = all_kinds(exclude);
            if kinds.is_empty() {
                return None;
            }
            kinds[rng.random_range(0..kinds.len())]
        }
        k if exclude.contains(&k) => return None,
        k => k,
    };
    Some(match kind {
        NemesisKind::Kill => Fault::Kill {
            target: random_target(rng, n),
        },
        NemesisKind::Stop => Fault::Stop {
            target: random_target(rng, n),
        },
        NemesisKind::Pause => Fault::Pause {
            target: random_target(rng, n),
        },
        NemesisKind::Partition => {
            let choices = if n >= 5 { 5 } else { 4 };
            let kind = match rng.random_range(0..choices) {
                0 => PartitionKind::IsolateLeader,
                1 => PartitionKind::IsolateOne(rng.random_range(0..n)),
                2 => {
                    let mut all: Vec<usize> = (0..n).collect();
                    all.shuffle(rng);
                    let mut minority = all[..(n - 1) / 2].to_vec();
                    minority.sort();
                    PartitionKind::Halves(minority)
                }
                3 => PartitionKind::Bridge(rng.random_range(0..n)),
                _ => PartitionKind::Ring,
            };
            Fault::Partition { kind }
        }
        NemesisKind::Latency => Fault::Latency {
            delay_ms: rng.random_range(50..=200),
            jitter_ms: rng.random_range(0..=50),
        },
        NemesisKind::Member => Fault::Member {
            target: if rng.random_bool(0.5) {
                Target::Leader
            } else {
                Target::One(rng.random_range(0..n))
            },
        },
        NemesisKind::Compact => Fault::Compact {
            keep: rng.random_range(0..=50),
        },
        NemesisKind::Clock => {
            let target = random_target(rng, n);
            let count = match &target {
                Target::Majority(v) => v.len(),
                _ => 1,
            };
            let offsets_ms = (0..count)
                .map(|_| {
                    let mag = rng.random_range(1..=20_i64) * 1000;
                    if rng.random_bool(0.5) { mag } else { -mag }
                })
                .collect();
            Fault::Clock { target, offsets_ms }
        }
        NemesisKind::None | NemesisKind::All => return None,
    })
}

/// Draws the fault schedule for a run of `time_limit`; `exclude` names faults the run cannot
/// take (compaction for the watch workload, clocks without libfaketime).
pub fn schedule(
    kind: NemesisKind,
    n: usize,
    seed: u64,
    time_limit: Duration,
    exclude: &[NemesisKind],
) -> Vec<Step> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x6e65_6d65_7369_7321);
    let limit = time_limit.as_millis() as u64;
    let mut t = rng.random_range(3_000..=5_000);
    let mut steps = Vec::new();
    loop {
        let hold = rng.random_range(3_000..=8_000);
        if t + hold + 1_000 > limit {
            break;
        }
        let Some(fault) = random_fault(&mut rng, kind, n, exclude) else {
            break;
        };
        steps.push(Step {
            at_ms: t,
            hold_ms: hold,
            fault,
        });
        t += hold + rng.random_range(2_000..=4_000);
    }
    steps
}

fn names(nodes: &[usize]) -> String {
    nodes
        .iter()
        .map(|i| format!("n{}", i + 1))
        .collect::<Vec<_>>()
        .join(",")
}

async fn resolve(cluster: &Cluster, target: &Target) -> Vec<usize> {
    match target {
        Target::One(i) => vec![*i % cluster.n()],
        Target::Majority(v) => v.clone(),
        Target::Leader => match cluster.leader().await {
            Some(l) => vec![l],
            None => vec![],
        },
    }
}

/// Cut links for a partition and a description of it.
async fn partition_links(
    cluster: &Cluster,
    kind: &PartitionKind,
) -> (Vec<(usize, usize)>, String, Vec<usize>) {
    let n = cluster.n();
    let isolate =
        |x: usize| -> Vec<(usize, usize)> { (0..n).filter(|&o| o != x).map(|o| (x, o)).collect() };
    match kind {
        PartitionKind::IsolateLeader => match cluster.leader().await {
            Some(l) => (isolate(l), format!("isolate leader n{}", l + 1), vec![l]),
            None => (vec![], "isolate leader (no leader found)".into(), vec![]),
        },
        PartitionKind::IsolateOne(x) => {
            let x = x % n;
            (isolate(x), format!("isolate n{}", x + 1), vec![x])
        }
        PartitionKind::Halves(minority) => {
            let majority: Vec<usize> = (0..n).filter(|i| !minority.contains(i)).collect();
            let mut links = Vec::new();
            for &a in minority {
                for &b in &majority {
                    links.push((a, b));
                }
            }
            (
                links,
                format!("{} | {}", names(minority), names(&majority)),
                minority.clone(),
            )
        }
        PartitionKind::Bridge(b) => {
            let b = b % n;
            let others: Vec<usize> = (0..n).filter(|&i| i != b).collect();
            let (left, right) = others.split_at(others.len() / 2);
            let mut links = Vec::new();
            for &x in left {
                for &y in right {
                    links.push((x, y));
                }
            }
            (
                links,
                format!("bridge n{}: {} | {}", b + 1, names(left), names(right)),
                vec![b],
            )
        }
        PartitionKind::Ring => {
            // Member i keeps links to i±1..±k where 2k+1 is a bare majority.
            let k = (n / 2).div_ceil(2).max(1);
            let mut links = Vec::new();
            for a in 0..n {
                for b in a + 1..n {
                    let d = (b - a).min(n - (b - a));
                    if d > k {
                        links.push((a, b));
                    }
                }
            }
            (links, "majorities ring".into(), (0..n).collect())
        }
    }
}

/// Applies one fault; returns what to record (the window's end is filled in by `stop`).
pub async fn start(cluster: &Arc<Cluster>, fault: &Fault, now: u64) -> FaultWindow {
    let (description, nodes) = match fault {
        Fault::Kill { target } => {
            let nodes = resolve(cluster, target).await;
            for &i in &nodes {
                cluster.kill(i);
            }
            (format!("kill -9 {}", names(&nodes)), nodes)
        }
        Fault::Stop { target } => {
            let nodes = resolve(cluster, target).await;
            let mut parts = Vec::new();
            for &i in &nodes {
                let c = cluster.clone();
                let how = tokio::task::spawn_blocking(move || {
                    c.stop_gracefully(i, Duration::from_secs(5))
                })
                .await
                .unwrap_or(None);
                parts.push(match how {
                    Some(took) => format!("n{} exited after {} ms", i + 1, took.as_millis()),
                    None => format!("n{} killed: no exit 5 s after SIGTERM", i + 1),
                });
            }
            (
                format!("SIGTERM {} ({})", names(&nodes), parts.join(", ")),
                nodes,
            )
        }
        Fault::Pause { target } => {
            let nodes = resolve(cluster, target).await;
            for &i in &nodes {
                cluster.pause(i);
            }
            (format!("SIGSTOP {}", names(&nodes)), nodes)
        }
        Fault::Partition { kind } => {
            let (links, desc, nodes) = partition_links(cluster, kind).await;
            cluster.net.set_cuts(&links);
            (desc, nodes)
        }
        Fault::Latency {
            delay_ms,
            jitter_ms,
        } => {
            cluster.net.set_latency(
                Duration::from_millis(*delay_ms),
                Duration::from_millis(*jitter_ms),
            );
            (
                format!("peer latency {delay_ms}±{jitter_ms} ms"),
                (0..cluster.n()).collect(),
            )
        }
        Fault::Member { target } => {
            let nodes = resolve(cluster, target).await;
            match nodes.first() {
                Some(&i) => match remove_member(cluster, i).await {
                    Ok(id) => (format!("remove n{} (member {id:x})", i + 1), vec![i]),
                    Err(e) => (format!("remove n{} failed: {e:#}", i + 1), vec![]),
                },
                None => ("remove (no leader found)".into(), vec![]),
            }
        }
        Fault::Compact { keep } => (compact_and_defrag(cluster, *keep).await, vec![]),
        Fault::Clock { target, offsets_ms } => {
            let nodes = resolve(cluster, target).await;
            let mut parts = Vec::new();
            for (k, &i) in nodes.iter().enumerate() {
                let off = offsets_ms.get(k).copied().unwrap_or(5_000) as f64 / 1000.0;
                match cluster.set_clock(i, off) {
                    Ok(()) => parts.push(format!("n{} {off:+}s", i + 1)),
                    Err(e) => parts.push(format!("n{} failed: {e}", i + 1)),
                }
            }
            (format!("clock skew {}", parts.join(", ")), nodes)
        }
    };
    FaultWindow {
        kind: fault.kind().to_string(),
        description,
        nodes,
        start: now,
        end: now,
    }
}

/// Undoes a fault started with [`start`]; may amend the window's description.
pub async fn stop(cluster: &Arc<Cluster>, window: &mut FaultWindow) {
    match window.kind.as_str() {
        "kill" | "stop" => {
            for &i in &window.nodes {
                if let Err(e) = cluster.start(i) {
                    eprintln!("restart n{} failed: {e}", i + 1);
                }
            }
        }
        "pause" => {
            for &i in &window.nodes {
                cluster.resume(i);
            }
        }
        "partition" => cluster.net.heal(),
        "latency" => cluster.net.set_latency(Duration::ZERO, Duration::ZERO),
        "member" => {
            for &i in &window.nodes {
                match add_member(cluster, i).await {
                    Ok(d) => window.description.push_str(&format!("; {d}")),
                    Err(e) => window
                        .description
                        .push_str(&format!("; re-adding n{} failed: {e:#}", i + 1)),
                }
            }
        }
        "compact" => {
            let d = compact_and_defrag(cluster, 0).await;
            window.description.push_str(&format!("; then {d}"));
        }
        "clock" => {
            for &i in &window.nodes {
                let _ = cluster.set_clock(i, 0.0);
            }
        }
        _ => {}
    }
}

/// Heals everything: links, latency, clocks, paused, stopped and removed members.
pub async fn heal_all(cluster: &Arc<Cluster>) {
    cluster.net.heal();
    cluster.net.set_latency(Duration::ZERO, Duration::ZERO);
    for i in 0..cluster.n() {
        if cluster.opts.faketime.is_some() {
            let _ = cluster.set_clock(i, 0.0);
        }
        cluster.resume(i);
        if cluster.is_removed(i) {
            if let Err(e) = add_member(cluster, i).await {
                eprintln!("re-adding n{} failed: {e:#}", i + 1);
            }
        } else if !cluster.is_running(i) {
            let _ = cluster.start(i);
        }
    }
}

fn cluster_client(cluster: &Cluster, via: usize) -> anyhow::Result<ClusterClient<Channel>> {
    let ch = Endpoint::from_shared(cluster.client_url(via))?
        .connect_timeout(Duration::from_millis(500))
        .connect_lazy();
    Ok(ClusterClient::new(ch))
}

/// The members as `(id, peer URLs)` according to member `via`.
async fn member_list(cluster: &Cluster, via: usize) -> anyhow::Result<Vec<(u64, Vec<String>)>> {
    let mut c = cluster_client(cluster, via)?;
    let mut req = tonic::Request::new(MemberListRequest { linearizable: true });
    req.set_timeout(Duration::from_secs(3));
    let r = tokio::time::timeout(Duration::from_secs(3), c.member_list(req))
        .await
        .map_err(|_| anyhow::anyhow!("MemberList timed out"))??;
    Ok(r.into_inner()
        .members
        .into_iter()
        .map(|m| (m.id, m.peer_ur_ls))
        .collect())
}

/// The other live members, starting at a seed-independent rotation of `i`.
fn helpers(cluster: &Cluster, i: usize) -> Vec<usize> {
    (1..cluster.n())
        .map(|k| (i + k) % cluster.n())
        .filter(|&j| cluster.is_running(j) && !cluster.is_removed(j))
        .collect()
}

/// Removes member `i` from the cluster (MemberRemove through another member), then kills it
/// and wipes its data. Returns its member ID. Fails (leaving `i` alone) when the removal
/// cannot be confirmed.
async fn remove_member(cluster: &Arc<Cluster>, i: usize) -> anyhow::Result<u64> {
    let id = cluster
        .member_id(i)
        .await
        .ok_or_else(|| anyhow::anyhow!("n{} does not answer Status", i + 1))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut last_err = String::new();
    while tokio::time::Instant::now() < deadline {
        for via in helpers(cluster, i) {
            let mut c = cluster_client(cluster, via)?;
            let mut req = tonic::Request::new(MemberRemoveRequest { id });
            req.set_timeout(Duration::from_secs(5));
            match tokio::time::timeout(Duration::from_secs(5), c.member_remove(req)).await {
                Ok(Ok(_)) => {
                    cluster.retire(i);
                    return Ok(id);
                }
                Ok(Err(s)) if s.code() == tonic::Code::NotFound => {
                    // Already gone (an earlier ambiguous attempt took effect).
                    cluster.retire(i);
                    return Ok(id);
                }
                Ok(Err(s)) => last_err = format!("{:?}: {}", s.code(), s.message()),
                Err(_) => last_err = "timed out".into(),
            }
            // An ambiguous answer: did it happen?
            if let Ok(ms) = member_list(cluster, via).await
                && !ms.iter().any(|(m, _)| *m == id)
            {
                cluster.retire(i);
                return Ok(id);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    anyhow::bail!("MemberRemove of {id:x} not confirmed: {last_err}")
}

/// Adds removed member `i` back under a new peer URL and starts it on an empty data directory.
async fn add_member(cluster: &Arc<Cluster>, i: usize) -> anyhow::Result<String> {
    let url = cluster.prepare_rejoin(i).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut last_err = String::new();
    while tokio::time::Instant::now() < deadline {
        for via in helpers(cluster, i) {
            let mut c = cluster_client(cluster, via)?;
            let mut req = tonic::Request::new(MemberAddRequest {
                peer_ur_ls: vec![url.clone()],
                is_learner: false,
            });
            req.set_timeout(Duration::from_secs(5));
            let added = match tokio::time::timeout(Duration::from_secs(5), c.member_add(req)).await
            {
                Ok(Ok(r)) => r.into_inner().member.map(|m| m.id),
                Ok(Err(s)) => {
                    last_err = format!("{:?}: {}", s.code(), s.message());
                    None
                }
                Err(_) => {
                    last_err = "timed out".into();
                    None
                }
            };
            let added = match added {
                Some(id) => Some(id),
                None => member_list(cluster, via)
                    .await
                    .ok()
                    .and_then(|ms| ms.into_iter().find(|(_, u)| u.contains(&url)))
                    .map(|(id, _)| id),
            };
            if let Some(id) = added {
                cluster.rejoined(i);
                cluster.start(i)?;
                return Ok(format!("re-added n{} as member {id:x} at {url}", i + 1));
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    anyhow::bail!("MemberAdd not confirmed: {last_err}")
}

/// Compacts to `keep` revisions behind the current one (physical), then defragments every
/// running member in turn. Returns a description.
async fn compact_and_defrag(cluster: &Arc<Cluster>, keep: i64) -> String {
    let live: Vec<usize> = (0..cluster.n())
        .filter(|&i| cluster.is_running(i) && !cluster.is_removed(i))
        .collect();
    let Some(&via) = live.first() else {
        return "compact: no member running".into();
    };
    let url = cluster.client_url(via);
    let Ok(ep) = Endpoint::from_shared(url) else {
        return "compact: bad URL".into();
    };
    let ch = ep
        .connect_timeout(Duration::from_millis(500))
        .connect_lazy();
    let mut kv = KvClient::new(ch.clone());
    let t = Duration::from_secs(5);
    let head = match tokio::time::timeout(
        t,
        kv.range(RangeRequest {
            key: vec![0],
            range_end: vec![0],
            count_only: true,
            ..Default::default()
        }),
    )
    .await
    {
        Ok(Ok(r)) => r.into_inner().header.map(|h| h.revision).unwrap_or(0),
        Ok(Err(s)) => return format!("compact: reading the head failed: {}", s.message()),
        Err(_) => return "compact: reading the head timed out".into(),
    };
    let rev = head - keep;
    let mut out = if rev < 1 {
        format!("compact: nothing to compact (head {head})")
    } else {
        match tokio::time::timeout(
            t,
            kv.compact(CompactionRequest {
                revision: rev,
                physical: true,
            }),
        )
        .await
        {
            Ok(Ok(_)) => format!("compact to {rev} (head {head})"),
            Ok(Err(s)) => format!("compact to {rev}: {:?} {}", s.code(), s.message()),
            Err(_) => format!("compact to {rev}: timed out"),
        }
    };
    let mut defragged = Vec::new();
    for i in live {
        let Ok(ep) = Endpoint::from_shared(cluster.client_url(i)) else {
            continue;
        };
        let mut m = MaintenanceClient::new(
            ep.connect_timeout(Duration::from_millis(500))
                .connect_lazy(),
        );
        let r =
            tokio::time::timeout(Duration::from_secs(10), m.defragment(DefragmentRequest {})).await;
        defragged.push(match r {
            Ok(Ok(_)) => format!("n{}", i + 1),
            Ok(Err(s)) => format!("n{} ({:?})", i + 1, s.code()),
            Err(_) => format!("n{} (timed out)", i + 1),
        });
    }
    out.push_str(&format!(", defragment {}", defragged.join(" ")));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_replay_from_the_seed() {
        let a = schedule(NemesisKind::All, 3, 7, Duration::from_secs(60), &[]);
        let b = schedule(NemesisKind::All, 3, 7, Duration::from_secs(60), &[]);
        let c = schedule(NemesisKind::All, 3, 8, Duration::from_secs(60), &[]);
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            serde_json::to_string(&b).unwrap()
        );
        assert_ne!(
            serde_json::to_string(&a).unwrap(),
            serde_json::to_string(&c).unwrap()
        );
        assert!(a.len() >= 4);
        for w in a.windows(2) {
            assert!(w[0].at_ms + w[0].hold_ms < w[1].at_ms);
        }
        assert!(schedule(NemesisKind::None, 3, 7, Duration::from_secs(60), &[]).is_empty());
        let no_compact = schedule(
            NemesisKind::All,
            3,
            7,
            Duration::from_secs(600),
            &[NemesisKind::Compact],
        );
        assert!(no_compact.iter().all(|s| s.fault.kind() != "compact"));
        assert!(no_compact.iter().any(|s| s.fault.kind() == "member"));
        assert!(no_compact.iter().any(|s| s.fault.kind() == "stop"));
    }
}
