//! Raft snapshots are pinned views of the store: taking one writes no file, a file is written
//! only when a snapshot is sent, it holds the state of the moment the view was pinned (not of
//! the moment it is written), and installing it leaves no file behind.

use std::path::Path;
use std::sync::Arc;

use keel_proto::etcdserverpb::{PutRequest, RangeRequest};
use keel_proto::keelpb::RaftRequest;
use keel_proto::keelpb::raft_request::Request as Cmd;
use keel_store::engine::Engine;
use keel_store::engine::rocks::RocksEngine;
use keel_store::mvcc::MvccStore;
use keel_store::raft::StateMachine;
use keel_store::raft::snapshot::SnapshotFile;
use keel_store::raft::types::{Command, Entry, Snapshot};
use openraft::entry::RaftEntry;
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};

fn open_sm(dir: &Path) -> StateMachine {
    let engine: Arc<dyn Engine> =
        Arc::new(RocksEngine::open(&dir.join("db")).expect("open rocksdb"));
    let mvcc = Arc::new(MvccStore::open(engine).expect("open mvcc"));
    StateMachine::open(mvcc, &dir.join("snapshots"), None).expect("state machine")
}

async fn apply_put(sm: &mut StateMachine, index: u64, key: &str, value: &str) {
    let cmd = RaftRequest {
        request: Some(Cmd::Put(PutRequest {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        })),
        origin: None,
    };
    let entry = Entry::new_normal(openraft::LogId::new_term_index(1, index), Command::new(cmd));
    sm.apply(futures::stream::iter(vec![Ok((entry, None))]))
        .await
        .expect("apply");
}

fn value_of(sm: &StateMachine, key: &str) -> Option<Vec<u8>> {
    let resp = sm
        .mvcc()
        .range(&RangeRequest {
            key: key.into(),
            ..Default::default()
        })
        .expect("range");
    resp.kvs.first().map(|kv| kv.value.clone())
}

async fn current_snapshot(sm: &mut StateMachine) -> Snapshot {
    sm.get_current_snapshot()
        .await
        .expect("get")
        .expect("a snapshot once something is applied")
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_are_views_written_only_when_sent() {
    let leader_dir = tempfile::tempdir().expect("tempdir");
    let follower_dir = tempfile::tempdir().expect("tempdir");
    let leader_snaps = leader_dir.path().join("snapshots");
    let follower_snaps = follower_dir.path().join("snapshots");
    let mut leader = open_sm(leader_dir.path());
    let mut follower = open_sm(follower_dir.path());

    // Nothing applied: no snapshot.
    assert!(leader.get_current_snapshot().await.expect("get").is_none());

    for i in 1..=100 {
        apply_put(&mut leader, i, &format!("k{i:03}"), "v1").await;
    }
    // Building a snapshot (what lets openraft purge the log) writes no file.
    let mut builder = leader.get_snapshot_builder().await;
    let built = builder.build_snapshot().await.expect("build");
    assert_eq!(built.meta.last_log_id.map(|l| l.index), Some(100));
    assert!(
        built.snapshot.path().is_none(),
        "a built snapshot is a view"
    );
    drop(built);
    assert_eq!(files_in(&leader_snaps), Vec::<String>::new());

    // A view pinned now and written after more applies holds the state of when it was pinned.
    let current = current_snapshot(&mut leader).await;
    assert_eq!(current.meta.last_log_id.map(|l| l.index), Some(100));
    apply_put(&mut leader, 101, "k001", "v2").await;
    apply_put(&mut leader, 102, "new", "v2").await;
    assert_eq!(value_of(&leader, "k001"), Some(b"v2".to_vec()));

    let meta = current.meta.clone();
    let written = current.snapshot.into_file().await.expect("write the view");
    let path = written.path().to_path_buf();
    assert!(path.starts_with(&leader_snaps));
    assert!(path.exists());
    // What the follower receives: a copy of the file as sent.
    let received = follower_snaps.join("incoming-test.tmp");
    std::fs::copy(&path, &received).expect("copy");
    // A written file is removed when its handle goes (after it has been sent).
    drop(written);
    assert!(!path.exists());
    assert_eq!(files_in(&leader_snaps), Vec::<String>::new());

    // Installing a snapshot loads the pinned state and leaves no file behind.
    let again = current_snapshot(&mut leader).await;
    assert_eq!(again.meta.last_log_id.map(|l| l.index), Some(102));
    // The snapshot at index 100, pinned before the last two applies, as received.
    follower
        .install_snapshot(&meta, SnapshotFile::from_path(received))
        .await
        .expect("install");
    assert_eq!(files_in(&follower_snaps), Vec::<String>::new());
    let (applied, _) = follower.applied_state().await.expect("applied state");
    assert_eq!(applied.map(|l| l.index), Some(100));
    assert_eq!(value_of(&follower, "k001"), Some(b"v1".to_vec()));
    assert_eq!(value_of(&follower, "k100"), Some(b"v1".to_vec()));
    assert_eq!(value_of(&follower, "new"), None);

    // The view pinned at index 102 installs the later state, straight from the view.
    follower
        .install_snapshot(&again.meta, again.snapshot)
        .await
        .expect("install the later view");
    assert_eq!(value_of(&follower, "k001"), Some(b"v2".to_vec()));
    assert_eq!(value_of(&follower, "new"), Some(b"v2".to_vec()));
    assert_eq!(files_in(&follower_snaps), Vec::<String>::new());
    assert_eq!(files_in(&leader_snaps), Vec::<String>::new());
}

/// Files left in the snapshot directory by a crash (a view being written for a send, a
/// received file never installed) or by older versions (one file per snapshot) are removed
/// when the state machine opens; the state is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_snapshot_files_are_removed_on_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let snaps = dir.path().join("snapshots");
    {
        let mut sm = open_sm(dir.path());
        apply_put(&mut sm, 1, "a", "1").await;
    }
    for name in [
        "00000000000000000001-00000000000000000001-000001.snap",
        "00000000000000000001-00000000000000000001-000001.meta",
        "building-3.tmp",
        "view-00000000000000000001-000002.tmp",
        "incoming-77-0.tmp",
    ] {
        std::fs::write(snaps.join(name), b"left over").expect("write");
    }
    let sm = open_sm(dir.path());
    assert_eq!(files_in(&snaps), Vec::<String>::new());
    assert_eq!(value_of(&sm, "a"), Some(b"1".to_vec()));
}

/// A view that is dropped unwritten releases the engine snapshot and writes nothing, even
/// after the store moved on.
#[test]
fn a_view_dropped_unwritten_leaves_nothing() {
    // A runtime of its own: if a view were never released, its thread would block forever and
    // dropping a runtime waits for such threads, so the failure would be a hang; this one is
    // shut down with a deadline instead, and the assertion's panic is reported.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rt.block_on(views_dropped_unwritten_leave_nothing())
    }));
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

async fn views_dropped_unwritten_leave_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let snaps = dir.path().join("snapshots");
    let mut sm = open_sm(dir.path());
    apply_put(&mut sm, 1, "a", "1").await;
    for i in 0..20 {
        let snap = current_snapshot(&mut sm).await;
        apply_put(&mut sm, 2 + i, "a", "2").await;
        drop(snap);
    }
    // The writer threads end on their own; give them a moment to have written anything.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(files_in(&snaps), Vec::<String>::new());

    // The thread holding a view ends when the view is dropped: its check (which the thread
    // owns) is dropped with it.
    let held = Arc::new(());
    let witness = held.clone();
    let view = SnapshotFile::pin(
        sm.mvcc().engine().clone(),
        snaps.join("never.snap"),
        Box::new(move |_, _, _| {
            let _ = &witness;
            Ok(())
        }),
    )
    .await
    .expect("pin");
    assert_eq!(Arc::strong_count(&held), 2, "the thread holds the view");
    drop(view);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while Arc::strong_count(&held) > 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the view was not released"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(files_in(&snaps), Vec::<String>::new());
}

/// A view the check refuses while it is written (as a view whose applied index is not the
/// one its meta announces would be) is not sent: writing it fails and leaves no file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_view_fails_to_write_and_leaves_no_file() {
    use keel_store::engine::{Table, WriteBatch};
    let dir = tempfile::tempdir().expect("tempdir");
    let engine: Arc<dyn Engine> =
        Arc::new(RocksEngine::open(&dir.path().join("db")).expect("open rocksdb"));
    let mut batch = WriteBatch::new();
    batch.put(Table::Meta, b"raft/last_applied".to_vec(), b"x".to_vec());
    batch.put(Table::Kv, b"k".to_vec(), b"v".to_vec());
    engine.write(batch, true).expect("write");
    let target = dir.path().join("view.snap");
    let refused = SnapshotFile::pin(
        engine.clone(),
        target.clone(),
        Box::new(|table, _, _| {
            if table == Table::Meta {
                Err(std::io::Error::other("refused"))
            } else {
                Ok(())
            }
        }),
    )
    .await
    .expect("pin");
    let err = refused
        .into_file()
        .await
        .expect_err("a refused view must not be written");
    assert!(err.to_string().contains("refused"), "{err}");
    assert_eq!(files_in(dir.path()), vec!["db".to_string()]);
    // The same view with a check that accepts it is written.
    let accepted = SnapshotFile::pin(engine, target.clone(), Box::new(|_, _, _| Ok(())))
        .await
        .expect("pin")
        .into_file()
        .await
        .expect("write");
    assert_eq!(accepted.path(), target.as_path());
    assert!(target.exists());
}

fn put_from(key: &str, origin: Option<(u64, u64)>) -> RaftRequest {
    RaftRequest {
        request: Some(Cmd::Put(PutRequest {
            key: key.into(),
            value: b"v".to_vec(),
            ..Default::default()
        })),
        origin: origin.map(|(member, id)| keel_proto::keelpb::ForwardOrigin {
            member,
            incarnation: 77,
            id,
        }),
    }
}

/// The state machine of the member that forwarded requests hands their responses to its
/// listener, each with its entry's index, whether the entry held the request alone or in a
/// batch; requests of other members and unforwarded ones are not handed over. An installed
/// snapshot is announced to the listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_requests_are_answered_to_their_member_and_snapshots_announced() {
    use keel_proto::keelpb::ProposalBatch;
    use keel_store::raft::state_machine::{AppliedChunk, ApplyListener};
    use std::sync::Mutex;

    let leader_dir = tempfile::tempdir().expect("tempdir");
    let dir = tempfile::tempdir().expect("tempdir");
    let seen: Arc<Mutex<Vec<AppliedChunk>>> = Arc::default();
    let listener: ApplyListener = {
        let seen = seen.clone();
        Arc::new(move |chunk| seen.lock().expect("lock").push(chunk.clone()))
    };
    let engine: Arc<dyn Engine> =
        Arc::new(RocksEngine::open(&dir.path().join("db")).expect("open rocksdb"));
    let mvcc = Arc::new(MvccStore::open(engine).expect("open mvcc"));
    let mut sm = StateMachine::open(mvcc, &dir.path().join("snapshots"), Some(listener))
        .expect("state machine")
        .answering_forwards_of(9);
    let mut leader = open_sm(leader_dir.path());

    let batch = RaftRequest {
        request: Some(Cmd::Batch(ProposalBatch {
            requests: vec![
                put_from("a", Some((9, 1))),
                put_from("b", None),
                put_from("c", Some((7, 1))),
                put_from("d", Some((9, 2))),
            ],
        })),
        origin: None,
    };
    let entries = vec![
        Ok((
            Entry::new_normal(
                openraft::LogId::new_term_index(1, 1),
                Command::new(batch.clone()),
            ),
            None,
        )),
        Ok((
            Entry::new_normal(
                openraft::LogId::new_term_index(1, 2),
                Command::new(put_from("e", Some((9, 3)))),
            ),
            None,
        )),
    ];
    sm.apply(futures::stream::iter(entries))
        .await
        .expect("apply");
    leader
        .apply(futures::stream::iter(vec![Ok((
            Entry::new_normal(openraft::LogId::new_term_index(1, 1), Command::new(batch)),
            None,
        ))]))
        .await
        .expect("apply on the leader");

    let chunks = seen.lock().expect("lock").clone();
    let answers: Vec<(u64, u64, u64, i64)> = chunks
        .iter()
        .flat_map(|c| c.answers.iter())
        .map(|(o, r)| (o.member, o.id, r.index, r.revision))
        .collect();
    // Revisions: a=2, b=3, c=4, d=5 (entry 1), e=6 (entry 2).
    assert_eq!(answers, vec![(9, 1, 1, 2), (9, 2, 1, 5), (9, 3, 2, 6)]);
    assert!(chunks.iter().all(|c| !c.installed_snapshot));
    let before = chunks.len();

    let snapshot = current_snapshot(&mut leader).await;
    sm.install_snapshot(&snapshot.meta, snapshot.snapshot)
        .await
        .expect("install");
    let chunks = seen.lock().expect("lock").clone();
    assert_eq!(chunks.len(), before + 1);
    let last = chunks.last().expect("a chunk");
    assert!(last.installed_snapshot && last.answers.is_empty() && last.events.is_empty());
}
