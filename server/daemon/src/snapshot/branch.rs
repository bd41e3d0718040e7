//! BranchSandbox: capture a running sandbox into a new snapshot.
//!
//! `store.begin` → `Request::Snapshot` to the VMM (under the sandbox's exec
//! turn: between commands, vCPUs PAUSED) → for FULL and DIFF
//! `store.commit`; for LIVE the vCPUs run again at once and the copy
//! continues in a [`BackgroundCopy`] (see `live_copy.rs`). The snapshot's
//! status changes only in [`WritingSnapshot`] (`writing.rs`): READY moves
//! the sandbox's base to the new tag; any failure fails the snapshot (a
//! FAILED tombstone with the reason) and the sandbox keeps running.

use std::sync::Arc;
use std::time::SystemTime;

use forkd_store::{generate_tag, validate_tag, Manifest, Mode, SnapshotInfo, StoreError, Written};

use crate::api::error::{ApiError, LiveFailure};
use crate::sandbox::registry::Sandbox;
use crate::snapshot::live_copy::BackgroundCopy;
use crate::snapshot::mode;
use crate::snapshot::store::{CancelSignal, Snapshots, SNAPSHOT_STORE};
use crate::snapshot::writing::{Epoch, WritingSnapshot};
use crate::vmm::{LiveSnapshot, RequestError, Snapshotted};

/// A validated branch.
#[derive(Debug, Clone)]
pub struct BranchPlan {
    /// The tag; `None` means a generated one.
    pub tag: Option<String>,
    /// FULL, DIFF or LIVE.
    pub mode: Mode,
    /// Also count dirtied pages on a FULL or LIVE branch.
    pub measure_diff: bool,
}

/// What a branch produced.
#[derive(Debug, Clone)]
pub struct BranchOutcome {
    /// The new snapshot: READY, or WRITING for a LIVE branch whose copy
    /// is still running.
    pub manifest: Manifest,
    /// Bytes of memory the VMM wrote (so far).
    pub bytes_written: u64,
    /// Pages in the diff, or dirtied since the base.
    pub dirty_pages: u64,
    /// How long the vCPUs were stopped, measured in the VMM.
    pub pause_us: u64,
    /// LIVE: guest writes served by copying the page first.
    pub faults_served: u64,
}

/// What [`start`] produced.
#[derive(Debug)]
pub enum Started {
    /// FULL or DIFF: the snapshot is READY.
    Done(BranchOutcome),
    /// LIVE: the vCPUs run again; `outcome` holds the WRITING snapshot and
    /// `copy` must be driven to its end ([`BackgroundCopy::finish`]).
    Live {
        /// The snapshot as the vCPUs resumed.
        outcome: BranchOutcome,
        /// The background copy.
        copy: BackgroundCopy,
    },
}

/// The tag to use: `requested` if valid, else a fresh generated one.
fn choose_tag(snapshots: &Snapshots, requested: Option<String>) -> Result<String, ApiError> {
    match requested {
        Some(tag) => {
            validate_tag(&tag)?;
            Ok(tag)
        }
        None => loop {
            let tag = generate_tag(SystemTime::now());
            if snapshots.store().get(&tag).is_err() {
                break Ok(tag);
            }
        },
    }
}

/// The snapshot a DIFF of `sandbox` is taken against: its base, which must
/// still be in the store (it may have been deleted since).
fn diff_parent(snapshots: &Snapshots, sandbox: &Sandbox) -> Result<String, ApiError> {
    let base = sandbox.base().ok_or_else(|| {
        ApiError::FailedPrecondition(format!(
            "sandbox {} has no base snapshot: take a FULL branch first",
            sandbox.id()
        ))
    })?;
    if snapshots.store().get(&base).is_err() {
        return Err(ApiError::FailedPrecondition(format!(
            "sandbox {}'s base snapshot {base} was deleted, so there is nothing to take a DIFF \
             against: take a FULL or LIVE branch first",
            sandbox.id()
        )));
    }
    Ok(base)
}

/// What the VMM answered to the Snapshot request.
enum Answer {
    /// FULL/DIFF: the files are written.
    Written(Snapshotted),
    /// LIVE: the vCPUs run again, memory is being copied.
    Live(LiveSnapshot),
}

fn request_error(sandbox: &Sandbox, e: RequestError) -> ApiError {
    match e {
        RequestError::Stopped(stop) => ApiError::SandboxStopped {
            id: sandbox.id().to_string(),
            reason: stop.reason,
        },
        RequestError::Refused(message) => ApiError::Vmm {
            id: sandbox.id().to_string(),
            message,
        },
    }
}

/// Waits for the sandbox's exec turn (a running command finishes first),
/// then asks the VMM for the snapshot; the sandbox is PAUSED meanwhile. A
/// LIVE branch cancelled while it waits for the turn is never taken.
async fn take(
    sandbox: &Sandbox,
    tag: &str,
    plan: &BranchPlan,
    dir: &std::path::Path,
    cancel: &mut CancelSignal,
) -> Result<Answer, ApiError> {
    let _turn = tokio::select! {
        turn = sandbox.exec_turn.lock() => turn,
        why = cancel.cancelled() => {
            return Err(ApiError::LiveFailed {
                tag: tag.to_string(),
                failure: LiveFailure::Cancelled(why),
            })
        }
    };
    sandbox.check_exec()?;
    sandbox.set_snapshotting(true);
    let vmm = &sandbox.vmm;
    let r = match plan.mode {
        Mode::Live => vmm
            .live_snapshot(dir, plan.measure_diff)
            .await
            .map(Answer::Live),
        written => vmm
            .snapshot(mode::to_control(written), dir, plan.measure_diff)
            .await
            .map(Answer::Written),
    };
    sandbox.set_snapshotting(false);
    r.map_err(|e| request_error(sandbox, e))
}

/// Branches `sandbox` as far as the VMM's answer: FULL and DIFF end READY
/// (or fail); LIVE returns once the vCPUs run again, with the copy to
/// drive. One branch per sandbox at a time: later ones wait for the branch
/// turn, which a LIVE branch keeps until its copy ends. Run it (and the
/// copy) in its own task: the snapshot always ends READY or FAILED.
pub async fn start(
    snapshots: &Arc<Snapshots>,
    sandbox: &Arc<Sandbox>,
    plan: BranchPlan,
) -> Result<Started, ApiError> {
    // A taken tag is refused at once, not after waiting for the branch
    // turn (a LIVE copy can hold it for minutes); `begin` checks again.
    if let Some(tag) = &plan.tag {
        validate_tag(tag)?;
        if let Ok(m) = snapshots.store().get(tag) {
            return Err(StoreError::AlreadyExists {
                tag: tag.clone(),
                status: m.status,
            }
            .into());
        }
    }
    let branch_turn = sandbox.branch_turn.clone().lock_owned().await;
    sandbox.check_exec()?;
    let tag = choose_tag(snapshots, plan.tag.clone())?;
    let parent = match plan.mode {
        Mode::Diff => Some(diff_parent(snapshots, sandbox)?),
        Mode::Full | Mode::Live => None,
    };
    let info = SnapshotInfo {
        mode: plan.mode,
        parent,
        source_sandbox: sandbox.id().to_string(),
        guest: forkd_store::GuestConfig {
            memory_mib: sandbox.spec.memory_mib,
            vcpus: sandbox.spec.vcpus,
            huge_pages: sandbox.spec.huge_pages,
        },
        image: sandbox.spec.image.clone(),
    };
    let (writing, begun, mut cancel) =
        WritingSnapshot::begin(snapshots, sandbox, &tag, info).await?;
    tracing::info!(sandbox = %sandbox.id(), %tag, mode = ?plan.mode, "branching");

    match take(sandbox, &tag, &plan, writing.dir(), &mut cancel).await {
        Ok(Answer::Live(live)) => {
            let s = live.snapshotted;
            snapshots.metrics().paused(Mode::Live, s.pause_us);
            tracing::info!(
                sandbox = %sandbox.id(), %tag, pause_us = s.pause_us,
                "vCPUs resumed; copying memory in the background"
            );
            let outcome = BranchOutcome {
                manifest: begun,
                bytes_written: s.bytes_written,
                dirty_pages: s.dirty_pages,
                pause_us: s.pause_us,
                faults_served: 0,
            };
            let copy = BackgroundCopy::new(writing, sandbox.clone(), live, cancel, branch_turn);
            Ok(Started::Live { outcome, copy })
        }
        Ok(Answer::Written(w)) => {
            snapshots.metrics().paused(plan.mode, w.pause_us);
            let written = Written {
                memory_bytes: w.memory_bytes,
                data_bytes: w.bytes_written,
                dirty_pages: w.dirty_pages,
                pause_us: w.pause_us,
            };
            let manifest = writing.commit(written, None).await?;
            Ok(Started::Done(BranchOutcome {
                manifest,
                bytes_written: w.bytes_written,
                dirty_pages: w.dirty_pages,
                pause_us: w.pause_us,
                faults_served: 0,
            }))
        }
        Err(err) => {
            let err = err.or_no_space(SNAPSHOT_STORE, snapshots.store().root());
            // The VMM did not take the snapshot (refused, stopped, or the
            // branch was cancelled first): its dirty epoch, and so the
            // sandbox's base, are unchanged.
            let reason = match &err {
                ApiError::LiveFailed { failure, .. } => failure.to_string(),
                other => other.to_string(),
            };
            writing.fail(&reason, Epoch::Kept, None).await;
            Err(err)
        }
    }
}

/// Branches `sandbox` and waits for READY (LIVE included).
pub async fn branch(
    snapshots: &Arc<Snapshots>,
    sandbox: &Arc<Sandbox>,
    plan: BranchPlan,
) -> Result<BranchOutcome, ApiError> {
    match start(snapshots, sandbox, plan).await? {
        Started::Done(outcome) => Ok(outcome),
        Started::Live { copy, .. } => copy.finish().await,
    }
}
