//! Virtio devices over the virtio-mmio transport (version 2), with split
//! virtqueues from `virtio-queue`.

pub mod console;
pub mod device_writes;
pub mod mmio;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueState};
use vm_memory::GuestMemoryMmap;

use super::irq::IrqLine;

/// `VIRTIO_F_VERSION_1`: the device follows virtio 1.x (required over
/// virtio-mmio version 2).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Interrupt status bit: a used ring was updated.
pub const INT_USED_RING: u32 = 1;

/// What a device behind the transport implements.
pub trait VirtioDevice: Send {
    /// The virtio device id (3: console).
    fn device_type(&self) -> u32;
    /// Feature bits offered to the driver.
    fn features(&self) -> u64;
    /// Largest size of each queue; the count is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver set DRIVER_OK: start using `queues`.
    fn activate(&mut self, memory: GuestMemoryMmap, queues: Vec<Queue>, interrupt: Interrupt);
    /// The driver notified queue `index`.
    fn queue_notify(&mut self, index: u32);
    /// The driver reset the device: forget the queues.
    fn reset(&mut self);
    /// The active queues' state, in index order (empty before activation).
    fn queue_states(&self) -> Vec<QueueState>;
}

/// A device's interrupt: the status register the driver reads, and the
/// line that tells it to look.
#[derive(Clone, Debug)]
pub struct Interrupt {
    status: Arc<AtomicU32>,
    line: IrqLine,
}

impl Interrupt {
    /// An interrupt raising `line`.
    pub fn new(line: IrqLine) -> Self {
        Interrupt {
            status: Arc::new(AtomicU32::new(0)),
            line,
        }
    }

    /// Tells the driver a used ring changed.
    pub fn signal_used(&self) {
        self.status.fetch_or(INT_USED_RING, Ordering::SeqCst);
        // A failed eventfd write (counter overflow) still leaves an
        // interrupt pending; nothing else to do.
        let _ = self.line.raise();
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The driver's InterruptACK.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Sets the InterruptStatus register (restoring a snapshot); a set bit
    /// also raises the line, since the driver may not have seen it yet.
    pub fn restore_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
        if bits != 0 {
            let _ = self.line.raise();
        }
    }
}
