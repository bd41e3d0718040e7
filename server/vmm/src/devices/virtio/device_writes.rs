//! Pages of guest RAM the VMM's devices wrote (used rings, received data).
//! KVM's dirty log sees only the guest's own writes; a DIFF snapshot of a
//! Linux guest must add these (a LIVE copy catches them anyway: device
//! writes go through the same userfaultfd-protected mapping).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use forkd_snapshot_format::{page_count, PAGE_SIZE};

/// A page bitmap, one bit per snapshot page, set from any thread.
#[derive(Clone, Debug)]
pub struct DeviceWrites {
    bits: Arc<Vec<AtomicU64>>,
}

impl DeviceWrites {
    /// A bitmap covering `memory_bytes` of RAM.
    pub fn new(memory_bytes: u64) -> Self {
        let pages = page_count(memory_bytes);
        let words = pages.div_ceil(64) as usize;
        DeviceWrites {
            bits: Arc::new((0..words).map(|_| AtomicU64::new(0)).collect()),
        }
    }

    /// Records a write of `len` bytes at guest address `addr`.
    pub fn mark(&self, addr: u64, len: usize) {
        if len == 0 {
            return;
        }
        let first = addr / PAGE_SIZE;
        let last = (addr + len as u64 - 1) / PAGE_SIZE;
        for page in first..=last {
            if let Some(word) = self.bits.get((page / 64) as usize) {
                word.fetch_or(1 << (page % 64), Ordering::Relaxed);
            }
        }
    }

    /// Returns the bitmap and clears it (for the next epoch).
    pub fn take(&self) -> Vec<u64> {
        self.bits
            .iter()
            .map(|w| w.swap(0, Ordering::Relaxed))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_every_page_a_write_touches() {
        let w = DeviceWrites::new(1 << 20);
        w.mark(4095, 2);
        let bits = w.take();
        assert_eq!(bits[0], 0b11);
        assert!(w.take().iter().all(|b| *b == 0));
    }
}
