//! Gauges computed at scrape time from the daemon's own state (the sandbox
//! registry and the snapshot store), so they can never drift from what
//! ListSandboxes and ListSnapshots say.

use std::collections::HashMap;
use std::sync::Arc;

use forkd_api::v1::SandboxState;
use forkd_store::Status;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;

use crate::sandbox::registry::Registry;
use crate::snapshot::store::Snapshots;

/// Sandbox states, each always reported (zeros included).
const STATES: [SandboxState; 5] = [
    SandboxState::Starting,
    SandboxState::Running,
    SandboxState::Paused,
    SandboxState::Exited,
    SandboxState::Failed,
];
/// Snapshot statuses, each always reported.
const STATUSES: [Status; 3] = [Status::Writing, Status::Ready, Status::Failed];

/// The `state` label value: the API's name without its prefix (`RUNNING`).
fn state_label(state: SandboxState) -> &'static str {
    let name = state.as_str_name();
    name.strip_prefix("SANDBOX_STATE_").unwrap_or(name)
}

/// The `status` label value (`READY`).
fn status_label(status: Status) -> &'static str {
    match status {
        Status::Writing => "WRITING",
        Status::Ready => "READY",
        Status::Failed => "FAILED",
    }
}

/// How many of `items` fall in each of `keys` (keys not listed are not
/// counted), in the order of `keys`.
fn count<K: Copy + Eq, const N: usize>(
    keys: [K; N],
    items: impl IntoIterator<Item = K>,
) -> [(K, u64); N] {
    let mut counts = keys.map(|k| (k, 0));
    for item in items {
        if let Some((_, n)) = counts.iter_mut().find(|(k, _)| *k == item) {
            *n += 1;
        }
    }
    counts
}

/// Encodes `forkd_sandboxes{state}`, `forkd_snapshots{status}` and the
/// guest memory admission control counts and allows, on each scrape.
#[derive(Debug)]
pub struct StateCollector {
    sandboxes: Arc<Registry>,
    snapshots: Arc<Snapshots>,
}

impl StateCollector {
    /// A collector reading `sandboxes` and `snapshots`.
    pub fn new(sandboxes: Arc<Registry>, snapshots: Arc<Snapshots>) -> StateCollector {
        StateCollector {
            sandboxes,
            snapshots,
        }
    }
}

/// Writes one gauge family with one label.
fn encode_gauges(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    values: &[(&str, u64)],
) -> Result<(), std::fmt::Error> {
    let mut family =
        encoder.encode_descriptor(name, help, None, ConstGauge::new(0u64).metric_type())?;
    for (value, n) in values {
        let labels = [(label, *value)];
        ConstGauge::new(*n).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // States are read outside the registry's lock (each takes the
        // VMM's lifecycle lock).
        let sandboxes = self.sandboxes.list(&HashMap::new());
        let states = count(STATES, sandboxes.iter().map(|s| s.state()));
        let states = states.map(|(s, n)| (state_label(s), n));
        encode_gauges(
            &mut encoder,
            "sandboxes",
            "Sandboxes the daemon holds, by state (as in ListSandboxes).",
            "state",
            &states,
        )?;
        let statuses = count(
            STATUSES,
            self.snapshots.store().list().iter().map(|m| m.status),
        );
        let statuses = statuses.map(|(s, n)| (status_label(s), n));
        encode_gauges(
            &mut encoder,
            "snapshots",
            "Snapshots in the store, by status (as in ListSnapshots).",
            "status",
            &statuses,
        )?;
        // Admission control's view (`--max-guest-memory-mib`).
        for (name, help, value) in [
            (
                "guest_memory_committed_bytes",
                "Guest memory of running, starting and reserved sandboxes, as admission control counts it.",
                self.sandboxes.committed_mib(),
            ),
            (
                "guest_memory_limit_bytes",
                "The --max-guest-memory-mib limit.",
                self.sandboxes.memory_limit_mib(),
            ),
        ] {
            let gauge = ConstGauge::new(value.saturating_mul(1024 * 1024));
            let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
            gauge.encode(metric)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::branch::BranchMetrics;

    #[test]
    fn labels_and_counts() {
        assert_eq!(state_label(SandboxState::Running), "RUNNING");
        assert_eq!(state_label(SandboxState::Failed), "FAILED");
        assert_eq!(status_label(Status::Writing), "WRITING");
        let counted = count(
            STATES,
            [
                SandboxState::Running,
                SandboxState::Running,
                SandboxState::Failed,
                SandboxState::Unspecified,
            ],
        );
        assert_eq!(
            counted.map(|(s, n)| (state_label(s), n)),
            [
                ("STARTING", 0),
                ("RUNNING", 2),
                ("PAUSED", 0),
                ("EXITED", 0),
                ("FAILED", 1)
            ]
        );
    }

    #[test]
    fn encodes_every_state_and_status() {
        let tmp = tempfile::tempdir().unwrap();
        let (snapshots, _) = Snapshots::open(tmp.path(), BranchMetrics::new()).unwrap();
        let info = forkd_store::SnapshotInfo {
            mode: forkd_store::Mode::Full,
            parent: None,
            source_sandbox: "sb-1".into(),
            guest: forkd_store::GuestConfig {
                memory_mib: 36,
                vcpus: 1,
                huge_pages: false,
            },
            image: None,
        };
        let _pending = snapshots.store().begin("w", info).unwrap();
        let mut registry = prometheus_client::registry::Registry::with_prefix("forkd");
        registry.register_collector(Box::new(StateCollector::new(
            Registry::new(4, 1024),
            snapshots,
        )));
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry).unwrap();
        for line in [
            "# TYPE forkd_sandboxes gauge",
            "forkd_sandboxes{state=\"RUNNING\"} 0",
            "forkd_sandboxes{state=\"STARTING\"} 0",
            "# TYPE forkd_snapshots gauge",
            "forkd_snapshots{status=\"WRITING\"} 1",
            "forkd_snapshots{status=\"READY\"} 0",
            "forkd_snapshots{status=\"FAILED\"} 0",
            "# TYPE forkd_guest_memory_committed_bytes gauge",
            "forkd_guest_memory_committed_bytes 0",
            "forkd_guest_memory_limit_bytes 1073741824",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} not in\n{text}");
        }
    }
}
