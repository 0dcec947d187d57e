//! keel-proto: the etcd v3 API and Keel's internal protocol as Rust types.
//!
//! Module map (each module is one protobuf package, named exactly as etcd names it, so the wire
//! format and the gRPC paths such as `/etcdserverpb.KV/Range` are etcd's):
//! - [`mvccpb`] (`proto/mvccpb/kv.proto`): `KeyValue`, `Event`.
//! - [`authpb`] (`proto/authpb/auth.proto`): users, roles, permissions.
//! - [`etcdserverpb`] (`proto/etcdserverpb/rpc.proto`): the KV, Watch, Lease, Cluster,
//!   Maintenance and Auth services and all their messages.
//! - [`v3lockpb`] (`proto/v3lockpb/v3lock.proto`): the server-side Lock service.
//! - [`v3electionpb`] (`proto/v3electionpb/v3election.proto`): the server-side Election service.
//! - [`keelpb`] (`proto/keel/raft.proto`): what goes into Keel's Raft log and what members say
//!   to each other (not part of the etcd API).
//!
//! With the default `grpc` feature the tonic clients (`*_client` modules) and servers
//! (`*_server` modules) are generated too; without it the crate has only the prost messages
//! (all `keel-store` needs) and does not depend on tonic.
//!
//! [`h2_body`] (with `grpc`): an `h2` stream as an `http_body::Body`, for gRPC over a bare
//! `h2` connection (the server's client connections, the load generator's lean transport).
//!
//! The generated code refers to other packages as `super::mvccpb::...`, so every package is a
//! module at the crate root.

macro_rules! package {
    ($name:ident, $file:literal) => {
        #[allow(
            clippy::all,
            clippy::pedantic,
            clippy::doc_lazy_continuation,
            clippy::large_enum_variant,
            missing_docs,
            rustdoc::all
        )]
        pub mod $name {
            include!(concat!(env!("OUT_DIR"), "/", $file));
        }
    };
}

#[cfg(feature = "grpc")]
pub mod h2_body;

package!(mvccpb, "mvccpb.rs");
package!(authpb, "authpb.rs");
package!(etcdserverpb, "etcdserverpb.rs");
package!(v3lockpb, "v3lockpb.rs");
package!(v3electionpb, "v3electionpb.rs");
package!(keelpb, "keelpb.rs");

/// Bits of `keelpb.MemberIdentity.features`: what a member's apply understands, so a leader
/// proposes a new kind of log entry only once every member can apply it.
pub mod member_features {
    /// The member applies `keelpb.ProposalBatch` entries.
    pub const PROPOSAL_BATCHES: u64 = 1;
}

/// The encoded `google.protobuf.FileDescriptorSet` of every package above (for gRPC reflection
/// and a JSON gateway).
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));

#[cfg(test)]
mod tests {
    //! Wire facts checked against etcd's own .proto files: each expected byte string is worked out
    //! by hand from etcd's field numbers (tag byte = field number << 3 | wire type).

    use super::etcdserverpb::*;
    use super::mvccpb::{Event, KeyValue, event::EventType};
    use prost::Message;

    #[test]
    fn range_request() {
        let r = RangeRequest {
            key: b"foo".to_vec(),
            range_end: b"fop".to_vec(),
            limit: 3,
            ..Default::default()
        };
        // key = 1, range_end = 2, limit = 3.
        let expected = [
            0x0a, 3, b'f', b'o', b'o', 0x12, 3, b'f', b'o', b'p', 0x18, 3,
        ];
        assert_eq!(r.encode_to_vec(), expected);
        assert_eq!(RangeRequest::decode(&expected[..]).unwrap(), r);

        let r = RangeRequest {
            revision: 4,
            sort_order: range_request::SortOrder::Descend as i32,
            sort_target: range_request::SortTarget::Mod as i32,
            serializable: true,
            keys_only: true,
            count_only: true,
            min_mod_revision: 10,
            max_mod_revision: 11,
            min_create_revision: 12,
            max_create_revision: 13,
            ..Default::default()
        };
        #[rustfmt::skip]
        let expected = [
            0x20, 4, 0x28, 2, 0x30, 3, 0x38, 1, 0x40, 1, 0x48, 1,
            0x50, 10, 0x58, 11, 0x60, 12, 0x68, 13,
        ];
        assert_eq!(r.encode_to_vec(), expected);
    }

    #[test]
    fn put_and_delete() {
        let p = PutRequest {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            lease: 7,
            prev_kv: true,
            ignore_value: true,
            ignore_lease: true,
        };
        // key = 1, value = 2, lease = 3, prev_kv = 4, ignore_value = 5, ignore_lease = 6.
        let expected = [
            0x0a, 1, b'k', 0x12, 1, b'v', 0x18, 7, 0x20, 1, 0x28, 1, 0x30, 1,
        ];
        assert_eq!(p.encode_to_vec(), expected);
        assert_eq!(PutRequest::decode(&expected[..]).unwrap(), p);

        let d = DeleteRangeRequest {
            key: b"a".to_vec(),
            range_end: b"b".to_vec(),
            prev_kv: true,
        };
        assert_eq!(d.encode_to_vec(), [0x0a, 1, b'a', 0x12, 1, b'b', 0x18, 1]);
        let d = DeleteRangeResponse {
            header: None,
            deleted: 2,
            prev_kvs: vec![KeyValue::default()],
        };
        assert_eq!(d.encode_to_vec(), [0x10, 2, 0x1a, 0]);
    }

    #[test]
    fn key_value_and_header() {
        let kv = KeyValue {
            key: vec![1],
            create_revision: 2,
            mod_revision: 3,
            version: 4,
            value: vec![5],
            lease: 6,
        };
        assert_eq!(
            kv.encode_to_vec(),
            [0x0a, 1, 1, 0x10, 2, 0x18, 3, 0x20, 4, 0x2a, 1, 5, 0x30, 6]
        );
        let h = ResponseHeader {
            cluster_id: 1,
            member_id: 2,
            revision: 3,
            raft_term: 4,
        };
        assert_eq!(h.encode_to_vec(), [0x08, 1, 0x10, 2, 0x18, 3, 0x20, 4]);
        // RangeResponse: header = 1, kvs = 2, more = 3, count = 4.
        let r = RangeResponse {
            header: Some(h),
            kvs: vec![KeyValue::default()],
            more: true,
            count: 9,
        };
        assert_eq!(
            r.encode_to_vec(),
            [
                0x0a, 8, 0x08, 1, 0x10, 2, 0x18, 3, 0x20, 4, 0x12, 0, 0x18, 1, 0x20, 9
            ]
        );
    }

    #[test]
    fn compare_and_txn() {
        let c = Compare {
            target_union: Some(compare::TargetUnion::ModRevision(7)),
            ..Default::default()
        };
        assert_eq!(c.encode_to_vec(), [0x30, 7]);
        let c = Compare {
            target_union: Some(compare::TargetUnion::Lease(7)),
            ..Default::default()
        };
        assert_eq!(c.encode_to_vec(), [0x40, 7]);
        let c = Compare {
            target_union: Some(compare::TargetUnion::Value(b"v".to_vec())),
            ..Default::default()
        };
        assert_eq!(c.encode_to_vec(), [0x3a, 1, b'v']);

        // As an etcd client sends it (fields in number order): result = 1, target = 2, key = 3,
        // lease = 8 in the oneof, range_end = 64 (tag 64 << 3 | 2 = 514, varint 0x82 0x04).
        let wire = [
            0x08, 3, 0x10, 4, 0x1a, 1, b'k', 0x40, 7, 0x82, 0x04, 1, b'l',
        ];
        let c = Compare::decode(&wire[..]).unwrap();
        assert_eq!(c.result(), compare::CompareResult::NotEqual);
        assert_eq!(c.target(), compare::CompareTarget::Lease);
        assert_eq!(c.key, b"k");
        assert_eq!(c.target_union, Some(compare::TargetUnion::Lease(7)));
        assert_eq!(c.range_end, b"l");

        // TxnRequest: compare = 1, success = 2, failure = 3; RequestOp: request_range = 1,
        // request_put = 2, request_delete_range = 3, request_txn = 4.
        let t = TxnRequest {
            compare: vec![Compare::default()],
            success: vec![RequestOp {
                request: Some(request_op::Request::RequestPut(PutRequest::default())),
            }],
            failure: vec![RequestOp {
                request: Some(request_op::Request::RequestTxn(TxnRequest::default())),
            }],
        };
        assert_eq!(
            t.encode_to_vec(),
            [0x0a, 0, 0x12, 2, 0x12, 0, 0x1a, 2, 0x22, 0]
        );
        // TxnResponse: succeeded = 2, responses = 3; ResponseOp: response_delete_range = 3.
        let t = TxnResponse {
            header: None,
            succeeded: true,
            responses: vec![ResponseOp {
                response: Some(response_op::Response::ResponseDeleteRange(
                    DeleteRangeResponse::default(),
                )),
            }],
        };
        assert_eq!(t.encode_to_vec(), [0x10, 1, 0x1a, 2, 0x1a, 0]);
    }

    #[test]
    fn watch() {
        let w = WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(
                WatchCreateRequest {
                    key: b"a".to_vec(),
                    range_end: Vec::new(),
                    start_revision: 5,
                    progress_notify: true,
                    filters: vec![watch_create_request::FilterType::Nodelete as i32],
                    prev_kv: true,
                    watch_id: 9,
                    fragment: true,
                },
            )),
        };
        // create_request = 1; inside: key = 1, start_revision = 3, progress_notify = 4,
        // filters = 5 (packed), prev_kv = 6, watch_id = 7, fragment = 8.
        #[rustfmt::skip]
        let expected = [
            0x0a, 16,
            0x0a, 1, b'a', 0x18, 5, 0x20, 1, 0x2a, 1, 1, 0x30, 1, 0x38, 9, 0x40, 1,
        ];
        assert_eq!(w.encode_to_vec(), expected);
        assert_eq!(WatchRequest::decode(&expected[..]).unwrap(), w);
        // An unpacked repeated enum (also legal on the wire) decodes the same.
        let unpacked = [0x0a, 4, 0x28, 0, 0x28, 1];
        let Some(watch_request::RequestUnion::CreateRequest(c)) =
            WatchRequest::decode(&unpacked[..]).unwrap().request_union
        else {
            panic!("not a create request");
        };
        assert_eq!(c.filters, [0, 1]);

        let w = WatchRequest {
            request_union: Some(watch_request::RequestUnion::CancelRequest(
                WatchCancelRequest { watch_id: 1 },
            )),
        };
        assert_eq!(w.encode_to_vec(), [0x12, 2, 0x08, 1]);
        let w = WatchRequest {
            request_union: Some(watch_request::RequestUnion::ProgressRequest(
                WatchProgressRequest {},
            )),
        };
        assert_eq!(w.encode_to_vec(), [0x1a, 0]);

        // WatchResponse: watch_id = 2, created = 3, canceled = 4, compact_revision = 5,
        // cancel_reason = 6, fragment = 7, events = 11 (tag 0x5a). Event: type = 1, kv = 2.
        let r = WatchResponse {
            header: None,
            watch_id: 1,
            created: true,
            canceled: true,
            compact_revision: 7,
            cancel_reason: "x".into(),
            fragment: true,
            events: vec![Event {
                r#type: EventType::Delete as i32,
                kv: Some(KeyValue {
                    key: b"k".to_vec(),
                    mod_revision: 3,
                    ..Default::default()
                }),
                prev_kv: None,
            }],
        };
        #[rustfmt::skip]
        let expected = [
            0x10, 1, 0x18, 1, 0x20, 1, 0x28, 7, 0x32, 1, b'x', 0x38, 1,
            0x5a, 9, 0x08, 1, 0x12, 5, 0x0a, 1, b'k', 0x18, 3,
        ];
        assert_eq!(r.encode_to_vec(), expected);
        let prev = Event {
            prev_kv: Some(KeyValue::default()),
            ..Default::default()
        };
        assert_eq!(prev.encode_to_vec(), [0x1a, 0]);
    }

    #[test]
    fn lease() {
        let g = LeaseGrantRequest { ttl: 10, id: 5 };
        assert_eq!(g.encode_to_vec(), [0x08, 10, 0x10, 5]);
        let g = LeaseGrantResponse {
            header: None,
            id: 5,
            ttl: 10,
            error: "e".into(),
        };
        assert_eq!(g.encode_to_vec(), [0x10, 5, 0x18, 10, 0x22, 1, b'e']);
        let k = LeaseKeepAliveResponse {
            header: None,
            id: 5,
            ttl: 10,
        };
        assert_eq!(k.encode_to_vec(), [0x10, 5, 0x18, 10]);
        let t = LeaseTimeToLiveRequest { id: 5, keys: true };
        assert_eq!(t.encode_to_vec(), [0x08, 5, 0x10, 1]);
        let t = LeaseTimeToLiveResponse {
            header: None,
            id: 5,
            ttl: 3,
            granted_ttl: 10,
            keys: vec![b"k".to_vec()],
        };
        assert_eq!(
            t.encode_to_vec(),
            [0x10, 5, 0x18, 3, 0x20, 10, 0x2a, 1, b'k']
        );
        let l = LeaseLeasesResponse {
            header: None,
            leases: vec![LeaseStatus { id: 5 }],
        };
        assert_eq!(l.encode_to_vec(), [0x12, 2, 0x08, 5]);
        let c = LeaseCheckpointRequest {
            checkpoints: vec![LeaseCheckpoint {
                id: 5,
                remaining_ttl: 4,
            }],
        };
        assert_eq!(c.encode_to_vec(), [0x0a, 4, 0x08, 5, 0x10, 4]);
    }

    #[test]
    fn cluster_and_maintenance() {
        let m = Member {
            id: 1,
            name: "n".into(),
            peer_ur_ls: vec!["p".into()],
            client_ur_ls: vec!["c".into()],
            is_learner: true,
        };
        assert_eq!(
            m.encode_to_vec(),
            [
                0x08, 1, 0x12, 1, b'n', 0x1a, 1, b'p', 0x22, 1, b'c', 0x28, 1
            ]
        );
        let a = MemberAddRequest {
            peer_ur_ls: vec![],
            is_learner: true,
        };
        assert_eq!(a.encode_to_vec(), [0x10, 1]);
        let l = MemberListRequest { linearizable: true };
        assert_eq!(l.encode_to_vec(), [0x08, 1]);

        let s = StatusResponse {
            raft_applied_index: 7,
            errors: vec!["e".into()],
            db_size_in_use: 9,
            is_learner: true,
            storage_version: "v".into(),
            db_size_quota: 12,
            downgrade_info: Some(DowngradeInfo {
                enabled: true,
                target_version: String::new(),
            }),
            ..Default::default()
        };
        #[rustfmt::skip]
        let expected = [
            0x38, 7, 0x42, 1, b'e', 0x48, 9, 0x50, 1, 0x5a, 1, b'v', 0x60, 12,
            0x6a, 2, 0x08, 1,
        ];
        assert_eq!(s.encode_to_vec(), expected);

        let h = HashKvResponse {
            header: None,
            hash: 2,
            compact_revision: 3,
            hash_revision: 4,
        };
        assert_eq!(h.encode_to_vec(), [0x10, 2, 0x18, 3, 0x20, 4]);
        let s = SnapshotResponse {
            header: None,
            remaining_bytes: 2,
            blob: vec![3],
            version: "4".into(),
        };
        assert_eq!(s.encode_to_vec(), [0x10, 2, 0x1a, 1, 3, 0x22, 1, b'4']);

        let a = AlarmRequest {
            action: alarm_request::AlarmAction::Deactivate as i32,
            member_id: 3,
            alarm: AlarmType::Nospace as i32,
        };
        assert_eq!(a.encode_to_vec(), [0x08, 2, 0x10, 3, 0x18, 1]);
        assert_eq!(AlarmType::Corrupt as i32, 2);
        let d = DowngradeRequest {
            action: downgrade_request::DowngradeAction::Cancel as i32,
            version: "3".into(),
        };
        assert_eq!(d.encode_to_vec(), [0x08, 2, 0x12, 1, b'3']);
        let m = MoveLeaderRequest { target_id: 2 };
        assert_eq!(m.encode_to_vec(), [0x08, 2]);
    }

    #[test]
    fn auth() {
        let a = AuthUserAddRequest {
            name: "u".into(),
            password: String::new(),
            options: Some(super::authpb::UserAddOptions { no_password: true }),
            hashed_password: "h".into(),
        };
        assert_eq!(
            a.encode_to_vec(),
            [0x0a, 1, b'u', 0x1a, 2, 0x08, 1, 0x22, 1, b'h']
        );
        let g = AuthRoleGrantPermissionRequest {
            name: "r".into(),
            perm: Some(super::authpb::Permission {
                perm_type: super::authpb::permission::Type::Readwrite as i32,
                key: b"k".to_vec(),
                range_end: b"l".to_vec(),
            }),
        };
        assert_eq!(
            g.encode_to_vec(),
            [
                0x0a, 1, b'r', 0x12, 8, 0x08, 2, 0x12, 1, b'k', 0x1a, 1, b'l'
            ]
        );
        let s = AuthStatusResponse {
            header: None,
            enabled: true,
            auth_revision: 3,
        };
        assert_eq!(s.encode_to_vec(), [0x10, 1, 0x18, 3]);
    }

    #[test]
    fn lock_and_election() {
        use super::{v3electionpb, v3lockpb};
        let l = v3lockpb::LockRequest {
            name: b"n".to_vec(),
            lease: 2,
        };
        assert_eq!(l.encode_to_vec(), [0x0a, 1, b'n', 0x10, 2]);
        let r = v3lockpb::LockResponse {
            header: None,
            key: b"k".to_vec(),
        };
        assert_eq!(r.encode_to_vec(), [0x12, 1, b'k']);
        let k = v3electionpb::LeaderKey {
            name: b"n".to_vec(),
            key: b"k".to_vec(),
            rev: 3,
            lease: 4,
        };
        assert_eq!(
            k.encode_to_vec(),
            [0x0a, 1, b'n', 0x12, 1, b'k', 0x18, 3, 0x20, 4]
        );
        let c = v3electionpb::CampaignRequest {
            name: b"n".to_vec(),
            lease: 2,
            value: b"v".to_vec(),
        };
        assert_eq!(c.encode_to_vec(), [0x0a, 1, b'n', 0x10, 2, 0x1a, 1, b'v']);
        let p = v3electionpb::ProclaimRequest {
            leader: Some(v3electionpb::LeaderKey::default()),
            value: b"v".to_vec(),
        };
        assert_eq!(p.encode_to_vec(), [0x0a, 0, 0x12, 1, b'v']);
    }

    #[test]
    fn descriptor_set_names_every_file() {
        for file in [
            "mvccpb/kv.proto",
            "authpb/auth.proto",
            "etcdserverpb/rpc.proto",
            "v3lockpb/v3lock.proto",
            "v3electionpb/v3election.proto",
            "keel/raft.proto",
        ] {
            let found = super::FILE_DESCRIPTOR_SET
                .windows(file.len())
                .any(|w| w == file.as_bytes());
            assert!(found, "{file} missing from the descriptor set");
        }
    }

    #[cfg(feature = "grpc")]
    #[test]
    fn grpc_service_names() {
        use super::{v3electionpb, v3lockpb};
        assert_eq!(kv_server::SERVICE_NAME, "etcdserverpb.KV");
        assert_eq!(watch_server::SERVICE_NAME, "etcdserverpb.Watch");
        assert_eq!(lease_server::SERVICE_NAME, "etcdserverpb.Lease");
        assert_eq!(cluster_server::SERVICE_NAME, "etcdserverpb.Cluster");
        assert_eq!(maintenance_server::SERVICE_NAME, "etcdserverpb.Maintenance");
        assert_eq!(auth_server::SERVICE_NAME, "etcdserverpb.Auth");
        assert_eq!(v3lockpb::lock_server::SERVICE_NAME, "v3lockpb.Lock");
        assert_eq!(
            v3electionpb::election_server::SERVICE_NAME,
            "v3electionpb.Election"
        );
    }
}
