//! `watch`: fan-out (N watchers on one prefix) or many-prefix (N watchers on distinct keys)
//! over M streams, fed by writers whose values carry a send timestamp; measures delivered
//! events per second, put-to-event latency, and counts lost and duplicate events. With
//! `--idle`, measures the server's memory per idle watcher instead.
//!
//! [`WatchGroup`] (watchers spread over streams, per-watcher loss/duplicate accounting) is
//! shared with the `kube` mix.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use keel_proto::etcdserverpb::kv_client::KvClient;
use keel_proto::etcdserverpb::watch_request::RequestUnion;
use keel_proto::etcdserverpb::{PutRequest, WatchCreateRequest, WatchRequest};
use tokio::sync::mpsc;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::driver::{
    Common, Progress, Worker, channels, key, now_us, progress_printer, rss_kib, run_closed_loop,
    stamp_of, stamped_value, unary_channels,
};
use crate::lean::BenchChannel;
use crate::stats::{Summary, histogram, record_us, summarize};

#[derive(Args, Debug, Clone)]
pub struct WatchArgs {
    /// Watchers in total.
    #[arg(long, default_value_t = 1000)]
    pub watchers: usize,
    /// Watch streams the watchers are multiplexed on (spread over `--conns` connections).
    #[arg(long, default_value_t = 10)]
    pub streams: usize,
    /// Many-prefix mode: each watcher watches its own key, writers cycle over those keys.
    /// Without it every watcher watches one prefix that every write falls in (fan-out).
    #[arg(long)]
    pub distinct_keys: bool,
    /// Many-prefix mode with prefix watchers: as `--distinct-keys`, but each watcher watches
    /// the prefix that is its key (a range watch, as a controller watching one object's
    /// subtree), and no key is a prefix of another's, so each write still matches one watcher.
    #[arg(long, conflicts_with = "distinct_keys")]
    pub distinct_prefixes: bool,
    /// Seconds to wait, after the writers stop, for every event to arrive.
    #[arg(long, default_value_t = 30.0)]
    pub drain: f64,
    /// Only create the watchers (on distinct keys nobody writes) and report the memory they
    /// cost the server: RSS of `--rss-pid` before and after, per watcher.
    #[arg(long)]
    pub idle: bool,
    /// Server process(es) whose VmRSS to sample in `--idle` mode (the members of `--endpoints`).
    #[arg(long, value_delimiter = ',')]
    pub rss_pid: Vec<u32>,
    /// Seconds to let the server settle before sampling RSS in `--idle` mode.
    #[arg(long, default_value_t = 3.0)]
    pub settle: f64,
    /// Replay mode: first write this many revisions to the prefix (`--clients` writers),
    /// then create the watchers at once, all from the first of those revisions (controllers
    /// resuming after a restart), and measure how fast the server replays that history to
    /// them: events/s from the first create request until every watcher has every event.
    #[arg(long, default_value_t = 0, conflicts_with_all = ["distinct_keys", "distinct_prefixes", "idle"])]
    pub replay: u64,
}

/// What one watcher watches.
#[derive(Debug, Clone)]
pub struct WatchSpec {
    pub key: Vec<u8>,
    pub range_end: Vec<u8>,
    /// 0: from the next revision.
    pub start_revision: i64,
}

/// etcd's prefix range end: the prefix with its last byte incremented.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[derive(Default, Clone, Copy)]
struct WatcherState {
    unique: u64,
    last_rev: i64,
}

struct StreamOutcome {
    hist: Histogram<u64>,
    /// (global watcher index, unique events).
    unique: Vec<(usize, u64)>,
    duplicates: u64,
    canceled: u64,
    /// Responses that carried events (events per response shows how a server batches).
    event_responses: u64,
    last_event: Option<Instant>,
}

/// Watchers spread over streams, counting what they receive.
pub struct WatchGroup {
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<StreamOutcome>>>,
    unique_total: Arc<AtomicU64>,
    watchers: usize,
}

/// Everything the watchers saw.
pub struct WatchOutcome {
    /// Put-to-event latency of every first delivery of an event carrying a timestamp.
    pub hist: Histogram<u64>,
    /// Unique events per watcher (index as in the specs).
    pub unique: Vec<u64>,
    pub duplicates: u64,
    pub canceled: u64,
    /// Responses that carried events.
    pub event_responses: u64,
    pub last_event: Option<Instant>,
}

impl WatchGroup {
    /// Creates one watcher per spec, spread over `streams` streams on `chans`, and returns once
    /// every watcher is created.
    pub async fn open(
        chans: &[Channel],
        streams: usize,
        specs: Vec<WatchSpec>,
        progress: Arc<Progress>,
    ) -> anyhow::Result<WatchGroup> {
        let streams = streams.clamp(1, specs.len().max(1));
        let watchers = specs.len();
        let mut per_stream: Vec<Vec<(usize, WatchSpec)>> = vec![Vec::new(); streams];
        for (i, s) in specs.into_iter().enumerate() {
            per_stream[i % streams].push((i, s));
        }
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let unique_total = Arc::new(AtomicU64::new(0));
        let created = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for (s, specs) in per_stream.into_iter().enumerate() {
            let chan = chans[s % chans.len()].clone();
            let (stop_rx, unique_total, created, progress) = (
                stop_rx.clone(),
                unique_total.clone(),
                created.clone(),
                progress.clone(),
            );
            tasks.push(tokio::spawn(run_stream(
                chan,
                specs,
                stop_rx,
                unique_total,
                created,
                progress,
            )));
        }
        let t0 = Instant::now();
        while (created.load(Ordering::Relaxed) as usize) < watchers {
            if let Some(t) = tasks.iter_mut().find(|t| t.is_finished()) {
                let r = t.await?;
                anyhow::bail!(
                    "a watch stream ended while creating watchers: {:?}",
                    r.err()
                );
            }
            anyhow::ensure!(
                t0.elapsed() < Duration::from_secs(120),
                "only {} of {watchers} watchers created after 120 s",
                created.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(WatchGroup {
            stop,
            tasks,
            unique_total,
            watchers,
        })
    }

    pub fn watchers(&self) -> usize {
        self.watchers
    }

    /// Unique events received so far by all watchers.
    pub fn unique_total(&self) -> u64 {
        self.unique_total.load(Ordering::Relaxed)
    }

    /// Waits until `expected` unique events arrived in total, or `timeout`; true if they did.
    pub async fn wait_for(&self, expected: u64, timeout: Duration) -> bool {
        let t0 = Instant::now();
        loop {
            if self.unique_total() >= expected {
                return true;
            }
            if t0.elapsed() >= timeout {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Closes every stream and merges what the watchers saw.
    pub async fn stop(self) -> anyhow::Result<WatchOutcome> {
        let _ = self.stop.send(true);
        let mut out = WatchOutcome {
            hist: histogram(),
            unique: vec![0; self.watchers],
            duplicates: 0,
            canceled: 0,
            event_responses: 0,
            last_event: None,
        };
        for t in self.tasks {
            let s = t.await??;
            out.hist.add(&s.hist)?;
            for (i, u) in s.unique {
                out.unique[i] = u;
            }
            out.duplicates += s.duplicates;
            out.canceled += s.canceled;
            out.event_responses += s.event_responses;
            out.last_event = out.last_event.max(s.last_event);
        }
        Ok(out)
    }
}

async fn run_stream(
    chan: Channel,
    specs: Vec<(usize, WatchSpec)>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    unique_total: Arc<AtomicU64>,
    created: Arc<AtomicU64>,
    progress: Arc<Progress>,
) -> anyhow::Result<StreamOutcome> {
    let (tx, rx) = mpsc::channel::<WatchRequest>(256);
    let creates: Vec<WatchRequest> = specs
        .iter()
        .map(|(_, s)| WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: s.key.clone(),
                range_end: s.range_end.clone(),
                start_revision: s.start_revision,
                ..Default::default()
            })),
        })
        .collect();
    // The feeder keeps the request side open until the stream is stopped.
    let mut feeder_stop = stop.clone();
    let feeder = tokio::spawn(async move {
        for c in creates {
            if tx.send(c).await.is_err() {
                return;
            }
        }
        let _ = feeder_stop.wait_for(|s| *s).await;
        drop(tx);
    });
    let mut grpc = tonic::client::Grpc::new(chan).max_decoding_message_size(64 << 20);
    grpc.ready().await?;
    let mut responses = grpc
        .streaming(
            tonic::Request::new(ReceiverStream::new(rx)),
            tonic::codegen::http::uri::PathAndQuery::from_static("/etcdserverpb.Watch/Watch"),
            tonic_prost::ProstCodec::<WatchRequest, lean::WatchResponse>::default(),
        )
        .await?
        .into_inner();
    // Created responses come in the order of the create requests.
    let mut by_id: HashMap<i64, usize> = HashMap::with_capacity(specs.len());
    let mut state = vec![WatcherState::default(); specs.len()];
    let mut next_created = 0usize;
    let mut out = StreamOutcome {
        hist: histogram(),
        unique: Vec::new(),
        duplicates: 0,
        canceled: 0,
        event_responses: 0,
        last_event: None,
    };
    loop {
        let msg = tokio::select! {
            m = responses.message() => m,
            _ = stop.wait_for(|s| *s) => break,
        };
        let Some(r) = msg? else { break };
        if r.created {
            if next_created < specs.len() {
                by_id.insert(r.watch_id, next_created);
                next_created += 1;
                created.fetch_add(1, Ordering::Relaxed);
            }
            if r.canceled {
                out.canceled += 1;
            }
            continue;
        }
        if r.canceled {
            out.canceled += 1;
            continue;
        }
        if r.events.is_empty() {
            continue;
        }
        let Some(&w) = by_id.get(&r.watch_id) else {
            continue;
        };
        out.event_responses += 1;
        let now = now_us();
        let st = &mut state[w];
        let before = st.last_rev;
        let mut new = 0;
        for ev in &r.events {
            let Some(kv) = &ev.kv else { continue };
            if kv.mod_revision <= before {
                out.duplicates += 1;
                continue;
            }
            new += 1;
            st.last_rev = st.last_rev.max(kv.mod_revision);
            if let Some(ts) = stamp_of(&kv.value).filter(|ts| *ts <= now) {
                record_us(&mut out.hist, now - ts);
            }
        }
        st.unique += new;
        if new > 0 {
            out.last_event = Some(Instant::now());
            unique_total.fetch_add(new, Ordering::Relaxed);
            progress.events.fetch_add(new, Ordering::Relaxed);
        }
    }
    feeder.abort();
    out.unique = specs
        .iter()
        .zip(&state)
        .map(|((i, _), s)| (*i, s.unique))
        .collect();
    Ok(out)
}

/// A writer: puts stamped values to the watched keys, counting acknowledged puts per key.
struct Writer {
    kv: KvClient<BenchChannel>,
    prefix: String,
    keys: u64,
    width: usize,
    val_size: usize,
    acked: Arc<Vec<AtomicU64>>,
}

impl Writer {
    /// `--clients` writers over `chans` (round robin), sharing the acknowledgement counts.
    fn for_clients(
        common: &Common,
        chans: &[BenchChannel],
        prefix: &str,
        keys: u64,
        width: usize,
        acked: &Arc<Vec<AtomicU64>>,
    ) -> Vec<Writer> {
        (0..common.clients.max(1))
            .map(|i| Writer {
                kv: KvClient::new(chans[i % chans.len()].clone()),
                prefix: prefix.to_string(),
                keys,
                width,
                val_size: common.val_size,
                acked: acked.clone(),
            })
            .collect()
    }
}

impl Worker for Writer {
    async fn op(&mut self, n: u64) -> anyhow::Result<usize> {
        let i = n % self.keys;
        self.kv
            .put(PutRequest {
                key: key(&self.prefix, i, self.width),
                value: stamped_value(self.val_size),
                ..Default::default()
            })
            .await?;
        self.acked[i as usize].fetch_add(1, Ordering::Relaxed);
        Ok(0)
    }
}

pub fn run_id() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}{:09}", t.as_secs(), t.subsec_nanos())
}

pub async fn run(common: &Common, args: &WatchArgs) -> anyhow::Result<Summary> {
    let prefix = format!("/bench/watch/{}/", run_id());
    let n = args.watchers.max(1);
    let distinct = args.distinct_keys || args.distinct_prefixes || args.idle;
    // Keys the writers cycle over: one per watcher (distinct), else the key space.
    let keys = if distinct {
        n as u64
    } else {
        common.key_space.max(1)
    };
    let width = keys.to_string().len();
    let specs: Vec<WatchSpec> = if distinct {
        (0..n as u64)
            .map(|i| {
                let key = key(&prefix, i, width);
                let range_end = if args.distinct_prefixes {
                    prefix_end(&key)
                } else {
                    vec![]
                };
                WatchSpec {
                    key,
                    range_end,
                    start_revision: 0,
                }
            })
            .collect()
    } else {
        vec![
            WatchSpec {
                key: prefix.clone().into_bytes(),
                range_end: prefix_end(prefix.as_bytes()),
                start_revision: 0,
            };
            n
        ]
    };
    let rss_before: u64 = args
        .rss_pid
        .iter()
        .map(|p| rss_kib(*p))
        .sum::<anyhow::Result<u64>>()?;
    if args.replay > 0 {
        return replay(common, args, &prefix, keys, width, specs).await;
    }
    let chans = channels(&common.endpoints, common.conns).await?;
    let progress = Arc::new(Progress::default());
    let t0 = Instant::now();
    let group = WatchGroup::open(&chans, args.streams, specs, progress.clone()).await?;
    let create_secs = t0.elapsed().as_secs_f64();
    if !common.quiet {
        eprintln!(
            "  {n} watchers created on {} streams in {create_secs:.2} s",
            args.streams.min(n)
        );
    }
    let name = if args.idle {
        "watch-idle"
    } else if args.distinct_prefixes {
        "watch-distinct-prefix"
    } else if distinct {
        "watch-distinct"
    } else {
        "watch"
    };
    if args.idle {
        tokio::time::sleep(Duration::from_secs_f64(args.settle)).await;
        let rss_after: u64 = args
            .rss_pid
            .iter()
            .map(|p| rss_kib(*p))
            .sum::<anyhow::Result<u64>>()?;
        group.stop().await?;
        let mut s = summarize(name, &histogram(), 0, t0.elapsed());
        s.extra.insert("watchers".into(), n as f64);
        s.extra.insert("streams".into(), args.streams.min(n) as f64);
        s.extra.insert("create_seconds".into(), create_secs);
        if !args.rss_pid.is_empty() {
            s.extra.insert("rss_before_kib".into(), rss_before as f64);
            s.extra.insert("rss_after_kib".into(), rss_after as f64);
            s.extra.insert(
                "bytes_per_watcher".into(),
                (rss_after as f64 - rss_before as f64) * 1024.0 / n as f64,
            );
        }
        return Ok(s);
    }

    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..keys).map(|_| AtomicU64::new(0)).collect());
    let wchans =
        unary_channels(&common.endpoints, common.clients.max(1), common.grpc_client).await?;
    let writers = Writer::for_clients(common, &wchans, &prefix, keys, width, &acked);
    let printer = progress_printer(format!("{name} delivery"), progress.clone(), common.quiet);
    let start = Instant::now();
    let mut quiet = common.clone();
    quiet.quiet = true;
    let put_summary = run_closed_loop("watch-writer-put", &quiet, writers, &[]).await?;
    let puts: u64 = acked.iter().map(|a| a.load(Ordering::Relaxed)).sum();
    let expected_per_watcher: Vec<u64> = if distinct {
        acked.iter().map(|a| a.load(Ordering::Relaxed)).collect()
    } else {
        vec![puts; n]
    };
    let expected: u64 = expected_per_watcher.iter().sum();
    let drain_start = Instant::now();
    let drained = group
        .wait_for(expected, Duration::from_secs_f64(args.drain))
        .await;
    let drain_secs = drain_start.elapsed().as_secs_f64();
    // Give duplicates a moment to show up before closing.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let outcome = group.stop().await?;
    printer.abort();
    let mut s = delivery_summary(
        name,
        &outcome.hist,
        &outcome,
        &expected_per_watcher,
        args.streams,
        puts,
        start,
        drained,
    );
    s.clients = common.clients.max(1);
    s.errors = put_summary.errors;
    s.first_error = put_summary.first_error.clone();
    s.extra.insert("drain_seconds".into(), drain_secs);
    s.extra.insert("create_seconds".into(), create_secs);
    s.parts.push(put_summary);
    Ok(s)
}

/// The summary of a delivery run: events/s from `start` to the last event, latency from
/// `hist`, and the loss/duplicate accounting against `expected` (per watcher).
#[allow(clippy::too_many_arguments)]
fn delivery_summary(
    name: &str,
    hist: &Histogram<u64>,
    outcome: &WatchOutcome,
    expected: &[u64],
    streams: usize,
    puts: u64,
    start: Instant,
    drained: bool,
) -> Summary {
    let n = expected.len();
    let lost: u64 = expected
        .iter()
        .zip(&outcome.unique)
        .map(|(e, u)| e.saturating_sub(*u))
        .sum();
    let unique: u64 = outcome.unique.iter().sum();
    let expected_total: u64 = expected.iter().sum();
    let end = outcome
        .last_event
        .unwrap_or(start)
        .max(start + Duration::from_millis(1));
    let mut s = summarize(name, hist, 0, end - start);
    s.ops = unique;
    s.ops_per_sec = unique as f64 / s.seconds;
    for (k, v) in [
        ("watchers", n as f64),
        ("streams", streams.min(n) as f64),
        ("puts", puts as f64),
        ("expected_events", expected_total as f64),
        ("lost", lost as f64),
        ("duplicates", outcome.duplicates as f64),
        ("canceled", outcome.canceled as f64),
        (
            "events_per_response",
            (unique + outcome.duplicates) as f64 / outcome.event_responses.max(1) as f64,
        ),
        (
            "unexpected_extra",
            unique.saturating_sub(expected_total) as f64,
        ),
        ("drained", if drained { 1.0 } else { 0.0 }),
    ] {
        s.extra.insert(k.into(), v);
    }
    s
}

/// `--replay`: writes the history, then measures its replay to watchers created all at once.
async fn replay(
    common: &Common,
    args: &WatchArgs,
    prefix: &str,
    keys: u64,
    width: usize,
    mut specs: Vec<WatchSpec>,
) -> anyhow::Result<Summary> {
    let n = specs.len();
    let wchans =
        unary_channels(&common.endpoints, common.clients.max(1), common.grpc_client).await?;
    // The revision before the history: nothing else writes while the benchmark runs.
    let mut probe = KvClient::new(wchans[0].clone());
    let before = probe
        .range(keel_proto::etcdserverpb::RangeRequest {
            key: prefix.as_bytes().to_vec(),
            limit: 1,
            ..Default::default()
        })
        .await?
        .into_inner()
        .header
        .map(|h| h.revision)
        .unwrap_or_default();
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..keys).map(|_| AtomicU64::new(0)).collect());
    let writers = Writer::for_clients(common, &wchans, prefix, keys, width, &acked);
    let mut history = common.clone();
    history.quiet = true;
    history.total = args.replay;
    history.duration = 600.0;
    history.rate = 0.0;
    let put_summary = run_closed_loop("watch-replay-put", &history, writers, &[]).await?;
    let puts: u64 = acked.iter().map(|a| a.load(Ordering::Relaxed)).sum();
    anyhow::ensure!(
        puts > 0 && put_summary.errors == 0,
        "writing the history failed: {} of {} puts acknowledged ({:?})",
        puts,
        args.replay,
        put_summary.first_error
    );
    for s in &mut specs {
        s.start_revision = before + 1;
    }
    if !common.quiet {
        eprintln!(
            "  {puts} revisions written; {n} watchers replay them from revision {}",
            before + 1
        );
    }
    let chans = channels(&common.endpoints, common.conns).await?;
    let progress = Arc::new(Progress::default());
    let printer = progress_printer(
        "watch-replay delivery".into(),
        progress.clone(),
        common.quiet,
    );
    let start = Instant::now();
    let group = WatchGroup::open(&chans, args.streams, specs, progress.clone()).await?;
    let expected = puts * n as u64;
    let drained = group
        .wait_for(expected, Duration::from_secs_f64(args.drain))
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let outcome = group.stop().await?;
    printer.abort();
    // The history's values carry their puts' send times too, but a put-to-event latency
    // means nothing for revisions written before the watchers existed: none is reported.
    let mut s = delivery_summary(
        "watch-replay",
        &histogram(),
        &outcome,
        &vec![puts; n],
        args.streams,
        puts,
        start,
        drained,
    );
    s.clients = common.clients.max(1);
    s.parts.push(put_summary);
    Ok(s)
}

/// The parts of `etcdserverpb.WatchResponse` the load generator reads (same field numbers; prost
/// skips the rest without allocating). Decoding every event in full copies its key, value and
/// header; the load generator shares the machine with the cluster it measures, whichever system
/// that is, and this cut its CPU by about 13% in a 1 000-watcher fan-out against either.
mod lean {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct WatchResponse {
        #[prost(int64, tag = "2")]
        pub watch_id: i64,
        #[prost(bool, tag = "3")]
        pub created: bool,
        #[prost(bool, tag = "4")]
        pub canceled: bool,
        #[prost(message, repeated, tag = "11")]
        pub events: Vec<Event>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Event {
        #[prost(message, optional, tag = "2")]
        pub kv: Option<KeyValue>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct KeyValue {
        #[prost(int64, tag = "3")]
        pub mod_revision: i64,
        /// Shares the received buffer (no copy); only its first bytes (the stamp) are read.
        #[prost(bytes = "bytes", tag = "5")]
        pub value: bytes::Bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/a/"), b"/a0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }

    #[test]
    fn a_delivery_summary_counts_lost_events_per_watcher_and_uses_the_given_latencies() {
        let start = Instant::now();
        let mut seen = histogram();
        record_us(&mut seen, 2_000);
        let outcome = WatchOutcome {
            hist: seen.clone(),
            // The second watcher got one event more than expected: that is not a loss to
            // offset the third's two missing ones.
            unique: vec![5, 6, 3],
            duplicates: 1,
            canceled: 0,
            event_responses: 7,
            last_event: Some(start + Duration::from_secs(2)),
        };
        let live = delivery_summary(
            "watch",
            &outcome.hist,
            &outcome,
            &[5, 5, 5],
            10,
            5,
            start,
            true,
        );
        assert_eq!(live.ops, 14);
        assert!(
            (live.ops_per_sec - 7.0).abs() < 0.01,
            "{}",
            live.ops_per_sec
        );
        assert_eq!(live.extra["lost"], 2.0);
        assert_eq!(live.extra["unexpected_extra"], 0.0);
        assert_eq!(live.extra["streams"], 3.0, "no more streams than watchers");
        assert_eq!(live.extra["events_per_response"], 15.0 / 7.0);
        assert!(live.p50_ms > 1.9, "{}", live.p50_ms);
        let replay = delivery_summary(
            "watch-replay",
            &histogram(),
            &outcome,
            &[5, 5, 5],
            10,
            5,
            start,
            false,
        );
        assert_eq!(replay.p99_ms, 0.0);
        assert_eq!(replay.extra["drained"], 0.0);
    }

    #[test]
    fn lean_response_reads_what_a_full_one_carries() {
        use keel_proto::etcdserverpb::{ResponseHeader, WatchResponse};
        use keel_proto::mvccpb::{Event, KeyValue};
        use prost::Message;
        let kv = |rev: i64, value: &[u8]| KeyValue {
            key: b"/bench/key".to_vec(),
            create_revision: 2,
            mod_revision: rev,
            version: rev - 1,
            value: value.to_vec(),
            lease: 7,
        };
        let full = WatchResponse {
            header: Some(ResponseHeader {
                cluster_id: 1,
                member_id: 2,
                revision: 9,
                raft_term: 3,
            }),
            watch_id: 42,
            created: true,
            canceled: true,
            compact_revision: 5,
            cancel_reason: "why".into(),
            fragment: true,
            events: vec![
                Event {
                    r#type: 0,
                    kv: Some(kv(8, b"stamp-8-value")),
                    prev_kv: Some(kv(6, b"older")),
                },
                Event {
                    r#type: 1,
                    kv: Some(kv(9, b"")),
                    prev_kv: None,
                },
            ],
        };
        let lean = lean::WatchResponse::decode(full.encode_to_vec().as_slice()).unwrap();
        assert_eq!(lean.watch_id, 42);
        assert!(lean.created && lean.canceled);
        let got: Vec<(i64, &[u8])> = lean
            .events
            .iter()
            .map(|e| {
                let kv = e.kv.as_ref().unwrap();
                (kv.mod_revision, &kv.value[..])
            })
            .collect();
        assert_eq!(got, vec![(8, &b"stamp-8-value"[..]), (9, &b""[..])]);
    }
}
