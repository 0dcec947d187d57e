//! Checkers over recorded histories; each returns a [`crate::record::CheckResult`].

pub mod append;
pub mod lease;
pub mod lock;
pub mod register;
pub mod set;
pub mod watch;

use crate::record::FaultWindow;

/// A clock-skew window that may have moved a member's clock while `[from, to]` (ns) ran:
/// it started before `to` and ended (plus the 1 s libfaketime takes to notice) after `from`.
pub fn clock_skew_between(faults: &[FaultWindow], from: u64, to: u64) -> Option<&FaultWindow> {
    faults
        .iter()
        .find(|f| f.kind == "clock" && f.start <= to && f.end + 1_500_000_000 >= from)
}
