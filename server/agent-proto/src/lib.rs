//! Wire protocol between `forkd-agent` (PID 1 of a Linux guest) and the VMM.
//!
//! The channel is one byte stream (a virtio-console port). It carries frames:
//!
//! ```text
//! u32 LE len(kind + body) | u8 kind | body
//! ```
//!
//! - [`KIND_JSON`]: the body is one JSON message, [`HostMsg`] (host to guest)
//!   or [`GuestMsg`] (guest to host), tagged by `"type"`.
//! - [`KIND_DATA`]: the body is `u64 LE id | u8 stream | data`: an exec's
//!   stdin ([`STREAM_STDIN`], host to guest; empty data = EOF), stdout or
//!   stderr (guest to host), or a file transfer's bytes ([`STREAM_FILE`],
//!   both directions). At most [`MAX_DATA`] bytes of data per frame.
//!
//! File transfers ([`HostMsg::WriteFile`], [`HostMsg::ReadFile`]) are
//! flow-controlled both ways so that neither side buffers more than a fixed
//! window per transfer: an upload never has more than [`FILE_WRITE_WINDOW`]
//! bytes beyond the agent's cumulative [`GuestMsg::FileCredit`]; a download
//! never more than its `window` beyond the host's cumulative
//! [`HostMsg::FileAck`]. Each transfer ends with exactly one of
//! [`GuestMsg::FileWritten`], [`GuestMsg::FileRead`] or
//! [`GuestMsg::FileFailed`] (unless a forked resume ended its session).
//! Paths must be absolute, non-empty and free of NUL bytes; they are passed
//! to the kernel as given (`..` and `.` components are allowed and resolved
//! by the kernel, nothing is normalised).
//!
//! A body is at most [`MAX_FRAME`] bytes. Encode with [`encode_json`] and
//! [`encode_data`]; decode with [`read_frame`] / [`FrameReader`] from a
//! [`std::io::Read`], or with the push-style [`Decoder`] when bytes arrive in
//! arbitrary chunks.

mod decode;
mod error;
mod file;
mod frame;
mod msg;

pub use decode::{read_frame, Decoder, FrameReader};
pub use error::ProtoError;
pub use file::{FileErrorKind, FileInfo, FileKind};
pub use frame::{
    encode_data, encode_json, Frame, DATA_HEADER, FILE_WRITE_WINDOW, KIND_DATA, KIND_JSON,
    MAX_DATA, MAX_FRAME, STREAM_FILE, STREAM_STDERR, STREAM_STDIN, STREAM_STDOUT,
};
pub use msg::{GuestMsg, HostMsg};

#[cfg(test)]
mod tests;
