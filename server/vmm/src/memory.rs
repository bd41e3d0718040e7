//! Guest RAM: always a memfd, so it is shmem (shareable, sealable and
//! write-protectable with userfaultfd), mapped into the VMM and handed to KVM
//! as one memory slot at guest physical address 0.
//!
//! A cold-booted VM owns its memfd and maps it shared. A VM restored from a
//! snapshot maps the snapshot's sealed memfd (held by the daemon, shared by
//! every child) private: pages it never writes stay shared with its
//! siblings; a write gives it its own copy.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};

use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::error::{Result, VmmError};

/// The guest's RAM and its host mapping.
pub struct GuestRam {
    memory: GuestMemoryMmap,
    size: u64,
    /// The memfd behind the mapping: our own (shared) or a snapshot's
    /// (private).
    file: File,
    private: bool,
}

impl GuestRam {
    /// Creates `size` bytes of zeroed RAM in a new memfd, mapped shared.
    pub fn new(size: u64) -> Result<Self> {
        let memfd = memfd::MemfdOptions::default()
            .close_on_exec(true)
            .allow_sealing(true)
            .create("forkd-guest-ram")
            .map_err(|e| VmmError::Memory(format!("memfd_create: {e}")))?;
        let file = memfd.into_file();
        file.set_len(size)
            .map_err(|e| VmmError::Memory(format!("sizing memfd to {size} bytes: {e}")))?;
        Self::map(file, size, false)
    }

    /// Maps a snapshot's memfd privately (copy-on-write).
    pub fn from_snapshot(file: File, size: u64) -> Result<Self> {
        check_snapshot_len(&file, size)?;
        Self::map(file, size, true)
    }

    /// Maps a snapshot's memfd privately (copy-on-write) over `reserved`,
    /// address space a standby VM set aside (and gave KVM as its memory
    /// slot) before the snapshot was known.
    pub fn from_snapshot_over(file: File, size: u64, reserved: &Reservation) -> Result<Self> {
        check_snapshot_len(&file, size)?;
        if size != reserved.size {
            return Err(VmmError::Memory(format!(
                "snapshot memory is {size} bytes; this standby VM reserved {}",
                reserved.size
            )));
        }
        let flags = libc::MAP_PRIVATE | libc::MAP_NORESERVE | libc::MAP_FIXED;
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        // SAFETY: MAP_FIXED replaces only our own reservation (`addr`,
        // `size` are exactly its range, which nothing else uses); the file
        // is a live memfd of `size` bytes.
        let mapped = unsafe {
            libc::mmap(
                reserved.addr as *mut libc::c_void,
                size as usize,
                prot,
                flags,
                file.as_raw_fd(),
                0,
            )
        };
        if mapped == libc::MAP_FAILED {
            return Err(VmmError::Memory(format!(
                "mmap of the snapshot over the reserved {size} bytes: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: the range is now a valid mapping of `size` bytes with
        // these protections and flags; it stays mapped for the process's
        // life (the reservation is never unmapped).
        let region =
            unsafe { MmapRegion::<()>::build_raw(mapped as *mut u8, size as usize, prot, flags) }
                .map_err(|e| VmmError::Memory(format!("guest region over the reservation: {e}")))?;
        Self::from_region(region, file, size, true)
    }

    fn map(file: File, size: u64, private: bool) -> Result<Self> {
        let dup = file
            .try_clone()
            .map_err(|e| VmmError::Memory(format!("dup memfd: {e}")))?;
        let sharing = if private {
            libc::MAP_PRIVATE
        } else {
            libc::MAP_SHARED
        };
        let region = MmapRegion::<()>::build(
            Some(FileOffset::new(dup, 0)),
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            sharing | libc::MAP_NORESERVE,
        )
        .map_err(|e| VmmError::Memory(format!("mmap of {size} bytes: {e}")))?;
        Self::from_region(region, file, size, private)
    }

    fn from_region(region: MmapRegion<()>, file: File, size: u64, private: bool) -> Result<Self> {
        let region = GuestRegionMmap::new(region, GuestAddress(0))
            .ok_or_else(|| VmmError::Memory("guest region overflows".into()))?;
        let memory = GuestMemoryMmap::from_regions(vec![region])
            .map_err(|e| VmmError::Memory(format!("guest memory map: {e}")))?;
        Ok(GuestRam {
            memory,
            size,
            file,
            private,
        })
    }

    /// Whether RAM is a private (copy-on-write) view of a snapshot.
    pub fn is_private(&self) -> bool {
        self.private
    }

    /// Byte ranges of the backing memfd that hold data (everything else is
    /// a hole, i.e. zero, and was never written through a shared mapping).
    pub fn backing_data_ranges(&self) -> Result<Vec<(u64, u64)>> {
        data_ranges(&self.file, self.size)
    }

    /// The guest's RAM as host memory, for bulk reads of pages known to be
    /// populated (reading a hole of a shared memfd would allocate it).
    pub fn host_slice(&self, offset: u64, len: usize) -> &[u8] {
        assert!(offset + len as u64 <= self.size, "range outside guest RAM");
        // SAFETY: the mapping covers `size` bytes and lives as long as
        // `self`; the guest may write concurrently, which snapshot code
        // avoids by reading only while the vCPUs are stopped.
        unsafe { std::slice::from_raw_parts((self.host_address() + offset) as *const u8, len) }
    }

    /// The vm-memory view of RAM.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Bytes of RAM.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Host address where guest physical address 0 is mapped.
    pub fn host_address(&self) -> u64 {
        use vm_memory::GuestMemoryBackend;
        self.memory
            .get_host_address(GuestAddress(0))
            .expect("address 0 is always mapped") as u64
    }

    /// Writes a plain `#[repr(C)]` value at `addr`.
    pub fn write_struct<T: Copy>(&self, addr: u64, value: &T) -> Result<()> {
        // SAFETY: `T: Copy` values are plain data; we only read its bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts(value as *const T as *const u8, std::mem::size_of::<T>())
        };
        self.write(addr, bytes)
    }

    /// Writes bytes at `addr`.
    pub fn write(&self, addr: u64, bytes: &[u8]) -> Result<()> {
        self.memory
            .write_slice(bytes, GuestAddress(addr))
            .map_err(|e| {
                VmmError::Memory(format!("write of {} bytes at {addr:#x}: {e}", bytes.len()))
            })
    }

    /// Reads bytes at `addr`.
    pub fn read(&self, addr: u64, bytes: &mut [u8]) -> Result<()> {
        self.memory
            .read_slice(bytes, GuestAddress(addr))
            .map_err(|e| {
                VmmError::Memory(format!("read of {} bytes at {addr:#x}: {e}", bytes.len()))
            })
    }

    /// Reads a little-endian u32 at `addr` (0 if out of range).
    pub fn read_u32(&self, addr: u64) -> u32 {
        self.memory.read_obj(GuestAddress(addr)).unwrap_or(0)
    }

    /// Reads a little-endian u64 at `addr` (0 if out of range).
    pub fn read_u64(&self, addr: u64) -> u64 {
        self.memory.read_obj(GuestAddress(addr)).unwrap_or(0)
    }

    /// Writes a u32 at `addr`.
    pub fn write_u32(&self, addr: u64, value: u32) -> Result<()> {
        self.write(addr, &value.to_le_bytes())
    }
}

/// Checks that a snapshot's memfd is as long as its vmstate says.
fn check_snapshot_len(file: &File, size: u64) -> Result<()> {
    let len = file
        .metadata()
        .map_err(|e| VmmError::Memory(format!("snapshot memory fd: {e}")))?
        .len();
    if len != size {
        return Err(VmmError::Memory(format!(
            "snapshot memory is {len} bytes, its vmstate says {size}"
        )));
    }
    Ok(())
}

/// Address space set aside for guest RAM that is not known yet: mapped
/// `PROT_NONE` (no memory behind it, nothing counted), 2 MiB aligned, and
/// never unmapped; [`GuestRam::from_snapshot_over`] maps RAM over it.
#[derive(Debug)]
pub struct Reservation {
    addr: usize,
    size: u64,
}

/// Alignment of a reservation: a huge page, so RAM mapped over it can use
/// them.
const RESERVATION_ALIGN: usize = 2 << 20;

impl Reservation {
    /// Reserves `size` bytes of address space.
    pub fn new(size: u64) -> Result<Self> {
        let len = size as usize + RESERVATION_ALIGN;
        // SAFETY: a new anonymous PROT_NONE mapping at an address of the
        // kernel's choosing; it touches no existing memory.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(VmmError::Memory(format!(
                "reserving {size} bytes of address space: {}",
                std::io::Error::last_os_error()
            )));
        }
        let addr = (base as usize).next_multiple_of(RESERVATION_ALIGN);
        Ok(Reservation { addr, size })
    }

    /// The reserved range's first address.
    pub fn host_address(&self) -> u64 {
        self.addr as u64
    }

    /// Bytes reserved.
    pub fn size(&self) -> u64 {
        self.size
    }
}

/// The `[start, end)` ranges of `file` (of `size` bytes) that hold data, by
/// SEEK_DATA/SEEK_HOLE.
pub fn data_ranges(file: &File, size: u64) -> Result<Vec<(u64, u64)>> {
    use nix::unistd::{lseek, Whence};
    let mut ranges = Vec::new();
    let mut at: i64 = 0;
    while (at as u64) < size {
        let start = match lseek(file.as_fd(), at, Whence::SeekData) {
            Ok(s) => s,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(VmmError::Memory(format!("SEEK_DATA: {e}"))),
        };
        let end = lseek(file.as_fd(), start, Whence::SeekHole)
            .map_err(|e| VmmError::Memory(format!("SEEK_HOLE: {e}")))?;
        ranges.push((start as u64, (end as u64).min(size)));
        at = end;
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};

    fn memfd(bytes: &[u8], size: u64) -> File {
        let mut file = memfd::MemfdOptions::default()
            .create("memory-test")
            .expect("memfd_create")
            .into_file();
        file.write_all(bytes).unwrap();
        file.set_len(size).unwrap();
        file
    }

    #[test]
    fn a_snapshot_mapped_over_a_reservation_is_copy_on_write() {
        let size = 4 << 20;
        let reserved = Reservation::new(size).unwrap();
        assert_eq!(reserved.host_address() % RESERVATION_ALIGN as u64, 0);
        let file = memfd(b"snapshot", size);
        let mut view = file.try_clone().unwrap();
        let ram = GuestRam::from_snapshot_over(file, size, &reserved).unwrap();
        // Mapped exactly over the reserved range, the snapshot's bytes in it.
        assert_eq!(ram.host_address(), reserved.host_address());
        assert!(ram.is_private());
        let mut got = [0u8; 8];
        ram.read(0, &mut got).unwrap();
        assert_eq!(&got, b"snapshot");
        // The guest's writes stay its own: the memfd keeps the snapshot.
        ram.write(0, b"child!!!").unwrap();
        ram.write(size - 8, b"last8byt").unwrap();
        ram.read(0, &mut got).unwrap();
        assert_eq!(&got, b"child!!!");
        view.rewind().unwrap();
        view.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"snapshot");
    }

    #[test]
    fn a_snapshot_of_another_size_is_refused() {
        let reserved = Reservation::new(4 << 20).unwrap();
        let file = memfd(b"", 2 << 20);
        let err = GuestRam::from_snapshot_over(file, 2 << 20, &reserved)
            .err()
            .expect("a 2 MiB snapshot over a 4 MiB reservation");
        assert!(err.to_string().contains("reserved"), "{err}");
    }
}
