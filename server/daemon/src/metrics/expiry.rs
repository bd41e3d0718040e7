//! Expiry instruments: sandboxes deleted because their lifetime (TTL)
//! ran out.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

/// The instruments of the expiry reaper; clones share the same series.
#[derive(Clone, Debug, Default)]
pub struct ExpiryMetrics {
    expired: Counter,
}

impl ExpiryMetrics {
    /// Registers the instruments in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "sandboxes_expired",
            "Sandboxes deleted because their lifetime (ttl_seconds, --default-ttl, SetSandboxTtl) ran out",
            self.expired.clone(),
        );
    }

    /// Counts one sandbox deleted on expiry.
    pub fn expired(&self) {
        self.expired.inc();
    }
}
