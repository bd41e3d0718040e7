//! ACPI tables for a Linux guest (acpi_tables): RSDP → XSDT → FADT (with
//! the DSDT) and MADT. The FADT declares a hardware-reduced platform (no
//! PM timer, no SCI); the MADT lists one local APIC per vCPU and the
//! in-kernel IOAPIC; the DSDT describes COM1 and every virtio-mmio device,
//! which is how Debian's kernels find virtio-mmio devices (they have no
//! command-line virtio-mmio support).

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};

use super::layout;
use crate::error::{Result, VmmError};
use crate::memory::GuestRam;

const OEM_ID: [u8; 6] = *b"FORKD ";
const OEM_TABLE_ID: [u8; 8] = *b"FORKDVMM";
const OEM_REVISION: u32 = 1;
/// FADT IA-PC boot architecture flags.
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_MSI_NOT_SUPPORTED: u16 = 1 << 3;
const IAPC_PCIE_ASPM_CONTROLS: u16 = 1 << 4;

/// One virtio-mmio device as the guest must see it.
#[derive(Clone, Copy, Debug)]
pub struct MmioDevice {
    /// Base of its register window.
    pub addr: u64,
    /// Window length.
    pub len: u64,
    /// Its interrupt line.
    pub gsi: u32,
}

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// The DSDT body: COM1 and the virtio-mmio devices under `\_SB`.
fn dsdt(devices: &[MmioDevice]) -> Vec<u8> {
    let com1_io = aml::IO::new(layout::COM1_PORT, layout::COM1_PORT, 1, 8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, layout::COM1_GSI);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_hid = aml::EISAName::new("PNP0501");
    let com1_hid_name = aml::Name::new("_HID".into(), &com1_hid);
    let com1_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let com1_crs_name = aml::Name::new("_CRS".into(), &com1_crs);
    let com1 = aml::Device::new(
        "_SB_.COM1".into(),
        vec![&com1_hid_name, &com1_uid, &com1_crs_name],
    );
    let mut body = to_bytes(&com1);

    for (index, device) in devices.iter().enumerate() {
        let window = aml::Memory32Fixed::new(true, device.addr as u32, device.len as u32);
        let irq = aml::Interrupt::new(true, true, false, false, device.gsi);
        let crs = aml::ResourceTemplate::new(vec![&window, &irq]);
        let hid: aml::AmlStr = "LNRO0005";
        let uid = index;
        let hid_name = aml::Name::new("_HID".into(), &hid);
        let uid_name = aml::Name::new("_UID".into(), &uid);
        let crs_name = aml::Name::new("_CRS".into(), &crs);
        let path = format!("_SB_.V{index:03X}");
        let device = aml::Device::new(path.as_str().into(), vec![&hid_name, &uid_name, &crs_name]);
        body.extend(to_bytes(&device));
    }
    body
}

/// Writes the tables at [`layout::ACPI_ADDR`]; returns the RSDP's address.
pub fn write_tables(ram: &GuestRam, vcpus: u8, devices: &[MmioDevice]) -> Result<u64> {
    let mut writer = TableWriter {
        ram,
        next: layout::ACPI_ADDR + Rsdp::len() as u64,
    };
    let rsdp_addr = layout::ACPI_ADDR;

    let mut dsdt_table = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    dsdt_table.append_slice(&dsdt(devices));
    let dsdt_addr = writer.put(dsdt_table.as_slice())?;

    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    // No VGA, no MSI (no PCI), no PCIe ASPM controls.
    fadt.iapc_boot_arch =
        (IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_SUPPORTED | IAPC_PCIE_ASPM_CONTROLS).into();
    let fadt = fadt
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .finalize();
    let fadt_addr = writer.put(&to_bytes(&fadt))?;

    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(layout::LAPIC_ADDR),
    );
    for cpu in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(vcpus, layout::IOAPIC_ADDR, 0));
    let madt_addr = writer.put(&to_bytes(&madt))?;

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_addr = writer.put(&to_bytes(&xsdt))?;

    ram.write(rsdp_addr, &to_bytes(&Rsdp::new(OEM_ID, xsdt_addr)))?;
    Ok(rsdp_addr)
}

/// Places tables one after another, 8-byte aligned, inside the ACPI area.
struct TableWriter<'a> {
    ram: &'a GuestRam,
    next: u64,
}

impl TableWriter<'_> {
    fn put(&mut self, bytes: &[u8]) -> Result<u64> {
        let addr = (self.next + 7) & !7;
        let end = addr + bytes.len() as u64;
        if end > layout::ACPI_END {
            return Err(VmmError::Boot(format!(
                "ACPI tables need {} bytes past {:#x}",
                end - layout::ACPI_END,
                layout::ACPI_END
            )));
        }
        self.ram.write(addr, bytes)?;
        self.next = end;
        Ok(addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    #[test]
    fn tables_chain_from_the_rsdp_with_valid_checksums() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let devices = [MmioDevice {
            addr: layout::virtio_mmio_addr(0),
            len: layout::MMIO_SLOT_SIZE,
            gsi: layout::virtio_gsi(0),
        }];
        let rsdp = write_tables(&ram, 2, &devices).unwrap();
        let mut head = [0u8; 36];
        ram.read(rsdp, &mut head).unwrap();
        assert_eq!(&head[..8], b"RSD PTR ");
        assert!(checksum_ok(&head[..20]));
        let xsdt = u64::from_le_bytes(head[24..32].try_into().unwrap());
        let read_table = |addr: u64| {
            let len = ram.read_u32(addr + 4) as usize;
            let mut t = vec![0u8; len];
            ram.read(addr, &mut t).unwrap();
            t
        };
        let x = read_table(xsdt);
        assert_eq!(&x[..4], b"XSDT");
        assert!(checksum_ok(&x));
        let entries: Vec<u64> = x[36..]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let sigs: Vec<Vec<u8>> = entries
            .iter()
            .map(|a| read_table(*a)[..4].to_vec())
            .collect();
        assert_eq!(sigs, vec![b"FACP".to_vec(), b"APIC".to_vec()]);
        for a in &entries {
            assert!(checksum_ok(&read_table(*a)));
        }
        let fadt = read_table(entries[0]);
        let dsdt_addr = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let dsdt = read_table(dsdt_addr);
        assert_eq!(&dsdt[..4], b"DSDT");
        assert!(checksum_ok(&dsdt));
        let text = String::from_utf8_lossy(&dsdt);
        assert!(text.contains("LNRO0005"));
        assert!(text.contains("COM1"));
    }
}
