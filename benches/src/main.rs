//! `keel-bench`: etcd v3 load generator; the same binary measures Keel and real etcd.
//! `keel-bench --help` lists the workloads, `keel-bench <workload> --help` their flags.

use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use keel_bench::driver::{Common, connect};
use keel_bench::kube::KubeArgs;
use keel_bench::kv::{Kind, LoadArgs, RangeArgs, TxnPutArgs};
use keel_bench::lease::LeaseArgs;
use keel_bench::report::ReportArgs;
use keel_bench::stats::Summary;
use keel_bench::watch::WatchArgs;
use keel_bench::{kube, kv, lease, report, watch};
use keel_proto::etcdserverpb::RangeRequest;
use keel_proto::etcdserverpb::kv_client::KvClient;

/// mimalloc, as the `keel` binary uses: the load generator shares the CPUs with the clusters it
/// measures, and glibc malloc was about 12% of its CPU at 256 clients.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "keel-bench",
    about = "etcd v3 load generator (works against Keel and etcd)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Put one key of the key space per request.
    Put {
        #[command(flatten)]
        common: Common,
    },
    /// Range over one key or `--range-keys` consecutive keys (preloads the key space).
    Range {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        range: RangeArgs,
    },
    /// Txn without compares whose success branch holds `--txn-ops` puts.
    TxnPut {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        txn: TxnPutArgs,
    },
    /// Read-modify-write: Range a key, then Txn comparing its mod_revision and putting it.
    TxnCas {
        #[command(flatten)]
        common: Common,
    },
    /// Watch fan-out or many-prefix delivery (or idle-watcher memory with --idle).
    Watch {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        watch: WatchArgs,
    },
    /// Lease grant+revoke, or keep-alive over streams.
    Lease {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        lease: LeaseArgs,
    },
    /// kube-apiserver-like mix: CAS updates, gets, paginated lists, prefix watches.
    Kube {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        kube: KubeArgs,
    },
    /// Bulk-load keys in multi-put transactions.
    Load {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// Wait until a member answers a serializable get of `--key` with a value; prints the
    /// seconds waited.
    WaitReady {
        #[arg(long)]
        endpoint: String,
        #[arg(long)]
        key: String,
        #[arg(long, default_value_t = 120.0)]
        timeout: f64,
    },
    /// Write docs/benchmarks.md and the SVG plots from the results of benches/compare.sh.
    Report(ReportArgs),
}

fn print(s: &Summary, json: bool) -> anyhow::Result<()> {
    let mut s = s.clone();
    s.extra.insert(
        "client_cpu_s".into(),
        keel_bench::driver::self_cpu_seconds(),
    );
    let s = &s;
    if json {
        println!("{}", serde_json::to_string(s)?);
    } else {
        println!("{s}");
    }
    Ok(())
}

async fn wait_ready(endpoint: &str, k: &str, timeout: f64) -> anyhow::Result<f64> {
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(timeout);
    loop {
        if let Ok(ch) = connect(endpoint).await {
            let mut kv = KvClient::new(ch);
            let req = RangeRequest {
                key: k.as_bytes().to_vec(),
                serializable: true,
                ..Default::default()
            };
            if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(1), kv.range(req)).await
                && !r.into_inner().kvs.is_empty()
            {
                return Ok(t0.elapsed().as_secs_f64());
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{endpoint} did not serve {k:?} within {timeout} s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = keel_bench::driver::base();
    match Cli::parse().cmd {
        Cmd::Put { common } => print(
            &kv::run(Kind::Put, &common, no_range(), no_txn()).await?,
            common.json,
        ),
        Cmd::Range { common, range } => print(
            &kv::run(Kind::Range, &common, range, no_txn()).await?,
            common.json,
        ),
        Cmd::TxnPut { common, txn } => print(
            &kv::run(Kind::TxnPut, &common, no_range(), txn).await?,
            common.json,
        ),
        Cmd::TxnCas { common } => print(
            &kv::run(Kind::TxnCas, &common, no_range(), no_txn()).await?,
            common.json,
        ),
        Cmd::Watch { common, watch } => print(&watch::run(&common, &watch).await?, common.json),
        Cmd::Lease { common, lease } => print(&lease::run(&common, &lease).await?, common.json),
        Cmd::Kube { common, kube } => print(&kube::run(&common, &kube).await?, common.json),
        Cmd::Load { common, load } => print(&kv::load(&common, &load).await?, common.json),
        Cmd::WaitReady {
            endpoint,
            key,
            timeout,
        } => {
            let secs = wait_ready(&endpoint, &key, timeout).await?;
            println!("{secs:.3}");
            Ok(())
        }
        Cmd::Report(args) => report::run(&args),
    }
}

fn no_range() -> RangeArgs {
    RangeArgs {
        range_keys: 1,
        consistency: "l".into(),
    }
}

fn no_txn() -> TxnPutArgs {
    TxnPutArgs { txn_ops: 1 }
}
