//! Authentication and access control: etcdctl flows with the outputs real etcd 3.4 gives, and
//! raw gRPC calls for tokens (forged, expired, revoked), wrong passwords, permission edges and
//! changes that take effect at once.

use std::time::Duration;

use keel_proto::authpb::{Permission, permission::Type as PermType};
use keel_proto::etcdserverpb::auth_client::AuthClient;
use keel_proto::etcdserverpb::kv_client::KvClient;
use keel_proto::etcdserverpb::lease_client::LeaseClient;
use keel_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use keel_proto::etcdserverpb::watch_client::WatchClient;
use keel_proto::etcdserverpb::*;
use tonic::transport::Channel;
use tonic::{Code, Request};

use crate::cluster::Cluster;

fn etcdctl(endpoints: &[String], args: &[&str]) -> (bool, String) {
    crate::cluster::etcdctl_with(endpoints, &[], args)
}

async fn channel(endpoint: &str) -> Channel {
    Channel::from_shared(format!("http://{endpoint}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .connect_lazy()
}

/// `msg` with the token attached (when given).
fn with_token<T>(msg: T, token: Option<&str>) -> Request<T> {
    let mut req = Request::new(msg);
    if let Some(t) = token {
        req.metadata_mut().insert("token", t.parse().unwrap());
    }
    req
}

async fn login(ch: &Channel, user: &str, password: &str) -> Result<String, tonic::Status> {
    AuthClient::new(ch.clone())
        .authenticate(AuthenticateRequest {
            name: user.into(),
            password: password.into(),
        })
        .await
        .map(|r| r.into_inner().token)
}

fn perm(t: PermType, key: &str, end: &str) -> Permission {
    Permission {
        perm_type: t as i32,
        key: key.as_bytes().to_vec(),
        range_end: end.as_bytes().to_vec(),
    }
}

/// root (root role) and alice with role r1: readwrite [foo, fop), read bar, write [a, b).
/// Returns root's token.
async fn setup_users(ch: &Channel) -> String {
    let mut auth = AuthClient::new(ch.clone());
    for (name, pw) in [("root", "rootpw"), ("alice", "alicepw")] {
        auth.user_add(AuthUserAddRequest {
            name: name.into(),
            password: pw.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    auth.role_add(AuthRoleAddRequest { name: "r1".into() })
        .await
        .unwrap();
    for p in [
        perm(PermType::Readwrite, "foo", "fop"),
        perm(PermType::Read, "bar", ""),
        perm(PermType::Write, "a", "b"),
    ] {
        auth.role_grant_permission(AuthRoleGrantPermissionRequest {
            name: "r1".into(),
            perm: Some(p),
        })
        .await
        .unwrap();
    }
    for (user, role) in [("root", "root"), ("alice", "r1")] {
        auth.user_grant_role(AuthUserGrantRoleRequest {
            user: user.into(),
            role: role.into(),
        })
        .await
        .unwrap();
    }
    auth.auth_enable(AuthEnableRequest {}).await.unwrap();
    login(ch, "root", "rootpw").await.unwrap()
}

fn range(key: &str, end: &str) -> RangeRequest {
    RangeRequest {
        key: key.as_bytes().to_vec(),
        range_end: end.as_bytes().to_vec(),
        ..Default::default()
    }
}

fn put(key: &str) -> PutRequest {
    PutRequest {
        key: key.as_bytes().to_vec(),
        value: b"v".to_vec(),
        ..Default::default()
    }
}

fn denied(r: Result<impl std::fmt::Debug, tonic::Status>) {
    assert_status(r, Code::PermissionDenied, "etcdserver: permission denied")
}

fn assert_status(r: Result<impl std::fmt::Debug, tonic::Status>, code: Code, msg: &str) {
    match r {
        Err(s) => {
            assert_eq!((s.code(), s.message()), (code, msg), "{s:?}");
        }
        Ok(v) => panic!("expected {code:?} {msg}, got {v:?}"),
    }
}

#[tokio::test]
async fn etcdctl_flows_match_etcd() {
    let cluster = Cluster::start(1).await;
    let ep = cluster.endpoints();
    let run = |args: &[&str]| etcdctl(&ep, args);
    assert_eq!(
        run(&["user", "add", "root:pw"]),
        (true, "User root created\n".into())
    );
    assert_eq!(
        run(&["user", "add", "root:pw"]),
        (
            false,
            "Error: etcdserver: user name already exists\n".into()
        )
    );
    // etcdctl adds the root role and grants it to root by itself.
    assert_eq!(
        run(&["auth", "enable"]),
        (true, "Authentication Enabled\n".into())
    );
    assert_eq!(
        run(&["user", "grant-role", "root", "root"]),
        (false, "Error: etcdserver: user name is empty\n".into())
    );
    let root = ["--user", "root:pw"];
    let as_root = |args: &[&str]| {
        let mut v = args.to_vec();
        v.extend_from_slice(&root);
        run(&v)
    };
    assert_eq!(as_root(&["role", "list"]), (true, "root\n".into()));
    assert_eq!(
        as_root(&["user", "add", "alice:apw"]),
        (true, "User alice created\n".into())
    );
    assert_eq!(
        as_root(&["role", "add", "r1"]),
        (true, "Role r1 created\n".into())
    );
    for args in [
        &[
            "role",
            "grant-permission",
            "r1",
            "readwrite",
            "foo",
            "--prefix=true",
        ][..],
        &["role", "grant-permission", "r1", "read", "bar"],
        &["role", "grant-permission", "r1", "write", "a", "b"],
    ] {
        assert_eq!(as_root(args), (true, "Role r1 updated\n".into()));
    }
    assert_eq!(
        as_root(&["user", "grant-role", "alice", "r1"]),
        (true, "Role r1 is granted to user alice\n".into())
    );
    let r1 = "Role r1\nKV Read:\n\tbar\n\t[foo, fop) (prefix foo)\nKV Write:\n\t[a, b) (prefix a)\n\t[foo, fop) (prefix foo)\n";
    assert_eq!(as_root(&["role", "get", "r1"]), (true, r1.into()));
    assert_eq!(
        as_root(&["role", "get", "root"]),
        (true, "Role root\nKV Read:\nKV Write:\n".into())
    );
    assert_eq!(as_root(&["user", "list"]), (true, "alice\nroot\n".into()));

    let alice = |args: &[&str]| {
        let mut v = args.to_vec();
        v.extend_from_slice(&["--user", "alice:apw"]);
        run(&v)
    };
    let denied = (false, "Error: etcdserver: permission denied\n".to_string());
    assert_eq!(alice(&["put", "foo1", "v"]), (true, "OK\n".into()));
    assert_eq!(alice(&["put", "bar", "v"]), denied);
    assert_eq!(alice(&["get", "bar"]), (true, String::new()));
    assert_eq!(
        alice(&["get", "foo", "--prefix"]),
        (true, "foo1\nv\n".into())
    );
    assert_eq!(alice(&["get", "a"]), denied);
    assert_eq!(alice(&["get", "bar", "bas"]), denied);
    assert_eq!(alice(&["put", "a1", "x"]), (true, "OK\n".into()));
    assert_eq!(alice(&["del", "a", "--prev-kv"]), denied);
    assert_eq!(alice(&["del", "foo", "--prefix"]), (true, "1\n".into()));
    assert_eq!(alice(&["user", "get", "root"]), denied);
    assert_eq!(
        alice(&["user", "get", "alice"]),
        (true, "User: alice\nRoles: r1\n".into())
    );
    assert_eq!(alice(&["role", "get", "r1"]), (true, r1.into()));
    assert_eq!(
        run(&["get", "foo"]),
        (false, "Error: etcdserver: user name is empty\n".into())
    );
    let bad_login = (
        false,
        "Error: etcdserver: authentication failed, invalid user ID or password\n".to_string(),
    );
    assert_eq!(run(&["get", "foo", "--user", "alice:bad"]), bad_login);
    assert_eq!(run(&["get", "foo", "--user", "bob:bad"]), bad_login);
    // Admin-only RPCs, with etcd 3.4/3.5's errors.
    assert_eq!(
        alice(&["member", "add", "x", "--peer-urls", "http://127.0.0.1:9"]),
        denied
    );
    let (ok, out) = alice(&["endpoint", "hashkv"]);
    assert!(
        !ok && out.contains("rpc error: code = Unknown desc = auth: permission denied"),
        "{out}"
    );
    let (ok, out) = run(&["member", "list"]);
    assert!(
        ok && out.lines().count() == 1,
        "member list stays open: {out}"
    );
    // Management errors.
    for (args, err) in [
        (&["role", "add", ""][..], "etcdserver: role name is empty"),
        (
            &["role", "grant-permission", "nosuch", "read", "x"],
            "etcdserver: role name not found",
        ),
        (
            &["user", "grant-role", "alice", "nosuch"],
            "etcdserver: role name not found",
        ),
        (
            &["user", "revoke-role", "alice", "nosuch"],
            "etcdserver: role is not granted to the user",
        ),
        (
            &["role", "revoke-permission", "r1", "zzz"],
            "etcdserver: permission is not granted to the role",
        ),
        (
            &["user", "delete", "root"],
            "etcdserver: invalid auth management",
        ),
        (
            &["role", "delete", "root"],
            "etcdserver: invalid auth management",
        ),
        (
            &["user", "revoke-role", "root", "root"],
            "etcdserver: invalid auth management",
        ),
        (
            &["user", "delete", "nosuch"],
            "etcdserver: user name not found",
        ),
        (
            &["role", "delete", "nosuch"],
            "etcdserver: role name not found",
        ),
        (
            &["user", "get", "nosuch"],
            "etcdserver: user name not found",
        ),
        (
            &["role", "get", "nosuch"],
            "etcdserver: role name not found",
        ),
    ] {
        assert_eq!(
            as_root(args),
            (false, format!("Error: {err}\n")),
            "{args:?}"
        );
    }
    // A watch on a key alice may not read is created and canceled at once.
    let (ok, out) = alice(&["watch", "zzz"]);
    assert!(
        !ok && out.contains(
            "watch was canceled (rpc error: code = PermissionDenied desc = etcdserver: permission denied)"
        ),
        "{out}"
    );
    assert_eq!(
        as_root(&["auth", "disable"]),
        (true, "Authentication Disabled\n".into())
    );
    assert_eq!(run(&["get", "foo1"]), (true, String::new()));
}

#[tokio::test]
async fn tokens_forged_expired_and_revoked() {
    let cluster = Cluster::start_with(1, &["--auth-token-ttl", "2"]).await;
    let ch = channel(&cluster.members[0].endpoint()).await;
    let root = setup_users(&ch).await;
    let mut kv = KvClient::new(ch.clone());

    assert_status(
        login(&ch, "alice", "wrong").await,
        Code::InvalidArgument,
        "etcdserver: authentication failed, invalid user ID or password",
    );
    assert_status(
        login(&ch, "nobody", "x").await,
        Code::InvalidArgument,
        "etcdserver: authentication failed, invalid user ID or password",
    );
    let alice = login(&ch, "alice", "alicepw").await.unwrap();
    assert_ne!(alice, root);
    kv.range(with_token(range("foo", ""), Some(&alice)))
        .await
        .unwrap();

    // Forged tokens: the right shape but never issued, another user's token with a changed
    // letter, garbage.
    let mut forged = alice.clone().into_bytes();
    forged[0] = if forged[0] == b'a' { b'b' } else { b'a' };
    for t in [
        "abcdefghijklmnop.123".to_string(),
        String::from_utf8(forged).unwrap(),
        "garbage".into(),
    ] {
        assert_status(
            kv.range(with_token(range("foo", ""), Some(&t))).await,
            Code::Unauthenticated,
            "etcdserver: invalid auth token",
        );
    }
    assert_status(
        kv.range(with_token(range("foo", ""), None)).await,
        Code::InvalidArgument,
        "etcdserver: user name is empty",
    );
    // The "authorization" metadata works too (etcd's gateway header).
    let mut req = Request::new(range("foo", ""));
    req.metadata_mut()
        .insert("authorization", format!("Bearer {alice}").parse().unwrap());
    kv.range(req).await.unwrap();

    // Expiry: a token unused for the TTL (2 s here) is gone; a used one stays.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        kv.range(with_token(range("foo", ""), Some(&root)))
            .await
            .expect("a token in use does not expire");
    }
    assert_status(
        kv.range(with_token(range("foo", ""), Some(&alice))).await,
        Code::Unauthenticated,
        "etcdserver: invalid auth token",
    );

    // Changing the password revokes the user's tokens at once; the old password stops working.
    // (Root's token is fetched again before each use below: a login hashes a password, and a
    // few of them on a busy machine can outlast the 2 s TTL.)
    let alice = login(&ch, "alice", "alicepw").await.unwrap();
    let mut auth = AuthClient::new(ch.clone());
    let root = login(&ch, "root", "rootpw").await.unwrap();
    auth.user_change_password(with_token(
        AuthUserChangePasswordRequest {
            name: "alice".into(),
            password: "newpw".into(),
            ..Default::default()
        },
        Some(&root),
    ))
    .await
    .unwrap();
    assert_status(
        kv.range(with_token(range("foo", ""), Some(&alice))).await,
        Code::Unauthenticated,
        "etcdserver: invalid auth token",
    );
    assert!(login(&ch, "alice", "alicepw").await.is_err());
    let alice = login(&ch, "alice", "newpw").await.unwrap();

    // Deleting the user revokes its tokens too.
    let root = login(&ch, "root", "rootpw").await.unwrap();
    auth.user_delete(with_token(
        AuthUserDeleteRequest {
            name: "alice".into(),
        },
        Some(&root),
    ))
    .await
    .unwrap();
    assert_status(
        kv.put(with_token(put("foo1"), Some(&alice))).await,
        Code::Unauthenticated,
        "etcdserver: invalid auth token",
    );
    // Non-admins cannot manage auth.
    let mut auth2 = AuthClient::new(ch.clone());
    assert_status(
        auth2
            .user_list(with_token(AuthUserListRequest {}, None))
            .await,
        Code::InvalidArgument,
        "etcdserver: user name is empty",
    );
    // Disabling auth drops every token; requests then need none.
    let root = login(&ch, "root", "rootpw").await.unwrap();
    auth.auth_disable(with_token(AuthDisableRequest {}, Some(&root)))
        .await
        .unwrap();
    kv.put(with_token(put("foo1"), None)).await.unwrap();
    assert_status(
        login(&ch, "root", "rootpw").await,
        Code::FailedPrecondition,
        "etcdserver: authentication is not enabled",
    );
    let status = auth
        .auth_status(with_token(AuthStatusRequest {}, None))
        .await
        .unwrap()
        .into_inner();
    assert!(!status.enabled && status.auth_revision > 1, "{status:?}");
}

#[tokio::test]
async fn permission_edges_and_transactions() {
    let cluster = Cluster::start(1).await;
    let ch = channel(&cluster.members[0].endpoint()).await;
    let root = setup_users(&ch).await;
    let alice = login(&ch, "alice", "alicepw").await.unwrap();
    let mut kv = KvClient::new(ch.clone());
    let a = Some(alice.as_str());

    // Range ends and prefixes.
    kv.range(with_token(range("foo", "fop"), a)).await.unwrap();
    kv.range(with_token(range("foo/x", "foo/y"), a))
        .await
        .unwrap();
    denied(kv.range(with_token(range("foo", "foq"), a)).await);
    denied(kv.range(with_token(range("fo", "fop"), a)).await);
    denied(kv.range(with_token(range("fop", ""), a)).await);
    denied(kv.range(with_token(range("foo", "\0"), a)).await);
    kv.range(with_token(range("bar", ""), a)).await.unwrap();
    kv.range(with_token(range("bar", "bar\0"), a))
        .await
        .unwrap();
    denied(kv.range(with_token(range("bar", "bas"), a)).await);
    denied(kv.range(with_token(range("a", ""), a)).await);
    kv.put(with_token(put("a"), a)).await.unwrap();
    kv.put(with_token(put("az"), a)).await.unwrap();
    denied(kv.put(with_token(put("b"), a)).await);
    denied(kv.put(with_token(put("bar"), a)).await);
    let mut p = put("a1");
    p.prev_kv = true;
    denied(kv.put(with_token(p, a)).await);
    denied(
        kv.delete_range(with_token(
            DeleteRangeRequest {
                key: b"a".to_vec(),
                range_end: b"c".to_vec(),
                ..Default::default()
            },
            a,
        ))
        .await,
    );
    kv.delete_range(with_token(
        DeleteRangeRequest {
            key: b"a".to_vec(),
            range_end: b"b".to_vec(),
            ..Default::default()
        },
        a,
    ))
    .await
    .unwrap();

    // A transaction mixing allowed and denied keys is refused whole, whichever branch runs.
    let op_put = |k: &str| RequestOp {
        request: Some(request_op::Request::RequestPut(put(k))),
    };
    let before = kv
        .range(with_token(range("\0", "\0"), Some(&root)))
        .await
        .unwrap()
        .into_inner()
        .header
        .unwrap()
        .revision;
    let txn = |compare: &str, success: Vec<RequestOp>, failure: Vec<RequestOp>| TxnRequest {
        compare: vec![Compare {
            key: compare.as_bytes().to_vec(),
            target: compare::CompareTarget::Version as i32,
            result: compare::CompareResult::Equal as i32,
            target_union: Some(compare::TargetUnion::Version(0)),
            ..Default::default()
        }],
        success,
        failure,
    };
    kv.txn(with_token(
        txn("foo1", vec![op_put("foo1"), op_put("a2")], vec![]),
        a,
    ))
    .await
    .unwrap();
    denied(
        kv.txn(with_token(
            txn("foo2", vec![op_put("foo2")], vec![op_put("bar")]),
            a,
        ))
        .await,
    );
    denied(
        kv.txn(with_token(txn("zzz", vec![op_put("foo3")], vec![]), a))
            .await,
    );
    let nested = RequestOp {
        request: Some(request_op::Request::RequestTxn(txn(
            "foo4",
            vec![op_put("secret")],
            vec![],
        ))),
    };
    denied(
        kv.txn(with_token(
            txn("foo4", vec![op_put("foo4"), nested], vec![]),
            a,
        ))
        .await,
    );
    // Read-only transactions are served on the member that receives them (no log entry),
    // with the same checks: every compare and every range of both branches.
    let op_get = |k: &str| RequestOp {
        request: Some(request_op::Request::RequestRange(range(k, ""))),
    };
    kv.txn(with_token(
        txn("foo1", vec![op_get("foo1")], vec![op_get("bar")]),
        a,
    ))
    .await
    .unwrap();
    denied(
        kv.txn(with_token(
            txn("foo1", vec![op_get("foo1")], vec![op_get("a")]),
            a,
        ))
        .await,
    );
    denied(
        kv.txn(with_token(txn("a", vec![op_get("foo1")], vec![]), a))
            .await,
    );
    let after = kv
        .range(with_token(range("\0", "\0"), Some(&root)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        after.header.unwrap().revision,
        before + 1,
        "only the allowed transaction wrote"
    );
    let keys: Vec<String> = after
        .kvs
        .iter()
        .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
        .collect();
    assert_eq!(keys, vec!["a2", "foo1"]);

    // Compaction is for admins.
    denied(
        kv.compact(with_token(
            CompactionRequest {
                revision: 1,
                ..Default::default()
            },
            a,
        ))
        .await,
    );

    // Leases: revoking one deletes its keys, so it needs write access to them; listing its keys
    // needs read access.
    let mut lease = LeaseClient::new(ch.clone());
    let id = lease
        .lease_grant(with_token(
            LeaseGrantRequest {
                ttl: 60,
                ..Default::default()
            },
            a,
        ))
        .await
        .unwrap()
        .into_inner()
        .id;
    // bar: alice may only read it; a5: alice may only write it.
    for key in ["bar", "a5"] {
        let mut p = put(key);
        p.lease = id;
        kv.put(with_token(p, Some(&root))).await.unwrap();
    }
    denied(
        lease
            .lease_time_to_live(with_token(LeaseTimeToLiveRequest { id, keys: true }, a))
            .await,
    );
    lease
        .lease_time_to_live(with_token(LeaseTimeToLiveRequest { id, keys: false }, a))
        .await
        .unwrap();
    denied(
        lease
            .lease_revoke(with_token(LeaseRevokeRequest { id }, a))
            .await,
    );
    let mut p = put("foo9");
    p.lease = id;
    denied(kv.put(with_token(p, a)).await);
    lease
        .lease_revoke(with_token(LeaseRevokeRequest { id }, Some(&root)))
        .await
        .unwrap();

    // Maintenance admin RPCs fail as etcd 3.5's do.
    let mut m = MaintenanceClient::new(ch.clone());
    assert_status(
        m.hash_kv(with_token(HashKvRequest { revision: 0 }, a))
            .await,
        Code::Unknown,
        "auth: permission denied",
    );
    assert_status(
        m.defragment(with_token(DefragmentRequest {}, None)).await,
        Code::Unknown,
        "auth: user name is empty",
    );
    m.status(with_token(StatusRequest {}, None)).await.unwrap();
}

#[tokio::test]
async fn changes_take_effect_at_once() {
    let cluster = Cluster::start(3).await;
    let eps = cluster.endpoints();
    let leader = cluster.leader().await;
    let ch_leader = channel(&eps[leader]).await;
    let ch_follower = channel(&eps[(leader + 1) % 3]).await;
    let root = setup_users(&ch_leader).await;
    // A token issued by one member works on every member (clients balance across endpoints).
    let alice = login(&ch_follower, "alice", "alicepw").await.unwrap();
    for ep in &eps {
        let mut kv = KvClient::new(channel(ep).await);
        kv.put(with_token(put("foo1"), Some(&alice))).await.unwrap();
        kv.range(with_token(range("foo", "fop"), Some(&alice)))
            .await
            .unwrap();
    }
    // Revoking a permission on one member is in force for the very next request anywhere, with
    // the same token.
    let mut auth = AuthClient::new(ch_leader.clone());
    auth.role_revoke_permission(with_token(
        AuthRoleRevokePermissionRequest {
            role: "r1".into(),
            key: b"foo".to_vec(),
            range_end: b"fop".to_vec(),
        },
        Some(&root),
    ))
    .await
    .unwrap();
    for ep in &eps {
        let mut kv = KvClient::new(channel(ep).await);
        assert_status(
            kv.put(with_token(put("foo1"), Some(&alice))).await,
            Code::PermissionDenied,
            "etcdserver: permission denied",
        );
        assert_status(
            kv.range(with_token(range("foo1", ""), Some(&alice))).await,
            Code::PermissionDenied,
            "etcdserver: permission denied",
        );
    }
    // Granting works at once too, and a revoked role takes everything it gave.
    auth.role_grant_permission(with_token(
        AuthRoleGrantPermissionRequest {
            name: "r1".into(),
            perm: Some(perm(PermType::Write, "foo", "fop")),
        },
        Some(&root),
    ))
    .await
    .unwrap();
    let mut kv = KvClient::new(ch_follower.clone());
    kv.put(with_token(put("foo2"), Some(&alice))).await.unwrap();
    auth.user_revoke_role(with_token(
        AuthUserRevokeRoleRequest {
            name: "alice".into(),
            role: "r1".into(),
        },
        Some(&root),
    ))
    .await
    .unwrap();
    assert_status(
        kv.put(with_token(put("foo3"), Some(&alice))).await,
        Code::PermissionDenied,
        "etcdserver: permission denied",
    );
    // A watch created after the change is refused with etcd's cancel reason.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(
            WatchCreateRequest {
                key: b"foo".to_vec(),
                ..Default::default()
            },
        )),
    })
    .await
    .unwrap();
    let mut w = WatchClient::new(ch_follower.clone());
    let mut stream = w
        .watch(with_token(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            Some(&alice),
        ))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    assert!(resp.created && resp.canceled, "{resp:?}");
    assert_eq!(
        resp.cancel_reason,
        "rpc error: code = PermissionDenied desc = etcdserver: permission denied"
    );
    drop(tx);

    // Everything survives a restart of every member (the auth state is in the store); tokens
    // do not, like etcd's simple tokens.
    let mut cluster = cluster;
    for m in &mut cluster.members {
        m.kill();
    }
    for m in &mut cluster.members {
        m.start();
    }
    let ep = cluster.members[0].endpoint();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let root2 = loop {
        if let Ok(t) = login(&channel(&ep).await, "root", "rootpw").await {
            break t;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "cluster did not come back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let ch = channel(&ep).await;
    assert_status(
        KvClient::new(ch.clone())
            .range(with_token(range("foo", ""), Some(&root)))
            .await,
        Code::Unauthenticated,
        "etcdserver: invalid auth token",
    );
    let users = AuthClient::new(ch.clone())
        .user_list(with_token(AuthUserListRequest {}, Some(&root2)))
        .await
        .unwrap()
        .into_inner()
        .users;
    assert_eq!(users, vec!["alice", "root"]);
}
