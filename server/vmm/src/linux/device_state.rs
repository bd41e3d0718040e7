//! The persisted state of a Linux guest's devices, saved in `vmstate` beside
//! KVM's state and rebuilt by a child VMM over the snapshot's memory.
//!
//! The upstream state types (vm-superio's `SerialState`, virtio-queue's
//! `QueueState`) carry no serde support, and their layout is theirs to
//! change; these structs are ours, versioned with `vmstate`, and convert to
//! and from them.
//!
//! Not saved, on purpose: the i8042 (its only job is the reset command,
//! which ends the VM), the console log (a child writes its own), and the
//! agent channel's pending bytes (a snapshot is taken with the channel
//! quiesced, so none are pending).

use serde::{Deserialize, Serialize};
use virtio_queue::QueueState;
use vm_superio::serial::SerialState;

/// Every device of a Linux guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinuxDevicesState {
    /// COM1.
    pub serial: SerialRegs,
    /// The CMOS clock's selected register.
    pub cmos_index: u8,
    /// The agent channel: virtio-mmio slot 0 with its console.
    pub console: MmioTransportState,
}

/// The 8250 UART's registers and receive FIFO.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialRegs {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Received bytes not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialRegs {
    fn from(s: SerialState) -> Self {
        SerialRegs {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialRegs> for SerialState {
    fn from(s: &SerialRegs) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// A virtio-mmio transport's registers, and its queues.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    /// The device status register.
    pub status: u32,
    /// Whether the driver set DRIVER_OK and the device runs its queues.
    pub active: bool,
    /// Feature bits the driver accepted.
    pub driver_features: u64,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// QueueSel.
    pub queue_sel: u32,
    /// InterruptStatus bits not yet acknowledged.
    pub interrupt_status: u32,
    /// Each queue, in index order.
    pub queues: Vec<QueueRegs>,
}

/// A split virtqueue's configuration and ring positions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRegs {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// Set up by the driver.
    pub ready: bool,
    /// Next available-ring entry the device will take.
    pub next_avail: u16,
    /// Next used-ring entry the device will fill.
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX negotiated.
    pub event_idx: bool,
    /// Guest address of the descriptor table.
    pub desc_table: u64,
    /// Guest address of the available ring.
    pub avail_ring: u64,
    /// Guest address of the used ring.
    pub used_ring: u64,
}

impl From<QueueState> for QueueRegs {
    fn from(q: QueueState) -> Self {
        QueueRegs {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx: q.event_idx_enabled,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<QueueRegs> for QueueState {
    fn from(q: QueueRegs) -> Self {
        QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_registers_round_trip_through_vm_superio() {
        let mut upstream = SerialState {
            line_control: 0x03,
            scratch: 7,
            ..Default::default()
        };
        upstream.in_buffer = vec![1, 2, 3];
        let ours = SerialRegs::from(upstream.clone());
        assert_eq!(SerialState::from(&ours), upstream);
    }

    #[test]
    fn queue_registers_round_trip_through_virtio_queue() {
        let regs = QueueRegs {
            max_size: 256,
            size: 128,
            ready: true,
            next_avail: 9,
            next_used: 8,
            event_idx: false,
            desc_table: 0x10_0000,
            avail_ring: 0x10_1000,
            used_ring: 0x10_2000,
        };
        assert_eq!(QueueRegs::from(QueueState::from(regs)), regs);
    }
}
