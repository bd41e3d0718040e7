//! The watchdog of one VMM, and what it measures: when the VMM was last
//! heard from.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use forkd_control::Request;

use super::Vmm;
use crate::sync::lock;

/// How often the watchdog sends a heartbeat (at most; more often for a
/// watchdog bound under 4 s).
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

impl Vmm {
    /// Records that the VMM sent a frame.
    pub(super) fn heard(&self) {
        *lock(&self.last_heard) = Instant::now();
    }

    /// How long since the VMM was last heard; zero while the reader is not
    /// reading (waiting for a slow exec caller).
    fn silent_for(&self) -> Duration {
        let mut last = lock(&self.last_heard);
        if self.reader_waiting.load(Ordering::SeqCst) {
            *last = Instant::now();
        }
        last.elapsed()
    }
}

/// The watchdog of one VMM: once it is ready, a heartbeat every second (or
/// a quarter of `bound`); when nothing at all was heard from the VMM for
/// `bound`, it is declared failed and killed. The heartbeat is answered by
/// the VMM's request reader, so long snapshot writes and Execs do not
/// count as silence; a stopped (SIGSTOP) or wedged process does.
pub(super) async fn watchdog(vmm: std::sync::Weak<Vmm>, bound: Duration) {
    let every = HEARTBEAT_EVERY
        .min(bound / 4)
        .max(Duration::from_millis(10));
    let ready = match vmm.upgrade() {
        Some(v) => v.wait_ready().await.is_ok(),
        None => false,
    };
    if !ready {
        return;
    }
    if let Some(v) = vmm.upgrade() {
        v.heard();
    }
    loop {
        tokio::time::sleep(every).await;
        let Some(vmm) = vmm.upgrade() else { return };
        if vmm.stop().is_some() {
            return;
        }
        let silent = vmm.silent_for();
        if silent >= bound {
            let reason = format!(
                "VMM stopped answering: no heartbeat answered for {:.1} s (bound {} s, \
                 --vmm-watchdog); it was killed",
                silent.as_secs_f64(),
                bound.as_secs_f64()
            );
            tracing::error!(sandbox = %vmm.id, pid = vmm.pid(), %reason, "watchdog");
            vmm.fail(&reason);
            return;
        }
        let id = vmm.next_id();
        vmm.send(&Request::Heartbeat { id });
    }
}
