//! Giving freed heap memory back to the system after many connections
//! closed. Each HTTP/2 connection allocates buffers on whichever glibc
//! malloc arena its worker thread uses; once a flood's connections are
//! gone that memory is free but glibc keeps it mapped (measured: RSS 9 MiB
//! before a 10,000-connection flood, 63 MiB at its peak, 69 MiB after).
//! `malloc_trim(0)` releases the free pages of every arena.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Connections closed since the last trim.
static CLOSED: AtomicU64 = AtomicU64::new(0);
/// How often to look.
const EVERY: Duration = Duration::from_secs(2);
/// Trim once at least this many connections closed since the last trim.
const MIN_CLOSED: u64 = 64;

/// Counts a closed connection.
pub fn connection_closed() {
    CLOSED.fetch_add(1, Ordering::Relaxed);
}

/// Runs until the runtime ends: every 2 s, if at least 64 connections
/// closed since the last trim, trims the heap on the blocking pool.
pub async fn run() {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if CLOSED.load(Ordering::Relaxed) < MIN_CLOSED {
            continue;
        }
        let closed = CLOSED.swap(0, Ordering::Relaxed);
        let released = tokio::task::spawn_blocking(trim).await.unwrap_or(false);
        tracing::debug!(closed, released, "malloc_trim after connections closed");
    }
}

/// Returns free heap memory to the system; true if any was released.
#[cfg(target_env = "gnu")]
fn trim() -> bool {
    // SAFETY: malloc_trim only walks glibc's own allocator state under its
    // locks; any thread may call it at any time.
    unsafe { libc::malloc_trim(0) == 1 }
}

#[cfg(not(target_env = "gnu"))]
fn trim() -> bool {
    false
}
