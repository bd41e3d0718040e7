//! `forkd.v1.SnapshotService`: validates each request and hands it to the
//! snapshot store, the CreateSnapshot flow, or the registry.

use std::sync::Arc;

use forkd_api::v1 as pb;
use forkd_store::{Manifest, Status};
use pb::snapshot_service_server::SnapshotService;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status as GrpcStatus};

use crate::api::error::{ApiError, CancelReason};
use crate::api::sandbox_service::LinuxGuests;
use crate::api::snapshot_view::{describe, status_filter, watch_message};
use crate::api::validate;
use crate::sandbox::lifecycle::Lifecycle;
use crate::snapshot::create::{self, create_plan};
use crate::snapshot::store::{Snapshots, WriteState};

/// How often WatchSnapshot polls a snapshot it cannot subscribe to.
const WATCH_POLL: std::time::Duration = std::time::Duration::from_millis(50);
/// Bound on DeleteSnapshot waiting for a cancelled LIVE copy to end (the
/// copy itself ends within `live_copy::CANCEL_WAIT` plus a kill); past it
/// the store refuses the delete as still writing.
const DELETE_CANCEL_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// The SnapshotService implementation.
#[derive(Debug, Clone)]
pub struct SnapshotApi {
    lifecycle: Arc<Lifecycle>,
    snapshots: Arc<Snapshots>,
    linux: Arc<LinuxGuests>,
}

impl SnapshotApi {
    /// A service over the lifecycle (for sandboxes), the store and the Linux
    /// images (for CreateSnapshot of an image).
    pub fn new(
        lifecycle: Arc<Lifecycle>,
        snapshots: Arc<Snapshots>,
        linux: Arc<LinuxGuests>,
    ) -> SnapshotApi {
        SnapshotApi {
            lifecycle,
            snapshots,
            linux,
        }
    }

    fn describe(&self, tag: &str) -> Result<pb::Snapshot, ApiError> {
        let store = self.snapshots.store();
        let m = store.get(tag)?;
        Ok(describe(
            store,
            &m,
            &self.lifecycle.registry().snapshot_children(),
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
        let (lifecycle, snapshots) = (self.lifecycle.clone(), self.snapshots.clone());
        let linux = self.linux.clone();
        let (manifest, sandbox_id) = tokio::spawn(async move {
            create::create_snapshot(&lifecycle, &snapshots, &linux, plan).await
        })
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
        let running = self.lifecycle.registry().snapshot_children();
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
        // Its own task: once a LIVE copy is cancelled, the delete goes
        // through even if the caller goes away.
        let (lifecycle, snapshots) = (self.lifecycle.clone(), self.snapshots.clone());
        let tag = req.tag.clone();
        let deleted = tokio::spawn(async move {
            // A LIVE snapshot being written: cancel its copy and wait until
            // the branch has recorded it FAILED; then delete it as usual.
            if let Some(mut end) = snapshots.cancel(&tag, CancelReason::Deleted) {
                tracing::info!(%tag, "cancelling the live copy of a snapshot being deleted");
                let ended = end.wait_for(|s| matches!(s, WriteState::Finished { .. }));
                if tokio::time::timeout(DELETE_CANCEL_WAIT, ended)
                    .await
                    .is_err()
                {
                    tracing::warn!(%tag, "live copy did not end after its cancel");
                }
            }
            let running = lifecycle.registry().snapshot_children();
            let t = tag.clone();
            let deleted = snapshots
                .blocking(move |s| s.delete(&t, req.cascade, req.force, &running))
                .await?;
            snapshots.forget(&deleted);
            tracing::info!(%tag, ?deleted, "snapshots deleted");
            Ok::<_, ApiError>(deleted)
        })
        .await
        .map_err(|e| ApiError::Internal(format!("delete task failed: {e}")))??;
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
        let follow = self.snapshots.watch_writing(&tag);
        let now = self.snapshots.store().get(&tag).map_err(ApiError::from)?;
        let (tx, rx) = mpsc::channel(4);
        let snapshots = self.snapshots.clone();
        tokio::spawn(async move {
            let mut watch = Watch {
                tx,
                last: None,
                writing: now,
            };
            watch.run(&snapshots, follow).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// One WatchSnapshot stream: the current status, then changes, then the
/// end.
struct Watch {
    tx: mpsc::Sender<Result<pb::WatchSnapshotResponse, GrpcStatus>>,
    /// The last message sent (only changes are sent).
    last: Option<pb::WatchSnapshotResponse>,
    /// The manifest as first read (WRITING while the snapshot is).
    writing: Manifest,
}

impl Watch {
    /// Sends `msg` unless it repeats the last one; false once the client
    /// is gone.
    async fn send(&mut self, msg: pb::WatchSnapshotResponse) -> bool {
        if self.last.as_ref() == Some(&msg) {
            return true;
        }
        self.last = Some(msg.clone());
        self.tx.send(Ok(msg)).await.is_ok()
    }

    /// Sends the state of the write; true if the stream is to end (final
    /// state sent, or the client is gone).
    async fn send_state(&mut self, state: WriteState) -> bool {
        match state {
            WriteState::Writing(progress) => {
                let msg = watch_message(&self.writing, progress.as_ref());
                !self.send(msg).await
            }
            WriteState::Finished { manifest, progress } => {
                self.send(watch_message(&manifest, progress.as_ref())).await;
                true
            }
        }
    }

    async fn run(
        &mut self,
        snapshots: &Snapshots,
        mut follow: Option<watch::Receiver<WriteState>>,
    ) {
        // The current status at once.
        let first = match &mut follow {
            Some(rx) => rx.borrow_and_update().clone(),
            None if self.writing.status == Status::Writing => WriteState::Writing(None),
            None => WriteState::Finished {
                manifest: Box::new(self.writing.clone()),
                progress: None,
            },
        };
        if self.send_state(first).await {
            return;
        }
        loop {
            match &mut follow {
                Some(rx) => {
                    tokio::select! {
                        changed = rx.changed() => match changed {
                            Ok(()) => {
                                let state = rx.borrow_and_update().clone();
                                if self.send_state(state).await {
                                    return;
                                }
                            }
                            // Ended without a final state: read the store.
                            Err(_) => follow = None,
                        },
                        _ = self.tx.closed() => return,
                    }
                }
                None => {
                    // Begun but not registered as writing yet (or gone):
                    // the store says where it is.
                    match snapshots.store().get(&self.writing.tag) {
                        Ok(m) if m.status == Status::Writing => {}
                        Ok(m) => {
                            self.send(watch_message(&m, None)).await;
                            return;
                        }
                        Err(e) => {
                            let _ = self.tx.send(Err(ApiError::from(e).into())).await;
                            return;
                        }
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(WATCH_POLL) => {}
                        _ = self.tx.closed() => return,
                    }
                    follow = snapshots.watch_writing(&self.writing.tag);
                    if let Some(rx) = &mut follow {
                        let state = rx.borrow_and_update().clone();
                        if self.send_state(state).await {
                            return;
                        }
                    }
                }
            }
        }
    }
}
