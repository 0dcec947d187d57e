//! One test run: start a cluster, run a workload's clients and the nemesis schedule for the
//! time limit, heal, run the workload's final phase, check the history, write the run directory.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::time::Instant;

use crate::client::{Client, ClientError};
use crate::cluster::{Cluster, ClusterOpts, scan_logs};
use crate::nemesis::{self, NemesisKind};
use crate::record::{CheckResult, FaultWindow, Op, Outcome, Valid, write_history};
use crate::workload::{self, WorkloadKind};

/// Everything that defines a run (saved as `test.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TestOpts {
    pub workload: WorkloadKind,
    pub nemesis: NemesisKind,
    pub nodes: usize,
    pub time_limit_s: u64,
    pub seed: u64,
    pub concurrency: usize,
    /// Target operations per second over all workers.
    pub rate: f64,
    pub unsafe_local_reads: bool,
    pub keel_bin: PathBuf,
    /// Parent directory of run directories.
    pub store: PathBuf,
    /// Client deadline per request.
    pub op_timeout_ms: u64,
    pub heartbeat_ms: u64,
    pub election_ms: u64,
    pub snapshot_count: u64,
    pub snapshot_catchup_entries: u64,
    /// Register: operations per key before moving to a fresh key.
    pub ops_per_key: u64,
    /// Keep the members' data directories even when the run is valid.
    pub keep_data: bool,
    /// Print progress every few seconds.
    pub progress: bool,
}

/// The outcome of a run, printed and saved as `results.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResult {
    pub dir: PathBuf,
    pub workload: WorkloadKind,
    pub nemesis: NemesisKind,
    pub seed: u64,
    pub unsafe_local_reads: bool,
    pub valid: Valid,
    pub duration_s: f64,
    pub ops: usize,
    pub ok: usize,
    pub fail: usize,
    pub info: usize,
    pub faults: usize,
    pub checks: Vec<CheckResult>,
}

/// How a request ended, as a worker reports it.
pub enum Done {
    Ok(Value),
    /// Certainly without effect (with whatever the client learnt).
    Fail(Value, String),
    /// Unknown whether it took effect.
    Info(String),
}

impl Done {
    /// Classifies a client error; idempotent requests (reads) never end indeterminate.
    pub fn err(e: ClientError, idempotent: bool) -> Done {
        if e.definite || idempotent {
            Done::Fail(Value::Null, e.message)
        } else {
            Done::Info(e.message)
        }
    }
}

/// State shared by the workers of a run.
pub struct Ctx {
    pub cluster: Arc<Cluster>,
    pub opts: TestOpts,
    pub t0: Instant,
    pub deadline: Instant,
    ops: Mutex<Vec<Op>>,
    next_index: AtomicU64,
    next_process: AtomicU64,
    pub ok: AtomicU64,
    pub fail: AtomicU64,
    pub info: AtomicU64,
    stopped: AtomicBool,
    pub faults: Mutex<Vec<FaultWindow>>,
    pub current_fault: Mutex<Option<String>>,
}

impl Ctx {
    pub fn now(&self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }

    /// True once the main phase is over.
    pub fn done(&self) -> bool {
        self.stopped.load(Ordering::Relaxed) || Instant::now() >= self.deadline
    }

    pub fn fresh_process(&self) -> u64 {
        self.next_process.fetch_add(1, Ordering::Relaxed)
    }

    pub fn record(&self, op: Op) {
        match op.outcome {
            Outcome::Ok => &self.ok,
            Outcome::Fail => &self.fail,
            Outcome::Info => &self.info,
        }
        .fetch_add(1, Ordering::Relaxed);
        self.ops.lock().unwrap().push(op);
    }

    pub fn take_ops(&self) -> Vec<Op> {
        let mut ops = std::mem::take(&mut *self.ops.lock().unwrap());
        ops.sort_by_key(|o| o.index);
        ops
    }

    /// A client for member `node` with the run's deadline.
    pub fn client(&self, node: usize) -> Client {
        Client::new(
            &self.cluster.client_url(node),
            Duration::from_millis(self.opts.op_timeout_ms),
        )
        .expect("valid URL")
    }

    /// Runs one operation outside any worker (final reads and the like).
    pub async fn run_op<F>(&self, node: usize, f: &str, value: Value, fut: F) -> Op
    where
        F: std::future::Future<Output = Done>,
    {
        let process = self.fresh_process();
        let index = self.next_index.fetch_add(1, Ordering::Relaxed);
        let invoke = self.now();
        let done = fut.await;
        let op = finish(index, process, node, f, value, invoke, self.now(), done);
        self.record(op.clone());
        op
    }

    /// The final phase's read on every member: runs `read(client of member)` as operation `f`
    /// (with `value`) on each, and fails unless at least one of them succeeded.
    pub async fn read_on_every_member<F, Fut>(
        &self,
        f: &str,
        value: Value,
        read: F,
    ) -> anyhow::Result<()>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Done>,
    {
        let mut ok = 0;
        for node in 0..self.cluster.n() {
            let op = self
                .run_op(node, f, value.clone(), read(self.client(node)))
                .await;
            if op.outcome == Outcome::Ok {
                ok += 1;
            }
        }
        anyhow::ensure!(ok > 0, "no final read succeeded");
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
fn finish(
    index: u64,
    process: u64,
    node: usize,
    f: &str,
    value: Value,
    invoke: u64,
    complete: u64,
    done: Done,
) -> Op {
    let (outcome, result, error) = match done {
        Done::Ok(r) => (Outcome::Ok, r, None),
        Done::Fail(r, e) => (Outcome::Fail, r, Some(e)),
        Done::Info(e) => (Outcome::Info, Value::Null, Some(e)),
    };
    Op {
        index,
        process,
        node,
        f: f.to_string(),
        value,
        result,
        outcome,
        error,
        invoke,
        complete,
    }
}

/// One client thread: pinned to one member, one request at a time, paced to the run's rate.
pub struct Worker {
    pub id: usize,
    pub node: usize,
    pub process: u64,
    pub client: Client,
    pub rng: StdRng,
    interval: Duration,
    next_at: Instant,
}

impl Worker {
    pub fn new(ctx: &Ctx, id: usize) -> Worker {
        let node = id % ctx.cluster.n();
        let per_worker = ctx.opts.rate / ctx.opts.concurrency.max(1) as f64;
        Worker {
            id,
            node,
            process: id as u64,
            client: ctx.client(node),
            rng: StdRng::seed_from_u64(ctx.opts.seed.wrapping_mul(1_000_003) ^ id as u64),
            interval: Duration::from_secs_f64(1.0 / per_worker.max(0.1)),
            next_at: Instant::now(),
        }
    }

    /// Waits for this worker's next slot (jittered, like Jepsen's stagger).
    pub async fn pace(&mut self) {
        let now = Instant::now();
        if self.next_at > now {
            tokio::time::sleep_until(self.next_at).await;
        }
        let j = self.rng.random_range(0.5..1.5);
        self.next_at = self.next_at.max(now) + self.interval.mul_f64(j);
    }

    /// Runs and records one operation. After an indeterminate result the worker continues as a
    /// new process.
    pub async fn invoke<F>(&mut self, ctx: &Ctx, f: &str, value: Value, fut: F) -> Op
    where
        F: std::future::Future<Output = Done>,
    {
        let index = ctx.next_index.fetch_add(1, Ordering::Relaxed);
        let invoke = ctx.now();
        let done = fut.await;
        let op = finish(
            index,
            self.process,
            self.node,
            f,
            value,
            invoke,
            ctx.now(),
            done,
        );
        if op.outcome == Outcome::Info {
            self.process = ctx.fresh_process();
        }
        ctx.record(op.clone());
        op
    }
}

fn timestamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // UTC date-time without a date library.
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}{mo:02}{d:02}T{h:02}{m:02}{s:02}")
}

/// Which `keel` binary ran: path, `--version`, size and modification time (for the records).
fn keel_identity(opts: &TestOpts) -> serde_json::Value {
    let version = std::process::Command::new(&opts.keel_bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let meta = std::fs::metadata(&opts.keel_bin).ok();
    let modified = meta
        .as_ref()
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs());
    serde_json::json!({
        "path": opts.keel_bin,
        "version": version,
        "bytes": meta.map(|m| m.len()),
        "modified_unix": modified,
    })
}

/// Runs one test and writes its run directory.
pub async fn run_test(opts: TestOpts) -> anyhow::Result<RunResult> {
    let started = std::time::Instant::now();
    let name = format!(
        "{}-{}-{}-s{}{}",
        timestamp(),
        opts.workload.name(),
        opts.nemesis.name(),
        opts.seed,
        if opts.unsafe_local_reads {
            "-unsafe"
        } else {
            ""
        }
    );
    let dir = opts.store.join(name);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("test.json"), serde_json::to_vec_pretty(&opts)?)?;
    std::fs::write(
        dir.join("keel.json"),
        serde_json::to_vec_pretty(&keel_identity(&opts))?,
    )?;
    // Faults a run cannot take: compaction breaks the watch workload's watches from
    // revision 1; clock skew needs libfaketime.
    let mut exclude = Vec::new();
    if opts.workload == WorkloadKind::Watch {
        exclude.push(NemesisKind::Compact);
    }
    let uses_clock = matches!(opts.nemesis, NemesisKind::Clock | NemesisKind::All);
    let faketime = if uses_clock {
        crate::cluster::find_libfaketime()
    } else {
        None
    };
    if uses_clock && faketime.is_none() {
        println!(
            "!! libfaketime not found (apt-get install faketime): no clock faults in this run"
        );
        exclude.push(NemesisKind::Clock);
    }
    if opts.nemesis != NemesisKind::All && exclude.contains(&opts.nemesis) {
        anyhow::bail!(
            "the {} nemesis cannot run with the {} workload here",
            opts.nemesis.name(),
            opts.workload.name()
        );
    }
    let schedule = nemesis::schedule(
        opts.nemesis,
        opts.nodes,
        opts.seed,
        Duration::from_secs(opts.time_limit_s),
        &exclude,
    );
    std::fs::write(
        dir.join("schedule.json"),
        serde_json::to_vec_pretty(&schedule)?,
    )?;
    println!(
        "== {} / {} / seed {} / {} nodes / {} s{} -> {}",
        opts.workload.name(),
        opts.nemesis.name(),
        opts.seed,
        opts.nodes,
        opts.time_limit_s,
        if opts.unsafe_local_reads {
            " / --debug-unsafe-local-reads (negative control)"
        } else {
            ""
        },
        dir.display()
    );

    let mut extra_args = Vec::new();
    if opts.workload == WorkloadKind::Watch {
        extra_args.extend(["--watch-progress-notify-interval".to_string(), "1s".into()]);
    }
    let cluster = Cluster::new(ClusterOpts {
        keel_bin: opts.keel_bin.clone(),
        nodes: opts.nodes,
        dir: dir.clone(),
        heartbeat_ms: opts.heartbeat_ms,
        election_ms: opts.election_ms,
        snapshot_count: opts.snapshot_count,
        snapshot_catchup_entries: opts.snapshot_catchup_entries,
        unsafe_local_reads: opts.unsafe_local_reads,
        extra_args,
        seed: opts.seed,
        faketime,
    })
    .await?;
    cluster.start_all()?;
    if !cluster.wait_healthy(Duration::from_secs(30)).await {
        cluster.stop_all();
        anyhow::bail!(
            "the cluster did not come up within 30 s; see {}/nodes/*/keel.log",
            dir.display()
        );
    }

    let t0 = Instant::now();
    let ctx = Arc::new(Ctx {
        cluster: cluster.clone(),
        opts: opts.clone(),
        t0,
        deadline: t0 + Duration::from_secs(opts.time_limit_s),
        ops: Mutex::new(Vec::new()),
        next_index: AtomicU64::new(0),
        next_process: AtomicU64::new(opts.concurrency as u64),
        ok: AtomicU64::new(0),
        fail: AtomicU64::new(0),
        info: AtomicU64::new(0),
        stopped: AtomicBool::new(false),
        faults: Mutex::new(Vec::new()),
        current_fault: Mutex::new(None),
    });
    let crashes: Arc<Mutex<Vec<String>>> = Arc::default();

    let wl = workload::Workload::new(opts.workload, &opts);
    let mut workers = Vec::new();
    for id in 0..opts.concurrency {
        workers.push(tokio::spawn(wl.clone().worker(ctx.clone(), id)));
    }

    // The nemesis.
    let nem = {
        let ctx = ctx.clone();
        let crashes = crashes.clone();
        tokio::spawn(async move {
            for step in schedule {
                let at = ctx.t0 + Duration::from_millis(step.at_ms);
                while Instant::now() < at {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    note_crashes(&ctx, &crashes);
                }
                if ctx.done() {
                    break;
                }
                let mut w = nemesis::start(&ctx.cluster, &step.fault, ctx.now()).await;
                *ctx.current_fault.lock().unwrap() = Some(w.description.clone());
                let until = Instant::now() + Duration::from_millis(step.hold_ms);
                while Instant::now() < until && !ctx.done() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    if w.kind != "kill" && w.kind != "stop" {
                        note_crashes(&ctx, &crashes);
                    }
                }
                nemesis::stop(&ctx.cluster, &mut w).await;
                w.end = ctx.now();
                *ctx.current_fault.lock().unwrap() = None;
                ctx.faults.lock().unwrap().push(w);
            }
            while !ctx.done() {
                tokio::time::sleep(Duration::from_millis(50)).await;
                note_crashes(&ctx, &crashes);
            }
        })
    };

    // Progress.
    let progress = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let mut last = 0u64;
            while !ctx.done() {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let t = ctx.t0.elapsed().as_secs();
                if ctx.opts.progress && t >= last + 5 {
                    last = t;
                    let fault = ctx
                        .current_fault
                        .lock()
                        .unwrap()
                        .clone()
                        .unwrap_or_else(|| "-".into());
                    println!(
                        "  [{t:>3}s] ok {} fail {} info {} | fault: {fault}",
                        ctx.ok.load(Ordering::Relaxed),
                        ctx.fail.load(Ordering::Relaxed),
                        ctx.info.load(Ordering::Relaxed),
                    );
                }
            }
        })
    };

    for w in workers {
        let _ = w.await;
    }
    ctx.stopped.store(true, Ordering::Relaxed);
    let _ = nem.await;
    let _ = progress.await;

    // Heal and wait for recovery.
    nemesis::heal_all(&cluster).await;
    let heal_started = std::time::Instant::now();
    let healthy = cluster.wait_healthy(Duration::from_secs(30)).await;
    let recovery_s = heal_started.elapsed().as_secs_f64();
    if opts.progress {
        println!(
            "  healed; cluster {} after {recovery_s:.1} s; final phase",
            if healthy { "healthy" } else { "NOT healthy" }
        );
    }
    let final_res = if healthy {
        wl.clone().final_phase(ctx.clone()).await
    } else {
        Err(anyhow::anyhow!("skipped: cluster unhealthy"))
    };
    note_crashes(&ctx, &crashes);
    cluster.stop_all();

    let ops = ctx.take_ops();
    let faults = ctx.faults.lock().unwrap().clone();
    write_history(&dir.join("history.jsonl"), &ops, &faults)?;

    let mut checks = workload::check(opts.workload, &ops, &faults);
    // Liveness and crashes.
    let mut live = CheckResult::new("liveness");
    if !healthy {
        live.valid = Valid::False;
        live.summary.push(
            "the cluster did not recover (one leader, every member answering) within 30 s of healing"
                .into(),
        );
        live.anomalies.insert("no-recovery".into(), 1);
    } else {
        live.summary
            .push(format!("recovered {recovery_s:.1} s after healing"));
    }
    if let Err(e) = &final_res {
        live.valid = live.valid.and(Valid::Unknown);
        live.summary.push(format!("final phase: {e}"));
    }
    let crashed = crashes.lock().unwrap().clone();
    let panics = scan_logs(&cluster.log_paths());
    if !crashed.is_empty() || !panics.is_empty() {
        live.valid = Valid::False;
        live.anomalies
            .insert("member-crash".into(), crashed.len() + panics.len());
        live.summary.extend(crashed.iter().cloned());
        live.summary.extend(panics.iter().take(5).cloned());
    }
    let unidentified = cluster.net.unidentified.load(Ordering::Relaxed);
    if unidentified > 0 {
        live.summary.push(format!(
            "{unidentified} peer connections of unknown origin (not subject to partitions)"
        ));
    }
    checks.push(live);

    let valid = checks.iter().fold(Valid::True, |acc, c| acc.and(c.valid));
    let count = |o: Outcome| ops.iter().filter(|x| x.outcome == o).count();
    let result = RunResult {
        dir: dir.clone(),
        workload: opts.workload,
        nemesis: opts.nemesis,
        seed: opts.seed,
        unsafe_local_reads: opts.unsafe_local_reads,
        valid,
        duration_s: started.elapsed().as_secs_f64(),
        ops: ops.len(),
        ok: count(Outcome::Ok),
        fail: count(Outcome::Fail),
        info: count(Outcome::Info),
        faults: faults.len(),
        checks,
    };
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_vec_pretty(&result)?,
    )?;
    std::fs::write(
        dir.join("report.html"),
        crate::report::html(&opts, &result, &ops, &faults),
    )?;
    if valid == Valid::True && !opts.keep_data {
        cluster.remove_data();
    }
    print_result(&result);
    Ok(result)
}

fn note_crashes(ctx: &Ctx, crashes: &Mutex<Vec<String>>) {
    for (i, status) in ctx.cluster.reap_crashed() {
        let msg = format!(
            "n{} exited by itself at {:.1} s ({status}); restarted",
            i + 1,
            ctx.t0.elapsed().as_secs_f64()
        );
        eprintln!("  {msg}");
        crashes.lock().unwrap().push(msg);
        let _ = ctx.cluster.start(i);
    }
}

/// Prints the results summary of a run.
pub fn print_result(r: &RunResult) {
    println!(
        "-- {} / {} / seed {}{}: {} ops (ok {}, fail {}, info {}), {} faults, {:.0} s",
        r.workload.name(),
        r.nemesis.name(),
        r.seed,
        if r.unsafe_local_reads {
            " (unsafe local reads)"
        } else {
            ""
        },
        r.ops,
        r.ok,
        r.fail,
        r.info,
        r.faults,
        r.duration_s
    );
    for c in &r.checks {
        println!("   {:<14} valid: {}", c.checker, c.valid);
        for s in c.summary.iter().take(8) {
            println!("      {s}");
        }
        if c.valid == Valid::False && !c.witness.is_empty() {
            println!("      failing sub-history:");
            for w in c.witness.iter().take(30) {
                println!("      {w}");
            }
        }
    }
    println!(
        "   => valid: {}   (report: {})",
        r.valid,
        r.dir.join("report.html").display()
    );
}

/// Re-checks a run directory's history (after changing a checker, for instance) and rewrites
/// its `results.json` and `report.html`; the liveness verdict of the run is kept.
pub fn recheck(dir: &std::path::Path) -> anyhow::Result<RunResult> {
    let opts: TestOpts = serde_json::from_slice(&std::fs::read(dir.join("test.json"))?)?;
    let (ops, faults) = crate::record::read_history(&dir.join("history.jsonl"))?;
    let mut r: RunResult = serde_json::from_slice(&std::fs::read(dir.join("results.json"))?)?;
    let mut checks = workload::check(opts.workload, &ops, &faults);
    checks.extend(r.checks.iter().filter(|c| c.checker == "liveness").cloned());
    r.valid = checks.iter().fold(Valid::True, |acc, c| acc.and(c.valid));
    r.checks = checks;
    r.dir = dir.to_path_buf();
    std::fs::write(dir.join("results.json"), serde_json::to_vec_pretty(&r)?)?;
    std::fs::write(
        dir.join("report.html"),
        crate::report::html(&opts, &r, &ops, &faults),
    )?;
    Ok(r)
}
