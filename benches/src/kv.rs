//! KV workloads: `put`, `range`, `txn-put`, `txn-cas`, and `load` (bulk loading in
//! multi-put transactions).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use clap::Args;
use keel_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use keel_proto::etcdserverpb::kv_client::KvClient;
use keel_proto::etcdserverpb::request_op::Request as Op;
use keel_proto::etcdserverpb::{Compare, PutRequest, RangeRequest, RequestOp, TxnRequest};

use crate::driver::{
    Common, GrpcClient, Worker, key, run_closed_loop, spread, unary_channels, value,
};
use crate::lean::BenchChannel;
use crate::stats::Summary;

#[derive(Args, Debug, Clone)]
pub struct RangeArgs {
    /// Keys per range request (a range `[key(i), key(i + n))`).
    #[arg(long, default_value_t = 1)]
    pub range_keys: u64,
    /// l (linearizable) or s (serializable).
    #[arg(long, default_value = "l", value_parser = ["l", "s"])]
    pub consistency: String,
}

#[derive(Args, Debug, Clone)]
pub struct TxnPutArgs {
    /// Puts per transaction.
    #[arg(long, default_value_t = 1)]
    pub txn_ops: u64,
}

#[derive(Args, Debug, Clone)]
pub struct LoadArgs {
    /// Keys to write (`prefix` + zero-padded index of `--key-size` digits).
    #[arg(long, default_value_t = 1_000_000)]
    pub keys: u64,
    /// Puts per transaction (etcd's default `--max-txn-ops` is 128).
    #[arg(long, default_value_t = 100)]
    pub batch: u64,
    #[arg(long, default_value = "")]
    pub prefix: String,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    Put,
    Range,
    TxnPut,
    TxnCas,
}

struct KvWorker {
    kv: KvClient<BenchChannel>,
    kind: Kind,
    common: Common,
    range: RangeArgs,
    txn_ops: u64,
    conflicts: Arc<AtomicU64>,
}

fn put(k: Vec<u8>, v: Vec<u8>) -> RequestOp {
    RequestOp {
        request: Some(Op::RequestPut(PutRequest {
            key: k,
            value: v,
            ..Default::default()
        })),
    }
}

impl Worker for KvWorker {
    async fn op(&mut self, n: u64) -> anyhow::Result<usize> {
        let c = &self.common;
        let i = spread(n, c.key_space);
        let k = key("", i, c.key_size);
        match self.kind {
            Kind::Put => {
                self.kv
                    .put(PutRequest {
                        key: k,
                        value: value(c.val_size, b'v'),
                        ..Default::default()
                    })
                    .await?;
            }
            Kind::Range => {
                let n_keys = self.range.range_keys.max(1);
                let end = if n_keys > 1 {
                    let i = spread(n, c.key_space.saturating_sub(n_keys - 1).max(1));
                    key("", i + n_keys, c.key_size)
                } else {
                    Vec::new()
                };
                let k = if n_keys > 1 {
                    let i = spread(n, c.key_space.saturating_sub(n_keys - 1).max(1));
                    key("", i, c.key_size)
                } else {
                    k
                };
                let r = self
                    .kv
                    .range(RangeRequest {
                        key: k,
                        range_end: end,
                        serializable: self.range.consistency == "s",
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                anyhow::ensure!(
                    r.kvs.len() as u64 == n_keys,
                    "range returned {} keys, expected {n_keys} (key space not loaded?)",
                    r.kvs.len()
                );
            }
            Kind::TxnPut => {
                let ops = (0..self.txn_ops.max(1))
                    .map(|j| {
                        let i = spread(n * self.txn_ops.max(1) + j, c.key_space);
                        put(key("", i, c.key_size), value(c.val_size, b't'))
                    })
                    .collect();
                self.kv
                    .txn(TxnRequest {
                        compare: vec![],
                        success: ops,
                        failure: vec![],
                    })
                    .await?;
            }
            Kind::TxnCas => {
                // Read-modify-write guarded by mod_revision, as kube-apiserver updates.
                let r = self
                    .kv
                    .range(RangeRequest {
                        key: k.clone(),
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                let rev = r.kvs.first().map(|kv| kv.mod_revision).unwrap_or(0);
                let t = TxnRequest {
                    compare: vec![Compare {
                        key: k.clone(),
                        target: CompareTarget::Mod as i32,
                        result: CompareResult::Equal as i32,
                        target_union: Some(TargetUnion::ModRevision(rev)),
                        range_end: vec![],
                    }],
                    success: vec![put(k, value(c.val_size, b'w'))],
                    failure: vec![],
                };
                if !self.kv.txn(t).await?.into_inner().succeeded {
                    self.conflicts.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(0)
    }
}

pub async fn run(
    kind: Kind,
    common: &Common,
    range: RangeArgs,
    txn: TxnPutArgs,
) -> anyhow::Result<Summary> {
    let width = digits(common.key_space);
    anyhow::ensure!(
        common.key_size >= width,
        "--key-size {} is too short for --key-space {} ({width} digits)",
        common.key_size,
        common.key_space
    );
    let chans = unary_channels(&common.endpoints, common.conns, common.grpc_client).await?;
    if matches!(kind, Kind::Range | Kind::TxnCas) {
        let (space, width) = (common.key_space, common.key_size);
        let range = (key("", 0, width), key("", space, width));
        ensure_loaded(
            &chans,
            range,
            space,
            Arc::new(move |i| key("", i, width)),
            common.val_size,
            common.quiet,
        )
        .await?;
    }
    let conflicts = Arc::new(AtomicU64::new(0));
    let workers = (0..common.clients.max(1))
        .map(|i| KvWorker {
            kv: KvClient::new(chans[i % chans.len()].clone()),
            kind,
            common: common.clone(),
            range: range.clone(),
            txn_ops: txn.txn_ops,
            conflicts: conflicts.clone(),
        })
        .collect();
    let name = match kind {
        Kind::Put => "put".to_string(),
        Kind::Range => format!(
            "range-{}{}",
            range.consistency,
            if range.range_keys > 1 {
                format!("-{}keys", range.range_keys)
            } else {
                String::new()
            }
        ),
        Kind::TxnPut => "txn-put".to_string(),
        Kind::TxnCas => "txn-cas".to_string(),
    };
    let mut s = run_closed_loop(&name, common, workers, &[]).await?;
    if kind == Kind::TxnCas {
        s.extra
            .insert("conflicts".into(), conflicts.load(Ordering::Relaxed) as f64);
    }
    if kind == Kind::TxnPut {
        s.extra.insert("puts_per_txn".into(), txn.txn_ops as f64);
    }
    Ok(s)
}

/// Digits needed to write every index up to and including `space` (a range's end key).
pub fn digits(space: u64) -> usize {
    space.to_string().len()
}

/// Names the key with an index (bulk loading).
pub type KeyFn = Arc<dyn Fn(u64) -> Vec<u8> + Send + Sync>;

struct LoadWorker {
    kv: KvClient<BenchChannel>,
    key: KeyFn,
    keys: u64,
    batch: u64,
    val_size: usize,
}

impl Worker for LoadWorker {
    async fn op(&mut self, n: u64) -> anyhow::Result<usize> {
        let from = n * self.batch;
        let to = (from + self.batch).min(self.keys);
        let ops = (from..to)
            .map(|i| put((self.key)(i), value(self.val_size, b'v')))
            .collect();
        self.kv
            .txn(TxnRequest {
                compare: vec![],
                success: ops,
                failure: vec![],
            })
            .await?;
        Ok(0)
    }
}

/// Writes keys `prefix + 0 .. prefix + keys` in transactions of `batch` puts.
pub async fn load(common: &Common, args: &LoadArgs) -> anyhow::Result<Summary> {
    let chans = unary_channels(&common.endpoints, common.conns, common.grpc_client).await?;
    let (prefix, width) = (args.prefix.clone(), common.key_size.max(digits(args.keys)));
    let keyfn: KeyFn = Arc::new(move |i| key(&prefix, i, width));
    load_on(&chans, common, args.keys, args.batch, keyfn).await
}

/// Writes the keys `keyfn(0 .. keys)` in transactions of `batch` puts with `--clients`
/// concurrent transactions.
pub async fn load_on(
    chans: &[BenchChannel],
    common: &Common,
    keys: u64,
    batch: u64,
    keyfn: KeyFn,
) -> anyhow::Result<Summary> {
    let batch = batch.max(1);
    let mut c = common.clone();
    c.total = keys.div_ceil(batch);
    c.duration = 1e9;
    c.rate = 0.0;
    let workers = (0..c.clients.max(1))
        .map(|i| LoadWorker {
            kv: KvClient::new(chans[i % chans.len()].clone()),
            key: keyfn.clone(),
            keys,
            batch,
            val_size: c.val_size,
        })
        .collect();
    let mut s = run_closed_loop("load", &c, workers, &[]).await?;
    s.extra.insert("keys".into(), keys as f64);
    s.extra
        .insert("keys_per_sec".into(), keys as f64 / s.seconds);
    anyhow::ensure!(s.errors == 0, "load failed: {:?}", s.first_error);
    Ok(s)
}

/// Makes sure the keys `keyfn(0 .. space)` all exist, loading them if the count-only range
/// `[from, to)` has fewer.
pub async fn ensure_loaded(
    chans: &[BenchChannel],
    (from, to): (Vec<u8>, Vec<u8>),
    space: u64,
    keyfn: KeyFn,
    val_size: usize,
    quiet: bool,
) -> anyhow::Result<()> {
    let mut kv = KvClient::new(chans[0].clone());
    let r = kv
        .range(RangeRequest {
            key: from,
            range_end: to,
            count_only: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    if r.count as u64 >= space {
        return Ok(());
    }
    if !quiet {
        eprintln!("  loading {space} keys ({val_size} B values)");
    }
    let common = Common {
        endpoints: vec![],
        clients: 16,
        conns: chans.len(),
        total: 0,
        duration: 0.0,
        rate: 0.0,
        key_size: 0,
        val_size,
        key_space: space,
        json: false,
        quiet: true,
        grpc_client: GrpcClient::Lean,
    };
    load_on(chans, &common, space, 100, keyfn).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digit_widths() {
        assert_eq!(digits(9_999), 4);
        assert_eq!(digits(10_000), 5);
        assert_eq!(digits(1), 1);
        assert_eq!(digits(1_000_000), 7);
    }
}
