//! WriteFile: a client-streamed upload relayed to the guest agent within
//! its credit window.

use std::sync::Arc;

use forkd_api::v1::{self as pb, write_file_request::Content};
use forkd_control::{Event, Request, FILE_CHUNK, FILE_WRITE_WINDOW};
use tonic::{Code, Status, Streaming};

use super::reset::BodyReset;
use super::{event_error, request_error};
use crate::api::error::ApiError;
use crate::api::validate;
use crate::sandbox::exec::stopped;
use crate::sandbox::registry::Sandbox;
use crate::vmm::FileEvent;

/// Where and how to write, from the upload's first message.
#[derive(Debug)]
pub struct Target {
    /// The guest path (validated).
    pub path: String,
    /// Permission bits; 0 means 0o644.
    pub mode: u32,
    /// Create missing parent directories.
    pub parents: bool,
    /// Refuse to replace an existing path.
    pub exclusive: bool,
}

/// Reads the upload's first message: the header, validated.
pub async fn header(
    body: &mut Streaming<pb::WriteFileRequest>,
) -> Result<(String, Target), ApiError> {
    let first = body
        .message()
        .await
        .map_err(|s| ApiError::InvalidArgument(format!("reading the upload: {}", s.message())))?;
    let header =
        match first.and_then(|m| m.content) {
            Some(Content::Header(h)) => h,
            Some(Content::Data(_)) => return Err(ApiError::InvalidArgument(
                "the first WriteFile message must be a header (sandbox_id, path); data came first"
                    .into(),
            )),
            None => {
                return Err(ApiError::InvalidArgument(
                    "WriteFile got no header: send one message with `header` (sandbox_id, path) \
                 before the data"
                        .into(),
                ))
            }
        };
    let id = validate::sandbox_id("header.sandbox_id", &header.sandbox_id)?.to_string();
    let path = validate::guest_path("header.path", &header.path)?;
    if path.ends_with('/') {
        return Err(ApiError::InvalidArgument(format!(
            "header.path {} ends with '/': name the file to write",
            crate::api::public::quoted(&path)
        )));
    }
    if header.mode > 0o7777 {
        return Err(ApiError::InvalidArgument(format!(
            "header.mode {:#o} has bits above 0o7777; give permission bits only (e.g. 0o644 = 420)",
            header.mode
        )));
    }
    Ok((
        id,
        Target {
            path,
            mode: header.mode,
            parents: header.make_parents,
            exclusive: header.no_overwrite,
        },
    ))
}

/// Relays the rest of `body` into `target` and returns the agent's
/// confirmation. Returning early (an error, or the caller dropping this
/// future) aborts the upload in the guest: no file under the final name.
/// `reset` tells a body the client reset (it dropped the call) from one it
/// ended: only the latter commits the file.
pub async fn write(
    sandbox: Arc<Sandbox>,
    target: Target,
    mut body: Streaming<pb::WriteFileRequest>,
    reset: BodyReset,
) -> Result<pb::WriteFileResponse, ApiError> {
    let path = target.path.clone();
    let mut transfer = sandbox
        .vmm
        .start_file_transfer(|id| Request::WriteFile {
            id,
            path: target.path,
            mode: target.mode,
            parents: target.parents,
            exclusive: target.exclusive,
        })
        .map_err(|e| request_error(&sandbox, e))?;
    let mut sent: u64 = 0;
    let mut credited: u64 = 0;
    // The client message being relayed, and how much of it is sent.
    let mut pending: Vec<u8> = Vec::new();
    let mut offset = 0;
    let mut client_done = false;
    loop {
        // Relay what the window allows.
        while offset < pending.len() && sent - credited < FILE_WRITE_WINDOW {
            let room = (FILE_WRITE_WINDOW - (sent - credited)) as usize;
            let n = room.min(FILE_CHUNK).min(pending.len() - offset);
            transfer.send_data(&pending[offset..offset + n]);
            offset += n;
            sent += n as u64;
        }
        if offset == pending.len() && !pending.is_empty() {
            pending = Vec::new();
            offset = 0;
        }
        let want_more = pending.is_empty() && !client_done;
        tokio::select! {
            event = transfer.next() => match event {
                Some(FileEvent::Event(Event::FileCredit { bytes, .. })) => {
                    credited = credited.max(bytes.min(sent));
                }
                Some(FileEvent::Event(Event::FileWritten { size, sha256, .. })) if client_done => {
                    tracing::debug!(sandbox = %sandbox.id(), %path, size, "file written");
                    return Ok(pb::WriteFileResponse { path, size, sha256 });
                }
                Some(FileEvent::Event(event)) => return Err(event_error(&sandbox, event, "WriteFile")),
                Some(FileEvent::Data(_)) => {}
                None => return Err(stopped(&sandbox)),
            },
            message = body.message(), if want_more => match message {
                Ok(Some(pb::WriteFileRequest { content: Some(Content::Data(data)) })) => {
                    pending = data;
                }
                Ok(Some(pb::WriteFileRequest { content: Some(Content::Header(_)) })) => {
                    return Err(ApiError::InvalidArgument(
                        "a WriteFile header may only be the first message; later messages carry data"
                            .into(),
                    ));
                }
                Ok(Some(pb::WriteFileRequest { content: None })) => {}
                // tonic ends a reset stream as if the client had ended it.
                Ok(None) if reset.happened() => {
                    tracing::debug!(
                        sandbox = %sandbox.id(), %path, sent, "upload reset by its client"
                    );
                    return Err(cut_off(&path, sent, "the client cancelled the call"));
                }
                Ok(None) => {
                    client_done = true;
                    transfer.finish_data();
                }
                Err(status) => return Err(broken(&path, sent, &status)),
            },
        }
    }
}

/// The error of an upload whose client stream broke: a message over
/// gRPC's size limit (the client's to fix), or a stream cut off.
fn broken(path: &str, sent: u64, status: &Status) -> ApiError {
    if matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted) {
        return ApiError::InvalidArgument(format!(
            "a WriteFile message for {} is too large ({}); send the data in chunks under 4 MiB \
             (1 MiB is a good size); nothing was written under that name",
            crate::api::public::quoted(path),
            status.message()
        ));
    }
    cut_off(path, sent, status.message())
}

/// The error of an upload whose client stream was cut off.
fn cut_off(path: &str, sent: u64, why: &str) -> ApiError {
    ApiError::Cancelled(format!(
        "the upload of {} was cut off after {sent} bytes ({}); nothing was written under that \
         name",
        crate::api::public::quoted(path),
        why
    ))
}
