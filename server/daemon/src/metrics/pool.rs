//! Standby-VMM pool instruments (`--vmm-pool`): how many wait, and how
//! forks fared with them.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The pool's instruments; clones share the same series.
#[derive(Clone, Debug, Default)]
pub struct PoolMetrics {
    ready: Gauge,
    claims: Counter,
    misses: Counter,
    start_failures: Counter,
}

impl PoolMetrics {
    /// Registers the instruments in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "vmm_pool_ready",
            "Standby VMMs built and waiting to be claimed by a fork (--vmm-pool)",
            self.ready.clone(),
        );
        registry.register(
            "vmm_pool_claims",
            "Fork children started on a standby VMM from the pool",
            self.claims.clone(),
        );
        registry.register(
            "vmm_pool_misses",
            "Fork children that found no standby VMM of their shape and started a fresh one",
            self.misses.clone(),
        );
        registry.register(
            "vmm_pool_start_failures",
            "Standby VMMs that failed to start (the daemon's log says why)",
            self.start_failures.clone(),
        );
    }

    /// Sets the number of standbys waiting.
    pub fn set_ready(&self, n: usize) {
        self.ready.set(n as i64);
    }

    /// Counts a child started on a standby.
    pub fn claimed(&self) {
        self.claims.inc();
    }

    /// Counts a child that found no standby.
    pub fn missed(&self) {
        self.misses.inc();
    }

    /// Counts a standby that failed to start.
    pub fn start_failed(&self) {
        self.start_failures.inc();
    }
}
