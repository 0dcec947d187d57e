//! TLS: a 3-member cluster whose client and peer URLs are all https://, with mutual TLS on
//! both, driven with `etcdctl --cacert --cert --key`; certificates made here with rcgen.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};

use crate::cluster::{Member, free_port};

struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_str().unwrap().to_string()
    }
}

/// A CA, a server/peer certificate for 127.0.0.1, a client certificate for `alice`, and a
/// client certificate from another CA.
fn make_pki(dir: &Path) -> Pki {
    let write = |name: &str, text: String| std::fs::write(dir.join(name), text).unwrap();
    let ca = |cn: &str| {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        (cert, key)
    };
    let (ca_cert, ca_key) = ca("keel-test-ca");
    write("ca.pem", ca_cert.pem());
    let leaf = |name: &str,
                cn: &str,
                sans: Vec<String>,
                usages,
                signer: (&rcgen::Certificate, &KeyPair)| {
        let mut p = CertificateParams::new(sans).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = usages;
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, signer.0, signer.1).unwrap();
        write(&format!("{name}.pem"), cert.pem());
        write(&format!("{name}.key"), key.serialize_pem());
    };
    leaf(
        "server",
        "keel",
        vec!["127.0.0.1".into(), "localhost".into()],
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        (&ca_cert, &ca_key),
    );
    leaf(
        "alice",
        "alice",
        vec![],
        vec![ExtendedKeyUsagePurpose::ClientAuth],
        (&ca_cert, &ca_key),
    );
    let (other_cert, other_key) = ca("someone-else");
    leaf(
        "stranger",
        "root",
        vec![],
        vec![ExtendedKeyUsagePurpose::ClientAuth],
        (&other_cert, &other_key),
    );
    Pki {
        dir: dir.to_path_buf(),
    }
}

fn etcdctl(pki: &Pki, endpoints: &[String], cert: Option<&str>, args: &[&str]) -> (bool, String) {
    let mut flags = vec![
        "--dial-timeout=3s".to_string(),
        "--command-timeout=5s".to_string(),
        format!("--cacert={}", pki.path("ca.pem")),
    ];
    if let Some(c) = cert {
        flags.push(format!("--cert={}", pki.path(&format!("{c}.pem"))));
        flags.push(format!("--key={}", pki.path(&format!("{c}.key"))));
    }
    crate::cluster::etcdctl_with(endpoints, &flags, args)
}

#[tokio::test]
async fn mutual_tls_cluster_with_etcdctl() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
    let initial = ports
        .iter()
        .enumerate()
        .map(|(i, (_, p))| format!("t{i}=https://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut members: Vec<Member> = Vec::new();
    for (i, (c, p)) in ports.iter().enumerate() {
        let data_dir = dir.path().join(format!("t{i}"));
        let log = std::fs::File::create(data_dir.with_extension("log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_keel"))
            .args(["--name", &format!("t{i}")])
            .args(["--data-dir", data_dir.to_str().unwrap()])
            .args(["--listen-client-urls", &format!("https://127.0.0.1:{c}")])
            .args(["--listen-peer-urls", &format!("https://127.0.0.1:{p}")])
            .args(["--initial-cluster", &initial])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--cert-file", &pki.path("server.pem")])
            .args(["--key-file", &pki.path("server.key")])
            .args(["--trusted-ca-file", &pki.path("ca.pem")])
            .arg("--client-cert-auth")
            .args(["--peer-cert-file", &pki.path("server.pem")])
            .args(["--peer-key-file", &pki.path("server.key")])
            .args(["--peer-trusted-ca-file", &pki.path("ca.pem")])
            .arg("--peer-client-cert-auth")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn keel");
        members.push(Member {
            name: format!("t{i}"),
            client_port: *c,
            peer_port: *p,
            data_dir,
            child: Some(child),
            initial_cluster: initial.clone(),
            extra: Vec::new(),
        });
    }
    let eps: Vec<String> = members
        .iter()
        .map(|m| format!("https://127.0.0.1:{}", m.client_port))
        .collect();

    // The members find each other over peer TLS and elect a leader.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let (ok, out) = etcdctl(
            &pki,
            &eps[..1],
            Some("alice"),
            &["put", "greeting", "hello"],
        );
        if ok {
            assert_eq!(out, "OK\n");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no TLS cluster: {out}\n{}",
            members[0].log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for ep in &eps {
        let (ok, out) = etcdctl(
            &pki,
            std::slice::from_ref(ep),
            Some("alice"),
            &["get", "greeting", "--print-value-only"],
        );
        assert!(ok && out == "hello\n", "{ep}: {out}");
    }
    // Each member publishes its client URLs once it runs (one membership change at a time, so
    // the three publishes may take a few rounds): wait for all six URLs.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, out) = etcdctl(&pki, &eps, Some("alice"), &["member", "list"]);
        if ok && out.matches("https://127.0.0.1:").count() == 6 {
            break;
        }
        assert!(Instant::now() < deadline, "{out}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Without a client certificate, or with one from another CA: refused.
    let (ok, out) = etcdctl(&pki, &eps[..1], None, &["get", "greeting"]);
    assert!(!ok, "{out}");
    let (ok, out) = etcdctl(&pki, &eps[..1], Some("stranger"), &["get", "greeting"]);
    assert!(!ok, "{out}");
    // Plain text to a TLS port fails cleanly, and the member keeps serving.
    let plain = format!("http://127.0.0.1:{}", members[0].client_port);
    let (ok, out) = etcdctl(&pki, &[plain], None, &["get", "greeting"]);
    assert!(!ok, "{out}");
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", members[0].client_port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0");
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap_or(0);
        assert!(
            !buf[..n].starts_with(b"\0\0"),
            "no HTTP/2 answer in plain text"
        );
    }
    let (ok, _) = etcdctl(&pki, &eps[..1], Some("alice"), &["get", "greeting"]);
    assert!(ok, "the member still serves TLS clients");

    // With auth on, the certificate's common name is the user when no token is sent.
    let (ok, out) = etcdctl(&pki, &eps[..1], Some("alice"), &["user", "add", "root:pw"]);
    assert!(ok, "{out}");
    for args in [
        &["user", "add", "alice:pw"][..],
        &["role", "add", "reader"],
        &["role", "grant-permission", "reader", "read", "greeting"],
        &["user", "grant-role", "alice", "reader"],
        &["auth", "enable"],
    ] {
        let (ok, out) = etcdctl(&pki, &eps[..1], Some("alice"), args);
        assert!(ok, "{args:?}: {out}");
    }
    let (ok, out) = etcdctl(
        &pki,
        &eps[1..2],
        Some("alice"),
        &["get", "greeting", "--print-value-only"],
    );
    assert!(ok && out == "hello\n", "{out}");
    let (ok, out) = etcdctl(&pki, &eps[1..2], Some("alice"), &["put", "greeting", "x"]);
    assert!(
        !ok && out.contains("etcdserver: permission denied"),
        "{out}"
    );
    let (ok, out) = etcdctl(
        &pki,
        &eps[1..2],
        Some("alice"),
        &["put", "greeting", "x", "--user", "root:pw"],
    );
    assert!(ok, "a token wins over the certificate: {out}");
}

/// `--listen-metrics-urls https://...` serves the probes and `/metrics` over TLS with the client
/// certificate (as etcd's metrics listener does), and a member asked for an https:// URL without
/// a certificate refuses to start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_metrics_listener() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let port = free_port();
    let url = format!("https://127.0.0.1:{port}");
    let cluster = crate::cluster::Cluster::start_with(
        1,
        &[
            "--listen-metrics-urls",
            &url,
            "--cert-file",
            &pki.path("server.pem"),
            "--key-file",
            &pki.path("server.key"),
        ],
    )
    .await;
    let curl = |path: &str| {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "10", "--cacert", &pki.path("ca.pem")])
            .arg(format!("{url}{path}"))
            .output()
            .expect("curl is installed by scripts/test.sh");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    assert_eq!(curl("/readyz"), (true, "ok\n".to_string()));
    let (ok, metrics) = curl("/metrics");
    assert!(
        ok && metrics.contains("etcd_server_has_leader 1"),
        "{metrics}"
    );
    // Plain HTTP to the TLS port is not answered with metrics (the server may also reset
    // the connection before the request is written: that is no answer either).
    let plain = match crate::maintenance::try_http(port, "GET", "/metrics") {
        Ok((_, body)) => body,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            panic!("the metrics port is not listening: {e}")
        }
        Err(_) => String::new(),
    };
    assert!(!plain.contains("etcd_server_has_leader"), "{plain}");
    drop(cluster);

    let data_dir = dir.path().join("no-cert");
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["--data-dir", data_dir.to_str().unwrap()])
        .args([
            "--listen-client-urls",
            &format!("http://127.0.0.1:{}", free_port()),
        ])
        .args([
            "--listen-peer-urls",
            &format!("http://127.0.0.1:{}", free_port()),
        ])
        .args([
            "--listen-metrics-urls",
            &format!("https://127.0.0.1:{}", free_port()),
        ])
        .output()
        .expect("run keel");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("https:// URLs need a certificate and a key"),
        "{err}"
    );
}
