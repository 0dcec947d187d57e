//! set: insert unique elements (one key each, `s/<element>`), read the whole set with a
//! linearizable prefix Range; after healing, read the set from every member.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use keel_proto::etcdserverpb::{PutRequest, RangeRequest};
use rand::Rng;
use serde_json::json;

use crate::client::{Client, prefix_end};
use crate::runner::{Ctx, Done, TestOpts, Worker};

pub struct Set {
    next: AtomicU64,
}

impl Set {
    pub fn new(_opts: &TestOpts) -> Set {
        Set {
            next: AtomicU64::new(0),
        }
    }

    pub async fn worker(self: Arc<Self>, ctx: Arc<Ctx>, mut w: Worker) {
        while !ctx.done() {
            w.pace().await;
            if ctx.done() {
                break;
            }
            if w.rng.random_range(0..100) < 12 {
                let c = w.client.clone();
                w.invoke(&ctx, "read", json!({}), async move { read(&c).await })
                    .await;
            } else {
                let e = self.next.fetch_add(1, Ordering::Relaxed);
                let c = w.client.clone();
                w.invoke(&ctx, "add", json!({"element": e}), async move {
                    match c
                        .put(PutRequest {
                            key: format!("s/{e:010}").into_bytes(),
                            value: e.to_string().into_bytes(),
                            ..Default::default()
                        })
                        .await
                    {
                        Ok(r) => Done::Ok(json!({"rev": r.header.map(|h| h.revision)})),
                        Err(e) => Done::err(e, false),
                    }
                })
                .await;
            }
        }
    }

    pub async fn final_phase(self: Arc<Self>, ctx: Arc<Ctx>) -> anyhow::Result<()> {
        ctx.read_on_every_member(
            "read",
            json!({"final": true}),
            |c| async move { read(&c).await },
        )
        .await
    }
}

async fn read(c: &Client) -> Done {
    match c
        .range(RangeRequest {
            key: b"s/".to_vec(),
            range_end: prefix_end(b"s/"),
            keys_only: true,
            ..Default::default()
        })
        .await
    {
        Ok(r) => {
            let elements: Vec<u64> = r
                .kvs
                .iter()
                .filter_map(|kv| std::str::from_utf8(&kv.key[2..]).ok()?.parse().ok())
                .collect();
            Done::Ok(json!({"elements": elements, "rev": r.header.map(|h| h.revision)}))
        }
        Err(e) => Done::err(e, true),
    }
}
