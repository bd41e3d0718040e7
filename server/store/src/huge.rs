//! Writing a hugetlbfs memfd, which takes no `write(2)`: its pages are
//! allocated with `fallocate` (so an empty pool is an error, never a
//! `SIGBUS`) and filled through a shared mapping that reserves nothing.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Bytes per huge page.
pub const HUGE_PAGE: u64 = 2 << 20;

/// A shared, writable mapping of a whole hugetlbfs memfd. Unmapped when
/// dropped (a memfd with a writable shared mapping cannot be sealed).
pub struct HugeMap<'a> {
    file: &'a File,
    addr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory; threads write disjoint ranges (the
// store's chunks are whole huge pages), and `file` is a shared reference.
unsafe impl Send for HugeMap<'_> {}
// SAFETY: as above.
unsafe impl Sync for HugeMap<'_> {}

impl<'a> HugeMap<'a> {
    /// Maps `len` bytes of `file` (a multiple of [`HUGE_PAGE`]).
    pub fn new(file: &'a File, len: u64) -> io::Result<HugeMap<'a>> {
        if !len.is_multiple_of(HUGE_PAGE) || len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{len} bytes is not a whole number of 2 MiB pages"),
            ));
        }
        // SAFETY: a new mapping at an address of the kernel's choosing; the
        // file is a live hugetlbfs memfd of `len` bytes.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(HugeMap {
            file,
            addr: addr as *mut u8,
            len: len as usize,
        })
    }

    /// Writes `bytes` at `offset`, allocating the huge pages under them
    /// first (`ENOSPC` when the pool is empty).
    pub fn write_at(&self, bytes: &[u8], offset: u64) -> io::Result<()> {
        let end = offset + bytes.len() as u64;
        self.check(offset, end)?;
        allocate(self.file, offset, end)?;
        // SAFETY: `offset..end` lies inside the mapping (checked), whose
        // pages now exist; nobody else writes this range.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.addr.add(offset as usize),
                bytes.len(),
            )
        };
        Ok(())
    }

    /// Zeroes `offset..offset+len` where a page holds data (a hole is
    /// zero already and stays a hole).
    pub fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset + len;
        self.check(offset, end)?;
        let mut at = offset;
        while at < end {
            let page_end = ((at / HUGE_PAGE) + 1) * HUGE_PAGE;
            let stop = page_end.min(end);
            if self.is_present(at)? {
                // SAFETY: inside the mapping (checked), over a page that exists.
                unsafe {
                    std::ptr::write_bytes(self.addr.add(at as usize), 0, (stop - at) as usize)
                };
            }
            at = stop;
        }
        Ok(())
    }

    /// Whether the huge page holding `offset` is mapped here (every page
    /// this map wrote is; a huge page is mapped whole, so its first 4 KiB
    /// answers for it).
    fn is_present(&self, offset: u64) -> io::Result<bool> {
        let start = offset / HUGE_PAGE * HUGE_PAGE;
        let mut byte = 0u8;
        // SAFETY: the first 4 KiB of a huge page inside the mapping;
        // `byte` receives mincore's one byte for it.
        let rc = unsafe {
            libc::mincore(
                self.addr.add(start as usize) as *mut libc::c_void,
                4096,
                &mut byte,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(byte & 1 != 0)
    }

    fn check(&self, offset: u64, end: u64) -> io::Result<()> {
        if end > self.len as u64 || offset > end {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bytes {offset}..{end} outside the {}-byte memfd", self.len),
            ));
        }
        Ok(())
    }
}

impl Drop for HugeMap<'_> {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping we made; nothing refers to
        // it after this.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

/// Allocates the huge pages of `file` that cover `offset..end`.
fn allocate(file: &File, offset: u64, end: u64) -> io::Result<()> {
    let start = offset / HUGE_PAGE * HUGE_PAGE;
    let stop = end.div_ceil(HUGE_PAGE) * HUGE_PAGE;
    // SAFETY: fallocate on our own fd with valid arguments.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_KEEP_SIZE,
            start as libc::off_t,
            (stop - start) as libc::off_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
