//! Interrupting a vCPU thread that is inside KVM_RUN: a real-time signal
//! whose handler sets `immediate_exit` in that thread's `kvm_run`, so the
//! kick is not lost even if it lands just before the thread enters KVM_RUN.

use std::cell::Cell;
use std::ptr::null_mut;

use kvm_bindings::kvm_run;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::error::{Result, VmmError};

thread_local! {
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(null_mut()) };
}

/// The signal used for kicks.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN.with(|run| {
        let run = run.get();
        if !run.is_null() {
            // SAFETY: `run` is this thread's kvm_run mapping, registered by
            // `register_vcpu_thread` and valid while the vCPU fd lives (the
            // thread owns it until the process exits).
            unsafe { std::ptr::write_volatile(&mut (*run).immediate_exit, 1) };
        }
    });
}

/// Installs the kick handler (once per process).
pub fn install() -> Result<()> {
    register_signal_handler(kick_signal(), on_kick).map_err(|e| VmmError::Io {
        op: "installing the vCPU kick signal handler",
        source: std::io::Error::from_raw_os_error(e.errno()),
    })
}

/// Records the calling vCPU thread's `kvm_run` for the kick handler.
pub fn register_vcpu_thread(run: *mut kvm_run) {
    KVM_RUN.with(|cell| cell.set(run));
}

/// Sends a kick to `thread`.
pub fn kick(thread: libc::pthread_t) {
    // SAFETY: `thread` is a live vCPU thread of this process (vCPU threads
    // never exit before the process does).
    unsafe { libc::pthread_kill(thread, kick_signal()) };
}
