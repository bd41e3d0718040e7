//! The persisted state of a Linux guest's devices, saved in `vmstate` beside
//! KVM's state and rebuilt by a child VMM over the snapshot's memory.
//!
//! The upstream state types (vm-superio's `SerialState`, virtio-queue's
//! `QueueState`) carry no serde support; their on-disk form is described
//! here with serde's remote derive, versioned with `vmstate`.
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
    /// COM1: vm-superio's 8250 registers and receive FIFO.
    #[serde(with = "SerialRegs")]
    pub serial: SerialState,
    /// The CMOS clock's selected register.
    pub cmos_index: u8,
    /// The agent channel: virtio-mmio slot 0 with its console.
    pub console: MmioTransportState,
}

/// The on-disk form of vm-superio's `SerialState`: the 8250's registers
/// and its receive FIFO. (serde's remote derive: a field vm-superio adds or
/// renames fails the build here instead of changing the format silently.)
#[derive(Serialize, Deserialize)]
#[serde(remote = "SerialState")]
struct SerialRegs {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
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
    /// Each queue's configuration and ring positions, in index order.
    #[serde(with = "queue_list")]
    pub queues: Vec<QueueState>,
}

/// The on-disk form of virtio-queue's `QueueState` (remote derive, as for
/// [`SerialRegs`]).
#[derive(Serialize, Deserialize)]
#[serde(remote = "QueueState")]
struct QueueRegs {
    max_size: u16,
    next_avail: u16,
    next_used: u16,
    #[serde(rename = "event_idx")]
    event_idx_enabled: bool,
    size: u16,
    ready: bool,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
}

/// A list of queues in their on-disk form.
mod queue_list {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use virtio_queue::QueueState;

    #[derive(Serialize, Deserialize)]
    struct Queue(#[serde(with = "super::QueueRegs")] QueueState);

    pub fn serialize<S: Serializer>(queues: &[QueueState], s: S) -> Result<S::Ok, S::Error> {
        queues
            .iter()
            .map(|q| Queue(*q))
            .collect::<Vec<_>>()
            .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<QueueState>, D::Error> {
        Ok(Vec::<Queue>::deserialize(d)?
            .into_iter()
            .map(|q| q.0)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_state_round_trips_through_json() {
        let state = LinuxDevicesState {
            serial: SerialState {
                line_control: 0x03,
                scratch: 7,
                in_buffer: vec![1, 2, 3],
                ..Default::default()
            },
            cmos_index: 0x0b,
            console: MmioTransportState {
                status: 15,
                active: true,
                queues: vec![QueueState {
                    max_size: 256,
                    size: 128,
                    ready: true,
                    next_avail: 9,
                    next_used: 8,
                    desc_table: 0x10_0000,
                    avail_ring: 0x10_1000,
                    used_ring: 0x10_2000,
                    ..Default::default()
                }],
                ..Default::default()
            },
        };
        let json = serde_json::to_string(&state).unwrap();
        assert!(json.contains("\"next_avail\":9"), "{json}");
        let back: LinuxDevicesState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);
    }
}
