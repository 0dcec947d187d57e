//! Starting and stopping real `keel` member processes for tests.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions};

/// A free port below Linux's ephemeral range (32768+). A member listening on an ephemeral port
/// can find it taken after a restart: a peer's reconnect attempt to a dead port may pick that
/// same port as its source and connect to itself (TCP simultaneous open).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = std::process::id() % 4000;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + ((base + n * 7) % 12_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

pub struct Member {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    pub data_dir: PathBuf,
    pub child: Option<Child>,
    pub initial_cluster: String,
    pub extra: Vec<String>,
}

impl Member {
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// One series of this member's `/metrics` (0 when it is not there).
    pub fn metric(&self, series: &str) -> f64 {
        self.metric_value(series).unwrap_or(0.0)
    }

    /// One series of this member's `/metrics`, `None` when it is not there.
    pub fn metric_value(&self, series: &str) -> Option<f64> {
        let body = crate::maintenance::http(self.client_port, "GET", "/metrics").1;
        crate::maintenance::metric(&body, series)
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} already running", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data_dir.with_extension("log"))
            .expect("open member log");
        let child = Command::new(env!("CARGO_BIN_EXE_keel"))
            .args(["--name", &self.name])
            .args(["--data-dir", self.data_dir.to_str().expect("utf-8 path")])
            .args([
                "--listen-client-urls",
                &format!("http://127.0.0.1:{}", self.client_port),
            ])
            .args([
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{}", self.peer_port),
            ])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn keel");
        self.child = Some(child);
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args([&format!("-{sig}"), &c.id().to_string()])
                .status();
        }
    }

    /// Waits (at most `timeout`) until the process exits and returns its exit status.
    pub async fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut().expect("running");
            if let Some(status) = child.try_wait().expect("wait") {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {timeout:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.with_extension("log")).unwrap_or_default()
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Cluster {
    pub members: Vec<Member>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    pub async fn start(n: usize) -> Cluster {
        Self::start_with(n, &[]).await
    }

    pub async fn start_with(n: usize, extra: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let initial_cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, p))| format!("m{i}=http://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members: Vec<Member> = ports
            .iter()
            .enumerate()
            .map(|(i, (c, p))| Member {
                name: format!("m{i}"),
                client_port: *c,
                peer_port: *p,
                data_dir: dir.path().join(format!("m{i}")),
                child: None,
                initial_cluster: initial_cluster.clone(),
                extra: extra.iter().map(|s| s.to_string()).collect(),
            })
            .collect();
        for m in &mut members {
            m.start();
        }
        let cluster = Cluster { members, _dir: dir };
        cluster.wait_ready(Duration::from_secs(30)).await;
        cluster
    }

    /// A cluster of members started by the caller, owning `dir` (their data).
    pub async fn adopt(members: Vec<Member>, dir: tempfile::TempDir) -> Cluster {
        let cluster = Cluster { members, _dir: dir };
        cluster.wait_ready(Duration::from_secs(30)).await;
        cluster
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.endpoint()).collect()
    }

    /// Waits until every running member answers a linearizable read.
    pub async fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for m in self.members.iter().filter(|m| m.child.is_some()) {
            loop {
                if let Ok(mut c) = client(&m.endpoint()).await
                    && c.get("ready-probe", None).await.is_ok()
                {
                    break;
                }
                if Instant::now() > deadline {
                    panic!("member {} not ready; log:\n{}", m.name, m.log());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// Kills member `i` with SIGKILL (only what was fsynced survives), starts it again on the
    /// same data directory and waits until every running member serves reads.
    pub async fn kill_and_restart(&mut self, i: usize) {
        self.members[i].kill();
        self.members[i].start();
        self.wait_ready(Duration::from_secs(30)).await;
    }

    /// Index of the member every running member agrees is leader.
    pub async fn leader(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            for (i, m) in self
                .members
                .iter()
                .enumerate()
                .filter(|(_, m)| m.child.is_some())
            {
                if let Ok(mut c) = client(&m.endpoint()).await
                    && let Ok(s) = c.status().await
                {
                    let me = s.header().map(|h| h.member_id()).unwrap_or(0);
                    if s.leader() != 0 && s.leader() == me {
                        return i;
                    }
                }
            }
            assert!(Instant::now() < deadline, "no leader elected");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The store's current revision, as a linearizable read of any key reports it.
pub async fn current_revision(c: &mut Client) -> i64 {
    let got = c.get("revision-probe", None).await.unwrap();
    got.header().map(|h| h.revision()).unwrap_or(0)
}

pub async fn client(endpoint: &str) -> Result<Client, etcd_client::Error> {
    let opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(10));
    Client::connect([endpoint], Some(opts)).await
}

/// The gRPC status message of a failed call.
pub fn status_message(e: &etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(s) => s.message().to_string(),
        other => other.to_string(),
    }
}

pub fn status_code(e: &etcd_client::Error) -> Option<tonic::Code> {
    match e {
        etcd_client::Error::GRpcStatus(s) => Some(s.code()),
        _ => None,
    }
}

/// Runs real `etcdctl` (v3 API; Debian's etcd-client, installed by scripts/test.sh) against
/// `endpoints` with `flags` (TLS files, timeouts) and then `args`. Returns whether it succeeded,
/// and its stdout followed by its stderr without etcdctl's JSON log lines.
pub fn etcdctl_with(endpoints: &[String], flags: &[String], args: &[&str]) -> (bool, String) {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", endpoints.join(",")))
        .args(flags)
        .args(args)
        .output()
        .expect("etcdctl is installed by scripts/test.sh (Debian package etcd-client)");
    let stderr: String = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.starts_with('{'))
        .map(|l| format!("{l}\n"))
        .collect();
    (
        out.status.success(),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr),
    )
}
