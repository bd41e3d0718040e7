//! Loading a Linux guest per the x86 64-bit boot protocol: the bzImage
//! (linux-loader), the initramfs at the top of RAM, the command line, the
//! zero page with its e820 map, and the identity map and GDT the kernel's
//! 64-bit entry point expects.

use std::fs::File;
use std::path::Path;

use linux_loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::KernelLoader;
use vm_memory::{Bytes, GuestAddress};

use super::layout;
use crate::error::{Result, VmmError};
use crate::memory::GuestRam;

/// e820 entry types.
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
/// `boot_params.hdr.type_of_loader`: "undefined" loader.
const LOADER_UNDEFINED: u8 = 0xff;
/// Offset of the 64-bit entry point from the protected-mode kernel's start.
const STARTUP_64_OFFSET: u64 = 0x200;
/// Page-table entry bits: present, writable, 2 MiB page.
const PTE_PRESENT_RW: u64 = 0b11;
const PTE_HUGE: u64 = 1 << 7;

/// The boot GDT: null, null, 64-bit code (selector 0x10), data (0x18).
pub const GDT: [u64; 4] = [0, 0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
/// Code segment selector of the boot GDT.
pub const CODE_SELECTOR: u16 = 0x10;
/// Data segment selector of the boot GDT.
pub const DATA_SELECTOR: u16 = 0x18;

/// Base kernel command line: the serial console, a reboot through the
/// i8042 1 s after a panic (the VMM turns it into a guest reset), no PCI.
/// No PS/2 controller is described in ACPI, so the kernel skips probing
/// one (a legacy probe against the reset-only i8042 costs seconds).
pub const BASE_CMDLINE: &str =
    "console=ttyS0 8250.nr_uarts=1 reboot=k panic=1 pci=off quiet random.trust_cpu=on";

/// What a Linux guest boots.
#[derive(Clone, Debug)]
pub struct LinuxBoot<'a> {
    /// The bzImage.
    pub kernel: &'a Path,
    /// The initramfs (a cpio archive, compressed or not).
    pub initrd: &'a Path,
    /// Words appended to [`BASE_CMDLINE`].
    pub extra_args: &'a str,
}

/// Where the kernel was loaded: its 64-bit entry point.
#[derive(Clone, Copy, Debug)]
pub struct Loaded {
    /// Guest address of `startup_64`.
    pub entry: u64,
}

fn boot_err(what: impl std::fmt::Display) -> VmmError {
    VmmError::Boot(what.to_string())
}

/// Loads everything into `ram` and writes the zero page; `rsdp` is the
/// guest address of the ACPI RSDP.
pub fn load(ram: &GuestRam, boot: &LinuxBoot<'_>, rsdp: u64) -> Result<Loaded> {
    let mut kernel = File::open(boot.kernel)
        .map_err(|e| boot_err(format!("opening kernel {}: {e}", boot.kernel.display())))?;
    let result = BzImage::load(
        ram.memory(),
        None,
        &mut kernel,
        Some(GuestAddress(layout::HIGH_RAM_START)),
    )
    .map_err(|e| boot_err(format!("loading kernel {}: {e}", boot.kernel.display())))?;
    let header = result
        .setup_header
        .ok_or_else(|| boot_err("the kernel is not a bzImage (no setup header)"))?;

    let cmdline = build_cmdline(boot.extra_args)?;
    linux_loader::loader::load_cmdline(ram.memory(), GuestAddress(layout::CMDLINE_ADDR), &cmdline)
        .map_err(|e| boot_err(format!("writing the kernel command line: {e}")))?;
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(|e| boot_err(format!("kernel command line: {e}")))?
        .as_bytes()
        .len();

    let mut initrd = File::open(boot.initrd)
        .map_err(|e| boot_err(format!("opening initrd {}: {e}", boot.initrd.display())))?;
    let initrd_len = initrd
        .metadata()
        .map_err(|e| boot_err(format!("initrd {}: {e}", boot.initrd.display())))?
        .len();
    let initrd_max = u64::from(header.initrd_addr_max).min(ram.size() - 1);
    let initrd_addr = (initrd_max + 1)
        .checked_sub(initrd_len)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= result.kernel_end)
        .ok_or_else(|| {
            boot_err(format!(
                "the initrd ({} MiB) does not fit in guest RAM ({} MiB) above the kernel; \
                 give the sandbox more memory",
                initrd_len >> 20,
                ram.size() >> 20
            ))
        })?;
    // Straight from the file into guest RAM: no copy in between.
    ram.memory()
        .read_exact_volatile_from(GuestAddress(initrd_addr), &mut initrd, initrd_len as usize)
        .map_err(|e| boot_err(format!("reading initrd {}: {e}", boot.initrd.display())))?;

    let mut params = boot_params {
        hdr: header,
        ..Default::default()
    };
    params.hdr.type_of_loader = LOADER_UNDEFINED;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.cmd_line_ptr = layout::CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    params.hdr.ramdisk_image = initrd_addr as u32;
    params.hdr.ramdisk_size = initrd_len as u32;
    params.acpi_rsdp_addr = rsdp;
    let map = e820_map(ram.size());
    for (slot, entry) in params.e820_table.iter_mut().zip(map.iter()) {
        *slot = *entry;
    }
    params.e820_entries = map.len() as u8;
    ram.write_struct(layout::ZERO_PAGE_ADDR, &params)?;

    write_page_tables(ram)?;
    for (i, descriptor) in GDT.iter().enumerate() {
        ram.write(layout::GDT_ADDR + 8 * i as u64, &descriptor.to_le_bytes())?;
    }
    Ok(Loaded {
        entry: result.kernel_load.0 + STARTUP_64_OFFSET,
    })
}

/// The full command line: [`BASE_CMDLINE`] plus `extra`.
pub fn build_cmdline(extra: &str) -> Result<Cmdline> {
    let mut cmdline = Cmdline::new(layout::CMDLINE_MAX).map_err(boot_err)?;
    cmdline.insert_str(BASE_CMDLINE).map_err(boot_err)?;
    let extra = extra.trim();
    if !extra.is_empty() {
        cmdline
            .insert_str(extra)
            .map_err(|e| boot_err(format!("kernel arguments {extra:?}: {e}")))?;
    }
    Ok(cmdline)
}

/// RAM below the legacy hole, the hole (EBDA, ACPI, BIOS) reserved, RAM
/// from 1 MiB to the end.
pub fn e820_map(ram_size: u64) -> Vec<boot_e820_entry> {
    let entry = |addr: u64, end: u64, type_: u32| boot_e820_entry {
        addr,
        size: end - addr,
        r#type: type_,
    };
    vec![
        entry(0, layout::EBDA_START, E820_RAM),
        entry(layout::EBDA_START, layout::HIGH_RAM_START, E820_RESERVED),
        entry(layout::HIGH_RAM_START, ram_size, E820_RAM),
    ]
}

/// Identity-maps the first 4 GiB with 2 MiB pages.
fn write_page_tables(ram: &GuestRam) -> Result<()> {
    ram.write(
        layout::PML4_ADDR,
        &(layout::PDPT_ADDR | PTE_PRESENT_RW).to_le_bytes(),
    )?;
    for pd in 0..4u64 {
        let pd_addr = layout::PD_ADDR + pd * 0x1000;
        ram.write(
            layout::PDPT_ADDR + pd * 8,
            &(pd_addr | PTE_PRESENT_RW).to_le_bytes(),
        )?;
        let mut table = [0u8; 4096];
        for (i, slot) in table.chunks_exact_mut(8).enumerate() {
            let phys = (pd * 512 + i as u64) << 21;
            slot.copy_from_slice(&(phys | PTE_PRESENT_RW | PTE_HUGE).to_le_bytes());
        }
        ram.write(pd_addr, &table)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_reserves_the_legacy_hole() {
        let map = e820_map(512 << 20);
        assert_eq!(map.len(), 3);
        let (a, s, t) = (map[2].addr, map[2].size, map[2].r#type);
        assert_eq!((a, a + s, t), (0x100000, 512 << 20, E820_RAM));
        let t1 = map[1].r#type;
        assert_eq!(t1, E820_RESERVED);
    }

    #[test]
    fn cmdline_appends_extra_words() {
        let c = build_cmdline(" forkd.hostname=sb-1 ").unwrap();
        let s = c.as_cstring().unwrap().into_string().unwrap();
        assert!(s.starts_with("console=ttyS0"));
        assert!(s.ends_with("forkd.hostname=sb-1"));
    }

    #[test]
    fn page_tables_identity_map_4_gib() {
        let ram = GuestRam::new(64 << 20).unwrap();
        write_page_tables(&ram).unwrap();
        let pml4 = ram.read_u64(layout::PML4_ADDR);
        assert_eq!(pml4 & !0xfff, layout::PDPT_ADDR);
        let last_pd = layout::PD_ADDR + 3 * 0x1000;
        let last = ram.read_u64(last_pd + 511 * 8);
        assert_eq!(last & !0x1fffff, (4u64 << 30) - (2 << 20));
    }
}
