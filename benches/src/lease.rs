//! `lease`: grant+revoke throughput (one operation = a LeaseGrant then a LeaseRevoke of the
//! granted lease), or keep-alive throughput with many leases renewed over LeaseKeepAlive streams.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use keel_proto::etcdserverpb::lease_client::LeaseClient;
use keel_proto::etcdserverpb::{LeaseGrantRequest, LeaseKeepAliveRequest, LeaseRevokeRequest};
use tokio::sync::mpsc;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::driver::{
    Common, Progress, Worker, channels, progress_printer, run_closed_loop, unary_channels,
};
use crate::lean::BenchChannel;
use crate::stats::{Summary, histogram, record, summarize};

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
pub enum LeaseMode {
    /// Grant a lease and revoke it (one operation).
    GrantRevoke,
    /// Keep `--leases` leases alive over `--streams` LeaseKeepAlive streams, `--clients`
    /// keep-alives in flight in total.
    Keepalive,
}

#[derive(Args, Debug, Clone)]
pub struct LeaseArgs {
    #[arg(long, value_enum, default_value = "grant-revoke")]
    pub mode: LeaseMode,
    /// TTL of granted leases, in seconds.
    #[arg(long, default_value_t = 600)]
    pub ttl: i64,
    /// Leases kept alive (keepalive mode).
    #[arg(long, default_value_t = 10_000)]
    pub leases: usize,
    /// LeaseKeepAlive streams (keepalive mode), spread over `--conns` connections.
    #[arg(long, default_value_t = 10)]
    pub streams: usize,
}

struct GrantRevoke {
    lease: LeaseClient<BenchChannel>,
    ttl: i64,
}

impl Worker for GrantRevoke {
    async fn op(&mut self, _n: u64) -> anyhow::Result<usize> {
        let g = self
            .lease
            .lease_grant(LeaseGrantRequest {
                ttl: self.ttl,
                id: 0,
            })
            .await?
            .into_inner();
        anyhow::ensure!(g.error.is_empty(), "grant: {}", g.error);
        self.lease
            .lease_revoke(LeaseRevokeRequest { id: g.id })
            .await?;
        Ok(0)
    }
}

pub async fn run(common: &Common, args: &LeaseArgs) -> anyhow::Result<Summary> {
    match args.mode {
        LeaseMode::GrantRevoke => {
            let chans = unary_channels(&common.endpoints, common.conns, common.grpc_client).await?;
            let workers = (0..common.clients.max(1))
                .map(|i| GrantRevoke {
                    lease: LeaseClient::new(chans[i % chans.len()].clone()),
                    ttl: args.ttl,
                })
                .collect();
            run_closed_loop("lease-grant-revoke", common, workers, &[]).await
        }
        LeaseMode::Keepalive => {
            let chans = channels(&common.endpoints, common.conns).await?;
            keepalive(common, args, &chans).await
        }
    }
}

/// Grants `n` leases with 64 concurrent requests.
async fn grant_many(chans: &[Channel], n: usize, ttl: i64) -> anyhow::Result<Vec<i64>> {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..64.min(n.max(1)) {
        let mut lease = LeaseClient::new(chans[t % chans.len()].clone());
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            while (next.fetch_add(1, Ordering::Relaxed) as usize) < n {
                let g = lease
                    .lease_grant(LeaseGrantRequest { ttl, id: 0 })
                    .await?
                    .into_inner();
                anyhow::ensure!(g.error.is_empty(), "grant: {}", g.error);
                ids.push(g.id);
            }
            Ok::<_, anyhow::Error>(ids)
        }));
    }
    let mut ids = Vec::with_capacity(n);
    for t in tasks {
        ids.extend(t.await??);
    }
    Ok(ids)
}

async fn revoke_many(chans: &[Channel], ids: Vec<i64>) {
    let ids = Arc::new(ids);
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..64 {
        let mut lease = LeaseClient::new(chans[t % chans.len()].clone());
        let (ids, next) = (ids.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(id) = ids.get(i) else { break };
                let _ = lease.lease_revoke(LeaseRevokeRequest { id: *id }).await;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

async fn keepalive(
    common: &Common,
    args: &LeaseArgs,
    chans: &[Channel],
) -> anyhow::Result<Summary> {
    let t0 = Instant::now();
    let ids = grant_many(chans, args.leases.max(1), args.ttl).await?;
    if !common.quiet {
        eprintln!(
            "  granted {} leases in {:.2} s",
            ids.len(),
            t0.elapsed().as_secs_f64()
        );
    }
    let streams = args.streams.clamp(1, ids.len());
    let window = (common.clients / streams).max(1);
    let progress = Arc::new(Progress::default());
    let printer = progress_printer("lease-keepalive".into(), progress.clone(), common.quiet);
    let start = Instant::now();
    let deadline = common.deadline(start);
    let mut tasks = Vec::new();
    for s in 0..streams {
        let mine: Vec<i64> = ids.iter().skip(s).step_by(streams).copied().collect();
        let window = window.min(mine.len());
        let lease = LeaseClient::new(chans[s % chans.len()].clone());
        let (progress, total) = (progress.clone(), common.total);
        tasks.push(tokio::spawn(keepalive_stream(
            lease, mine, window, deadline, total, progress,
        )));
    }
    let mut all = histogram();
    let mut errors = 0;
    let mut first_error = None;
    for t in tasks {
        let (h, e, fe) = t.await??;
        all.add(&h)?;
        errors += e;
        first_error = first_error.or(fe);
    }
    let elapsed = start.elapsed();
    printer.abort();
    revoke_many(chans, ids).await;
    let mut s = summarize("lease-keepalive", &all, errors, elapsed);
    s.clients = streams * window;
    s.first_error = first_error;
    s.extra.insert("leases".into(), args.leases as f64);
    s.extra.insert("streams".into(), streams as f64);
    s.extra.insert("in_flight_per_stream".into(), window as f64);
    Ok(s)
}

type StreamResult = (hdrhistogram::Histogram<u64>, u64, Option<String>);

async fn keepalive_stream(
    mut lease: LeaseClient<Channel>,
    ids: Vec<i64>,
    window: usize,
    deadline: Instant,
    total: u64,
    progress: Arc<Progress>,
) -> anyhow::Result<StreamResult> {
    let (tx, rx) = mpsc::channel::<LeaseKeepAliveRequest>(window + 1);
    let mut sent: HashMap<i64, Instant> = HashMap::with_capacity(window);
    let mut h = histogram();
    let (mut errors, mut first_error) = (0u64, None);
    let mut next = 0usize;
    // Queue the first window before opening the stream: grpc-go (etcd) sends the response
    // headers only with the first response, and tonic waits for them.
    for _ in 0..window {
        let id = ids[next % ids.len()];
        next += 1;
        sent.insert(id, Instant::now());
        tx.send(LeaseKeepAliveRequest { id }).await?;
    }
    let mut resp = lease
        .lease_keep_alive(ReceiverStream::new(rx))
        .await?
        .into_inner();
    while !sent.is_empty() {
        let msg = tokio::time::timeout(Duration::from_secs(10), resp.message()).await;
        let r = match msg {
            Ok(Ok(Some(r))) => r,
            Ok(Ok(None)) => anyhow::bail!("keep-alive stream closed by the server"),
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => anyhow::bail!(
                "no keep-alive response for 10 s ({} outstanding)",
                sent.len()
            ),
        };
        let Some(t0) = sent.remove(&r.id) else {
            continue;
        };
        if r.ttl <= 0 {
            errors += 1;
            progress.errors.fetch_add(1, Ordering::Relaxed);
            first_error.get_or_insert_with(|| format!("lease {:x} answered ttl {}", r.id, r.ttl));
        } else {
            record(&mut h, t0.elapsed());
            progress.ops.fetch_add(1, Ordering::Relaxed);
        }
        let done = progress.ops.load(Ordering::Relaxed) + progress.errors.load(Ordering::Relaxed);
        if Instant::now() < deadline && (total == 0 || done < total) {
            // The next lease of this stream that is not already in flight.
            let id = ids[next % ids.len()];
            next += 1;
            if let std::collections::hash_map::Entry::Vacant(v) = sent.entry(id) {
                v.insert(Instant::now());
                tx.send(LeaseKeepAliveRequest { id }).await?;
            }
        }
    }
    Ok((h, errors, first_error))
}
