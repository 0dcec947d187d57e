//! Auth through the apply path: permissions re-checked in apply with the revision carried in
//! the entry, changes in the same batch seen by later entries, persistence across reopen.

use std::sync::Arc;

use base64::Engine as _;
use keel_proto::authpb::{Permission, permission::Type as PermType};
use keel_proto::etcdserverpb::*;
use keel_proto::keelpb::raft_request::Request as Cmd;
use keel_proto::keelpb::{
    AuthorizedRequest, InternalAuthenticateRequest, RaftRequest, RaftResponse, RequestHeader,
};
use keel_store::ApplyErrorKind;
use keel_store::engine::Engine;
use keel_store::engine::rocks::RocksEngine;
use keel_store::mvcc::MvccStore;

use crate::helpers::{apply, on_engines};

fn as_user(user: &str, revision: u64, cmd: Cmd) -> Cmd {
    Cmd::Authorized(Box::new(AuthorizedRequest {
        header: Some(RequestHeader {
            username: user.into(),
            auth_revision: revision,
        }),
        request: Some(Box::new(RaftRequest {
            request: Some(cmd),
            origin: None,
        })),
    }))
}

fn ok(r: RaftResponse) -> RaftResponse {
    assert!(r.error.is_none(), "{r:?}");
    r
}

fn kind(r: &RaftResponse) -> ApplyErrorKind {
    ApplyErrorKind::from_u32(r.error.as_ref().expect("an error").kind)
}

fn put(k: &str) -> Cmd {
    Cmd::Put(PutRequest {
        key: k.into(),
        value: b"v".to_vec(),
        ..Default::default()
    })
}

/// root and alice (readwrite on prefix foo), auth enabled.
fn setup(store: &MvccStore) {
    let hash = base64::engine::general_purpose::STANDARD.encode("$2b$04$placeholder");
    for name in ["root", "alice"] {
        ok(apply(
            store,
            Cmd::AuthUserAdd(AuthUserAddRequest {
                name: name.into(),
                hashed_password: hash.clone(),
                ..Default::default()
            }),
        )
        .0);
    }
    ok(apply(
        store,
        Cmd::AuthRoleAdd(AuthRoleAddRequest { name: "r".into() }),
    )
    .0);
    ok(apply(
        store,
        Cmd::AuthRoleGrantPermission(AuthRoleGrantPermissionRequest {
            name: "r".into(),
            perm: Some(Permission {
                perm_type: PermType::Readwrite as i32,
                key: b"foo".to_vec(),
                range_end: b"fop".to_vec(),
            }),
        }),
    )
    .0);
    for (user, role) in [("root", "root"), ("alice", "r")] {
        ok(apply(
            store,
            Cmd::AuthUserGrantRole(AuthUserGrantRoleRequest {
                user: user.into(),
                role: role.into(),
            }),
        )
        .0);
    }
    ok(apply(store, Cmd::AuthEnable(AuthEnableRequest {})).0);
}

#[test]
fn apply_rechecks_with_the_entrys_revision() {
    on_engines(|_, store| {
        setup(store);
        let rev = store.auth().revision();
        ok(apply(store, as_user("alice", rev, put("foo1"))).0);
        let (r, _) = apply(store, as_user("alice", rev, put("zzz")));
        assert_eq!(kind(&r), ApplyErrorKind::PermissionDenied);
        let (r, _) = apply(store, as_user("", 0, put("foo1")));
        assert_eq!(kind(&r), ApplyErrorKind::UserEmpty);
        // A revocation committed before a request checked at the older revision: refused.
        let revoke = as_user(
            "root",
            rev,
            Cmd::AuthRoleRevokePermission(AuthRoleRevokePermissionRequest {
                role: "r".into(),
                key: b"foo".to_vec(),
                range_end: b"fop".to_vec(),
            }),
        );
        let mut b = store.begin_apply();
        assert!(
            b.apply(&RaftRequest {
                request: Some(revoke),
                origin: None,
            })
            .response
            .error
            .is_none()
        );
        let stale = b.apply(&RaftRequest {
            request: Some(as_user("alice", rev, put("foo2"))),
            origin: None,
        });
        assert_eq!(kind(&stale.response), ApplyErrorKind::AuthOldRevision);
        let fresh = b.apply(&RaftRequest {
            request: Some(as_user("alice", rev + 1, put("foo2"))),
            origin: None,
        });
        assert_eq!(kind(&fresh.response), ApplyErrorKind::PermissionDenied);
        b.commit(false).unwrap();
        assert_eq!(store.auth().revision(), rev + 1);
        // Unwrapped (member-internal) requests are not subject to permissions.
        ok(apply(store, put("zzz")).0);
        // Non-admins cannot change the auth store.
        let (r, _) = apply(
            store,
            as_user(
                "alice",
                rev + 1,
                Cmd::AuthRoleAdd(AuthRoleAddRequest { name: "x".into() }),
            ),
        );
        assert_eq!(kind(&r), ApplyErrorKind::PermissionDenied);
    });
}

#[test]
fn tokens_are_assigned_in_apply_and_auth_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let engine: Arc<dyn Engine> = Arc::new(RocksEngine::open(dir.path()).unwrap());
        let store = MvccStore::open(engine).unwrap();
        setup(&store);
        ok(apply(
            &store,
            Cmd::Authenticate(InternalAuthenticateRequest {
                name: "alice".into(),
                simple_token: "abcdefghijklmnop.1".into(),
            }),
        )
        .0);
        let now = std::time::Instant::now();
        let ttl = std::time::Duration::from_secs(60);
        assert_eq!(
            store
                .auth_tokens()
                .lookup("abcdefghijklmnop.1", now, ttl)
                .as_deref(),
            Some("alice")
        );
        let (r, _) = apply(
            &store,
            Cmd::Authenticate(InternalAuthenticateRequest {
                name: "bob".into(),
                simple_token: "abcdefghijklmnop.2".into(),
            }),
        );
        assert_eq!(kind(&r), ApplyErrorKind::AuthFailed);
    }
    let engine: Arc<dyn Engine> = Arc::new(RocksEngine::open(dir.path()).unwrap());
    let store = MvccStore::open(engine).unwrap();
    let auth = store.auth();
    assert!(auth.enabled());
    assert_eq!(auth.user_names(), vec!["alice", "root"]);
    assert_eq!(auth.user_get("alice").unwrap(), vec!["r"]);
    assert!(store.auth_tokens().is_empty(), "tokens live in memory only");
}
