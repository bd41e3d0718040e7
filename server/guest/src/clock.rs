//! Time from the TSC, and sleeping without burning a host CPU.

use forkd_guest_abi as abi;

use crate::hw;

/// TSC ticks per millisecond.
pub fn ticks_per_ms() -> u64 {
    hw::boot_info().tsc_khz.max(1)
}

/// Converts TSC ticks to microseconds.
pub fn ticks_to_us(ticks: u64) -> u64 {
    ticks.saturating_mul(1000) / ticks_per_ms()
}

/// Blocks until the TSC reaches `deadline` or `stop()` says so; returns
/// false when stopped early. Long waits are handed to the VMM.
pub fn sleep_until(deadline: u64, stop: impl Fn() -> bool) -> bool {
    loop {
        if stop() {
            return false;
        }
        let now = hw::rdtsc();
        if now >= deadline {
            return true;
        }
        let us = ticks_to_us(deadline - now);
        if us >= 50 {
            // Short slices keep cancellation prompt.
            hw::ring_store(abi::reg::SLEEP, us.min(10_000) as u32);
        } else {
            core::hint::spin_loop();
        }
    }
}
