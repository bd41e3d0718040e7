//! Guest RAM: always a memfd, so it is shmem (shareable, sealable and
//! write-protectable with userfaultfd), mapped into the VMM and handed to KVM
//! as one memory slot at guest physical address 0.
//!
//! A cold-booted VM owns its memfd and maps it shared. A VM restored from a
//! snapshot maps the snapshot's sealed memfd (held by the daemon, shared by
//! every child) private: pages it never writes stay shared with its
//! siblings; a write gives it its own copy.
//!
//! RAM is 4 KiB pages of shmem, or (`--huge-pages`) 2 MiB pages of a
//! hugetlb memfd from the host's pool (`vm.nr_hugepages`). A snapshot's
//! memfd says which it is (hugetlbfs), and a child's copy-on-write unit is
//! that page.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};

use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::error::{Result, VmmError};

/// The size of the pages behind guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageSize {
    /// 4 KiB pages of shmem.
    Base,
    /// 2 MiB pages of hugetlbfs.
    Huge,
}

impl PageSize {
    /// Bytes per page.
    pub const fn bytes(self) -> u64 {
        match self {
            PageSize::Base => 4 << 10,
            PageSize::Huge => 2 << 20,
        }
    }

    /// The page size of the memfd `file`: huge if it lives on hugetlbfs.
    pub fn of(file: &File) -> Result<PageSize> {
        let fs = nix::sys::statfs::fstatfs(file)
            .map_err(|e| VmmError::Memory(format!("fstatfs of the memory fd: {e}")))?;
        Ok(
            if fs.filesystem_type() == nix::sys::statfs::HUGETLBFS_MAGIC {
                PageSize::Huge
            } else {
                PageSize::Base
            },
        )
    }
}

/// The guest's RAM and its host mapping.
pub struct GuestRam {
    memory: GuestMemoryMmap,
    size: u64,
    /// The memfd behind the mapping: our own (shared) or a snapshot's
    /// (private).
    file: File,
    private: bool,
    page_size: PageSize,
}

impl GuestRam {
    /// Creates `size` bytes of zeroed RAM in a new memfd, mapped shared.
    pub fn new(size: u64) -> Result<Self> {
        Self::with_page_size(size, PageSize::Base)
    }

    /// Creates `size` bytes of zeroed RAM of `page_size` pages, mapped
    /// shared. Huge pages are taken from the host's pool when mapped (not
    /// on first touch), so a pool too small fails here, not in the guest.
    pub fn with_page_size(size: u64, page_size: PageSize) -> Result<Self> {
        if !size.is_multiple_of(page_size.bytes()) {
            return Err(VmmError::Config(format!(
                "guest RAM of {size} bytes is not a whole number of {} KiB pages",
                page_size.bytes() >> 10
            )));
        }
        let options = memfd::MemfdOptions::default()
            .close_on_exec(true)
            .allow_sealing(true);
        let options = match page_size {
            PageSize::Base => options,
            PageSize::Huge => options.hugetlb(Some(memfd::HugetlbSize::Huge2MB)),
        };
        let memfd = options
            .create("forkd-guest-ram")
            .map_err(|e| VmmError::Memory(format!("memfd_create: {e}")))?;
        let file = memfd.into_file();
        file.set_len(size)
            .map_err(|e| VmmError::Memory(format!("sizing memfd to {size} bytes: {e}")))?;
        Self::map(file, size, false, page_size)
    }

    /// Maps a snapshot's memfd privately (copy-on-write).
    pub fn from_snapshot(file: File, size: u64) -> Result<Self> {
        check_snapshot_len(&file, size)?;
        let page_size = PageSize::of(&file)?;
        Self::map(file, size, true, page_size)
    }

    /// Maps a snapshot's memfd privately (copy-on-write) over `reserved`,
    /// address space a standby VM set aside (and gave KVM as its memory
    /// slot) before the snapshot was known.
    pub fn from_snapshot_over(file: File, size: u64, reserved: &Reservation) -> Result<Self> {
        check_snapshot_len(&file, size)?;
        let page_size = PageSize::of(&file)?;
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
        Self::from_region(region, file, size, true, page_size)
    }

    fn map(file: File, size: u64, private: bool, page_size: PageSize) -> Result<Self> {
        let dup = file
            .try_clone()
            .map_err(|e| VmmError::Memory(format!("dup memfd: {e}")))?;
        // A private view never reserves: its copy-on-write pages are taken
        // as the guest writes. Shared huge pages are reserved now, so an
        // empty pool fails here rather than as a fault inside the guest.
        let flags = match (private, page_size) {
            (true, _) => libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            (false, PageSize::Base) => libc::MAP_SHARED | libc::MAP_NORESERVE,
            (false, PageSize::Huge) => libc::MAP_SHARED,
        };
        let region = MmapRegion::<()>::build(
            Some(FileOffset::new(dup, 0)),
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
        )
        .map_err(|e| match (e, page_size) {
            (vm_memory::mmap::MmapRegionError::Mmap(io), PageSize::Huge)
                if io.raw_os_error() == Some(libc::ENOMEM) =>
            {
                VmmError::HugePagesExhausted { mib: size >> 20 }
            }
            (e, _) => VmmError::Memory(format!("mmap of {size} bytes: {e}")),
        })?;
        Self::from_region(region, file, size, private, page_size)
    }

    fn from_region(
        region: MmapRegion<()>,
        file: File,
        size: u64,
        private: bool,
        page_size: PageSize,
    ) -> Result<Self> {
        let region = GuestRegionMmap::new(region, GuestAddress(0))
            .ok_or_else(|| VmmError::Memory("guest region overflows".into()))?;
        let memory = GuestMemoryMmap::from_regions(vec![region])
            .map_err(|e| VmmError::Memory(format!("guest memory map: {e}")))?;
        Ok(GuestRam {
            memory,
            size,
            file,
            private,
            page_size,
        })
    }

    /// Whether RAM is a private (copy-on-write) view of a snapshot.
    pub fn is_private(&self) -> bool {
        self.private
    }

    /// The size of the pages behind RAM.
    pub fn page_size(&self) -> PageSize {
        self.page_size
    }

    /// Byte ranges of the backing memfd that may hold data (everything
    /// else is zero, and was never written through a shared mapping).
    ///
    /// hugetlbfs has no SEEK_DATA (it reports the whole file as data), and
    /// reading a hole through a mapping would take a huge page for it. Our
    /// own huge RAM is asked with `mincore` (a page is there once mapped
    /// in this process, which every writer's access does); a snapshot's
    /// is read with `pread` (holes read as zeros without being allocated)
    /// and its non-zero pages kept: one read of the whole memfd, paid on
    /// a child's first snapshot, not at its start.
    pub fn backing_data_ranges(&self) -> Result<Vec<(u64, u64)>> {
        match (self.page_size, self.private) {
            (PageSize::Base, _) => data_ranges(&self.file, self.size),
            (PageSize::Huge, false) => self.resident_ranges(),
            (PageSize::Huge, true) => nonzero_ranges(&self.file, self.size),
        }
    }

    /// Ranges of RAM mapped in this process, in huge pages: one `mincore`
    /// of the first 4 KiB of each (a huge page is mapped whole), far
    /// cheaper than one call over all of RAM, which fills a byte per 4 KiB.
    fn resident_ranges(&self) -> Result<Vec<(u64, u64)>> {
        let huge = PageSize::Huge.bytes();
        let base = PageSize::Base.bytes();
        let mut present = Vec::with_capacity((self.size / huge) as usize);
        for offset in (0..self.size).step_by(huge as usize) {
            let mut byte = 0u8;
            // SAFETY: one 4 KiB page inside our mapping of `size` bytes;
            // `byte` receives mincore's one byte for it.
            let rc = unsafe {
                libc::mincore(
                    (self.host_address() + offset) as *mut libc::c_void,
                    base as usize,
                    &mut byte,
                )
            };
            if rc != 0 {
                return Err(VmmError::Memory(format!(
                    "mincore over guest RAM at {offset}: {}",
                    std::io::Error::last_os_error()
                )));
            }
            present.push(byte & 1 != 0);
        }
        Ok(runs(present.into_iter(), huge, self.size))
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

/// Coalesces per-unit flags (`true`: may hold data) into `[start, end)`
/// byte ranges, each unit `unit` bytes, clipped to `size`.
fn runs(flags: impl Iterator<Item = bool>, unit: u64, size: u64) -> Vec<(u64, u64)> {
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for (i, data) in flags.enumerate() {
        if !data {
            continue;
        }
        let start = i as u64 * unit;
        let end = (start + unit).min(size);
        match ranges.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => ranges.push((start, end)),
        }
    }
    ranges
}

/// The 4 KiB pages of `file` (of `size` bytes) that are not zero, read
/// with `pread` a huge page at a time, as `[start, end)` ranges.
fn nonzero_ranges(file: &File, size: u64) -> Result<Vec<(u64, u64)>> {
    use std::os::unix::fs::FileExt;
    let chunk = PageSize::Huge.bytes() as usize;
    let page = PageSize::Base.bytes() as usize;
    let mut buf = vec![0u8; chunk];
    let mut flags = Vec::with_capacity((size / page as u64) as usize);
    let mut at = 0u64;
    while at < size {
        let len = chunk.min((size - at) as usize);
        file.read_exact_at(&mut buf[..len], at)
            .map_err(|e| VmmError::Memory(format!("reading snapshot memory at {at}: {e}")))?;
        flags.extend(buf[..len].chunks(page).map(|p| p.iter().any(|&b| b != 0)));
        at += len as u64;
    }
    Ok(runs(flags.into_iter(), page as u64, size))
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
    fn nonzero_ranges_are_the_pages_with_data() {
        use std::os::unix::fs::FileExt;
        let size: u64 = 4 << 20;
        let file = memfd(b"", size);
        for (offset, byte) in [(5 * 4096 + 7, b"x"), (6 * 4096, b"y"), (size - 1, b"z")] {
            file.write_all_at(byte, offset).unwrap();
        }
        let want = vec![(5 * 4096, 7 * 4096), (size - 4096, size)];
        assert_eq!(nonzero_ranges(&file, size).unwrap(), want);
    }

    #[test]
    fn huge_ram_is_on_hugetlbfs_when_the_pool_has_pages() {
        // Whether the host's pool has two free pages is not this test's to
        // set; without them the mapping must fail with the typed error.
        match GuestRam::with_page_size(4 << 20, PageSize::Huge) {
            Ok(ram) => {
                assert_eq!(PageSize::of(&ram.file).unwrap(), PageSize::Huge);
                assert_eq!(ram.backing_data_ranges().unwrap(), vec![]);
                ram.write(3 << 20, b"data").unwrap();
                assert_eq!(ram.backing_data_ranges().unwrap(), vec![(2 << 20, 4 << 20)]);
            }
            Err(e) => assert!(matches!(e, VmmError::HugePagesExhausted { mib: 4 }), "{e}"),
        }
        let odd = GuestRam::with_page_size(3 << 20, PageSize::Huge)
            .err()
            .expect("3 MiB");
        assert!(
            odd.to_string().contains("whole number of 2048 KiB pages"),
            "{odd}"
        );
        let base = GuestRam::new(4 << 20).unwrap();
        assert_eq!(PageSize::of(&base.file).unwrap(), PageSize::Base);
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
