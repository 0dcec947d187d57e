//! append: Elle-style list-append transactions over a few keys (as in jepsen.etcd's `append`).
//!
//! A transaction is 1–4 micro-operations `[r k]` / `[append k v]` over a small pool of active
//! keys (`a/<n>`, each retired after `MAX_APPENDS_PER_KEY` appends). Values are unique. A key's
//! value is the list as space-separated integers.
//!
//! Execution: one Txn of Ranges reads every key the transaction touches (this is the whole
//! transaction when it only reads); then, if it appends, one Txn guarded by
//! `mod_revision(k) == observed` for every touched key (0 for an absent key) puts the new lists.
//! A false guard is a definite failure (nothing was written); an ambiguous error on the write Txn
//! is indeterminate. The reads of the transaction are the lists of the first Txn, plus the
//! transaction's own earlier appends.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use keel_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use keel_proto::etcdserverpb::request_op::Request;
use keel_proto::etcdserverpb::response_op::Response;
use keel_proto::etcdserverpb::{Compare, PutRequest, RangeRequest, RequestOp, TxnRequest};
use rand::Rng;
use serde_json::{Value, json};

use crate::client::{Client, prefix_end};
use crate::runner::{Ctx, Done, TestOpts, Worker};

const ACTIVE_KEYS: usize = 4;
const MAX_APPENDS_PER_KEY: u64 = 32;

pub struct Append {
    /// Active keys: (key number, appends so far).
    active: Mutex<Vec<(u64, u64)>>,
    next_key: AtomicU64,
    next_value: AtomicU64,
}

#[derive(Clone, Debug)]
pub enum Mop {
    Read(String),
    Append(String, u64),
}

pub fn encode_list(v: &[u64]) -> Vec<u8> {
    v.iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(" ")
        .into_bytes()
}

pub fn decode_list(b: &[u8]) -> Vec<u64> {
    std::str::from_utf8(b)
        .unwrap_or("")
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect()
}

fn mops_json(mops: &[Mop]) -> Value {
    Value::Array(
        mops.iter()
            .map(|m| match m {
                Mop::Read(k) => json!(["r", k, null]),
                Mop::Append(k, v) => json!(["append", k, v]),
            })
            .collect(),
    )
}

impl Append {
    pub fn new(_opts: &TestOpts) -> Append {
        Append {
            active: Mutex::new((0..ACTIVE_KEYS as u64).map(|k| (k, 0)).collect()),
            next_key: AtomicU64::new(ACTIVE_KEYS as u64),
            next_value: AtomicU64::new(1),
        }
    }

    fn gen_txn(&self, rng: &mut impl Rng) -> Vec<Mop> {
        let len = rng.random_range(1..=4);
        let mut mops = Vec::with_capacity(len);
        let mut active = self.active.lock().unwrap();
        for _ in 0..len {
            let slot = rng.random_range(0..active.len());
            let key = format!("a/{}", active[slot].0);
            if rng.random_bool(0.5) {
                mops.push(Mop::Read(key));
            } else {
                let v = self.next_value.fetch_add(1, Ordering::Relaxed);
                mops.push(Mop::Append(key, v));
                active[slot].1 += 1;
                if active[slot].1 >= MAX_APPENDS_PER_KEY {
                    active[slot] = (self.next_key.fetch_add(1, Ordering::Relaxed), 0);
                }
            }
        }
        mops
    }

    pub async fn worker(self: Arc<Self>, ctx: Arc<Ctx>, mut w: Worker) {
        while !ctx.done() {
            w.pace().await;
            if ctx.done() {
                break;
            }
            let mops = self.gen_txn(&mut w.rng);
            let c = w.client.clone();
            let value = json!({"mops": mops_json(&mops)});
            w.invoke(&ctx, "txn", value, async move { run_txn(&c, &mops).await })
                .await;
        }
    }

    /// Final read of every key from every member (one atomic prefix Range each).
    pub async fn final_phase(self: Arc<Self>, ctx: Arc<Ctx>) -> anyhow::Result<()> {
        ctx.read_on_every_member(
            "txn",
            json!({"final": true, "mops": "all"}),
            |c| async move { read_all(&c).await },
        )
        .await
    }
}

/// Every key of the workload in one atomic prefix Range, as a read-only transaction.
async fn read_all(c: &Client) -> Done {
    match c
        .range(RangeRequest {
            key: b"a/".to_vec(),
            range_end: prefix_end(b"a/"),
            ..Default::default()
        })
        .await
    {
        Ok(r) => {
            let mops: Vec<Value> = r
                .kvs
                .iter()
                .map(|kv| {
                    json!([
                        "r",
                        String::from_utf8_lossy(&kv.key),
                        decode_list(&kv.value)
                    ])
                })
                .collect();
            Done::Ok(json!({"mops": mops, "rev": r.header.map(|h| h.revision)}))
        }
        Err(e) => Done::err(e, true),
    }
}

async fn run_txn(c: &Client, mops: &[Mop]) -> Done {
    // Keys in first-touch order.
    let mut keys: Vec<String> = Vec::new();
    for m in mops {
        let k = match m {
            Mop::Read(k) | Mop::Append(k, _) => k,
        };
        if !keys.contains(k) {
            keys.push(k.clone());
        }
    }
    let read = c
        .txn(TxnRequest {
            compare: vec![],
            success: keys
                .iter()
                .map(|k| RequestOp {
                    request: Some(Request::RequestRange(RangeRequest {
                        key: k.as_bytes().to_vec(),
                        ..Default::default()
                    })),
                })
                .collect(),
            failure: vec![],
        })
        .await;
    let read = match read {
        Ok(r) => r,
        // Nothing was written yet: a failure whatever the error.
        Err(e) => return Done::Fail(Value::Null, format!("read phase: {}", e.message)),
    };
    let mut state: BTreeMap<String, (Vec<u64>, i64)> = BTreeMap::new();
    for (k, resp) in keys.iter().zip(read.responses.iter()) {
        let (list, m) = match &resp.response {
            Some(Response::ResponseRange(r)) => match r.kvs.first() {
                Some(kv) => (decode_list(&kv.value), kv.mod_revision),
                None => (vec![], 0),
            },
            _ => (vec![], 0),
        };
        state.insert(k.clone(), (list, m));
    }
    let read_rev = read.header.map(|h| h.revision).unwrap_or(0);
    // Results, applying our own appends locally.
    let mut local: BTreeMap<String, Vec<u64>> = state
        .iter()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    let mut out = Vec::new();
    let mut appended = false;
    for m in mops {
        match m {
            Mop::Read(k) => out.push(json!(["r", k, local[k]])),
            Mop::Append(k, v) => {
                local.get_mut(k).unwrap().push(*v);
                appended = true;
                out.push(json!(["append", k, v]));
            }
        }
    }
    if !appended {
        return Done::Ok(json!({"mops": out, "rev": read_rev}));
    }
    let written: Vec<&String> = keys
        .iter()
        .filter(|k| {
            mops.iter()
                .any(|m| matches!(m, Mop::Append(x, _) if x == *k))
        })
        .collect();
    let write = c
        .txn(TxnRequest {
            compare: keys
                .iter()
                .map(|k| Compare {
                    result: CompareResult::Equal as i32,
                    target: CompareTarget::Mod as i32,
                    key: k.as_bytes().to_vec(),
                    range_end: vec![],
                    target_union: Some(TargetUnion::ModRevision(state[k].1)),
                })
                .collect(),
            success: written
                .iter()
                .map(|k| RequestOp {
                    request: Some(Request::RequestPut(PutRequest {
                        key: k.as_bytes().to_vec(),
                        value: encode_list(&local[*k]),
                        ..Default::default()
                    })),
                })
                .collect(),
            failure: vec![],
        })
        .await;
    match write {
        Ok(r) if r.succeeded => Done::Ok(json!({
            "mops": out,
            "rev": r.header.map(|h| h.revision),
            "read_rev": read_rev,
        })),
        Ok(_) => Done::Fail(Value::Null, "guard failed (concurrent write)".into()),
        Err(e) => Done::err(e, false),
    }
}
