//! The userfaultfd_wp check: userfaultfd write-protection (UFFD_WP) on a
//! shmem mapping, through the very engine LIVE branches use (`forkd-uffd`).
//!
//! A small memfd is mapped shared (like guest RAM) and populated;
//! [`forkd_uffd::LiveCopy::arm`] opens a userfaultfd with
//! `UFFD_FEATURE_PAGEFAULT_FLAG_WP` (kernel-mode faults included, as
//! `forkd-vmm` needs), registers the range in write-protect mode, protects
//! it and starts its fault handler. A helper thread then writes one page:
//! the write must block on a write-protect fault that the handler lets
//! through (it counts it). Every wait is bounded, so a broken kernel cannot
//! hang `forkd doctor`.

use std::sync::mpsc;
use std::time::Duration;

use forkd_uffd::{CopyError, LiveCopy, PAGE_SIZE};

use super::mapping::Mapping;
use super::report::Check;

/// Name of this check.
pub const NAME: &str = "userfaultfd_wp";

const PAGES: usize = 4;
/// How long the faulting write may take before the probe gives up.
const FAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the probe failed.
#[derive(Debug, thiserror::Error)]
pub enum UffdProbeError {
    /// Setting up the memfd mapping failed.
    #[error("{what}: {source}")]
    Memory {
        /// The step.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// `forkd-uffd` could not open userfaultfd with WP, or register and
    /// protect the range.
    #[error(transparent)]
    Arm(#[from] CopyError),
    /// The write to a protected page did not finish in time.
    #[error("a write to a write-protected page did not complete within {0:?}")]
    Timeout(Duration),
    /// The write went through without a write-protect fault.
    #[error("a write to a write-protected shmem page did not fault ({0} faults seen)")]
    NotCaught(usize),
    /// The write was lost.
    #[error("the faulting write did not land in memory")]
    WriteLost,
}

/// Arms write-protection on a small memfd mapping and proves one write
/// faults; returns the faults the handler saw.
pub fn probe() -> Result<usize, UffdProbeError> {
    let len = PAGES * PAGE_SIZE;
    let mem = |what| move |source| UffdProbeError::Memory { what, source };
    let file = memfd::MemfdOptions::default()
        .close_on_exec(true)
        .create("forkd-doctor-uffd")
        .map_err(|e| mem("memfd_create")(super::memfd::memfd_io(e)))?
        .into_file();
    file.set_len(len as u64).map_err(mem("sizing the memfd"))?;
    let ram = Mapping::new(&file, len, true).map_err(mem("mmap of the memfd"))?;
    for page in 0..PAGES {
        ram.write(page * PAGE_SIZE, 1);
    }
    // SAFETY: `ram` is a page-aligned shared (shmem) mapping of `len` bytes
    // that outlives `copy`: `copy` is dropped below before `ram`, and `ram`
    // is leaked if the writer thread cannot be accounted for.
    let copy = unsafe { LiveCopy::arm(ram.as_ptr(), len, PAGE_SIZE) }?;
    let target = ram.as_ptr() as usize + PAGE_SIZE;
    let (done_tx, done) = mpsc::channel();
    let writer = std::thread::Builder::new()
        .name("doctor-uffd-writer".into())
        .spawn(move || {
            // SAFETY: `target` is inside `ram`, which stays mapped until this
            // thread is joined (or forever, if it is not).
            unsafe { (target as *mut u8).write_volatile(2) };
            let _ = done_tx.send(());
        })
        .map_err(mem("spawning the writer thread"))?;
    let finished = done.recv_timeout(FAULT_TIMEOUT).is_ok();
    let caught = copy.let_through();
    // Dropping the copy unregisters the range, which wakes a writer still
    // blocked on its fault.
    drop(copy);
    if !finished && done.recv_timeout(FAULT_TIMEOUT).is_err() {
        ram.leak();
        return Err(UffdProbeError::Timeout(FAULT_TIMEOUT));
    }
    let _ = writer.join();
    if !finished {
        return Err(UffdProbeError::Timeout(FAULT_TIMEOUT));
    }
    if caught != 1 {
        return Err(UffdProbeError::NotCaught(caught));
    }
    if ram.read(PAGE_SIZE) != 2 {
        return Err(UffdProbeError::WriteLost);
    }
    Ok(caught)
}

/// `vm.unprivileged_userfaultfd` (1: anyone may take kernel-mode faults).
fn sysctl_unprivileged() -> Option<i64> {
    std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// What to do about a failed probe; `dev` says whether /dev/userfaultfd
/// exists (Linux 6.1+).
fn hint(e: &UffdProbeError, dev: bool) -> &'static str {
    match e {
        // The userfaultfd crate uses /dev/userfaultfd whenever it exists and
        // does not fall back to the syscall, so the sysctl helps only
        // without the device.
        UffdProbeError::Arm(CopyError::Unavailable(_)) if dev => {
            "forkd-vmm opens /dev/userfaultfd (kernel-mode faults and \
             UFFD_FEATURE_PAGEFAULT_FLAG_WP): run forkd as root, or give its user read-write \
             access to /dev/userfaultfd (e.g. `setfacl -m u:USER:rw /dev/userfaultfd` or a udev \
             rule); until then LIVE branches fail (FULL and DIFF work)"
        }
        UffdProbeError::Arm(CopyError::Unavailable(_)) => {
            "forkd-vmm needs userfaultfd with kernel-mode faults and \
             UFFD_FEATURE_PAGEFAULT_FLAG_WP (Linux 5.7+): run forkd as root (CAP_SYS_PTRACE), or \
             set `sysctl vm.unprivileged_userfaultfd=1`; until then LIVE branches fail (FULL and \
             DIFF work)"
        }
        UffdProbeError::Arm(_) => {
            "write-protecting shmem needs Linux 5.19+ built with CONFIG_PTE_MARKER_UFFD_WP; \
             until then LIVE branches fail (FULL and DIFF work)"
        }
        _ => {
            "userfaultfd write-protection misbehaves on this kernel; LIVE branches are not safe \
             here (FULL and DIFF work)"
        }
    }
}

/// The check. A failure is a warning: only LIVE branches need UFFD_WP.
pub fn check() -> Check {
    let dev = std::path::Path::new("/dev/userfaultfd").exists();
    let c = match probe() {
        Ok(faults) => Check::ok(
            NAME,
            format!(
                "userfaultfd with UFFD_FEATURE_PAGEFAULT_FLAG_WP, {PAGES} memfd pages registered \
                 and write-protected, a write caught by forkd-uffd's fault handler: LIVE \
                 branches work"
            ),
        )
        .with("faults_caught", faults),
        Err(e) => Check::warn(NAME, e.to_string(), hint(&e, dev)),
    };
    c.with("dev_userfaultfd", dev).with(
        "unprivileged_userfaultfd",
        sysctl_unprivileged().map_or(serde_json::Value::Null, Into::into),
    )
}
