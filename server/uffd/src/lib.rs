//! A point-in-time copy of memory that keeps running: userfaultfd
//! write-protection (UFFD_WP) on a shmem or hugetlb mapping.
//!
//! The copy works in units of the mapping's page size (4 KiB, or 2 MiB for
//! hugetlb, which userfaultfd protects only whole): "page" below means one
//! unit. The caller's bitmaps and page lists are always in 4 KiB pages.
//!
//! The copy has two phases, so that the writers (vCPUs) need to be stopped
//! only briefly:
//!
//! 1. [`LiveCopy::arm`] registers the range and write-protects every page
//!    **while the writers run**. Protecting is the slow part (it walks every
//!    populated page-table entry: tens of ms per GiB), so it happens outside
//!    the pause. Until the instant is fixed, a write fault is let through:
//!    the handler thread lifts that page's protection and remembers it.
//! 2. [`LiveCopy::freeze`], called **while the writers are stopped**, fixes
//!    the instant: it switches the handler to copy-before-write and protects
//!    again every page written since arming (the ones the handler let
//!    through, plus any the caller knows of, e.g. from KVM's dirty log).
//!    From then on memory as it is now is what the copy holds.
//!
//! [`Frozen::start`] then runs the bulk copier alongside the fault handler.
//! They share one state per page, so every page is written to the output
//! exactly once, with its content at the instant:
//!
//! - the copier walks the pages that need copying, claims each one that no
//!   fault has claimed, writes it out, and lifts the protection of what it
//!   copied in batches;
//! - a write to a page not yet copied blocks in the kernel and reaches the
//!   fault handler, which claims and copies the page first (or waits for the
//!   copier that holds the claim), then lifts that page's protection, which
//!   wakes the writer.
//!
//! When every page is copied, protection is dropped and the handler exits.
//! On teardown the handler is stopped before the range is unregistered (so
//! it never serves a fault on an unregistered range), and each fault is
//! served under the phase lock (so a re-arm, which resets every page to
//! pending, cannot land between a fault's claim check and its wait).

mod copier;
mod engine;
mod handler;
mod pages;

pub use engine::{Canceller, CopyError, Frozen, LiveCopy, Progress, RunningCopy};
pub use pages::PAGE_SIZE;
