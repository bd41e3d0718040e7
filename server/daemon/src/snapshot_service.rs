//! `forkd.v1.SnapshotService`: every call answers UNIMPLEMENTED until the
//! snapshot store lands in a later release.

use forkd_api::v1 as pb;
use pb::snapshot_service_server::SnapshotService;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::error::ApiError;

/// The SnapshotService implementation.
#[derive(Debug, Clone, Default)]
pub struct Snapshots;

/// The UNIMPLEMENTED error for `method`.
pub fn not_yet(method: &str) -> Status {
    ApiError::Unimplemented(format!(
        "{method} is not implemented yet: snapshots come in a later release"
    ))
    .into()
}

#[tonic::async_trait]
impl SnapshotService for Snapshots {
    async fn create_snapshot(
        &self,
        _: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::CreateSnapshotResponse>, Status> {
        Err(not_yet("CreateSnapshot"))
    }

    async fn get_snapshot(
        &self,
        _: Request<pb::GetSnapshotRequest>,
    ) -> Result<Response<pb::GetSnapshotResponse>, Status> {
        Err(not_yet("GetSnapshot"))
    }

    async fn list_snapshots(
        &self,
        _: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        Err(not_yet("ListSnapshots"))
    }

    async fn delete_snapshot(
        &self,
        _: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        Err(not_yet("DeleteSnapshot"))
    }

    type WatchSnapshotStream = ReceiverStream<Result<pb::WatchSnapshotResponse, Status>>;

    async fn watch_snapshot(
        &self,
        _: Request<pb::WatchSnapshotRequest>,
    ) -> Result<Response<Self::WatchSnapshotStream>, Status> {
        Err(not_yet("WatchSnapshot"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn says_not_yet() {
        let s = not_yet("GetSnapshot");
        assert_eq!(s.code(), tonic::Code::Unimplemented);
        assert_eq!(
            s.message(),
            "GetSnapshot is not implemented yet: snapshots come in a later release"
        );
    }
}
