//! `forkd.v1.SnapshotService`: validates each request and hands it to the
//! snapshot store, the CreateSnapshot flow, or the registry.

use std::sync::Arc;

use forkd_api::v1 as pb;
use forkd_store::Status;
use pb::snapshot_service_server::SnapshotService;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status as GrpcStatus};

use crate::create_snapshot::{self, create_plan};
use crate::error::ApiError;
use crate::lifecycle::Manager;
use crate::snapshot_view::{describe, status_filter, watch_message};
use crate::snapshots::Snapshots;
use crate::validate;

/// How often WatchSnapshot polls a snapshot it cannot subscribe to.
const WATCH_POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// The SnapshotService implementation.
#[derive(Debug, Clone)]
pub struct SnapshotApi {
    manager: Arc<Manager>,
    snapshots: Arc<Snapshots>,
}

impl SnapshotApi {
    /// A service over the manager (for sandboxes) and the store.
    pub fn new(manager: Arc<Manager>, snapshots: Arc<Snapshots>) -> SnapshotApi {
        SnapshotApi { manager, snapshots }
    }

    fn describe(&self, tag: &str) -> Result<pb::Snapshot, ApiError> {
        let store = self.snapshots.store();
        let m = store.get(tag)?;
        Ok(describe(
            store,
            &m,
            &self.manager.registry().snapshot_children(),
        ))
    }
}

#[tonic::async_trait]
impl SnapshotService for SnapshotApi {
    async fn create_snapshot(
        &self,
        request: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::CreateSnapshotResponse>, GrpcStatus> {
        let plan = create_plan(request.get_ref())?;
        tracing::info!(tag = ?plan.tag, memory_mib = plan.memory_mib, "creating a snapshot");
        // Its own task: a caller that goes away does not leave a sandbox
        // or a WRITING snapshot behind.
        let (manager, snapshots) = (self.manager.clone(), self.snapshots.clone());
        let (manifest, sandbox_id) =
            tokio::spawn(async move { create_snapshot::create(&manager, &snapshots, plan).await })
                .await
                .map_err(|e| ApiError::Internal(format!("create task failed: {e}")))??;
        Ok(Response::new(pb::CreateSnapshotResponse {
            snapshot: Some(self.describe(&manifest.tag)?),
            sandbox_id: sandbox_id.unwrap_or_default(),
        }))
    }

    async fn get_snapshot(
        &self,
        request: Request<pb::GetSnapshotRequest>,
    ) -> Result<Response<pb::GetSnapshotResponse>, GrpcStatus> {
        let tag = &request.get_ref().tag;
        validate::snapshot_tag(tag)?;
        Ok(Response::new(pb::GetSnapshotResponse {
            snapshot: Some(self.describe(tag)?),
        }))
    }

    async fn list_snapshots(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, GrpcStatus> {
        let filter = status_filter(request.get_ref().status)?;
        let store = self.snapshots.store();
        let running = self.manager.registry().snapshot_children();
        let snapshots = store
            .list()
            .iter()
            .filter(|m| filter.is_none_or(|s| m.status == s))
            .map(|m| describe(store, m, &running))
            .collect();
        Ok(Response::new(pb::ListSnapshotsResponse { snapshots }))
    }

    async fn delete_snapshot(
        &self,
        request: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, GrpcStatus> {
        let req = request.into_inner();
        validate::snapshot_tag(&req.tag)?;
        let running = self.manager.registry().snapshot_children();
        let tag = req.tag.clone();
        let deleted = self
            .snapshots
            .blocking(move |s| s.delete(&tag, req.cascade, req.force, &running))
            .await?;
        self.snapshots.forget(&deleted);
        tracing::info!(tag = %req.tag, ?deleted, "snapshots deleted");
        Ok(Response::new(pb::DeleteSnapshotResponse {
            deleted_tags: deleted,
        }))
    }

    type WatchSnapshotStream = ReceiverStream<Result<pb::WatchSnapshotResponse, GrpcStatus>>;

    async fn watch_snapshot(
        &self,
        request: Request<pb::WatchSnapshotRequest>,
    ) -> Result<Response<Self::WatchSnapshotStream>, GrpcStatus> {
        let tag = request.into_inner().tag;
        validate::snapshot_tag(&tag)?;
        // Subscribe before reading the status, so the end of a snapshot
        // being written cannot slip between the two.
        let mut end = self.snapshots.watch_writing(&tag);
        let now = self.snapshots.store().get(&tag).map_err(ApiError::from)?;
        let (tx, rx) = mpsc::channel(4);
        let snapshots = self.snapshots.clone();
        tokio::spawn(async move {
            if tx.send(Ok(watch_message(&now))).await.is_err() || now.status != Status::Writing {
                return;
            }
            let end = match end.as_mut() {
                Some(end) => end
                    .wait_for(Option::is_some)
                    .await
                    .ok()
                    .and_then(|m| m.clone()),
                // Begun but not yet registered as writing: poll.
                None => loop {
                    tokio::time::sleep(WATCH_POLL).await;
                    match snapshots.store().get(&tag) {
                        Ok(m) if m.status == Status::Writing => {}
                        other => break other.ok(),
                    }
                },
            };
            if let Some(m) = end {
                let _ = tx.send(Ok(watch_message(&m))).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
