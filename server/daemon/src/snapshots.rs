//! The daemon's handle on the snapshot store: runs store calls on the
//! blocking pool, caches each snapshot's sealed memory (loaded once per
//! tag, shared by every child), and tells watchers when a snapshot being
//! written ends.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use forkd_store::{Manifest, RecoveryReport, SealedMemory, Store, StoreError};
use tokio::sync::{watch, OnceCell};

use crate::error::{ApiError, StartupError};
use crate::sync::lock;

/// One tag's memory: loaded at most once at a time, then kept.
type MemorySlot = Arc<OnceCell<Arc<SealedMemory>>>;

/// The snapshot store plus what the daemon keeps in memory about it.
#[derive(Debug)]
pub struct Snapshots {
    store: Store,
    memory: Mutex<HashMap<String, MemorySlot>>,
    /// Snapshots being written: their final manifest is sent here.
    writing: Mutex<HashMap<String, watch::Sender<Option<Manifest>>>>,
}

impl Snapshots {
    /// Opens and recovers the store at `dir`.
    pub fn open(dir: &Path) -> Result<(Arc<Snapshots>, RecoveryReport), StartupError> {
        let (store, report) = Store::open(dir).map_err(|e| StartupError::Store(e.to_string()))?;
        let this = Arc::new(Snapshots {
            store,
            memory: Mutex::default(),
            writing: Mutex::default(),
        });
        Ok((this, report))
    }

    /// The store, for quick in-memory reads (`get`, `list`, `chain`,
    /// `dependents` touch no disk).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Runs `f` on the blocking pool (store calls do file I/O).
    pub async fn blocking<T, F>(&self, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| ApiError::Internal(format!("store task failed: {e}")))?
            .map_err(ApiError::from)
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

    /// Records that `tag` is being written, so watchers can wait for its
    /// end.
    pub fn writing(&self, tag: &str) {
        lock(&self.writing).insert(tag.to_string(), watch::Sender::new(None));
    }

    /// Records that `tag` is READY or FAILED now.
    pub fn finished(&self, manifest: &Manifest) {
        if let Some(tx) = lock(&self.writing).remove(&manifest.tag) {
            tx.send_replace(Some(manifest.clone()));
        }
    }

    /// A receiver that gets `tag`'s final manifest, if it is being written.
    pub fn watch_writing(&self, tag: &str) -> Option<watch::Receiver<Option<Manifest>>> {
        lock(&self.writing).get(tag).map(watch::Sender::subscribe)
    }
}
