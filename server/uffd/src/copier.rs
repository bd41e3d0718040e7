//! The bulk copier: every page that still needs copying, in address order,
//! optionally at a limited rate.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::engine::Shared;
use crate::pages::PAGE_SIZE;

/// Bytes the copier copies before lifting their protection in one call
/// (at least one unit).
const UNPROTECT_BATCH_BYTES: usize = 512 * PAGE_SIZE;
/// Most bytes the copier claims and writes at once (at least one unit).
const WRITE_RUN_BYTES: usize = 64 * PAGE_SIZE;
/// Longest single sleep of a rate-limited copier (keeps cancel prompt).
const MAX_NAP: Duration = Duration::from_millis(50);

/// Copies every pending unit; on failure records it in `s` and returns.
/// `rate` is bytes per second of memory walked (0: unlimited).
pub(crate) fn copy_all(s: &Shared, rate: u64) {
    let pages = s.states.len();
    let write_run = (WRITE_RUN_BYTES / s.unit).max(1);
    let unprotect_batch = (UNPROTECT_BATCH_BYTES / s.unit).max(1);
    let started = Instant::now();
    let mut walked = 0u64;
    let mut batch_start = 0;
    let mut page = 0;
    while page < pages {
        if s.cancel.load(Ordering::Acquire) {
            return;
        }
        // Claim a run of consecutive pending pages.
        let mut run = 0;
        while page + run < pages && run < write_run && s.states.claim(page + run) {
            run += 1;
        }
        if run > 0 {
            if let Err(e) = s.copy(page, run) {
                s.fail(e);
                // Release the claims, so no fault waits on them.
                for p in page..page + run {
                    s.states.finish(p);
                }
                return;
            }
            page += run;
            walked += (run * s.unit) as u64;
        } else {
            // Needs no copy, or claimed by the fault handler.
            s.states.wait_done(page);
            page += 1;
        }
        if page - batch_start >= unprotect_batch || page == pages {
            if let Err(e) = s.unprotect(batch_start, page - batch_start) {
                s.fail(e);
                return;
            }
            batch_start = page;
            if rate > 0 {
                throttle(s, started, walked, rate);
            }
        }
    }
}

/// Sleeps until `walked` bytes are due at `rate` bytes/s since `started`.
fn throttle(s: &Shared, started: Instant, walked: u64, rate: u64) {
    let due = started + Duration::from_secs_f64(walked as f64 / rate as f64);
    loop {
        let now = Instant::now();
        if now >= due || s.cancel.load(Ordering::Acquire) {
            return;
        }
        std::thread::sleep((due - now).min(MAX_NAP));
    }
}
