//! `keel-jepsen`: fault-injection tests against real Keel clusters, and history checkers.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use keel_jepsen::linearizable::{Verdict, check};
use keel_jepsen::nemesis::NemesisKind;
use keel_jepsen::record::Valid;
use keel_jepsen::runner::{TestOpts, print_result, recheck, run_test};
use keel_jepsen::workload::WorkloadKind;

#[derive(Parser)]
#[command(name = "keel-jepsen", version, about = "Jepsen-style testing for Keel")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Model {
    CasRegister,
}

/// Options shared by every command that starts clusters.
#[derive(Args, Clone)]
struct Common {
    /// The `keel` binary [default: $KEEL_BIN, else `keel` next to this binary, else
    /// $CARGO_TARGET_DIR/release/keel].
    #[arg(long)]
    keel: Option<PathBuf>,
    /// Where run directories go [default: $CARGO_TARGET_DIR/jepsen-runs, else
    /// /tmp/keel-jepsen-runs].
    #[arg(long)]
    store: Option<PathBuf>,
    /// Members per cluster.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Client workers [default: 2 x nodes].
    #[arg(long)]
    concurrency: Option<usize>,
    /// Target operations per second over all workers.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Client deadline per request, in ms (a write past it is indeterminate).
    #[arg(long, default_value_t = 2000)]
    op_timeout_ms: u64,
    #[arg(long, default_value_t = 100)]
    heartbeat_interval: u64,
    #[arg(long, default_value_t = 1000)]
    election_timeout: u64,
    /// Keel's --snapshot-count (low, to exercise snapshot installation).
    #[arg(long, default_value_t = 200)]
    snapshot_count: u64,
    /// Keel's --experimental-snapshot-catchup-entries (low, so that a member that was down or
    /// cut off for a few seconds catches up from a snapshot rather than from the log).
    #[arg(long, default_value_t = 50)]
    snapshot_catchup_entries: u64,
    /// register: operations per key before moving on to a fresh key.
    #[arg(long, default_value_t = 200)]
    ops_per_key: u64,
    /// Keep the members' data directories of valid runs too.
    #[arg(long)]
    keep_data: bool,
}

#[derive(Subcommand)]
enum Command {
    /// One test run. Exit status: 0 valid, 1 a violation was found, 2 unknown, 3 harness error.
    Test {
        #[arg(long, value_enum)]
        workload: WorkloadKind,
        #[arg(long, value_enum, default_value = "none")]
        nemesis: NemesisKind,
        /// Seconds of workload and faults (healing and final checks come after).
        #[arg(long, default_value_t = 60)]
        time_limit: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Start the members with --debug-unsafe-local-reads (the negative control).
        #[arg(long)]
        unsafe_local_reads: bool,
        #[command(flatten)]
        common: Common,
    },
    /// The CI profile (about 4 minutes): register/partition, set/kill, watch/pause, append/all,
    /// lease/partition, lock/pause, and the negative control (register/partition with unsafe
    /// local reads), which must be reported invalid. Exit status 0 only when all of that holds.
    Ci {
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[command(flatten)]
        common: Common,
    },
    /// The long profile for nightly runs: every workload under kill, stop, pause, partition, latency,
    /// member, compact, clock and all (watch without compact), for `--seeds` seeds, plus the
    /// negative control.
    Long {
        #[arg(long, default_value_t = 120)]
        time_limit: u64,
        #[arg(long, default_value_t = 1)]
        seeds: u64,
        #[arg(long, default_value_t = 100)]
        seed: u64,
        #[command(flatten)]
        common: Common,
    },
    /// Re-checks the history of a run directory and rewrites its results.json and report.html.
    Check { dir: PathBuf },
    /// Checks Jepsen register logs; prints `linearizable: true|false` per file. Exit status 0
    /// when every file was checked (whatever the verdicts), 1 on unreadable input, 2 when a
    /// check ran out of its step budget.
    CheckJepsenLog {
        #[arg(long, value_enum, default_value = "cas-register")]
        model: Model,
        /// Search steps allowed per key before answering "unknown".
        #[arg(long, default_value_t = 50_000_000)]
        max_steps: u64,
        /// Print a JSON object per file instead of text.
        #[arg(long)]
        json: bool,
        files: Vec<std::path::PathBuf>,
    },
}

fn target_dir() -> Option<PathBuf> {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from)
}

fn keel_bin(flag: Option<PathBuf>) -> PathBuf {
    if let Some(p) = flag.or_else(|| std::env::var_os("KEEL_BIN").map(PathBuf::from)) {
        return p;
    }
    if let Some(p) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("keel")))
        .filter(|p| p.exists())
    {
        return p;
    }
    target_dir()
        .unwrap_or_else(|| PathBuf::from("/var/tmp/keel-target"))
        .join("release/keel")
}

fn base_opts(c: Common) -> TestOpts {
    let store = c
        .store
        .or_else(|| std::env::var_os("KEEL_JEPSEN_STORE").map(PathBuf::from))
        .or_else(|| target_dir().map(|d| d.join("jepsen-runs")))
        .unwrap_or_else(|| PathBuf::from("/tmp/keel-jepsen-runs"));
    TestOpts {
        workload: WorkloadKind::Register,
        nemesis: NemesisKind::None,
        nodes: c.nodes,
        time_limit_s: 60,
        seed: 1,
        concurrency: c.concurrency.unwrap_or(2 * c.nodes).max(2),
        rate: c.rate,
        unsafe_local_reads: false,
        keel_bin: keel_bin(c.keel),
        store,
        op_timeout_ms: c.op_timeout_ms,
        heartbeat_ms: c.heartbeat_interval,
        election_ms: c.election_timeout,
        snapshot_count: c.snapshot_count,
        snapshot_catchup_entries: c.snapshot_catchup_entries,
        ops_per_key: c.ops_per_key,
        keep_data: c.keep_data,
        progress: true,
    }
}

fn check_bin(opts: &TestOpts) -> anyhow::Result<()> {
    anyhow::ensure!(
        opts.keel_bin.exists(),
        "no keel binary at {} (build it: cargo build --release -p keel-server, or pass --keel)",
        opts.keel_bin.display()
    );
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Test {
            workload,
            nemesis,
            time_limit,
            seed,
            unsafe_local_reads,
            common,
        } => {
            let mut o = base_opts(common);
            o.workload = workload;
            o.nemesis = nemesis;
            o.time_limit_s = time_limit;
            o.seed = seed;
            o.unsafe_local_reads = unsafe_local_reads;
            check_bin(&o)?;
            match run_test(o).await {
                Ok(r) => std::process::exit(match r.valid {
                    Valid::True => 0,
                    Valid::False => 1,
                    Valid::Unknown => 2,
                }),
                Err(e) => {
                    eprintln!("harness error: {e:#}");
                    std::process::exit(3)
                }
            }
        }
        Command::Ci { seed, common } => {
            let o = base_opts(common);
            check_bin(&o)?;
            let pass =
                keel_jepsen::profiles::run_plan(&o, &keel_jepsen::profiles::ci_plan(seed)).await;
            std::process::exit(if pass { 0 } else { 1 })
        }
        Command::Long {
            time_limit,
            seeds,
            seed,
            common,
        } => {
            let o = base_opts(common);
            check_bin(&o)?;
            let plan = keel_jepsen::profiles::long_plan(seed, time_limit, seeds);
            let pass = keel_jepsen::profiles::run_plan(&o, &plan).await;
            std::process::exit(if pass { 0 } else { 1 })
        }
        Command::Check { dir } => {
            let r = recheck(&dir)?;
            print_result(&r);
            std::process::exit(match r.valid {
                Valid::True => 0,
                Valid::False => 1,
                Valid::Unknown => 2,
            })
        }
        Command::CheckJepsenLog {
            model: Model::CasRegister,
            max_steps,
            json,
            files,
        } => {
            let many = files.len() > 1;
            let mut unknown = false;
            for file in &files {
                let text = std::fs::read_to_string(file)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
                let ops = keel_jepsen::jepsen_log::parse(&text)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
                let verdict = check(&ops, max_steps);
                let answer = match &verdict {
                    Verdict::Linearizable => "true",
                    Verdict::Violation { .. } => "false",
                    Verdict::Unknown => {
                        unknown = true;
                        "unknown"
                    }
                };
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"file": file.display().to_string(), "linearizable": answer, "operations": ops.len()})
                    );
                } else if many {
                    println!("{}: linearizable: {answer}", file.display());
                } else {
                    println!("linearizable: {answer}");
                }
                if let Verdict::Violation {
                    stuck_at,
                    linearized,
                    ..
                } = &verdict
                    && !json
                {
                    eprintln!(
                        "  longest linearizable prefix: {} operations; cannot place: {stuck_at:?}",
                        linearized.len()
                    );
                }
            }
            if unknown {
                std::process::exit(2);
            }
            Ok(())
        }
    }
}
