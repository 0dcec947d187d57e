//! Real `etcdctl` (Debian's etcd-client) against a 3-node Keel cluster, and graceful shutdown.

use std::process::Command;
use std::time::Duration;

use crate::cluster::Cluster;

fn etcdctl(endpoints: &[String], args: &[&str]) -> (bool, String) {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", endpoints.join(",")))
        .args(args)
        .output()
        .expect("etcdctl is installed by scripts/test.sh (Debian package etcd-client)");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test]
async fn etcdctl_against_a_three_node_cluster() {
    let mut cluster = Cluster::start(3).await;
    let all = cluster.endpoints();
    let leader = cluster.leader().await;
    let follower_only = vec![cluster.members[(leader + 1) % 3].endpoint()];

    assert_eq!(
        etcdctl(&follower_only, &["put", "greeting", "hello"]),
        (true, "OK\n".to_string())
    );
    let (ok, out) = etcdctl(&all, &["get", "greeting"]);
    assert!(ok && out == "greeting\nhello\n", "{out}");
    let (ok, out) = etcdctl(
        &follower_only,
        &["get", "greeting", "--consistency=s", "--print-value-only"],
    );
    assert!(ok && out == "hello\n", "{out}");
    let (ok, out) = etcdctl(&all, &["member", "list"]);
    assert!(ok && out.lines().count() == 3, "{out}");
    let (ok, out) = etcdctl(&all, &["endpoint", "status"]);
    assert!(
        ok && out.lines().filter(|l| l.contains("true")).count() == 1,
        "exactly one leader: {out}"
    );
    let (ok, out) = etcdctl(&follower_only, &["put", "", "x"]);
    assert!(
        !ok && out.contains("etcdserver: key is not provided"),
        "{out}"
    );

    // SIGTERM: the member shuts down cleanly and the others keep serving.
    let victim = (leader + 2) % 3;
    cluster.members[victim].signal("TERM");
    let status = cluster.members[victim]
        .wait_exit(Duration::from_secs(15))
        .await;
    assert!(status.success(), "unclean exit after SIGTERM: {status}");
    let live: Vec<String> = (0..3)
        .filter(|i| *i != victim)
        .map(|i| cluster.members[i].endpoint())
        .collect();
    assert!(etcdctl(&live, &["put", "after-term", "1"]).0);
}

/// Waits until `endpoint` holds exactly `expected` under `prefix` (keys and values).
async fn wait_for_keys(endpoint: &str, prefix: &str, expected: &[(&str, &str)]) {
    let want: Vec<(String, String)> = expected
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut c = crate::cluster::client(endpoint).await.expect("connect");
    loop {
        let got: Vec<(String, String)> = c
            .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
            .await
            .expect("get")
            .kvs()
            .iter()
            .map(|kv| {
                (
                    kv.key_str().unwrap_or("?").to_string(),
                    kv.value_str().unwrap_or("?").to_string(),
                )
            })
            .collect();
        if got == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{endpoint} has {got:?}, expected {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `etcdctl make-mirror` moves data live between a real etcd and Keel, both ways: the keys
/// present when it starts, then every later put and delete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn make_mirror_between_etcd_and_keel() {
    let keel = Cluster::start(1).await;
    let keel_ep = keel.endpoints();
    let etcd = crate::gateway::Etcd::start()
        .await
        .expect("real etcd (scripts/test.sh installs etcd-server)");
    let etcd_ep = vec![etcd.addr.clone()];
    for (k, v) in [("/app/a", "1"), ("/app/b", "2"), ("/other", "x")] {
        assert!(etcdctl(&etcd_ep, &["put", k, v]).0);
    }
    // (source, destination, destination prefix, keys at the start, a put, a delete, keys after)
    let rounds = [
        (
            &etcd_ep,
            &keel_ep,
            "/app/",
            ["a", "b"],
            "c",
            "a",
            ["b", "c"],
        ),
        (
            &keel_ep,
            &etcd_ep,
            "/copy/",
            ["b", "c"],
            "d",
            "b",
            ["c", "d"],
        ),
    ];
    let value = |k: &str| match k {
        "a" => "1",
        "b" => "2",
        "c" => "3",
        _ => "4",
    };
    for (source, dest, dest_prefix, before, put, del, after) in rounds {
        let mut mirror = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", source[0]))
            .args([
                "make-mirror",
                "--prefix",
                "/app/",
                "--dest-prefix",
                dest_prefix,
            ])
            .arg(&dest[0])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("run etcdctl make-mirror");
        let keys = |names: [&str; 2]| -> Vec<(String, &str)> {
            names
                .iter()
                .map(|n| (format!("{dest_prefix}{n}"), value(n)))
                .collect()
        };
        let expect = keys(before);
        let expect: Vec<(&str, &str)> = expect.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        wait_for_keys(&dest[0], dest_prefix, &expect).await;
        // Live changes follow.
        assert!(etcdctl(source, &["put", &format!("/app/{put}"), value(put)]).0);
        assert!(etcdctl(source, &["del", &format!("/app/{del}")]).0);
        let expect = keys(after);
        let expect: Vec<(&str, &str)> = expect.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        wait_for_keys(&dest[0], dest_prefix, &expect).await;
        let _ = mirror.kill();
        let _ = mirror.wait();
    }
}
