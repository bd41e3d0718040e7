//! The per-page state shared by the fault handler and the copier.

use std::sync::atomic::{AtomicU8, Ordering};

/// Page size of the copy: the snapshot format's page (the host's base
/// page, the unit userfaultfd write-protects).
pub const PAGE_SIZE: usize = forkd_snapshot_format::PAGE_SIZE as usize;

const PENDING: u8 = 0;
const CLAIMED: u8 = 1;
const DONE: u8 = 2;

/// One state per page: pending, claimed (being copied), done.
pub struct PageStates {
    states: Vec<AtomicU8>,
}

impl PageStates {
    /// `pages` pages; those with `needs_copy(i) == false` start done (their
    /// content in the output is already right, e.g. a hole).
    pub fn new(pages: usize, needs_copy: impl Fn(usize) -> bool) -> Self {
        PageStates {
            states: (0..pages)
                .map(|i| AtomicU8::new(if needs_copy(i) { PENDING } else { DONE }))
                .collect(),
        }
    }

    /// Makes page `i` pending again (between copies, nobody claiming).
    pub fn reset(&self, i: usize) {
        self.states[i].store(PENDING, Ordering::Release);
    }

    /// Marks a page that needs no copy done (before anyone claims it).
    pub fn skip(&self, i: usize) {
        self.states[i].store(DONE, Ordering::Release);
    }

    /// Number of pages.
    pub fn len(&self) -> usize {
        self.states.len()
    }

    /// Claims page `i` for copying; false if someone else has or had it.
    pub fn claim(&self, i: usize) -> bool {
        self.states[i]
            .compare_exchange(PENDING, CLAIMED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Marks a claimed page copied.
    pub fn finish(&self, i: usize) {
        self.states[i].store(DONE, Ordering::Release);
    }

    /// Whether page `i` is copied.
    pub fn is_done(&self, i: usize) -> bool {
        self.states[i].load(Ordering::Acquire) == DONE
    }

    /// Waits (spinning, then yielding) until page `i` is copied.
    pub fn wait_done(&self, i: usize) {
        let mut spins = 0u32;
        while !self.is_done(i) {
            if spins < 100 {
                std::hint::spin_loop();
                spins += 1;
            } else {
                std::thread::yield_now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_is_claimed_once() {
        let s = PageStates::new(4, |i| i != 2);
        assert!(s.claim(0));
        assert!(!s.claim(0));
        assert!(!s.claim(2), "pages that need no copy start done");
        assert!(s.is_done(2));
        s.finish(0);
        assert!(s.is_done(0));
        s.wait_done(0);
    }
}
