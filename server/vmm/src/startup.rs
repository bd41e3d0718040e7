//! Where a VMM's start-up time goes: the phases from the daemon's spawn
//! call to the guest's first `Ready`, timed on `CLOCK_MONOTONIC` (one
//! clock for every process on the host, so the daemon's spawn instant,
//! passed as `--spawned-at-ns`, and this process's marks compare), and
//! written as one line to the VMM's log once the guest is ready:
//!
//! ```text
//! forkd-vmm[sb-x]: startup µs: exec=812 vm=3288 memory=40 memslot=2100 ... total=7000
//! ```
//!
//! Each figure is the time since the previous mark; `exec` is from the
//! spawn call to `main` (fork, exec, the dynamic loader), present only
//! when the daemon passed its instant. A standby VMM (built before it was
//! needed, see [`crate::standby`]) times from its claim instead: its line
//! begins with `claim` (the daemon's claim instant to the VMM reading
//! it). `bench` (fork-spawn) reads these lines to say which step
//! dominates a fork.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// The line's prefix after `forkd-vmm[ID]: `, for readers of the log.
pub const LINE_TAG: &str = "startup µs:";

/// Start-up marks of one VMM process.
#[derive(Debug)]
pub struct Startup {
    /// The daemon's spawn (or claim) instant, if it passed one.
    spawned_at_ns: Option<u64>,
    /// The name of the first phase, from that instant to `main_ns`.
    first: &'static str,
    /// `main`'s first instant.
    main_ns: u64,
    /// Named instants after `main`, in order.
    marks: Mutex<Vec<(&'static str, u64)>>,
    /// Whether the line was written.
    reported: AtomicBool,
}

impl Startup {
    /// Starts timing at `main_ns` (`main`'s first [`monotonic_ns`]);
    /// `spawned_at_ns` is the daemon's instant of the spawn call, if given.
    pub fn begin(spawned_at_ns: Option<u64>, main_ns: u64) -> Startup {
        Startup {
            spawned_at_ns,
            first: "exec",
            main_ns,
            marks: Mutex::new(Vec::with_capacity(12)),
            reported: AtomicBool::new(false),
        }
    }

    /// Starts timing a standby VMM's claim: from the daemon's instant of
    /// the claim (`claimed_at_ns`) to `received_ns`, when the VMM read it
    /// (the line's `claim` phase).
    pub fn claimed(claimed_at_ns: Option<u64>, received_ns: u64) -> Startup {
        Startup {
            first: "claim",
            ..Startup::begin(claimed_at_ns, received_ns)
        }
    }

    /// Records that `phase` ended now.
    pub fn mark(&self, phase: &'static str) {
        let now = monotonic_ns();
        self.marks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((phase, now));
    }

    /// The line (without the `forkd-vmm[ID]: ` prefix): each phase's
    /// duration in µs, then the total from the first instant known.
    pub fn line(&self) -> String {
        let marks = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::from(LINE_TAG);
        let origin = self.spawned_at_ns.unwrap_or(self.main_ns);
        if let Some(spawned) = self.spawned_at_ns {
            let first = self.first;
            let _ = write!(out, " {first}={}", us(self.main_ns.saturating_sub(spawned)));
        }
        let mut previous = self.main_ns;
        for (phase, at) in marks.iter() {
            let _ = write!(out, " {phase}={}", us(at.saturating_sub(previous)));
            previous = *at;
        }
        let _ = write!(out, " total={}", us(previous.saturating_sub(origin)));
        out
    }

    /// Marks `phase` and writes the line to stderr (the VMM's log), once.
    pub fn report(&self, id: &str, phase: &'static str) {
        if self.reported.swap(true, Ordering::AcqRel) {
            return;
        }
        self.mark(phase);
        eprintln!("forkd-vmm[{id}]: {}", self.line());
    }
}

fn us(ns: u64) -> u64 {
    ns / 1_000
}

/// `CLOCK_MONOTONIC` now, in ns (what the daemon passes as
/// `--spawned-at-ns`).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always
    // exists, so the call cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_durations_and_total_counts_from_the_spawn() {
        let mut s = Startup::begin(Some(1_000_000), 3_000_000);
        s.marks = Mutex::new(vec![("vm", 7_000_000), ("vcpus", 7_500_000)]);
        assert_eq!(
            s.line(),
            "startup µs: exec=2000 vm=4000 vcpus=500 total=6500"
        );
    }

    #[test]
    fn without_a_spawn_instant_the_total_counts_from_main() {
        let mut s = Startup::begin(None, 3_000_000);
        s.marks = Mutex::new(vec![("vm", 4_000_000)]);
        assert_eq!(s.line(), "startup µs: vm=1000 total=1000");
    }

    #[test]
    fn a_claimed_line_starts_with_the_claim() {
        let mut s = Startup::claimed(Some(1_000_000), 1_200_000);
        s.marks = Mutex::new(vec![("memory", 1_300_000)]);
        assert_eq!(s.line(), "startup µs: claim=200 memory=100 total=300");
    }

    #[test]
    fn report_writes_once() {
        let s = Startup::begin(None, monotonic_ns());
        s.report("sb-test", "ready");
        s.report("sb-test", "ready");
        assert_eq!(s.marks.lock().unwrap().len(), 1);
    }

    #[test]
    fn monotonic_moves_forward() {
        let a = monotonic_ns();
        let b = monotonic_ns();
        assert!(b >= a && a > 0);
    }
}
