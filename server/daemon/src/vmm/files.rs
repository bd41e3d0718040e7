//! File requests on a Linux guest's VMM: one route per upload or download,
//! carrying its events and (downloads) its bytes, and the frames that
//! drive a transfer (upload data, acknowledgements, abort).

use std::sync::Arc;

use forkd_control::{encode_file_data, encode_json, Event, Reply, Request, FILE_CHUNK};
use tokio::sync::mpsc;

use super::routes::Sink;
use super::{RequestError, Vmm};
use crate::sync::lock;

/// What a transfer's route carries.
#[derive(Debug)]
pub enum FileEvent {
    /// Bytes of a download, in order.
    Data(Vec<u8>),
    /// An event of the transfer (credit, opened, written, read, failed,
    /// or the VMM's `Error`).
    Event(Event),
}

/// One running upload or download. Dropping it before its last event
/// (the client went away, the handler failed) aborts the transfer in the
/// guest, which removes an upload's temporary file.
pub struct FileTransfer {
    vmm: Arc<Vmm>,
    id: u64,
    events: mpsc::UnboundedReceiver<FileEvent>,
    ended: bool,
}

impl FileTransfer {
    /// The next event or data chunk; `None` when the VMM stopped (its
    /// reason is in [`Vmm::stop`]).
    pub async fn next(&mut self) -> Option<FileEvent> {
        let next = self.events.recv().await;
        match &next {
            Some(FileEvent::Event(event)) if Reply::Transfer.ends_with(event) => self.ended = true,
            None => self.ended = true,
            _ => {}
        }
        next
    }

    /// Sends upload bytes (any length: split into frames here). The caller
    /// keeps within the agent's credit window.
    pub fn send_data(&self, data: &[u8]) {
        for chunk in data.chunks(FILE_CHUNK) {
            let _ = self.vmm.writer.send(encode_file_data(self.id, chunk));
        }
    }

    /// Ends an upload's data: the agent then commits the file.
    pub fn finish_data(&self) {
        let _ = self.vmm.writer.send(encode_file_data(self.id, &[]));
    }

    /// Acknowledges `total` bytes (cumulative) of a download.
    pub fn ack(&self, total: u64) {
        self.vmm.send(&Request::FileAck {
            id: self.id,
            bytes: total,
        });
    }
}

impl Drop for FileTransfer {
    fn drop(&mut self) {
        lock(&self.vmm.routes).remove(self.id);
        if !self.ended {
            tracing::debug!(sandbox = %self.vmm.id, transfer = self.id, "aborting file transfer");
            let _ = self
                .vmm
                .writer
                .send(encode_json(&Request::FileAbort { id: self.id }));
        }
    }
}

impl Vmm {
    /// Starts an upload or download: registers its route, then sends the
    /// request `make` builds from the transfer id.
    pub fn start_file_transfer(
        self: &Arc<Self>,
        make: impl FnOnce(u64) -> Request,
    ) -> Result<FileTransfer, RequestError> {
        let id = self.next_id();
        let (tx, events) = mpsc::unbounded_channel();
        let request = make(id);
        self.open_and_send(&request, Sink::File(tx))
            .map_err(RequestError::Stopped)?;
        Ok(FileTransfer {
            vmm: self.clone(),
            id,
            events,
            ended: false,
        })
    }

    /// A file request answered by one event (stat, list, remove). The
    /// agent's `FileFailed` comes back as the answer; the VMM's `Error` as
    /// [`RequestError::Refused`].
    pub async fn file_call(
        &self,
        make: impl FnOnce(u64) -> Request,
    ) -> Result<Event, RequestError> {
        self.call(make).await
    }
}
