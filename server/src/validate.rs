//! Request validation done before anything is proposed, with etcd's rules and errors
//! (etcd `server/etcdserver/api/v3rpc/key.go`).

use std::collections::BTreeSet;

use keel_proto::etcdserverpb::request_op::Request;
use keel_proto::etcdserverpb::{
    DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest, range_request,
};

use crate::error::ServerError;

pub fn check_range(r: &RangeRequest) -> Result<(), ServerError> {
    if r.key.is_empty() {
        return Err(ServerError::EmptyKey);
    }
    if range_request::SortOrder::try_from(r.sort_order).is_err()
        || range_request::SortTarget::try_from(r.sort_target).is_err()
    {
        return Err(ServerError::InvalidSortOption);
    }
    Ok(())
}

pub fn check_put(r: &PutRequest) -> Result<(), ServerError> {
    if r.key.is_empty() {
        return Err(ServerError::EmptyKey);
    }
    if r.ignore_value && !r.value.is_empty() {
        return Err(ServerError::ValueProvided);
    }
    if r.ignore_lease && r.lease != 0 {
        return Err(ServerError::LeaseProvided);
    }
    Ok(())
}

pub fn check_delete(r: &DeleteRangeRequest) -> Result<(), ServerError> {
    if r.key.is_empty() {
        return Err(ServerError::EmptyKey);
    }
    Ok(())
}

/// Full Txn validation: sizes, every op, then duplicate keys in each branch.
pub fn check_txn(r: &TxnRequest, max_txn_ops: usize) -> Result<(), ServerError> {
    check_txn_ops(r, max_txn_ops)?;
    check_intervals(&r.success)?;
    check_intervals(&r.failure)?;
    Ok(())
}

fn check_txn_ops(r: &TxnRequest, max_txn_ops: usize) -> Result<(), ServerError> {
    if r.compare.len().max(r.success.len()).max(r.failure.len()) > max_txn_ops {
        return Err(ServerError::TooManyOps);
    }
    if r.compare.iter().any(|c| c.key.is_empty()) {
        return Err(ServerError::EmptyKey);
    }
    for op in r.success.iter().chain(r.failure.iter()) {
        check_request_op(op, max_txn_ops)?;
    }
    Ok(())
}

fn check_request_op(op: &RequestOp, max_txn_ops: usize) -> Result<(), ServerError> {
    match &op.request {
        Some(Request::RequestRange(r)) => check_range(r),
        Some(Request::RequestPut(r)) => check_put(r),
        Some(Request::RequestDeleteRange(r)) => check_delete(r),
        Some(Request::RequestTxn(r)) => check_txn_ops(r, max_txn_ops),
        // etcd answers an empty op with this (odd but relied-upon) error.
        None => Err(ServerError::KeyNotFound),
    }
}

/// Deleted intervals `[start, end)`; an empty `end` is the single key `start`.
#[derive(Default)]
struct Deletes(Vec<(Vec<u8>, Vec<u8>)>);

impl Deletes {
    fn contains(&self, key: &[u8]) -> bool {
        self.0.iter().any(|(start, end)| {
            if end.is_empty() {
                start.as_slice() == key
            } else {
                start.as_slice() <= key && key < end.as_slice()
            }
        })
    }
}

/// Rejects a put of the same key twice, or a put inside a deleted range, within one branch;
/// the two branches of a nested txn may write the same key (only one of them runs).
fn check_intervals(ops: &[RequestOp]) -> Result<(BTreeSet<Vec<u8>>, Deletes), ServerError> {
    let mut dels = Deletes::default();
    for op in ops {
        if let Some(Request::RequestDeleteRange(d)) = &op.request {
            dels.0.push((d.key.clone(), d.range_end.clone()));
        }
    }
    let mut puts: BTreeSet<Vec<u8>> = BTreeSet::new();
    for op in ops {
        let Some(Request::RequestTxn(t)) = &op.request else {
            continue;
        };
        let (puts_then, dels_then) = check_intervals(&t.success)?;
        let (puts_else, dels_else) = check_intervals(&t.failure)?;
        for k in &puts_then {
            if puts.contains(k) || dels.contains(k) {
                return Err(ServerError::DuplicateKey);
            }
            puts.insert(k.clone());
        }
        for k in puts_else {
            if (puts.contains(&k) && !puts_then.contains(&k)) || dels.contains(&k) {
                return Err(ServerError::DuplicateKey);
            }
            puts.insert(k);
        }
        dels.0.extend(dels_then.0);
        dels.0.extend(dels_else.0);
    }
    for op in ops {
        let Some(Request::RequestPut(p)) = &op.request else {
            continue;
        };
        if puts.contains(&p.key) || dels.contains(&p.key) {
            return Err(ServerError::DuplicateKey);
        }
        puts.insert(p.key.clone());
    }
    Ok((puts, dels))
}

/// Whether a txn can write (any put or delete in any branch, at any depth).
pub fn txn_has_writes(r: &TxnRequest) -> bool {
    r.success
        .iter()
        .chain(r.failure.iter())
        .any(|op| match &op.request {
            Some(Request::RequestPut(_)) | Some(Request::RequestDeleteRange(_)) => true,
            Some(Request::RequestTxn(t)) => txn_has_writes(t),
            _ => false,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(k: &str) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestPut(PutRequest {
                key: k.into(),
                ..Default::default()
            })),
        }
    }
    fn del(k: &str, end: &str) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
                key: k.into(),
                range_end: end.into(),
                ..Default::default()
            })),
        }
    }
    fn txn(success: Vec<RequestOp>, failure: Vec<RequestOp>) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestTxn(TxnRequest {
                compare: vec![],
                success,
                failure,
            })),
        }
    }
    fn check(success: Vec<RequestOp>) -> Result<(), ServerError> {
        check_txn(
            &TxnRequest {
                compare: vec![],
                success,
                failure: vec![],
            },
            128,
        )
    }

    #[test]
    fn duplicate_keys() {
        assert_eq!(check(vec![put("a"), put("b")]), Ok(()));
        assert_eq!(
            check(vec![put("a"), put("a")]),
            Err(ServerError::DuplicateKey)
        );
        assert_eq!(
            check(vec![del("a", "c"), put("b")]),
            Err(ServerError::DuplicateKey)
        );
        assert_eq!(check(vec![del("a", "c"), put("c")]), Ok(()));
        assert_eq!(
            check(vec![del("a", ""), put("a")]),
            Err(ServerError::DuplicateKey)
        );
        // then/else of a nested txn may write the same key...
        assert_eq!(check(vec![txn(vec![put("x")], vec![put("x")])]), Ok(()));
        // ...but not a key the outer branch also writes.
        assert_eq!(
            check(vec![txn(vec![put("x")], vec![]), put("x")]),
            Err(ServerError::DuplicateKey)
        );
        assert_eq!(
            check(vec![txn(vec![del("w", "y")], vec![]), put("x")]),
            Err(ServerError::DuplicateKey)
        );
    }

    #[test]
    fn sizes_and_empty_ops() {
        let many: Vec<RequestOp> = (0..129).map(|i| put(&format!("k{i}"))).collect();
        assert_eq!(check(many.clone()), Err(ServerError::TooManyOps));
        assert_eq!(check(many[..128].to_vec()), Ok(()));
        assert_eq!(
            check(vec![RequestOp { request: None }]),
            Err(ServerError::KeyNotFound)
        );
        assert_eq!(check(vec![put("")]), Err(ServerError::EmptyKey));
        let bad_put = RequestOp {
            request: Some(Request::RequestPut(PutRequest {
                key: "k".into(),
                value: "v".into(),
                ignore_value: true,
                ..Default::default()
            })),
        };
        assert_eq!(check(vec![bad_put]), Err(ServerError::ValueProvided));
        assert!(txn_has_writes(&TxnRequest {
            compare: vec![],
            success: vec![],
            failure: vec![txn(vec![], vec![del("a", "")])]
        }));
        assert!(!txn_has_writes(&TxnRequest::default()));
    }

    #[test]
    fn range_checks() {
        assert_eq!(
            check_range(&RangeRequest::default()),
            Err(ServerError::EmptyKey)
        );
        let r = RangeRequest {
            key: b"a".to_vec(),
            sort_order: 7,
            ..Default::default()
        };
        assert_eq!(check_range(&r), Err(ServerError::InvalidSortOption));
    }
}
