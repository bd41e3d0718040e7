//! The virtio-mmio transport (virtio 1.x, register layout version 2): the
//! registers a driver uses to negotiate features, set up queues and kick
//! them, in front of one [`VirtioDevice`].

use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::bus::MmioDevice;
use crate::linux::device_state::MmioTransportState;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x4b52_4f46; // "FORK"

/// Device status bits the transport acts on.
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FAILED: u32 = 128;

mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// One virtio-mmio device window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    memory: GuestMemoryMmap,
    interrupt: Interrupt,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    active: bool,
}

impl MmioTransport {
    /// A transport for `device`, whose queues live in `memory`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        memory: GuestMemoryMmap,
        interrupt: Interrupt,
    ) -> Self {
        let queues = new_queues(device.as_ref());
        MmioTransport {
            device,
            memory,
            interrupt,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            active: false,
        }
    }

    /// A transport continuing from `state` (a snapshot's): its registers,
    /// and for an active device its queues handed to the device again.
    pub fn from_state(
        device: Box<dyn VirtioDevice>,
        memory: GuestMemoryMmap,
        interrupt: Interrupt,
        state: &MmioTransportState,
    ) -> Result<Self, String> {
        let expected = device.queue_max_sizes().len();
        if state.queues.len() != expected {
            return Err(format!(
                "{} queues saved, the device has {expected}",
                state.queues.len()
            ));
        }
        let queues = state
            .queues
            .iter()
            .enumerate()
            .map(|(i, regs): (usize, &QueueState)| {
                let queue = Queue::try_from(*regs).map_err(|e| format!("queue {i}: {e}"))?;
                if state.active && !queue.is_valid(&memory) {
                    return Err(format!("queue {i} does not fit guest memory"));
                }
                Ok(queue)
            })
            .collect::<Result<Vec<_>, String>>()?;
        let mut transport = MmioTransport::new(device, memory, interrupt);
        transport.status = state.status;
        transport.driver_features = state.driver_features & transport.offered_features();
        transport.device_features_sel = state.device_features_sel;
        transport.driver_features_sel = state.driver_features_sel;
        transport.queue_sel = state.queue_sel;
        if state.active {
            transport.active = true;
            transport.device.activate(
                transport.memory.clone(),
                queues,
                transport.interrupt.clone(),
            );
        } else {
            transport.queues = queues;
        }
        transport.interrupt.restore_status(state.interrupt_status);
        Ok(transport)
    }

    /// The registers and queues, for a snapshot.
    pub fn state(&self) -> MmioTransportState {
        let queues = if self.active {
            self.device.queue_states()
        } else {
            self.queues.iter().map(|q| q.state()).collect()
        };
        MmioTransportState {
            status: self.status,
            active: self.active,
            driver_features: self.driver_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt.status(),
            queues,
        }
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn read_register(&self, offset: u64) -> u32 {
        let queue = self.queues.get(self.queue_sel as usize);
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => queue.map(|q| u32::from(q.max_size())).unwrap_or(0),
            reg::QUEUE_READY => queue.map(|q| u32::from(q.ready())).unwrap_or(0),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES => {
                let shift = match self.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                let mask = 0xffff_ffffu64 << shift;
                let accepted = (u64::from(value) << shift) & self.offered_features();
                self.driver_features = (self.driver_features & !mask) | accepted;
            }
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(value as u16);
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            reg::QUEUE_DESC_LOW => {
                self.set_queue_address(|q, v| q.set_desc_table_address(Some(v), None), value)
            }
            reg::QUEUE_DESC_HIGH => {
                self.set_queue_address(|q, v| q.set_desc_table_address(None, Some(v)), value)
            }
            reg::QUEUE_AVAIL_LOW => {
                self.set_queue_address(|q, v| q.set_avail_ring_address(Some(v), None), value)
            }
            reg::QUEUE_AVAIL_HIGH => {
                self.set_queue_address(|q, v| q.set_avail_ring_address(None, Some(v)), value)
            }
            reg::QUEUE_USED_LOW => {
                self.set_queue_address(|q, v| q.set_used_ring_address(Some(v), None), value)
            }
            reg::QUEUE_USED_HIGH => {
                self.set_queue_address(|q, v| q.set_used_ring_address(None, Some(v)), value)
            }
            reg::QUEUE_NOTIFY if self.active => self.device.queue_notify(value),
            reg::INTERRUPT_ACK => self.interrupt.ack(value),
            reg::STATUS => self.set_status(value),
            _ => {}
        }
    }

    fn set_queue_address(&mut self, set: impl FnOnce(&mut Queue, u32), value: u32) {
        if let Some(q) = self.selected_queue() {
            set(q, value);
        }
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        self.status = value;
        if value & STATUS_DRIVER_OK != 0 && !self.active {
            let valid = self
                .queues
                .iter()
                .all(|q| q.ready() && q.is_valid(&self.memory));
            if !valid {
                self.status |= STATUS_FAILED;
                return;
            }
            self.active = true;
            // The device owns the queues from now on; a reset rebuilds ours.
            let queues = std::mem::take(&mut self.queues);
            self.device
                .activate(self.memory.clone(), queues, self.interrupt.clone());
        }
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
        }
        self.active = false;
        self.status = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.interrupt.ack(u32::MAX);
        self.queues = new_queues(self.device.as_ref());
    }
}

fn new_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
    device
        .queue_max_sizes()
        .iter()
        .map(|max| Queue::new(*max).expect("queue sizes are powers of two"))
        .collect()
}

impl MmioDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        let value = self.read_register(offset).to_le_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = value.get(i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            return; // no writable configuration
        }
        let mut word = [0u8; 4];
        let n = data.len().min(4);
        word[..n].copy_from_slice(&data[..n]);
        self.write_register(offset, u32::from_le_bytes(word));
    }
}
