//! The `keel` binary.

use clap::Parser;
use keel_server::config::{Config, LogFormat};
use tracing_subscriber::EnvFilter;

/// mimalloc instead of glibc malloc: requests, Raft entries and watch events allocate many
/// small short-lived buffers across threads, where glibc's arenas cost about 12% of a loaded
/// leader's CPU (see docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn init_tracing(config: &Config) {
    let filter = EnvFilter::try_new(&config.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("snapshot") {
        let cmd = keel_server::snapshot::SnapshotCommand::parse_from(&args[1..]);
        return match cmd {
            keel_server::snapshot::SnapshotCommand::Restore(a) => {
                keel_server::snapshot::restore(&a)
            }
        };
    }
    let config = Config::parse();
    init_tracing(&config);
    tracing::info!(version = env!("CARGO_PKG_VERSION"), name = %config.name, "starting keel");
    let server = keel_server::server::start(config).await?;
    let mut removed = server.removed.clone();
    tokio::select! {
        _ = wait_for_signal() => {}
        _ = removed.wait_for(|r| *r) => {}
    }
    tracing::info!("shutting down");
    server.shutdown().await;
    Ok(())
}
