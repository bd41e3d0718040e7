//! Connection instruments: connections open per listener, and the ones the
//! daemon refused or closed, by reason. Also the once-a-second limiter of
//! the matching log lines, so a flood cannot flood the log.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::sync::lock;

/// Most one log line per listener per this interval.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// `reason` values of `forkd_connections_refused_total`.
const REFUSED: [&str; 4] = ["full", "peer_uid", "peer_unknown", "accept_error"];
/// `reason` values of `forkd_connections_closed_total`.
const CLOSED: [&str; 3] = ["evicted", "idle", "first_call_timeout"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    listener: &'static str,
    reason: &'static str,
}

/// The instruments; clones share the same series.
#[derive(Clone, Debug, Default)]
pub struct ConnMetrics {
    open: Family<ListenerLabels, Gauge>,
    refused: Family<ReasonLabels, Counter>,
    closed: Family<ReasonLabels, Counter>,
    last_log: Arc<Mutex<Vec<(&'static str, Instant)>>>,
}

impl ConnMetrics {
    /// Registers the instruments in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "connections_open",
            "Connections open on a gRPC listener",
            self.open.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections a gRPC listener accepted and closed at once, by reason (full, peer_uid, peer_unknown) or failed accepts (accept_error)",
            self.refused.clone(),
        );
        registry.register(
            "connections_closed",
            "Open connections the daemon closed, by reason (evicted, idle, first_call_timeout)",
            self.closed.clone(),
        );
    }

    /// Creates every series of `listener` at zero.
    pub fn init_listener(&self, listener: &'static str) {
        self.set_open(listener, 0);
        for reason in REFUSED {
            self.refused
                .get_or_create(&ReasonLabels { listener, reason })
                .inc_by(0);
        }
        for reason in CLOSED {
            self.closed
                .get_or_create(&ReasonLabels { listener, reason })
                .inc_by(0);
        }
    }

    /// Sets the number of open connections of `listener`.
    pub fn set_open(&self, listener: &'static str, n: usize) {
        self.open
            .get_or_create(&ListenerLabels { listener })
            .set(n as i64);
    }

    /// Counts a refused connection.
    pub fn refused(&self, listener: &'static str, reason: &'static str) {
        self.refused
            .get_or_create(&ReasonLabels { listener, reason })
            .inc();
    }

    /// Counts a closed connection.
    pub fn closed(&self, listener: &'static str, reason: &'static str) {
        self.closed
            .get_or_create(&ReasonLabels { listener, reason })
            .inc();
    }

    fn total(
        family: &Family<ReasonLabels, Counter>,
        listener: &'static str,
        reasons: &[&'static str],
    ) -> u64 {
        reasons
            .iter()
            .map(|&reason| {
                family
                    .get_or_create(&ReasonLabels { listener, reason })
                    .get()
            })
            .sum()
    }

    /// Connections of `listener` refused so far.
    pub fn refused_total(&self, listener: &'static str) -> u64 {
        Self::total(&self.refused, listener, &REFUSED)
    }

    /// Connections of `listener` closed so far.
    pub fn closed_total(&self, listener: &'static str) -> u64 {
        Self::total(&self.closed, listener, &CLOSED)
    }

    /// Whether a log line about `listener`'s connections may be written
    /// now (at most one per second per listener).
    pub fn should_log(&self, listener: &'static str) -> bool {
        let now = Instant::now();
        let mut last = lock(&self.last_log);
        match last.iter_mut().find(|(l, _)| *l == listener) {
            Some((_, at)) if now.duration_since(*at) < LOG_EVERY => false,
            Some((_, at)) => {
                *at = now;
                true
            }
            None => {
                last.push((listener, now));
                true
            }
        }
    }
}
