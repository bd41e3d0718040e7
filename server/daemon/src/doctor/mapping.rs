//! A small `mmap` of a file, unmapped on drop, for the probes that need
//! real memory (a memfd mapped like guest RAM).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// An owned mapping of the start of a file.
#[derive(Debug)]
pub struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    /// Maps `len` bytes of `file` read-write, `MAP_SHARED` when `shared`
    /// (writes reach the file, like a cold VM's RAM) else `MAP_PRIVATE`
    /// (copy-on-write, like a child of a snapshot).
    pub fn new(file: &File, len: usize, shared: bool) -> io::Result<Mapping> {
        let flags = if shared {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE
        };
        // SAFETY: a fresh mapping chosen by the kernel (no fixed address),
        // of an fd that is open for the duration of the call; the result is
        // checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr: ptr.cast(),
            len,
        })
    }

    /// The first byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Writes `value` at `offset` with a volatile store (so it really
    /// touches the page, e.g. to raise a fault).
    pub fn write(&self, offset: usize, value: u8) {
        assert!(offset < self.len, "offset {offset} outside the mapping");
        // SAFETY: in bounds (checked above) of a live read-write mapping.
        unsafe { self.ptr.add(offset).write_volatile(value) }
    }

    /// Reads the byte at `offset`.
    pub fn read(&self, offset: usize) -> u8 {
        assert!(offset < self.len, "offset {offset} outside the mapping");
        // SAFETY: in bounds (checked above) of a live readable mapping.
        unsafe { self.ptr.add(offset).read_volatile() }
    }

    /// Keeps the memory mapped for the rest of the process (for when a
    /// thread that may still touch it could not be joined).
    pub fn leak(self) {
        std::mem::forget(self);
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the range this value mapped; nothing
        // borrows it past the value's life.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}
