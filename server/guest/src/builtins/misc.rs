//! Small builtins: echo, stat, sleep, emit, exit, crash, poweroff.

use core::fmt::Write;
use core::sync::atomic::{AtomicU64, Ordering};

use forkd_guest_abi as abi;

use super::{memory, usage, writer};
use crate::args::{parse_i32, Args};
use crate::output::Output;
use crate::{clock, hw};

static REQUESTS: AtomicU64 = AtomicU64::new(0);

/// Counts one served command (for `stat`).
pub fn count_request() {
    REQUESTS.fetch_add(1, Ordering::Relaxed);
}

pub fn echo(args: Args<'_>, out: &mut Output) -> i32 {
    for (i, arg) in args.iter().skip(1).enumerate() {
        if i > 0 {
            out.write(abi::stream::STDOUT, b" ");
        }
        out.write(abi::stream::STDOUT, arg);
    }
    out.write(abi::stream::STDOUT, b"\n");
    0
}

pub fn stat(_: Args<'_>, out: &mut Output) -> i32 {
    let info = hw::boot_info();
    let (filled_mib, seed) = memory::filled();
    let w = writer::status();
    let mut o = out.stdout();
    let _ = writeln!(o, "vcpus={}", info.vcpus);
    let _ = writeln!(o, "memory_mib={}", info.memory_bytes >> 20);
    let _ = writeln!(o, "tsc_khz={}", info.tsc_khz);
    let _ = writeln!(o, "filled_mib={filled_mib}");
    let _ = writeln!(o, "fill_seed={seed}");
    let _ = writeln!(
        o,
        "writer={} pages={} rate={} seq={}",
        if w.running { "running" } else { "stopped" },
        w.pages,
        w.rate,
        w.seq
    );
    let _ = writeln!(o, "requests={}", REQUESTS.load(Ordering::Relaxed));
    0
}

pub fn sleep(args: Args<'_>, out: &mut Output) -> i32 {
    let Some(ms) = args.get(1).and_then(|a| crate::args::parse_u64(a).ok()) else {
        return usage(out, "sleep", "expected a number of milliseconds");
    };
    let deadline = hw::rdtsc().saturating_add(ms.saturating_mul(clock::ticks_per_ms()));
    if clock::sleep_until(deadline, hw::cancel_requested) {
        0
    } else {
        abi::EXIT_CANCELLED
    }
}

pub fn emit(args: Args<'_>, out: &mut Output) -> i32 {
    let Some(bytes) = args.get(1).and_then(|a| crate::args::parse_u64(a).ok()) else {
        return usage(out, "emit", "expected a byte count");
    };
    const LINE: &[u8; 64] = b"forkd emit: the quick brown fox jumps over the lazy dog 0123456\n";
    let mut left = bytes as usize;
    while left > 0 {
        if hw::cancel_requested() {
            return abi::EXIT_CANCELLED;
        }
        let n = left.min(abi::OUTPUT_SIZE as usize);
        out.write_with(abi::stream::STDOUT, n, |chunk| {
            for (dst, src) in chunk.chunks_mut(64).zip(core::iter::repeat(LINE)) {
                dst.copy_from_slice(&src[..dst.len()]);
            }
        });
        left -= n;
    }
    0
}

pub fn exit(args: Args<'_>, out: &mut Output) -> i32 {
    match args.get(1).map(parse_i32) {
        None => 0,
        Some(Ok(code)) => code,
        Some(Err(())) => usage(out, "exit", "expected an integer exit code"),
    }
}

pub fn crash(args: Args<'_>, _: &mut Output) -> i32 {
    match args.get(1) {
        Some(b"ud") => hw::invalid_opcode(),
        _ => hw::null_write(),
    }
}

pub fn poweroff(args: Args<'_>, out: &mut Output) -> i32 {
    let status = match args.get(1).map(parse_i32) {
        None => 0,
        Some(Ok(code)) => code,
        Some(Err(())) => return usage(out, "poweroff", "expected an integer status"),
    };
    out.flush();
    hw::ring_store(abi::reg::SHUTDOWN, status as u32);
    // The VMM does not resume a guest that powered off.
    hw::invalid_opcode()
}
