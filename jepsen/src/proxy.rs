//! A controllable userspace TCP proxy in front of every member's peer (Raft) listener.
//!
//! Each member advertises its proxy's port as its peer URL, so every Raft message, forwarded
//! request and ReadIndex call between members crosses a proxy. The proxy in front of member `d`
//! learns which member opened a connection by looking the connecting socket up in
//! `/proc/net/tcp` and finding the `keel` process that owns it (`/proc/<pid>/fd`); that makes
//! every directed link `s -> d` controllable although all members share 127.0.0.1 and the
//! membership (which must be byte-identical on every founding member) names one URL per member.
//!
//! Faults: a *cut* link (either direction of the pair) blackholes its connections: bytes stop
//! flowing but the sockets stay open, as with a firewall DROP, so the peers see timeouts rather
//! than resets; new connections are accepted and held silent. When the link heals the held
//! connections are closed so the members reconnect. *Latency* delays every chunk on every link
//! by `delay ± jitter` (order preserved).

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Shared link state of the whole cluster network.
pub struct Net {
    n: usize,
    cuts: Mutex<BTreeSet<(usize, usize)>>,
    delay_us: AtomicU64,
    jitter_us: AtomicU64,
    changed: watch::Sender<u64>,
    pids: Mutex<Vec<Option<u32>>>,
    accept_tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Connections whose source could not be identified (reported in the results).
    pub unidentified: AtomicU64,
    pub connections: AtomicU64,
}

fn norm(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

impl Net {
    pub fn new(n: usize) -> Arc<Net> {
        Arc::new(Net {
            n,
            cuts: Mutex::new(BTreeSet::new()),
            delay_us: AtomicU64::new(0),
            jitter_us: AtomicU64::new(0),
            changed: watch::channel(0).0,
            pids: Mutex::new(vec![None; n]),
            accept_tasks: Mutex::new(Vec::new()),
            unidentified: AtomicU64::new(0),
            connections: AtomicU64::new(0),
        })
    }

    pub fn set_pid(&self, node: usize, pid: Option<u32>) {
        self.pids.lock().unwrap()[node] = pid;
    }

    fn bump(&self) {
        self.changed.send_modify(|g| *g += 1);
    }

    /// Cuts exactly these (undirected) links; every other link is healed.
    pub fn set_cuts(&self, links: &[(usize, usize)]) {
        *self.cuts.lock().unwrap() = links.iter().map(|&(a, b)| norm(a, b)).collect();
        self.bump();
    }

    /// Cuts every link between members of different components.
    pub fn partition(&self, components: &[Vec<usize>]) {
        let mut links = Vec::new();
        for a in 0..self.n {
            for b in a + 1..self.n {
                let ca = components.iter().position(|c| c.contains(&a));
                let cb = components.iter().position(|c| c.contains(&b));
                if ca != cb {
                    links.push((a, b));
                }
            }
        }
        self.set_cuts(&links);
    }

    pub fn heal(&self) {
        self.set_cuts(&[]);
    }

    pub fn cut_links(&self) -> Vec<(usize, usize)> {
        self.cuts.lock().unwrap().iter().copied().collect()
    }

    pub fn set_latency(&self, delay: Duration, jitter: Duration) {
        self.delay_us
            .store(delay.as_micros() as u64, Ordering::Relaxed);
        self.jitter_us
            .store(jitter.as_micros() as u64, Ordering::Relaxed);
    }

    fn is_cut(&self, src: Option<usize>, dst: usize) -> bool {
        match src {
            Some(s) => self.cuts.lock().unwrap().contains(&norm(s, dst)),
            None => false,
        }
    }

    fn delay(&self) -> Duration {
        let d = self.delay_us.load(Ordering::Relaxed);
        if d == 0 {
            return Duration::ZERO;
        }
        let j = self.jitter_us.load(Ordering::Relaxed) as i64;
        let off = if j > 0 {
            rand::rng().random_range(-j..=j)
        } else {
            0
        };
        Duration::from_micros((d as i64 + off).max(0) as u64)
    }

    /// Starts the proxy in front of member `dst`: listens on `listen`, forwards to `target`.
    pub async fn start_proxy(
        self: &Arc<Self>,
        dst: usize,
        listen: u16,
        target: u16,
    ) -> std::io::Result<()> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, listen)).await?;
        self.serve_listener(dst, listener, target);
        Ok(())
    }

    /// Another proxy in front of member `dst` on a port the system picks (a re-added member
    /// needs a new peer URL); returns the port.
    pub async fn start_proxy_any(
        self: &Arc<Self>,
        dst: usize,
        target: u16,
    ) -> std::io::Result<u16> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let port = listener.local_addr()?.port();
        self.serve_listener(dst, listener, target);
        Ok(port)
    }

    fn serve_listener(self: &Arc<Self>, dst: usize, listener: TcpListener, target: u16) {
        let net = self.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, peer)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let net = net.clone();
                tokio::spawn(async move {
                    net.connections.fetch_add(1, Ordering::Relaxed);
                    let _ = net.serve(dst, sock, peer, target).await;
                });
            }
        });
        self.accept_tasks.lock().unwrap().push(task);
    }

    /// Stops accepting (existing connections end when the members die).
    pub fn shutdown(&self) {
        for t in self.accept_tasks.lock().unwrap().drain(..) {
            t.abort();
        }
        self.set_cuts(&[]);
    }

    async fn identify(&self, sock: &TcpStream, peer: SocketAddr) -> Option<usize> {
        let local = sock.local_addr().ok()?;
        for attempt in 0..5 {
            if let Some(inode) = socket_inode(peer, local) {
                let pids = self.pids.lock().unwrap().clone();
                for (node, pid) in pids.iter().enumerate() {
                    if let Some(pid) = pid
                        && process_has_socket(*pid, inode)
                    {
                        return Some(node);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(5 * (attempt + 1))).await;
        }
        self.unidentified.fetch_add(1, Ordering::Relaxed);
        None
    }

    async fn wait_until(&self, src: Option<usize>, dst: usize, cut: bool) {
        let mut rx = self.changed.subscribe();
        loop {
            if self.is_cut(src, dst) == cut {
                return;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    async fn serve(
        self: Arc<Self>,
        dst: usize,
        client: TcpStream,
        peer: SocketAddr,
        target: u16,
    ) -> std::io::Result<()> {
        let src = self.identify(&client, peer).await;
        if self.is_cut(src, dst) {
            // Blackhole: hold the connection silently until the link heals, then drop it.
            self.wait_until(src, dst, false).await;
            return Ok(());
        }
        let server = TcpStream::connect((Ipv4Addr::LOCALHOST, target)).await?;
        client.set_nodelay(true)?;
        server.set_nodelay(true)?;
        // The halves live here, not in the pumps: dropping a pump must not close the sockets.
        let (mut cr, mut cw) = client.into_split();
        let (mut sr, mut sw) = server.into_split();
        let up = pump(&mut cr, &mut sw, self.clone());
        let down = pump(&mut sr, &mut cw, self.clone());
        tokio::select! {
            _ = up => {}
            _ = down => {}
            _ = self.wait_until(src, dst, true) => {
                // Cut while open: stop forwarding but keep the sockets until the link heals.
                self.wait_until(src, dst, false).await;
            }
        }
        Ok(())
    }
}

async fn pump(
    r: &mut tokio::net::tcp::OwnedReadHalf,
    w: &mut tokio::net::tcp::OwnedWriteHalf,
    net: Arc<Net>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let at = Instant::now() + net.delay();
                    if tx.send((at, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
    };
    let writer = async move {
        let mut last = Instant::now();
        while let Some((at, data)) = rx.recv().await {
            let at = at.max(last);
            last = at;
            if at > Instant::now() {
                tokio::time::sleep_until(at).await;
            }
            if w.write_all(&data).await.is_err() {
                break;
            }
        }
        let _ = w.shutdown().await;
    };
    tokio::join!(reader, writer);
}

fn parse_addr(hex: &str) -> Option<SocketAddr> {
    let (ip, port) = hex.split_once(':')?;
    if ip.len() != 8 {
        return None;
    }
    let ip = u32::from_str_radix(ip, 16).ok()?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let b = ip.to_le_bytes();
    Some(SocketAddr::from((
        Ipv4Addr::new(b[0], b[1], b[2], b[3]),
        port,
    )))
}

/// The inode of the socket whose local address is `local` and remote address is `remote`.
fn socket_inode(local: SocketAddr, remote: SocketAddr) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/tcp").ok()?;
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 {
            continue;
        }
        if parse_addr(f[1]) == Some(local) && parse_addr(f[2]) == Some(remote) {
            return f[9].parse().ok().filter(|i| *i != 0);
        }
    }
    None
}

fn process_has_socket(pid: u32, inode: u64) -> bool {
    let want = format!("socket:[{inode}]");
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    dir.flatten().any(|e| {
        std::fs::read_link(e.path())
            .map(|l| l.as_os_str() == want.as_str())
            .unwrap_or(false)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_tcp_addresses() {
        assert_eq!(
            parse_addr("0100007F:1F90"),
            Some("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(parse_addr("zz"), None);
    }

    #[tokio::test]
    async fn identifies_own_process_and_blackholes_cut_links() {
        // A backend echo server.
        let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend_port = backend.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = backend.accept().await {
                tokio::spawn(async move {
                    let mut b = [0u8; 64];
                    while let Ok(n) = s.read(&mut b).await {
                        if n == 0 || s.write_all(&b[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let probe = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = probe.local_addr().unwrap().port();
        drop(probe);
        let net = Net::new(2);
        net.set_pid(0, Some(std::process::id()));
        net.start_proxy(1, port, backend_port).await.unwrap();
        let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        c.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        c.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"ping");
        assert_eq!(net.unidentified.load(Ordering::Relaxed), 0);
        // Cut 0-1: no more bytes flow.
        net.set_cuts(&[(0, 1)]);
        tokio::time::sleep(Duration::from_millis(50)).await;
        c.write_all(b"pong").await.unwrap();
        let r = tokio::time::timeout(Duration::from_millis(300), c.read(&mut b)).await;
        assert!(r.is_err(), "bytes crossed a cut link");
        // Heal: the held connection is closed; a new one works.
        net.heal();
        let r = tokio::time::timeout(Duration::from_secs(2), c.read(&mut b)).await;
        assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))));
        let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        c.write_all(b"abcd").await.unwrap();
        c.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"abcd");
        net.shutdown();
    }
}
