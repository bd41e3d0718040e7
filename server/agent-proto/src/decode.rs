//! Decoding frames: blocking from a reader, or incrementally from pushed chunks.

use std::io::{self, Read};

use crate::frame::{check_len, Frame};
use crate::ProtoError;

/// Reads exactly one frame; `Ok(None)` on a clean end of stream between frames.
///
/// A frame with a bad kind or data header is consumed whole, so the next call
/// reads the following frame; after [`ProtoError::BadLength`] the stream is
/// out of sync.
pub fn read_frame(r: &mut impl Read) -> Result<Option<Frame>, ProtoError> {
    let mut len = [0u8; 4];
    let got = read_full(r, &mut len)?;
    if got == 0 {
        return Ok(None);
    }
    if got < len.len() {
        return Err(ProtoError::Truncated { have: got, want: 4 });
    }
    let n = check_len(u32::from_le_bytes(len))?;
    let mut buf = vec![0u8; n];
    let got = read_full(r, &mut buf)?;
    if got < n {
        return Err(ProtoError::Truncated {
            have: 4 + got,
            want: 4 + n,
        });
    }
    Frame::from_parts(buf[0], &buf[1..]).map(Some)
}

/// Fills `buf` unless the stream ends first; returns how many bytes were read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Reads frames one after another from a byte stream.
pub struct FrameReader<R> {
    inner: R,
}

impl<R: Read> FrameReader<R> {
    /// Wraps a stream positioned at a frame boundary.
    pub fn new(inner: R) -> Self {
        FrameReader { inner }
    }

    /// The next frame; `Ok(None)` at a clean end of stream. See [`read_frame`].
    pub fn read(&mut self) -> Result<Option<Frame>, ProtoError> {
        read_frame(&mut self.inner)
    }

    /// Gives back the stream.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: Read> Iterator for FrameReader<R> {
    type Item = Result<Frame, ProtoError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.read().transpose()
    }
}

/// Push-style decoder for bytes that arrive in arbitrary chunks.
///
/// [`Decoder::push`] appends bytes; [`Decoder::next`] yields each complete
/// frame. A frame with a bad kind or data header yields its error and is
/// skipped; a bad length loses sync, after which every call yields
/// [`ProtoError::Desynced`].
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    start: usize,
    desynced: bool,
}

impl Decoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.desynced {
            return;
        }
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet decoded into a frame.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next complete frame, an error for a bad one, or `None` until more bytes arrive.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Option<Result<Frame, ProtoError>> {
        if self.desynced {
            return Some(Err(ProtoError::Desynced));
        }
        let avail = &self.buf[self.start..];
        if avail.len() < 4 {
            return None;
        }
        let len = u32::from_le_bytes([avail[0], avail[1], avail[2], avail[3]]);
        let n = match check_len(len) {
            Ok(n) => n,
            Err(e) => {
                self.desynced = true;
                self.buf = Vec::new();
                self.start = 0;
                return Some(Err(e));
            }
        };
        if avail.len() < 4 + n {
            return None;
        }
        let frame = Frame::from_parts(avail[4], &avail[5..4 + n]);
        self.start += 4 + n;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        Some(frame)
    }
}
