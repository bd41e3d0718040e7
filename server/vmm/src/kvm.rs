//! What `forkd-vmm` requires of `/dev/kvm`: the API version and the
//! capabilities it checks before building a VM, and the TSS address it
//! sets. [`vm`](crate::vm) checks them at VM creation and `forkd doctor`'s
//! kvm check uses the same list, so the two cannot drift apart.

use kvm_ioctls::{Cap, Kvm};

/// The KVM API version this code speaks (`KVM_GET_API_VERSION`); every KVM
/// since Linux 2.6.22 reports 12.
pub const API_VERSION: i32 = 12;

/// A KVM capability `forkd-vmm` cannot do without.
#[derive(Clone, Copy, Debug)]
pub struct RequiredCap {
    /// The capability, as `KVM_CHECK_EXTENSION` takes it.
    pub cap: Cap,
    /// Its kernel name, for messages.
    pub name: &'static str,
}

/// The capabilities checked before a VM is built, in the order checked.
pub const REQUIRED_CAPS: [RequiredCap; 3] = [
    // Guest RAM is a memfd mapping handed to KVM as a memory slot.
    RequiredCap {
        cap: Cap::UserMemory,
        name: "KVM_CAP_USER_MEMORY",
    },
    // Kicking a vCPU out of KVM_RUN sets `immediate_exit` (`kick`).
    RequiredCap {
        cap: Cap::ImmediateExit,
        name: "KVM_CAP_IMMEDIATE_EXIT",
    },
    // Every VM has KVM's in-kernel LAPIC/IOAPIC/PIC.
    RequiredCap {
        cap: Cap::Irqchip,
        name: "KVM_CAP_IRQCHIP",
    },
];

/// Address given to `KVM_SET_TSS_ADDR`: KVM uses it for the real-mode TSS
/// on Intel hosts (our guests never use it, but VMX needs it set before
/// vCPUs run; other backends may refuse it, which is ignored).
pub const TSS_ADDRESS: usize = 0xfffb_d000;

/// Why a KVM does not meet [`API_VERSION`] and [`REQUIRED_CAPS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unsupported {
    /// `KVM_GET_API_VERSION` returned something other than [`API_VERSION`].
    #[error("KVM API version {0}, expected {API_VERSION}")]
    ApiVersion(i32),
    /// The first required capability found missing (its kernel name).
    #[error("{0} is missing")]
    MissingCap(&'static str),
}

/// Checks an open `/dev/kvm` against the requirements.
pub fn check(kvm: &Kvm) -> Result<(), Unsupported> {
    check_with(kvm.get_api_version(), |cap| kvm.check_extension(cap))
}

/// Checks an API version and a capability query against the requirements:
/// the version first, then each capability in [`REQUIRED_CAPS`] order.
pub fn check_with(api_version: i32, mut has: impl FnMut(Cap) -> bool) -> Result<(), Unsupported> {
    if api_version != API_VERSION {
        return Err(Unsupported::ApiVersion(api_version));
    }
    match REQUIRED_CAPS.iter().find(|r| !has(r.cap)) {
        Some(missing) => Err(Unsupported::MissingCap(missing.name)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_present() {
        assert_eq!(check_with(12, |_| true), Ok(()));
    }

    #[test]
    fn api_version_checked_first() {
        let mut asked = 0;
        let r = check_with(11, |_| {
            asked += 1;
            false
        });
        assert_eq!(r, Err(Unsupported::ApiVersion(11)));
        assert_eq!(asked, 0);
        assert_eq!(
            r.unwrap_err().to_string(),
            "KVM API version 11, expected 12"
        );
    }

    #[test]
    fn first_missing_cap_named() {
        for (i, req) in REQUIRED_CAPS.iter().enumerate() {
            // Everything before `req` present, `req` and later missing.
            let present: Vec<Cap> = REQUIRED_CAPS[..i].iter().map(|r| r.cap).collect();
            let r = check_with(API_VERSION, |cap| present.contains(&cap));
            assert_eq!(r, Err(Unsupported::MissingCap(req.name)));
            assert_eq!(
                r.unwrap_err().to_string(),
                format!("{} is missing", req.name)
            );
        }
    }

    #[test]
    fn names_match_the_caps() {
        // The names are what the kernel calls them: KVM_CAP_ + the variant.
        let names: Vec<&str> = REQUIRED_CAPS.iter().map(|r| r.name).collect();
        assert_eq!(
            names,
            [
                "KVM_CAP_USER_MEMORY",
                "KVM_CAP_IMMEDIATE_EXIT",
                "KVM_CAP_IRQCHIP"
            ]
        );
        let caps: Vec<u32> = REQUIRED_CAPS.iter().map(|r| r.cap as u32).collect();
        assert_eq!(
            caps,
            [
                kvm_bindings::KVM_CAP_USER_MEMORY,
                kvm_bindings::KVM_CAP_IMMEDIATE_EXIT,
                kvm_bindings::KVM_CAP_IRQCHIP
            ]
        );
    }
}
