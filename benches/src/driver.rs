//! The pieces every workload shares: the common flags, gRPC channels, keys and values, a
//! closed-loop (or rate-limited) driver with progress output.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use tonic::transport::{Channel, Endpoint};

use crate::lean::{BenchChannel, LeanChannel};
use crate::stats::{Summary, histogram, record, summarize};

/// Flags shared by the load workloads.
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Comma-separated endpoints (host:port); connections are spread over them round-robin.
    #[arg(long, default_value = "127.0.0.1:2379", value_delimiter = ',')]
    pub endpoints: Vec<String>,
    /// Concurrent clients (each has one request in flight).
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// gRPC connections (HTTP/2) shared by the clients.
    #[arg(long, default_value_t = 4)]
    pub conns: usize,
    /// Stop after this many operations (0: no limit, run for `--duration`).
    #[arg(long, default_value_t = 0)]
    pub total: u64,
    /// Stop after this many seconds (whichever of `--total` and `--duration` comes first).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Target rate in operations per second over all clients (0: as fast as possible).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Key length in bytes (zero-padded decimal index, after the workload's prefix if any).
    #[arg(long, default_value_t = 8)]
    pub key_size: usize,
    /// Value length in bytes.
    #[arg(long, default_value_t = 256)]
    pub val_size: usize,
    /// Number of distinct keys.
    #[arg(long, default_value_t = 10_000)]
    pub key_space: u64,
    /// Print the summary as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// No progress lines on stderr.
    #[arg(long)]
    pub quiet: bool,
    /// How unary calls reach the server: `lean` sends them from the calling task straight
    /// into the HTTP/2 connection (see the `lean` module); `tonic` through a tonic `Channel`
    /// (two more task hand-offs per call in the load generator). Streams always use tonic.
    #[arg(long, value_enum, default_value_t = GrpcClient::Lean)]
    pub grpc_client: GrpcClient,
}

/// The transport of unary calls (`--grpc-client`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrpcClient {
    Lean,
    Tonic,
}

impl Common {
    pub fn deadline(&self, start: Instant) -> Instant {
        start + Duration::from_secs_f64(self.duration.max(0.0))
    }
}

/// The endpoint of each of `conns` connections (at least one), round-robin over `endpoints`.
fn per_connection(endpoints: &[String], conns: usize) -> anyhow::Result<Vec<&String>> {
    anyhow::ensure!(!endpoints.is_empty(), "no endpoints");
    Ok((0..conns.max(1))
        .map(|i| &endpoints[i % endpoints.len()])
        .collect())
}

/// `conns` channels, spread over `endpoints` round-robin.
pub async fn channels(endpoints: &[String], conns: usize) -> anyhow::Result<Vec<Channel>> {
    let mut out = Vec::new();
    for endpoint in per_connection(endpoints, conns)? {
        out.push(connect(endpoint).await?);
    }
    Ok(out)
}

/// `conns` connections for unary calls, spread over `endpoints` round-robin, of the kind
/// `--grpc-client` names.
pub async fn unary_channels(
    endpoints: &[String],
    conns: usize,
    kind: GrpcClient,
) -> anyhow::Result<Vec<BenchChannel>> {
    let mut out = Vec::new();
    for endpoint in per_connection(endpoints, conns)? {
        out.push(match kind {
            GrpcClient::Lean => BenchChannel::Lean(LeanChannel::connect(endpoint).await?),
            GrpcClient::Tonic => BenchChannel::Tonic(connect(endpoint).await?),
        });
    }
    Ok(out)
}

pub async fn connect(endpoint: &str) -> anyhow::Result<Channel> {
    let url = if endpoint.contains("://") {
        endpoint.to_string()
    } else {
        format!("http://{endpoint}")
    };
    let ch = Endpoint::from_shared(url)?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        // Large fixed windows: the client never throttles a server's sends (grpc-go's BDP
        // estimation grows to similar sizes), and h2's budget for small buffered DATA frames
        // (half the connection window) is not exhausted by bursts of tiny watch responses.
        .initial_stream_window_size(16 << 20)
        .initial_connection_window_size(64 << 20)
        .connect()
        .await?;
    Ok(ch)
}

/// `prefix` followed by `i` as a zero-padded decimal of `width` digits: keys of one width sort
/// like their indexes, so `[key(a), key(b))` is the range of indexes `a..b`.
pub fn key(prefix: &str, i: u64, width: usize) -> Vec<u8> {
    format!("{prefix}{i:0width$}", width = width.max(1)).into_bytes()
}

/// A fixed multiplicative permutation of `0..space` (2 654 435 761 is prime, so `n ↦ n·p mod
/// space` visits every index once per `space` operations): spreads operations over the key
/// space without a random number generator.
pub fn spread(n: u64, space: u64) -> u64 {
    ((n as u128 * 2_654_435_761u128) % space.max(1) as u128) as u64
}

/// A value of `size` bytes.
pub fn value(size: usize, fill: u8) -> Vec<u8> {
    vec![fill; size]
}

/// The process-wide time base for timestamps carried in values (put-to-event latency).
pub fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// Microseconds since [`base`].
pub fn now_us() -> u64 {
    base().elapsed().as_micros() as u64
}

/// A value of `size` bytes (at least 8) starting with the current [`now_us`] timestamp.
pub fn stamped_value(size: usize) -> Vec<u8> {
    let mut v = vec![b'w'; size.max(8)];
    v[..8].copy_from_slice(&now_us().to_le_bytes());
    v
}

/// The timestamp written by [`stamped_value`], if the value has one.
pub fn stamp_of(value: &[u8]) -> Option<u64> {
    value
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
}

/// A small deterministic generator (SplitMix64) for the mixes.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// One client of a closed-loop workload: performs operation number `n` and says which part
/// (index into the driver's part names) it was.
pub trait Worker: Send + 'static {
    fn op(&mut self, n: u64) -> impl Future<Output = anyhow::Result<usize>> + Send;
}

/// Counters the progress printer reads.
#[derive(Default)]
pub struct Progress {
    pub ops: AtomicU64,
    pub errors: AtomicU64,
    /// A second counter a workload may show (delivered events).
    pub events: AtomicU64,
}

/// Prints one line per second to stderr until aborted.
pub fn progress_printer(
    name: String,
    progress: Arc<Progress>,
    quiet: bool,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if quiet {
            return;
        }
        let start = Instant::now();
        let (mut last_ops, mut last_ev) = (0, 0);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        loop {
            tick.tick().await;
            let ops = progress.ops.load(Ordering::Relaxed);
            let ev = progress.events.load(Ordering::Relaxed);
            let err = progress.errors.load(Ordering::Relaxed);
            let mut line = format!(
                "  [{name}] {:>4.0}s {ops} ops, {} ops/s",
                start.elapsed().as_secs_f64(),
                ops - last_ops
            );
            if ev > 0 {
                line += &format!(", {ev} events, {} events/s", ev - last_ev);
            }
            if err > 0 {
                line += &format!(", {err} errors");
            }
            eprintln!("{line}");
            (last_ops, last_ev) = (ops, ev);
        }
    })
}

/// Runs `workers` (one task each) until `--total` operations or `--duration` seconds, each
/// with one operation in flight, paced to `--rate` when given. Latency is measured per
/// operation from its send; with a rate, an operation is sent at its scheduled time.
pub async fn run_closed_loop<W: Worker>(
    name: &str,
    common: &Common,
    workers: Vec<W>,
    parts: &[&str],
) -> anyhow::Result<Summary> {
    let clients = workers.len();
    let next = Arc::new(AtomicU64::new(0));
    let progress = Arc::new(Progress::default());
    let first_error: Arc<Mutex<Option<String>>> = Arc::default();
    let printer = progress_printer(name.to_string(), progress.clone(), common.quiet);
    let start = Instant::now();
    let deadline = common.deadline(start);
    let (total, rate, nparts) = (common.total, common.rate, parts.len().max(1));
    let mut tasks = Vec::new();
    for mut w in workers {
        let (next, progress, first_error) = (next.clone(), progress.clone(), first_error.clone());
        tasks.push(tokio::spawn(async move {
            let mut hs: Vec<Histogram<u64>> = (0..nparts).map(|_| histogram()).collect();
            let mut errors = 0u64;
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if (total > 0 && n >= total) || Instant::now() >= deadline {
                    break;
                }
                if rate > 0.0 {
                    let at = start + Duration::from_secs_f64(n as f64 / rate);
                    if at >= deadline {
                        break;
                    }
                    tokio::time::sleep_until(at.into()).await;
                }
                let t0 = Instant::now();
                match w.op(n).await {
                    Ok(part) => {
                        record(&mut hs[part.min(nparts - 1)], t0.elapsed());
                        progress.ops.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        errors += 1;
                        progress.errors.fetch_add(1, Ordering::Relaxed);
                        let mut fe = first_error.lock().unwrap();
                        if fe.is_none() {
                            *fe = Some(format!("{e:#}"));
                        }
                    }
                }
            }
            (hs, errors)
        }));
    }
    let mut all: Vec<Histogram<u64>> = (0..nparts).map(|_| histogram()).collect();
    let mut errors = 0;
    for t in tasks {
        let (hs, e) = t.await?;
        for (a, h) in all.iter_mut().zip(hs) {
            a.add(&h)?;
        }
        errors += e;
    }
    let elapsed = start.elapsed();
    printer.abort();
    let mut merged = histogram();
    for h in &all {
        merged.add(h)?;
    }
    let mut s = summarize(name, &merged, errors, elapsed);
    s.clients = clients;
    s.first_error = first_error.lock().unwrap().take();
    if parts.len() > 1 {
        for (p, h) in parts.iter().zip(&all) {
            let mut ps = summarize(p, h, 0, elapsed);
            ps.clients = clients;
            s.parts.push(ps);
        }
    }
    Ok(s)
}

/// CPU seconds (user + system) this process has used so far (`/proc/self/stat`, in clock
/// ticks of 1/100 s as on every Linux this runs on).
pub fn self_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    parse_cpu_ticks(&stat)
        .map(|t| t as f64 / 100.0)
        .unwrap_or(0.0)
}

/// utime + stime from a `/proc/<pid>/stat` line (fields 14 and 15, counted after the
/// parenthesised command name, which may contain spaces).
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Reads `VmRSS` of a process, in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_vmrss(&status).ok_or_else(|| anyhow::anyhow!("no VmRSS in /proc/{pid}/status"))
}

pub fn parse_vmrss(status: &str) -> Option<u64> {
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_like_indexes() {
        assert_eq!(key("/p/", 42, 5), b"/p/00042");
        assert!(key("", 9, 4) < key("", 10, 4));
    }

    #[test]
    fn spread_is_a_permutation() {
        let space = 10_000;
        let mut seen = vec![false; space as usize];
        for n in 0..space {
            seen[spread(n, space) as usize] = true;
        }
        assert!(seen.iter().all(|s| *s));
    }

    #[test]
    fn stamps_round_trip() {
        let _ = base();
        let v = stamped_value(3);
        assert_eq!(v.len(), 8);
        assert!(stamp_of(&v).unwrap() <= now_us());
        assert_eq!(stamp_of(b"short"), None);
    }

    #[test]
    fn vmrss() {
        let s = "Name:\tetcd\nVmPeak:\t  100 kB\nVmRSS:\t   20480 kB\n";
        assert_eq!(parse_vmrss(s), Some(20480));
        assert_eq!(parse_vmrss("Name: x\n"), None);
        assert!(rss_kib(std::process::id()).unwrap() > 0);
    }

    #[test]
    fn cpu_ticks() {
        let stat = "42 (tokio rt) S 1 2 3 4 5 6 7 8 9 10 250 30 0 0 20";
        assert_eq!(parse_cpu_ticks(stat), Some(280));
        assert!(self_cpu_seconds() >= 0.0);
    }

    #[test]
    fn rng_is_deterministic() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        assert_eq!(a.next_u64(), b.next_u64());
        assert!(a.below(10) < 10);
    }
}
