//! Backups: the `Maintenance.Snapshot` stream (what `etcdctl snapshot save` stores), written
//! straight into the response stream, and the `keel snapshot restore` subcommand that turns such
//! a file into a new member's data directory. The format (etcd's) lives in
//! [`keel_store::backup`].

use std::path::PathBuf;
use std::sync::Arc;

use keel_proto::etcdserverpb::SnapshotResponse;
use keel_store::backup;
use keel_store::engine::Engine;
use keel_store::engine::rocks::RocksEngine;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tonic::Status;

use crate::maintenance::ETCD_COMPAT_VERSION;
use crate::node::KeelNode;

/// Bytes per streamed message (etcd uses 32 KiB too).
const CHUNK: usize = 32 * 1024;

/// Written by `keel snapshot restore`: how the restored member bootstraps its new cluster on
/// first start, so that only `--data-dir` (and listen URLs) are needed afterwards, as with etcd.
pub const RESTORE_BOOTSTRAP_FILE: &str = "restore-bootstrap.json";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RestoreBootstrap {
    pub name: String,
    pub initial_cluster: String,
    pub initial_cluster_token: String,
    pub initial_advertise_peer_urls: Vec<String>,
}

/// Sends what is written to it as `SnapshotResponse` messages of [`CHUNK`] bytes (the first one
/// with the response header), counting down `remaining_bytes` from the backup's size.
struct ChunkSender {
    tx: mpsc::Sender<Result<SnapshotResponse, Status>>,
    header: Option<keel_proto::etcdserverpb::ResponseHeader>,
    remaining: u64,
    buf: Vec<u8>,
}

impl ChunkSender {
    fn send_buffered(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let blob = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.remaining = self.remaining.saturating_sub(blob.len() as u64);
        let msg = SnapshotResponse {
            header: self.header.take(),
            remaining_bytes: self.remaining,
            blob,
            version: ETCD_COMPAT_VERSION.to_string(),
        };
        self.tx.blocking_send(Ok(msg)).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client went away")
        })
    }
}

impl std::io::Write for ChunkSender {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.send_buffered()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send_buffered()
    }
}

/// Streams a backup of `node`'s store as it is written (no temporary file): the database is
/// laid out from one consistent view of the store, then written from the same view straight
/// into the response stream. The stream ends with an error if the backup cannot be completed.
pub async fn stream_backup(
    node: Arc<KeelNode>,
) -> Result<mpsc::Receiver<Result<SnapshotResponse, Status>>, Status> {
    let engine: Arc<dyn Engine> = node.mvcc.engine().clone();
    let header = node.header();
    let (tx, rx) = mpsc::channel(16);
    let errors = tx.clone();
    let started = std::time::Instant::now();
    tokio::task::spawn_blocking(move || {
        let result = backup::stream_backup(
            &engine,
            |size| {
                tracing::info!(
                    bytes = size,
                    revision = header.revision,
                    "streaming a snapshot to a client"
                );
                Ok(ChunkSender {
                    tx,
                    header: Some(header),
                    remaining: size,
                    buf: Vec::with_capacity(CHUNK),
                })
            },
            |records| tracing::info!(records, "snapshot progress"),
        );
        match result {
            Ok((info, _)) => {
                crate::metrics::BACKEND_SNAPSHOT_DURATION.observe(started.elapsed().as_secs_f64());
                tracing::info!(
                    bytes = info.size,
                    records = info.records,
                    took = ?started.elapsed(),
                    "snapshot sent"
                )
            }
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                tracing::info!("snapshot stream ended by the client")
            }
            Err(e) => {
                tracing::warn!(error = %e, "snapshot stream failed");
                let _ = errors.blocking_send(Err(Status::internal(format!("snapshot: {e}"))));
            }
        }
    });
    Ok(rx)
}

/// `keel snapshot restore` arguments (named like `etcdctl snapshot restore`'s).
#[derive(Debug, Clone, clap::Args)]
pub struct RestoreArgs {
    /// The backup file (from `etcdctl snapshot save` against Keel or etcd; or, with
    /// `--skip-hash-check`, an etcd member's `member/snap/db`).
    pub file: PathBuf,
    /// The data directory to create; it must not exist yet.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// This member's name in the new cluster.
    #[arg(long, default_value = "default")]
    pub name: String,
    /// The new cluster's members, `name=peer-url,...`.
    #[arg(long)]
    pub initial_cluster: Option<String>,
    /// The new cluster's token (gives it new member and cluster IDs).
    #[arg(long, default_value = "etcd-cluster")]
    pub initial_cluster_token: String,
    /// This member's peer URLs.
    #[arg(long, value_delimiter = ',', default_value = "http://localhost:2380")]
    pub initial_advertise_peer_urls: Vec<String>,
    /// Do not require the SHA-256 at the end of the file (for a database copied from an etcd
    /// data directory, which has none).
    #[arg(long)]
    pub skip_hash_check: bool,
}

/// `keel snapshot ...` subcommands.
#[derive(Debug, clap::Parser)]
#[command(
    name = "keel snapshot",
    about = "Restore a backup (of Keel or etcd) into a new data directory"
)]
pub enum SnapshotCommand {
    /// Builds a new member's data directory from a backup file.
    Restore(RestoreArgs),
}

/// Verifies the backup and writes a new data directory from it, with a progress bar.
pub fn restore(args: &RestoreArgs) -> anyhow::Result<()> {
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{}.keel", args.name)));
    if data_dir.exists() {
        anyhow::bail!("data-dir {:?} exists", data_dir.display().to_string());
    }
    let initial_cluster = args.initial_cluster.clone().unwrap_or_else(|| {
        format!(
            "{}={}",
            args.name,
            args.initial_advertise_peer_urls
                .first()
                .cloned()
                .unwrap_or_default()
        )
    });
    let total = std::fs::metadata(&args.file)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.file.display()))?
        .len();
    let bar = indicatif::ProgressBar::new(total).with_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>10} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})",
        )?
        .progress_chars("=> "),
    );
    if !args.skip_hash_check {
        bar.set_message("verifying");
        backup::verify_backup(&args.file, |done, _| bar.set_position(done))?;
    }
    bar.finish_and_clear();

    // Build into a temporary sibling and rename, so a failed restore leaves nothing behind.
    let tmp_dir = data_dir.with_extension("restoring");
    if tmp_dir.exists() {
        std::fs::remove_dir_all(&tmp_dir)?;
    }
    std::fs::create_dir_all(&tmp_dir)?;
    let result = (|| -> anyhow::Result<backup::RestoreInfo> {
        let engine: Arc<dyn Engine> = Arc::new(RocksEngine::open(&tmp_dir.join("db"))?);
        let spinner = indicatif::ProgressBar::new_spinner();
        spinner.set_message("loading records");
        // Verified above (or not to be).
        let check = backup::HashCheck::Skip;
        let info = backup::restore_backup(&args.file, &engine, check, |records| {
            spinner.set_message(format!("loaded {records} records"));
            spinner.tick();
        })?;
        spinner.finish_and_clear();
        let bootstrap = RestoreBootstrap {
            name: args.name.clone(),
            initial_cluster: initial_cluster.clone(),
            initial_cluster_token: args.initial_cluster_token.clone(),
            initial_advertise_peer_urls: args.initial_advertise_peer_urls.clone(),
        };
        std::fs::write(
            tmp_dir.join(RESTORE_BOOTSTRAP_FILE),
            serde_json::to_vec_pretty(&bootstrap)?,
        )?;
        Ok(info)
    })();
    match result {
        Ok(info) => {
            std::fs::rename(&tmp_dir, &data_dir)?;
            println!(
                "restored snapshot {} into {}: {} keys at revision {} ({} records); \
                 member {:?} of cluster {:?}",
                args.file.display(),
                data_dir.display(),
                info.keys,
                info.revision,
                info.records,
                args.name,
                initial_cluster
            );
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp_dir);
            Err(e)
        }
    }
}
