//! Basic key-value use: put, get, prefix reads, a compare-and-swap loop, typed errors.
//!
//! ```sh
//! cargo run --release -p keel-client --example kv -- 127.0.0.1:2379
//! ```

use keel_client::{Client, Compare, ConnectOptions, Error, Op};

#[tokio::main]
async fn main() -> Result<(), Error> {
    let endpoints: Vec<String> = std::env::args().skip(1).collect();
    let endpoints = if endpoints.is_empty() {
        vec!["127.0.0.1:2379".to_string()]
    } else {
        endpoints
    };
    let client = Client::connect(&endpoints, ConnectOptions::new()).await?;

    client.put("example/counter", "0").await?;
    client.put("example/config/a", "1").await?;
    client.put("example/config/b", "2").await?;
    for kv in client.get("example/config/").prefix().await?.kvs {
        println!("{} = {}", kv.key_str(), kv.value_str());
    }

    // Increment a counter with optimistic concurrency: read, then write only if nobody wrote
    // in between (same mod revision); on conflict read again.
    for _ in 0..10 {
        loop {
            let kv = client
                .get("example/counter")
                .await?
                .into_first()
                .expect("exists");
            let n: u64 = kv.value_str().parse().unwrap_or(0);
            let r = client
                .txn()
                .when([Compare::mod_revision("example/counter").eq(kv.mod_revision)])
                .and_then([Op::put("example/counter", (n + 1).to_string())])
                .await;
            match r {
                Ok(r) if r.succeeded => break,
                Ok(_) => continue, // somebody else won: retry with the new value
                // Unknown outcome: the increment may have happened. A real application would
                // make the write idempotent (e.g. record a request ID in the same txn).
                Err(e) if e.is_ambiguous() => return Err(e),
                Err(e) => return Err(e),
            }
        }
    }
    let counter = client
        .get("example/counter")
        .await?
        .into_first()
        .expect("exists");
    println!("counter = {}", counter.value_str());

    // Errors are typed.
    match client.get("example/counter").revision(i64::MAX / 2).await {
        Err(Error::FutureRevision) => println!("future revision refused, as expected"),
        other => println!("unexpected: {other:?}"),
    }
    client.delete("example/").prefix().await?;
    Ok(())
}
