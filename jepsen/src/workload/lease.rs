//! lease: short leases with keys attached; some kept alive, some left to lapse, some revoked.
//!
//! Each worker keeps up to `LIVE_LEASES` leases of its own. A lease is granted with a TTL of
//! 2–3 s (the server may raise it to its minimum; the granted TTL is recorded) and gets one of
//! three fates, drawn at grant time:
//! - `keep`: kept alive (one keep-alive on a fresh stream every TTL/3) for 3–8 s, then left to
//!   lapse;
//! - `lapse`: never kept alive;
//! - `revoke`: revoked explicitly after 0.3–1.5 s.
//!
//! Keys are attached with Put (`l/<lease hex>/<n>`, each key written once); reads are
//! linearizable prefix Ranges over `l/` (keys only). After healing, the workload stops renewing,
//! waits for every lease to run out (the longest TTL plus a margin, then polls), and reads the
//! keys and the lease list from every member.
//!
//! Operations: `grant {ttl}` -> `{id, ttl}`; `keepalive {lease}` -> `{ttl}` (0: no such lease);
//! `put {key, lease}`; `revoke {lease}`; `read {}` -> `{keys, rev}`; `leases {final}` ->
//! `{leases}`.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use keel_proto::etcdserverpb::{PutRequest, RangeRequest};
use rand::Rng;
use serde_json::json;
use tokio::time::Instant;

use crate::client::{Client, prefix_end};
use crate::record::Outcome;
use crate::runner::{Ctx, Done, TestOpts, Worker};

const LIVE_LEASES: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Keep,
    Lapse,
    Revoke,
}

struct Held {
    id: i64,
    ttl: i64,
    fate: Fate,
    granted: Instant,
    last_renew: Instant,
    /// Keep: renew until then. Revoke: revoke after then.
    until: Instant,
    keys: u32,
}

pub struct Lease {
    /// The longest TTL granted (seconds), for the final wait.
    max_ttl: AtomicI64,
}

pub fn key_of(lease: i64, n: u32) -> String {
    format!("l/{lease:016x}/{n:04}")
}

/// The lease ID encoded in a key written by this workload.
pub fn lease_of_key(key: &str) -> Option<i64> {
    let hex = key.strip_prefix("l/")?.split('/').next()?;
    i64::from_str_radix(hex, 16).ok()
}

impl Lease {
    pub fn new(_opts: &TestOpts) -> Lease {
        Lease {
            max_ttl: AtomicI64::new(3),
        }
    }

    pub async fn worker(self: Arc<Self>, ctx: Arc<Ctx>, mut w: Worker) {
        let mut held: Vec<Held> = Vec::new();
        while !ctx.done() {
            w.pace().await;
            if ctx.done() {
                break;
            }
            let now = Instant::now();
            // Forget leases that are expected to be gone (their fate is checked from reads).
            held.retain(|h| match h.fate {
                Fate::Lapse => now < h.last_renew + Duration::from_secs(h.ttl as u64),
                Fate::Keep => true,
                Fate::Revoke => true,
            });
            for h in held.iter_mut() {
                if h.fate == Fate::Keep && now >= h.until {
                    h.fate = Fate::Lapse;
                }
            }
            // 1. A keep-alive that is due.
            if let Some(pos) = held.iter().position(|h| {
                h.fate == Fate::Keep
                    && now >= h.last_renew + Duration::from_millis(h.ttl as u64 * 1000 / 3)
            }) {
                let id = held[pos].id;
                let c = w.client.clone();
                let op = w
                    .invoke(&ctx, "keepalive", json!({"lease": id}), async move {
                        keep_alive(&c, id).await
                    })
                    .await;
                match (op.outcome, op.result["ttl"].as_i64()) {
                    (Outcome::Ok, Some(t)) if t > 0 => held[pos].last_renew = now,
                    (Outcome::Ok, _) => {
                        held.remove(pos);
                    }
                    _ => {}
                }
                continue;
            }
            // 2. A revocation that is due.
            if let Some(pos) = held
                .iter()
                .position(|h| h.fate == Fate::Revoke && now >= h.until)
            {
                let id = held.remove(pos).id;
                let c = w.client.clone();
                w.invoke(&ctx, "revoke", json!({"lease": id}), async move {
                    match c.lease_revoke(id).await {
                        Ok(r) => Done::Ok(json!({"rev": r.header.map(|h| h.revision)})),
                        Err(e) => Done::err(e, false),
                    }
                })
                .await;
                continue;
            }
            // 3. A new lease.
            if held.len() < LIVE_LEASES && (held.is_empty() || w.rng.random_range(0..100) < 30) {
                let ttl: i64 = w.rng.random_range(2..=3);
                let c = w.client.clone();
                let op = w
                    .invoke(&ctx, "grant", json!({"ttl": ttl}), async move {
                        match c.lease_grant(ttl).await {
                            Ok(r) if r.error.is_empty() => Done::Ok(json!({
                                "id": r.id, "ttl": r.ttl,
                                "rev": r.header.map(|h| h.revision)
                            })),
                            Ok(r) => Done::Info(format!("grant error: {}", r.error)),
                            Err(e) => Done::err(e, false),
                        }
                    })
                    .await;
                if op.outcome == Outcome::Ok
                    && let (Some(id), Some(ttl)) =
                        (op.result["id"].as_i64(), op.result["ttl"].as_i64())
                {
                    self.max_ttl.fetch_max(ttl, Ordering::Relaxed);
                    let t = Instant::now();
                    let fate = match w.rng.random_range(0..100) {
                        0..45 => Fate::Keep,
                        45..75 => Fate::Lapse,
                        _ => Fate::Revoke,
                    };
                    let until = match fate {
                        Fate::Keep => t + Duration::from_millis(w.rng.random_range(3_000..8_000)),
                        Fate::Revoke => t + Duration::from_millis(w.rng.random_range(300..1_500)),
                        Fate::Lapse => t,
                    };
                    held.push(Held {
                        id,
                        ttl,
                        fate,
                        granted: op_start(&ctx, op.invoke),
                        last_renew: op_start(&ctx, op.invoke),
                        until,
                        keys: 0,
                    });
                }
                continue;
            }
            // 4. Attach a key, or read.
            if !held.is_empty() && w.rng.random_range(0..100) < 65 {
                let pos = w.rng.random_range(0..held.len());
                let h = &mut held[pos];
                if h.granted.elapsed() > Duration::from_secs(h.ttl as u64 + 5) && h.keys > 6 {
                    continue;
                }
                h.keys += 1;
                let (id, key) = (h.id, key_of(h.id, h.keys));
                let c = w.client.clone();
                let op = w
                    .invoke(&ctx, "put", json!({"key": key, "lease": id}), async move {
                        match c
                            .put(PutRequest {
                                key: key.into_bytes(),
                                value: b"x".to_vec(),
                                lease: id,
                                ..Default::default()
                            })
                            .await
                        {
                            Ok(r) => Done::Ok(json!({"rev": r.header.map(|h| h.revision)})),
                            Err(e) => Done::err(e, false),
                        }
                    })
                    .await;
                if op.outcome == Outcome::Fail
                    && op
                        .error
                        .as_deref()
                        .is_some_and(|e| e.starts_with("NotFound"))
                {
                    held.retain(|h| h.id != id);
                }
            } else {
                let c = w.client.clone();
                w.invoke(&ctx, "read", json!({}), async move { read(&c).await })
                    .await;
            }
        }
    }

    /// Waits for every lease to run out, then reads the keys and the leases from every member.
    pub async fn final_phase(self: Arc<Self>, ctx: Arc<Ctx>) -> anyhow::Result<()> {
        let wait = Duration::from_secs(self.max_ttl.load(Ordering::Relaxed).max(1) as u64 + 2);
        tokio::time::sleep(wait).await;
        // Expiry is the leader's job and takes a tick or two more: poll until no key is left.
        let deadline = Instant::now() + Duration::from_secs(20);
        let c = ctx.client(0);
        while Instant::now() < deadline {
            let cc = c.clone();
            let op = ctx
                .run_op(0, "read", json!({}), async move { read(&cc).await })
                .await;
            if op.outcome == Outcome::Ok
                && op.result["keys"].as_array().is_some_and(|a| a.is_empty())
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let mut ok = 0;
        for node in 0..ctx.cluster.n() {
            let c = ctx.client(node);
            let cc = c.clone();
            let op = ctx
                .run_op(node, "read", json!({"final": true}), async move {
                    read(&cc).await
                })
                .await;
            if op.outcome == Outcome::Ok {
                ok += 1;
            }
            ctx.run_op(node, "leases", json!({"final": true}), async move {
                match c.lease_leases().await {
                    Ok(r) => {
                        let ids: Vec<i64> = r.leases.iter().map(|l| l.id).collect();
                        Done::Ok(json!({"leases": ids}))
                    }
                    Err(e) => Done::err(e, true),
                }
            })
            .await;
        }
        anyhow::ensure!(ok > 0, "no final read succeeded");
        Ok(())
    }
}

/// The harness instant of an operation's invocation (`ns` since the start of the test).
fn op_start(ctx: &Ctx, ns: u64) -> Instant {
    ctx.t0 + Duration::from_nanos(ns)
}

pub async fn keep_alive(c: &Client, id: i64) -> Done {
    match c.lease_keep_alive_once(id).await {
        Ok(r) => Done::Ok(json!({"ttl": r.ttl, "rev": r.header.map(|h| h.revision)})),
        // A keep-alive has no effect on the data; a failed one constrains nothing.
        Err(e) => Done::err(e, true),
    }
}

async fn read(c: &Client) -> Done {
    match c
        .range(RangeRequest {
            key: b"l/".to_vec(),
            range_end: prefix_end(b"l/"),
            keys_only: true,
            ..Default::default()
        })
        .await
    {
        Ok(r) => {
            let keys: Vec<String> = r
                .kvs
                .iter()
                .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
                .collect();
            Done::Ok(json!({"keys": keys, "rev": r.header.map(|h| h.revision)}))
        }
        Err(e) => Done::err(e, true),
    }
}
