//! Workloads: what the clients do, and which checkers judge the history.

pub mod append;
pub mod lease;
pub mod lock;
pub mod register;
pub mod set;
pub mod watch;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::record::{CheckResult, FaultWindow, Op};
use crate::runner::{Ctx, TestOpts, Worker};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum WorkloadKind {
    Register,
    Set,
    Append,
    Watch,
    Lease,
    Lock,
}

impl WorkloadKind {
    pub fn name(self) -> &'static str {
        match self {
            WorkloadKind::Register => "register",
            WorkloadKind::Set => "set",
            WorkloadKind::Append => "append",
            WorkloadKind::Watch => "watch",
            WorkloadKind::Lease => "lease",
            WorkloadKind::Lock => "lock",
        }
    }
}

#[derive(Clone)]
pub enum Workload {
    Register(Arc<register::Register>),
    Set(Arc<set::Set>),
    Append(Arc<append::Append>),
    Watch(Arc<watch::Watch>),
    Lease(Arc<lease::Lease>),
    Lock(Arc<lock::Lock>),
}

impl Workload {
    pub fn new(kind: WorkloadKind, opts: &TestOpts) -> Workload {
        match kind {
            WorkloadKind::Register => Workload::Register(Arc::new(register::Register::new(opts))),
            WorkloadKind::Set => Workload::Set(Arc::new(set::Set::new(opts))),
            WorkloadKind::Append => Workload::Append(Arc::new(append::Append::new(opts))),
            WorkloadKind::Watch => Workload::Watch(Arc::new(watch::Watch::new(opts))),
            WorkloadKind::Lease => Workload::Lease(Arc::new(lease::Lease::new(opts))),
            WorkloadKind::Lock => Workload::Lock(Arc::new(lock::Lock::new(opts))),
        }
    }

    /// One client thread until the end of the main phase.
    pub async fn worker(self, ctx: Arc<Ctx>, id: usize) {
        let w = Worker::new(&ctx, id);
        match self {
            Workload::Register(x) => x.worker(ctx, w).await,
            Workload::Set(x) => x.worker(ctx, w).await,
            Workload::Append(x) => x.worker(ctx, w).await,
            Workload::Watch(x) => x.worker(ctx, w).await,
            Workload::Lease(x) => x.worker(ctx, w).await,
            Workload::Lock(x) => x.worker(ctx, w).await,
        }
    }

    /// After the cluster is healed: final reads, watch catch-up.
    pub async fn final_phase(self, ctx: Arc<Ctx>) -> anyhow::Result<()> {
        match self {
            Workload::Register(x) => x.final_phase(ctx).await,
            Workload::Set(x) => x.final_phase(ctx).await,
            Workload::Append(x) => x.final_phase(ctx).await,
            Workload::Watch(x) => x.final_phase(ctx).await,
            Workload::Lease(x) => x.final_phase(ctx).await,
            Workload::Lock(x) => x.final_phase(ctx).await,
        }
    }
}

/// Runs the checkers of a workload over a history.
/// `faults` are the run's fault windows (clock skew explains some lease expiries).
pub fn check(kind: WorkloadKind, ops: &[Op], faults: &[FaultWindow]) -> Vec<CheckResult> {
    match kind {
        WorkloadKind::Register => crate::checker::register::check(ops, 5_000_000),
        WorkloadKind::Set => vec![crate::checker::set::check(ops)],
        WorkloadKind::Append => vec![crate::checker::append::check(ops)],
        WorkloadKind::Watch => vec![crate::checker::watch::check(ops)],
        WorkloadKind::Lease => vec![crate::checker::lease::check(ops, faults)],
        WorkloadKind::Lock => vec![crate::checker::lock::check(ops, faults)],
    }
}
