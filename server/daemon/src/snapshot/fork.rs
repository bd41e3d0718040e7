//! Preparing a fork: everything SpawnSandboxes needs before it starts
//! children from a snapshot.

use forkd_store::{Status, StoreError};

use crate::api::error::ApiError;
use crate::api::validate;
use crate::sandbox::lifecycle::Restore;
use crate::snapshot::store::Snapshots;

/// What children of one snapshot start from.
#[derive(Debug)]
pub struct ForkSource {
    /// Guest RAM in MiB (the snapshot's).
    pub memory_mib: u32,
    /// vCPUs (the snapshot's).
    pub vcpus: u32,
    /// RAM is 2 MiB huge pages (the snapshot's).
    pub huge_pages: bool,
    /// The snapshot to restore.
    pub restore: Restore,
}

/// Resolves `tag` into a fork source: NOT_FOUND if unknown,
/// FAILED_PRECONDITION unless READY, INVALID_ARGUMENT if `memory_mib` or
/// `vcpus` (0 = the snapshot's) differ from the snapshot or `huge_pages`
/// asks for huge pages from a 4 KiB snapshot, DATA_LOSS if its
/// files do not match their digests (the store then marks the snapshot
/// FAILED, so later calls get FAILED_PRECONDITION with the mismatch),
/// FAILED_PRECONDITION for a diff whose chain is broken. A snapshot still WRITING is waited
/// for with `wait_for_snapshot` (then READY forks, FAILED is
/// FAILED_PRECONDITION with its reason), else FAILED_PRECONDITION saying
/// how far its copy is and how to wait. The memory is loaded and verified
/// on the first fork of a tag and cached; the small vmstate file is
/// re-verified on every call, since the VMMs read it from disk.
pub async fn prepare(
    snapshots: &Snapshots,
    tag: &str,
    memory_mib: u32,
    vcpus: u32,
    huge_pages: bool,
    wait_for_snapshot: bool,
) -> Result<ForkSource, ApiError> {
    validate::snapshot_tag(tag)?;
    let mut m = snapshots.store().get(tag)?;
    if m.status == Status::Writing {
        if !wait_for_snapshot {
            return Err(ApiError::SnapshotWriting {
                tag: tag.to_string(),
                copied_percent: snapshots.progress_of(tag).map(|p| p.percent()),
            });
        }
        tracing::info!(tag, "waiting for the snapshot to be READY before forking");
        m = snapshots.wait_finished(tag).await?;
    }
    if m.status != Status::Ready {
        return Err(StoreError::NotReady {
            tag: m.tag,
            status: m.status,
            reason: m.failure_reason,
        }
        .into());
    }
    // A READY diff whose ancestor failed or went away keeps its own files
    // but cannot be restored (also when its memory is already cached).
    snapshots.store().check_chain(tag)?;
    let (memory_mib, vcpus) = validate::fork_shape(&m, memory_mib, vcpus, huge_pages)?;
    let memory = snapshots.memory(tag).await?;
    let t = tag.to_string();
    if let Err(e) = snapshots.blocking(move |s| s.verify_vmstate(&t)).await {
        // The store marked it FAILED; drop the memory loaded before.
        snapshots.forget(&[tag.to_string()]);
        return Err(e);
    }
    Ok(ForkSource {
        memory_mib,
        vcpus,
        huge_pages: m.guest.huge_pages,
        restore: Restore {
            tag: tag.to_string(),
            dir: snapshots.store().snapshot_dir(tag),
            memory,
            image: m.image.clone(),
        },
    })
}
