//! Whether this host can boot Linux guests, decided once at startup from
//! the doctor's hypervisor detection.
//!
//! A stock Linux kernel runs its own code at CPL0, which KVM-PVM emulates
//! (~1000x slower): a Linux spawn there fails at once with
//! FAILED_PRECONDITION instead of timing out. When the backend cannot be
//! told, Linux spawns are let through (the boot timeout still bounds them).
//!
//! The daemon's own end-to-end tests run on PVM hosts against a fake VMM;
//! they set [`ASSUME_ENV`] (test-only, undocumented in `--help`) to a
//! backend id (`vmx`, `svm`, `pvm`) to replace the detection.

use crate::doctor::hypervisor::{detect_host, Backend};

/// Test-only: replaces the detected backend (`vmx`, `svm` or `pvm`).
pub const ASSUME_ENV: &str = "FORKD_TEST_ASSUME_HYPERVISOR";

/// Errors of the host's Linux-guest support.
#[derive(Debug, thiserror::Error)]
pub enum LinuxHostError {
    /// The host's KVM cannot run a Linux kernel at a usable speed.
    #[error(
        "Linux guests need hardware virtualization (Intel VMX or AMD SVM); this host's KVM is \
         {module} ({title} runs ring-0 guest code ~1000x slower). Run 'forkd doctor' for details."
    )]
    NoHardwareVirt {
        /// The vendor module, spelled as users know it (`kvm-pvm`).
        module: String,
        /// The backend's name.
        title: &'static str,
    },
    /// [`ASSUME_ENV`] holds something else than a backend id.
    #[error("{ASSUME_ENV}={0:?} is not one of vmx, svm, pvm")]
    BadOverride(String),
}

/// The host's hypervisor, as far as Linux guests care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinuxHost {
    backend: Option<Backend>,
    /// Whether [`ASSUME_ENV`] decided the backend.
    assumed: bool,
}

impl LinuxHost {
    /// Detects the host's backend, unless [`ASSUME_ENV`] names one.
    pub fn detect() -> Result<LinuxHost, LinuxHostError> {
        let (backend, assumed) = match std::env::var(ASSUME_ENV) {
            Ok(id) => (Some(parse_backend(&id)?), true),
            Err(_) => (detect_host().backend().map(|(b, _)| b), false),
        };
        Ok(LinuxHost { backend, assumed })
    }

    /// A host with this backend (`None`: unknown).
    #[cfg(test)]
    pub fn with_backend(backend: Option<Backend>) -> LinuxHost {
        LinuxHost {
            backend,
            assumed: false,
        }
    }

    /// Whether the backend was taken from [`ASSUME_ENV`] (tests only).
    pub fn assumed(&self) -> bool {
        self.assumed
    }

    /// The backend, when known.
    pub fn backend(&self) -> Option<Backend> {
        self.backend
    }

    /// Ok when a Linux guest may be booted here.
    pub fn check(&self) -> Result<(), LinuxHostError> {
        match self.backend {
            Some(b) if !b.native_cpl0() => Err(LinuxHostError::NoHardwareVirt {
                module: b.module().replace('_', "-"),
                title: b.title(),
            }),
            _ => Ok(()),
        }
    }
}

fn parse_backend(id: &str) -> Result<Backend, LinuxHostError> {
    match id {
        "vmx" => Ok(Backend::Vmx),
        "svm" => Ok(Backend::Svm),
        "pvm" => Ok(Backend::Pvm),
        other => Err(LinuxHostError::BadOverride(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvm_refuses_linux() {
        let e = LinuxHost::with_backend(Some(Backend::Pvm))
            .check()
            .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("this host's KVM is kvm-pvm"), "{msg}");
        assert!(msg.contains("'forkd doctor'"), "{msg}");
    }

    #[test]
    fn hardware_and_unknown_allow_linux() {
        for b in [Some(Backend::Vmx), Some(Backend::Svm), None] {
            LinuxHost::with_backend(b).check().unwrap();
        }
    }

    #[test]
    fn override_ids() {
        assert_eq!(parse_backend("svm").unwrap(), Backend::Svm);
        assert!(matches!(
            parse_backend("amd"),
            Err(LinuxHostError::BadOverride(_))
        ));
    }
}
