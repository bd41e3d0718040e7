//! The contract between `forkd-vmm` and forkd's reference guest.
//!
//! Guest physical memory is identity-mapped, so every address here is both
//! a guest-physical and a guest-virtual address. The guest runs at CPL3 with
//! IOPL=3; each `in`/`out` on the ports below is one exit to the VMM.
//!
//! The agent channel is a mailbox in guest RAM: the VMM writes a request
//! there and completes the guest's blocking `in` on [`PORT_WAIT`]; the guest
//! writes output into the mailbox's output buffer and rings [`PORT_OUTPUT`],
//! then writes the exit code and rings [`PORT_DONE`].
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
/// Bytes reserved for page tables (enough to identity-map 64 GiB).
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
/// The output buffer the guest fills before ringing [`PORT_OUTPUT`].
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

/// Top of vCPU `index`'s user stack.
pub const fn stack_top(index: u64) -> u64 {
    STACKS_ADDR + (index + 1) * STACK_SIZE
}

// ---- Ports --------------------------------------------------------------

/// `in` (32-bit), vCPU 0: block until the next request; returns its
/// sequence number.
pub const PORT_WAIT: u16 = 0xF00;
/// `out` (32-bit): the request in the mailbox is done; the value is ignored
/// (the exit code is in the mailbox).
pub const PORT_DONE: u16 = 0xF01;
/// `out` (32-bit): flush `out_len` bytes of stream `out_stream` from the
/// output buffer.
pub const PORT_OUTPUT: u16 = 0xF02;
/// `in` (32-bit), vCPU 1 and up: block until vCPU 0 kicks background work.
pub const PORT_BG_WAIT: u16 = 0xF03;
/// `out` (32-bit): wake the background vCPU whose index is the value.
pub const PORT_BG_KICK: u16 = 0xF04;
/// `out` (8-bit) from the VMM's exception stubs: the vector number.
pub const PORT_EXCEPTION: u16 = 0xF05;
/// `out` (32-bit): the guest powers off; the value is its exit status.
pub const PORT_SHUTDOWN: u16 = 0xF06;

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
/// Exit code for an unknown builtin or bad arguments.
pub const EXIT_USAGE: i32 = 2;
