//! The few instructions the guest needs: doorbell loads and stores, the
//! TSC, volatile access to the fixed regions of the ABI.

use core::arch::asm;

use forkd_guest_abi as abi;

/// Loads a doorbell register (one exit to the VMM); see `abi::reg`.
pub fn ring_load(reg: u64) -> u32 {
    // SAFETY: doorbell registers are mapped, user-accessible MMIO; the VMM
    // completes the load. Volatile, and everything before it is ordered
    // (the VMM reads and writes guest memory around the exit).
    unsafe {
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        let value = core::ptr::read_volatile(reg as *const u32);
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        value
    }
}

/// Stores to a doorbell register (one exit to the VMM); see `abi::reg`.
pub fn ring_store(reg: u64, value: u32) {
    // SAFETY: as for `ring_load`.
    unsafe {
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        core::ptr::write_volatile(reg as *mut u32, value);
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
    }
}

/// Reads the time-stamp counter.
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: rdtsc has no side effects; CR4.TSD is clear.
    unsafe {
        asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Raises #UD: the VMM reports it as a guest crash.
pub fn invalid_opcode() -> ! {
    // SAFETY: deliberately faults; never returns.
    unsafe { asm!("ud2", options(noreturn)) }
}

/// Writes to the unmapped null page: the VMM reports a #PF guest crash.
pub fn null_write() -> ! {
    // SAFETY: deliberately faults; the null page is not present.
    unsafe {
        asm!("mov qword ptr [{0}], 0", in(reg) 8u64, options(nostack));
        asm!("ud2", options(noreturn))
    }
}

/// The mailbox header.
pub fn mailbox() -> *mut abi::Mailbox {
    abi::MAILBOX_ADDR as *mut abi::Mailbox
}

/// The boot info the VMM wrote.
pub fn boot_info() -> abi::BootInfo {
    // SAFETY: the VMM writes BootInfo at this identity-mapped address before
    // the guest starts and never changes it.
    unsafe { core::ptr::read_volatile(abi::BOOT_INFO_ADDR as *const abi::BootInfo) }
}

/// Whether the VMM asked the running command to stop.
pub fn cancel_requested() -> bool {
    // SAFETY: the mailbox is identity-mapped guest RAM; the VMM writes
    // `cancel` concurrently, hence the volatile read.
    unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*mailbox()).cancel)) != 0 }
}
