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
