//! keel-proto: the etcd v3 API and Keel's internal protocol as Rust types.
//!
//! Module map (each is one protobuf package, named exactly as etcd names it, so the wire format
//! and the gRPC paths such as `/etcdserverpb.KV/Range` are etcd's):
//! - [`mvccpb`]: `KeyValue`, `Event`.
//! - [`authpb`]: users, roles, permissions.
//! - [`etcdserverpb`]: the KV, Watch, Lease, Cluster, Maintenance and Auth services.
//! - [`v3lockpb`], [`v3electionpb`]: the server-side Lock and Election services.
//! - [`keelpb`]: what goes into Keel's Raft log and what members say to each other.
//!
//! With the default `grpc` feature the tonic clients and servers are generated too; without it
//! the crate has only the prost messages (all `keel-store` needs).

#![allow(clippy::all, clippy::pedantic, rustdoc::all, missing_docs)]

macro_rules! package {
    ($name:ident, $file:literal) => {
        #[allow(clippy::all, clippy::doc_lazy_continuation, clippy::large_enum_variant)]
        pub mod $name {
            include!(concat!(env!("OUT_DIR"), "/", $file));
        }
    };
}

package!(mvccpb, "mvccpb.rs");
package!(authpb, "authpb.rs");
package!(etcdserverpb, "etcdserverpb.rs");
package!(v3lockpb, "v3lockpb.rs");
package!(v3electionpb, "v3electionpb.rs");
package!(keelpb, "keelpb.rs");

/// The encoded `FileDescriptorSet` of every package (for reflection and the JSON gateway).
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));

#[cfg(test)]
mod tests {
    use super::etcdserverpb::*;
    use prost::Message;

    #[test]
    fn etcd_field_numbers() {
        let r = RangeRequest {
            key: b"foo".to_vec(),
            range_end: b"fop".to_vec(),
            limit: 3,
            ..Default::default()
        };
        assert_eq!(
            r.encode_to_vec(),
            [
                0x0a, 3, b'f', b'o', b'o', 0x12, 3, b'f', b'o', b'p', 0x18, 3
            ]
        );
        let p = PutRequest {
            prev_kv: true,
            ignore_value: true,
            ignore_lease: true,
            ..Default::default()
        };
        assert_eq!(p.encode_to_vec(), [0x20, 1, 0x28, 1, 0x30, 1]);
        let kv = super::mvccpb::KeyValue {
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
        let w = WatchRequest {
            request_union: Some(watch_request::RequestUnion::ProgressRequest(
                WatchProgressRequest {},
            )),
        };
        assert_eq!(w.encode_to_vec(), [0x1a, 0]);
        let w = WatchRequest {
            request_union: Some(watch_request::RequestUnion::CancelRequest(
                WatchCancelRequest { watch_id: 1 },
            )),
        };
        assert_eq!(w.encode_to_vec(), [0x12, 2, 0x08, 1]);
    }
}
