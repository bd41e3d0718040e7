//! Arming write-protection, the fault handler and the bulk copier.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use userfaultfd::{Event, FeatureFlags, RegisterMode, Uffd, UffdBuilder};

use crate::pages::{PageStates, PAGE_SIZE};

/// Pages the copier copies before lifting their protection in one call.
const UNPROTECT_BATCH: usize = 512;
/// Most pages the copier writes with one `pwrite`.
const WRITE_RUN: usize = 64;

/// Why a live copy failed.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// userfaultfd is missing or lacks write-protect support.
    #[error("userfaultfd write-protect is unavailable: {0}")]
    Unavailable(String),
    /// Registering or protecting the range failed.
    #[error("arming write-protection: {0}")]
    Arm(String),
    /// Writing the output failed.
    #[error("writing page {page} of the copy: {source}")]
    Write {
        /// The page index.
        page: usize,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The fault handler failed.
    #[error("userfaultfd fault handling: {0}")]
    Fault(String),
    /// The copy was cancelled.
    #[error("cancelled")]
    Cancelled,
}

/// Counters of a running copy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Bytes of pages handled so far (copied, or skipped as zero).
    pub bytes_copied: u64,
    /// Bytes to handle in all.
    pub bytes_total: u64,
    /// Write faults served by the handler.
    pub faults_served: u64,
}

struct Shared {
    uffd: Uffd,
    base: usize,
    states: PageStates,
    out: File,
    copied: AtomicU64,
    total: u64,
    faults: AtomicU64,
    cancel: AtomicBool,
    error: Mutex<Option<CopyError>>,
    stop: OwnedFd,
}

// SAFETY: `base` is the address of a mapping the caller of `arm` keeps alive
// for the copy's lifetime (a contract of `arm`); everything else is Sync.
unsafe impl Send for Shared {}
// SAFETY: as above; shared state is atomics, a mutex, and fds.
unsafe impl Sync for Shared {}

impl Shared {
    fn page_ptr(&self, page: usize) -> *mut libc::c_void {
        (self.base + page * PAGE_SIZE) as *mut libc::c_void
    }

    fn page_bytes(&self, first: usize, count: usize) -> &[u8] {
        // SAFETY: pages lie inside the armed mapping, which outlives the
        // copy; reading is allowed under write-protection.
        unsafe { std::slice::from_raw_parts(self.page_ptr(first) as *const u8, count * PAGE_SIZE) }
    }

    /// Writes claimed pages `first..first+count` and marks them done.
    fn copy(&self, first: usize, count: usize) -> Result<(), CopyError> {
        let bytes = self.page_bytes(first, count);
        let mut i = 0;
        while i < count {
            // Skip zero pages: the output is sparse and reads them as zero.
            let page = &bytes[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
            if page.iter().all(|b| *b == 0) {
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < count
                && bytes[j * PAGE_SIZE..(j + 1) * PAGE_SIZE]
                    .iter()
                    .any(|b| *b != 0)
            {
                j += 1;
            }
            self.out
                .write_all_at(
                    &bytes[i * PAGE_SIZE..j * PAGE_SIZE],
                    ((first + i) * PAGE_SIZE) as u64,
                )
                .map_err(|source| CopyError::Write {
                    page: first + i,
                    source,
                })?;
            i = j;
        }
        for p in first..first + count {
            self.states.finish(p);
        }
        self.copied
            .fetch_add((count * PAGE_SIZE) as u64, Ordering::Relaxed);
        Ok(())
    }

    fn unprotect(&self, first: usize, count: usize) -> Result<(), CopyError> {
        self.uffd
            .remove_write_protection(self.page_ptr(first), count * PAGE_SIZE, true)
            .map_err(|e| CopyError::Fault(format!("removing write-protection: {e}")))
    }

    fn fail(&self, error: CopyError) {
        let mut slot = self.error.lock().unwrap_or_else(|e| e.into_inner());
        slot.get_or_insert(error);
        self.cancel.store(true, Ordering::Release);
    }
}

/// A write-protected range, armed and not yet copied.
pub struct LiveCopy {
    shared: Arc<Shared>,
}

/// A copy in progress.
pub struct RunningCopy {
    shared: Arc<Shared>,
    copier: Option<JoinHandle<()>>,
    handler: Option<JoinHandle<()>>,
}

impl LiveCopy {
    /// Registers `len` bytes at `base` for write-protect faults and protects
    /// them. Pages with `needs_copy(i) == false` are already right in `out`
    /// (holes) and are never copied. `out` must be at least `len` bytes.
    ///
    /// # Safety
    /// `base..base+len` must be a page-aligned shmem or anonymous mapping
    /// that stays mapped until the copy ends (`RunningCopy::wait` returns or
    /// the `RunningCopy` is dropped), and nothing may write to it between
    /// this call and `start` other than through write faults the handler
    /// will serve.
    pub unsafe fn arm(
        base: *mut u8,
        len: usize,
        out: File,
        needs_copy: impl Fn(usize) -> bool,
    ) -> Result<LiveCopy, CopyError> {
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .require_features(FeatureFlags::PAGEFAULT_FLAG_WP)
            .create()
            .map_err(|e| CopyError::Unavailable(e.to_string()))?;
        uffd.register_with_mode(base as *mut libc::c_void, len, RegisterMode::WRITE_PROTECT)
            .map_err(|e| CopyError::Arm(format!("UFFDIO_REGISTER (write-protect): {e}")))?;
        uffd.write_protect(base as *mut libc::c_void, len)
            .map_err(|e| CopyError::Arm(format!("UFFDIO_WRITEPROTECT: {e}")))?;
        // SAFETY: eventfd has no memory preconditions; the result is checked.
        let stop = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if stop < 0 {
            return Err(CopyError::Arm(format!(
                "eventfd: {}",
                std::io::Error::last_os_error()
            )));
        }
        let pages = len / PAGE_SIZE;
        let states = PageStates::new(pages, needs_copy);
        let total = (0..pages).filter(|&i| !states.is_done(i)).count() as u64 * PAGE_SIZE as u64;
        Ok(LiveCopy {
            shared: Arc::new(Shared {
                uffd,
                base: base as usize,
                states,
                out,
                copied: AtomicU64::new(0),
                total,
                faults: AtomicU64::new(0),
                cancel: AtomicBool::new(false),
                error: Mutex::new(None),
                // SAFETY: `stop` is a fresh eventfd we own.
                stop: unsafe { OwnedFd::from_raw_fd(stop) },
            }),
        })
    }

    /// Starts the fault handler and the copier.
    pub fn start(self) -> RunningCopy {
        let shared = self.shared;
        let handler = {
            let s = shared.clone();
            std::thread::Builder::new()
                .name("uffd-faults".into())
                .spawn(move || handle_faults(&s))
                .expect("spawning the fault handler")
        };
        let copier = {
            let s = shared.clone();
            std::thread::Builder::new()
                .name("uffd-copier".into())
                .spawn(move || copy_all(&s))
                .expect("spawning the copier")
        };
        RunningCopy {
            shared,
            copier: Some(copier),
            handler: Some(handler),
        }
    }
}

impl RunningCopy {
    /// Current counters.
    pub fn progress(&self) -> Progress {
        progress(&self.shared)
    }

    /// Asks the copy to stop early; `wait` then returns `Cancelled`.
    pub fn cancel(&self) {
        self.shared.cancel.store(true, Ordering::Release);
    }

    /// Waits for the copy to end; protection is lifted either way.
    pub fn wait(mut self) -> Result<Progress, CopyError> {
        self.finish();
        let error = self
            .shared
            .error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        match error {
            Some(e) => Err(e),
            None if self.shared.cancel.load(Ordering::Acquire) => Err(CopyError::Cancelled),
            None => Ok(progress(&self.shared)),
        }
    }

    fn finish(&mut self) {
        if let Some(copier) = self.copier.take() {
            let _ = copier.join();
        }
        // Drop protection over the whole range (this also wakes any writer
        // still blocked, e.g. after a failure), then stop the handler.
        let s = &self.shared;
        let len = s.states.len() * PAGE_SIZE;
        let _ = s.uffd.unregister(s.base as *mut libc::c_void, len);
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a live u64 to our eventfd.
        unsafe {
            libc::write(
                s.stop.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                8,
            )
        };
        if let Some(handler) = self.handler.take() {
            let _ = handler.join();
        }
    }
}

impl Drop for RunningCopy {
    fn drop(&mut self) {
        self.cancel();
        self.finish();
    }
}

fn progress(s: &Shared) -> Progress {
    Progress {
        bytes_copied: s.copied.load(Ordering::Relaxed),
        bytes_total: s.total,
        faults_served: s.faults.load(Ordering::Relaxed),
    }
}

/// The copier: every pending page, in address order.
fn copy_all(s: &Shared) {
    let pages = s.states.len();
    let mut batch_start = 0;
    let mut page = 0;
    while page < pages {
        if s.cancel.load(Ordering::Acquire) {
            return;
        }
        // Claim a run of consecutive pending pages.
        let mut run = 0;
        while page + run < pages && run < WRITE_RUN && s.states.claim(page + run) {
            run += 1;
        }
        if run > 0 {
            if let Err(e) = s.copy(page, run) {
                s.fail(e);
                return;
            }
            page += run;
        } else {
            // Done already, or claimed by the fault handler.
            s.states.wait_done(page);
            page += 1;
        }
        if page - batch_start >= UNPROTECT_BATCH || page == pages {
            if let Err(e) = s.unprotect(batch_start, page - batch_start) {
                s.fail(e);
                return;
            }
            batch_start = page;
        }
    }
}

/// The fault handler: copy-before-write for every write fault.
fn handle_faults(s: &Shared) {
    let mut fds = [
        libc::pollfd {
            fd: s.uffd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: s.stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            s.fail(CopyError::Fault(format!(
                "poll: {}",
                std::io::Error::last_os_error()
            )));
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        loop {
            match s.uffd.read_event() {
                Ok(Some(Event::Pagefault { addr, .. })) => {
                    let page = (addr as usize - s.base) / PAGE_SIZE;
                    if s.states.claim(page) {
                        if let Err(e) = s.copy(page, 1) {
                            // Unblock the writer anyway; the copy is failed.
                            s.fail(e);
                            s.states.finish(page);
                        }
                    } else {
                        s.states.wait_done(page);
                    }
                    s.faults.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = s.unprotect(page, 1) {
                        s.fail(e);
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    s.fail(CopyError::Fault(format!("reading an event: {e}")));
                    return;
                }
            }
        }
    }
}
