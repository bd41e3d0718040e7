//! COM1: vm-superio's 8250 UART at 0x3f8 on GSI 4, its output going to the
//! sandbox's console log.

use std::sync::{Arc, Mutex};

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::Serial;

use super::bus::PortDevice;
use super::console_log::ConsoleLog;
use super::irq::IrqLine;

/// The serial console.
pub struct SerialConsole {
    uart: Serial<IrqLine, NoEvents, SharedLog>,
}

/// The console log, shared with crash reporting.
#[derive(Clone)]
pub struct SharedLog(pub Arc<Mutex<ConsoleLog>>);

impl std::io::Write for SharedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl SerialConsole {
    /// A UART raising `irq`, writing to `log`.
    pub fn new(irq: IrqLine, log: SharedLog) -> Self {
        SerialConsole {
            uart: Serial::new(irq, log),
        }
    }

    /// A UART continuing from `state` (a snapshot's).
    pub fn from_state(state: &SerialState, irq: IrqLine, log: SharedLog) -> Result<Self, String> {
        Serial::from_state(state, irq, NoEvents, log)
            .map(|uart| SerialConsole { uart })
            .map_err(|e| format!("{e:?}"))
    }

    /// The registers and receive FIFO, for a snapshot.
    pub fn state(&self) -> SerialState {
        self.uart.state()
    }
}

impl PortDevice for SerialConsole {
    fn read(&mut self, offset: u16) -> u8 {
        self.uart.read(offset as u8)
    }

    fn write(&mut self, offset: u16, value: u8) {
        // An interrupt that cannot be raised only delays the guest's
        // transmit-empty handling; the byte is already logged.
        let _ = self.uart.write(offset as u8, value);
    }
}
