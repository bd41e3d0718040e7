//! Guest RAM: always a memfd, so it is shmem (shareable, sealable and
//! write-protectable with userfaultfd), mapped into the VMM and handed to KVM
//! as one memory slot at guest physical address 0.

use std::fs::File;

use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::error::{Result, VmmError};

/// The guest's RAM and its host mapping.
pub struct GuestRam {
    memory: GuestMemoryMmap,
    size: u64,
    /// Kept so the memory can be passed on (e.g. to a snapshot writer).
    #[allow(dead_code)]
    file: File,
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
        let dup = file
            .try_clone()
            .map_err(|e| VmmError::Memory(format!("dup memfd: {e}")))?;
        let region = MmapRegion::<()>::build(
            Some(FileOffset::new(dup, 0)),
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
        )
        .map_err(|e| VmmError::Memory(format!("mmap of {size} bytes: {e}")))?;
        let region = GuestRegionMmap::new(region, GuestAddress(0))
            .ok_or_else(|| VmmError::Memory("guest region overflows".into()))?;
        let memory = GuestMemoryMmap::from_regions(vec![region])
            .map_err(|e| VmmError::Memory(format!("guest memory map: {e}")))?;
        Ok(GuestRam { memory, size, file })
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
