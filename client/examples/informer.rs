//! An informer: a live local copy of a prefix with change callbacks.
//!
//! ```sh
//! cargo run --release -p keel-client --example informer -- 127.0.0.1:2379 services/
//! ```

use std::time::Duration;

use keel_client::{Client, ConnectOptions, Informer, InformerEvent};

#[tokio::main]
async fn main() -> Result<(), keel_client::Error> {
    let mut args = std::env::args().skip(1);
    let endpoint = args.next().unwrap_or_else(|| "127.0.0.1:2379".into());
    let prefix = args.next().unwrap_or_else(|| "services/".into());
    let client = Client::connect([endpoint], ConnectOptions::new()).await?;
    let informer = Informer::new(client, prefix.clone())
        .page_size(500)
        .resync_every(Duration::from_secs(60))
        .spawn(|ev: InformerEvent| match ev {
            InformerEvent::Added(kv) => println!("added   {} = {}", kv.key_str(), kv.value_str()),
            InformerEvent::Updated { old, new } if old == new => {} // periodic resync
            InformerEvent::Updated { old, new } => println!(
                "updated {}: {} -> {}",
                new.key_str(),
                old.value_str(),
                new.value_str()
            ),
            InformerEvent::Deleted(kv) => println!("deleted {}", kv.key_str()),
            InformerEvent::Synced { revision } => println!("(in sync at revision {revision})"),
        });
    informer.wait_synced().await;
    println!("{} keys under {prefix}", informer.store().len());
    tokio::signal::ctrl_c().await.ok();
    Ok(())
}
