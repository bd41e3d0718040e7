//! The i8042 keyboard controller, for one job: the guest's reboot
//! (`reboot=k` writes 0xfe to port 0x64), which the VMM reports as a guest
//! reset. A Linux guest panics with `panic=1` and then reboots this way.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vm_superio::I8042Device;

use super::bus::PortDevice;

/// Set when the guest asked for a reset.
#[derive(Clone, Debug, Default)]
pub struct ResetFlag(Arc<AtomicBool>);

impl ResetFlag {
    /// Whether a reset was requested.
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

impl vm_superio::Trigger for ResetFlag {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// The controller at ports 0x60-0x64.
pub struct I8042 {
    device: I8042Device<ResetFlag>,
}

impl I8042 {
    /// A controller that sets `flag` on reset.
    pub fn new(flag: ResetFlag) -> Self {
        I8042 {
            device: I8042Device::new(flag),
        }
    }
}

impl PortDevice for I8042 {
    fn read(&mut self, offset: u16) -> u8 {
        self.device.read(offset as u8)
    }

    fn write(&mut self, offset: u16, value: u8) {
        let _ = self.device.write(offset as u8, value);
    }
}
