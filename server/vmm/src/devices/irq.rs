//! Interrupt lines into the in-kernel IOAPIC: an eventfd registered with
//! KVM as an irqfd, so raising one is a write, from any thread.

use std::sync::Arc;

use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::error::{Result, VmmError};

/// An edge-triggered line to one GSI.
#[derive(Clone, Debug)]
pub struct IrqLine {
    evt: Arc<EventFd>,
    gsi: u32,
}

impl IrqLine {
    /// Creates the eventfd and registers it for `gsi`.
    pub fn new(vm: &VmFd, gsi: u32) -> Result<Self> {
        let evt = EventFd::new(EFD_NONBLOCK).map_err(|e| VmmError::Device {
            device: "interrupt line",
            detail: format!("eventfd for GSI {gsi}: {e}"),
        })?;
        vm.register_irqfd(&evt, gsi)
            .map_err(VmmError::kvm("KVM_IRQFD"))?;
        Ok(IrqLine {
            evt: Arc::new(evt),
            gsi,
        })
    }

    /// The GSI this line raises.
    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    /// Raises the interrupt.
    pub fn raise(&self) -> std::io::Result<()> {
        self.evt.write(1)
    }
}

impl vm_superio::Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.raise()
    }
}
