//! Run profiles: `ci` (a few minutes, fails on any violation and requires the negative control
//! to be caught) and `long` (every workload under every nemesis, for nightly runs).

use std::time::Duration;

use crate::nemesis::NemesisKind;
use crate::record::Valid;
use crate::runner::{RunResult, TestOpts, run_test};
use crate::workload::WorkloadKind;

/// One run of a profile.
#[derive(Debug, Clone)]
pub struct Planned {
    pub workload: WorkloadKind,
    pub nemesis: NemesisKind,
    pub time_limit_s: u64,
    pub seed: u64,
    /// The negative control: `--debug-unsafe-local-reads`, must be reported invalid.
    pub control: bool,
}

pub fn ci_plan(seed: u64) -> Vec<Planned> {
    use NemesisKind::*;
    use WorkloadKind::*;
    let p = |workload, nemesis, time_limit_s, n: u64, control| Planned {
        workload,
        nemesis,
        time_limit_s,
        seed: seed + n,
        control,
    };
    vec![
        p(Register, Partition, 30, 0, false),
        p(Set, Kill, 25, 1, false),
        p(Watch, Pause, 25, 2, false),
        p(Append, All, 30, 3, false),
        // Partitions isolate the leader: the case of the stale-leader keep-alive bug (fixed,
        // docs/jepsen.md), so CI keeps checking that an isolated leader acknowledges nothing.
        p(Lease, Partition, 25, 5, false),
        p(Lock, Pause, 25, 6, false),
        // Negative control: local unconfirmed reads under partitions must be caught.
        p(Register, Partition, 15, 4, true),
    ]
}

/// The long profile's workloads and nemeses (watch skips compaction: it watches from
/// revision 1).
pub fn long_matrix() -> Vec<(WorkloadKind, NemesisKind)> {
    let mut out = Vec::new();
    for w in [
        WorkloadKind::Register,
        WorkloadKind::Set,
        WorkloadKind::Append,
        WorkloadKind::Watch,
        WorkloadKind::Lease,
        WorkloadKind::Lock,
    ] {
        // Every single fault `all` draws from, then `all` itself.
        for nem in crate::nemesis::all_kinds(&[])
            .into_iter()
            .chain([NemesisKind::All])
        {
            if w == WorkloadKind::Watch && nem == NemesisKind::Compact {
                continue;
            }
            out.push((w, nem));
        }
    }
    out
}

pub fn long_plan(seed: u64, time_limit_s: u64, seeds: u64) -> Vec<Planned> {
    let mut out = Vec::new();
    let mut n = 0;
    for s in 0..seeds {
        for (w, nem) in long_matrix() {
            out.push(Planned {
                workload: w,
                nemesis: nem,
                time_limit_s,
                seed: seed + s * 1000 + n,
                control: false,
            });
            n += 1;
        }
    }
    out.push(Planned {
        workload: WorkloadKind::Register,
        nemesis: NemesisKind::Partition,
        time_limit_s: 30,
        seed: seed + 999,
        control: true,
    });
    out
}

/// Runs a plan; returns whether it passed (every normal run valid, every control invalid).
pub async fn run_plan(base: &TestOpts, plan: &[Planned]) -> bool {
    let started = std::time::Instant::now();
    let mut rows: Vec<(Planned, Result<RunResult, String>)> = Vec::new();
    for p in plan {
        let mut o = base.clone();
        o.workload = p.workload;
        o.nemesis = p.nemesis;
        o.time_limit_s = p.time_limit_s;
        o.seed = p.seed;
        o.unsafe_local_reads = p.control;
        let r = run_test(o).await.map_err(|e| format!("{e:#}"));
        if let Err(e) = &r {
            println!("   harness error: {e}");
        }
        rows.push((p.clone(), r));
        // Let the ports and processes settle between runs.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!();
    println!(
        "{:<9} {:<10} {:>6} {:>5} {:>7} {:>7} {:>6} {:>6}  {:<8} result",
        "workload", "nemesis", "seed", "secs", "ops", "ok", "info", "faults", "valid"
    );
    let mut pass = true;
    for (p, r) in &rows {
        let (line, good) = match r {
            Ok(r) => {
                let good = if p.control {
                    r.valid == Valid::False
                } else {
                    r.valid == Valid::True
                };
                (
                    format!(
                        "{:<9} {:<10} {:>6} {:>5} {:>7} {:>7} {:>6} {:>6}  {:<8} {}",
                        p.workload.name(),
                        p.nemesis.name(),
                        p.seed,
                        r.duration_s.round(),
                        r.ops,
                        r.ok,
                        r.info,
                        r.faults,
                        r.valid.to_string(),
                        match (p.control, good) {
                            (true, true) => "PASS (negative control caught)",
                            (true, false) => "FAIL (negative control NOT caught)",
                            (false, true) => "PASS",
                            (false, false) => "FAIL",
                        }
                    ),
                    good,
                )
            }
            Err(e) => (
                format!(
                    "{:<9} {:<10} {:>6} harness error: {e}",
                    p.workload.name(),
                    p.nemesis.name(),
                    p.seed
                ),
                false,
            ),
        };
        pass &= good;
        println!("{line}");
    }
    println!(
        "{} runs in {:.0} s: {}",
        rows.len(),
        started.elapsed().as_secs_f64(),
        if pass { "PASS" } else { "FAIL" }
    );
    pass
}
