//! lock: etcd's `v3lockpb.Lock` service with fencing tokens.
//!
//! Workers share a few locks (`k/<n>`, about three workers per lock). Each worker has a session:
//! a lease (TTL 3 s) kept alive by a background task (one keep-alive every 0.75 s, recorded).
//! A cycle:
//!
//! 1. `acquire {lock, lease, hold}`: Lock(name, lease) (deadline 3 x the op timeout, since it
//!    blocks while another session holds the lock), then a linearizable Range of the returned
//!    key for its create revision: the fencing token. Result `{key, token}`.
//! 2. Hold for 20–150 ms; with 4 % probability *stall* instead: stop the session's keep-alives
//!    and sleep TTL + 1.5 s, like a process in a long GC pause, so the lease expires under it.
//! 3. `write {lock, key, token, hold}`: one Txn `create_revision(key) == token` and
//!    `value(fence) < token + 1` (tokens zero-padded, so bytes order as numbers) putting
//!    `fence = token` and the lock's data key; a false compare is a definite failure.
//! 4. `unlock {lock, key, hold}`. A session whose acquire or unlock was ambiguous, or that
//!    stalled, is ended with `revoke {lease}` and a new lease is granted (`grant`).
//!
//! After healing every member reads the fence keys (`fences`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use keel_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use keel_proto::etcdserverpb::request_op::Request;
use keel_proto::etcdserverpb::{Compare, PutRequest, RangeRequest, RequestOp, TxnRequest};
use rand::Rng;
use serde_json::json;

use crate::client::{Client, prefix_end};
use crate::record::Outcome;
use crate::runner::{Ctx, Done, TestOpts, Worker};
use crate::workload::lease::keep_alive;

const SESSION_TTL: i64 = 3;

pub struct Lock {
    locks: usize,
    next_hold: AtomicU64,
}

pub fn pad(token: i64) -> String {
    format!("{:020}", token.max(0))
}

fn fence_key(lock: usize) -> String {
    format!("f/{lock}")
}

struct Session {
    lease: i64,
    ttl: i64,
    stalled: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Session {
    fn end(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Lock {
    pub fn new(opts: &TestOpts) -> Lock {
        Lock {
            locks: (opts.concurrency / 3).max(1),
            next_hold: AtomicU64::new(1),
        }
    }

    pub async fn worker(self: Arc<Self>, ctx: Arc<Ctx>, mut w: Worker) {
        let lock = w.id % self.locks;
        let name = format!("k/{lock}");
        if w.id < self.locks {
            init_fence(&w.client, lock).await;
        }
        let acquire_timeout = Duration::from_millis(ctx.opts.op_timeout_ms * 3);
        let mut session: Option<Session> = None;
        while !ctx.done() {
            w.pace().await;
            if ctx.done() {
                break;
            }
            let Some(s) = session.as_ref() else {
                session = self.grant(&ctx, &mut w).await;
                continue;
            };
            let lease = s.lease;
            let hold = self.next_hold.fetch_add(1, Ordering::Relaxed);
            let c = w.client.clone();
            let n = name.clone();
            let op = w
                .invoke(
                    &ctx,
                    "acquire",
                    json!({"lock": name, "lease": lease, "hold": hold}),
                    async move { acquire(&c, &n, lease, acquire_timeout).await },
                )
                .await;
            let (key, token) = match op.outcome {
                Outcome::Ok => (
                    op.result["key"].as_str().unwrap_or_default().to_string(),
                    op.result["token"].as_i64(),
                ),
                Outcome::Fail => continue,
                Outcome::Info => {
                    self.end_session(&ctx, &mut w, session.take(), hold).await;
                    continue;
                }
            };
            // Hold (or stall).
            let mut stalled = false;
            if w.rng.random_range(0..100) < 4 {
                stalled = true;
                s.stalled.store(true, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(s.ttl as u64 * 1000 + 1500)).await;
            } else {
                tokio::time::sleep(Duration::from_millis(w.rng.random_range(20..150))).await;
            }
            if let Some(token) = token {
                let c = w.client.clone();
                let k = key.clone();
                w.invoke(
                    &ctx,
                    "write",
                    json!({"lock": name, "key": key, "token": token, "hold": hold, "stalled": stalled}),
                    async move { fenced_write(&c, lock, &k, token, hold).await },
                )
                .await;
            }
            let c = w.client.clone();
            let k = key.clone();
            let op = w
                .invoke(
                    &ctx,
                    "unlock",
                    json!({"lock": name, "key": key, "hold": hold}),
                    async move {
                        match c.unlock(k.as_bytes()).await {
                            Ok(r) => Done::Ok(json!({"rev": r.header.map(|h| h.revision)})),
                            Err(e) => Done::err(e, false),
                        }
                    },
                )
                .await;
            if stalled || op.outcome != Outcome::Ok || w.rng.random_range(0..100) < 10 {
                self.end_session(&ctx, &mut w, session.take(), hold).await;
            }
        }
        if let Some(s) = session.take() {
            self.end_session(&ctx, &mut w, Some(s), 0).await;
        }
    }

    async fn grant(&self, ctx: &Arc<Ctx>, w: &mut Worker) -> Option<Session> {
        let c = w.client.clone();
        let op = w
            .invoke(ctx, "grant", json!({"ttl": SESSION_TTL}), async move {
                match c.lease_grant(SESSION_TTL).await {
                    Ok(r) if r.error.is_empty() => Done::Ok(json!({
                        "id": r.id, "ttl": r.ttl, "rev": r.header.map(|h| h.revision)
                    })),
                    Ok(r) => Done::Info(format!("grant error: {}", r.error)),
                    Err(e) => Done::err(e, false),
                }
            })
            .await;
        let (Some(lease), Some(ttl)) = (op.result["id"].as_i64(), op.result["ttl"].as_i64()) else {
            return None;
        };
        if op.outcome != Outcome::Ok {
            return None;
        }
        let s = Session {
            lease,
            ttl,
            stalled: Arc::new(AtomicBool::new(false)),
            stop: Arc::new(AtomicBool::new(false)),
        };
        // The session's keep-alives, recorded as operations of their own.
        let (stalled, stop) = (s.stalled.clone(), s.stop.clone());
        let ctx = ctx.clone();
        let node = w.node;
        let client = w.client.clone();
        let every = Duration::from_millis(ttl.max(1) as u64 * 250);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                if stalled.load(Ordering::Relaxed) {
                    continue;
                }
                let c = client.clone();
                let op = ctx
                    .run_op(node, "keepalive", json!({"lease": lease}), async move {
                        keep_alive(&c, lease).await
                    })
                    .await;
                if op.outcome == Outcome::Ok && op.result["ttl"].as_i64() == Some(0) {
                    return;
                }
            }
        });
        Some(s)
    }

    async fn end_session(&self, ctx: &Ctx, w: &mut Worker, s: Option<Session>, hold: u64) {
        let Some(s) = s else { return };
        s.end();
        let lease = s.lease;
        let c = w.client.clone();
        w.invoke(
            ctx,
            "revoke",
            json!({"lease": lease, "hold": hold}),
            async move {
                match c.lease_revoke(lease).await {
                    Ok(r) => Done::Ok(json!({"rev": r.header.map(|h| h.revision)})),
                    Err(e) => Done::err(e, false),
                }
            },
        )
        .await;
    }

    /// Every member reads the fence keys.
    pub async fn final_phase(self: Arc<Self>, ctx: Arc<Ctx>) -> anyhow::Result<()> {
        ctx.read_on_every_member("fences", json!({"final": true}), |c| async move {
            read_fences(&c).await
        })
        .await
    }
}

/// Every fence key with its token.
async fn read_fences(c: &Client) -> Done {
    match c
        .range(RangeRequest {
            key: b"f/".to_vec(),
            range_end: prefix_end(b"f/"),
            ..Default::default()
        })
        .await
    {
        Ok(r) => {
            let fences: serde_json::Map<String, serde_json::Value> = r
                .kvs
                .iter()
                .map(|kv| {
                    let k = String::from_utf8_lossy(&kv.key).into_owned();
                    let v = std::str::from_utf8(&kv.value)
                        .ok()
                        .and_then(|s| s.parse::<i64>().ok());
                    (k, json!(v))
                })
                .collect();
            Done::Ok(json!({"fences": fences}))
        }
        Err(e) => Done::err(e, true),
    }
}

/// Creates the fence key of `lock` with token 0 if it does not exist (not recorded: setup).
async fn init_fence(c: &Client, lock: usize) {
    let key = fence_key(lock).into_bytes();
    for _ in 0..10 {
        let r = c
            .txn(TxnRequest {
                compare: vec![Compare {
                    result: CompareResult::Equal as i32,
                    target: CompareTarget::Version as i32,
                    key: key.clone(),
                    range_end: vec![],
                    target_union: Some(TargetUnion::Version(0)),
                }],
                success: vec![RequestOp {
                    request: Some(Request::RequestPut(PutRequest {
                        key: key.clone(),
                        value: pad(0).into_bytes(),
                        ..Default::default()
                    })),
                }],
                failure: vec![],
            })
            .await;
        if r.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn acquire(c: &Client, name: &str, lease: i64, timeout: Duration) -> Done {
    let r = match c.lock(name.as_bytes(), lease, timeout).await {
        Ok(r) => r,
        Err(e) => return Done::err(e, false),
    };
    let key = String::from_utf8_lossy(&r.key).into_owned();
    let rev = r.header.map(|h| h.revision);
    // The fencing token: the lock key's create revision.
    let token = c
        .range(RangeRequest {
            key: r.key.clone(),
            ..Default::default()
        })
        .await
        .ok()
        .and_then(|rr| rr.kvs.first().map(|kv| kv.create_revision));
    Done::Ok(json!({"key": key, "token": token, "rev": rev}))
}

async fn fenced_write(c: &Client, lock: usize, key: &str, token: i64, hold: u64) -> Done {
    let fence = fence_key(lock).into_bytes();
    let r = c
        .txn(TxnRequest {
            compare: vec![
                Compare {
                    result: CompareResult::Equal as i32,
                    target: CompareTarget::Create as i32,
                    key: key.as_bytes().to_vec(),
                    range_end: vec![],
                    target_union: Some(TargetUnion::CreateRevision(token)),
                },
                Compare {
                    result: CompareResult::Less as i32,
                    target: CompareTarget::Value as i32,
                    key: fence.clone(),
                    range_end: vec![],
                    target_union: Some(TargetUnion::Value(pad(token + 1).into_bytes())),
                },
            ],
            success: vec![
                RequestOp {
                    request: Some(Request::RequestPut(PutRequest {
                        key: fence.clone(),
                        value: pad(token).into_bytes(),
                        ..Default::default()
                    })),
                },
                RequestOp {
                    request: Some(Request::RequestPut(PutRequest {
                        key: format!("d/{lock}").into_bytes(),
                        value: format!("{token} {hold}").into_bytes(),
                        ..Default::default()
                    })),
                },
            ],
            failure: vec![RequestOp {
                request: Some(Request::RequestRange(RangeRequest {
                    key: fence.clone(),
                    ..Default::default()
                })),
            }],
        })
        .await;
    match r {
        Ok(resp) => {
            let rev = resp.header.map(|h| h.revision);
            if resp.succeeded {
                Done::Ok(json!({"rev": rev}))
            } else {
                Done::Fail(json!({"rev": rev}), "fence compare failed".into())
            }
        }
        Err(e) => Done::err(e, false),
    }
}
