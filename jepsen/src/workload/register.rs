//! register: read / write / compare-and-set on independent keys.
//!
//! Workers are spread over key groups; each group works on one key at a time (`r/<group>/<n>`)
//! and moves to a fresh key after `ops_per_key` operations, which bounds the linearizability
//! search. Values are unique per key (1, 2, 3, ...), so a value names the write that produced it.
//!
//! - read: a linearizable Range; records value, mod_revision, version and header revision.
//! - write: Put with prev_kv; records the new revision and the overwritten (value, mod_revision).
//! - cas: Txn comparing either the value or the mod_revision of the last version the group saw,
//!   then Put with prev_kv; a false compare is a definite failure.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use keel_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use keel_proto::etcdserverpb::request_op::Request;
use keel_proto::etcdserverpb::response_op::Response;
use keel_proto::etcdserverpb::{Compare, PutRequest, RangeRequest, RequestOp, TxnRequest};
use keel_proto::mvccpb::KeyValue;
use rand::Rng;
use serde_json::{Value, json};

use crate::runner::{Ctx, Done, TestOpts, Worker};

struct Group {
    generation: u64,
    ops: u64,
    next_value: i64,
    /// Last version seen: (value, mod_revision).
    last: Option<(i64, i64)>,
}

pub struct Register {
    groups: Vec<Mutex<Group>>,
    ops_per_key: u64,
    used_keys: Mutex<BTreeSet<String>>,
}

fn parse_kv(kv: &KeyValue) -> Value {
    let v = std::str::from_utf8(&kv.value)
        .ok()
        .and_then(|s| s.parse::<i64>().ok());
    json!({"value": v, "mod_rev": kv.mod_revision})
}

fn prev_json(prev: Option<&KeyValue>) -> Value {
    match prev {
        Some(kv) => parse_kv(kv),
        None => json!({"value": null, "mod_rev": 0}),
    }
}

impl Register {
    pub fn new(opts: &TestOpts) -> Register {
        // About three workers per key, like Jepsen's independent keys with 2n threads per key.
        let groups = (opts.concurrency / 3).max(1);
        Register {
            groups: (0..groups)
                .map(|_| {
                    Mutex::new(Group {
                        generation: 0,
                        ops: 0,
                        next_value: 1,
                        last: None,
                    })
                })
                .collect(),
            ops_per_key: opts.ops_per_key.max(10),
            used_keys: Mutex::new(BTreeSet::new()),
        }
    }

    pub async fn worker(self: Arc<Self>, ctx: Arc<Ctx>, mut w: Worker) {
        let g = w.id % self.groups.len();
        while !ctx.done() {
            w.pace().await;
            if ctx.done() {
                break;
            }
            let roll = w.rng.random_range(0..100);
            let (key, last, fresh) = {
                let mut grp = self.groups[g].lock().unwrap();
                if grp.ops >= self.ops_per_key {
                    grp.generation += 1;
                    grp.ops = 0;
                    grp.next_value = 1;
                    grp.last = None;
                }
                grp.ops += 1;
                let fresh = grp.next_value;
                grp.next_value += 1;
                (format!("r/{g}/{}", grp.generation), grp.last, fresh)
            };
            self.used_keys.lock().unwrap().insert(key.clone());
            if roll < 45 {
                let op = w
                    .invoke(
                        &ctx,
                        "read",
                        json!({"key": key}),
                        read(w.client.clone(), key.clone()),
                    )
                    .await;
                if let (Some(v), Some(m)) =
                    (op.result["value"].as_i64(), op.result["mod_rev"].as_i64())
                {
                    self.note(g, &key, v, m);
                }
            } else if roll < 72 || last.is_none() {
                let op = w
                    .invoke(
                        &ctx,
                        "write",
                        json!({"key": key, "value": fresh}),
                        write(w.client.clone(), key.clone(), fresh),
                    )
                    .await;
                if let Some(r) = op.result["rev"].as_i64()
                    && op.outcome == crate::record::Outcome::Ok
                {
                    self.note(g, &key, fresh, r);
                }
            } else {
                let (from, from_rev) = last.unwrap();
                let by_rev = w.rng.random_bool(0.5);
                let value = if by_rev {
                    json!({"key": key, "from": from, "to": fresh, "cmp": "mod_rev", "from_mod_rev": from_rev})
                } else {
                    json!({"key": key, "from": from, "to": fresh, "cmp": "value"})
                };
                let op = w
                    .invoke(
                        &ctx,
                        "cas",
                        value,
                        cas(w.client.clone(), key.clone(), from, from_rev, by_rev, fresh),
                    )
                    .await;
                if op.outcome == crate::record::Outcome::Ok
                    && let Some(r) = op.result["rev"].as_i64()
                {
                    self.note(g, &key, fresh, r);
                }
            }
        }
    }

    fn note(&self, g: usize, key: &str, value: i64, mod_rev: i64) {
        let mut grp = self.groups[g].lock().unwrap();
        if key.ends_with(&format!("/{}", grp.generation))
            && grp.last.is_none_or(|(_, m)| m < mod_rev)
        {
            grp.last = Some((value, mod_rev));
        }
    }

    /// Final linearizable reads of every key from every member.
    pub async fn final_phase(self: Arc<Self>, ctx: Arc<Ctx>) -> anyhow::Result<()> {
        let keys: Vec<String> = self.used_keys.lock().unwrap().iter().cloned().collect();
        for node in 0..ctx.cluster.n() {
            let client = ctx.client(node);
            for key in &keys {
                let c = client.clone();
                let k = key.clone();
                ctx.run_op(
                    node,
                    "read",
                    json!({"key": key, "final": true}),
                    async move { read_with(&c, &k).await },
                )
                .await;
            }
        }
        Ok(())
    }
}

async fn read(c: crate::client::Client, key: String) -> Done {
    read_with(&c, &key).await
}

async fn read_with(c: &crate::client::Client, key: &str) -> Done {
    let r = c
        .range(RangeRequest {
            key: key.as_bytes().to_vec(),
            ..Default::default()
        })
        .await;
    match r {
        Ok(resp) => {
            let rev = resp.header.map(|h| h.revision).unwrap_or(0);
            match resp.kvs.first() {
                Some(kv) => {
                    let mut v = parse_kv(kv);
                    v["version"] = json!(kv.version);
                    v["rev"] = json!(rev);
                    Done::Ok(v)
                }
                None => Done::Ok(json!({"value": null, "mod_rev": 0, "version": 0, "rev": rev})),
            }
        }
        Err(e) => Done::err(e, true),
    }
}

async fn write(c: crate::client::Client, key: String, value: i64) -> Done {
    let r = c
        .put(PutRequest {
            key: key.as_bytes().to_vec(),
            value: value.to_string().into_bytes(),
            prev_kv: true,
            ..Default::default()
        })
        .await;
    match r {
        Ok(resp) => Done::Ok(json!({
            "rev": resp.header.map(|h| h.revision).unwrap_or(0),
            "prev": prev_json(resp.prev_kv.as_ref()),
        })),
        Err(e) => Done::err(e, false),
    }
}

async fn cas(
    c: crate::client::Client,
    key: String,
    from: i64,
    from_rev: i64,
    by_rev: bool,
    to: i64,
) -> Done {
    let target = if by_rev {
        (CompareTarget::Mod, TargetUnion::ModRevision(from_rev))
    } else {
        (
            CompareTarget::Value,
            TargetUnion::Value(from.to_string().into_bytes()),
        )
    };
    let r = c
        .txn(TxnRequest {
            compare: vec![Compare {
                result: CompareResult::Equal as i32,
                target: target.0 as i32,
                key: key.as_bytes().to_vec(),
                range_end: vec![],
                target_union: Some(target.1),
            }],
            success: vec![RequestOp {
                request: Some(Request::RequestPut(PutRequest {
                    key: key.as_bytes().to_vec(),
                    value: to.to_string().into_bytes(),
                    prev_kv: true,
                    ..Default::default()
                })),
            }],
            failure: vec![],
        })
        .await;
    match r {
        Ok(resp) => {
            let rev = resp.header.map(|h| h.revision).unwrap_or(0);
            if !resp.succeeded {
                return Done::Fail(json!({"rev": rev}), "compare failed".into());
            }
            let prev = match resp.responses.first().and_then(|r| r.response.as_ref()) {
                Some(Response::ResponsePut(p)) => prev_json(p.prev_kv.as_ref()),
                _ => Value::Null,
            };
            Done::Ok(json!({"rev": rev, "prev": prev}))
        }
        Err(e) => Done::err(e, false),
    }
}
