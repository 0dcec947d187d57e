//! Checkers over recorded histories; each returns a [`crate::record::CheckResult`].

pub mod append;
pub mod register;
pub mod set;
pub mod watch;
