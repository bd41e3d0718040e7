//! The daemon's handle on the snapshot store: runs store calls on the
//! blocking pool, caches each snapshot's sealed memory (loaded once per
//! tag, shared by every child), and keeps the state of the snapshots being
//! written: LIVE copy progress for watchers, the end for watchers and
//! waiting forks, and the cancel signal of LIVE copies.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use forkd_store::{Manifest, RecoveryReport, SealedMemory, Status, Store, StoreError};
use tokio::sync::{watch, OnceCell};

use crate::api::error::{ApiError, CancelReason, StartupError};
use crate::metrics::BranchMetrics;
use crate::sync::lock;
use crate::vmm::CopyProgress;

/// How often a waiter looks for a snapshot begun but not yet registered.
const WRITING_POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// The part of the data directory the store is, in "disk full" messages.
pub const SNAPSHOT_STORE: &str = "snapshot store";

/// One tag's memory: loaded at most once at a time, then kept.
type MemorySlot = Arc<OnceCell<Arc<SealedMemory>>>;

/// The snapshot store plus what the daemon keeps in memory about it.
#[derive(Debug)]
pub struct Snapshots {
    store: Store,
    memory: Mutex<HashMap<String, MemorySlot>>,
    /// Snapshots being written.
    writing: Mutex<HashMap<String, Writing>>,
    /// How many snapshots are being written.
    active: watch::Sender<usize>,
    /// Instruments of the branches that write snapshots.
    metrics: BranchMetrics,
}

impl Snapshots {
    /// Opens and recovers the store at `dir`; branches record into
    /// `metrics`.
    pub fn open(
        dir: &Path,
        metrics: BranchMetrics,
    ) -> Result<(Arc<Snapshots>, RecoveryReport), StartupError> {
        let (store, report) = Store::open(dir).map_err(|e| StartupError::Store(e.to_string()))?;
        let this = Arc::new(Snapshots {
            store,
            memory: Mutex::default(),
            writing: Mutex::default(),
            active: watch::Sender::new(0),
            metrics,
        });
        Ok((this, report))
    }

    /// The store, for quick in-memory reads (`get`, `list`, `chain`,
    /// `dependents` touch no disk).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The branch instruments (pauses, outcomes, LIVE copy progress).
    pub fn metrics(&self) -> &BranchMetrics {
        &self.metrics
    }

    /// Runs `f` on the blocking pool (store calls do file I/O). A full file
    /// system comes back as RESOURCE_EXHAUSTED ([`ApiError::NoSpace`]).
    pub async fn blocking<T, F>(&self, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| ApiError::Internal(format!("store task failed: {e}")))?
            .map_err(|e| ApiError::from(e).or_no_space(SNAPSHOT_STORE, self.store.root()))
    }

    /// The sealed memory of `tag`, loading (and verifying) it on first use.
    /// Concurrent first uses share one load; a failed load is retried by
    /// the next caller.
    pub async fn memory(&self, tag: &str) -> Result<Arc<SealedMemory>, ApiError> {
        let slot = lock(&self.memory)
            .entry(tag.to_string())
            .or_default()
            .clone();
        let memory = slot
            .get_or_try_init(|| async {
                let t = tag.to_string();
                let started = std::time::Instant::now();
                let memory = self.blocking(move |s| s.load_memory(&t)).await?;
                tracing::info!(
                    tag,
                    bytes = memory.size,
                    ms = started.elapsed().as_secs_f64() * 1000.0,
                    "snapshot memory verified and loaded"
                );
                Ok::<_, ApiError>(Arc::new(memory))
            })
            .await?;
        Ok(memory.clone())
    }

    /// Drops the cached memory of `tags` (children that map it keep their
    /// mappings).
    pub fn forget(&self, tags: &[String]) {
        let mut memory = lock(&self.memory);
        for tag in tags {
            memory.remove(tag);
        }
    }

    /// Records that `tag` is being written (after `store.begin`), so
    /// watchers can follow it. A `live` copy can be cancelled (see
    /// [`Snapshots::cancel`]); its writer listens on the returned signal.
    pub fn writing(&self, tag: &str, live: bool) -> CancelSignal {
        let (cancel, signal) = if live {
            let (tx, rx) = watch::channel(None);
            (Some(tx), CancelSignal(Some(rx)))
        } else {
            (None, CancelSignal(None))
        };
        let entry = Writing {
            state: watch::Sender::new(WriteState::Writing(None)),
            cancel,
        };
        let mut writing = lock(&self.writing);
        writing.insert(tag.to_string(), entry);
        self.active.send_replace(writing.len());
        signal
    }

    /// Records a LIVE copy's progress (watchers are woken only when it
    /// changed).
    pub fn progress(&self, tag: &str, progress: CopyProgress) {
        if let Some(w) = lock(&self.writing).get(tag) {
            w.state.send_if_modified(|s| {
                let new = WriteState::Writing(Some(progress));
                let changed = *s != new;
                if changed {
                    *s = new;
                }
                changed
            });
        }
    }

    /// The last progress reported for `tag`, if it is being copied.
    pub fn progress_of(&self, tag: &str) -> Option<CopyProgress> {
        let writing = lock(&self.writing);
        let state = writing.get(tag)?.state.borrow();
        match &*state {
            WriteState::Writing(p) => *p,
            WriteState::Finished { .. } => None,
        }
    }

    /// Records that `manifest.tag` is READY or FAILED now, with a LIVE
    /// copy's final figures.
    pub fn finished(&self, manifest: &Manifest, progress: Option<CopyProgress>) {
        let mut writing = lock(&self.writing);
        if let Some(w) = writing.remove(&manifest.tag) {
            w.state.send_replace(WriteState::Finished {
                manifest: Box::new(manifest.clone()),
                progress,
            });
        }
        self.active.send_replace(writing.len());
    }

    /// A receiver of `tag`'s write state, if it is being written.
    pub fn watch_writing(&self, tag: &str) -> Option<watch::Receiver<WriteState>> {
        lock(&self.writing).get(tag).map(|w| w.state.subscribe())
    }

    /// Cancels the LIVE copy of `tag`; returns a receiver on which it ends
    /// (FAILED), or `None` if `tag` is not a LIVE copy being written.
    pub fn cancel(&self, tag: &str, why: CancelReason) -> Option<watch::Receiver<WriteState>> {
        let writing = lock(&self.writing);
        let w = writing.get(tag)?;
        let cancel = w.cancel.as_ref()?;
        cancel.send_if_modified(|c| {
            let first = c.is_none();
            if first {
                *c = Some(why);
            }
            first
        });
        Some(w.state.subscribe())
    }

    /// Cancels every LIVE copy; returns how many there were.
    pub fn cancel_all(&self, why: CancelReason) -> usize {
        let writing = lock(&self.writing);
        let mut n = 0;
        for cancel in writing.values().filter_map(|w| w.cancel.as_ref()) {
            cancel.send_if_modified(|c| {
                let first = c.is_none();
                if first {
                    *c = Some(why);
                }
                first
            });
            n += 1;
        }
        n
    }

    /// Waits until no snapshot is being written.
    pub async fn wait_idle(&self) {
        let mut rx = self.active.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    /// Waits until `tag` is no longer WRITING and returns its manifest
    /// then (NOT_FOUND if it was deleted meanwhile).
    pub async fn wait_finished(&self, tag: &str) -> Result<Manifest, ApiError> {
        loop {
            if let Some(mut rx) = self.watch_writing(tag) {
                if let Ok(state) = rx
                    .wait_for(|s| matches!(s, WriteState::Finished { .. }))
                    .await
                {
                    if let WriteState::Finished { manifest, .. } = &*state {
                        return Ok(manifest.as_ref().clone());
                    }
                }
            }
            let m = self.store.get(tag)?;
            if m.status != Status::Writing {
                return Ok(m);
            }
            // Begun but not registered yet: look again shortly.
            tokio::time::sleep(WRITING_POLL).await;
        }
    }
}

/// Where a snapshot being written is.
#[derive(Clone, Debug, PartialEq)]
pub enum WriteState {
    /// Still WRITING; a LIVE copy's progress once the VMM has reported.
    Writing(Option<CopyProgress>),
    /// READY or FAILED now.
    Finished {
        /// The final manifest.
        manifest: Box<Manifest>,
        /// A LIVE copy's final figures.
        progress: Option<CopyProgress>,
    },
}

/// One snapshot being written.
#[derive(Debug)]
struct Writing {
    state: watch::Sender<WriteState>,
    /// LIVE copies only: set once to cancel the copy.
    cancel: Option<watch::Sender<Option<CancelReason>>>,
}

/// The writer's side of a cancellation: resolves when the copy is to be
/// cancelled; never for snapshots that cannot be cancelled.
#[derive(Debug)]
pub struct CancelSignal(Option<watch::Receiver<Option<CancelReason>>>);

impl CancelSignal {
    /// Waits for a cancellation and returns why.
    pub async fn cancelled(&mut self) -> CancelReason {
        if let Some(rx) = &mut self.0 {
            if let Ok(why) = rx.wait_for(Option::is_some).await {
                if let Some(why) = *why {
                    return why;
                }
            }
        }
        std::future::pending().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(bytes_copied: u64) -> CopyProgress {
        CopyProgress {
            bytes_copied,
            bytes_total: 100,
            faults_served: 1,
        }
    }

    #[tokio::test]
    async fn write_state_progress_cancel_and_end() {
        let tmp = tempfile::tempdir().unwrap();
        let (snapshots, _) = Snapshots::open(tmp.path(), BranchMetrics::new()).unwrap();
        let info = forkd_store::SnapshotInfo {
            mode: forkd_store::Mode::Live,
            parent: None,
            source_sandbox: "sb-1".into(),
            guest: forkd_store::GuestConfig {
                memory_mib: 36,
                vcpus: 1,
                huge_pages: false,
            },
            image: None,
        };
        let pending = snapshots.store().begin("l", info).unwrap();
        let mut signal = snapshots.writing("l", true);
        assert!(snapshots.cancel("nope", CancelReason::Deleted).is_none());
        let mut rx = snapshots.watch_writing("l").unwrap();
        assert_eq!(*rx.borrow_and_update(), WriteState::Writing(None));
        snapshots.progress("l", progress(10));
        assert!(rx.has_changed().unwrap());
        assert_eq!(snapshots.progress_of("l"), Some(progress(10)));
        rx.borrow_and_update();
        snapshots.progress("l", progress(10));
        assert!(
            !rx.has_changed().unwrap(),
            "unchanged progress wakes nobody"
        );

        // A fork waiting for the end, and a cancel.
        let waiter = {
            let snapshots = snapshots.clone();
            tokio::spawn(async move { snapshots.wait_finished("l").await })
        };
        let mut end = snapshots.cancel("l", CancelReason::Deleted).unwrap();
        assert_eq!(snapshots.cancel_all(CancelReason::ShuttingDown), 1);
        assert_eq!(
            signal.cancelled().await,
            CancelReason::Deleted,
            "first wins"
        );
        let failed = snapshots
            .store()
            .fail(pending, "cancelled: snapshot deleted")
            .unwrap();
        snapshots.finished(&failed, Some(progress(20)));
        let state = end
            .wait_for(|s| matches!(s, WriteState::Finished { .. }))
            .await
            .unwrap()
            .clone();
        assert_eq!(
            state,
            WriteState::Finished {
                manifest: Box::new(failed.clone()),
                progress: Some(progress(20))
            }
        );
        assert_eq!(waiter.await.unwrap().unwrap(), failed);
        assert!(snapshots.watch_writing("l").is_none());
        assert_eq!(snapshots.progress_of("l"), None);
        tokio::time::timeout(std::time::Duration::from_secs(1), snapshots.wait_idle())
            .await
            .unwrap();

        // FULL/DIFF writes cannot be cancelled.
        let _signal = snapshots.writing("f", false);
        assert!(snapshots.cancel("f", CancelReason::Deleted).is_none());
        assert_eq!(snapshots.cancel_all(CancelReason::ShuttingDown), 0);
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), snapshots.wait_idle())
                .await
                .is_err(),
            "f is still being written"
        );
    }
}
