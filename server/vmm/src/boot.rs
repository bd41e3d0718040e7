//! The 64-bit environment the VMM builds in guest memory before the first
//! instruction runs: identity page tables, GDT, TSS, IDT with exception
//! stubs, and the boot info. The guest never sets any of this up itself.

use forkd_guest_abi as abi;

use crate::error::{Result, VmmError};
use crate::memory::GuestRam;

/// GDT selectors (index << 3 | RPL).
pub mod selector {
    /// Ring-0 64-bit code.
    pub const KERNEL_CODE: u16 = 0x08;
    /// Ring-0 data.
    pub const KERNEL_DATA: u16 = 0x10;
    /// Ring-3 data (RPL 3).
    pub const USER_DATA: u16 = 0x18 | 3;
    /// Ring-3 64-bit code (RPL 3).
    pub const USER_CODE: u16 = 0x20 | 3;
    /// The TSS (a 16-byte system descriptor).
    pub const TSS: u16 = 0x28;
}

/// GDT entries (flat segments; base and limit ignored in long mode).
pub const GDT: [u64; 7] = [
    0,                     // null
    0x00af_9a00_0000_ffff, // 0x08 kernel code: P, DPL0, code, L
    0x00cf_9200_0000_ffff, // 0x10 kernel data: P, DPL0, writable
    0x00cf_f200_0000_ffff, // 0x18 user data: P, DPL3, writable
    0x00af_fa00_0000_ffff, // 0x20 user code: P, DPL3, code, L
    0,                     // 0x28 TSS low (filled in by `tss_descriptor`)
    0,                     // 0x30 TSS high
];

/// Size of the 64-bit TSS.
pub const TSS_SIZE: u64 = 104;

const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_HUGE: u64 = 1 << 7;
const PTE_NO_CACHE: u64 = 1 << 4;
const PTE_FLAGS: u64 = PTE_PRESENT | PTE_WRITABLE | PTE_USER;
const MIB2: u64 = 2 << 20;
const GIB: u64 = 1 << 30;

/// Vectors that push an error code.
pub fn has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10 | 11 | 12 | 13 | 14 | 17 | 21 | 29 | 30)
}

/// Writes everything the guest needs before its first instruction.
pub fn build_environment(ram: &GuestRam, vcpus: u32, tsc_khz: u64) -> Result<()> {
    write_page_tables(ram)?;
    write_gdt(ram)?;
    write_tss(ram)?;
    write_idt_and_stubs(ram)?;
    let info = abi::BootInfo {
        magic: abi::BOOT_MAGIC,
        abi_version: abi::ABI_VERSION,
        vcpus,
        memory_bytes: ram.size(),
        tsc_khz,
    };
    ram.write_struct(abi::BOOT_INFO_ADDR, &info)
}

/// Identity-maps all of RAM, user-accessible: 2 MiB pages everywhere except
/// the first 2 MiB, which uses 4 KiB pages so the null page stays unmapped;
/// and maps the doorbell page (no RAM behind it: accesses exit as MMIO).
///
/// Layout at PAGE_TABLES_ADDR: PML4, PDPT, first PT, doorbell PD, doorbell
/// PT, then one PD per GiB of RAM.
fn write_page_tables(ram: &GuestRam) -> Result<()> {
    let size = ram.size();
    let gibs = size.div_ceil(GIB);
    let page = |n: u64| abi::PAGE_TABLES_ADDR + n * abi::PAGE_SIZE;
    let (pml4, pdpt, first_pt, bell_pd, bell_pt) = (page(0), page(1), page(2), page(3), page(4));
    let pd = |g: u64| page(5 + g);
    if page(5 + gibs) > abi::PAGE_TABLES_ADDR + abi::PAGE_TABLES_SIZE || size > abi::DOORBELL_ADDR {
        return Err(VmmError::Config(format!(
            "{} MiB of RAM exceeds the {} MiB the memory map supports",
            size >> 20,
            abi::MAX_MEMORY_MIB
        )));
    }
    ram.write(pml4, &(pdpt | PTE_FLAGS).to_le_bytes())?;
    let mut pdpt_entries = vec![0u8; 4096];
    for g in 0..gibs {
        let at = g as usize * 8;
        pdpt_entries[at..at + 8].copy_from_slice(&(pd(g) | PTE_FLAGS).to_le_bytes());
    }
    let bell_gib = abi::DOORBELL_ADDR / GIB;
    let at = bell_gib as usize * 8;
    pdpt_entries[at..at + 8].copy_from_slice(&(bell_pd | PTE_FLAGS).to_le_bytes());
    ram.write(pdpt, &pdpt_entries)?;
    for g in 0..gibs {
        let mut table = Vec::with_capacity(4096);
        for e in 0..512u64 {
            let addr = g * GIB + e * MIB2;
            let entry = if addr >= size {
                0
            } else if addr == 0 {
                first_pt | PTE_FLAGS
            } else {
                addr | PTE_FLAGS | PTE_HUGE
            };
            table.extend_from_slice(&entry.to_le_bytes());
        }
        ram.write(pd(g), &table)?;
    }
    let mut pt = Vec::with_capacity(4096);
    for e in 0..512u64 {
        let entry = if e == 0 {
            0
        } else {
            (e * abi::PAGE_SIZE) | PTE_FLAGS
        };
        pt.extend_from_slice(&entry.to_le_bytes());
    }
    ram.write(first_pt, &pt)?;
    // The doorbell: PD entry 0 -> PT, PT entry 0 -> the page, uncached.
    ram.write(bell_pd, &(bell_pt | PTE_FLAGS).to_le_bytes())?;
    ram.write(
        bell_pt,
        &(abi::DOORBELL_ADDR | PTE_FLAGS | PTE_NO_CACHE).to_le_bytes(),
    )
}

/// The two 8-byte halves of a 64-bit available-TSS descriptor.
fn tss_descriptor(base: u64, limit: u64) -> (u64, u64) {
    let low = (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x89 << 40) // present, DPL0, type 9 (available 64-bit TSS)
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    (low, base >> 32)
}

fn write_gdt(ram: &GuestRam) -> Result<()> {
    let mut gdt = GDT;
    let (low, high) = tss_descriptor(abi::TSS_ADDR, TSS_SIZE - 1);
    gdt[5] = low;
    gdt[6] = high;
    let bytes: Vec<u8> = gdt.iter().flat_map(|e| e.to_le_bytes()).collect();
    ram.write(abi::GDT_ADDR, &bytes)
}

fn write_tss(ram: &GuestRam) -> Result<()> {
    let mut tss = [0u8; TSS_SIZE as usize];
    tss[4..12].copy_from_slice(&abi::RING0_STACK_TOP.to_le_bytes()); // rsp0
    tss[36..44].copy_from_slice(&abi::RING0_STACK_TOP.to_le_bytes()); // ist1
    tss[102..104].copy_from_slice(&(TSS_SIZE as u16).to_le_bytes()); // no I/O bitmap
    ram.write(abi::TSS_ADDR, &tss)
}

/// One exception stub: report the vector on PORT_EXCEPTION, then halt.
fn exception_stub(vector: u8) -> [u8; abi::EXCEPTION_STUB_SIZE as usize] {
    let port = abi::PORT_EXCEPTION.to_le_bytes();
    let mut stub = [0x90u8; abi::EXCEPTION_STUB_SIZE as usize]; // nop padding
    stub[..10].copy_from_slice(&[
        0xb0, vector, // mov al, vector
        0x66, 0xba, port[0], port[1], // mov dx, PORT_EXCEPTION
        0xee,    // out dx, al
        0xf4,    // hlt
        0xeb, 0xfd, // jmp back to hlt
    ]);
    stub
}

fn write_idt_and_stubs(ram: &GuestRam) -> Result<()> {
    let mut stubs = Vec::with_capacity(32 * abi::EXCEPTION_STUB_SIZE as usize);
    let mut idt = Vec::with_capacity(256 * 16);
    for vector in 0..32u8 {
        stubs.extend_from_slice(&exception_stub(vector));
        let handler = abi::EXCEPTION_STUBS_ADDR + u64::from(vector) * abi::EXCEPTION_STUB_SIZE;
        // Double fault on its own known-good stack (IST1).
        let ist: u64 = if vector == 8 { 1 } else { 0 };
        let low = (handler & 0xffff)
            | (u64::from(selector::KERNEL_CODE) << 16)
            | (ist << 32)
            | (0x8e << 40) // present, DPL0, 64-bit interrupt gate
            | (((handler >> 16) & 0xffff) << 48);
        idt.extend_from_slice(&low.to_le_bytes());
        idt.extend_from_slice(&(handler >> 32).to_le_bytes());
    }
    ram.write(abi::EXCEPTION_STUBS_ADDR, &stubs)?;
    ram.write(abi::IDT_ADDR, &idt)
}

/// Name of an exception vector, for crash reports.
pub fn exception_name(vector: u8) -> &'static str {
    match vector {
        0 => "#DE divide error",
        1 => "#DB debug",
        2 => "NMI",
        3 => "#BP breakpoint",
        4 => "#OF overflow",
        5 => "#BR bound range",
        6 => "#UD invalid opcode",
        7 => "#NM device not available",
        8 => "#DF double fault",
        10 => "#TS invalid TSS",
        11 => "#NP segment not present",
        12 => "#SS stack fault",
        13 => "#GP general protection",
        14 => "#PF page fault",
        16 => "#MF x87 error",
        17 => "#AC alignment check",
        18 => "#MC machine check",
        19 => "#XM SIMD error",
        _ => "exception",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tss_descriptor_encodes_base_and_limit() {
        let (low, high) = tss_descriptor(0x1234_5678_9abc_def0, 103);
        assert_eq!(low & 0xffff, 103);
        assert_eq!((low >> 16) & 0xff_ffff, 0xbc_def0);
        assert_eq!((low >> 56) & 0xff, 0x9a);
        assert_eq!((low >> 40) & 0xff, 0x89);
        assert_eq!(high, 0x1234_5678);
    }

    #[test]
    fn stub_reports_vector_on_exception_port() {
        let stub = exception_stub(14);
        assert_eq!(&stub[..2], &[0xb0, 14]);
        assert_eq!(u16::from_le_bytes([stub[4], stub[5]]), abi::PORT_EXCEPTION);
        assert_eq!(stub[6], 0xee);
    }

    #[test]
    fn page_tables_leave_null_page_unmapped() {
        let ram = GuestRam::new(64 << 20).unwrap();
        write_page_tables(&ram).unwrap();
        let first_pt = abi::PAGE_TABLES_ADDR + 2 * abi::PAGE_SIZE;
        assert_eq!(ram.read_u64(first_pt), 0, "null page must not be present");
        assert_eq!(ram.read_u64(first_pt + 8), abi::PAGE_SIZE | PTE_FLAGS);
        let pd0 = abi::PAGE_TABLES_ADDR + 5 * abi::PAGE_SIZE;
        assert_eq!(ram.read_u64(pd0 + 8), MIB2 | PTE_FLAGS | PTE_HUGE);
        // 64 MiB = 32 large pages; entry 32 is beyond RAM.
        assert_eq!(ram.read_u64(pd0 + 32 * 8), 0);
        let bell_pt = abi::PAGE_TABLES_ADDR + 4 * abi::PAGE_SIZE;
        assert_eq!(ram.read_u64(bell_pt) & !0xfff, abi::DOORBELL_ADDR);
    }
}
