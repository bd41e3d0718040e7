//! Connection limits and timeouts of the gRPC listeners.
//!
//! Each listener (TCP, Unix socket) has a [`ConnTable`] of the connections
//! it holds open, at most `--max-connections`. Every accepted connection is
//! wrapped in a [`Guarded`] stream that closes it when it has had no call in
//! flight for `--idle-timeout`, when it has not started a call within
//! `--first-call-timeout` of being accepted (half-open connections: nothing,
//! or the HTTP/2 preface only), or when the table evicts it. A full table
//! evicts its oldest idle connection to make room; if every connection has
//! a call in flight, the new one is refused. [`CallLayer`] counts the calls
//! in flight per connection. Dead peers are found by HTTP/2 keepalive pings
//! (set on the tonic server, see `server.rs`).

mod accept;
mod io;
mod layer;
pub mod trim;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Waker;
use std::time::{Duration, Instant};

pub use self::accept::{tcp_incoming, unix_incoming, AcceptGate};
pub use self::io::Guarded;
pub use self::layer::CallLayer;
use crate::metrics::ConnMetrics;
use crate::sync::lock;

/// Limits of each gRPC listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most connections open at once.
    pub max_connections: usize,
    /// Longest time a connection may have no call in flight.
    pub idle_timeout: Duration,
    /// Longest time a new connection may take to start its first call.
    pub first_call_timeout: Duration,
}

/// Why the daemon closed or refused a connection (the `reason` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// Closed to make room for a new one: the table was full and it was
    /// the oldest idle connection.
    Evicted,
    /// No call in flight for `--idle-timeout`.
    Idle,
    /// No call started within `--first-call-timeout` of being accepted.
    FirstCallTimeout,
    /// Refused: the table was full and every connection had a call in
    /// flight.
    Full,
    /// Refused: a local user other than the daemon's own (or root, or one
    /// allowed with `--allow-uid`), with no token configured.
    PeerUid,
    /// Refused: the peer's user could not be determined.
    PeerUnknown,
}

impl CloseReason {
    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Evicted => "evicted",
            CloseReason::Idle => "idle",
            CloseReason::FirstCallTimeout => "first_call_timeout",
            CloseReason::Full => "full",
            CloseReason::PeerUid => "peer_uid",
            CloseReason::PeerUnknown => "peer_unknown",
        }
    }
}

/// One open connection, shared by its stream wrapper and the calls on it.
#[derive(Debug)]
pub struct ConnState {
    id: u64,
    accepted: Instant,
    /// Calls in flight.
    active: AtomicUsize,
    /// Calls started so far.
    calls: AtomicU64,
    inner: Mutex<ConnInner>,
}

#[derive(Debug)]
struct ConnInner {
    /// When the last call ended (or the connection was accepted).
    idle_since: Instant,
    /// Set when the table wants the connection closed.
    close: Option<CloseReason>,
    /// The connection's task, to wake when something above changes.
    waker: Option<Waker>,
}

impl ConnState {
    fn new(id: u64) -> ConnState {
        let now = Instant::now();
        ConnState {
            id,
            accepted: now,
            active: AtomicUsize::new(0),
            calls: AtomicU64::new(0),
            inner: Mutex::new(ConnInner {
                idle_since: now,
                close: None,
                waker: None,
            }),
        }
    }

    /// A call started on this connection.
    pub fn call_started(&self) {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.active.fetch_add(1, Ordering::SeqCst);
    }

    /// A call on this connection ended (its response body was dropped).
    pub fn call_ended(&self) {
        if self.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            let waker = {
                let mut inner = lock(&self.inner);
                inner.idle_since = Instant::now();
                inner.waker.clone()
            };
            // The stream re-arms its idle timer.
            if let Some(w) = waker {
                w.wake();
            }
        }
    }

    fn is_idle(&self) -> bool {
        self.active.load(Ordering::SeqCst) == 0
    }

    /// Asks the connection to close; its stream fails its next read.
    fn close(&self, reason: CloseReason) {
        let waker = {
            let mut inner = lock(&self.inner);
            inner.close.get_or_insert(reason);
            inner.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// What the stream should do now: close (why), or wait until the
    /// returned instant (None: no deadline while calls are in flight).
    fn deadline(&self, limits: &Limits, waker: &Waker) -> Result<Option<Instant>, CloseReason> {
        let mut inner = lock(&self.inner);
        if let Some(reason) = inner.close {
            return Err(reason);
        }
        if !inner.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
            inner.waker = Some(waker.clone());
        }
        if !self.is_idle() {
            return Ok(None);
        }
        let (deadline, reason) = if self.calls.load(Ordering::SeqCst) == 0 {
            (
                self.accepted + limits.first_call_timeout,
                CloseReason::FirstCallTimeout,
            )
        } else {
            (inner.idle_since + limits.idle_timeout, CloseReason::Idle)
        };
        if Instant::now() >= deadline {
            inner.close = Some(reason);
            return Err(reason);
        }
        Ok(Some(deadline))
    }

    /// When it became idle, for choosing whom to evict.
    fn idle_since(&self) -> Instant {
        lock(&self.inner).idle_since
    }
}

/// The open connections of one listener.
#[derive(Debug)]
pub struct ConnTable {
    listener: &'static str,
    limits: Limits,
    metrics: ConnMetrics,
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Arc<ConnState>>>,
}

impl ConnTable {
    /// A table for `listener` (`tcp` or `unix`, the metric label).
    pub fn new(listener: &'static str, limits: Limits, metrics: ConnMetrics) -> Arc<ConnTable> {
        metrics.init_listener(listener);
        Arc::new(ConnTable {
            listener,
            limits,
            metrics,
            next_id: AtomicU64::new(1),
            open: Mutex::new(HashMap::new()),
        })
    }

    /// Connections open now.
    pub fn len(&self) -> usize {
        lock(&self.open).len()
    }

    /// Admits a new connection, evicting the oldest idle one if the table
    /// is full; `Err(Full)` when every connection has a call in flight.
    pub fn admit(self: &Arc<Self>) -> Result<Arc<ConnState>, CloseReason> {
        let mut open = lock(&self.open);
        if open.len() >= self.limits.max_connections {
            let victim = open
                .values()
                .filter(|c| c.is_idle())
                .min_by_key(|c| (c.idle_since(), c.id))
                .cloned();
            match victim {
                Some(victim) => {
                    open.remove(&victim.id);
                    victim.close(CloseReason::Evicted);
                    self.closed(CloseReason::Evicted);
                }
                None => {
                    drop(open);
                    self.refused(CloseReason::Full, None);
                    return Err(CloseReason::Full);
                }
            }
        }
        let state = Arc::new(ConnState::new(self.next_id.fetch_add(1, Ordering::Relaxed)));
        open.insert(state.id, state.clone());
        self.metrics.set_open(self.listener, open.len());
        Ok(state)
    }

    /// The connection's stream was dropped (closed by either side).
    pub(super) fn remove(&self, state: &ConnState) {
        trim::connection_closed();
        let mut open = lock(&self.open);
        open.remove(&state.id);
        self.metrics.set_open(self.listener, open.len());
    }

    /// Records (and rate-limits the log of) a connection the daemon
    /// refused.
    pub fn refused(&self, reason: CloseReason, detail: Option<&str>) {
        self.metrics.refused(self.listener, reason.as_str());
        if self.metrics.should_log(self.listener) {
            tracing::warn!(
                listener = self.listener,
                reason = reason.as_str(),
                detail,
                refused_total = self.metrics.refused_total(self.listener),
                open = self.len(),
                max_connections = self.limits.max_connections,
                "refused a connection (logged at most once a second; see forkd_connections_refused_total)"
            );
        }
    }

    /// Records (and rate-limits the log of) an accept that failed for a
    /// reason other than the connection itself (e.g. EMFILE).
    fn accept_error(&self, e: &std::io::Error) {
        self.metrics.refused(self.listener, "accept_error");
        if self.metrics.should_log(self.listener) {
            tracing::error!(
                listener = self.listener,
                error = %e,
                open = self.len(),
                "accept failed; pausing accepts for 100 ms"
            );
        }
    }

    /// Records (and rate-limits the log of) a connection the daemon
    /// closed.
    pub(super) fn closed(&self, reason: CloseReason) {
        self.metrics.closed(self.listener, reason.as_str());
        if self.metrics.should_log(self.listener) {
            tracing::info!(
                listener = self.listener,
                reason = reason.as_str(),
                closed_total = self.metrics.closed_total(self.listener),
                max_connections = self.limits.max_connections,
                "closed a connection (logged at most once a second; see forkd_connections_closed_total)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(max: usize) -> Arc<ConnTable> {
        ConnTable::new(
            "tcp",
            Limits {
                max_connections: max,
                idle_timeout: Duration::from_secs(60),
                first_call_timeout: Duration::from_secs(10),
            },
            ConnMetrics::default(),
        )
    }

    #[test]
    fn full_table_evicts_the_oldest_idle_connection() {
        let t = table(2);
        let a = t.admit().unwrap();
        let b = t.admit().unwrap();
        a.call_started();
        // b is the only idle one: it goes.
        let c = t.admit().unwrap();
        assert_eq!(lock(&b.inner).close, Some(CloseReason::Evicted));
        assert_eq!(lock(&a.inner).close, None);
        assert_eq!(t.len(), 2);
        // Everyone busy: refused.
        c.call_started();
        assert_eq!(t.admit().unwrap_err(), CloseReason::Full);
        // a's call ends: a is idle and older than nothing else idle.
        a.call_ended();
        let _d = t.admit().unwrap();
        assert_eq!(lock(&a.inner).close, Some(CloseReason::Evicted));
        assert_eq!(t.metrics.refused_total("tcp"), 1);
        assert_eq!(t.metrics.closed_total("tcp"), 2);
    }

    #[test]
    fn deadlines() {
        let limits = Limits {
            max_connections: 1,
            idle_timeout: Duration::from_secs(60),
            first_call_timeout: Duration::from_millis(0),
        };
        let waker = futures_task_noop();
        let s = ConnState::new(1);
        // No call yet and a zero first-call timeout: closed.
        assert_eq!(
            s.deadline(&limits, &waker).unwrap_err(),
            CloseReason::FirstCallTimeout
        );
        let s = ConnState::new(2);
        s.call_started();
        assert_eq!(s.deadline(&limits, &waker).unwrap(), None);
        s.call_ended();
        let d = s.deadline(&limits, &waker).unwrap().unwrap();
        assert!(d > Instant::now() + Duration::from_secs(59));
    }

    fn futures_task_noop() -> Waker {
        Waker::noop().clone()
    }
}
