//! A standby VM: the part of a restored VM that does not depend on the
//! snapshot (the KVM VM and irqchip, the vCPUs, a memory slot over
//! reserved address space), built before a sandbox asks for it, so that a
//! claimed child only maps the snapshot's memory and loads its state.
//!
//! The memory slot is the costly step (`KVM_SET_USER_MEMORY_REGION` waits
//! for the kernel's SRCU grace period, milliseconds); here it points at a
//! `PROT_NONE` [`Reservation`], and the claim maps the snapshot's memfd
//! over that range with `MAP_FIXED`: KVM resolves guest memory through the
//! host page tables at fault time, so the slot needs no update.

use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use crate::error::{Result, VmmError};
use crate::memory::{GuestRam, Reservation};
use crate::state::{self, VmState};
use crate::vm::{self, Vm, VmConfig};

/// A VM built ahead of its snapshot.
pub struct StandbyVm {
    kvm: Kvm,
    fd: VmFd,
    vcpus: Vec<VcpuFd>,
    reserved: Reservation,
}

impl StandbyVm {
    /// Builds a VM of `config`'s shape with no RAM behind its memory slot.
    pub fn prepare(config: &VmConfig) -> Result<StandbyVm> {
        if config.vcpus == 0 || u64::from(config.vcpus) > forkd_guest_abi::MAX_VCPUS {
            return Err(VmmError::Config(format!(
                "vcpus must be between 1 and {}, got {}",
                forkd_guest_abi::MAX_VCPUS,
                config.vcpus
            )));
        }
        let (kvm, fd) = vm::create_vm()?;
        let reserved = Reservation::new(u64::from(config.memory_mib) << 20)?;
        // SAFETY: the reservation is never unmapped and only ever holds
        // this VM's RAM (mapped over it at the claim).
        unsafe { vm::attach_range(&fd, reserved.host_address(), reserved.size()) }?;
        let vcpus = (0..config.vcpus)
            .map(|index| {
                fd.create_vcpu(u64::from(index))
                    .map_err(VmmError::kvm("KVM_CREATE_VCPU"))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(StandbyVm {
            kvm,
            fd,
            vcpus,
            reserved,
        })
    }

    /// Makes this the VM saved in `state`, with `memory` (the snapshot's
    /// memfd) mapped copy-on-write. `mark` names each step as it ends
    /// (start-up timing, [`crate::startup`]).
    pub fn restore(
        self,
        state: &VmState,
        memory: std::fs::File,
        mark: impl Fn(&'static str),
    ) -> Result<Vm> {
        if state.vcpus.len() != self.vcpus.len() || state.memory_bytes != self.reserved.size() {
            return Err(VmmError::Restore(format!(
                "the snapshot has {} vCPUs and {} bytes of RAM; this standby VM was built \
                 for {} vCPUs and {} bytes",
                state.vcpus.len(),
                state.memory_bytes,
                self.vcpus.len(),
                self.reserved.size()
            )));
        }
        if state.pit.is_some() {
            vm::create_pit(&self.fd)?;
        }
        let ram = GuestRam::from_snapshot_over(memory, state.memory_bytes, &self.reserved)?;
        mark("memory");
        state::restore_vm(&self.fd, state)?;
        mark("vm_state");
        for (vcpu, saved) in self.vcpus.iter().zip(&state.vcpus) {
            state::restore_vcpu(vcpu, saved)?;
        }
        mark("vcpus");
        Ok(Vm {
            kvm: self.kvm,
            fd: self.fd,
            ram,
            vcpus: self.vcpus,
            tsc_khz: state.tsc_khz,
        })
    }
}
