//! Command output: buffered in the mailbox's output buffer and handed to
//! the VMM one flush (one exit) at a time.

use core::fmt;

use forkd_guest_abi as abi;

use crate::hw;

/// The output of the running command.
pub struct Output {
    stream: u32,
    len: usize,
}

impl Output {
    /// An empty output.
    pub fn new() -> Self {
        Output {
            stream: abi::stream::STDOUT,
            len: 0,
        }
    }

    fn buffer() -> *mut u8 {
        abi::OUTPUT_ADDR as *mut u8
    }

    /// Appends bytes to `stream`, flushing as the buffer fills.
    pub fn write(&mut self, stream: u32, mut bytes: &[u8]) {
        if stream != self.stream {
            self.flush();
            self.stream = stream;
        }
        while !bytes.is_empty() {
            let room = abi::OUTPUT_SIZE as usize - self.len;
            let n = room.min(bytes.len());
            // SAFETY: the output buffer is identity-mapped guest RAM of
            // OUTPUT_SIZE bytes and `len + n <= OUTPUT_SIZE`.
            unsafe {
                core::ptr::copy_nonoverlapping(bytes.as_ptr(), Self::buffer().add(self.len), n)
            };
            self.len += n;
            bytes = &bytes[n..];
            if self.len == abi::OUTPUT_SIZE as usize {
                self.flush();
            }
        }
    }

    /// Appends `count` bytes produced by `fill` straight into the buffer
    /// (no intermediate copy), flushing as it fills.
    pub fn write_with(&mut self, stream: u32, mut count: usize, fill: impl Fn(&mut [u8])) {
        if stream != self.stream {
            self.flush();
            self.stream = stream;
        }
        while count > 0 {
            let room = abi::OUTPUT_SIZE as usize - self.len;
            let n = room.min(count);
            // SAFETY: as in `write`; the slice covers only buffer bytes not
            // yet handed to the VMM.
            let chunk = unsafe { core::slice::from_raw_parts_mut(Self::buffer().add(self.len), n) };
            fill(chunk);
            self.len += n;
            count -= n;
            if self.len == abi::OUTPUT_SIZE as usize {
                self.flush();
            }
        }
    }

    /// Records the buffered bytes as the pending flush in the mailbox.
    fn publish(&self) {
        let mb = hw::mailbox();
        // SAFETY: mailbox fields are plain words in identity-mapped RAM.
        unsafe {
            core::ptr::write_volatile(core::ptr::addr_of_mut!((*mb).out_stream), self.stream);
            core::ptr::write_volatile(core::ptr::addr_of_mut!((*mb).out_len), self.len as u32);
        }
    }

    /// Hands the buffered bytes to the VMM.
    pub fn flush(&mut self) {
        if self.len == 0 {
            return;
        }
        self.publish();
        hw::ring_store(abi::reg::OUTPUT, 0);
        self.len = 0;
    }

    /// Leaves the buffered bytes (possibly none) pending for the VMM to
    /// take when the request is done: a command's last output costs no
    /// exit of its own.
    pub fn finish(self) {
        self.publish();
    }

    /// A `fmt::Write` view on stdout.
    pub fn stdout(&mut self) -> Stream<'_> {
        Stream {
            out: self,
            stream: abi::stream::STDOUT,
        }
    }

    /// A `fmt::Write` view on stderr.
    pub fn stderr(&mut self) -> Stream<'_> {
        Stream {
            out: self,
            stream: abi::stream::STDERR,
        }
    }
}

/// One stream of an [`Output`], for `write!`.
pub struct Stream<'a> {
    out: &'a mut Output,
    stream: u32,
}

impl fmt::Write for Stream<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.out.write(self.stream, s.as_bytes());
        Ok(())
    }
}
