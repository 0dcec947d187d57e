//! `keel-bench`: put / range / txn-cas load against any etcd v3 endpoint (Keel or etcd).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use keel_bench::stats::{histogram, record, summarize};
use keel_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use keel_proto::etcdserverpb::kv_client::KvClient;
use keel_proto::etcdserverpb::request_op::Request as Op;
use keel_proto::etcdserverpb::{Compare, PutRequest, RangeRequest, RequestOp, TxnRequest};
use tonic::transport::{Channel, Endpoint};

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum Workload {
    Put,
    Range,
    TxnCas,
}

#[derive(Parser, Debug)]
#[command(name = "keel-bench", about = "etcd v3 load generator (works against Keel and etcd)")]
struct Args {
    #[arg(value_enum)]
    workload: Workload,
    /// Comma-separated endpoints (host:port); clients are spread over them.
    #[arg(long, default_value = "127.0.0.1:2379", value_delimiter = ',')]
    endpoints: Vec<String>,
    /// Concurrent clients (each has one request in flight).
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// gRPC connections shared by the clients.
    #[arg(long, default_value_t = 4)]
    conns: usize,
    /// Total operations.
    #[arg(long, default_value_t = 10_000)]
    total: u64,
    /// Stop after this many seconds even if `--total` was not reached.
    #[arg(long, default_value_t = 60)]
    duration: u64,
    #[arg(long, default_value_t = 8)]
    key_size: usize,
    #[arg(long, default_value_t = 256)]
    val_size: usize,
    /// Number of distinct keys.
    #[arg(long, default_value_t = 10_000)]
    key_space: u64,
    /// Keys per range request (range workload).
    #[arg(long, default_value_t = 1)]
    range_keys: u64,
    /// l (linearizable) or s (serializable), for range.
    #[arg(long, default_value = "l")]
    consistency: String,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

fn key(i: u64, size: usize) -> Vec<u8> {
    let s = format!("{i:0width$}", width = size.max(1));
    s.into_bytes()
}

async fn channels(endpoints: &[String], conns: usize) -> anyhow::Result<Vec<Channel>> {
    let mut out = Vec::new();
    for i in 0..conns.max(1) {
        let ep = &endpoints[i % endpoints.len()];
        let ch = Endpoint::from_shared(format!("http://{ep}"))?.tcp_nodelay(true).connect().await?;
        out.push(ch);
    }
    Ok(out)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    let chans = channels(&args.endpoints, args.conns).await?;
    if args.workload != Workload::Put {
        // Load the key space first so reads and CAS find something.
        let mut c = KvClient::new(chans[0].clone());
        for i in 0..args.key_space.min(100_000) {
            c.put(PutRequest { key: key(i, args.key_size), value: vec![b'v'; args.val_size], ..Default::default() }).await?;
        }
    }
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(args.duration);
    let start = Instant::now();
    let progress = {
        let done = done.clone();
        let total = args.total;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let d = done.load(Ordering::Relaxed);
                eprintln!("  {d}/{total} ops, {:.0} ops/s", d as f64 / start.elapsed().as_secs_f64());
            }
        })
    };
    let mut tasks = Vec::new();
    for c in 0..args.clients {
        let mut kv = KvClient::new(chans[c % chans.len()].clone());
        let (args, next, done) = (args.clone(), next.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut h = histogram();
            let mut errors = 0u64;
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= args.total || Instant::now() > deadline {
                    break;
                }
                let k = key(n.wrapping_mul(2_654_435_761) % args.key_space.max(1), args.key_size);
                let t0 = Instant::now();
                let ok = match args.workload {
                    Workload::Put => kv.put(PutRequest { key: k, value: vec![b'v'; args.val_size], ..Default::default() }).await.is_ok(),
                    Workload::Range => {
                        let end = if args.range_keys > 1 {
                            let i = n.wrapping_mul(2_654_435_761) % args.key_space.max(1);
                            key(i + args.range_keys, args.key_size)
                        } else {
                            Vec::new()
                        };
                        kv.range(RangeRequest { key: k, range_end: end, serializable: args.consistency == "s", ..Default::default() }).await.is_ok()
                    }
                    Workload::TxnCas => {
                        // Read-modify-write guarded by mod_revision, as kube-apiserver updates.
                        match kv.range(RangeRequest { key: k.clone(), ..Default::default() }).await {
                            Ok(r) => {
                                let rev = r.into_inner().kvs.first().map(|kv| kv.mod_revision).unwrap_or(0);
                                let t = TxnRequest {
                                    compare: vec![Compare { key: k.clone(), target: CompareTarget::Mod as i32, result: CompareResult::Equal as i32, target_union: Some(TargetUnion::ModRevision(rev)), range_end: vec![] }],
                                    success: vec![RequestOp { request: Some(Op::RequestPut(PutRequest { key: k, value: vec![b'w'; args.val_size], ..Default::default() })) }],
                                    failure: vec![],
                                };
                                kv.txn(t).await.is_ok()
                            }
                            Err(_) => false,
                        }
                    }
                };
                if ok {
                    record(&mut h, t0.elapsed());
                    done.fetch_add(1, Ordering::Relaxed);
                } else {
                    errors += 1;
                }
            }
            (h, errors)
        }));
    }
    let mut all = histogram();
    let mut errors = 0;
    for t in tasks {
        let (h, e) = t.await?;
        all.add(&h)?;
        errors += e;
    }
    progress.abort();
    let summary = summarize(&format!("{:?}", args.workload).to_lowercase(), &all, errors, start.elapsed());
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!("{summary}");
    }
    Ok(())
}
