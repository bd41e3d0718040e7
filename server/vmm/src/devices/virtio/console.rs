//! virtio-console with one port (`/dev/hvc0` in the guest): the byte
//! stream between the VMM and forkd-agent. Queue 0 (receiveq) carries
//! host-to-guest bytes into buffers the guest posts; queue 1 (transmitq)
//! carries guest-to-host bytes, handed to a callback as they come.
//!
//! Back-pressure both ways: the guest's writes wait while the callback (a
//! write to the daemon) blocks; host bytes wait in a bounded buffer until
//! the guest posts receive buffers.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::device_writes::DeviceWrites;
use super::{Interrupt, VirtioDevice};

/// The virtio device id of a console.
pub const DEVICE_ID_CONSOLE: u32 = 3;
const RX: usize = 0;
const TX: usize = 1;
const QUEUE_SIZES: [u16; 2] = [256, 256];
/// Most guest-to-host bytes taken from one transmit descriptor chain.
pub const MAX_CHAIN_BYTES: usize = 64 << 10;
/// Most host-to-guest bytes waiting for receive buffers.
pub const MAX_PENDING: usize = 8 << 20;

/// Host bytes could not be queued: the guest is not taking them.
#[derive(Debug, thiserror::Error)]
#[error("the guest's console has {pending} bytes waiting; it is not reading its channel")]
pub struct ChannelFull {
    /// Bytes already waiting.
    pub pending: usize,
}

/// Receives the guest's bytes, in order.
pub type OutputFn = Box<dyn FnMut(&[u8]) + Send>;

#[derive(Default)]
struct Receive {
    memory: Option<GuestMemoryMmap>,
    queue: Option<Queue>,
    interrupt: Option<Interrupt>,
    pending: VecDeque<u8>,
}

/// The console device (owned by its transport).
pub struct Console {
    receive: Arc<Mutex<Receive>>,
    transmit: Option<(GuestMemoryMmap, Queue, Interrupt)>,
    on_output: OutputFn,
    writes: DeviceWrites,
}

/// The host side's way to send bytes to the guest.
#[derive(Clone)]
pub struct ConsoleSender {
    receive: Arc<Mutex<Receive>>,
    writes: DeviceWrites,
}

fn lock(m: &Mutex<Receive>) -> MutexGuard<'_, Receive> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Console {
    /// A console calling `on_output` with the guest's bytes; device writes
    /// to guest RAM are recorded in `writes`.
    pub fn new(on_output: OutputFn, writes: DeviceWrites) -> (Self, ConsoleSender) {
        let receive = Arc::new(Mutex::new(Receive::default()));
        let sender = ConsoleSender {
            receive: receive.clone(),
            writes: writes.clone(),
        };
        (
            Console {
                receive,
                transmit: None,
                on_output,
                writes,
            },
            sender,
        )
    }

    fn drain_transmit(&mut self) {
        let Some((memory, queue, interrupt)) = self.transmit.as_mut() else {
            return;
        };
        // One chain at a time, at most MAX_CHAIN_BYTES of it: the guest
        // chooses descriptor lengths, and the VMM's memory must stay
        // bounded whatever it chooses. (Linux's hvc driver writes at most a
        // page per buffer; a guest that sends more only corrupts its own
        // channel.)
        let mut bytes = Vec::with_capacity(4096);
        while let Some(chain) = queue.pop_descriptor_chain(&*memory) {
            let head = chain.head_index();
            bytes.clear();
            for desc in chain.readable() {
                let room = MAX_CHAIN_BYTES - bytes.len();
                let take = (desc.len() as usize).min(room);
                let start = bytes.len();
                bytes.resize(start + take, 0);
                if memory.read_slice(&mut bytes[start..], desc.addr()).is_err() {
                    bytes.truncate(start);
                }
                if bytes.len() == MAX_CHAIN_BYTES {
                    break;
                }
            }
            if queue.add_used(&*memory, head, 0).is_ok() {
                self.writes
                    .mark(queue.used_ring(), 4 + 8 * usize::from(queue.size()) + 2);
            }
            interrupt.signal_used();
            if !bytes.is_empty() {
                (self.on_output)(&bytes);
            }
        }
    }
}

impl Receive {
    /// Copies pending bytes into the guest's posted buffers.
    fn fill(&mut self, writes: &DeviceWrites) {
        let (Some(memory), Some(queue), Some(interrupt)) = (
            self.memory.as_ref(),
            self.queue.as_mut(),
            self.interrupt.as_ref(),
        ) else {
            return;
        };
        let mut used_any = false;
        while !self.pending.is_empty() {
            let Some(chain) = queue.pop_descriptor_chain(memory) else {
                break;
            };
            let head = chain.head_index();
            let mut written = 0u32;
            for desc in chain.writable() {
                if self.pending.is_empty() {
                    break;
                }
                let n = (desc.len() as usize).min(self.pending.len());
                let chunk: Vec<u8> = self.pending.drain(..n).collect();
                if memory.write_slice(&chunk, desc.addr()).is_err() {
                    break;
                }
                writes.mark(desc.addr().0, n);
                written += n as u32;
            }
            if queue.add_used(memory, head, written).is_ok() {
                writes.mark(queue.used_ring(), 4 + 8 * usize::from(queue.size()) + 2);
                used_any = true;
            }
        }
        if used_any {
            interrupt.signal_used();
        }
    }
}

impl ConsoleSender {
    /// Queues `bytes` for the guest and delivers what fits now.
    pub fn send(&self, bytes: &[u8]) -> Result<(), ChannelFull> {
        let mut rx = lock(&self.receive);
        if rx.pending.len() + bytes.len() > MAX_PENDING {
            return Err(ChannelFull {
                pending: rx.pending.len(),
            });
        }
        rx.pending.extend(bytes);
        rx.fill(&self.writes);
        Ok(())
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        DEVICE_ID_CONSOLE
    }

    fn features(&self) -> u64 {
        0
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // cols, rows, max_nr_ports, emerg_wr: unused without features.
        data.fill(0);
    }

    fn activate(&mut self, memory: GuestMemoryMmap, mut queues: Vec<Queue>, interrupt: Interrupt) {
        let tx = queues.remove(TX);
        let rx = queues.remove(RX);
        {
            let mut receive = lock(&self.receive);
            receive.memory = Some(memory.clone());
            receive.queue = Some(rx);
            receive.interrupt = Some(interrupt.clone());
            receive.fill(&self.writes);
        }
        self.transmit = Some((memory, tx, interrupt));
        self.drain_transmit();
    }

    fn queue_notify(&mut self, index: u32) {
        match index as usize {
            RX => lock(&self.receive).fill(&self.writes),
            TX => self.drain_transmit(),
            _ => {}
        }
    }

    fn queue_states(&self) -> Vec<QueueState> {
        let receive = lock(&self.receive);
        match (receive.queue.as_ref(), self.transmit.as_ref()) {
            (Some(rx), Some((_, tx, _))) => vec![rx.state(), tx.state()],
            _ => Vec::new(),
        }
    }

    fn reset(&mut self) {
        let mut receive = lock(&self.receive);
        receive.memory = None;
        receive.queue = None;
        receive.interrupt = None;
        self.transmit = None;
    }
}
