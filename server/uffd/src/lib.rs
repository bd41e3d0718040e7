//! A point-in-time copy of memory that keeps running: userfaultfd
//! write-protection (UFFD_WP) on a shmem mapping.
//!
//! [`LiveCopy::arm`] registers the range for write-protect faults and
//! protects every page (call it while the writers — vCPUs — are stopped).
//! After that the writers may run again: [`LiveCopy::start`] runs a fault
//! handler thread and a bulk copier that share one state per page, so every
//! page is written to the output exactly once, with the content it had when
//! the copy was armed:
//!
//! - the copier walks the pages it was given, claims each one that no fault
//!   has claimed, writes it out, and lifts the protection of what it copied
//!   in batches;
//! - a write to a page not yet copied blocks in the kernel and reaches the
//!   fault handler, which claims and copies the page first (or waits for the
//!   copier that holds the claim), then lifts that page's protection, which
//!   wakes the writer.
//!
//! When every page is copied, protection is dropped and the handler exits.

mod engine;
mod pages;

pub use engine::{CopyError, LiveCopy, Progress};
pub use pages::PAGE_SIZE;
