//! Initial state of each vCPU: CPUID, long mode at CPL3 with IOPL=3, the
//! entry registers, and (for secondary vCPUs) leaving wait-for-SIPI.

use forkd_guest_abi as abi;
use kvm_bindings::{kvm_fpu, kvm_mp_state, kvm_regs, kvm_segment, CpuId, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::VcpuFd;

use crate::boot::{selector, GDT, TSS_SIZE};
use crate::error::{Result, VmmError};

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const RFLAGS_RESERVED: u64 = 1 << 1;
const RFLAGS_IOPL3: u64 = 3 << 12;

/// Gives vCPU `index` its CPUID table: what KVM supports, with this vCPU's
/// APIC id.
pub fn set_cpuid(vcpu: &VcpuFd, supported: &CpuId, index: u8) -> Result<()> {
    vcpu.set_cpuid2(&cpuid_for(supported, index))
        .map_err(VmmError::kvm("KVM_SET_CPUID2"))
}

/// What KVM supports, with vCPU `index`'s APIC id.
pub fn cpuid_for(supported: &CpuId, index: u8) -> CpuId {
    let mut cpuid = supported.clone();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => entry.ebx = (entry.ebx & 0x00ff_ffff) | (u32::from(index) << 24),
            0xb | 0x1f => entry.edx = u32::from(index),
            _ => {}
        }
    }
    cpuid
}

/// The KVM view of GDT `descriptor` loaded with `selector` (flat: base 0,
/// 4 GiB limit).
pub(crate) fn segment(selector: u16, descriptor: u64) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: ((descriptor >> 40) & 0xf) as u8,
        present: ((descriptor >> 47) & 1) as u8,
        dpl: ((descriptor >> 45) & 3) as u8,
        db: ((descriptor >> 54) & 1) as u8,
        s: ((descriptor >> 44) & 1) as u8,
        l: ((descriptor >> 53) & 1) as u8,
        g: ((descriptor >> 55) & 1) as u8,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// The x87/SSE state at power-on: all exceptions masked.
pub(crate) fn set_initial_fpu(vcpu: &VcpuFd) -> Result<()> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(VmmError::kvm("KVM_SET_FPU"))
}

/// Puts vCPU `index` in 64-bit mode at CPL3 at `entry`, with its own stack,
/// `rdi` = vCPU index and `rsi` = boot info address.
pub fn set_entry_state(vcpu: &VcpuFd, index: u8, entry: u64) -> Result<()> {
    let mut sregs = vcpu.get_sregs().map_err(VmmError::kvm("KVM_GET_SREGS"))?;
    let user_code = segment(selector::USER_CODE, GDT[4]);
    let user_data = segment(selector::USER_DATA, GDT[3]);
    sregs.cs = user_code;
    sregs.ss = user_data;
    sregs.ds = user_data;
    sregs.es = user_data;
    sregs.fs = user_data;
    sregs.gs = user_data;
    sregs.tr = kvm_segment {
        base: abi::TSS_ADDR,
        limit: (TSS_SIZE - 1) as u32,
        selector: selector::TSS,
        type_: 0xb, // busy 64-bit TSS
        present: 1,
        ..Default::default()
    };
    sregs.ldt = kvm_segment {
        type_: 0x2,
        present: 1,
        unusable: 1,
        ..Default::default()
    };
    sregs.gdt.base = abi::GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = abi::IDT_ADDR;
    sregs.idt.limit = (256 * 16 - 1) as u16;
    // Set every control bit explicitly: the reset CR0 has CD/NW set.
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = abi::PAGE_TABLES_ADDR;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs)
        .map_err(VmmError::kvm("KVM_SET_SREGS"))?;

    set_initial_fpu(vcpu)?;

    let regs = kvm_regs {
        rip: entry,
        // As if `call`ed: rsp + 8 is 16-byte aligned.
        rsp: abi::stack_top(u64::from(index)) - 8,
        rdi: u64::from(index),
        rsi: abi::BOOT_INFO_ADDR,
        rflags: RFLAGS_RESERVED | RFLAGS_IOPL3,
        ..Default::default()
    };
    vcpu.set_regs(&regs)
        .map_err(VmmError::kvm("KVM_SET_REGS"))?;

    if index != 0 {
        // Secondary vCPUs start in wait-for-SIPI under an in-kernel LAPIC.
        vcpu.set_mp_state(kvm_mp_state {
            mp_state: KVM_MP_STATE_RUNNABLE,
        })
        .map_err(VmmError::kvm("KVM_SET_MP_STATE"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_segments_are_ring3_long_mode() {
        let cs = segment(selector::USER_CODE, GDT[4]);
        assert_eq!((cs.dpl, cs.l, cs.db, cs.present, cs.s), (3, 1, 0, 1, 1));
        assert_eq!(cs.type_, 0xa);
        let ds = segment(selector::USER_DATA, GDT[3]);
        assert_eq!((ds.dpl, ds.present, ds.type_), (3, 1, 0x2));
    }
}
