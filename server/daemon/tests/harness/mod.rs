//! What the scenarios share: a real daemon process per scenario
//! ([`daemon`]), gRPC helpers ([`client`], [`snapshots`]), Linux images
//! for the fake ([`linux`]) and status assertions ([`status`]).

pub mod client;
pub mod daemon;
pub mod linux;
pub mod snapshots;
pub mod status;

pub use client::{code_of, exec, exec_full, get, spawn, spawn_small};
pub use daemon::{alive, free_port, health, Daemon};
pub use linux::{linux_daemon, make_image, spawn_image, ASSUME_HV};
pub use snapshots::{branch, branch_waiting, fork, get_snapshot, peek, poke};
pub use status::{assert_status, assert_status_eq};
