//! `fill` and `checksum`: the warm state and its digest.

use core::fmt::Write;
use core::sync::atomic::{AtomicU64, Ordering};

use forkd_guest_abi as abi;

use super::usage;
use crate::args::Args;
use crate::hw;
use crate::output::Output;
use crate::pattern::{fill_word, Digest};

const MIB: u64 = 1 << 20;
const WORDS_PER_MIB: usize = (MIB / 8) as usize;

static FILLED_MIB: AtomicU64 = AtomicU64::new(0);
static FILL_SEED: AtomicU64 = AtomicU64::new(0);

/// MiB filled by the last `fill`, and its seed.
pub fn filled() -> (u64, u64) {
    (
        FILLED_MIB.load(Ordering::Relaxed),
        FILL_SEED.load(Ordering::Relaxed),
    )
}

fn capacity_mib() -> u64 {
    hw::boot_info().memory_bytes.saturating_sub(abi::FILL_ADDR) / MIB
}

/// One MiB of the fill region as words.
fn mib_words(index: u64) -> &'static mut [u64] {
    // SAFETY: callers keep `index` below `capacity_mib()`, so the range lies
    // inside guest RAM above FILL_ADDR, which only fill/checksum use.
    unsafe {
        core::slice::from_raw_parts_mut((abi::FILL_ADDR + index * MIB) as *mut u64, WORDS_PER_MIB)
    }
}

pub fn fill(args: Args<'_>, out: &mut Output) -> i32 {
    let (Ok(mib), Ok(seed)) = (args.number(1, u64::MAX), args.number(2, 0)) else {
        return usage(out, "fill", "MIB and SEED must be decimal numbers");
    };
    if mib == u64::MAX {
        return usage(out, "fill", "expected MIB");
    }
    let capacity = capacity_mib();
    if mib > capacity {
        let _ = writeln!(
            out.stderr(),
            "fill: {mib} MiB does not fit; this guest can fill at most {capacity} MiB"
        );
        return abi::EXIT_USAGE;
    }
    FILLED_MIB.store(0, Ordering::Relaxed);
    for m in 0..mib {
        if hw::cancel_requested() {
            FILLED_MIB.store(m, Ordering::Relaxed);
            return abi::EXIT_CANCELLED;
        }
        let base = m * WORDS_PER_MIB as u64;
        for (i, w) in mib_words(m).iter_mut().enumerate() {
            *w = fill_word(seed, base + i as u64);
        }
    }
    FILLED_MIB.store(mib, Ordering::Relaxed);
    FILL_SEED.store(seed, Ordering::Relaxed);
    let _ = writeln!(out.stdout(), "filled {mib} MiB with seed {seed}");
    0
}

pub fn checksum(args: Args<'_>, out: &mut Output) -> i32 {
    let Ok(mib) = args.number(1, FILLED_MIB.load(Ordering::Relaxed)) else {
        return usage(out, "checksum", "MIB must be a decimal number");
    };
    if mib > capacity_mib() {
        return usage(out, "checksum", "MIB is larger than the fill region");
    }
    let mut digest = Digest::new();
    for m in 0..mib {
        if hw::cancel_requested() {
            return abi::EXIT_CANCELLED;
        }
        digest.update(mib_words(m));
    }
    let _ = writeln!(out.stdout(), "{:016x}", digest.finish());
    0
}
