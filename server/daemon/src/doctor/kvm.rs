//! The kvm check: `/dev/kvm` opens read-write, meets `forkd-vmm`'s own
//! requirements (`forkd_vmm::kvm`: API version and capabilities), and a
//! VM with an in-kernel irqchip and one vCPU can be created (what
//! `forkd-vmm` does first on every boot).

use forkd_vmm::kvm::{self as required, Unsupported};
use kvm_ioctls::Kvm;

use super::hypervisor::Detection;
use super::report::Check;

/// Name of this check.
pub const NAME: &str = "kvm";

/// Why the probe failed.
#[derive(Debug, thiserror::Error)]
pub enum KvmProbeError {
    /// `/dev/kvm` could not be opened read-write.
    #[error("cannot open /dev/kvm read-write: {0}")]
    Open(#[source] kvm_ioctls::Error),
    /// It lacks what `forkd-vmm` requires (`forkd_vmm::kvm`).
    #[error(transparent)]
    Unsupported(#[from] Unsupported),
    /// An ioctl failed.
    #[error("{what} failed: {source}")]
    Ioctl {
        /// The ioctl.
        what: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// What a successful probe learnt.
#[derive(Debug)]
pub struct KvmFacts {
    /// KVM_GET_API_VERSION.
    pub api_version: i32,
    /// Most vCPUs per VM (KVM_CAP_MAX_VCPUS).
    pub max_vcpus: usize,
}

/// Opens `/dev/kvm` and builds a VM like `forkd-vmm` does, then drops it.
pub fn probe() -> Result<KvmFacts, KvmProbeError> {
    let kvm = Kvm::new().map_err(KvmProbeError::Open)?;
    required::check(&kvm)?;
    let api_version = kvm.get_api_version();
    let ioctl = |what| move |source| KvmProbeError::Ioctl { what, source };
    let vm = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
    // Only Intel VMX needs it; other backends may refuse it (as in forkd-vmm).
    let _ = vm.set_tss_address(required::TSS_ADDRESS);
    vm.create_irq_chip().map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
    vm.create_vcpu(0).map_err(ioctl("KVM_CREATE_VCPU"))?;
    Ok(KvmFacts {
        api_version,
        max_vcpus: kvm.get_max_vcpus(),
    })
}

/// What to do about a failed probe; `hv` tells how to get KVM at all.
pub fn hint(error: &KvmProbeError, hv: &Detection) -> String {
    match error {
        KvmProbeError::Open(e) => match e.errno() {
            libc::ENOENT | libc::ENXIO | libc::ENODEV => hv.enable_hint(),
            libc::EACCES | libc::EPERM => "run forkd as root, or add its user to the group that \
                owns /dev/kvm (usually `kvm`: `usermod -aG kvm USER`, then log in again)"
                .into(),
            _ => "check `ls -l /dev/kvm` (a character device 10:232) and `dmesg | grep -i kvm`"
                .into(),
        },
        KvmProbeError::Unsupported(_) => {
            "this KVM is too old or too limited for forkd-vmm: use a Linux 5.x or newer host \
             kernel with a stock KVM"
                .into()
        }
        KvmProbeError::Ioctl { .. } => "KVM refuses to build a VM: look at `dmesg | grep -i kvm` \
            (out of memory, or a per-user VM limit)"
            .into(),
    }
}

/// The check.
pub fn check(hv: &Detection) -> Check {
    match probe() {
        Ok(f) => Check::ok(
            NAME,
            format!(
                "/dev/kvm opens read-write, API {}, VM with irqchip and a vCPU created \
                 (up to {} vCPUs per VM)",
                f.api_version, f.max_vcpus
            ),
        )
        .with("api_version", f.api_version)
        .with("max_vcpus", f.max_vcpus),
        Err(e) => Check::fail(NAME, e.to_string(), hint(&e, hv)),
    }
    .with("device", "/dev/kvm")
}
