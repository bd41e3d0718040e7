//! The API view of a snapshot: a store manifest plus its relations
//! (chain, dependents, running children).

use forkd_api::v1 as pb;
use forkd_store::{Manifest, RunningChild, Status, Store};

use crate::api::error::ApiError;
use crate::snapshot::mode;
use crate::vmm::CopyProgress;

/// The API status of a store status.
pub fn status_to_proto(s: Status) -> pb::SnapshotStatus {
    match s {
        Status::Writing => pb::SnapshotStatus::Writing,
        Status::Ready => pb::SnapshotStatus::Ready,
        Status::Failed => pb::SnapshotStatus::Failed,
    }
}

/// The store status an API status filter selects; `None` for UNSPECIFIED.
pub fn status_filter(s: i32) -> Result<Option<Status>, ApiError> {
    let status = pb::SnapshotStatus::try_from(s).map_err(|_| {
        ApiError::InvalidArgument(format!(
            "status {s} is not a SnapshotStatus; use WRITING, READY, FAILED or leave it unset"
        ))
    })?;
    Ok(match status {
        pb::SnapshotStatus::Unspecified => None,
        pb::SnapshotStatus::Writing => Some(Status::Writing),
        pb::SnapshotStatus::Ready => Some(Status::Ready),
        pb::SnapshotStatus::Failed => Some(Status::Failed),
    })
}

/// Builds the API view of `m`. `children` are the running sandboxes forked
/// from it.
pub fn to_proto(
    m: &Manifest,
    chain: Vec<String>,
    dependents: Vec<String>,
    children: Vec<String>,
) -> pb::Snapshot {
    pb::Snapshot {
        tag: m.tag.clone(),
        status: status_to_proto(m.status) as i32,
        mode: mode::to_proto(m.mode) as i32,
        parent_tag: m.parent.clone().unwrap_or_default(),
        source_sandbox_id: m.source_sandbox.clone(),
        memory_mib: m.guest.memory_mib,
        vcpus: m.guest.vcpus,
        memory_bytes: m.data_bytes,
        disk_bytes: m.disk_bytes,
        create_time: m.created().map(Into::into),
        failure_reason: crate::api::public::status_message(
            m.failure_reason.as_deref().unwrap_or_default(),
        ),
        chain,
        dependents,
        children,
        image: m.image.clone().unwrap_or_default(),
        huge_pages: m.guest.huge_pages,
    }
}

/// The API view of `m` with its relations looked up in `store` and
/// `running` (the registry's snapshot children).
pub fn describe(store: &Store, m: &Manifest, running: &[RunningChild]) -> pb::Snapshot {
    let chain = store
        .chain(&m.tag)
        .map(|c| c.into_iter().map(|m| m.tag).collect())
        .unwrap_or_default();
    let children = running
        .iter()
        .filter(|c| c.tag == m.tag)
        .map(|c| c.sandbox_id.clone())
        .collect();
    to_proto(m, chain, store.dependents(&m.tag), children)
}

/// One WatchSnapshot message for `m`. `progress` is a LIVE copy's figures
/// (so far, or final); without them a READY snapshot reports its data bytes
/// as copied of total, and anything else zeros.
pub fn watch_message(m: &Manifest, progress: Option<&CopyProgress>) -> pb::WatchSnapshotResponse {
    let (bytes_copied, bytes_total, faults_served) = match (progress, m.status) {
        (Some(p), _) => (p.bytes_copied, p.bytes_total, p.faults_served),
        (None, Status::Ready) => (m.data_bytes, m.data_bytes, 0),
        (None, _) => (0, 0, 0),
    };
    pb::WatchSnapshotResponse {
        tag: m.tag.clone(),
        status: status_to_proto(m.status) as i32,
        bytes_copied,
        bytes_total,
        faults_served,
        failure_reason: crate::api::public::status_message(
            m.failure_reason.as_deref().unwrap_or_default(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use forkd_store::{GuestConfig, CHUNK_SIZE, FORMAT_VERSION};

    fn manifest() -> Manifest {
        Manifest {
            format_version: FORMAT_VERSION,
            tag: "d1".into(),
            parent: Some("base".into()),
            parent_digest: Some("ab".into()),
            mode: forkd_store::Mode::Diff,
            status: Status::Ready,
            failure_reason: None,
            memory_bytes: 256 << 20,
            disk_bytes: 8192,
            data_bytes: 4096,
            dirty_pages: 3,
            chunk_size: CHUNK_SIZE,
            memory_chunks: vec![],
            vmstate_sha256: None,
            pages_sha256: None,
            created_at: "2025-01-01T12:00:00.250000Z".into(),
            source_sandbox: "sb-1".into(),
            guest: GuestConfig {
                memory_mib: 256,
                vcpus: 2,
                huge_pages: false,
            },
            image: None,
            pause_us: 900,
        }
    }

    #[test]
    fn manifest_maps_onto_the_api() {
        let s = to_proto(
            &manifest(),
            vec!["d1".into(), "base".into()],
            vec!["d2".into()],
            vec!["sb-2".into()],
        );
        assert_eq!(s.tag, "d1");
        assert_eq!(s.status, pb::SnapshotStatus::Ready as i32);
        assert_eq!(s.mode, pb::BranchMode::Diff as i32);
        assert_eq!(s.parent_tag, "base");
        assert_eq!(s.source_sandbox_id, "sb-1");
        assert_eq!((s.memory_mib, s.vcpus), (256, 2));
        assert_eq!((s.memory_bytes, s.disk_bytes), (4096, 8192));
        let t = s.create_time.unwrap();
        assert_eq!((t.seconds, t.nanos), (1_735_732_800, 250_000_000));
        assert_eq!(s.chain, ["d1", "base"]);
        assert_eq!(s.dependents, ["d2"]);
        assert_eq!(s.children, ["sb-2"]);
        assert!(s.failure_reason.is_empty());
    }

    #[test]
    fn status_filters_and_watch_messages() {
        assert_eq!(status_filter(0).unwrap(), None);
        assert_eq!(status_filter(2).unwrap(), Some(Status::Ready));
        assert_eq!(status_filter(3).unwrap(), Some(Status::Failed));
        assert!(status_filter(77).is_err());
        let mut m = manifest();
        let w = watch_message(&m, None);
        assert_eq!((w.bytes_copied, w.bytes_total), (4096, 4096));
        let p = CopyProgress {
            bytes_copied: 1 << 20,
            bytes_total: 4 << 20,
            faults_served: 3,
        };
        m.status = Status::Writing;
        let w = watch_message(&m, None);
        assert_eq!((w.status, w.bytes_copied, w.bytes_total), (1, 0, 0));
        let w = watch_message(&m, Some(&p));
        assert_eq!(
            (w.bytes_copied, w.bytes_total, w.faults_served),
            (1 << 20, 4 << 20, 3)
        );
        m.status = Status::Failed;
        m.failure_reason = Some("daemon stopped while writing".into());
        let w = watch_message(&m, None);
        assert_eq!(w.status, pb::SnapshotStatus::Failed as i32);
        assert_eq!(w.failure_reason, "daemon stopped while writing");
    }
}
