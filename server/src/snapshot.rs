//! Backups: the `Maintenance.Snapshot` stream (what `etcdctl snapshot save` stores) and the
//! `keel snapshot restore` subcommand that turns such a file into a new member's data directory.
//! The file format lives in [`keel_store::backup`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use keel_proto::etcdserverpb::SnapshotResponse;
use keel_store::backup;
use keel_store::engine::Engine;
use keel_store::engine::rocks::RocksEngine;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
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

static SEQ: AtomicU64 = AtomicU64::new(0);

/// Writes a backup of `node`'s store to a temporary file and streams it, deleting the file
/// afterwards. The stream ends with an error if the file cannot be read to the end.
pub async fn stream_backup(
    node: Arc<KeelNode>,
) -> Result<mpsc::Receiver<Result<SnapshotResponse, Status>>, Status> {
    let dir = node.data_dir.join("tmp");
    std::fs::create_dir_all(&dir).map_err(|e| Status::internal(e.to_string()))?;
    let path = dir.join(format!(
        "backup-{}-{}.db",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let engine: Arc<dyn Engine> = node.mvcc.engine().clone();
    let header = node.header();
    let started = std::time::Instant::now();
    let build_path = path.clone();
    let info = tokio::task::spawn_blocking(move || {
        backup::write_backup(&engine, &build_path, |records| {
            tracing::info!(records, "writing snapshot for a client");
        })
    })
    .await
    .map_err(|e| Status::internal(e.to_string()))?
    .map_err(|e| {
        let _ = std::fs::remove_file(path.with_extension("part"));
        Status::internal(format!("snapshot: {e}"))
    })?;
    tracing::info!(
        bytes = info.size,
        records = info.records,
        revision = header.revision,
        took = ?started.elapsed(),
        "snapshot written; streaming it to the client"
    );

    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let result = send_file(&path, info.size, header, &tx).await;
        let _ = tokio::fs::remove_file(&path).await;
        match result {
            Ok(()) => tracing::info!(bytes = info.size, "snapshot sent"),
            Err(e) => {
                tracing::warn!(error = %e, "snapshot stream failed");
                let _ = tx
                    .send(Err(Status::internal(format!("snapshot: {e}"))))
                    .await;
            }
        }
    });
    Ok(rx)
}

async fn send_file(
    path: &Path,
    size: u64,
    header: keel_proto::etcdserverpb::ResponseHeader,
    tx: &mpsc::Sender<Result<SnapshotResponse, Status>>,
) -> std::io::Result<()> {
    let mut file = tokio::fs::File::open(path).await?;
    let mut remaining = size;
    let mut first = true;
    while remaining > 0 {
        let mut blob = vec![0u8; CHUNK.min(remaining as usize)];
        file.read_exact(&mut blob).await?;
        remaining -= blob.len() as u64;
        let msg = SnapshotResponse {
            header: first.then_some(header),
            remaining_bytes: remaining,
            blob,
            version: ETCD_COMPAT_VERSION.to_string(),
        };
        first = false;
        if tx.send(Ok(msg)).await.is_err() {
            // The client went away.
            return Ok(());
        }
    }
    Ok(())
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
