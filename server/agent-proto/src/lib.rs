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
//! - [`KIND_DATA`]: the body is `u64 LE exec id | u8 stream | data`: stdin
//!   ([`STREAM_STDIN`], host to guest; empty data = EOF), stdout or stderr
//!   (guest to host). At most [`MAX_DATA`] bytes of data per frame.
//!
//! A body is at most [`MAX_FRAME`] bytes. Encode with [`encode_json`] and
//! [`encode_data`]; decode with [`read_frame`] / [`FrameReader`] from a
//! [`std::io::Read`], or with the push-style [`Decoder`] when bytes arrive in
//! arbitrary chunks.

mod decode;
mod error;
mod frame;
mod msg;

pub use decode::{read_frame, Decoder, FrameReader};
pub use error::ProtoError;
pub use frame::{
    encode_data, encode_json, Frame, DATA_HEADER, KIND_DATA, KIND_JSON, MAX_DATA, MAX_FRAME,
    STREAM_STDERR, STREAM_STDIN, STREAM_STDOUT,
};
pub use msg::{GuestMsg, HostMsg};

#[cfg(test)]
mod tests;
