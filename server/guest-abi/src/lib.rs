//! The contract between `forkd-vmm` and forkd's reference guest.
//!
//! Guest physical memory is identity-mapped, so every address here is both
//! a guest-physical and a guest-virtual address. The guest runs at CPL3;
//! each access to a doorbell register ([`reg`]) is one exit to the VMM.
//!
//! The agent channel is a mailbox in guest RAM: the VMM writes a request
//! there and completes the guest's blocking load of [`reg::WAIT`]; the guest
//! writes output into the mailbox's output buffer and rings [`reg::OUTPUT`],
//! then writes the exit code and rings [`reg::DONE`].
#![no_std]

/// Size of a small page.
pub const PAGE_SIZE: u64 = 4096;

// ---- Memory map -------------------------------------------------------

/// Global descriptor table (one page).
pub const GDT_ADDR: u64 = 0x1000;
/// Interrupt descriptor table (256 gates, one page).
pub const IDT_ADDR: u64 = 0x2000;
/// Task state segment (holds the ring-0 stack for exceptions).
pub const TSS_ADDR: u64 = 0x3000;
/// Exception entry stubs written by the VMM (one page).
pub const EXCEPTION_STUBS_ADDR: u64 = 0x4000;
/// Bytes per exception stub.
pub const EXCEPTION_STUB_SIZE: u64 = 16;
/// [`BootInfo`] for the guest.
pub const BOOT_INFO_ADDR: u64 = 0x5000;
/// Top of the ring-0 stack used while reporting an exception.
pub const RING0_STACK_TOP: u64 = 0xF000;
/// Page tables: the PML4 page; PDPT, page directories and the first page
/// table follow it.
pub const PAGE_TABLES_ADDR: u64 = 0x10000;
/// Bytes reserved for page tables (enough to identity-map 64 GiB plus the
/// doorbell page).
pub const PAGE_TABLES_SIZE: u64 = 0x50000;
/// Where the guest ELF image is linked (2 MiB).
pub const IMAGE_ADDR: u64 = 0x20_0000;
/// Largest guest image, `.bss` included.
pub const IMAGE_MAX_SIZE: u64 = 0x20_0000;
/// Bottom of the per-vCPU user stacks.
pub const STACKS_ADDR: u64 = 0x40_0000;
/// Bytes of stack per vCPU.
pub const STACK_SIZE: u64 = 0x8_0000;
/// Most vCPUs a guest can have.
pub const MAX_VCPUS: u64 = 8;
/// The mailbox (see [`Mailbox`]).
pub const MAILBOX_ADDR: u64 = 0x80_0000;
/// Where request arguments are written (NUL-separated argv).
pub const REQUEST_ADDR: u64 = MAILBOX_ADDR + 0x1000;
/// Largest request payload.
pub const REQUEST_MAX: u64 = 0xF000;
/// The output buffer the guest fills before ringing [`reg::OUTPUT`].
pub const OUTPUT_ADDR: u64 = MAILBOX_ADDR + 0x10_0000;
/// Size of the output buffer.
pub const OUTPUT_SIZE: u64 = 0x10_0000;
/// The ring of pages the `dirty` writer stamps.
pub const RING_ADDR: u64 = 0x100_0000;
/// Most pages in the `dirty` ring.
pub const RING_MAX_PAGES: u64 = 4096;
/// Start of the region `fill` writes (up to the end of RAM).
pub const FILL_ADDR: u64 = 0x200_0000;
/// Smallest guest RAM in MiB (everything above plus room to fill).
pub const MIN_MEMORY_MIB: u32 = 36;
/// Largest guest RAM in MiB (64 GiB); the doorbell page sits right above.
pub const MAX_MEMORY_MIB: u32 = 64 * 1024;

/// Top of vCPU `index`'s user stack.
pub const fn stack_top(index: u64) -> u64 {
    STACKS_ADDR + (index + 1) * STACK_SIZE
}

// ---- Doorbells --------------------------------------------------------

/// The doorbell page: guest-physical memory with no RAM behind it, mapped
/// user-accessible, right above the largest possible RAM. Every 32-bit load
/// or store to one of its registers is one MMIO exit to the VMM. (Port I/O
/// from CPL3 would need IOPL=3, which a PVM host does not grant; MMIO traps
/// the same way on every KVM backend.)
pub const DOORBELL_ADDR: u64 = MAX_MEMORY_MIB as u64 * 1024 * 1024;

/// Doorbell registers (32-bit loads and stores).
pub mod reg {
    use super::DOORBELL_ADDR;

    /// Load, vCPU 0: block until the next request; returns its sequence
    /// number, or 0 when the wait ended without one (the guest then waits
    /// again; the VMM does this to stop a vCPU at a clean point).
    pub const WAIT: u64 = DOORBELL_ADDR;
    /// Store: the request in the mailbox is done (exit code in the
    /// mailbox); `out_len` bytes of `out_stream` still in the output buffer
    /// are its last output.
    pub const DONE: u64 = DOORBELL_ADDR + 0x08;
    /// Store: flush `out_len` bytes of stream `out_stream` from the output
    /// buffer.
    pub const OUTPUT: u64 = DOORBELL_ADDR + 0x10;
    /// Load, vCPU 1 and up: block until vCPU 0 kicks background work;
    /// non-zero when kicked, 0 when the wait ended without a kick.
    pub const BG_WAIT: u64 = DOORBELL_ADDR + 0x18;
    /// Store: wake the background vCPU whose index is the value.
    pub const BG_KICK: u64 = DOORBELL_ADDR + 0x20;
    /// Store: the guest powers off; the value is its exit status.
    pub const SHUTDOWN: u64 = DOORBELL_ADDR + 0x28;
    /// Store: block this vCPU for up to the value in microseconds, so an
    /// idle or paced guest uses no host CPU. It may return early (for
    /// example when the VMM pauses the vCPUs); the guest re-checks its clock.
    pub const SLEEP: u64 = DOORBELL_ADDR + 0x30;
}

/// Port the VMM's CPL0 exception stubs write the vector number to (8-bit
/// `out`; ring 0 may do port I/O on every backend).
pub const PORT_EXCEPTION: u16 = 0xF05;

// ---- Boot info and mailbox ---------------------------------------------

/// Magic in [`BootInfo::magic`] ("FRKDBOOT").
pub const BOOT_MAGIC: u64 = 0x544f_4f42_444b_5246;
/// Magic in [`Mailbox::magic`] ("FRKDMBOX").
pub const MAILBOX_MAGIC: u64 = 0x584f_424d_444b_5246;
/// Version of this contract; bumped on any layout change.
pub const ABI_VERSION: u32 = 1;

/// What the VMM tells the guest at boot, at [`BOOT_INFO_ADDR`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BootInfo {
    /// [`BOOT_MAGIC`].
    pub magic: u64,
    /// [`ABI_VERSION`].
    pub abi_version: u32,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Bytes of guest RAM.
    pub memory_bytes: u64,
    /// TSC frequency in kHz (for `sleep` and rates).
    pub tsc_khz: u64,
}

/// Request kinds in [`Mailbox::op`].
pub mod op {
    /// Answer at once with exit code 0.
    pub const PING: u32 = 1;
    /// Run the builtin named by argv[0].
    pub const EXEC: u32 = 2;
}

/// Output streams in [`Mailbox::out_stream`].
pub mod stream {
    /// Standard output.
    pub const STDOUT: u32 = 1;
    /// Standard error.
    pub const STDERR: u32 = 2;
}

/// The mailbox header at [`MAILBOX_ADDR`]. The VMM writes the request
/// fields and `cancel`; the guest writes the rest.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Mailbox {
    /// [`MAILBOX_MAGIC`], written by the guest once it is up.
    pub magic: u64,
    /// Sequence number of the current request (VMM).
    pub seq: u32,
    /// Request kind, one of [`op`] (VMM).
    pub op: u32,
    /// Bytes of NUL-separated argv at [`REQUEST_ADDR`] (VMM).
    pub request_len: u32,
    /// Non-zero asks the running command to stop (VMM, any time).
    pub cancel: u32,
    /// Exit code of the finished request (guest).
    pub exit_code: i32,
    /// Stream of the pending output flush, one of [`stream`] (guest).
    pub out_stream: u32,
    /// Bytes in the output buffer for this flush (guest).
    pub out_len: u32,
    /// Padding.
    pub _reserved: u32,
    /// TSC ticks the request took inside the guest (guest).
    pub duration_ticks: u64,
}

/// Exit code the guest reports for a command stopped by `cancel`.
pub const EXIT_CANCELLED: i32 = -125;
/// Exit code for bad arguments to a builtin.
pub const EXIT_USAGE: i32 = 2;
/// Exit code for an unknown builtin.
pub const EXIT_UNKNOWN: i32 = 127;
