//! forkd's reference guest.
//!
//! A freestanding program that `forkd-vmm` loads at `IMAGE_ADDR` and enters
//! at CPL3 on every vCPU, with identity-mapped memory and IOPL=3. vCPU 0
//! serves agent requests from the mailbox; the other vCPUs wait for
//! background work (the `dirty` writer). There is no OS: no interrupts, no
//! allocator; everything shared lives in atomics.
#![no_std]
#![no_main]

mod agent;
mod args;
mod builtins;
mod clock;
mod hw;
mod mem;
mod output;
mod pattern;

use forkd_guest_abi as abi;

/// Entry point of every vCPU; the VMM passes the vCPU index and the boot
/// info address in the first two argument registers.
///
/// # Safety
/// Called only by the VMM, once per vCPU, on a fresh stack.
#[no_mangle]
#[link_section = ".text._start"]
pub unsafe extern "C" fn _start(vcpu: u64, _boot_info: *const abi::BootInfo) -> ! {
    if vcpu == 0 {
        agent::serve()
    } else {
        builtins::writer::background_loop()
    }
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // An invalid opcode reaches the VMM as a guest crash with this RIP.
    hw::invalid_opcode()
}
