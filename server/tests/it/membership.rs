//! Membership changes and backups on real clusters: growing 1 → 3 → 5 and shrinking back under
//! write load, replacing a dead member, and restoring a backup into a new cluster.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use etcd_client::{GetOptions, MemberAddOptions};
use tokio::sync::Mutex;

use crate::cluster::{Cluster, Member, client, free_port};

/// A member that joins `cluster` (already added with MemberAdd), started with
/// `--initial-cluster-state existing`.
fn joining_member(cluster: &Cluster, name: &str, client_port: u16, peer_port: u16) -> Member {
    let mut initial: Vec<String> = cluster
        .members
        .iter()
        .filter(|m| m.child.is_some())
        .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
        .collect();
    initial.push(format!("{name}=http://127.0.0.1:{peer_port}"));
    let dir = cluster.members[0]
        .data_dir
        .parent()
        .expect("data dir parent")
        .to_path_buf();
    Member {
        name: name.to_string(),
        client_port,
        peer_port,
        data_dir: dir.join(name),
        child: None,
        initial_cluster: initial.join(","),
        extra: vec!["--initial-cluster-state".into(), "existing".into()],
    }
}

/// Adds a voter through `via`, starts it, and waits until it is a real voter that has applied
/// the leader's log.
async fn grow(cluster: &mut Cluster, via: &str, name: &str) -> u64 {
    let (c, p) = (free_port(), free_port());
    let mut admin = client(via).await.expect("connect");
    let added = admin
        .member_add([format!("http://127.0.0.1:{p}")], None)
        .await
        .expect("member add");
    let id = added.member().expect("added member").id();
    // etcd's reply lists the new member (unstarted: no name yet) among the members.
    assert!(added.member_list().iter().any(|m| m.id() == id));
    // As etcd's, the Cluster service's header carries no revision.
    let header = added.header().expect("header");
    assert_eq!(header.revision(), 0);
    assert_ne!(header.member_id(), 0);
    let mut member = joining_member(cluster, name, c, p);
    member.start();
    cluster.members.push(member);
    let endpoint = format!("127.0.0.1:{c}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut cl) = client(&endpoint).await
            && let Ok(s) = cl.status().await
            && !s.is_learner()
            && s.leader() != 0
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never became a voter; log:\n{}",
            cluster.members.last().map(|m| m.log()).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    id
}

async fn member_id_of(endpoint: &str) -> u64 {
    let mut c = client(endpoint).await.expect("connect");
    c.status()
        .await
        .expect("status")
        .header()
        .expect("header")
        .member_id()
}

/// Sequential writer recording which writes were acknowledged.
fn spawn_writer(
    endpoint: String,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<String>>>,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut failures = 0usize;
        let mut i = 0u64;
        let mut c = client(&endpoint).await.expect("connect writer");
        while !stop.load(Ordering::Relaxed) {
            let key = format!("load/{i:06}");
            match c.put(key.as_str(), key.as_str(), None).await {
                Ok(_) => acked.lock().await.push(key),
                Err(_) => {
                    failures += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            i += 1;
        }
        failures
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grow_to_five_and_shrink_back_under_load_loses_no_writes() {
    let mut cluster = Cluster::start(1).await;
    let first = cluster.members[0].endpoint();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let writer = spawn_writer(first.clone(), stop.clone(), acked.clone());

    let mut added = Vec::new();
    for i in 1..5 {
        added.push(grow(&mut cluster, &first, &format!("m{i}")).await);
    }
    let mut admin = client(&first).await.expect("connect");
    let list = admin.member_list().await.expect("member list");
    assert_eq!(list.members().len(), 5);
    assert!(list.members().iter().all(|m| !m.is_learner()));
    // Every member publishes its name and client URL.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let list = admin.member_list().await.expect("member list");
        if list
            .members()
            .iter()
            .all(|m| !m.name().is_empty() && !m.client_urls().is_empty())
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "members never published attributes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Shrink back to the first member, the current leader included when it is one of them.
    for (n, id) in added.iter().enumerate().rev() {
        admin.member_remove(*id).await.expect("member remove");
        let member = &mut cluster.members[n + 1];
        // A removed member stops by itself, as etcd does.
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let exited = member
                .child
                .as_mut()
                .map(|c| c.try_wait().ok().flatten().is_some())
                .unwrap_or(true);
            if exited {
                member.child = None;
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} kept running after removal",
                member.name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let failures = writer.await.expect("writer");
    let acked = acked.lock().await.clone();
    assert!(
        acked.len() > 50,
        "too few writes acknowledged: {}",
        acked.len()
    );

    let list = admin.member_list().await.expect("member list");
    assert_eq!(list.members().len(), 1);
    let resp = admin
        .get("load/", Some(GetOptions::new().with_prefix()))
        .await
        .expect("read back");
    let stored: BTreeMap<String, String> = resp
        .kvs()
        .iter()
        .map(|kv| {
            (
                kv.key_str().unwrap_or_default().to_string(),
                kv.value_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    for key in &acked {
        assert_eq!(stored.get(key), Some(key), "acknowledged write {key} lost");
    }
    eprintln!(
        "membership under load: {} writes acknowledged, {} failed (not acknowledged)",
        acked.len(),
        failures
    );
}

/// Removes member `id` as a careful client does when the leader may have just died: a
/// forwarded change that lost its connection mid-request is "request timed out" (as etcd
/// says, it may or may not have happened), so the member list decides whether to retry.
async fn remove_resolving_timeouts(c: &mut etcd_client::Client, id: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match c.member_remove(id).await {
            Ok(_) => return,
            Err(e) if crate::cluster::status_message(&e) == "etcdserver: request timed out" => {
                if let Ok(list) = c.member_list().await
                    && list.members().iter().all(|m| m.id() != id)
                {
                    return;
                }
            }
            Err(e) => panic!("remove member {id:x}: {e:?}"),
        }
        assert!(Instant::now() < deadline, "member {id:x} was never removed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_a_dead_member() {
    let mut cluster = Cluster::start(3).await;
    let mut c = client(&cluster.members[0].endpoint())
        .await
        .expect("connect");
    for i in 0..100 {
        c.put(format!("before/{i}"), "x", None).await.expect("put");
    }
    let dead = 2;
    let dead_id = member_id_of(&cluster.members[dead].endpoint()).await;
    let survivor_id = member_id_of(&cluster.members[0].endpoint()).await;
    cluster.members[dead].kill();
    // The survivor's prober shows the dead peer inactive while it is a member...
    let peer_series =
        format!("etcd_network_active_peers{{Local=\"{survivor_id:x}\",Remote=\"{dead_id:x}\"}}");
    let active = |m: &crate::cluster::Member| m.metric_value(&peer_series);
    crate::metrics::eventually("the dead peer shows inactive", || {
        active(&cluster.members[0]) == Some(0.0)
    })
    .await;

    // The cluster keeps working with two of three; replace the dead member.
    remove_resolving_timeouts(&mut c, dead_id).await;
    // ... and forgets it once it is no longer one.
    crate::metrics::eventually("the removed peer's series is gone", || {
        active(&cluster.members[0]).is_none()
    })
    .await;
    let survivor = cluster.members[0].endpoint();
    cluster.members.remove(dead);
    let new_id = grow(&mut cluster, &survivor, "m3").await;
    assert_ne!(new_id, dead_id);
    c.put("after", "y", None)
        .await
        .expect("put after replacement");

    // The newcomer has everything, read locally (serializable) from it.
    let newcomer = cluster.members.last().expect("newcomer").endpoint();
    let mut nc = client(&newcomer).await.expect("connect newcomer");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let resp = nc
            .get(
                "before/",
                Some(GetOptions::new().with_prefix().with_serializable()),
            )
            .await
            .expect("serializable read");
        if resp.count() == 100 {
            break;
        }
        assert!(Instant::now() < deadline, "newcomer never caught up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let list = c.member_list().await.expect("list");
    assert_eq!(list.members().len(), 3);
    assert!(list.members().iter().all(|m| m.id() != dead_id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_errors_match_etcd() {
    let cluster = Cluster::start(1).await;
    let mut c = client(&cluster.members[0].endpoint())
        .await
        .expect("connect");
    let err = c.member_remove(0x1234).await.expect_err("unknown member");
    assert_eq!(
        crate::cluster::status_message(&err),
        "etcdserver: member not found"
    );
    let me = member_id_of(&cluster.members[0].endpoint()).await;
    let err = c.member_promote(me).await.expect_err("promote a voter");
    assert_eq!(
        crate::cluster::status_message(&err),
        "etcdserver: can only promote a learner member"
    );
    let own_peer = format!("http://127.0.0.1:{}", cluster.members[0].peer_port);
    let err = c
        .member_add([own_peer], None)
        .await
        .expect_err("duplicate peer URL");
    assert_eq!(
        crate::cluster::status_message(&err),
        "etcdserver: Peer URLs already exists"
    );
    // A learner that never started is not in sync and cannot be promoted.
    let learner = c
        .member_add(
            [format!("http://127.0.0.1:{}", free_port())],
            Some(MemberAddOptions::new().with_is_learner()),
        )
        .await
        .expect("add learner");
    let learner = learner.member().expect("member").clone();
    assert!(learner.is_learner());
    let err = c
        .member_promote(learner.id())
        .await
        .expect_err("promote an unsynced learner");
    assert_eq!(
        crate::cluster::status_message(&err),
        "etcdserver: can only promote a learner member which is in sync with leader"
    );
    c.member_remove(learner.id()).await.expect("remove learner");
}

/// Membership changes sent at the same time all succeed, and the leader makes them one after
/// another: openraft refuses (and logs an error for) a change while another is uncommitted,
/// which before the changes were queued happened in every such burst and was only hidden by
/// retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_member_changes_queue_instead_of_colliding() {
    let cluster = Cluster::start(3).await;
    let c = client(&cluster.members[0].endpoint())
        .await
        .expect("connect");
    let urls: Vec<String> = (0..4)
        .map(|_| format!("http://127.0.0.1:{}", free_port()))
        .collect();
    let adds = urls.iter().map(|url| {
        let mut c = c.clone();
        let url = url.clone();
        async move {
            c.member_add([url], None)
                .await
                .map(|r| r.member().map(|m| m.id()))
        }
    });
    let added: Vec<u64> = futures::future::join_all(adds)
        .await
        .into_iter()
        .map(|r| r.expect("member add").expect("added member"))
        .collect();
    let mut c = c.clone();
    let listed = c.member_list().await.expect("member list");
    for (id, url) in added.iter().zip(&urls) {
        let m = listed
            .members()
            .iter()
            .find(|m| m.id() == *id)
            .unwrap_or_else(|| panic!("{url} missing from the member list"));
        assert_eq!(m.peer_urls(), std::slice::from_ref(url));
    }
    assert_eq!(listed.members().len(), 3 + urls.len());
    let removes = added.iter().map(|id| {
        let mut c = c.clone();
        async move { c.member_remove(*id).await.map(|_| ()) }
    });
    for r in futures::future::join_all(removes).await {
        r.expect("member remove");
    }
    assert_eq!(
        c.member_list().await.expect("member list").members().len(),
        3
    );
    c.put("after", "changes", None).await.expect("put");
    for m in &cluster.members {
        let log = m.log();
        assert!(
            !log.contains("undergoing a configuration change"),
            "{} saw colliding membership changes:\n{log}",
            m.name
        );
    }
}

/// Every key with its full metadata, through a linearizable read.
async fn dump(endpoint: &str) -> Vec<(String, String, i64, i64, i64)> {
    let mut c = client(endpoint).await.expect("connect");
    let resp = c
        .get("", Some(GetOptions::new().with_all_keys()))
        .await
        .expect("dump");
    resp.kvs()
        .iter()
        .map(|kv| {
            (
                kv.key_str().unwrap_or_default().to_string(),
                kv.value_str().unwrap_or_default().to_string(),
                kv.create_revision(),
                kv.mod_revision(),
                kv.version(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_save_and_restore_into_a_new_cluster() {
    let source = Cluster::start(3).await;
    let endpoint = source.members[0].endpoint();
    let mut c = client(&endpoint).await.expect("connect");
    for i in 0..300 {
        c.put(format!("k/{:03}", i % 120), format!("v{i}"), None)
            .await
            .expect("put");
    }
    c.delete("k/007", None).await.expect("delete");
    let before = dump(&endpoint).await;
    let revision = c
        .get("k/000", None)
        .await
        .expect("get")
        .header()
        .expect("header")
        .revision();

    // Real etcdctl saves the backup (it checks the size rule and writes the file).
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("backup.db");
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &endpoint, "snapshot", "save"])
        .arg(&file)
        .output()
        .expect("run etcdctl");
    assert!(
        out.status.success(),
        "etcdctl snapshot save failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Restore it into a new 3-member cluster: one `keel snapshot restore` per member.
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
    let initial = ports
        .iter()
        .enumerate()
        .map(|(i, (_, p))| format!("r{i}=http://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut members = Vec::new();
    for (i, (cp, pp)) in ports.iter().enumerate() {
        let data_dir = dir.path().join(format!("r{i}"));
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_keel"))
            .args(["snapshot", "restore"])
            .arg(&file)
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--name", &format!("r{i}")])
            .args(["--initial-cluster", &initial])
            .args(["--initial-cluster-token", "restored"])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{pp}"),
            ])
            .output()
            .expect("run keel snapshot restore");
        assert!(
            out.status.success(),
            "restore failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        members.push(Member {
            name: format!("r{i}"),
            client_port: *cp,
            peer_port: *pp,
            data_dir,
            child: None,
            initial_cluster: initial.clone(),
            extra: vec![],
        });
    }
    // A second restore into an existing directory is refused.
    let again = std::process::Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["snapshot", "restore"])
        .arg(&file)
        .arg("--data-dir")
        .arg(&members[0].data_dir)
        .output()
        .expect("run restore again");
    assert!(!again.status.success());

    for m in &mut members {
        m.start();
    }
    let restored = Cluster::adopt(members, dir).await;
    let new_endpoint = restored.members[1].endpoint();
    assert_eq!(dump(&new_endpoint).await, before, "restored data differs");
    let mut rc = client(&new_endpoint).await.expect("connect restored");
    // History survives too, and the revision counter continues.
    let old = rc
        .get("k/000", Some(GetOptions::new().with_revision(2)))
        .await
        .expect("historical read");
    assert_eq!(old.kvs()[0].value_str().unwrap_or_default(), "v0");
    let put = rc.put("new", "1", None).await.expect("write to restored");
    assert_eq!(put.header().expect("header").revision(), revision + 1);
    // A member added later gets the restored data (which no entry of the new log carries).
    let mut restored = restored;
    // The joiner keeps the default token: as with etcd, it takes the ID `member add` gave its
    // peer URLs from the cluster, whatever token it was started with.
    grow(&mut restored, &new_endpoint, "r3").await;
    let added = restored.members[3].endpoint();
    let mut on_added = dump(&added).await;
    on_added.retain(|(k, ..)| k != "new");
    assert_eq!(on_added, before, "the added member has the restored data");
    // It is a new cluster: a different cluster ID.
    let old_cluster = c
        .status()
        .await
        .expect("status")
        .header()
        .expect("h")
        .cluster_id();
    let new_cluster = rc
        .status()
        .await
        .expect("status")
        .header()
        .expect("h")
        .cluster_id();
    assert_ne!(old_cluster, new_cluster);
}

/// Writes data with history, a deletion, a lease with a key, a compaction, a user and a role.
async fn write_backup_sample(endpoint: &str) {
    let mut c = client(endpoint).await.expect("connect");
    for i in 0..40 {
        c.put(format!("s/{:02}", i % 15), format!("v{i}"), None)
            .await
            .expect("put");
    }
    c.delete("s/03", None).await.expect("delete");
    let lease = c.lease_grant(600, None).await.expect("grant").id();
    c.put(
        "s/leased",
        "x",
        Some(etcd_client::PutOptions::new().with_lease(lease)),
    )
    .await
    .expect("put with lease");
    c.put("s/big", "y".repeat(20_000), None).await.expect("put");
    c.compact(10, None).await.expect("compact");
    c.put("s/00", "last", None).await.expect("put");
    c.role_add("app").await.expect("role");
    c.role_grant_permission(
        "app",
        etcd_client::Permission::read_write("/app/").with_prefix(),
    )
    .await
    .expect("grant permission");
    c.user_add("alice", "pw", None).await.expect("user");
    c.user_grant_role("alice", "app").await.expect("grant role");
}

/// What a client sees of [`write_backup_sample`]'s data: every key with its revisions, a
/// read in the past, the compaction, HashKV, leases with TTL and keys, users and roles.
async fn backup_sample_view(endpoint: &str) -> Vec<String> {
    let mut c = client(endpoint).await.expect("connect");
    let mut view: Vec<String> = dump(endpoint)
        .await
        .into_iter()
        .map(|(k, v, create, modified, version)| {
            format!(
                "{k}={} c{create} m{modified} v{version}",
                &v[..v.len().min(8)]
            )
        })
        .collect();
    let revision = c
        .get("s/00", None)
        .await
        .expect("get")
        .header()
        .expect("header")
        .revision();
    view.push(format!("revision {revision}"));
    let past = c
        .get(
            "s/",
            Some(GetOptions::new().with_prefix().with_revision(12)),
        )
        .await
        .expect("read at 12");
    for kv in past.kvs() {
        view.push(format!(
            "@12 {}={}",
            kv.key_str().unwrap_or("?"),
            kv.value_str().unwrap_or("?")
        ));
    }
    let compacted = c
        .get("s/00", Some(GetOptions::new().with_revision(9)))
        .await
        .expect_err("compacted");
    view.push(format!("@9 {compacted}"));
    // etcd's HashKV of the whole history: equal wherever the same history was restored.
    let hash = c.hash_kv(0).await.expect("hashkv");
    view.push(format!(
        "hashkv {:08x} compact {}",
        hash.hash(),
        hash.compact_version()
    ));
    for lease in c.leases().await.expect("leases").leases() {
        let ttl = c
            .lease_time_to_live(
                lease.id(),
                Some(etcd_client::LeaseTimeToLiveOptions::new().with_keys()),
            )
            .await
            .expect("time to live");
        let keys: Vec<String> = ttl
            .keys()
            .iter()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect();
        view.push(format!(
            "lease {:x} granted {} keys {keys:?}",
            lease.id(),
            ttl.granted_ttl()
        ));
    }
    view.push(format!(
        "users {:?}",
        c.user_list().await.expect("users").users()
    ));
    view.push(format!(
        "alice {:?}",
        c.user_get("alice").await.expect("alice").roles()
    ));
    for perm in c.role_get("app").await.expect("role").permissions() {
        view.push(format!(
            "app {:?} {:?}",
            String::from_utf8_lossy(perm.key()),
            String::from_utf8_lossy(perm.range_end())
        ));
    }
    view
}

fn etcdctl(args: &[&str]) -> String {
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(args)
        .output()
        .expect("run etcdctl");
    assert!(
        out.status.success(),
        "etcdctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn keel_restore(
    file: &std::path::Path,
    data_dir: &std::path::Path,
    name: &str,
    peer: u16,
    extra: &[&str],
) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["snapshot", "restore"])
        .arg(file)
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--name", name])
        .args([
            "--initial-cluster",
            &format!("{name}=http://127.0.0.1:{peer}"),
        ])
        .args([
            "--initial-advertise-peer-urls",
            &format!("http://127.0.0.1:{peer}"),
        ])
        .args(extra)
        .output()
        .expect("run keel snapshot restore")
}

/// Backups are etcd's format both ways: `etcdctl snapshot status` reads Keel's, `etcdctl
/// snapshot restore` makes a real etcd of it, and `keel snapshot restore` takes real etcd's
/// (and, with `--skip-hash-check`, an etcd member's database file). The data, its history,
/// the compaction, leases and auth survive every hop, and `HashKV` agrees at every hop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_move_between_keel_and_etcd() {
    let source = Cluster::start(1).await;
    let endpoint = source.members[0].endpoint();
    write_backup_sample(&endpoint).await;
    let expected = backup_sample_view(&endpoint).await;
    assert!(
        expected
            .iter()
            .any(|l| l.starts_with("lease ") && l.contains("s/leased")),
        "{expected:?}"
    );
    let dir = tempfile::tempdir().expect("tempdir");

    // Keel → etcd.
    let keel_file = dir.path().join("keel.db");
    etcdctl(&[
        "--endpoints",
        &endpoint,
        "snapshot",
        "save",
        keel_file.to_str().expect("path"),
    ]);
    let status: serde_json::Value = serde_json::from_str(&etcdctl(&[
        "snapshot",
        "status",
        keel_file.to_str().expect("path"),
        "-w",
        "json",
    ]))
    .expect("status json");
    let revision_line = expected
        .iter()
        .find(|l| l.starts_with("revision "))
        .expect("revision");
    assert_eq!(
        format!("revision {}", status["revision"]),
        *revision_line,
        "{status}"
    );
    assert!(
        status["totalKey"].as_u64().expect("totalKey") > 15,
        "{status}"
    );
    let etcd_peer = free_port();
    let etcd_dir = dir.path().join("etcd-restored");
    etcdctl(&[
        "snapshot",
        "restore",
        keel_file.to_str().expect("path"),
        "--name",
        "r",
        "--data-dir",
        etcd_dir.to_str().expect("path"),
        "--initial-cluster",
        &format!("r=http://127.0.0.1:{etcd_peer}"),
        "--initial-advertise-peer-urls",
        &format!("http://127.0.0.1:{etcd_peer}"),
    ]);
    let etcd = crate::gateway::Etcd::start_in(&etcd_dir, "r", etcd_peer, None)
        .await
        .expect("real etcd (scripts/test.sh installs etcd-server)");
    assert_eq!(
        backup_sample_view(&etcd.addr).await,
        expected,
        "etcd restored from Keel's backup"
    );

    // etcd → Keel.
    let etcd_file = dir.path().join("etcd.db");
    etcdctl(&[
        "--endpoints",
        &etcd.addr,
        "snapshot",
        "save",
        etcd_file.to_str().expect("path"),
    ]);
    // The member's own database file, as an operator would copy it: etcd stopped first.
    drop(etcd);
    let mut members = Vec::new();
    for (name, file, extra) in [
        ("from-etcd", etcd_file.clone(), &[][..]),
        (
            "from-etcd-db",
            etcd_dir.join("member/snap/db"),
            &["--skip-hash-check"][..],
        ),
    ] {
        let (client_port, peer_port) = (free_port(), free_port());
        let data_dir = dir.path().join(name);
        if !extra.is_empty() {
            let refused = keel_restore(&file, &data_dir, name, peer_port, &[]);
            assert!(!refused.status.success());
            let err = String::from_utf8_lossy(&refused.stderr);
            assert!(
                err.contains("snapshot missing hash but --skip-hash-check=false"),
                "{err}"
            );
        }
        let out = keel_restore(&file, &data_dir, name, peer_port, extra);
        assert!(
            out.status.success(),
            "restore {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut m = Member {
            name: name.to_string(),
            client_port,
            peer_port,
            data_dir,
            child: None,
            initial_cluster: format!("{name}=http://127.0.0.1:{peer_port}"),
            extra: vec![],
        };
        m.start();
        members.push(m);
    }
    let restored = Cluster::adopt(members, dir).await;
    for m in &restored.members {
        let view = backup_sample_view(&m.endpoint()).await;
        assert_eq!(view, expected, "Keel restored from etcd ({})", m.name);
    }
}

/// `Maintenance.Snapshot` streams the backup as it is written, from one view of the store:
/// `remaining_bytes` counts down to 0 from the full size in the first message, writes made
/// meanwhile are not in it, a client that leaves early costs nothing, and no file is left in
/// the data directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_streams_one_view_and_survives_a_client_leaving() {
    let cluster = Cluster::start(1).await;
    let endpoint = cluster.members[0].endpoint();
    let mut c = client(&endpoint).await.expect("connect");
    let value = "v".repeat(1000);
    for i in 0..3000 {
        c.put(format!("bulk/{i:05}"), value.clone(), None)
            .await
            .expect("put");
    }
    // A client that reads one message and goes away.
    let mut early = c.snapshot().await.expect("snapshot");
    let first = early
        .message()
        .await
        .expect("message")
        .expect("one message");
    assert!(
        first.remaining_bytes() > 3_000_000,
        "{}",
        first.remaining_bytes()
    );
    drop(early);

    // A full stream, with writes going on while it is read.
    let mut stream = c.snapshot().await.expect("snapshot");
    let mut bytes = Vec::new();
    let mut expected_total = None;
    let mut writes = 0;
    while let Some(m) = stream.message().await.expect("message") {
        let total = *expected_total.get_or_insert(m.remaining_bytes() + m.blob().len() as u64);
        bytes.extend_from_slice(m.blob());
        assert_eq!(m.remaining_bytes(), total - bytes.len() as u64);
        if writes < 20 {
            c.put(format!("during/{writes}"), "x", None)
                .await
                .expect("put");
            writes += 1;
        }
    }
    assert_eq!(Some(bytes.len() as u64), expected_total);
    assert!(writes > 0);
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("streamed.db");
    std::fs::write(&file, &bytes).expect("write");
    let status: serde_json::Value = serde_json::from_str(&etcdctl(&[
        "snapshot",
        "status",
        file.to_str().expect("path"),
        "-w",
        "json",
    ]))
    .expect("status json");
    // 3000 puts from revision 2: the view is of revision 3001, before any `during/` write.
    assert_eq!(status["revision"], 3001, "{status}");
    // The member still serves, and left nothing behind.
    c.put("after", "1", None)
        .await
        .expect("put after the snapshots");
    let tmp = cluster.members[0].data_dir.join("tmp");
    let leftovers: Vec<_> = std::fs::read_dir(&tmp)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// etcd's recovery from a lost quorum: two of three members are gone for good, the survivor
/// cannot commit anything; restarted with `--force-new-cluster` it is a one-member cluster
/// with all its data (same member and cluster IDs, revisions, history, leases), and grows again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_new_cluster_recovers_a_member_that_lost_its_quorum() {
    let mut cluster = Cluster::start(3).await;
    let endpoint = cluster.members[0].endpoint();
    let mut c = client(&endpoint).await.expect("connect");
    for i in 0..200 {
        c.put(format!("r/{:03}", i % 50), format!("v{i}"), None)
            .await
            .expect("put");
    }
    let lease = c.lease_grant(600, None).await.expect("grant").id();
    c.put(
        "r/leased",
        "x",
        Some(etcd_client::PutOptions::new().with_lease(lease)),
    )
    .await
    .expect("put with lease");
    // Every member has applied everything before two of them are lost.
    let revision = c
        .get("r/000", None)
        .await
        .expect("get")
        .header()
        .expect("h")
        .revision();
    for m in &cluster.members {
        let mut mc = client(&m.endpoint()).await.expect("connect");
        let deadline = Instant::now() + Duration::from_secs(10);
        while mc
            .get("r/000", Some(GetOptions::new().with_serializable()))
            .await
            .expect("get")
            .header()
            .expect("h")
            .revision()
            < revision
        {
            assert!(Instant::now() < deadline, "{} did not catch up", m.name);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let before = dump(&endpoint).await;
    let status = c.status().await.expect("status");
    let (member, cluster_id) = (
        status.header().expect("h").member_id(),
        status.header().expect("h").cluster_id(),
    );
    cluster.members[1].kill();
    cluster.members[2].kill();
    drop(c);
    // Without a quorum the survivor cannot write.
    let mut c = client(&endpoint).await.expect("connect");
    let stuck = tokio::time::timeout(Duration::from_secs(3), c.put("lost", "1", None)).await;
    assert!(
        !matches!(stuck, Ok(Ok(_))),
        "a write without quorum succeeded"
    );

    cluster.members[0].kill();
    cluster.members[0].extra.push("--force-new-cluster".into());
    cluster.members[0].start();
    cluster.wait_ready(Duration::from_secs(30)).await;
    assert!(
        cluster.members[0].log().contains("--force-new-cluster"),
        "the member says what it did"
    );
    assert_eq!(dump(&endpoint).await, before, "the data survived");
    let mut c = client(&endpoint).await.expect("connect");
    let members = c.member_list().await.expect("member list");
    let ids: Vec<u64> = members.members().iter().map(|m| m.id()).collect();
    assert_eq!(ids, [member], "only the survivor is a member");
    let status = c.status().await.expect("status");
    assert_eq!(status.header().expect("h").cluster_id(), cluster_id);
    assert_eq!(status.leader(), member);
    let put = c
        .put("after", "1", None)
        .await
        .expect("write after recovery");
    assert_eq!(put.header().expect("h").revision(), revision + 1);
    let old = c
        .get("r/000", Some(GetOptions::new().with_revision(2)))
        .await
        .expect("history");
    assert_eq!(old.kvs()[0].value_str().unwrap_or_default(), "v0");
    let leases = c.leases().await.expect("leases");
    assert!(leases.leases().iter().any(|l| l.id() == lease));

    // The member restarts normally afterwards (without the flag, as with etcd: each start with
    // it would make a one-member cluster again), and the cluster grows again: the new member
    // gets the data, which no entry of the new log carries, as a snapshot.
    cluster.members[0].extra.clear();
    cluster.kill_and_restart(0).await;
    assert_eq!(
        client(&endpoint)
            .await
            .expect("c")
            .get("after", None)
            .await
            .expect("get")
            .kvs()
            .len(),
        1
    );
    cluster.members.truncate(1);
    let new_id = grow(&mut cluster, &endpoint, "n4").await;
    let new_endpoint = cluster.members[1].endpoint();
    let mut nc = client(&new_endpoint).await.expect("connect new");
    let got = nc
        .get("after", Some(GetOptions::new().with_serializable()))
        .await
        .expect("get on the new member");
    assert_eq!(got.kvs().len(), 1);
    let on_new: Vec<_> = dump(&new_endpoint)
        .await
        .into_iter()
        .filter(|(k, ..)| k != "after")
        .collect();
    assert_eq!(on_new, before, "the new member has all the data");
    let members = nc.member_list().await.expect("member list");
    let mut ids: Vec<u64> = members.members().iter().map(|m| m.id()).collect();
    ids.sort_unstable();
    let mut expected = vec![member, new_id];
    expected.sort_unstable();
    assert_eq!(ids, expected);
}

/// A member started with `--initial-cluster-state existing` before `member add` announced it
/// stops at once and says what to do, instead of waiting for a leader that never calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_without_member_add_is_refused_with_a_clear_error() {
    let cluster = Cluster::start(1).await;
    let mut stranger = joining_member(&cluster, "stranger", free_port(), free_port());
    stranger.start();
    let status = stranger.wait_exit(Duration::from_secs(30)).await;
    assert!(!status.success());
    let log = stranger.log();
    assert!(
        log.contains("no member of the cluster has this member's peer URLs")
            && log.contains("etcdctl member add stranger --peer-urls"),
        "{log}"
    );
}

/// While a leader's data is not yet in a snapshot (restored or forced members, see
/// `data-predates-log`), `MemberAdd` waits for it rather than add a member that would replay
/// the log without the data; once the snapshot is taken it goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_add_waits_while_the_data_predates_the_log() {
    let cluster = Cluster::start(1).await;
    let endpoint = cluster.members[0].endpoint();
    let marker = cluster.members[0].data_dir.join("data-predates-log");
    std::fs::write(&marker, b"").expect("marker");
    // A client that waits longer than the member's 10 s for a membership change.
    let opts = etcd_client::ConnectOptions::new().with_timeout(Duration::from_secs(30));
    let mut c = etcd_client::Client::connect([endpoint.as_str()], Some(opts))
        .await
        .expect("connect");
    let started = Instant::now();
    let refused = c
        .member_add([format!("http://127.0.0.1:{}", free_port())], None)
        .await
        .expect_err("refused while the marker is there");
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "it waited first"
    );
    assert!(
        refused.to_string().contains("data predates the Raft log"),
        "{refused}"
    );
    let remover = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        std::fs::remove_file(&marker).expect("remove marker");
    });
    c.member_add([format!("http://127.0.0.1:{}", free_port())], None)
        .await
        .expect("added once the snapshot is there");
    remover.await.expect("remover");
}

/// `MemberPromote` of a learner that has caught up makes it a voter, and the leader counts the
/// promotion (`etcd_server_learner_promote_successes`, as etcd's leader does).
#[tokio::test]
async fn a_caught_up_learner_is_promoted_and_the_promotion_counted() {
    let mut cluster = Cluster::start(1).await;
    let mut c = client(&cluster.members[0].endpoint())
        .await
        .expect("connect");
    for i in 0..20 {
        c.put(format!("before-{i}"), "v", None).await.expect("put");
    }
    assert_eq!(
        cluster.members[0].metric("etcd_server_learner_promote_successes"),
        0.0
    );
    let (client_port, peer_port) = (free_port(), free_port());
    let added = c
        .member_add(
            [format!("http://127.0.0.1:{peer_port}")],
            Some(MemberAddOptions::new().with_is_learner()),
        )
        .await
        .expect("add learner");
    let id = added.member().expect("member").id();
    let mut learner = joining_member(&cluster, "learner", client_port, peer_port);
    learner.start();
    cluster.members.push(learner);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match c.member_promote(id).await {
            Ok(_) => break,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "learner never promoted: {}",
                    crate::cluster::status_message(&e)
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let members = c.member_list().await.expect("member list");
    let promoted = members
        .members()
        .iter()
        .find(|m| m.id() == id)
        .expect("listed");
    assert!(!promoted.is_learner());
    assert_eq!(
        cluster.members[0].metric("etcd_server_learner_promote_successes"),
        1.0
    );
}
