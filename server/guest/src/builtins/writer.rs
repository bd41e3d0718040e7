//! The sequence writer (`dirty`) on vCPU 1 and its checker (`verify`).
//!
//! The writer stamps sequence numbers 1, 2, 3, ... into a ring of pages:
//! number `s` goes into the first and last word of page `s % pages`, then
//! `SEQ` becomes `s`. In any point-in-time copy of memory, once the writer
//! has finished its current stamp, page `i` holds the largest `s <= SEQ`
//! with `s % pages == i` in both words. A copy assembled from different
//! instants breaks that, which is what `verify` detects.

use core::fmt::Write;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use forkd_guest_abi as abi;

use super::usage;
use crate::args::Args;
use crate::output::Output;
use crate::{clock, hw};

static PAGES: AtomicU64 = AtomicU64::new(0);
static RATE: AtomicU64 = AtomicU64::new(0);
static SEQ: AtomicU64 = AtomicU64::new(0);
static STOP: AtomicU32 = AtomicU32::new(0);
static RUNNING: AtomicU32 = AtomicU32::new(0);
static GO: AtomicU32 = AtomicU32::new(0);

const DEFAULT_PAGES: u64 = 256;
const DEFAULT_RATE: u64 = 10_000;
const WRITER_VCPU: u32 = 1;

/// The writer's state, for `stat`.
pub struct Status {
    pub running: bool,
    pub pages: u64,
    pub rate: u64,
    pub seq: u64,
}

/// Current writer state.
pub fn status() -> Status {
    Status {
        running: RUNNING.load(Ordering::Acquire) != 0,
        pages: PAGES.load(Ordering::Relaxed),
        rate: RATE.load(Ordering::Relaxed),
        seq: SEQ.load(Ordering::Acquire),
    }
}

/// The loop of every vCPU but 0: wait for a kick, run the writer.
pub fn background_loop() -> ! {
    loop {
        if GO.swap(0, Ordering::AcqRel) != 0 {
            run_writer();
        } else {
            hw::ring_load(abi::reg::BG_WAIT);
        }
    }
}

fn page_addr(index: u64) -> u64 {
    abi::RING_ADDR + index * abi::PAGE_SIZE
}

fn stamp(index: u64) -> (u64, u64) {
    let page = page_addr(index);
    // SAFETY: ring pages are identity-mapped guest RAM reserved for the
    // writer; `index < RING_MAX_PAGES` is enforced by `dirty`.
    unsafe {
        (
            core::ptr::read_volatile(page as *const u64),
            core::ptr::read_volatile((page + abi::PAGE_SIZE - 8) as *const u64),
        )
    }
}

fn set_stamp(index: u64, value: u64) {
    let page = page_addr(index);
    // SAFETY: as in `stamp`.
    unsafe {
        core::ptr::write_volatile(page as *mut u64, value);
        core::ptr::write_volatile((page + abi::PAGE_SIZE - 8) as *mut u64, value);
    }
}

fn run_writer() {
    RUNNING.store(1, Ordering::Release);
    let pages = PAGES.load(Ordering::Relaxed).max(1);
    let rate = RATE.load(Ordering::Relaxed);
    let ticks_per_ms = clock::ticks_per_ms();
    let ticks_per_page = (ticks_per_ms * 1000).checked_div(rate).unwrap_or(0);
    let start = hw::rdtsc();
    let first = SEQ.load(Ordering::Acquire);
    let mut seq = first;
    while STOP.load(Ordering::Acquire) == 0 {
        seq += 1;
        set_stamp(seq % pages, seq);
        SEQ.store(seq, Ordering::Release);
        if ticks_per_page != 0 {
            // Write in bursts of about a millisecond, then sleep in the VMM.
            let due = start + (seq - first) * ticks_per_page;
            if due > hw::rdtsc() + ticks_per_ms {
                clock::sleep_until(due, || STOP.load(Ordering::Acquire) != 0);
            }
        }
    }
    RUNNING.store(0, Ordering::Release);
}

/// Stops the writer; returns whether it was running, or Err on timeout.
fn stop_writer() -> Result<bool, ()> {
    let was_running = RUNNING.load(Ordering::Acquire) != 0 || GO.load(Ordering::Acquire) != 0;
    GO.store(0, Ordering::Release);
    STOP.store(1, Ordering::Release);
    let deadline = hw::rdtsc() + 2000 * clock::ticks_per_ms();
    while RUNNING.load(Ordering::Acquire) != 0 {
        if hw::rdtsc() > deadline {
            return Err(());
        }
        core::hint::spin_loop();
    }
    STOP.store(0, Ordering::Release);
    Ok(was_running)
}

fn start_writer() {
    STOP.store(0, Ordering::Release);
    GO.store(1, Ordering::Release);
    hw::ring_store(abi::reg::BG_KICK, WRITER_VCPU);
}

pub fn dirty(args: Args<'_>, out: &mut Output) -> i32 {
    if hw::boot_info().vcpus < 2 {
        let _ = writeln!(
            out.stderr(),
            "dirty: the writer runs on vCPU 1; spawn the sandbox with vcpus >= 2"
        );
        return abi::EXIT_USAGE;
    }
    if args.get(1) == Some(b"stop") {
        return match stop_writer() {
            Ok(_) => {
                let _ = writeln!(
                    out.stdout(),
                    "writer stopped at seq={}",
                    SEQ.load(Ordering::Acquire)
                );
                0
            }
            Err(()) => writer_stuck(out),
        };
    }
    let (Ok(pages), Ok(rate)) = (args.number(1, DEFAULT_PAGES), args.number(2, DEFAULT_RATE))
    else {
        return usage(out, "dirty", "PAGES and RATE must be decimal numbers");
    };
    if pages == 0 || pages > abi::RING_MAX_PAGES {
        let _ = writeln!(
            out.stderr(),
            "dirty: PAGES must be between 1 and {}",
            abi::RING_MAX_PAGES
        );
        return abi::EXIT_USAGE;
    }
    if stop_writer().is_err() {
        return writer_stuck(out);
    }
    for i in 0..pages {
        set_stamp(i, 0);
    }
    PAGES.store(pages, Ordering::Relaxed);
    RATE.store(rate, Ordering::Relaxed);
    SEQ.store(0, Ordering::Release);
    start_writer();
    let _ = writeln!(
        out.stdout(),
        "writer started: pages={pages} rate={rate}/s on vcpu {WRITER_VCPU}"
    );
    0
}

fn writer_stuck(out: &mut Output) -> i32 {
    let _ = writeln!(out.stderr(), "the writer did not stop within 2 s");
    1
}

/// The value page `index` must hold once stamps up to `seq` are written.
fn expected(index: u64, seq: u64, pages: u64) -> u64 {
    if seq < index {
        return 0;
    }
    seq - (seq - index) % pages
}

pub fn verify(_: Args<'_>, out: &mut Output) -> i32 {
    let pages = PAGES.load(Ordering::Relaxed);
    if pages == 0 {
        let _ = writeln!(
            out.stderr(),
            "verify: no writer has run; start one with 'dirty'"
        );
        return abi::EXIT_USAGE;
    }
    let was_running = match stop_writer() {
        Ok(r) => r,
        Err(()) => return writer_stuck(out),
    };
    let seq = SEQ.load(Ordering::Acquire);
    let mut bad = 0u64;
    for i in 0..pages {
        let want = expected(i, seq, pages);
        let (front, back) = stamp(i);
        if front != want || back != want {
            if bad < 5 {
                let _ = writeln!(
                    out.stderr(),
                    "page {i}: stamps {front}/{back}, expected {want}"
                );
            }
            bad += 1;
        }
    }
    if was_running {
        start_writer();
    }
    if bad == 0 {
        let _ = writeln!(
            out.stdout(),
            "verify ok: seq={seq} pages={pages} consistent"
        );
        0
    } else {
        let _ = writeln!(
            out.stdout(),
            "verify FAILED: {bad} of {pages} pages inconsistent at seq={seq}"
        );
        1
    }
}
