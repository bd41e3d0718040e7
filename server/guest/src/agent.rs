//! The agent on vCPU 0: wait for a request, run it, report, repeat.

use forkd_guest_abi as abi;

use crate::args::Args;
use crate::builtins;
use crate::hw;
use crate::output::Output;

/// Serves requests forever.
pub fn serve() -> ! {
    let mb = hw::mailbox();
    // SAFETY: the mailbox is identity-mapped guest RAM owned by the agent
    // protocol; the VMM reads `magic` only after the first wait.
    unsafe { core::ptr::write_volatile(core::ptr::addr_of_mut!((*mb).magic), abi::MAILBOX_MAGIC) };
    loop {
        if hw::ring_load(abi::reg::WAIT) == 0 {
            continue; // woken without a request (e.g. a pause): wait again
        }
        // SAFETY: the VMM wrote the request before completing the wait and
        // does not touch these fields until it rings DONE.
        let (op, len) = unsafe {
            (
                core::ptr::read_volatile(core::ptr::addr_of!((*mb).op)),
                core::ptr::read_volatile(core::ptr::addr_of!((*mb).request_len)),
            )
        };
        let started = hw::rdtsc();
        let exit_code = match op {
            abi::op::EXEC => {
                let len = (len as usize).min(abi::REQUEST_MAX as usize);
                // SAFETY: the request area is REQUEST_MAX bytes of guest RAM.
                let bytes =
                    unsafe { core::slice::from_raw_parts(abi::REQUEST_ADDR as *const u8, len) };
                let mut out = Output::new();
                let code = builtins::run(Args::new(bytes), &mut out);
                out.finish();
                code
            }
            _ => {
                Output::new().finish(); // no output pending
                0 // PING and anything unknown: answer at once
            }
        };
        let took = hw::rdtsc().wrapping_sub(started);
        // SAFETY: as above; the VMM reads these after DONE rings.
        unsafe {
            core::ptr::write_volatile(core::ptr::addr_of_mut!((*mb).exit_code), exit_code);
            core::ptr::write_volatile(core::ptr::addr_of_mut!((*mb).duration_ticks), took);
        }
        hw::ring_store(abi::reg::DONE, 0);
    }
}
