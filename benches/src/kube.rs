//! `kube`: what kube-apiserver asks of etcd. Objects `/registry/pods/ns-NNN/pod-NNNNNNNN`
//! (`--key-space` of them over `--namespaces` namespaces, `--val-size` bytes each) are
//! preloaded; then `--watchers` watch the whole `/registry/pods/` prefix (the apiserver's
//! watch cache) while the clients run a mix of
//! - CAS updates (`--update-pct`, the rest of the mix): a Txn `mod_revision == cached` → Put,
//!   else Range (GuaranteedUpdate); on a conflict the client takes the current revision and
//!   retries. A client learns an object's revision by a Range the first time it touches it.
//! - linearizable gets of one object (`--get-pct`);
//! - paginated lists of one namespace (`--list-pct`): Range with `--page-limit`, the next page
//!   starting after the last key at the first page's revision (the apiserver's continue token).
//!
//! Reported: the mix's ops/s and latency, each operation's own summary, and the watchers'
//! delivered events with lost/duplicate counts and put-to-event latency.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use keel_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use keel_proto::etcdserverpb::kv_client::KvClient;
use keel_proto::etcdserverpb::request_op::Request as Op;
use keel_proto::etcdserverpb::response_op::Response as OpResp;
use keel_proto::etcdserverpb::{Compare, PutRequest, RangeRequest, RequestOp, TxnRequest};

use crate::driver::{
    Common, Progress, Rng, Worker, channels, run_closed_loop, stamped_value, unary_channels,
};
use crate::kv::{KeyFn, ensure_loaded};
use crate::lean::BenchChannel;
use crate::stats::Summary;
use crate::stats::summarize;
use crate::watch::{WatchGroup, WatchSpec, prefix_end};

const PREFIX: &str = "/registry/pods/";

#[derive(Args, Debug, Clone)]
pub struct KubeArgs {
    #[arg(long, default_value_t = 10)]
    pub namespaces: u64,
    /// Objects per page of a list.
    #[arg(long, default_value_t = 100)]
    pub page_limit: i64,
    /// Percentage of linearizable gets.
    #[arg(long, default_value_t = 20)]
    pub get_pct: u64,
    /// Percentage of paginated namespace lists (the rest are CAS updates).
    #[arg(long, default_value_t = 5)]
    pub list_pct: u64,
    /// Watchers on the whole prefix.
    #[arg(long, default_value_t = 8)]
    pub watchers: usize,
    /// Seconds to wait, after the mix stops, for every event to arrive.
    #[arg(long, default_value_t = 30.0)]
    pub drain: f64,
}

fn object_key(i: u64, namespaces: u64) -> Vec<u8> {
    format!("{PREFIX}ns-{:03}/pod-{i:08}", i % namespaces.max(1)).into_bytes()
}

fn namespace_prefix(ns: u64) -> Vec<u8> {
    format!("{PREFIX}ns-{ns:03}/").into_bytes()
}

struct KubeWorker {
    kv: KvClient<BenchChannel>,
    rng: Rng,
    args: KubeArgs,
    space: u64,
    val_size: usize,
    revs: HashMap<u64, i64>,
    updates: Arc<AtomicU64>,
    conflicts: Arc<AtomicU64>,
    pages: Arc<AtomicU64>,
}

impl KubeWorker {
    async fn get(&mut self, k: Vec<u8>) -> anyhow::Result<i64> {
        let r = self
            .kv
            .range(RangeRequest {
                key: k,
                ..Default::default()
            })
            .await?
            .into_inner();
        Ok(r.kvs.first().map(|kv| kv.mod_revision).unwrap_or(0))
    }

    async fn update(&mut self, i: u64) -> anyhow::Result<()> {
        let k = object_key(i, self.args.namespaces);
        let mut rev = match self.revs.get(&i) {
            Some(r) => *r,
            None => self.get(k.clone()).await?,
        };
        for _ in 0..10 {
            let t = TxnRequest {
                compare: vec![Compare {
                    key: k.clone(),
                    target: CompareTarget::Mod as i32,
                    result: CompareResult::Equal as i32,
                    target_union: Some(TargetUnion::ModRevision(rev)),
                    range_end: vec![],
                }],
                success: vec![RequestOp {
                    request: Some(Op::RequestPut(PutRequest {
                        key: k.clone(),
                        value: stamped_value(self.val_size),
                        ..Default::default()
                    })),
                }],
                failure: vec![RequestOp {
                    request: Some(Op::RequestRange(RangeRequest {
                        key: k.clone(),
                        ..Default::default()
                    })),
                }],
            };
            let r = self.kv.txn(t).await?.into_inner();
            if r.succeeded {
                self.updates.fetch_add(1, Ordering::Relaxed);
                self.revs
                    .insert(i, r.header.map(|h| h.revision).unwrap_or(0));
                return Ok(());
            }
            self.conflicts.fetch_add(1, Ordering::Relaxed);
            rev = match r.responses.into_iter().next().and_then(|o| o.response) {
                Some(OpResp::ResponseRange(rr)) => {
                    rr.kvs.first().map(|kv| kv.mod_revision).unwrap_or(0)
                }
                _ => 0,
            };
        }
        anyhow::bail!("update of object {i} conflicted 10 times")
    }

    async fn list(&mut self, ns: u64) -> anyhow::Result<()> {
        let prefix = namespace_prefix(ns);
        let end = prefix_end(&prefix);
        let (mut start, mut rev) = (prefix, 0);
        loop {
            let r = self
                .kv
                .range(RangeRequest {
                    key: start,
                    range_end: end.clone(),
                    limit: self.args.page_limit,
                    revision: rev,
                    ..Default::default()
                })
                .await?
                .into_inner();
            self.pages.fetch_add(1, Ordering::Relaxed);
            if rev == 0 {
                rev = r.header.as_ref().map(|h| h.revision).unwrap_or(0);
            }
            match r.kvs.last() {
                Some(last) if r.more => {
                    start = last.key.clone();
                    start.push(0);
                }
                _ => return Ok(()),
            }
        }
    }
}

impl Worker for KubeWorker {
    async fn op(&mut self, _n: u64) -> anyhow::Result<usize> {
        let dice = self.rng.below(100);
        let i = self.rng.below(self.space);
        if dice < self.args.get_pct {
            self.get(object_key(i, self.args.namespaces)).await?;
            Ok(1)
        } else if dice < self.args.get_pct + self.args.list_pct {
            self.list(i % self.args.namespaces.max(1)).await?;
            Ok(2)
        } else {
            self.update(i).await?;
            Ok(0)
        }
    }
}

pub async fn run(common: &Common, args: &KubeArgs) -> anyhow::Result<Summary> {
    // Watches on tonic channels, the unary calls on `--grpc-client` connections of their own.
    let chans = channels(&common.endpoints, common.conns).await?;
    let uchans = unary_channels(&common.endpoints, common.conns, common.grpc_client).await?;
    let ns = args.namespaces.max(1);
    let keyfn: KeyFn = Arc::new(move |i| object_key(i, ns));
    let range = (PREFIX.as_bytes().to_vec(), prefix_end(PREFIX.as_bytes()));
    ensure_loaded(
        &uchans,
        range,
        common.key_space,
        keyfn,
        common.val_size,
        common.quiet,
    )
    .await?;

    let progress = Arc::new(Progress::default());
    let spec = WatchSpec {
        key: PREFIX.as_bytes().to_vec(),
        range_end: prefix_end(PREFIX.as_bytes()),
        start_revision: 0,
    };
    let group = if args.watchers > 0 {
        Some(WatchGroup::open(&chans, args.watchers, vec![spec; args.watchers], progress).await?)
    } else {
        None
    };
    let (updates, conflicts, pages) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let workers = (0..common.clients.max(1))
        .map(|c| KubeWorker {
            kv: KvClient::new(uchans[c % uchans.len()].clone()),
            rng: Rng::new(c as u64 + 1),
            args: args.clone(),
            space: common.key_space.max(1),
            val_size: common.val_size,
            revs: HashMap::new(),
            updates: updates.clone(),
            conflicts: conflicts.clone(),
            pages: pages.clone(),
        })
        .collect();
    let start = Instant::now();
    let mut s = run_closed_loop("kube", common, workers, &["update", "get", "list"]).await?;
    let updates = updates.load(Ordering::Relaxed);
    let lists = s.parts.get(2).map(|p| p.ops).unwrap_or(0);
    s.extra
        .insert("conflicts".into(), conflicts.load(Ordering::Relaxed) as f64);
    s.extra.insert(
        "pages_per_list".into(),
        pages.load(Ordering::Relaxed) as f64 / lists.max(1) as f64,
    );
    if let Some(group) = group {
        let n = group.watchers();
        let expected = updates * n as u64;
        let drained = group
            .wait_for(expected, Duration::from_secs_f64(args.drain))
            .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let out = group.stop().await?;
        let lost: u64 = out.unique.iter().map(|u| updates.saturating_sub(*u)).sum();
        let unique: u64 = out.unique.iter().sum();
        let end = out
            .last_event
            .unwrap_or(start)
            .max(start + Duration::from_millis(1));
        let mut w = summarize("watch-events", &out.hist, 0, end - start);
        w.clients = n;
        w.ops = unique;
        w.ops_per_sec = unique as f64 / w.seconds;
        w.extra.insert("watchers".into(), n as f64);
        w.extra.insert("lost".into(), lost as f64);
        w.extra.insert("duplicates".into(), out.duplicates as f64);
        w.extra
            .insert("drained".into(), if drained { 1.0 } else { 0.0 });
        s.extra.insert("lost".into(), lost as f64);
        s.extra.insert("duplicates".into(), out.duplicates as f64);
        s.parts.push(w);
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_group_by_namespace() {
        assert_eq!(object_key(12, 10), b"/registry/pods/ns-002/pod-00000012");
        let p = namespace_prefix(2);
        assert!(object_key(12, 10).starts_with(&p));
        assert!(object_key(12, 10) < prefix_end(&p));
    }
}
