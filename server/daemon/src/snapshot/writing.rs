//! A snapshot being written, from `store.begin` to READY or FAILED: the one
//! place a snapshot's status changes. [`WritingSnapshot`] owns the store's
//! `Pending` and the watchers' entry, and ends exactly once: [`commit`]
//! (READY, the sandbox's base moves to it) or [`fail`] (FAILED with the
//! reason). Each end records the store, tells watchers and waiting forks,
//! counts the outcome and logs it. Dropped before either, it fails as
//! abandoned, and watchers still hear of it.
//!
//! [`commit`]: WritingSnapshot::commit
//! [`fail`]: WritingSnapshot::fail

use std::path::Path;
use std::sync::Arc;

use forkd_store::{Manifest, Mode, Pending, SnapshotInfo, Written};

use crate::api::error::ApiError;
use crate::sandbox::registry::Sandbox;
use crate::snapshot::store::{CancelSignal, Snapshots};
use crate::vmm::CopyProgress;

/// What a failure means for the sandbox's base snapshot (the one a later
/// DIFF is taken against).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Epoch {
    /// The VMM never took the snapshot (refused, stopped, cancelled while
    /// waiting for its turn): its dirty-tracking epoch goes on, the base
    /// stays.
    Kept,
    /// The VMM ended its dirty-tracking epoch at the pause: a DIFF against
    /// the old base would miss this epoch's pages, so the base is cleared
    /// and the sandbox needs a FULL or LIVE branch first.
    Ended,
}

/// What a READY snapshot's log line and metrics report.
#[derive(Clone, Copy, Debug, Default)]
pub struct Figures {
    /// Bytes of memory the VMM wrote.
    pub bytes_written: u64,
    /// Pages in the diff, or dirtied since the base.
    pub dirty_pages: u64,
    /// How long the vCPUs were stopped, measured in the VMM.
    pub pause_us: u64,
}

/// A snapshot between `store.begin` and its end (see the module doc).
#[derive(Debug)]
pub struct WritingSnapshot {
    snapshots: Arc<Snapshots>,
    sandbox: Arc<Sandbox>,
    mode: Mode,
    tag: String,
    /// `None` once ended.
    pending: Option<Pending>,
}

impl WritingSnapshot {
    /// Begins `tag` in the store for `sandbox` and registers it for
    /// watchers. Returns it, its manifest as begun (WRITING), and the
    /// signal a LIVE copy listens on for a cancel.
    pub async fn begin(
        snapshots: &Arc<Snapshots>,
        sandbox: &Arc<Sandbox>,
        tag: &str,
        info: SnapshotInfo,
    ) -> Result<(WritingSnapshot, Manifest, CancelSignal), ApiError> {
        let mode = info.mode;
        let t = tag.to_string();
        let pending = snapshots.blocking(move |s| s.begin(&t, info)).await?;
        // Read before registering, so no early return leaves watchers
        // waiting.
        let begun = snapshots.store().get(tag)?;
        let cancel = snapshots.writing(tag, mode == Mode::Live);
        let this = WritingSnapshot {
            snapshots: snapshots.clone(),
            sandbox: sandbox.clone(),
            mode,
            tag: tag.to_string(),
            pending: Some(pending),
        };
        Ok((this, begun, cancel))
    }

    /// The snapshot's tag.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The directory the VMM writes the snapshot's files into.
    pub fn dir(&self) -> &Path {
        self.pending
            .as_ref()
            .map(Pending::dir)
            .expect("a WritingSnapshot is not used after it ended")
    }

    /// The daemon's snapshot handle.
    pub fn snapshots(&self) -> &Arc<Snapshots> {
        &self.snapshots
    }

    /// Commits the files the VMM wrote: READY, and the sandbox's base moves
    /// to it. If the commit fails the store leaves the snapshot FAILED and
    /// the base is cleared (the VMM's dirty epoch ended anyway).
    /// `progress` is a LIVE copy's final figures, for watchers.
    pub async fn commit(
        mut self,
        written: Written,
        progress: Option<CopyProgress>,
    ) -> Result<Manifest, ApiError> {
        let pending = self.take_pending();
        let figures = Figures {
            bytes_written: written.data_bytes,
            dirty_pages: written.dirty_pages,
            pause_us: written.pause_us,
        };
        // On error, commit itself leaves the snapshot FAILED.
        let result = self
            .snapshots
            .blocking(move |s| s.commit(pending, written))
            .await;
        self.tell_watchers(progress);
        let (sandbox, tag, mode) = (&self.sandbox, &self.tag, self.mode);
        match &result {
            Ok(_) => {
                sandbox.set_base(Some(tag.clone()));
                self.snapshots.metrics().ready(mode, figures.bytes_written);
                tracing::info!(
                    sandbox = %sandbox.id(), %tag, ?mode,
                    pause_us = figures.pause_us,
                    bytes_written = figures.bytes_written,
                    dirty_pages = figures.dirty_pages,
                    faults_served = progress.map_or(0, |p| p.faults_served),
                    "snapshot READY"
                );
            }
            Err(e) => {
                sandbox.set_base(None);
                self.snapshots.metrics().failed(mode);
                tracing::warn!(sandbox = %sandbox.id(), %tag, ?mode, error = %e, "snapshot FAILED");
            }
        }
        result
    }

    /// Fails the snapshot with `reason` (a FAILED tombstone keeps it for
    /// inspection); `epoch` says whether the sandbox's base stays.
    /// `progress` is a LIVE copy's last figures, for watchers.
    pub async fn fail(mut self, reason: &str, epoch: Epoch, progress: Option<CopyProgress>) {
        let pending = self.take_pending();
        let why = reason.to_string();
        if let Err(e) = self
            .snapshots
            .blocking(move |s| s.fail(pending, &why))
            .await
        {
            tracing::warn!(tag = %self.tag, error = %e, "could not record the failed snapshot");
        }
        self.tell_watchers(progress);
        self.failed(reason, epoch);
    }

    fn take_pending(&mut self) -> Pending {
        self.pending
            .take()
            .expect("a WritingSnapshot ends only once")
    }

    /// Tells watchers and waiting forks the snapshot's final state, as the
    /// store has it now.
    fn tell_watchers(&self, progress: Option<CopyProgress>) {
        match self.snapshots.store().get(&self.tag) {
            Ok(m) => self.snapshots.finished(&m, progress),
            Err(e) => {
                tracing::warn!(tag = %self.tag, error = %e, "snapshot gone from the store at its end")
            }
        }
    }

    fn failed(&self, reason: &str, epoch: Epoch) {
        if epoch == Epoch::Ended {
            self.sandbox.set_base(None);
        }
        self.snapshots.metrics().failed(self.mode);
        tracing::warn!(
            sandbox = %self.sandbox.id(), tag = %self.tag, mode = ?self.mode, %reason,
            "snapshot FAILED"
        );
    }
}

impl Drop for WritingSnapshot {
    /// Neither committed nor failed (a task dropped mid-way): the store's
    /// `Pending` fails the snapshot as abandoned when dropped, and watchers
    /// must hear of it, or they (and shutdown's wait for writes) would wait
    /// forever.
    fn drop(&mut self) {
        if let Some(pending) = self.pending.take() {
            drop(pending);
            self.tell_watchers(None);
            self.failed("abandoned before commit", Epoch::Ended);
        }
    }
}
