//! The keelctl binary against a real member.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use crate::cluster::Cluster;

fn keelctl(ep: &str, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_keelctl"))
        .args(["--endpoints", ep])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn keelctl");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    } else {
        drop(child.stdin.take());
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(ep: &str, args: &[&str]) -> String {
    let (success, out, err) = keelctl(ep, args, None);
    assert!(success, "keelctl {args:?} failed: {err}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keelctl_commands() {
    let cluster = Cluster::start(1).await;
    let ep = cluster.endpoints()[0].clone();
    let ep = ep.as_str();

    assert_eq!(ok(ep, &["put", "app/a", "1"]), "OK\n");
    ok(ep, &["put", "app/b", "2"]);
    assert_eq!(ok(ep, &["get", "app/a"]), "app/a\n1\n");
    assert_eq!(
        ok(ep, &["get", "app/", "--prefix", "--print-value-only"]),
        "1\n2\n"
    );
    assert_eq!(ok(ep, &["get", "app/", "--prefix", "--count-only"]), "2\n");
    let json: serde_json::Value =
        serde_json::from_str(&ok(ep, &["get", "app/a", "-w", "json"])).unwrap();
    assert_eq!(json["kvs"][0]["value"], "1");
    assert_eq!(json["count"], 1);

    // txn in etcdctl's stdin format.
    let (success, out, err) = keelctl(
        ep,
        &["txn"],
        Some("value(\"app/a\") = \"1\"\n\nput app/a 10\nget app/b\n\nget app/a\n"),
    );
    assert!(success, "{err}");
    assert_eq!(out, "SUCCESS\n\nOK\n\napp/b\n2\n");
    let (_, out, _) = keelctl(
        ep,
        &["txn"],
        Some("value(\"app/a\") = \"1\"\n\nput app/a 11\n\nget app/a\n"),
    );
    assert_eq!(out, "FAILURE\n\napp/a\n10\n");

    // Leases.
    let out = ok(ep, &["lease", "grant", "60"]);
    let id = out.split_whitespace().nth(1).unwrap().to_string();
    ok(ep, &["put", "app/leased", "x", "--lease", &id]);
    assert!(ok(ep, &["lease", "ttl", &id, "--keys"]).contains("app/leased"));
    assert!(ok(ep, &["lease", "list"]).contains(&id));
    assert!(ok(ep, &["lease", "keep-alive", &id, "--once"]).contains("keepalived"));
    ok(ep, &["lease", "revoke", &id]);
    assert!(ok(ep, &["lease", "ttl", &id]).contains("already expired"));
    assert_eq!(ok(ep, &["get", "app/leased"]), "");
    let (success, _, err) = keelctl(ep, &["lease", "revoke", &id], None);
    assert!(!success);
    assert!(err.contains("lease not found"), "{err}");

    // Deletes.
    assert_eq!(ok(ep, &["del", "app/", "--prefix"]), "2\n");

    // Lock around a command.
    let out = ok(
        ep,
        &[
            "lock",
            "mylock",
            "--",
            "sh",
            "-c",
            "echo held $KEEL_LOCK_KEY",
        ],
    );
    assert!(out.starts_with("held mylock/"), "{out}");

    // Cluster and maintenance.
    assert!(ok(ep, &["member", "list"]).contains("m0"));
    let status = ok(ep, &["endpoint", "status"]);
    assert!(status.contains(ep) && status.contains("true"), "{status}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(ep, &["endpoint", "status", "-w", "json"])).unwrap();
    assert!(json["status"]["leader"].as_u64().unwrap() != 0);
    assert!(ok(ep, &["endpoint", "health"]).contains("is healthy"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("backup.db");
    let (success, out, err) = keelctl(ep, &["snapshot", "save", path.to_str().unwrap()], None);
    if success {
        assert!(out.contains("Snapshot saved"), "{out}");
        assert!(std::fs::metadata(&path).unwrap().len() > 0);
    } else {
        // A server without the Snapshot RPC: a clear message, no partial file.
        assert!(err.contains("does not support snapshots"), "{err}");
        assert!(!path.exists());
    }

    // Watch prints events as they happen.
    let mut watch = Command::new(env!("CARGO_BIN_EXE_keelctl"))
        .args(["--endpoints", ep, "watch", "w/", "--prefix"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = watch.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .take(3)
            .map(|l| l.unwrap())
            .collect::<Vec<_>>()
    });
    // Keep writing until the watcher (which starts asynchronously) has seen one.
    let start = std::time::Instant::now();
    while !reader.is_finished() && start.elapsed() < std::time::Duration::from_secs(20) {
        ok(ep, &["put", "w/k", "v"]);
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let _ = watch.kill();
    let _ = watch.wait();
    assert_eq!(reader.join().unwrap(), vec!["PUT", "w/k", "v"]);

    // Errors: clear message, non-zero exit.
    let (success, _, err) = keelctl(
        "127.0.0.1:1",
        &["--command-timeout", "1s", "get", "x"],
        None,
    );
    assert!(!success);
    assert!(err.starts_with("Error:"), "{err}");
}
