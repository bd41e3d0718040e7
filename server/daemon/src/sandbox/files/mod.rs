//! Files in and out of a Linux sandbox: WriteFile (upload), ReadFile
//! (download), StatFile, ListDir and RemoveFile, relayed through the VMM
//! to the guest agent.
//!
//! Transfers are flow-controlled end to end, so the daemon holds a fixed
//! amount of a file whatever its size or the client's speed:
//! - an upload holds one client message (under gRPC's 4 MiB limit) and
//!   keeps at most [`forkd_control::FILE_WRITE_WINDOW`] bytes in flight
//!   beyond the agent's credit; the next message is read only when the
//!   previous one is in the guest;
//! - a download asks the agent for a [`download::READ_WINDOW`] and
//!   acknowledges bytes only once they are handed to the client's stream
//!   (which holds [`download::STREAM_BUFFER`] messages), so a slow reader
//!   stalls the agent rather than filling the daemon.
//!
//! A transfer whose client goes away is aborted in the guest (its
//! `FileTransfer` is dropped), which removes an
//! upload's temporary file: nothing is left under the final name. An
//! upload's client that drops the call resets its stream, which tonic
//! reports as a clean end: [`reset`] tells the two apart.

pub mod download;
pub mod meta;
pub mod reset;
pub mod upload;

use forkd_control::Event;

use crate::api::error::ApiError;
use crate::sandbox::exec::stopped;
use crate::sandbox::registry::Sandbox;
use crate::vmm::RequestError;

/// Checks that `sandbox` can take a file request now.
pub fn check(sandbox: &Sandbox) -> Result<(), ApiError> {
    if !sandbox.vmm.is_linux() {
        return Err(ApiError::NoFiles(sandbox.id().to_string()));
    }
    sandbox.check_exec()
}

/// The error of a failed file event (`FileFailed`, the VMM's `Error`) or
/// of an answer that does not fit the request.
fn event_error(sandbox: &Sandbox, event: Event, request: &str) -> ApiError {
    match event {
        Event::FileFailed { kind, message, .. } => ApiError::File { kind, message },
        Event::Error { message, .. } => ApiError::Vmm {
            id: sandbox.id().to_string(),
            message,
        },
        other => ApiError::Internal(format!("unexpected answer to {request}: {other:?}")),
    }
}

/// The error of a request that got no answer.
fn request_error(sandbox: &Sandbox, err: RequestError) -> ApiError {
    match err {
        RequestError::Stopped(_) => stopped(sandbox),
        RequestError::Refused(message) => ApiError::Vmm {
            id: sandbox.id().to_string(),
            message,
        },
    }
}
