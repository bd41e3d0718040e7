//! Prometheus metrics: the instruments (gRPC calls, branches, LIVE
//! copies, expiries), the gauges read at scrape time (sandboxes, snapshots), and the
//! `--metrics-listen` HTTP endpoint that serves them. Every metric name has
//! the `forkd_` prefix; DESIGN.md lists them.
//!
//! There is no global registry: [`Metrics`] owns one, the instruments are
//! handed to the code that records (the gRPC layer, `Snapshots`), and the
//! registry itself goes to the endpoint. The instruments record whether or
//! not an endpoint serves them (an atomic add or a short lock per event).

mod branch;
mod conn;
mod expiry;
mod exposition;
mod http;
mod pool;
mod rpc;
mod state;

use std::sync::Arc;

use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

pub use self::branch::BranchMetrics;
pub use self::conn::ConnMetrics;
pub use self::expiry::ExpiryMetrics;
pub use self::http::MetricsServer;
pub use self::pool::PoolMetrics;
pub use self::rpc::{KnownMethods, MetricsLayer, RpcMetrics};
use self::state::StateCollector;
use crate::sandbox::registry::Registry as Sandboxes;
use crate::snapshot::store::Snapshots;

/// Prefix of every metric name.
pub const PREFIX: &str = "forkd";

/// Why the metrics could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// A descriptor set (the source of the `method` label values) does not
    /// decode.
    #[error("cannot read the gRPC method names from a descriptor set: {0}")]
    Descriptors(#[from] prost::DecodeError),
}

/// The registry and the instruments recorded into it.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// gRPC calls, for [`MetricsLayer`].
    pub rpc: RpcMetrics,
    /// Branches and LIVE copies, for `Snapshots`.
    pub branch: BranchMetrics,
    /// Connections of the gRPC listeners.
    pub conn: ConnMetrics,
    /// Sandboxes deleted on expiry, for the reaper.
    pub expiry: ExpiryMetrics,
    /// The standby-VMM pool.
    pub pool: PoolMetrics,
}

impl Metrics {
    /// Every instrument, registered; the `method` label values are the
    /// methods of the services in `descriptor_sets`.
    pub fn new(descriptor_sets: &[&[u8]]) -> Result<Metrics, MetricsError> {
        let mut registry = Registry::with_prefix(PREFIX);
        registry.register(
            "build",
            "The forkd version (always 1)",
            Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        );
        let methods = KnownMethods::from_descriptor_sets(descriptor_sets)?;
        let rpc = RpcMetrics::register(&mut registry, methods);
        let branch = BranchMetrics::new();
        branch.register(&mut registry);
        let conn = ConnMetrics::default();
        conn.register(&mut registry);
        let expiry = ExpiryMetrics::default();
        expiry.register(&mut registry);
        let pool = PoolMetrics::default();
        pool.register(&mut registry);
        Ok(Metrics {
            registry,
            rpc,
            branch,
            conn,
            expiry,
            pool,
        })
    }

    /// Adds the scrape-time gauges of `sandboxes` and `snapshots`.
    pub fn observe_state(&mut self, sandboxes: Arc<Sandboxes>, snapshots: Arc<Snapshots>) {
        self.registry
            .register_collector(Box::new(StateCollector::new(sandboxes, snapshots)));
    }

    /// The registry, for the endpoint.
    pub fn into_registry(self) -> Registry {
        self.registry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_conventions() {
        let metrics = Metrics::new(&[forkd_api::FILE_DESCRIPTOR_SET]).unwrap();
        // A listener creates its connection series at zero.
        metrics.conn.init_listener("tcp");
        let text = exposition::Format::Prometheus
            .encode(&metrics.into_registry())
            .unwrap();
        let types: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .collect();
        assert_eq!(
            types,
            [
                "forkd_build_info gauge",
                "forkd_branch_pause_seconds histogram",
                "forkd_branches_total counter",
                "forkd_branch_written_bytes_total counter",
                "forkd_live_copy_bytes_total counter",
                "forkd_live_copy_faults_served_total counter",
                "forkd_connections_open gauge",
                "forkd_connections_refused_total counter",
                "forkd_connections_closed_total counter",
                "forkd_sandboxes_expired_total counter",
                "forkd_vmm_pool_ready gauge",
                "forkd_vmm_pool_claims_total counter",
                "forkd_vmm_pool_misses_total counter",
                "forkd_vmm_pool_start_failures_total counter",
            ],
            "{text}"
        );
        let version = format!(
            "forkd_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.lines().any(|l| l == version), "{text}");
        assert!(
            text.lines().any(|l| l == "forkd_sandboxes_expired_total 0"),
            "{text}"
        );
        // Every mode has its series before anything happened.
        for mode in ["full", "diff", "live"] {
            let count = format!("forkd_branch_pause_seconds_count{{mode=\"{mode}\"}} 0");
            assert!(text.lines().any(|l| l == count), "{count} in\n{text}");
        }
    }
}
