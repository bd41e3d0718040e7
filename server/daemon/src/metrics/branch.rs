//! Branch instruments: how long branches paused their sandbox, how they
//! ended, the bytes they wrote, and the progress of LIVE background copies.

use forkd_store::Mode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::vmm::CopyProgress;

/// Upper bounds (seconds) of `forkd_branch_pause_seconds`: 0.1 ms to 10 s.
/// A LIVE pause is well under a millisecond; FULL/DIFF pauses write memory
/// and take milliseconds to seconds.
pub const PAUSE_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Every branch mode, so each has its series from the start.
const MODES: [Mode; 3] = [Mode::Full, Mode::Diff, Mode::Live];
/// `status` label values of `forkd_branches_total`.
const READY: &str = "READY";
const FAILED: &str = "FAILED";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabels {
    mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    mode: &'static str,
    status: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn pause_histogram() -> Histogram {
    Histogram::new(PAUSE_BUCKETS)
}

/// The `mode` label value of a branch mode.
pub fn mode_label(mode: Mode) -> &'static str {
    match mode {
        Mode::Full => "full",
        Mode::Diff => "diff",
        Mode::Live => "live",
    }
}

/// Instruments of BranchSandbox (and CreateSnapshot's FULL branch). Clones
/// share the same series.
#[derive(Clone, Debug)]
pub struct BranchMetrics {
    pause: HistogramFamily<ModeLabels>,
    branches: Family<OutcomeLabels, Counter>,
    written: Family<ModeLabels, Counter>,
    live_copy_bytes: Counter,
    live_copy_faults: Counter,
}

impl Default for BranchMetrics {
    fn default() -> Self {
        BranchMetrics::new()
    }
}

impl BranchMetrics {
    /// Instruments not registered anywhere yet (see
    /// [`BranchMetrics::register`]); every mode's series exists at zero.
    pub fn new() -> BranchMetrics {
        let m = BranchMetrics {
            pause: Family::new_with_constructor(pause_histogram),
            branches: Family::default(),
            written: Family::default(),
            live_copy_bytes: Counter::default(),
            live_copy_faults: Counter::default(),
        };
        // Creating a series is all that is wanted here.
        for mode in MODES.map(mode_label) {
            let _ = m.pause.get_or_create(&ModeLabels { mode });
            let _ = m.written.get_or_create(&ModeLabels { mode });
            for status in [READY, FAILED] {
                let _ = m.branches.get_or_create(&OutcomeLabels { mode, status });
            }
        }
        m
    }

    /// Registers the instruments in `registry` (which adds the `forkd_`
    /// prefix).
    pub fn register(&self, registry: &mut Registry) {
        registry.register_with_unit(
            "branch_pause",
            "How long branches stopped their sandbox's vCPUs, measured in the VMM, by mode",
            Unit::Seconds,
            self.pause.clone(),
        );
        registry.register(
            "branches",
            "Branches that ended, by mode and final snapshot status (READY or FAILED)",
            self.branches.clone(),
        );
        registry.register_with_unit(
            "branch_written",
            "Memory data bytes written into snapshots by branches that ended READY, by mode",
            Unit::Bytes,
            self.written.clone(),
        );
        registry.register_with_unit(
            "live_copy",
            "Bytes of guest RAM the background copies of LIVE branches have handled \
             (copied, or found to be zero), counted as the VMMs report progress",
            Unit::Bytes,
            self.live_copy_bytes.clone(),
        );
        registry.register(
            "live_copy_faults_served",
            "Guest writes during LIVE copies that were served by copying the page first",
            self.live_copy_faults.clone(),
        );
    }

    /// A branch's sandbox was paused for `pause_us` microseconds.
    pub fn paused(&self, mode: Mode, pause_us: u64) {
        let mode = mode_label(mode);
        self.pause
            .get_or_create(&ModeLabels { mode })
            .observe(pause_us as f64 / 1e6);
    }

    /// A branch ended READY after writing `bytes_written` bytes of memory
    /// data.
    pub fn ready(&self, mode: Mode, bytes_written: u64) {
        let mode = mode_label(mode);
        self.branches
            .get_or_create(&OutcomeLabels {
                mode,
                status: READY,
            })
            .inc();
        self.written
            .get_or_create(&ModeLabels { mode })
            .inc_by(bytes_written);
    }

    /// A branch ended FAILED (its snapshot is a FAILED tombstone).
    pub fn failed(&self, mode: Mode) {
        let mode = mode_label(mode);
        self.branches
            .get_or_create(&OutcomeLabels {
                mode,
                status: FAILED,
            })
            .inc();
    }

    /// A LIVE copy reported `now`; `last` is what it reported before (its
    /// figures are cumulative per copy, so only the difference is added).
    pub fn copy_progress(&self, last: Option<&CopyProgress>, now: &CopyProgress) {
        let (bytes, faults) = last.map_or((0, 0), |l| (l.bytes_copied, l.faults_served));
        self.live_copy_bytes
            .inc_by(now.bytes_copied.saturating_sub(bytes));
        self.live_copy_faults
            .inc_by(now.faults_served.saturating_sub(faults));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(bytes_copied: u64, faults_served: u64) -> CopyProgress {
        CopyProgress {
            bytes_copied,
            bytes_total: 1000,
            faults_served,
        }
    }

    #[test]
    fn live_copy_counts_only_what_is_new() {
        let m = BranchMetrics::new();
        m.copy_progress(None, &progress(100, 1));
        m.copy_progress(Some(&progress(100, 1)), &progress(250, 3));
        // A report that went backwards adds nothing.
        m.copy_progress(Some(&progress(250, 3)), &progress(200, 2));
        assert_eq!(m.live_copy_bytes.get(), 250);
        assert_eq!(m.live_copy_faults.get(), 3);
    }

    #[test]
    fn outcomes_and_bytes_by_mode() {
        let m = BranchMetrics::new();
        m.ready(Mode::Diff, 4096);
        m.ready(Mode::Diff, 8192);
        m.failed(Mode::Live);
        let count = |mode, status| {
            m.branches
                .get_or_create(&OutcomeLabels { mode, status })
                .get()
        };
        assert_eq!(count("diff", READY), 2);
        assert_eq!(count("live", FAILED), 1);
        assert_eq!(count("full", READY), 0);
        assert_eq!(
            m.written.get_or_create(&ModeLabels { mode: "diff" }).get(),
            12288
        );
    }
}
