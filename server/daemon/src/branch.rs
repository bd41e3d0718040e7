//! BranchSandbox: capture a running sandbox into a new snapshot.
//!
//! `store.begin` → `Request::Snapshot` to the VMM → `store.commit`, and the
//! sandbox's base snapshot becomes the new tag. Any failure fails the
//! snapshot (a FAILED tombstone with the reason) and the sandbox keeps
//! running.

use std::sync::Arc;
use std::time::SystemTime;

use forkd_api::v1::BranchMode;
use forkd_control::SnapshotMode;
use forkd_store::{generate_tag, validate_tag, Manifest, Mode, SnapshotInfo, Written};

use crate::error::ApiError;
use crate::registry::Sandbox;
use crate::snapshots::Snapshots;
use crate::vmm_process::RequestError;

/// Resolves a request's `mode`, legacy `diff` flag and `wait` into the mode
/// to use: `mode` wins; UNSPECIFIED means DIFF with `diff`, else FULL.
/// LIVE is refused for now.
pub fn resolve_mode(mode: i32, diff: bool, wait: Option<bool>) -> Result<Mode, ApiError> {
    let mode = BranchMode::try_from(mode).map_err(|_| {
        ApiError::InvalidArgument(format!(
            "mode {mode} is not a BranchMode; use FULL, DIFF or LIVE"
        ))
    })?;
    let resolved = match (mode, diff) {
        (BranchMode::Unspecified, true) | (BranchMode::Diff, _) => Mode::Diff,
        (BranchMode::Unspecified, false) | (BranchMode::Full, false) => Mode::Full,
        (BranchMode::Live, false) => Mode::Live,
        (BranchMode::Full | BranchMode::Live, true) => {
            return Err(ApiError::InvalidArgument(format!(
                "diff=true contradicts mode={}; set only mode",
                mode.as_str_name()
            )))
        }
    };
    if wait == Some(false) && resolved != Mode::Live {
        return Err(ApiError::InvalidArgument(
            "wait=false applies to LIVE only; FULL and DIFF branches always wait".into(),
        ));
    }
    if resolved == Mode::Live {
        return Err(ApiError::Unimplemented(
            "LIVE branching is not implemented yet (it comes next); use FULL or DIFF".into(),
        ));
    }
    Ok(resolved)
}

/// A validated branch.
#[derive(Debug, Clone)]
pub struct BranchPlan {
    /// The tag; `None` means a generated one.
    pub tag: Option<String>,
    /// FULL or DIFF.
    pub mode: Mode,
    /// Also count dirtied pages on a FULL branch.
    pub measure_diff: bool,
}

/// What a branch produced.
#[derive(Debug, Clone)]
pub struct BranchOutcome {
    /// The new snapshot (READY).
    pub manifest: Manifest,
    /// Bytes of memory the VMM wrote.
    pub bytes_written: u64,
    /// Pages in the diff, or dirtied since the base.
    pub dirty_pages: u64,
    /// How long the vCPUs were stopped.
    pub pause_us: u64,
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

/// The snapshot a DIFF of `sandbox` is taken against.
fn diff_parent(sandbox: &Sandbox) -> Result<String, ApiError> {
    sandbox.base().ok_or_else(|| {
        ApiError::FailedPrecondition(format!(
            "sandbox {} has no base snapshot: take a FULL branch first",
            sandbox.id()
        ))
    })
}

/// Branches `sandbox`. One branch per sandbox at a time (later ones wait);
/// the snapshot is taken between commands (a running Exec finishes
/// first). Run it in its own task: it always ends with the snapshot READY
/// or FAILED.
pub async fn branch(
    snapshots: &Snapshots,
    sandbox: &Arc<Sandbox>,
    plan: BranchPlan,
) -> Result<BranchOutcome, ApiError> {
    let _branch = sandbox.branch_turn.lock().await;
    sandbox.check_exec()?;
    let tag = choose_tag(snapshots, plan.tag)?;
    let parent = match plan.mode {
        Mode::Diff => Some(diff_parent(sandbox)?),
        Mode::Full | Mode::Live => None,
    };
    let vm_mode = match plan.mode {
        Mode::Diff => SnapshotMode::Diff,
        Mode::Full | Mode::Live => SnapshotMode::Full,
    };
    let info = SnapshotInfo {
        mode: plan.mode,
        parent,
        source_sandbox: sandbox.id().to_string(),
        guest: forkd_store::GuestConfig {
            memory_mib: sandbox.spec.memory_mib,
            vcpus: sandbox.spec.vcpus,
        },
    };
    let t = tag.clone();
    let pending = snapshots.blocking(move |s| s.begin(&t, info)).await?;
    snapshots.writing(&tag);
    tracing::info!(sandbox = %sandbox.id(), %tag, mode = ?plan.mode, "branching");

    let written = async {
        let _turn = sandbox.exec_turn.lock().await;
        sandbox.check_exec()?;
        sandbox.set_snapshotting(true);
        let r = sandbox
            .vmm
            .snapshot(vm_mode, pending.dir(), plan.measure_diff)
            .await;
        sandbox.set_snapshotting(false);
        r.map_err(|e| match e {
            RequestError::Stopped(stop) => ApiError::SandboxStopped {
                id: sandbox.id().to_string(),
                reason: stop.reason,
            },
            RequestError::Refused(message) => ApiError::Vmm {
                id: sandbox.id().to_string(),
                message,
            },
        })
    }
    .await;
    let vmm_wrote = written.is_ok();
    let result = match written {
        Ok(w) => {
            let written = Written {
                memory_bytes: w.memory_bytes,
                data_bytes: w.bytes_written,
                dirty_pages: w.dirty_pages,
                pause_us: w.pause_us,
            };
            // On error, commit itself leaves the snapshot FAILED.
            snapshots
                .blocking(move |s| s.commit(pending, written))
                .await
                .map(|manifest| BranchOutcome {
                    manifest,
                    bytes_written: w.bytes_written,
                    dirty_pages: w.dirty_pages,
                    pause_us: w.pause_us,
                })
        }
        Err(err) => {
            let reason = err.to_string();
            if let Err(e) = snapshots.blocking(move |s| s.fail(pending, &reason)).await {
                tracing::warn!(%tag, error = %e, "could not record the failed snapshot");
            }
            Err(err)
        }
    };
    let final_manifest = snapshots.store().get(&tag);
    if let Ok(m) = &final_manifest {
        snapshots.finished(m);
    }
    match result {
        Ok(outcome) => {
            sandbox.set_base(Some(tag.clone()));
            tracing::info!(
                sandbox = %sandbox.id(), %tag,
                pause_us = outcome.pause_us,
                bytes_written = outcome.bytes_written,
                dirty_pages = outcome.dirty_pages,
                "snapshot READY"
            );
            Ok(outcome)
        }
        Err(e) => {
            if vmm_wrote {
                // The VMM ended its dirty-tracking epoch, but the snapshot
                // did not commit: a later DIFF against the old base would
                // miss this epoch's pages, so the sandbox needs a FULL
                // branch first. (A VMM that refused keeps its epoch.)
                sandbox.set_base(None);
            }
            tracing::warn!(sandbox = %sandbox.id(), %tag, error = %e, "snapshot FAILED");
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn code(r: Result<Mode, ApiError>) -> Code {
        r.unwrap_err().code()
    }

    #[test]
    fn mode_wins_and_legacy_diff_still_works() {
        let (u, f, d, l) = (
            BranchMode::Unspecified as i32,
            BranchMode::Full as i32,
            BranchMode::Diff as i32,
            BranchMode::Live as i32,
        );
        assert_eq!(resolve_mode(u, false, None).unwrap(), Mode::Full);
        assert_eq!(resolve_mode(u, true, None).unwrap(), Mode::Diff);
        assert_eq!(resolve_mode(f, false, None).unwrap(), Mode::Full);
        assert_eq!(resolve_mode(d, false, None).unwrap(), Mode::Diff);
        assert_eq!(resolve_mode(d, true, Some(true)).unwrap(), Mode::Diff);
        assert_eq!(code(resolve_mode(f, true, None)), Code::InvalidArgument);
        assert_eq!(code(resolve_mode(l, true, None)), Code::InvalidArgument);
        let err = resolve_mode(f, true, None).unwrap_err().to_string();
        assert_eq!(
            err,
            "diff=true contradicts mode=BRANCH_MODE_FULL; set only mode"
        );
        assert_eq!(code(resolve_mode(99, false, None)), Code::InvalidArgument);
    }

    #[test]
    fn wait_false_is_for_live_and_live_is_not_yet() {
        let err = resolve_mode(BranchMode::Full as i32, false, Some(false)).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.to_string().contains("wait=false applies to LIVE only"));
        assert_eq!(
            code(resolve_mode(
                BranchMode::Unspecified as i32,
                true,
                Some(false)
            )),
            Code::InvalidArgument
        );
        let err = resolve_mode(BranchMode::Live as i32, false, Some(false)).unwrap_err();
        assert_eq!(err.code(), Code::Unimplemented);
        assert!(err.to_string().contains("comes next"));
        assert_eq!(
            code(resolve_mode(BranchMode::Live as i32, false, None)),
            Code::Unimplemented
        );
    }
}
