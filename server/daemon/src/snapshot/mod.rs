//! Snapshots: the daemon's handle on the store, taking them (BranchSandbox
//! and its LIVE background copy, CreateSnapshot) and preparing forks from
//! them.

pub mod branch;
pub mod create;
pub mod fork;
pub mod live_copy;
pub mod mode;
pub mod store;
pub mod writing;
