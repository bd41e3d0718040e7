//! Errors of the VMM, each carrying what failed and why.

use std::io;

/// Anything that stops a VMM from booting or running a guest.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// /dev/kvm cannot be opened.
    #[error(
        "cannot open /dev/kvm: {0}; forkd needs KVM: load the module for this host \
         (kvm_intel, kvm_amd or kvm_pvm) and run as a user that can open /dev/kvm"
    )]
    KvmUnavailable(#[source] kvm_ioctls::Error),
    /// /dev/kvm is there but lacks something forkd needs ([`crate::kvm`]).
    #[error("KVM on this host is unusable for forkd: {0}")]
    KvmUnsupported(#[from] crate::kvm::Unsupported),
    /// A KVM ioctl failed.
    #[error("KVM {op} failed: {source}")]
    Kvm {
        /// The operation, e.g. "KVM_CREATE_VM".
        op: &'static str,
        /// The errno from the kernel.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest RAM could not be created or mapped.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The host's pool of 2 MiB huge pages cannot hold guest RAM.
    #[error(
        "not enough free 2 MiB huge pages for {mib} MiB of guest RAM: raise the host's pool \
         (sysctl vm.nr_hugepages, see HugePages_Free in /proc/meminfo)"
    )]
    HugePagesExhausted {
        /// Guest RAM in MiB.
        mib: u64,
    },
    /// The guest image could not be loaded.
    #[error("loading the guest image: {0}")]
    Load(String),
    /// A Linux guest's kernel, initrd or boot structures could not be set up.
    #[error("booting Linux: {0}")]
    Boot(String),
    /// An emulated device could not be created.
    #[error("device {device}: {detail}")]
    Device {
        /// Which device, e.g. "serial console".
        device: &'static str,
        /// What failed.
        detail: String,
    },
    /// A saved VM state cannot be restored.
    #[error("restoring the VM: {0}")]
    Restore(String),
    /// Writing a snapshot failed.
    #[error("writing the snapshot: {0}")]
    Snapshot(String),
    /// The requested machine shape is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A host system call failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl VmmError {
    /// Wraps a KVM ioctl error with the name of the operation.
    pub fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
        move |source| VmmError::Kvm { op, source }
    }
}

/// Result alias for the VMM.
pub type Result<T> = std::result::Result<T, VmmError>;
