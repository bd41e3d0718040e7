//! The dirty_log check: a VM with one small memfd-backed memory slot
//! flagged `KVM_MEM_LOG_DIRTY_PAGES`, and a successful `KVM_GET_DIRTY_LOG`.
//! `forkd-vmm` flags guest RAM this way on every VM (DIFF and LIVE branches
//! read the log), so without it no sandbox boots. No vCPU runs.

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::Kvm;

use super::mapping::Mapping;
use super::report::Check;

/// Name of this check.
pub const NAME: &str = "dirty_log";

/// Pages in the test slot.
const PAGES: usize = 16;
const PAGE: usize = 4096;

/// Why the probe failed.
#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    /// `/dev/kvm` is not usable (the kvm check says why).
    #[error("cannot open /dev/kvm: {0}")]
    NoKvm(#[source] kvm_ioctls::Error),
    /// Setting up the guest memory failed.
    #[error("{what}: {source}")]
    Memory {
        /// The step.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A KVM ioctl failed.
    #[error("{what} failed: {source}")]
    Ioctl {
        /// The ioctl.
        what: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The bitmap has the wrong size.
    #[error("KVM_GET_DIRTY_LOG returned {got} bitmap words for {PAGES} pages")]
    BadBitmap {
        /// Words returned.
        got: usize,
    },
}

/// Sets up the slot and reads its log once; returns the pages marked dirty.
pub fn probe() -> Result<usize, DirtyLogError> {
    let kvm = Kvm::new().map_err(DirtyLogError::NoKvm)?;
    let ioctl = |what| move |source| DirtyLogError::Ioctl { what, source };
    let mem = |what| move |source| DirtyLogError::Memory { what, source };
    let len = PAGES * PAGE;
    let file = memfd::MemfdOptions::default()
        .close_on_exec(true)
        .create("forkd-doctor-dirty-log")
        .map_err(|e| mem("memfd_create")(super::memfd::memfd_io(e)))?
        .into_file();
    file.set_len(len as u64).map_err(mem("sizing the memfd"))?;
    let ram = Mapping::new(&file, len, true).map_err(mem("mmap of the memfd"))?;
    let vm = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: KVM_MEM_LOG_DIRTY_PAGES,
        guest_phys_addr: 0,
        memory_size: len as u64,
        userspace_addr: ram.as_ptr() as u64,
    };
    // SAFETY: `ram` is a live read-write mapping of `len` bytes and outlives
    // `vm` (declared before it, so dropped after it).
    unsafe { vm.set_user_memory_region(region) }.map_err(ioctl(
        "KVM_SET_USER_MEMORY_REGION (KVM_MEM_LOG_DIRTY_PAGES)",
    ))?;
    let bitmap = vm
        .get_dirty_log(0, len)
        .map_err(ioctl("KVM_GET_DIRTY_LOG"))?;
    if bitmap.len() != PAGES.div_ceil(64) {
        return Err(DirtyLogError::BadBitmap { got: bitmap.len() });
    }
    drop(vm);
    Ok(bitmap.iter().map(|w| w.count_ones() as usize).sum())
}

/// The check; skipped when `/dev/kvm` itself is unusable (the kvm check
/// reports that).
pub fn check() -> Check {
    match probe() {
        Ok(dirty) => Check::ok(
            NAME,
            format!(
                "a {PAGES}-page memfd slot with KVM_MEM_LOG_DIRTY_PAGES, KVM_GET_DIRTY_LOG works \
                 ({dirty} pages dirty, no vCPU ran)"
            ),
        )
        .with("pages", PAGES)
        .with("dirty_pages", dirty),
        Err(e @ DirtyLogError::NoKvm(_)) => {
            Check::skip(NAME, e.to_string(), "fix the kvm check first")
        }
        Err(e) => Check::fail(
            NAME,
            e.to_string(),
            "forkd-vmm flags all guest RAM for dirty logging, so sandboxes cannot boot: use a \
             host kernel whose KVM supports KVM_MEM_LOG_DIRTY_PAGES on shmem memory \
             (`dmesg | grep -i kvm` may say why it refused)",
        ),
    }
}
