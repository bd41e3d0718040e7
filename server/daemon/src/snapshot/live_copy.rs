//! The background part of a LIVE branch: after the VMM resumed the vCPUs,
//! follow its copy (progress into the snapshot's write state), honour a
//! cancel (DeleteSnapshot, shutdown), and end the snapshot READY (commit)
//! or FAILED. The branch turn is held until then, so later branches of the
//! same sandbox queue behind the copy; the exec turn is free, so commands
//! run during it.

use std::sync::Arc;
use std::time::Duration;

use forkd_store::Written;
use tokio::sync::OwnedMutexGuard;
use tokio::time::Instant;

use crate::api::error::{ApiError, CancelReason, LiveFailure};
use crate::sandbox::registry::Sandbox;
use crate::snapshot::branch::BranchOutcome;
use crate::snapshot::store::{CancelSignal, SNAPSHOT_STORE};
use crate::snapshot::writing::{Epoch, WritingSnapshot};
use crate::vmm::{CopyEvent, CopyProgress, LiveSnapshot};

/// Time the VMM gets to end a copy after Cancel before it is treated as
/// broken: the sandbox is failed and its VMM killed (as for an Exec whose
/// cancel is ignored).
pub const CANCEL_WAIT: Duration = Duration::from_secs(5);
/// Bound on waiting for a killed VMM to be reaped before the snapshot's
/// files are removed.
const REAP_WAIT: Duration = Duration::from_secs(10);

/// A LIVE snapshot whose memory the VMM is copying, followed by the
/// daemon (not to be confused with `forkd_uffd::LiveCopy`, the VMM's side
/// that does the copying).
#[derive(Debug)]
pub struct BackgroundCopy {
    writing: WritingSnapshot,
    sandbox: Arc<Sandbox>,
    live: LiveSnapshot,
    cancel: CancelSignal,
    /// The sandbox's branch turn, held until the copy ends.
    _branch_turn: OwnedMutexGuard<()>,
}

/// How a copy ended.
struct CopyEnd {
    /// `Ok(bytes_written)` when `dir/memory` is complete.
    result: Result<u64, LiveFailure>,
    /// The last figures the VMM reported.
    progress: Option<CopyProgress>,
}

impl BackgroundCopy {
    /// A copy to follow; `branch_turn` is released when it ends.
    pub fn new(
        writing: WritingSnapshot,
        sandbox: Arc<Sandbox>,
        live: LiveSnapshot,
        cancel: CancelSignal,
        branch_turn: OwnedMutexGuard<()>,
    ) -> BackgroundCopy {
        BackgroundCopy {
            writing,
            sandbox,
            live,
            cancel,
            _branch_turn: branch_turn,
        }
    }

    /// Follows the copy to its end and commits (READY; the sandbox's base
    /// becomes this snapshot) or fails (FAILED with the reason; the base is
    /// cleared, since the VMM's dirty epoch ended at the pause).
    pub async fn finish(mut self) -> Result<BranchOutcome, ApiError> {
        let tag = self.writing.tag().to_string();
        let end = self.follow(&tag).await;
        let snap = self.live.snapshotted;
        match end.result {
            Ok(bytes_written) => {
                let written = Written {
                    memory_bytes: snap.memory_bytes,
                    data_bytes: bytes_written,
                    dirty_pages: snap.dirty_pages,
                    pause_us: snap.pause_us,
                };
                let manifest = self.writing.commit(written, end.progress).await?;
                Ok(BranchOutcome {
                    manifest,
                    bytes_written,
                    dirty_pages: snap.dirty_pages,
                    pause_us: snap.pause_us,
                    faults_served: end.progress.map_or(0, |p| p.faults_served),
                })
            }
            Err(failure) => {
                let reason = failure.to_string();
                self.writing.fail(&reason, Epoch::Ended, end.progress).await;
                Err(ApiError::LiveFailed { tag, failure })
            }
        }
    }

    /// Relays progress until the copy ends, the VMM stops, or a cancel is
    /// honoured (or ignored past [`CANCEL_WAIT`]).
    /// The VMM's copy error, with the full file system named when the
    /// error is ENOSPC/EDQUOT (the caller then gets RESOURCE_EXHAUSTED).
    fn no_space_note(&self, error: String) -> String {
        if !crate::api::public::text_is_no_space(&error) {
            return error;
        }
        let fs = crate::api::public::describe_fs(self.writing.snapshots().store().root());
        format!("{error}; no space left on the file system holding forkd's {SNAPSHOT_STORE} ({fs})")
    }

    async fn follow(&mut self, tag: &str) -> CopyEnd {
        let vmm = self.sandbox.vmm.clone();
        let mut progress = None;
        let mut cancelled: Option<(CancelReason, Instant)> = None;
        loop {
            let deadline = cancelled.map(|(_, d)| d);
            tokio::select! {
                event = self.live.events.next() => match event {
                    Some(CopyEvent::Progress(p)) => {
                        self.writing.snapshots().metrics().copy_progress(progress.as_ref(), &p);
                        progress = Some(p);
                        self.writing.snapshots().progress(tag, p);
                    }
                    Some(CopyEvent::Done { progress: p, bytes_written, copy_us, error }) => {
                        self.writing.snapshots().metrics().copy_progress(progress.as_ref(), &p);
                        progress = Some(p);
                        tracing::debug!(%tag, copy_us, ?error, "live copy ended");
                        // A copy that completed as the cancel crossed it is
                        // still cancelled: its snapshot is being deleted.
                        let result = match (cancelled, error) {
                            (Some((why, _)), _) => Err(LiveFailure::Cancelled(why)),
                            (None, Some(e)) => Err(LiveFailure::Copy(self.no_space_note(e))),
                            (None, None) => Ok(bytes_written),
                        };
                        return CopyEnd { result, progress };
                    }
                    None => {
                        let reason = vmm
                            .stop()
                            .map(|s| s.reason)
                            .unwrap_or_else(|| "VMM control connection closed".into());
                        let result = match cancelled {
                            Some((why, _)) => Err(LiveFailure::Cancelled(why)),
                            None => Err(LiveFailure::SourceStopped {
                                sandbox: self.sandbox.id().to_string(),
                                reason,
                            }),
                        };
                        return CopyEnd { result, progress };
                    }
                },
                why = self.cancel.cancelled(), if cancelled.is_none() => {
                    tracing::info!(%tag, reason = %why, "cancelling the live copy");
                    vmm.cancel(self.live.request_id);
                    cancelled = Some((why, Instant::now() + CANCEL_WAIT));
                }
                _ = sleep_until(deadline) => {
                    let why = cancelled.map(|(w, _)| w).unwrap_or(CancelReason::Deleted);
                    tracing::warn!(%tag, "VMM ignored the cancel of a live copy; failing the sandbox");
                    vmm.fail(&format!(
                        "VMM did not stop the live copy of snapshot {tag} when cancelled"
                    ));
                    // No stray writes into the snapshot's files after this.
                    let _ = tokio::time::timeout(REAP_WAIT, vmm.wait_reaped()).await;
                    return CopyEnd { result: Err(LiveFailure::Cancelled(why)), progress };
                }
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
