//! Watch a prefix; the watch resumes by itself when its member goes away (try killing it).
//!
//! ```sh
//! cargo run --release -p keel-client --example watch -- 127.0.0.1:2379,127.0.0.1:22379
//! ```

use keel_client::{Client, ConnectOptions, EventKind, WatchEvent, WatchOptions};

#[tokio::main]
async fn main() -> Result<(), keel_client::Error> {
    let endpoints: Vec<String> = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:2379".into())
        .split(',')
        .map(str::to_string)
        .collect();
    let client = Client::connect(&endpoints, ConnectOptions::new()).await?;
    let mut watcher = client
        .watch("", WatchOptions::new().prefix().progress_notify())
        .await?;
    println!("watching every key via {}", watcher.endpoint());
    while let Some(ev) = watcher.next().await {
        match ev? {
            WatchEvent::Events { events, .. } => {
                for e in events {
                    let kind = if e.kind == EventKind::Put {
                        "PUT"
                    } else {
                        "DEL"
                    };
                    println!(
                        "{kind} {} = {} (rev {})",
                        e.kv.key_str(),
                        e.kv.value_str(),
                        e.kv.mod_revision
                    );
                }
            }
            WatchEvent::Progress { revision } => println!("(up to date at revision {revision})"),
            WatchEvent::Compacted { compact_revision } => {
                println!("history compacted at {compact_revision}: re-read and watch again");
                break;
            }
        }
    }
    Ok(())
}
