//! Everything KVM holds for a VM that the guest needs to continue exactly
//! where it was: per-vCPU registers and interrupt state, and the VM-wide
//! irqchip, PIT and clock, and for a Linux guest the state of the VMM's own
//! devices. Serialised (JSON, versioned) into a snapshot's `vmstate`;
//! restored in the order KVM needs: clock, irqchip and PIT, then per vCPU
//! CPUID, mp_state, regs, sregs, xsave, xcrs, debugregs, LAPIC, MSRs,
//! events.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::error::{Result, VmmError};
use crate::linux::device_state::LinuxDevicesState;

/// Version of the `vmstate` format written now; bumped on any change.
/// Version 2 added the PIT and the Linux guest's devices.
pub const VMSTATE_VERSION: u32 = 2;
/// The oldest version still read (version 1 lacks only what a
/// reference-guest VM never has: a PIT and Linux devices).
pub const VMSTATE_OLDEST: u32 = 1;

/// The saved state of one vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// CPUID table the vCPU ran with.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Multiprocessing state (runnable, halted, ...).
    pub mp_state: kvm_mp_state,
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX state.
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Every MSR KVM let us read (TSC included).
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs.
    pub events: kvm_vcpu_events,
}

/// The saved state of a whole VM (memory is stored beside it).
#[derive(Serialize, Deserialize)]
pub struct VmState {
    /// [`VMSTATE_VERSION`].
    pub version: u32,
    /// Bytes of guest RAM.
    pub memory_bytes: u64,
    /// TSC frequency the guest was told at boot.
    pub tsc_khz: u64,
    /// kvmclock.
    pub clock: kvm_clock_data,
    /// PIC master, PIC slave and IOAPIC.
    pub irqchips: Vec<kvm_irqchip>,
    /// One per vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// KVM's PIT, for a VM that has one (Linux guests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pit: Option<kvm_pit_state2>,
    /// The VMM's devices of a Linux guest; `None` for the reference guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub linux: Option<LinuxDevicesState>,
}

impl VmState {
    /// Serialises the state.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("VM state always serialises")
    }

    /// Parses a saved state, checking its version.
    pub fn from_bytes(bytes: &[u8]) -> Result<VmState> {
        let state: VmState = serde_json::from_slice(bytes)
            .map_err(|e| VmmError::Restore(format!("vmstate does not parse: {e}")))?;
        if !(VMSTATE_OLDEST..=VMSTATE_VERSION).contains(&state.version) {
            return Err(VmmError::Restore(format!(
                "vmstate version {} is not supported (this forkd-vmm reads versions \
                 {VMSTATE_OLDEST} to {VMSTATE_VERSION})",
                state.version
            )));
        }
        if state.linux.is_some() && state.pit.is_none() {
            return Err(VmmError::Restore(
                "vmstate has Linux devices but no PIT state".into(),
            ));
        }
        if state.vcpus.is_empty() {
            return Err(VmmError::Restore("vmstate has no vCPUs".into()));
        }
        Ok(state)
    }
}

fn irqchip_ids() -> [u32; 3] {
    [
        KVM_IRQCHIP_PIC_MASTER,
        KVM_IRQCHIP_PIC_SLAVE,
        KVM_IRQCHIP_IOAPIC,
    ]
}

/// Saves the VM-wide device state.
pub fn save_vm(vm: &VmFd) -> Result<(kvm_clock_data, Vec<kvm_irqchip>)> {
    let mut clock = vm.get_clock().map_err(VmmError::kvm("KVM_GET_CLOCK"))?;
    clock.flags = 0;
    let mut chips = Vec::with_capacity(3);
    for id in irqchip_ids() {
        let mut chip = kvm_irqchip {
            chip_id: id,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip)
            .map_err(VmmError::kvm("KVM_GET_IRQCHIP"))?;
        chips.push(chip);
    }
    Ok((clock, chips))
}

/// Saves KVM's PIT.
pub fn save_pit(vm: &VmFd) -> Result<kvm_pit_state2> {
    vm.get_pit2().map_err(VmmError::kvm("KVM_GET_PIT2"))
}

/// Restores the VM-wide device state (before any vCPU state); the VM must
/// have a PIT when `state` has one.
pub fn restore_vm(vm: &VmFd, state: &VmState) -> Result<()> {
    vm.set_clock(&state.clock)
        .map_err(VmmError::kvm("KVM_SET_CLOCK"))?;
    for chip in &state.irqchips {
        vm.set_irqchip(chip)
            .map_err(VmmError::kvm("KVM_SET_IRQCHIP"))?;
    }
    if let Some(pit) = &state.pit {
        vm.set_pit2(pit).map_err(VmmError::kvm("KVM_SET_PIT2"))?;
    }
    Ok(())
}

/// The MSRs to save: every index KVM reports that it also lets us read.
pub fn msr_indices(kvm: &Kvm) -> Result<Vec<u32>> {
    let list = kvm
        .get_msr_index_list()
        .map_err(VmmError::kvm("KVM_GET_MSR_INDEX_LIST"))?;
    Ok(list.as_slice().to_vec())
}

/// Reads as many of `indices` as KVM allows (KVM stops at the first MSR it
/// refuses; that one is skipped and the rest retried).
fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|e| VmmError::Restore(format!("MSR list: {e:?}")))?;
        let read = vcpu
            .get_msrs(&mut msrs)
            .map_err(VmmError::kvm("KVM_GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..read]);
        rest = &rest[(read + 1).min(rest.len())..];
    }
    Ok(out)
}

/// Saves one vCPU's state. The vCPU must not be running and must have no
/// pending I/O completion.
pub fn save_vcpu(vcpu: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState> {
    Ok(VcpuState {
        cpuid: vcpu
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(VmmError::kvm("KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec(),
        mp_state: vcpu
            .get_mp_state()
            .map_err(VmmError::kvm("KVM_GET_MP_STATE"))?,
        regs: vcpu.get_regs().map_err(VmmError::kvm("KVM_GET_REGS"))?,
        sregs: vcpu.get_sregs().map_err(VmmError::kvm("KVM_GET_SREGS"))?,
        xsave: vcpu.get_xsave().map_err(VmmError::kvm("KVM_GET_XSAVE"))?,
        xcrs: vcpu.get_xcrs().map_err(VmmError::kvm("KVM_GET_XCRS"))?,
        debugregs: vcpu
            .get_debug_regs()
            .map_err(VmmError::kvm("KVM_GET_DEBUGREGS"))?,
        lapic: vcpu.get_lapic().map_err(VmmError::kvm("KVM_GET_LAPIC"))?,
        msrs: read_msrs(vcpu, msr_indices)?,
        events: vcpu
            .get_vcpu_events()
            .map_err(VmmError::kvm("KVM_GET_VCPU_EVENTS"))?,
    })
}

/// Restores one vCPU's state into a freshly created vCPU.
pub fn restore_vcpu(vcpu: &VcpuFd, state: &VcpuState) -> Result<()> {
    let cpuid = CpuId::from_entries(&state.cpuid)
        .map_err(|e| VmmError::Restore(format!("CPUID table: {e:?}")))?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(VmmError::kvm("KVM_SET_CPUID2"))?;
    vcpu.set_mp_state(state.mp_state)
        .map_err(VmmError::kvm("KVM_SET_MP_STATE"))?;
    vcpu.set_regs(&state.regs)
        .map_err(VmmError::kvm("KVM_SET_REGS"))?;
    vcpu.set_sregs(&state.sregs)
        .map_err(VmmError::kvm("KVM_SET_SREGS"))?;
    // SAFETY: `state.xsave` is a complete kvm_xsave read by KVM_GET_XSAVE on
    // a vCPU with the same CPUID.
    unsafe { vcpu.set_xsave(&state.xsave) }.map_err(VmmError::kvm("KVM_SET_XSAVE"))?;
    vcpu.set_xcrs(&state.xcrs)
        .map_err(VmmError::kvm("KVM_SET_XCRS"))?;
    vcpu.set_debug_regs(&state.debugregs)
        .map_err(VmmError::kvm("KVM_SET_DEBUGREGS"))?;
    vcpu.set_lapic(&state.lapic)
        .map_err(VmmError::kvm("KVM_SET_LAPIC"))?;
    let msrs = Msrs::from_entries(&state.msrs)
        .map_err(|e| VmmError::Restore(format!("MSR list: {e:?}")))?;
    let written = vcpu
        .set_msrs(&msrs)
        .map_err(VmmError::kvm("KVM_SET_MSRS"))?;
    if written != state.msrs.len() {
        let index = state.msrs[written].index;
        return Err(VmmError::Restore(format!(
            "KVM refused MSR {index:#x} ({written} of {} restored)",
            state.msrs.len()
        )));
    }
    vcpu.set_vcpu_events(&state.events)
        .map_err(VmmError::kvm("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `vmstate` of a Linux guest (1 vCPU, 512 MiB, debian-python) from a
    /// DIFF branch on the SVM test host, as forkd-vmm wrote it.
    const LINUX_V2: &[u8] = include_bytes!("../tests/fixtures/vmstate-v2-linux.json");
    /// `vmstate` of the reference guest (1 vCPU, 64 MiB) from a FULL branch
    /// on KVM-PVM.
    const REFERENCE_V2: &[u8] = include_bytes!("../tests/fixtures/vmstate-v2-reference.json");

    #[test]
    fn golden_linux_vmstate_still_reads() {
        let state = VmState::from_bytes(LINUX_V2).unwrap();
        assert_eq!(state.version, 2);
        assert_eq!(state.memory_bytes, 512 << 20);
        assert_eq!(state.vcpus.len(), 1);
        assert!(state.pit.is_some());
        let linux = state.linux.expect("Linux devices");
        assert!(linux.console.active);
        assert_eq!(linux.console.queues.len(), 2);
        assert!(linux
            .console
            .queues
            .iter()
            .all(|q| q.ready && q.size == 256));
        assert_eq!(linux.serial.line_control & 0x3, 0x3, "8 data bits");
    }

    #[test]
    fn golden_reference_vmstate_still_reads() {
        let state = VmState::from_bytes(REFERENCE_V2).unwrap();
        assert_eq!((state.memory_bytes, state.vcpus.len()), (64 << 20, 1));
        assert!(state.pit.is_none() && state.linux.is_none());
    }

    #[test]
    fn version_1_reads_and_unknown_versions_are_refused() {
        let mut value: serde_json::Value = serde_json::from_slice(REFERENCE_V2).unwrap();
        value["version"] = 1.into();
        let state = VmState::from_bytes(&serde_json::to_vec(&value).unwrap()).unwrap();
        assert_eq!(state.version, 1);
        value["version"] = 3.into();
        let err = VmState::from_bytes(&serde_json::to_vec(&value).unwrap())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("version 3 is not supported"), "{err}");
    }

    #[test]
    fn linux_devices_without_a_pit_are_refused() {
        let mut value: serde_json::Value = serde_json::from_slice(LINUX_V2).unwrap();
        value.as_object_mut().unwrap().remove("pit");
        let err = VmState::from_bytes(&serde_json::to_vec(&value).unwrap())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("no PIT"), "{err}");
    }

    #[test]
    fn a_state_round_trips() {
        let state = VmState::from_bytes(LINUX_V2).unwrap();
        let again = VmState::from_bytes(&state.to_bytes()).unwrap();
        assert_eq!(again.linux, state.linux);
        assert_eq!(again.to_bytes(), state.to_bytes());
    }
}
