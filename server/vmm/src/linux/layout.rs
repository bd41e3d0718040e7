//! Where a Linux guest's boot structures, devices and interrupt lines sit
//! in guest physical memory and in the GSI space.

/// GDT with the boot code and data segments.
pub const GDT_ADDR: u64 = 0x500;
/// The "zero page": Linux's `boot_params`.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Identity-mapping page tables: PML4, one PDPT, four page directories.
pub const PML4_ADDR: u64 = 0x9000;
/// The page-directory-pointer table.
pub const PDPT_ADDR: u64 = 0xa000;
/// The first of four page directories (2 MiB pages, 4 GiB mapped).
pub const PD_ADDR: u64 = 0xb000;
/// The kernel command line (NUL-terminated).
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Largest command line we pass, NUL included.
pub const CMDLINE_MAX: usize = 4096;
/// Start of the legacy BIOS area, reserved in the e820 map.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables (RSDP first); Linux also scans here for the RSDP.
pub const ACPI_ADDR: u64 = 0xe0000;
/// End of the ACPI area.
pub const ACPI_END: u64 = 0x100000;
/// Where the kernel's protected-mode part loads, and where RAM above the
/// legacy area starts.
pub const HIGH_RAM_START: u64 = 0x100000;

/// First virtio-mmio device window; each device gets [`MMIO_SLOT_SIZE`].
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio device window.
pub const MMIO_SLOT_SIZE: u64 = 0x1000;
/// Guest RAM must end below the device windows (one memory slot from 0).
pub const RAM_LIMIT: u64 = VIRTIO_MMIO_BASE;
/// The in-kernel IOAPIC.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// The local APICs.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;

/// COM1's I/O ports and interrupt line.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1's GSI (ISA IRQ 4).
pub const COM1_GSI: u32 = 4;
/// The i8042 controller's data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// The i8042 controller's command port (0xfe here resets the machine).
pub const I8042_CMD_PORT: u16 = 0x64;
/// GSI of the first virtio-mmio device; the next ones follow.
pub const VIRTIO_GSI_BASE: u32 = 5;

/// The window of virtio-mmio device `index`.
pub fn virtio_mmio_addr(index: u32) -> u64 {
    VIRTIO_MMIO_BASE + u64::from(index) * MMIO_SLOT_SIZE
}

/// The GSI of virtio-mmio device `index`.
pub fn virtio_gsi(index: u32) -> u32 {
    VIRTIO_GSI_BASE + index
}
