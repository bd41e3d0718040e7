//! End-to-end tests of the `forkd` binary against a fake VMM.
//!
//! This test executable has its own `main` (`harness = false`) and plays
//! two roles: started with `--control-fd`, it is a fake `forkd-vmm` that
//! speaks the control protocol (the daemon runs it via `--vmm-path`; see
//! `fake_vmm/`); started otherwise, it runs the scenarios (`scenarios/`),
//! each against a real daemon process talking gRPC over TCP
//! (`harness/`), as `runner/` says.

mod fake_vmm;
mod harness;
mod runner;
mod scenarios;

use runner::Scenario;
use scenarios::{expiry, files, lifecycle, linux, live, server, shutdown, snapshots};

/// `Scenario`s of the async fns named, each named as its fn.
macro_rules! scenarios {
    ($($module:ident :: $name:ident),* $(,)?) => {
        [$(Scenario {
            name: stringify!($name),
            run: || Box::pin($module::$name()),
        }),*]
    };
}

/// Every scenario, in the order they run.
const SCENARIOS: &[Scenario] = &scenarios![
    lifecycle::lifecycle_and_exec,
    lifecycle::validation,
    snapshots::branch_fork_and_chains,
    snapshots::create_snapshot_and_data_loss,
    snapshots::restart_recovers_the_store,
    snapshots::failed_branch_keeps_the_sandbox,
    lifecycle::ignored_cancel_fails_the_sandbox,
    lifecycle::boot_failure,
    server::auth,
    server::refuses_to_start,
    server::data_dir_lock,
    server::reflection_and_unix_socket,
    shutdown::graceful_shutdown,
    shutdown::caller_timeout_during_shutdown_is_bounded,
    live::live_branch_flow,
    live::live_cancel_and_source_death,
    live::live_copy_failures,
    live::live_copy_across_restart_and_shutdown,
    linux::linux_spawn_and_console,
    linux::linux_exec,
    linux::linux_guest_reset,
    linux::linux_host_checks,
    linux::linux_boot_failures,
    files::linux_files_upload_and_meta,
    files::linux_files_download_memory,
    files::linux_files_cut_off,
    files::linux_files_errors,
    expiry::expiry_deletes_and_counts,
];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--control-fd") {
        fake_vmm::run(&args);
    }
    runner::main(&args[1..], SCENARIOS)
}
