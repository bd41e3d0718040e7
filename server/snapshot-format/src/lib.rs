//! The snapshot-directory contract: what `forkd-vmm` writes into a snapshot
//! directory, and what the store (`forkd-store`) commits, verifies and
//! assembles from it. Both sides name the files and read the page bitmap
//! through this crate only.
//!
//! ```text
//! <dir>/vmstate             the VMM's vCPU and device state (opaque to the store)
//! <dir>/memory              guest RAM, sparse, the size of RAM: holes are zero pages
//! <dir>/pages               DIFF only: the page bitmap (see below)
//! <dir>/manifest.json       the store's record of the snapshot
//! <dir>/manifest.orig.json  a committed manifest the store later marked FAILED
//! ```
//!
//! The VMM writes `vmstate`, `memory` and `pages` (without fsync) into the
//! directory the daemon names in its Snapshot request; the store writes
//! the manifests. The page bitmap has bit `i % 8` (LSB first) of byte
//! `i / 8` set for every page `i` a diff holds, [`bitmap_bytes`] long; a
//! set bit over a hole of `memory` means a zero page.

/// Name of the store's manifest inside a snapshot directory.
pub const MANIFEST: &str = "manifest.json";
/// A committed snapshot's manifest as it was before the store marked the
/// snapshot FAILED (kept for inspection next to its data).
pub const ORIGINAL_MANIFEST: &str = "manifest.orig.json";
/// The VMM's saved vCPU and device state.
pub const VMSTATE: &str = "vmstate";
/// Guest memory: a sparse file the size of guest RAM.
pub const MEMORY: &str = "memory";
/// A diff's page bitmap.
pub const PAGES: &str = "pages";

/// Page size of snapshots: the unit of diffs, of the page bitmap and of
/// dirty tracking (the host's base page, which KVM's dirty log and
/// userfaultfd write-protection also work in).
pub const PAGE_SIZE: u64 = 4096;

/// Pages of `memory_bytes` of RAM (a partial last page counts).
pub fn page_count(memory_bytes: u64) -> u64 {
    memory_bytes.div_ceil(PAGE_SIZE)
}

/// Bytes of the page bitmap of `memory_bytes` of RAM.
pub fn bitmap_bytes(memory_bytes: u64) -> u64 {
    page_count(memory_bytes).div_ceil(8)
}

/// Whether page `page` is set in a page bitmap (false beyond its end).
pub fn bitmap_has(bitmap: &[u8], page: u64) -> bool {
    usize::try_from(page / 8)
        .ok()
        .and_then(|i| bitmap.get(i))
        .is_some_and(|byte| byte & (1 << (page % 8)) != 0)
}

/// Sets page `page` in a page bitmap.
///
/// # Panics
///
/// If `page` lies beyond the bitmap.
pub fn bitmap_set(bitmap: &mut [u8], page: u64) {
    bitmap[(page / 8) as usize] |= 1 << (page % 8);
}

/// The page bitmap of `memory_bytes` of RAM from a bitmap in 64-bit words
/// (KVM's dirty-log layout: bit `i % 64` of word `i / 64`), which is the
/// same bit order: the words' little-endian bytes, cut or zero-padded to
/// [`bitmap_bytes`].
pub fn bitmap_from_words(words: &[u64], memory_bytes: u64) -> Vec<u8> {
    let len = bitmap_bytes(memory_bytes) as usize;
    let mut bytes: Vec<u8> = words
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .take(len)
        .collect();
    bytes.resize(len, 0);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_sizes_round_up() {
        assert_eq!(page_count(0), 0);
        assert_eq!(page_count(1), 1);
        assert_eq!(page_count(64 << 20), (64 << 20) / 4096);
        assert_eq!(bitmap_bytes(64 << 20), (64 << 20) / 4096 / 8);
        assert_eq!(bitmap_bytes(9 * PAGE_SIZE), 2);
    }

    #[test]
    fn bits_are_lsb_first() {
        let mut bitmap = vec![0u8; 3];
        for page in [0, 7, 8, 23] {
            bitmap_set(&mut bitmap, page);
        }
        assert_eq!(bitmap, [0b1000_0001, 0b0000_0001, 0b1000_0000]);
        assert!(bitmap_has(&bitmap, 23) && !bitmap_has(&bitmap, 22));
        assert!(!bitmap_has(&bitmap, 24) && !bitmap_has(&bitmap, u64::MAX));
    }

    #[test]
    fn words_convert_in_the_same_bit_order() {
        let memory_bytes = 72 * PAGE_SIZE; // 9 bytes of bitmap, 2 words
        let mut words = vec![0u64; 2];
        for page in [0u64, 9, 63, 64, 71] {
            words[(page / 64) as usize] |= 1 << (page % 64);
        }
        words[1] |= 1 << 20; // page 84: beyond RAM, cut off
        let bytes = bitmap_from_words(&words, memory_bytes);
        assert_eq!(bytes.len(), 9);
        let set: Vec<u64> = (0..72).filter(|&p| bitmap_has(&bytes, p)).collect();
        assert_eq!(set, [0, 9, 63, 64, 71]);
        // Fewer words than the bitmap needs: zero-padded.
        assert_eq!(
            bitmap_from_words(&[1], memory_bytes),
            [1, 0, 0, 0, 0, 0, 0, 0, 0]
        );
    }
}
