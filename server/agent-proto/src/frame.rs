//! Frame layout, limits and encoding.

use serde::{de::DeserializeOwned, Serialize};

use crate::ProtoError;

/// Frame kind: the body is a JSON message.
pub const KIND_JSON: u8 = 1;
/// Frame kind: the body is `u64 LE id | u8 stream | data` (an exec id for
/// stdin/stdout/stderr, a transfer id for [`STREAM_FILE`]).
pub const KIND_DATA: u8 = 2;
/// Largest body (after the kind byte) of any frame.
pub const MAX_FRAME: usize = 1 << 20;
/// Largest data payload of one data frame.
pub const MAX_DATA: usize = 64 * 1024;
/// Bytes of a data frame's body before its data (id and stream).
pub const DATA_HEADER: usize = 9;
/// Data stream: the exec's stdin (host to guest; empty data means EOF).
pub const STREAM_STDIN: u8 = 0;
/// Data stream: the exec's stdout (guest to host).
pub const STREAM_STDOUT: u8 = 1;
/// Data stream: the exec's stderr (guest to host).
pub const STREAM_STDERR: u8 = 2;
/// Data stream: file bytes of a transfer (both directions): an upload's
/// content after [`crate::HostMsg::WriteFile`] (host to guest; empty data
/// ends it) or a download's after [`crate::GuestMsg::FileOpened`].
pub const STREAM_FILE: u8 = 3;
/// Bytes of an upload the host may have sent beyond the last
/// [`crate::GuestMsg::FileCredit`] (16 full data frames: enough to keep a
/// transfer moving across the channel's round trip, small enough to be a
/// fixed cost per upload). The agent fails an upload that overruns it.
pub const FILE_WRITE_WINDOW: u64 = 16 * MAX_DATA as u64;

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// The raw JSON body; parse it with [`Frame::parse_json`] as the message
    /// type of the direction it travels.
    Json(Vec<u8>),
    /// A chunk of an exec's stdin, stdout or stderr, or of a file transfer.
    Data {
        /// Exec id, or transfer id on [`STREAM_FILE`].
        id: u64,
        /// [`STREAM_STDIN`], [`STREAM_STDOUT`], [`STREAM_STDERR`] or [`STREAM_FILE`].
        stream: u8,
        /// The bytes (empty on stdin, or on an upload's file stream, means EOF).
        data: Vec<u8>,
    },
}

impl Frame {
    /// Parses a JSON frame's body as `T` (`HostMsg` or `GuestMsg`); `None` for a data frame.
    pub fn parse_json<T: DeserializeOwned>(&self) -> Option<Result<T, ProtoError>> {
        match self {
            Frame::Json(body) => Some(serde_json::from_slice(body).map_err(ProtoError::from)),
            Frame::Data { .. } => None,
        }
    }

    /// Decodes a frame from its kind byte and body (the length prefix already checked).
    pub(crate) fn from_parts(kind: u8, body: &[u8]) -> Result<Frame, ProtoError> {
        match kind {
            KIND_JSON => Ok(Frame::Json(body.to_vec())),
            KIND_DATA => {
                if body.len() < DATA_HEADER {
                    return Err(ProtoError::ShortData(body.len()));
                }
                let mut id = [0u8; 8];
                id.copy_from_slice(&body[..8]);
                let stream = body[8];
                if stream > STREAM_FILE {
                    return Err(ProtoError::BadStream(stream));
                }
                let data = &body[DATA_HEADER..];
                if data.len() > MAX_DATA {
                    return Err(ProtoError::DataTooLarge(data.len()));
                }
                Ok(Frame::Data {
                    id: u64::from_le_bytes(id),
                    stream,
                    data: data.to_vec(),
                })
            }
            other => Err(ProtoError::BadKind(other)),
        }
    }
}

/// Checks a length prefix: it counts the kind byte plus a body of at most [`MAX_FRAME`].
pub(crate) fn check_len(len: u32) -> Result<usize, ProtoError> {
    let n = len as usize;
    if n == 0 || n > MAX_FRAME + 1 {
        return Err(ProtoError::BadLength(len));
    }
    Ok(n)
}

fn frame(kind: u8, body_len: usize, fill: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + body_len);
    // body_len <= MAX_FRAME, checked by the callers, so this fits in u32.
    out.extend_from_slice(&((body_len + 1) as u32).to_le_bytes());
    out.push(kind);
    fill(&mut out);
    out
}

/// Encodes `msg` (a `HostMsg` or `GuestMsg`) as a whole JSON frame.
pub fn encode_json<T: Serialize>(msg: &T) -> Result<Vec<u8>, ProtoError> {
    let body = serde_json::to_vec(msg)?;
    if body.len() > MAX_FRAME {
        return Err(ProtoError::TooLarge(body.len()));
    }
    Ok(frame(KIND_JSON, body.len(), |out| {
        out.extend_from_slice(&body)
    }))
}

/// Encodes a whole data frame; `data` must be at most [`MAX_DATA`] bytes.
pub fn encode_data(id: u64, stream: u8, data: &[u8]) -> Result<Vec<u8>, ProtoError> {
    if data.len() > MAX_DATA {
        return Err(ProtoError::DataTooLarge(data.len()));
    }
    if stream > STREAM_FILE {
        return Err(ProtoError::BadStream(stream));
    }
    Ok(frame(KIND_DATA, DATA_HEADER + data.len(), |out| {
        out.extend_from_slice(&id.to_le_bytes());
        out.push(stream);
        out.extend_from_slice(data);
    }))
}
