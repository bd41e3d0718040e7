//! Loading the guest ELF image (linux-loader) and checking it stays inside
//! the image window of the memory map.

use std::io::Cursor;

use forkd_guest_abi as abi;
use linux_loader::loader::{elf::Elf, KernelLoader};

use crate::error::{Result, VmmError};
use crate::memory::GuestRam;

/// The reference guest, built by this crate's build script.
pub const REFERENCE_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/forkd-guest"));

/// Loads `image` and returns its entry point.
pub fn load(ram: &GuestRam, image: &[u8]) -> Result<u64> {
    let window = abi::IMAGE_ADDR..abi::IMAGE_ADDR + abi::IMAGE_MAX_SIZE;
    check_segments(image, &window)?;
    let result = Elf::load(ram.memory(), None, &mut Cursor::new(image), None)
        .map_err(|e| VmmError::Load(e.to_string()))?;
    let entry = result.kernel_load.0;
    if !window.contains(&entry) {
        return Err(VmmError::Load(format!(
            "entry point {entry:#x} is outside the image window {window:#x?}"
        )));
    }
    Ok(entry)
}

/// Checks every loadable segment lies in `window` before anything is written.
fn check_segments(image: &[u8], window: &std::ops::Range<u64>) -> Result<()> {
    let u16_at = |o: usize| {
        image
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u64_at = |o: usize| {
        image
            .get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    let bad = || VmmError::Load("not a 64-bit little-endian ELF executable".into());
    if image.get(..5) != Some(b"\x7fELF\x02") {
        return Err(bad());
    }
    let phoff = u64_at(0x20).ok_or_else(bad)? as usize;
    let phentsize = u16_at(0x36).ok_or_else(bad)? as usize;
    let phnum = u16_at(0x38).ok_or_else(bad)? as usize;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let kind = image.get(ph..ph + 4).ok_or_else(bad)?;
        if kind != [1, 0, 0, 0] {
            continue; // not PT_LOAD
        }
        let paddr = u64_at(ph + 0x18).ok_or_else(bad)?;
        let memsz = u64_at(ph + 0x28).ok_or_else(bad)?;
        let end = paddr.checked_add(memsz).ok_or_else(bad)?;
        if paddr < window.start || end > window.end {
            return Err(VmmError::Load(format!(
                "segment {paddr:#x}..{end:#x} is outside the image window {window:#x?}"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_guest_loads_at_image_address() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let entry = load(&ram, REFERENCE_GUEST).unwrap();
        assert_eq!(entry, abi::IMAGE_ADDR);
    }

    #[test]
    fn rejects_garbage() {
        let ram = GuestRam::new(64 << 20).unwrap();
        assert!(load(&ram, b"not an elf").is_err());
    }
}
