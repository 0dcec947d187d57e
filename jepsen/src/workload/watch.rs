//! watch: writers change keys under `w/` while watchers on every member watch the prefix.
//!
//! Writers (half the workers): Put with a unique value (70%), a Txn putting two keys in one
//! revision (20%), DeleteRange of one key (10%). Watchers (the other half, spread over the
//! members): a session watches `w/` from `next` (initially revision 1) with `prev_kv` and
//! `progress_notify`, asks for progress now and then, and closes after 1–4 s (or when its member
//! fails); the next session resumes from one past the last event or progress revision seen. Every
//! session is one `watch` operation in the history with all its responses.
//!
//! After healing: a tombstone put `w/~done`, one watch from revision 1 per member until the
//! tombstone (the final histories, which must agree), and each watcher catches up from where it
//! stopped to the tombstone.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use keel_proto::etcdserverpb::request_op::Request;
use keel_proto::etcdserverpb::watch_client::WatchClient;
use keel_proto::etcdserverpb::watch_request::RequestUnion;
use keel_proto::etcdserverpb::{
    DeleteRangeRequest, PutRequest, RequestOp, TxnRequest, WatchCreateRequest,
    WatchProgressRequest, WatchRequest, WatchResponse,
};
use keel_proto::mvccpb::KeyValue;
use rand::Rng;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::client::{Client, prefix_end};
use crate::record::Outcome;
use crate::runner::{Ctx, Done, TestOpts, Worker};

const KEYS: u64 = 5;
pub const TOMBSTONE: &str = "w/~done";

pub struct Watch {
    next_value: AtomicU64,
    /// Watcher id -> (member, next start revision).
    watchers: Mutex<BTreeMap<usize, (usize, i64)>>,
    writers: usize,
}

fn kv_json(kv: Option<&KeyValue>) -> Value {
    match kv {
        Some(kv) => json!([
            String::from_utf8_lossy(&kv.key),
            String::from_utf8_lossy(&kv.value),
            kv.create_revision,
            kv.mod_revision,
            kv.version
        ]),
        None => Value::Null,
    }
}

/// A response as recorded: events are `[type, key, value, create_rev, mod_rev, version, prev]`
/// with `prev` = `[key, value, create_rev, mod_rev, version]` or null.
fn response_json(r: &WatchResponse, t: u64) -> Value {
    let events: Vec<Value> = r
        .events
        .iter()
        .map(|e| {
            let kv = e.kv.clone().unwrap_or_default();
            json!([
                if e.r#type == 1 { "DELETE" } else { "PUT" },
                String::from_utf8_lossy(&kv.key),
                String::from_utf8_lossy(&kv.value),
                kv.create_revision,
                kv.mod_revision,
                kv.version,
                kv_json(e.prev_kv.as_ref())
            ])
        })
        .collect();
    let mut v = json!({"t": t, "rev": r.header.map(|h| h.revision).unwrap_or(0), "events": events});
    if r.created {
        v["created"] = json!(true);
    }
    if r.canceled {
        v["canceled"] = json!(true);
        v["reason"] = json!(r.cancel_reason);
        v["compact_rev"] = json!(r.compact_revision);
    }
    if r.fragment {
        v["fragment"] = json!(true);
    }
    v
}

/// Runs one watch session from `start` until `until` returns true or `limit` passes.
/// Returns (done, next start revision).
async fn session(
    ctx: &Ctx,
    client: &Client,
    start: i64,
    limit: Instant,
    progress_every: Option<Duration>,
    mut until: impl FnMut(i64) -> bool,
) -> (Done, i64) {
    let (tx, rx) = futures::channel::mpsc::unbounded::<WatchRequest>();
    let _ = tx.unbounded_send(WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: b"w/".to_vec(),
            range_end: prefix_end(b"w/"),
            start_revision: start,
            progress_notify: true,
            prev_kv: true,
            ..Default::default()
        })),
    });
    let mut wc = WatchClient::new(client.channel());
    let opened = tokio::time::timeout(Duration::from_secs(2), wc.watch(rx)).await;
    let mut stream = match opened {
        Ok(Ok(s)) => s.into_inner(),
        Ok(Err(s)) => return (Done::Fail(Value::Null, s.message().to_string()), start),
        Err(_) => return (Done::Fail(Value::Null, "watch open timeout".into()), start),
    };
    let mut responses = Vec::new();
    let mut next = start;
    let mut end = "closed".to_string();
    let mut next_progress = progress_every.map(|d| Instant::now() + d);
    loop {
        let wake = next_progress.map(|p| p.min(limit)).unwrap_or(limit);
        tokio::select! {
            msg = stream.next() => match msg {
                Some(Ok(r)) => {
                    let t = ctx.now();
                    for e in &r.events {
                        if let Some(kv) = &e.kv {
                            next = next.max(kv.mod_revision + 1);
                        }
                    }
                    let progress = r.events.is_empty() && !r.created && !r.canceled;
                    if progress
                        && let Some(h) = r.header {
                            next = next.max(h.revision + 1);
                        }
                    let canceled = r.canceled;
                    responses.push(response_json(&r, t));
                    if canceled {
                        end = format!("canceled: {}", r.cancel_reason);
                        break;
                    }
                    if until(next - 1) {
                        break;
                    }
                }
                Some(Err(s)) => { end = format!("error: {}", s.message()); break; }
                None => { end = "stream ended".into(); break; }
            },
            _ = tokio::time::sleep_until(wake) => {
                if Instant::now() >= limit {
                    break;
                }
                if let (Some(p), Some(d)) = (next_progress.as_mut(), progress_every) {
                    *p = Instant::now() + d;
                    let _ = tx.unbounded_send(WatchRequest {
                        request_union: Some(RequestUnion::ProgressRequest(WatchProgressRequest {})),
                    });
                }
            }
        }
    }
    drop(tx);
    (
        Done::Ok(json!({"responses": responses, "end": end, "next": next})),
        next,
    )
}

impl Watch {
    pub fn new(opts: &TestOpts) -> Watch {
        Watch {
            next_value: AtomicU64::new(1),
            watchers: Mutex::new(BTreeMap::new()),
            writers: (opts.concurrency / 2).max(1),
        }
    }

    pub async fn worker(self: Arc<Self>, ctx: Arc<Ctx>, w: Worker) {
        if w.id < self.writers {
            self.writer(ctx, w).await
        } else {
            self.watcher(ctx, w).await
        }
    }

    async fn writer(&self, ctx: Arc<Ctx>, mut w: Worker) {
        while !ctx.done() {
            w.pace().await;
            if ctx.done() {
                break;
            }
            let roll = w.rng.random_range(0..100);
            let k1 = format!("w/{}", w.rng.random_range(0..KEYS));
            let v1 = format!("v{}", self.next_value.fetch_add(1, Ordering::Relaxed));
            let c = w.client.clone();
            if roll < 70 {
                w.invoke(
                    &ctx,
                    "put",
                    json!({"key": k1, "value": v1}),
                    put(c, k1.clone(), v1.clone()),
                )
                .await;
            } else if roll < 90 {
                let mut k2 = format!("w/{}", w.rng.random_range(0..KEYS));
                if k2 == k1 {
                    k2 = format!("w/{}", (k1[2..].parse::<u64>().unwrap_or(0) + 1) % KEYS);
                }
                let v2 = format!("v{}", self.next_value.fetch_add(1, Ordering::Relaxed));
                let puts = vec![(k1, v1), (k2, v2)];
                w.invoke(&ctx, "txn", json!({"puts": puts}), async move {
                    let r = c
                        .txn(TxnRequest {
                            compare: vec![],
                            success: puts
                                .iter()
                                .map(|(k, v)| RequestOp {
                                    request: Some(Request::RequestPut(PutRequest {
                                        key: k.clone().into_bytes(),
                                        value: v.clone().into_bytes(),
                                        ..Default::default()
                                    })),
                                })
                                .collect(),
                            failure: vec![],
                        })
                        .await;
                    match r {
                        Ok(r) => Done::Ok(json!({"rev": r.header.map(|h| h.revision)})),
                        Err(e) => Done::err(e, false),
                    }
                })
                .await;
            } else {
                w.invoke(&ctx, "delete", json!({"key": k1}), async move {
                    match c
                        .delete(DeleteRangeRequest {
                            key: k1.into_bytes(),
                            prev_kv: true,
                            ..Default::default()
                        })
                        .await
                    {
                        Ok(r) => Done::Ok(json!({
                            "rev": r.header.map(|h| h.revision),
                            "deleted": r.deleted
                        })),
                        Err(e) => Done::err(e, false),
                    }
                })
                .await;
            }
        }
    }

    async fn watcher(&self, ctx: Arc<Ctx>, mut w: Worker) {
        let mut next = 1i64;
        self.watchers.lock().unwrap().insert(w.id, (w.node, next));
        while !ctx.done() {
            let hold = Duration::from_millis(w.rng.random_range(1_000..4_000));
            let limit = (Instant::now() + hold).min(ctx.deadline);
            let c = w.client.clone();
            let start = next;
            let op = w
                .invoke(
                    &ctx,
                    "watch",
                    json!({"watcher": w.id, "start_rev": start}),
                    async {
                        let (d, n) = session(
                            &ctx,
                            &c,
                            start,
                            limit,
                            Some(Duration::from_millis(700)),
                            |_| false,
                        )
                        .await;
                        next = n;
                        d
                    },
                )
                .await;
            self.watchers.lock().unwrap().insert(w.id, (w.node, next));
            if op.outcome != Outcome::Ok {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    pub async fn final_phase(self: Arc<Self>, ctx: Arc<Ctx>) -> anyhow::Result<()> {
        // Tombstone: retry only after a definite failure; an indeterminate one gets a fresh
        // value on the next attempt (both are in the history).
        let mut tomb_rev = None;
        for attempt in 0..10 {
            let v = format!("done{attempt}");
            let c = ctx.client(attempt % ctx.cluster.n());
            let op = ctx
                .run_op(
                    attempt % ctx.cluster.n(),
                    "put",
                    json!({"key": TOMBSTONE, "value": v, "final": true}),
                    put(c, TOMBSTONE.into(), v.clone()),
                )
                .await;
            if op.outcome == Outcome::Ok {
                tomb_rev = op.result["rev"].as_i64();
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let tomb = tomb_rev.ok_or_else(|| anyhow::anyhow!("tombstone put never succeeded"))?;
        let limit = Instant::now() + Duration::from_secs(30);
        // Final histories from every member.
        for node in 0..ctx.cluster.n() {
            let c = ctx.client(node);
            ctx.run_op(
                node,
                "watch",
                json!({"final": true, "start_rev": 1, "until": tomb}),
                async {
                    session(&ctx, &c, 1, limit, None, |seen| seen >= tomb)
                        .await
                        .0
                },
            )
            .await;
        }
        // Every watcher catches up.
        let watchers = self.watchers.lock().unwrap().clone();
        for (id, (node, next)) in watchers {
            if next > tomb {
                continue;
            }
            let c = ctx.client(node);
            ctx.run_op(
                node,
                "watch",
                json!({"watcher": id, "start_rev": next, "catch_up": true, "until": tomb}),
                async {
                    session(&ctx, &c, next, limit, None, |seen| seen >= tomb)
                        .await
                        .0
                },
            )
            .await;
        }
        Ok(())
    }
}

async fn put(c: Client, key: String, value: String) -> Done {
    match c
        .put(PutRequest {
            key: key.into_bytes(),
            value: value.into_bytes(),
            prev_kv: true,
            ..Default::default()
        })
        .await
    {
        Ok(r) => Done::Ok(json!({
            "rev": r.header.map(|h| h.revision),
            "prev": kv_json(r.prev_kv.as_ref()),
        })),
        Err(e) => Done::err(e, false),
    }
}
