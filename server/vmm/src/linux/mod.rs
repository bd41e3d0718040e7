//! Linux guests: booting Debian's kernel and initramfs per the x86 boot
//! protocol, the ACPI tables that describe the machine, and the devices
//! and agent channel a Linux sandbox runs with. The reference guest's
//! equivalents are `loader`, `boot` and `cpu` at the crate root.

pub mod acpi;
pub mod agent_link;
pub mod boot;
pub mod cpu;
pub mod device_state;
pub mod layout;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::devices::bus::Bus;
use crate::devices::cmos;
use crate::devices::console_log::{ConsoleLog, DEFAULT_CAP};
use crate::devices::i8042::{ResetFlag, I8042};
use crate::devices::irq::IrqLine;
use crate::devices::serial::{SerialConsole, SharedLog};
use crate::devices::virtio::console::Console;
use crate::devices::virtio::device_writes::DeviceWrites;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::Interrupt;
use crate::error::{Result, VmmError};
use crate::events::EventSink;
use crate::memory::GuestRam;
use crate::vm::{self, Vm, VmConfig};
use agent_link::AgentLink;
use boot::LinuxBoot;
use device_state::LinuxDevicesState;

/// The agent channel is virtio-mmio device 0.
const CONSOLE_SLOT: u32 = 0;

/// The devices of a running Linux guest, shared by the vCPU and control
/// threads.
pub struct LinuxDevices {
    /// Port-I/O and MMIO dispatch.
    pub bus: Bus,
    /// Set when the guest resets itself.
    pub reset: ResetFlag,
    /// The serial console's log (its tail goes into crash reports).
    pub console_log: SharedLog,
    /// The agent channel, host side.
    pub agent: AgentLink,
    /// Guest RAM written by devices (for DIFF snapshots).
    pub device_writes: DeviceWrites,
    serial: Arc<Mutex<SerialConsole>>,
    cmos: Arc<Mutex<cmos::Cmos>>,
    console: Arc<Mutex<MmioTransport>>,
}

impl LinuxDevices {
    /// Every device's state, for a snapshot (the vCPUs are stopped and the
    /// agent channel is quiesced).
    pub fn state(&self) -> LinuxDevicesState {
        LinuxDevicesState {
            serial: lock(&self.serial).state(),
            cmos_index: lock(&self.cmos).index(),
            console: lock(&self.console).state(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Builds a VM that boots `boot`.
pub fn create_vm(config: &VmConfig, boot: &LinuxBoot<'_>) -> Result<Vm> {
    if config.vcpus == 0 || config.vcpus > 64 {
        return Err(VmmError::Config(format!(
            "vcpus must be between 1 and 64, got {}",
            config.vcpus
        )));
    }
    let memory_bytes = u64::from(config.memory_mib) << 20;
    if !((64 << 20)..=layout::RAM_LIMIT).contains(&memory_bytes) {
        return Err(VmmError::Config(format!(
            "a Linux guest needs between 64 and {} MiB of memory, got {} MiB",
            layout::RAM_LIMIT >> 20,
            config.memory_mib
        )));
    }
    let (kvm, fd) = vm::create_vm()?;
    vm::create_pit(&fd)?;
    let ram = GuestRam::new(memory_bytes)?;
    vm::attach_memory(&fd, &ram)?;

    let devices = [acpi::MmioDevice {
        addr: layout::virtio_mmio_addr(CONSOLE_SLOT),
        len: layout::MMIO_SLOT_SIZE,
        gsi: layout::virtio_gsi(CONSOLE_SLOT),
    }];
    let rsdp = acpi::write_tables(&ram, config.vcpus, &devices)?;
    let loaded = boot::load(&ram, boot, rsdp)?;

    let vcpus = vm::create_vcpus(&kvm, &fd, config.vcpus, |vcpu, supported, index| {
        cpu::set_cpuid(vcpu, supported, index)?;
        cpu::setup_vcpu(vcpu, index, loaded.entry)
    })?;
    let tsc_khz = vm::tsc_khz(&vcpus[0]);
    Ok(Vm {
        kvm,
        fd,
        ram,
        vcpus,
        tsc_khz,
    })
}

/// Creates the devices of a Linux guest: COM1 logging to `console_log`,
/// the i8042, and the agent's virtio console; with `saved`, each continues
/// from a snapshot's state.
pub fn create_devices(
    vm_fd: &kvm_ioctls::VmFd,
    ram: &GuestRam,
    console_log: Option<&Path>,
    sink: Arc<EventSink>,
    started: Instant,
    saved: Option<&LinuxDevicesState>,
) -> Result<LinuxDevices> {
    let restore_error = |device: &'static str| {
        move |detail: String| VmmError::Device {
            device,
            detail: format!("restoring from the snapshot: {detail}"),
        }
    };
    let log = ConsoleLog::create(console_log, DEFAULT_CAP).map_err(|e| VmmError::Device {
        device: "serial console",
        detail: format!(
            "creating {}: {e}",
            console_log
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        ),
    })?;
    let log = SharedLog(Arc::new(Mutex::new(log)));
    let mut bus = Bus::default();
    let serial_irq = IrqLine::new(vm_fd, layout::COM1_GSI)?;
    let serial = match saved {
        Some(s) => SerialConsole::from_state(&s.serial, serial_irq, log.clone())
            .map_err(restore_error("serial console"))?,
        None => SerialConsole::new(serial_irq, log.clone()),
    };
    let serial = Arc::new(Mutex::new(serial));
    bus.add_ports(layout::COM1_PORT, 8, serial.clone());
    let cmos = Arc::new(Mutex::new(saved.map_or_else(cmos::Cmos::default, |s| {
        cmos::Cmos::with_index(s.cmos_index)
    })));
    bus.add_ports(cmos::CMOS_PORT, 2, cmos.clone());
    let reset = ResetFlag::default();
    bus.add_ports(
        layout::I8042_DATA_PORT,
        5,
        Arc::new(Mutex::new(I8042::new(reset.clone()))),
    );

    let device_writes = DeviceWrites::new(ram.size());
    let (unconnected, mut frames) = agent_link::link_parts(sink, started);
    let (console, console_sender) = Console::new(
        Box::new(move |bytes: &[u8]| frames.receive(bytes)),
        device_writes.clone(),
    );
    let agent = unconnected.connect(console_sender);
    let interrupt = Interrupt::new(IrqLine::new(vm_fd, layout::virtio_gsi(CONSOLE_SLOT))?);
    let transport = match saved {
        Some(s) => MmioTransport::from_state(
            Box::new(console),
            ram.memory().clone(),
            interrupt,
            &s.console,
        )
        .map_err(restore_error("virtio console"))?,
        None => MmioTransport::new(Box::new(console), ram.memory().clone(), interrupt),
    };
    let transport = Arc::new(Mutex::new(transport));
    bus.add_mmio(
        layout::virtio_mmio_addr(CONSOLE_SLOT),
        layout::MMIO_SLOT_SIZE,
        transport.clone(),
    );
    Ok(LinuxDevices {
        bus,
        reset,
        console_log: log,
        agent,
        device_writes,
        serial,
        cmos,
        console: transport,
    })
}
