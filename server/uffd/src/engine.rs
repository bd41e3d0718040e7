//! Arming, freezing and running a live copy; the state the threads share.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use userfaultfd::{FeatureFlags, RegisterMode, Uffd, UffdBuilder};

use crate::pages::{PageStates, PAGE_SIZE};

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
    /// Bytes actually written to the output (zero pages stay holes).
    pub bytes_written: u64,
    /// Write faults served by copying the page first.
    pub faults_served: u64,
    /// Write faults let through before the instant was fixed.
    pub faults_before_freeze: u64,
}

/// What the fault handler does with a write fault.
pub(crate) enum Phase {
    /// Before the instant: lift the page's protection, remember the page.
    Armed(Vec<usize>),
    /// After: copy the page first.
    Copying,
}

pub(crate) struct Shared {
    pub(crate) uffd: Uffd,
    base: usize,
    /// Bytes per unit: the mapping's page size (4 KiB, or 2 MiB for
    /// hugetlb), the smallest range userfaultfd protects. `states` has one
    /// entry per unit.
    pub(crate) unit: usize,
    pub(crate) states: PageStates,
    pub(crate) phase: Mutex<Phase>,
    out: RwLock<Option<Arc<File>>>,
    copied: AtomicU64,
    written: AtomicU64,
    total: AtomicU64,
    pub(crate) faults: AtomicU64,
    pub(crate) early_faults: AtomicU64,
    pub(crate) cancel: AtomicBool,
    error: Mutex<Option<CopyError>>,
    pub(crate) stop: OwnedFd,
}

// SAFETY: `base` is the address of a mapping the caller of `arm` keeps alive
// for the copy's lifetime (a contract of `arm`); everything else is Sync.
unsafe impl Send for Shared {}
// SAFETY: as above; shared state is atomics, mutexes, and fds.
unsafe impl Sync for Shared {}

impl Shared {
    fn page_ptr(&self, unit: usize) -> *mut libc::c_void {
        (self.base + unit * self.unit) as *mut libc::c_void
    }

    /// Unit index of a faulting address.
    pub(crate) fn page_of(&self, addr: usize) -> usize {
        (addr - self.base) / self.unit
    }

    /// 4 KiB pages per unit.
    fn pages_per_unit(&self) -> usize {
        self.unit / PAGE_SIZE
    }

    fn page_bytes(&self, first: usize, count: usize) -> &[u8] {
        // SAFETY: units lie inside the armed mapping, which outlives the
        // copy; reading is allowed under write-protection.
        unsafe { std::slice::from_raw_parts(self.page_ptr(first) as *const u8, count * self.unit) }
    }

    /// Writes claimed units `first..first+count` and marks them done. Zero
    /// 4 KiB pages inside them stay holes in the output.
    pub(crate) fn copy(&self, first: usize, count: usize) -> Result<(), CopyError> {
        let out = self
            .out
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .expect("pages are copied only after freeze");
        let bytes = self.page_bytes(first, count);
        let is_zero = |i: usize| {
            bytes[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]
                .iter()
                .all(|b| *b == 0)
        };
        let first_page = first * self.pages_per_unit();
        let pages = count * self.pages_per_unit();
        let mut i = 0;
        while i < pages {
            // Zero pages stay holes: the output is sparse and reads them as 0.
            if is_zero(i) {
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < pages && !is_zero(j) {
                j += 1;
            }
            out.write_all_at(
                &bytes[i * PAGE_SIZE..j * PAGE_SIZE],
                ((first_page + i) * PAGE_SIZE) as u64,
            )
            .map_err(|source| CopyError::Write {
                page: first_page + i,
                source,
            })?;
            self.written
                .fetch_add(((j - i) * PAGE_SIZE) as u64, Ordering::Relaxed);
            i = j;
        }
        for p in first..first + count {
            self.states.finish(p);
        }
        self.copied
            .fetch_add((count * self.unit) as u64, Ordering::Relaxed);
        Ok(())
    }

    pub(crate) fn protect(&self, first: usize, count: usize) -> Result<(), CopyError> {
        self.uffd
            .write_protect(self.page_ptr(first), count * self.unit)
            .map_err(|e| CopyError::Arm(format!("UFFDIO_WRITEPROTECT: {e}")))
    }

    pub(crate) fn unprotect(&self, first: usize, count: usize) -> Result<(), CopyError> {
        self.uffd
            .remove_write_protection(self.page_ptr(first), count * self.unit, true)
            .map_err(|e| CopyError::Fault(format!("removing write-protection: {e}")))
    }

    pub(crate) fn fail(&self, error: CopyError) {
        let mut slot = self.error.lock().unwrap_or_else(|e| e.into_inner());
        slot.get_or_insert(error);
        self.cancel.store(true, Ordering::Release);
    }

    pub(crate) fn progress(&self) -> Progress {
        Progress {
            bytes_copied: self.copied.load(Ordering::Relaxed),
            bytes_total: self.total.load(Ordering::Relaxed),
            bytes_written: self.written.load(Ordering::Relaxed),
            faults_served: self.faults.load(Ordering::Relaxed),
            faults_before_freeze: self.early_faults.load(Ordering::Relaxed),
        }
    }
}

/// The fault-handler thread and the teardown every phase shares: stop the
/// handler, then drop protection over the whole range (which wakes any
/// writer still blocked). In that order, the handler never serves a fault
/// on a range that is no longer registered.
struct Handler {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Handler {
    fn stop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        let s = &self.shared;
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a live u64 to our eventfd.
        unsafe {
            libc::write(
                s.stop.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                8,
            )
        };
        let _ = thread.join();
        let _ = s.uffd.unregister(s.page_ptr(0), s.states.len() * s.unit);
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Marks done every 4 KiB page whose `needs_copy` bit is clear (units are
/// pages); returns how many need copying. Word by word: this runs inside
/// the pause, over every page of RAM.
fn mark_skipped_pages(s: &Shared, needs_copy: &[u64]) -> usize {
    let pages = s.states.len();
    let mut needed = 0usize;
    for (w, first) in (0..pages).step_by(64).enumerate() {
        let bits = needs_copy.get(w).copied().unwrap_or(0);
        let count = (pages - first).min(64);
        if count == 64 && bits == u64::MAX {
            needed += 64;
            continue;
        }
        for b in 0..count {
            if bits & (1 << b) != 0 {
                needed += 1;
            } else {
                s.states.skip(first + b);
            }
        }
    }
    needed
}

/// Marks done every unit of several pages none of whose `needs_copy` bits
/// is set; returns how many units need copying.
fn mark_skipped_units(s: &Shared, needs_copy: &[u64]) -> usize {
    let per_unit = s.pages_per_unit();
    let mut needed = 0usize;
    for unit in 0..s.states.len() {
        let first = unit * per_unit;
        if any_bit(needs_copy, first, first + per_unit) {
            needed += 1;
        } else {
            s.states.skip(unit);
        }
    }
    needed
}

/// Whether any bit in `start..end` of `bits` is set (bits past its end
/// are clear).
fn any_bit(bits: &[u64], start: usize, end: usize) -> bool {
    let mut i = start;
    while i < end {
        let word = bits.get(i / 64).copied().unwrap_or(0);
        let from = i % 64;
        let to = (end - (i - from)).min(64);
        let mask = if to - from == 64 {
            u64::MAX
        } else {
            ((1u64 << (to - from)) - 1) << from
        };
        if word & mask != 0 {
            return true;
        }
        i += to - from;
    }
    false
}

/// Protects `pages` (any order, repeats allowed), one call per run.
fn protect_pages(s: &Shared, pages: &mut [usize]) -> Result<(), CopyError> {
    pages.sort_unstable();
    let mut i = 0;
    while i < pages.len() {
        let mut j = i + 1;
        while j < pages.len() && pages[j] <= pages[j - 1] + 1 {
            j += 1;
        }
        s.protect(pages[i], pages[j - 1] - pages[i] + 1)?;
        i = j;
    }
    Ok(())
}

/// A write-protected range whose instant is not fixed yet: writes are let
/// through (and remembered) until [`LiveCopy::freeze`]. Dropping it lifts
/// protection.
pub struct LiveCopy {
    handler: Handler,
}

/// A copy whose instant is fixed; the copier has not started yet (the
/// fault handler already copies before writes). Dropping it cancels.
pub struct Frozen {
    handler: Handler,
}

/// A copy in progress. Dropping it cancels the copy and lifts protection.
pub struct RunningCopy {
    handler: Handler,
    copier: Option<JoinHandle<()>>,
}

/// Cancels a running copy from another thread.
#[derive(Clone)]
pub struct Canceller(Arc<Shared>);

impl Canceller {
    /// Asks the copy to stop early; `wait` then returns `Cancelled`.
    pub fn cancel(&self) {
        self.0.cancel.store(true, Ordering::Release);
    }
}

impl LiveCopy {
    /// Registers `len` bytes at `base` for write-protect faults, protects
    /// them, and starts the fault handler. Writers may run during and after
    /// this call; their writes are let through until [`LiveCopy::freeze`].
    /// `page_size` is the mapping's page size: [`PAGE_SIZE`], or 2 MiB for
    /// a hugetlb mapping, which is then protected, faulted and copied in
    /// 2 MiB units (the arming walk touches one entry per huge page).
    ///
    /// # Safety
    /// `base..base+len` must be a shmem, hugetlb or anonymous mapping with
    /// pages of `page_size`, aligned to it, that stays mapped until the
    /// copy ends (the `LiveCopy`, `Frozen` or `RunningCopy` is dropped, or
    /// `RunningCopy::wait` returns).
    pub unsafe fn arm(base: *mut u8, len: usize, page_size: usize) -> Result<LiveCopy, CopyError> {
        if page_size < PAGE_SIZE
            || !page_size.is_power_of_two()
            || !len.is_multiple_of(page_size)
            || !(base as usize).is_multiple_of(page_size)
        {
            return Err(CopyError::Arm(format!(
                "{len} bytes at {base:p} are not whole pages of {page_size} bytes"
            )));
        }
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .require_features(FeatureFlags::PAGEFAULT_FLAG_WP)
            .create()
            .map_err(|e| CopyError::Unavailable(e.to_string()))?;
        // SAFETY: eventfd has no memory preconditions; the result is checked.
        let stop = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if stop < 0 {
            return Err(CopyError::Arm(format!(
                "eventfd: {}",
                std::io::Error::last_os_error()
            )));
        }
        let shared = Arc::new(Shared {
            uffd,
            base: base as usize,
            unit: page_size,
            states: PageStates::new(len / page_size, |_| true),
            phase: Mutex::new(Phase::Armed(Vec::new())),
            out: RwLock::new(None),
            copied: AtomicU64::new(0),
            written: AtomicU64::new(0),
            total: AtomicU64::new(0),
            faults: AtomicU64::new(0),
            early_faults: AtomicU64::new(0),
            cancel: AtomicBool::new(false),
            error: Mutex::new(None),
            // SAFETY: `stop` is a fresh eventfd we own.
            stop: unsafe { OwnedFd::from_raw_fd(stop) },
        });
        shared
            .uffd
            .register_with_mode(base as *mut libc::c_void, len, RegisterMode::WRITE_PROTECT)
            .map_err(|e| CopyError::Arm(format!("UFFDIO_REGISTER (write-protect): {e}")))?;
        // The handler runs before protection goes on: writers that hit a
        // protected page while the rest is being protected are let through.
        let thread = {
            let s = shared.clone();
            std::thread::Builder::new()
                .name("uffd-faults".into())
                .spawn(move || crate::handler::handle_faults(&s))
                .map_err(|e| CopyError::Arm(format!("spawning the fault handler: {e}")))?
        };
        let handler = Handler {
            shared: shared.clone(),
            thread: Some(thread),
        };
        shared.protect(0, len / page_size)?;
        Ok(LiveCopy { handler })
    }

    /// Fixes the instant. Call it with every writer stopped: from now on
    /// the copy holds memory exactly as it is. `out` receives the pages (at
    /// their own offsets; it must be at least the range's size and hold
    /// zeros, e.g. a new sparse file). `needs_copy` has one bit per 4 KiB
    /// page (bit `i % 64` of word `i / 64`); a unit whose pages' bits are
    /// all clear is right in `out` already (holes) and is never copied.
    /// `written_since_arm` lists 4 KiB pages written since `arm` that this
    /// copy could not have seen fault (e.g. pages that had no page-table
    /// entry yet, from KVM's dirty log); their units are protected again,
    /// like every unit whose fault was let through.
    pub fn freeze(
        self,
        out: File,
        needs_copy: &[u64],
        written_since_arm: impl IntoIterator<Item = usize>,
    ) -> Result<Frozen, CopyError> {
        let s = self.handler.shared.clone();
        let units = s.states.len();
        let needed = if s.pages_per_unit() == 1 {
            mark_skipped_pages(&s, needs_copy)
        } else {
            mark_skipped_units(&s, needs_copy)
        };
        s.total.store((needed * s.unit) as u64, Ordering::Relaxed);
        // A new copy (after `wait_and_rearm`, the old one's flags remain).
        s.cancel.store(false, Ordering::Release);
        *s.out.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(out));
        let let_through = {
            let mut phase = s.phase.lock().unwrap_or_else(|e| e.into_inner());
            match std::mem::replace(&mut *phase, Phase::Copying) {
                Phase::Armed(pages) => pages,
                Phase::Copying => Vec::new(),
            }
        };
        let per_unit = s.pages_per_unit();
        let mut again: Vec<usize> = let_through
            .into_iter()
            .chain(written_since_arm.into_iter().map(|p| p / per_unit))
            .filter(|&u| u < units && !s.states.is_done(u))
            .collect();
        protect_pages(&s, &mut again)?;
        Ok(Frozen {
            handler: self.handler,
        })
    }

    /// Counters so far (only the let-through faults move before freeze).
    pub fn progress(&self) -> Progress {
        self.handler.shared.progress()
    }

    /// Units (pages of the mapping's page size) let through since arming
    /// (or since the last [`LiveCopy::protect_let_through`]).
    pub fn let_through(&self) -> usize {
        match &*self
            .handler
            .shared
            .phase
            .lock()
            .unwrap_or_else(|e| e.into_inner())
        {
            Phase::Armed(pages) => pages.len(),
            Phase::Copying => 0,
        }
    }

    /// Protects again, while writers run, the pages let through so far, so
    /// that [`LiveCopy::freeze`] has only what is written after this to
    /// protect inside the pause. Pages written during this call are let
    /// through again (and remembered).
    pub fn protect_let_through(&self) -> Result<(), CopyError> {
        self.protect_let_through_and(std::iter::empty())
    }

    /// Like [`LiveCopy::protect_let_through`], and also protects `also`
    /// (4 KiB pages, e.g. ones a dirty log saw written since arming).
    pub fn protect_let_through_and(
        &self,
        also: impl IntoIterator<Item = usize>,
    ) -> Result<(), CopyError> {
        let s = &self.handler.shared;
        let mut pages = match &mut *s.phase.lock().unwrap_or_else(|e| e.into_inner()) {
            Phase::Armed(pages) => std::mem::take(pages),
            Phase::Copying => return Ok(()),
        };
        let total = s.states.len();
        let per_unit = s.pages_per_unit();
        pages.extend(
            also.into_iter()
                .map(|p| p / per_unit)
                .filter(|&u| u < total),
        );
        protect_pages(s, &mut pages)
    }
}

impl Frozen {
    /// Starts the bulk copier; `rate` limits it to that many bytes per
    /// second of memory handled (0: no limit). Faults are served at once
    /// whatever the limit.
    pub fn start(self, rate: u64) -> RunningCopy {
        let s = self.handler.shared.clone();
        let copier = std::thread::Builder::new()
            .name("uffd-copier".into())
            .spawn(move || crate::copier::copy_all(&s, rate));
        match copier {
            Ok(copier) => RunningCopy {
                handler: self.handler,
                copier: Some(copier),
            },
            Err(e) => {
                self.handler
                    .shared
                    .fail(CopyError::Fault(format!("spawning the copier: {e}")));
                RunningCopy {
                    handler: self.handler,
                    copier: None,
                }
            }
        }
    }

    /// Counters so far.
    pub fn progress(&self) -> Progress {
        self.handler.shared.progress()
    }
}

impl RunningCopy {
    /// Current counters.
    pub fn progress(&self) -> Progress {
        self.handler.shared.progress()
    }

    /// A handle that cancels this copy from elsewhere.
    pub fn canceller(&self) -> Canceller {
        Canceller(self.handler.shared.clone())
    }

    /// Asks the copy to stop early; `wait` then returns `Cancelled`.
    pub fn cancel(&self) {
        self.handler.shared.cancel.store(true, Ordering::Release);
    }

    /// Whether the copier has ended (`wait` will not block long).
    pub fn is_finished(&self) -> bool {
        self.copier.as_ref().is_none_or(|c| c.is_finished())
    }

    /// Waits for the copy to end; protection is lifted either way.
    pub fn wait(mut self) -> Result<Progress, CopyError> {
        self.finish();
        let s = &self.handler.shared;
        let error = s.error.lock().unwrap_or_else(|e| e.into_inner()).take();
        match error {
            Some(e) => Err(e),
            None if s.cancel.load(Ordering::Acquire) => Err(CopyError::Cancelled),
            None => Ok(s.progress()),
        }
    }

    fn finish(&mut self) {
        if let Some(copier) = self.copier.take() {
            let _ = copier.join();
        }
        self.handler.stop();
    }

    /// Waits for the copy to end and, if it succeeded, arms protection
    /// again for the next copy instead of dropping it (the registration and
    /// the handler stay): every page is protected while writers run, and
    /// writes are let through until the next [`LiveCopy::freeze`]. Costs
    /// the arming walk here, in the background, instead of in the next
    /// copy's request; the writers pay one let-through fault per page they
    /// write before then. On failure or cancel, protection is dropped and
    /// `None` comes back with the error.
    pub fn wait_and_rearm(mut self) -> (Result<Progress, CopyError>, Option<LiveCopy>) {
        if let Some(copier) = self.copier.take() {
            let _ = copier.join();
        }
        let s = self.handler.shared.clone();
        let error = s.error.lock().unwrap_or_else(|e| e.into_inner()).take();
        let result = match error {
            Some(e) => Err(e),
            None if s.cancel.load(Ordering::Acquire) => Err(CopyError::Cancelled),
            None => Ok(s.progress()),
        };
        if result.is_err() {
            self.handler.stop();
            return (result, None);
        }
        // The copy is complete: every page is done and unprotected. Reset
        // for the next one, let writes through from now on, then protect.
        {
            let mut phase = s.phase.lock().unwrap_or_else(|e| e.into_inner());
            for i in 0..s.states.len() {
                s.states.reset(i);
            }
            for counter in [&s.copied, &s.written, &s.total, &s.faults, &s.early_faults] {
                counter.store(0, Ordering::Relaxed);
            }
            *s.out.write().unwrap_or_else(|e| e.into_inner()) = None;
            *phase = Phase::Armed(Vec::new());
        }
        // Take the handler out of `self` (whose Drop would stop it).
        let handler = Handler {
            shared: s.clone(),
            thread: self.handler.thread.take(),
        };
        match s.protect(0, s.states.len()) {
            Ok(()) => (result, Some(LiveCopy { handler })),
            Err(e) => {
                drop(handler);
                (Err(e), None)
            }
        }
    }
}

impl Drop for RunningCopy {
    fn drop(&mut self) {
        self.cancel();
        self.finish();
    }
}
