//! A Keel cluster of `keel` processes on 127.0.0.1: start, kill -9, restart, pause, resume,
//! find the leader. Members talk to each other through the proxies of [`crate::proxy`].

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_proto::etcdserverpb::StatusRequest;
use keel_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use tonic::transport::Endpoint;

use crate::proxy::Net;

/// How to run the members.
#[derive(Debug, Clone)]
pub struct ClusterOpts {
    pub keel_bin: PathBuf,
    pub nodes: usize,
    pub dir: PathBuf,
    pub heartbeat_ms: u64,
    pub election_ms: u64,
    pub snapshot_count: u64,
    /// Log entries kept behind a snapshot (`--experimental-snapshot-catchup-entries`).
    pub snapshot_catchup_entries: u64,
    pub unsafe_local_reads: bool,
    /// Extra flags for every member.
    pub extra_args: Vec<String>,
    /// Seed used to pick the port range.
    pub seed: u64,
    /// Run every member under libfaketime (this library) with a per-member offset file, so
    /// the clock nemesis can skew its clocks at runtime.
    pub faketime: Option<PathBuf>,
}

/// Where libfaketime is installed (Debian's `faketime` package), if it is.
pub fn find_libfaketime() -> Option<PathBuf> {
    [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/faketime/libfaketimeMT.so.1",
        "/usr/local/lib/faketime/libfaketimeMT.so.1",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

#[derive(Debug)]
pub struct Member {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    pub proxy_port: u16,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    /// libfaketime's offset file for this member (`+0`, `-7`, ...).
    pub clock_file: PathBuf,
    child: Option<Child>,
    paused: bool,
    pub restarts: u32,
    /// Joins an existing cluster on its first start (a member re-added by the nemesis).
    pub joining: bool,
    /// Removed from the cluster by the membership nemesis and not yet added back.
    pub removed: bool,
    /// How often the member was removed and re-added (names its data directory).
    pub generation: u32,
}

pub struct Cluster {
    pub opts: ClusterOpts,
    pub members: Vec<Mutex<Member>>,
    pub net: Arc<Net>,
    /// Member IDs (learned from Status) by index.
    ids: Mutex<Vec<u64>>,
}

/// Finds `count` consecutive free ports in 20000..32000 (below the ephemeral range).
fn free_ports(count: usize, seed: u64) -> anyhow::Result<u16> {
    let span = 12_000 - count as u64;
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(u64::from(std::process::id()).wrapping_mul(1442695040888963407));
    for _ in 0..200 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let base = 20_000 + ((x >> 33) % span) as u16;
        let base = base - base % 10;
        let all_free = (0..count as u16).all(|i| {
            TcpListener::bind((Ipv4Addr::LOCALHOST, base + i)).is_ok()
                && std::net::TcpStream::connect_timeout(
                    &(Ipv4Addr::LOCALHOST, base + i).into(),
                    Duration::from_millis(20),
                )
                .is_err()
        });
        if all_free {
            return Ok(base);
        }
    }
    anyhow::bail!("no free port range found in 20000..32000")
}

impl Cluster {
    /// Prepares the members and their proxies (does not start the processes).
    pub async fn new(opts: ClusterOpts) -> anyhow::Result<Arc<Cluster>> {
        let n = opts.nodes;
        let base = free_ports(3 * n, opts.seed)?;
        let net = Net::new(n);
        let mut members = Vec::new();
        for i in 0..n {
            let name = format!("n{}", i + 1);
            let dir = opts.dir.join("nodes").join(&name);
            std::fs::create_dir_all(&dir)?;
            let m = Member {
                client_port: base + i as u16,
                peer_port: base + (n + i) as u16,
                proxy_port: base + (2 * n + i) as u16,
                data_dir: dir.join("data"),
                log: dir.join("keel.log"),
                clock_file: dir.join("faketime.rc"),
                name,
                child: None,
                paused: false,
                restarts: 0,
                joining: false,
                removed: false,
                generation: 0,
            };
            if opts.faketime.is_some() {
                std::fs::write(&m.clock_file, "+0\n")?;
            }
            net.start_proxy(i, m.proxy_port, m.peer_port).await?;
            members.push(Mutex::new(m));
        }
        Ok(Arc::new(Cluster {
            opts,
            members,
            net,
            ids: Mutex::new(vec![0; n]),
        }))
    }

    pub fn n(&self) -> usize {
        self.members.len()
    }

    pub fn client_url(&self, i: usize) -> String {
        format!(
            "http://127.0.0.1:{}",
            self.members[i].lock().unwrap().client_port
        )
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| {
                let m = m.lock().unwrap();
                format!("{}=http://127.0.0.1:{}", m.name, m.proxy_port)
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts member `i` (first start or restart on its data directory).
    pub fn start(&self, i: usize) -> anyhow::Result<()> {
        let initial = self.initial_cluster();
        let mut m = self.members[i].lock().unwrap();
        if m.child.is_some() || m.removed {
            return Ok(());
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)?;
        let mut cmd = Command::new(&self.opts.keel_bin);
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data_dir)
            .arg("--listen-client-urls")
            .arg(format!("http://127.0.0.1:{}", m.client_port))
            .arg("--listen-peer-urls")
            .arg(format!("http://127.0.0.1:{}", m.peer_port))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://127.0.0.1:{}", m.proxy_port))
            .arg("--initial-cluster")
            .arg(&initial)
            .arg("--heartbeat-interval")
            .arg(self.opts.heartbeat_ms.to_string())
            .arg("--election-timeout")
            .arg(self.opts.election_ms.to_string())
            .arg("--snapshot-count")
            .arg(self.opts.snapshot_count.to_string())
            .arg("--experimental-snapshot-catchup-entries")
            .arg(self.opts.snapshot_catchup_entries.to_string())
            .args(&self.opts.extra_args);
        if self.opts.unsafe_local_reads {
            cmd.arg("--debug-unsafe-local-reads");
        }
        if m.joining {
            cmd.arg("--initial-cluster-state").arg("existing");
        }
        if let Some(lib) = &self.opts.faketime {
            // The offset file is re-read at most once a second (FAKETIME_NO_CACHE=1, with
            // $KEEL_JEPSEN_FAKETIME_NO_CACHE set, re-reads it on every clock_gettime).
            // CLOCK_MONOTONIC is faked too (libfaketime's default), so the skew reaches
            // the timers that Raft elections, heartbeats and lease deadlines run on.
            cmd.env("LD_PRELOAD", lib)
                .env("FAKETIME_TIMESTAMP_FILE", &m.clock_file);
            if std::env::var_os("KEEL_JEPSEN_FAKETIME_NO_CACHE").is_some() {
                cmd.env("FAKETIME_NO_CACHE", "1");
            } else {
                cmd.env("FAKETIME_CACHE_DURATION", "1");
            }
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .env_remove("KEEL_DEBUG_UNSAFE_LOCAL_READS");
        let child = cmd
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start {}: {e}", self.opts.keel_bin.display()))?;
        self.net.set_pid(i, Some(child.id()));
        m.child = Some(child);
        m.paused = false;
        Ok(())
    }

    pub fn start_all(&self) -> anyhow::Result<()> {
        for i in 0..self.n() {
            self.start(i)?;
        }
        Ok(())
    }

    /// Sets member `i`'s clock offset in whole seconds (libfaketime's `+7` / `-3`).
    pub fn set_clock(&self, i: usize, offset_s: f64) -> std::io::Result<()> {
        let path = self.members[i].lock().unwrap().clock_file.clone();
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, format!("{:+}\n", offset_s.round() as i64))?;
        std::fs::rename(&tmp, &path)
    }

    /// The peer URL member `i` advertises (its proxy).
    pub fn peer_url(&self, i: usize) -> String {
        format!(
            "http://127.0.0.1:{}",
            self.members[i].lock().unwrap().proxy_port
        )
    }

    /// The member ID of `i` (from its Status; cached).
    pub async fn member_id(&self, i: usize) -> Option<u64> {
        if let Some((id, ..)) = self.status(i, Duration::from_millis(1000)).await {
            return Some(id);
        }
        let id = self.ids.lock().unwrap()[i];
        (id != 0).then_some(id)
    }

    /// After member `i` was removed from the cluster: kill it and forget its data; it stays
    /// down (restarts are refused) until [`Cluster::prepare_rejoin`].
    pub fn retire(&self, i: usize) {
        self.kill(i);
        let mut m = self.members[i].lock().unwrap();
        m.removed = true;
        let _ = std::fs::remove_dir_all(&m.data_dir);
        self.ids.lock().unwrap()[i] = 0;
    }

    /// Gives a removed member a new peer URL (a new proxy listener) and an empty data
    /// directory, to be started with `--initial-cluster-state existing`; returns its new URL.
    pub async fn prepare_rejoin(&self, i: usize) -> anyhow::Result<String> {
        let peer_port = self.members[i].lock().unwrap().peer_port;
        let port = self.net.start_proxy_any(i, peer_port).await?;
        let mut m = self.members[i].lock().unwrap();
        m.generation += 1;
        m.proxy_port = port;
        m.data_dir = m.data_dir.with_file_name(format!("data-g{}", m.generation));
        m.joining = true;
        Ok(format!("http://127.0.0.1:{port}"))
    }

    /// Marks a prepared member as part of the cluster again (restarts allowed).
    pub fn rejoined(&self, i: usize) {
        self.members[i].lock().unwrap().removed = false;
    }

    pub fn is_removed(&self, i: usize) -> bool {
        self.members[i].lock().unwrap().removed
    }

    /// kill -9 member `i` and reap it.
    pub fn kill(&self, i: usize) {
        let mut m = self.members[i].lock().unwrap();
        if let Some(mut child) = m.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            m.restarts += 1;
        }
        m.paused = false;
        self.net.set_pid(i, None);
    }

    fn signal(&self, i: usize, sig: libc::c_int) -> bool {
        let m = self.members[i].lock().unwrap();
        match &m.child {
            // SAFETY: kill(2) on a child we spawned and have not reaped.
            Some(c) => unsafe { libc::kill(c.id() as libc::pid_t, sig) == 0 },
            None => false,
        }
    }

    pub fn pause(&self, i: usize) {
        if self.signal(i, libc::SIGSTOP) {
            self.members[i].lock().unwrap().paused = true;
        }
    }

    pub fn resume(&self, i: usize) {
        if self.signal(i, libc::SIGCONT) {
            self.members[i].lock().unwrap().paused = false;
        }
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.members[i].lock().unwrap().child.is_some()
    }

    /// Members that exited on their own (crashed) since the last call, with their status.
    pub fn reap_crashed(&self) -> Vec<(usize, String)> {
        let mut out = Vec::new();
        for (i, m) in self.members.iter().enumerate() {
            let mut m = m.lock().unwrap();
            if let Some(child) = m.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
                && !m.removed
            {
                out.push((i, status.to_string()));
                m.child = None;
                self.net.set_pid(i, None);
            }
        }
        out
    }

    /// SIGTERM to member `i`, then waits for it to exit; SIGKILL once `grace` has passed.
    /// Returns how long the graceful exit took, `None` if it had to be killed (or was not
    /// running). Blocks the calling thread.
    pub fn stop_gracefully(&self, i: usize, grace: Duration) -> Option<Duration> {
        self.resume(i);
        let mut m = self.members[i].lock().unwrap();
        let mut child = m.child.take()?;
        m.restarts += 1;
        let t0 = std::time::Instant::now();
        // SAFETY: kill(2) on a child we spawned and have not reaped.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let took = loop {
            if let Ok(Some(_)) = child.try_wait() {
                break Some(t0.elapsed());
            }
            if t0.elapsed() > grace {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        drop(m);
        self.net.set_pid(i, None);
        took
    }

    /// Stops everything: resume paused members, stop all (SIGTERM, then SIGKILL after 3 s),
    /// stop the proxies.
    pub fn stop_all(&self) {
        for i in 0..self.n() {
            self.stop_gracefully(i, Duration::from_secs(3));
        }
        self.net.shutdown();
    }

    /// One member's view: (its member ID, the leader it knows, raft term, applied index).
    pub async fn status(&self, i: usize, timeout: Duration) -> Option<(u64, u64, u64, u64)> {
        let url = self.client_url(i);
        let fut = async {
            let ch = Endpoint::from_shared(url)
                .ok()?
                .connect_timeout(timeout)
                .connect()
                .await
                .ok()?;
            let r = MaintenanceClient::new(ch)
                .status(StatusRequest {})
                .await
                .ok()?
                .into_inner();
            let id = r.header.map(|h| h.member_id).unwrap_or(0);
            Some((id, r.leader, r.raft_term, r.raft_applied_index))
        };
        let r = tokio::time::timeout(timeout, fut).await.ok().flatten()?;
        if r.0 != 0 {
            self.ids.lock().unwrap()[i] = r.0;
        }
        Some(r)
    }

    /// The index of the member most members (of those answering) call leader.
    pub async fn leader(&self) -> Option<usize> {
        let mut votes: Vec<(u64, u64)> = Vec::new(); // (term, leader id)
        let futs: Vec<_> = (0..self.n())
            .map(|i| self.status(i, Duration::from_millis(400)))
            .collect();
        for s in futures::future::join_all(futs).await.into_iter().flatten() {
            if s.1 != 0 {
                votes.push((s.2, s.1));
            }
        }
        // Highest term wins; ties by count.
        votes.sort();
        let (_, leader_id) = *votes.last()?;
        let ids = self.ids.lock().unwrap();
        ids.iter().position(|id| *id == leader_id)
    }

    /// Waits until every member answers Status and all agree on one leader.
    pub async fn wait_healthy(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            let futs: Vec<_> = (0..self.n())
                .map(|i| self.status(i, Duration::from_millis(500)))
                .collect();
            let all: Vec<_> = futures::future::join_all(futs).await;
            if all.iter().all(|s| s.is_some()) {
                let leaders: std::collections::BTreeSet<u64> =
                    all.iter().map(|s| s.unwrap().1).collect();
                if leaders.len() == 1 && !leaders.contains(&0) {
                    return true;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        false
    }

    /// Removes the data directories (kept only for failed runs).
    pub fn remove_data(&self) {
        for m in &self.members {
            let m = m.lock().unwrap();
            let _ = std::fs::remove_dir_all(&m.data_dir);
        }
    }

    pub fn log_paths(&self) -> Vec<PathBuf> {
        self.members
            .iter()
            .map(|m| m.lock().unwrap().log.clone())
            .collect()
    }
}

/// Scans member logs for panics and fatal errors.
pub fn scan_logs(paths: &[PathBuf]) -> Vec<String> {
    let mut found = Vec::new();
    for p in paths {
        let Ok(text) = std::fs::read_to_string(p) else {
            continue;
        };
        for line in text.lines() {
            if line.contains("panicked at") || line.contains("FATAL") || line.contains(" fatal ") {
                found.push(format!("{}: {}", short(p), line.trim()));
                if found.len() > 20 {
                    return found;
                }
            }
        }
    }
    found
}

fn short(p: &Path) -> String {
    p.parent()
        .and_then(|d| d.file_name())
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| p.display().to_string())
}
