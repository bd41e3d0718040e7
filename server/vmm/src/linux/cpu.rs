//! vCPU state for a Linux guest: the boot vCPU enters `startup_64` in long
//! mode at CPL0 with `rsi` pointing at the zero page; the others stay in
//! wait-for-SIPI until the kernel starts them. Every vCPU gets the local
//! APIC's LINT0/LINT1 wired as ExtINT/NMI and MTRRs defaulting to
//! write-back.

use kvm_bindings::{kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs};
use kvm_ioctls::VcpuFd;

use super::boot::{CODE_SELECTOR, DATA_SELECTOR, GDT};
use super::layout;
use crate::cpu::segment;
use crate::error::{Result, VmmError};

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const RFLAGS_RESERVED: u64 = 1 << 1;

const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled, default memory type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// Local APIC register offsets and delivery modes.
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// CPUID leaf 1 ECX bit 31: running under a hypervisor. Linux looks for
/// KVM's leaves (kvm-clock, PV features) only when it is set.
const CPUID_1_ECX_HYPERVISOR: u32 = 1 << 31;

/// Gives vCPU `index` what KVM supports, its APIC id, and the hypervisor
/// bit.
pub fn set_cpuid(vcpu: &VcpuFd, supported: &CpuId, index: u8) -> Result<()> {
    let mut cpuid = crate::cpu::cpuid_for(supported, index);
    for entry in cpuid.as_mut_slice() {
        if entry.function == 1 {
            entry.ecx |= CPUID_1_ECX_HYPERVISOR;
        }
    }
    vcpu.set_cpuid2(&cpuid)
        .map_err(VmmError::kvm("KVM_SET_CPUID2"))
}

/// Sets up vCPU `index` (after its CPUID) for a Linux boot at `entry`.
pub fn setup_vcpu(vcpu: &VcpuFd, index: u8, entry: u64) -> Result<()> {
    set_lint(vcpu)?;
    set_boot_msrs(vcpu)?;
    if index == 0 {
        set_entry_registers(vcpu, entry)?;
    }
    Ok(())
}

fn set_entry_registers(vcpu: &VcpuFd, entry: u64) -> Result<()> {
    let mut sregs = vcpu.get_sregs().map_err(VmmError::kvm("KVM_GET_SREGS"))?;
    let code = segment(CODE_SELECTOR, GDT[2]);
    let data = segment(DATA_SELECTOR, GDT[3]);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: 0,
        limit: 0xffff,
        selector: 0,
        type_: 0xb, // busy 64-bit TSS, never used: the kernel loads its own
        present: 1,
        ..Default::default()
    };
    sregs.gdt.base = layout::GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
    sregs.cr3 = layout::PML4_ADDR;
    sregs.cr4 = CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs)
        .map_err(VmmError::kvm("KVM_SET_SREGS"))?;
    crate::cpu::set_initial_fpu(vcpu)?;
    let regs = kvm_regs {
        rip: entry,
        rsi: layout::ZERO_PAGE_ADDR,
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(VmmError::kvm("KVM_SET_REGS"))
}

fn set_boot_msrs(vcpu: &VcpuFd) -> Result<()> {
    let entries = [
        kvm_msr_entry {
            index: MSR_IA32_MISC_ENABLE,
            data: MISC_ENABLE_FAST_STRING,
            ..Default::default()
        },
        kvm_msr_entry {
            index: MSR_MTRR_DEF_TYPE,
            data: MTRR_ENABLE_WB,
            ..Default::default()
        },
    ];
    let msrs = Msrs::from_entries(&entries)
        .map_err(|e| VmmError::Boot(format!("building the boot MSR list: {e:?}")))?;
    let set = vcpu
        .set_msrs(&msrs)
        .map_err(VmmError::kvm("KVM_SET_MSRS"))?;
    if set != entries.len() {
        return Err(VmmError::Boot(format!(
            "KVM accepted {set} of {} boot MSRs",
            entries.len()
        )));
    }
    Ok(())
}

/// Wires LINT0 as ExtINT (the PIC) and LINT1 as NMI, as firmware would.
fn set_lint(vcpu: &VcpuFd) -> Result<()> {
    let mut lapic = vcpu.get_lapic().map_err(VmmError::kvm("KVM_GET_LAPIC"))?;
    for (offset, mode) in [
        (APIC_LVT_LINT0, APIC_MODE_EXTINT),
        (APIC_LVT_LINT1, APIC_MODE_NMI),
    ] {
        let mut raw = [0u8; 4];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = lapic.regs[offset + i] as u8;
        }
        let value = u32::from_le_bytes(raw);
        let value = (value & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[offset + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic)
        .map_err(VmmError::kvm("KVM_SET_LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_segments_are_ring0_long_mode() {
        let cs = segment(CODE_SELECTOR, GDT[2]);
        assert_eq!((cs.dpl, cs.l, cs.db, cs.present, cs.s), (0, 1, 0, 1, 1));
        let ds = segment(DATA_SELECTOR, GDT[3]);
        assert_eq!((ds.dpl, ds.present, ds.type_), (0, 1, 0x3));
    }
}
