//! The pool of standby VMMs (`forkd serve --vmm-pool N`): for each VM
//! shape in use, up to N [`Standby`] processes that built their VM before
//! a fork asked for it, so a child of a reference-guest snapshot only maps
//! the snapshot and loads its state (see `forkd_vmm::standby`).
//!
//! - [`VmmPool::take`] hands out one standby of a shape (or none: the
//!   caller spawns a fresh VMM) and wakes the refill;
//! - the refill task starts standbys one at a time, most recently used
//!   shape first, until every shape has N; a failed start backs off;
//! - shapes are learned from the forks (the default sandbox shape is known
//!   from the start); at most [`MAX_SHAPES`] are kept, the least recently
//!   used one's standbys are stopped when a new shape comes;
//! - [`VmmPool::close`] (daemon shutdown) stops every standby.
//!
//! A standby holds no guest memory (its RAM is reserved address space),
//! only a process and KVM's per-slot arrays; it counts against no
//! sandbox limit.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use super::standby::{Shape, Standby};
use crate::metrics::PoolMetrics;
use crate::sync::lock;

/// Most VM shapes the pool keeps standbys of.
pub const MAX_SHAPES: usize = 4;

/// First wait after a failed start; doubled up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Standby VMMs per shape, and the task that refills them.
#[derive(Debug)]
pub struct VmmPool {
    vmm_path: PathBuf,
    log_dir: PathBuf,
    copy_rate_mibps: u64,
    per_shape: usize,
    state: Mutex<PoolState>,
    wake: Notify,
    metrics: PoolMetrics,
    next_log: AtomicU64,
}

#[derive(Debug, Default)]
struct PoolState {
    ready: HashMap<Shape, Vec<Standby>>,
    /// The shapes kept, least recently used first.
    shapes: Vec<Shape>,
    closed: bool,
}

impl PoolState {
    fn total(&self) -> usize {
        self.ready.values().map(Vec::len).sum()
    }

    /// Moves `shape` to the most recently used end, adding it (and
    /// dropping the least recently used shape beyond [`MAX_SHAPES`]).
    fn touch(&mut self, shape: Shape) {
        self.shapes.retain(|s| *s != shape);
        self.shapes.push(shape);
        while self.shapes.len() > MAX_SHAPES {
            let old = self.shapes.remove(0);
            for standby in self.ready.remove(&old).unwrap_or_default() {
                standby.discard();
            }
        }
    }
}

impl VmmPool {
    /// A pool of `per_shape` standbys of each shape in use, started from
    /// `vmm_path` with their logs in `log_dir`; `initial` is a shape to
    /// fill from the start. Call [`VmmPool::run`] to start the refill.
    pub fn new(
        vmm_path: PathBuf,
        log_dir: PathBuf,
        copy_rate_mibps: u64,
        per_shape: usize,
        initial: Shape,
        metrics: PoolMetrics,
    ) -> Arc<VmmPool> {
        let mut state = PoolState::default();
        state.touch(initial);
        Arc::new(VmmPool {
            vmm_path,
            log_dir,
            copy_rate_mibps,
            per_shape,
            state: Mutex::new(state),
            wake: Notify::new(),
            metrics,
            next_log: AtomicU64::new(1),
        })
    }

    /// Starts the refill task.
    pub fn run(self: &Arc<Self>) {
        tokio::spawn(self.clone().refill());
    }

    /// One standby of `shape`, if one is ready. Counts a claim or a miss
    /// and wakes the refill either way.
    pub fn take(&self, shape: Shape) -> Option<Standby> {
        let taken = {
            let mut state = lock(&self.state);
            if state.closed {
                return None;
            }
            state.touch(shape);
            let mut taken = None;
            while let Some(mut standby) = state.ready.get_mut(&shape).and_then(Vec::pop) {
                if standby.is_alive() {
                    taken = Some(standby);
                    break;
                }
                tracing::warn!(
                    pid = standby.pid(),
                    "a standby VMM died while waiting; dropped"
                );
                standby.discard();
            }
            self.metrics.set_ready(state.total());
            taken
        };
        match &taken {
            Some(_) => self.metrics.claimed(),
            None => self.metrics.missed(),
        }
        self.wake.notify_one();
        taken
    }

    /// Stops every standby and the refill.
    pub fn close(&self) {
        let drained = {
            let mut state = lock(&self.state);
            state.closed = true;
            self.metrics.set_ready(0);
            std::mem::take(&mut state.ready)
        };
        for standby in drained.into_values().flatten() {
            standby.discard();
        }
        self.wake.notify_one();
    }

    /// The shape most in need of a standby, most recently used first.
    fn wanted(&self) -> Option<Option<Shape>> {
        let state = lock(&self.state);
        if state.closed {
            return None;
        }
        Some(
            state
                .shapes
                .iter()
                .rev()
                .copied()
                .find(|shape| state.ready.get(shape).map_or(0, Vec::len) < self.per_shape),
        )
    }

    async fn refill(self: Arc<Self>) {
        let mut backoff = FIRST_BACKOFF;
        loop {
            let shape = match self.wanted() {
                None => return,
                Some(None) => {
                    self.wake.notified().await;
                    continue;
                }
                Some(Some(shape)) => shape,
            };
            let n = self.next_log.fetch_add(1, Ordering::Relaxed);
            let log = self.log_dir.join(format!("{n}.log"));
            match Standby::start(&self.vmm_path, shape, log.clone(), self.copy_rate_mibps).await {
                Ok(standby) => {
                    backoff = FIRST_BACKOFF;
                    let mut state = lock(&self.state);
                    // Kept only while the pool is open and the shape in use.
                    if !state.closed && state.shapes.contains(&shape) {
                        state.ready.entry(shape).or_default().push(standby);
                        self.metrics.set_ready(state.total());
                    }
                }
                Err(e) => {
                    self.metrics.start_failed();
                    let tail = std::fs::read_to_string(&log).unwrap_or_default();
                    tracing::warn!(
                        error = %e,
                        memory_mib = shape.memory_mib,
                        vcpus = shape.vcpus,
                        log = %tail.trim_end(),
                        retry_in_ms = backoff.as_millis() as u64,
                        "standby VMM failed to start"
                    );
                    let _ = std::fs::remove_file(&log);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(memory_mib: u32) -> Shape {
        Shape {
            memory_mib,
            vcpus: 1,
        }
    }

    #[test]
    fn shapes_are_kept_most_recently_used_and_bounded() {
        let mut state = PoolState::default();
        for m in 1..=MAX_SHAPES as u32 {
            state.touch(shape(m));
        }
        state.touch(shape(1));
        state.touch(shape(99));
        // 2 was the least recently used: gone; 1 moved to the young end.
        let kept: Vec<u32> = state.shapes.iter().map(|s| s.memory_mib).collect();
        let mut expected: Vec<u32> = (3..=MAX_SHAPES as u32).collect();
        expected.extend([1, 99]);
        assert_eq!(kept, expected);
    }
}
