//! Dispatch of port-I/O and MMIO exits to the device at that address.
//! Accesses nobody claims read as all ones and are otherwise ignored, as
//! on real hardware with nothing on the bus.

use std::sync::{Arc, Mutex};

/// A device on the port-I/O bus, accessed a byte at a time.
pub trait PortDevice: Send {
    /// Reads the byte at `offset` from the device's base port.
    fn read(&mut self, offset: u16) -> u8;
    /// Writes the byte at `offset` from the device's base port.
    fn write(&mut self, offset: u16, value: u8);
}

/// A device on the MMIO bus.
pub trait MmioDevice: Send {
    /// Reads `data.len()` bytes at `offset` from the device's base.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Writes `data` at `offset` from the device's base.
    fn write(&mut self, offset: u64, data: &[u8]);
}

struct PortRange {
    base: u16,
    len: u16,
    device: Arc<Mutex<dyn PortDevice>>,
}

struct MmioRange {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn MmioDevice>>,
}

/// The devices of one VM, by address.
#[derive(Default)]
pub struct Bus {
    ports: Vec<PortRange>,
    mmio: Vec<MmioRange>,
}

impl Bus {
    /// Claims ports `[base, base + len)` for `device`.
    pub fn add_ports(&mut self, base: u16, len: u16, device: Arc<Mutex<dyn PortDevice>>) {
        self.ports.push(PortRange { base, len, device });
    }

    /// Claims `[base, base + len)` of guest physical addresses for `device`.
    pub fn add_mmio(&mut self, base: u64, len: u64, device: Arc<Mutex<dyn MmioDevice>>) {
        self.mmio.push(MmioRange { base, len, device });
    }

    /// Handles a port read.
    pub fn port_read(&self, port: u16, data: &mut [u8]) {
        match self
            .ports
            .iter()
            .find(|r| port.wrapping_sub(r.base) < r.len)
        {
            Some(r) => {
                let mut device = r.device.lock().unwrap_or_else(|p| p.into_inner());
                for (i, byte) in data.iter_mut().enumerate() {
                    *byte = device.read(port - r.base + i as u16);
                }
            }
            None => data.fill(0xff),
        }
    }

    /// Handles a port write.
    pub fn port_write(&self, port: u16, data: &[u8]) {
        if let Some(r) = self
            .ports
            .iter()
            .find(|r| port.wrapping_sub(r.base) < r.len)
        {
            let mut device = r.device.lock().unwrap_or_else(|p| p.into_inner());
            for (i, byte) in data.iter().enumerate() {
                device.write(port - r.base + i as u16, *byte);
            }
        }
    }

    /// Handles an MMIO read; false if no device claims `addr`.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.mmio.iter().find(|r| addr.wrapping_sub(r.base) < r.len) {
            Some(r) => {
                let mut device = r.device.lock().unwrap_or_else(|p| p.into_inner());
                device.read(addr - r.base, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Handles an MMIO write; false if no device claims `addr`.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        match self.mmio.iter().find(|r| addr.wrapping_sub(r.base) < r.len) {
            Some(r) => {
                let mut device = r.device.lock().unwrap_or_else(|p| p.into_inner());
                device.write(addr - r.base, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl PortDevice for Echo {
        fn read(&mut self, offset: u16) -> u8 {
            self.0 + offset as u8
        }
        fn write(&mut self, _offset: u16, value: u8) {
            self.0 = value;
        }
    }

    #[test]
    fn ports_dispatch_by_range_and_unclaimed_reads_are_ones() {
        let mut bus = Bus::default();
        bus.add_ports(0x3f8, 8, Arc::new(Mutex::new(Echo(0))));
        bus.port_write(0x3f8, &[0x10]);
        let mut b = [0u8; 1];
        bus.port_read(0x3fa, &mut b);
        assert_eq!(b[0], 0x12);
        bus.port_read(0x80, &mut b);
        assert_eq!(b[0], 0xff);
        let mut m = [0u8; 4];
        assert!(!bus.mmio_read(0xd000_0000, &mut m));
        assert_eq!(m, [0xff; 4]);
    }
}
