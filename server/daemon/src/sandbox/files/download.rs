//! ReadFile: a download streamed to the client, acknowledged to the guest
//! agent only as the client takes it.

use std::sync::Arc;

use forkd_api::v1::{self as pb, read_file_response};
use forkd_control::{Event, Request};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::{event_error, request_error};
use crate::api::error::ApiError;
use crate::sandbox::exec::stopped;
use crate::sandbox::registry::Sandbox;
use crate::vmm::FileEvent;

/// Bytes the agent may send beyond what the daemon acknowledged.
pub const READ_WINDOW: u32 = 2 << 20;
/// Messages buffered towards the client.
pub const STREAM_BUFFER: usize = 4;

/// The response stream of one ReadFile.
pub type ReadStream = ReceiverStream<Result<pb::ReadFileResponse, Status>>;

/// What to read.
#[derive(Debug)]
pub struct Range {
    /// The guest path (validated).
    pub path: String,
    /// First byte.
    pub offset: u64,
    /// Bytes at most; 0 means to the end.
    pub length: u64,
}

/// Starts the download in its own task and returns its response stream.
/// The task ends (and aborts the download in the guest) when the client
/// goes away.
pub fn start(sandbox: Arc<Sandbox>, range: Range) -> ReadStream {
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    tokio::spawn(async move {
        if let Err(e) = run(&sandbox, range, &tx).await {
            tracing::debug!(sandbox = %sandbox.id(), error = %e, "file download failed");
            let _ = tx.send(Err(e.into())).await;
        }
    });
    ReceiverStream::new(rx)
}

async fn run(
    sandbox: &Arc<Sandbox>,
    range: Range,
    out: &mpsc::Sender<Result<pb::ReadFileResponse, Status>>,
) -> Result<(), ApiError> {
    let mut transfer = sandbox
        .vmm
        .start_file_transfer(|id| Request::ReadFile {
            id,
            path: range.path,
            offset: range.offset,
            length: range.length,
            window: READ_WINDOW,
        })
        .map_err(|e| request_error(sandbox, e))?;
    let mut file_size = 0;
    let mut taken: u64 = 0;
    loop {
        let event = tokio::select! {
            event = transfer.next() => event,
            // Gone while the agent is slow to send: stop the transfer.
            _ = out.closed() => return Ok(()),
        };
        match event {
            Some(FileEvent::Data(data)) => {
                let len = data.len() as u64;
                let message = pb::ReadFileResponse {
                    event: Some(read_file_response::Event::Data(data)),
                };
                if out.send(Ok(message)).await.is_err() {
                    return Ok(());
                }
                taken += len;
                transfer.ack(taken);
            }
            Some(FileEvent::Event(Event::FileOpened { size, .. })) => file_size = size,
            Some(FileEvent::Event(Event::FileRead { bytes, sha256, .. })) => {
                let end = pb::ReadFileEnd {
                    size: bytes,
                    sha256,
                    file_size,
                };
                let message = pb::ReadFileResponse {
                    event: Some(read_file_response::Event::End(end)),
                };
                let _ = out.send(Ok(message)).await;
                return Ok(());
            }
            Some(FileEvent::Event(event)) => return Err(event_error(sandbox, event, "ReadFile")),
            None => return Err(stopped(sandbox)),
        }
    }
}
