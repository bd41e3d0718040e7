//! Devices a Linux guest sees: the 8250 serial console, the i8042 (for
//! reset), and virtio-mmio devices (the agent's console channel). The
//! reference guest has none of these: it talks through MMIO doorbells
//! handled in `vcpu`.

pub mod bus;
pub mod cmos;
pub mod console_log;
pub mod i8042;
pub mod irq;
pub mod serial;
pub mod virtio;
