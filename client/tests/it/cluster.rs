//! Real `keel` member processes for the client's tests (the client crate does not depend on
//! the server: the binary comes from `KEEL_BIN`, or `keel` beside this test's target directory;
//! build it first with `cargo build --release -p keel-server`).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keel_client::{Client, ConnectOptions};

pub fn keel_bin() -> PathBuf {
    if let Ok(p) = std::env::var("KEEL_BIN") {
        return PathBuf::from(p);
    }
    let mut candidates = Vec::new();
    if let Ok(dir) = std::env::var("CARGO_TARGET_DIR") {
        candidates.push(PathBuf::from(dir).join("release/keel"));
    }
    // target/release/deps/it-<hash> -> target/release/keel
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent().and_then(|d| d.parent())
    {
        candidates.push(dir.join("keel"));
    }
    candidates.push(PathBuf::from("/var/tmp/keel-target/release/keel"));
    for c in &candidates {
        if c.exists() {
            return c.clone();
        }
    }
    panic!(
        "keel binary not found (looked at {candidates:?}): run `cargo build --release -p keel-server` \
         first or set KEEL_BIN"
    );
}

/// A free port in 20000-32000 (below Linux's ephemeral range, so a restarted member's port
/// cannot have been taken by an outgoing connection).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Another range than the server's tests use for the same pid.
    let base = (std::process::id() * 13 + 5000) % 12_000;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + ((base + n * 11) % 12_000) as u16;
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
}

impl Member {
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} already running", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data_dir.with_extension("log"))
            .expect("open member log");
        let child = Command::new(keel_bin())
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
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn keel");
        self.child = Some(child);
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
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
            })
            .collect();
        for m in &mut members {
            m.start();
        }
        let cluster = Cluster { members, _dir: dir };
        cluster.wait_ready(Duration::from_secs(30)).await;
        cluster
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.endpoint()).collect()
    }

    /// A client of every member, with short timeouts so failover is quick in tests.
    pub async fn client(&self) -> Client {
        Client::connect(self.endpoints(), opts())
            .await
            .expect("connect")
    }

    /// Waits until every running member serves a linearizable read.
    pub async fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for m in self.members.iter().filter(|m| m.child.is_some()) {
            let c = Client::connect([m.endpoint()], opts())
                .await
                .expect("connect");
            loop {
                if c.get("ready-probe").await.is_ok() {
                    break;
                }
                if Instant::now() > deadline {
                    panic!("member {} not ready; log:\n{}", m.name, m.log());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// Index of the member that leads.
    pub async fn leader(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            for (i, m) in self
                .members
                .iter()
                .enumerate()
                .filter(|(_, m)| m.child.is_some())
            {
                let c = Client::connect([m.endpoint()], opts())
                    .await
                    .expect("connect");
                if let Ok(s) = c.status().await
                    && s.leader != 0
                    && s.leader == s.header.member_id
                {
                    return i;
                }
            }
            assert!(Instant::now() < deadline, "no leader elected");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Index of the member whose client port is `port`.
    pub fn member_by_url(&self, url: &str) -> usize {
        self.members
            .iter()
            .position(|m| url.ends_with(&format!(":{}", m.client_port)))
            .expect("member of this cluster")
    }
}

pub fn opts() -> ConnectOptions {
    ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(1))
        .with_request_timeout(Duration::from_secs(5))
        .with_keep_alive(Some((Duration::from_secs(1), Duration::from_secs(2))))
        .with_unhealthy_for(Duration::from_millis(500))
}

/// Polls `f` until it returns true, or panics with `what` after `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Writes `key`, trying again while the outcome is ambiguous or the cluster unavailable (safe
/// for tests that write distinct values and check them afterwards).
pub async fn put_retry(c: &Client, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> i64 {
    let (key, value) = (key.into(), value.into());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match c.put(key.clone(), value.clone()).await {
            Ok(r) => return r.header.revision,
            Err(e) if e.is_transient() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("put: {e:?}"),
        }
    }
}

/// Runs an idempotent operation until it succeeds, while it fails transiently (a member was
/// just killed and the cluster elects a new leader).
pub async fn retry<T, F, Fut>(mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = keel_client::Result<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) if e.is_transient() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("{e:?}"),
        }
    }
}
