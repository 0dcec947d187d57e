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

use crate::cluster::Cluster;
use crate::record::FaultWindow;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum NemesisKind {
    None,
    Kill,
    Pause,
    Partition,
    Latency,
    /// kill, pause, partition and latency, interleaved.
    All,
}

impl NemesisKind {
    pub fn name(self) -> &'static str {
        match self {
            NemesisKind::None => "none",
            NemesisKind::Kill => "kill",
            NemesisKind::Pause => "pause",
            NemesisKind::Partition => "partition",
            NemesisKind::Latency => "latency",
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
    Kill { target: Target },
    Pause { target: Target },
    Partition { kind: PartitionKind },
    Latency { delay_ms: u64, jitter_ms: u64 },
}

impl Fault {
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Kill { .. } => "kill",
            Fault::Pause { .. } => "pause",
            Fault::Partition { .. } => "partition",
            Fault::Latency { .. } => "latency",
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

fn random_fault(rng: &mut StdRng, kind: NemesisKind, n: usize) -> Option<Fault> {
    let kind = match kind {
        NemesisKind::None => return None,
        NemesisKind::All => [
            NemesisKind::Kill,
            NemesisKind::Pause,
            NemesisKind::Partition,
            NemesisKind::Latency,
        ][rng.random_range(0..4)],
        k => k,
    };
    Some(match kind {
        NemesisKind::Kill => Fault::Kill {
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
        NemesisKind::None | NemesisKind::All => unreachable!(),
    })
}

/// Draws the fault schedule for a run of `time_limit`.
pub fn schedule(kind: NemesisKind, n: usize, seed: u64, time_limit: Duration) -> Vec<Step> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x6e65_6d65_7369_7321);
    let limit = time_limit.as_millis() as u64;
    let mut t = rng.random_range(3_000..=5_000);
    let mut steps = Vec::new();
    loop {
        let hold = rng.random_range(3_000..=8_000);
        if t + hold + 1_000 > limit {
            break;
        }
        let Some(fault) = random_fault(&mut rng, kind, n) else {
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
    };
    FaultWindow {
        kind: fault.kind().to_string(),
        description,
        nodes,
        start: now,
        end: now,
    }
}

/// Undoes a fault started with [`start`].
pub fn stop(cluster: &Arc<Cluster>, window: &FaultWindow) {
    match window.kind.as_str() {
        "kill" => {
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
        _ => {}
    }
}

/// Heals everything: links, latency, paused and stopped members.
pub fn heal_all(cluster: &Arc<Cluster>) {
    cluster.net.heal();
    cluster.net.set_latency(Duration::ZERO, Duration::ZERO);
    for i in 0..cluster.n() {
        cluster.resume(i);
        if !cluster.is_running(i) {
            let _ = cluster.start(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_replay_from_the_seed() {
        let a = schedule(NemesisKind::All, 3, 7, Duration::from_secs(60));
        let b = schedule(NemesisKind::All, 3, 7, Duration::from_secs(60));
        let c = schedule(NemesisKind::All, 3, 8, Duration::from_secs(60));
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
        assert!(schedule(NemesisKind::None, 3, 7, Duration::from_secs(60)).is_empty());
    }
}
