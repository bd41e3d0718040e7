//! Errors of encoding and decoding frames.

use std::io;

/// Why a frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The length prefix is 0 or larger than a kind byte plus [`crate::MAX_FRAME`].
    /// The stream is out of sync after this.
    #[error("bad frame length {0} (must be 1..={max})", max = crate::MAX_FRAME + 1)]
    BadLength(u32),
    /// The kind byte is not a known kind; the frame was skipped.
    #[error("unknown frame kind {0}")]
    BadKind(u8),
    /// A data frame's body is shorter than its header.
    #[error("data frame body of {0} bytes is shorter than its {hdr}-byte header", hdr = crate::DATA_HEADER)]
    ShortData(usize),
    /// A data frame names a stream other than stdin, stdout, stderr or file.
    #[error("data frame for unknown stream {0}")]
    BadStream(u8),
    /// A data frame carries more than [`crate::MAX_DATA`] bytes.
    #[error("data frame of {0} bytes exceeds the {max}-byte limit", max = crate::MAX_DATA)]
    DataTooLarge(usize),
    /// An encoded JSON message would exceed [`crate::MAX_FRAME`].
    #[error("message of {0} bytes exceeds the {max}-byte frame limit", max = crate::MAX_FRAME)]
    TooLarge(usize),
    /// A JSON body could not be encoded or parsed as the expected message.
    #[error("bad JSON message: {0}")]
    Json(#[from] serde_json::Error),
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({have} of {want} bytes)")]
    Truncated {
        /// Bytes of the frame that arrived.
        have: usize,
        /// Bytes the frame needs.
        want: usize,
    },
    /// Reading the stream failed.
    #[error("reading frame: {0}")]
    Io(#[from] io::Error),
    /// An earlier framing error made the decoder lose sync; it yields nothing more.
    #[error("decoder lost sync after an earlier bad frame length")]
    Desynced,
}
