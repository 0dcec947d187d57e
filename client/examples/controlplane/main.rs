//! A slim declarative control plane on Keel: an API for ReplicaSet-like JSON objects, simulated
//! nodes whose "pods" are keys bound to leases, and a leader-elected ReplicaSet controller.
//! See `cp.rs` for how it works.
//!
//! ```sh
//! E=127.0.0.1:2379
//! cargo run --release -p keel-client --example controlplane -- --endpoints $E node --name node-a &
//! cargo run --release -p keel-client --example controlplane -- --endpoints $E controller --id c1 &
//! cargo run --release -p keel-client --example controlplane -- --endpoints $E controller --id c2 &
//! cargo run --release -p keel-client --example controlplane -- --endpoints $E apply web --replicas 3 --image nginx:1.27
//! cargo run --release -p keel-client --example controlplane -- --endpoints $E get
//! kill %2   # the active controller (or %3): the other takes over within the lease TTL
//! ```

mod cp;

use clap::{Parser, Subcommand};
use keel_client::{Client, ConnectOptions};

#[derive(Parser)]
struct Cli {
    #[arg(long, default_value = "127.0.0.1:2379", value_delimiter = ',')]
    endpoints: Vec<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create or update a replica set.
    Apply {
        name: String,
        #[arg(long)]
        replicas: u32,
        #[arg(long)]
        image: String,
    },
    /// Show replica sets and their pods.
    Get,
    /// Delete a replica set (its pods go too).
    Delete { name: String },
    /// Run a controller replica.
    Controller {
        #[arg(long)]
        id: String,
    },
    /// Run a simulated node.
    Node {
        #[arg(long)]
        name: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    let client = Client::connect(&cli.endpoints, ConnectOptions::new()).await?;
    let api = cp::Api::new(client.clone());
    match cli.cmd {
        Cmd::Apply {
            name,
            replicas,
            image,
        } => {
            let v = api.apply(&name, cp::Spec { replicas, image }).await?;
            println!(
                "{} generation {} (version {})",
                name, v.object.generation, v.resource_version
            );
        }
        Cmd::Get => {
            for v in api.list().await? {
                let rs = v.object;
                println!(
                    "{}: want {} x {}, have {} (observed generation {}/{})",
                    rs.name,
                    rs.spec.replicas,
                    rs.spec.image,
                    rs.status.replicas,
                    rs.status.observed_generation,
                    rs.generation
                );
                for p in api.pods(&rs.name).await? {
                    println!("  {} on {} ({})", p.name, p.node, p.image);
                }
            }
        }
        Cmd::Delete { name } => api.delete(&name).await?,
        Cmd::Controller { id } => cp::Controller::new(client, id).run().await,
        Cmd::Node { name } => {
            cp::NodeAgent {
                client,
                name,
                ttl: 3,
            }
            .run()
            .await
        }
    }
    Ok(())
}
