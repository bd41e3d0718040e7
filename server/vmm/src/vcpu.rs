//! One vCPU thread: run the guest, handle its exits, park when asked.

use std::sync::Arc;
use std::time::{Duration, Instant};

use forkd_control::{Event, ExitReason};
use forkd_guest_abi as abi;
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::agent;
use crate::boot;
use crate::coordinator::{Coordinator, JobKind};
use crate::events::EventSink;
use crate::kick;
use crate::linux::LinuxDevices;
use crate::memory::GuestRam;
use crate::snapshot::DirtyLog;
use crate::state;

/// What every vCPU thread shares.
pub struct VmContext {
    /// Guest RAM.
    pub ram: GuestRam,
    /// Run mode and agent queue.
    pub coord: Coordinator,
    /// Events to the daemon.
    pub sink: Arc<EventSink>,
    /// When the VMM process started (for the boot time).
    pub started: Instant,
    /// TSC frequency the guest uses.
    pub tsc_khz: u64,
    /// The VM (for device state and the dirty log).
    pub vm: kvm_ioctls::VmFd,
    /// MSRs saved with each vCPU.
    pub msr_indices: Vec<u32>,
    /// Dirty-page tracking for DIFF snapshots.
    pub dirty: DirtyLog,
    /// A Linux guest's devices; `None` for the reference guest.
    pub linux: Option<LinuxDevices>,
}

/// What to do after an exit.
enum Next {
    Continue,
    Exception(u8),
    TripleFault,
    Halted,
    Failed(String),
    PowerOff(i32),
    /// A Linux guest reset itself (i8042 reset or triple fault).
    Reset(String),
}

/// Runs vCPU `index` until the process exits.
pub fn run(index: usize, mut fd: VcpuFd, ctx: Arc<VmContext>) -> ! {
    kick::register_vcpu_thread(fd.get_kvm_run());
    let mut ready_sent = false;
    loop {
        if ctx.coord.pause_requested() {
            complete_pending_io(&mut fd);
            ctx.coord.park(index, || {
                state::save_vcpu(&fd, &ctx.msr_indices).map_err(|e| e.to_string())
            });
            continue;
        }
        let next = match fd.run() {
            Ok(exit) => match &ctx.linux {
                Some(devices) => handle_linux_exit(exit, devices),
                None => handle_exit(index, exit, &ctx, &mut ready_sent),
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                fd.set_kvm_immediate_exit(0);
                Next::Continue
            }
            Err(e) => Next::Failed(format!("KVM_RUN failed: {e}")),
        };
        match next {
            Next::Continue => {}
            Next::PowerOff(status) => ctx.sink.exit(ExitReason::GuestExit { status }, 0),
            Next::Reset(detail) => ctx.sink.exit(ExitReason::GuestReset { detail }, 3),
            Next::Failed(what) => {
                let detail = describe_failure(index, &fd, &ctx.ram, Next::Failed(what));
                ctx.sink.exit(ExitReason::VmmError { detail }, 4)
            }
            other => {
                let detail = describe_failure(index, &fd, &ctx.ram, other);
                ctx.sink.exit(ExitReason::GuestCrash { detail }, 3)
            }
        }
    }
}

/// Lets KVM finish an in-progress port or MMIO read without running guest
/// code, so the saved state never repeats or loses that access.
fn complete_pending_io(fd: &mut VcpuFd) {
    fd.set_kvm_immediate_exit(1);
    let _ = fd.run();
    fd.set_kvm_immediate_exit(0);
}

fn handle_exit(index: usize, exit: VcpuExit<'_>, ctx: &VmContext, ready_sent: &mut bool) -> Next {
    match exit {
        VcpuExit::MmioRead(addr, data) => {
            let value: u32 = match addr {
                abi::reg::WAIT if index == 0 => {
                    if !*ready_sent && agent::guest_ready(&ctx.ram) {
                        *ready_sent = true;
                        let boot_us = ctx.started.elapsed().as_micros() as u64;
                        ctx.sink.send(&Event::Ready {
                            boot_us,
                            guest: None,
                        });
                    }
                    match ctx.coord.wait_for_job() {
                        Some((seq, job)) => {
                            agent::begin(&ctx.ram, seq, &job);
                            seq
                        }
                        None => 0,
                    }
                }
                abi::reg::BG_WAIT => u32::from(ctx.coord.wait_for_kick(index)),
                _ => u32::MAX,
            };
            let bytes = value.to_le_bytes();
            for (i, byte) in data.iter_mut().enumerate() {
                *byte = bytes.get(i).copied().unwrap_or(0);
            }
            Next::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            let mut word = [0u8; 4];
            let n = data.len().min(4);
            word[..n].copy_from_slice(&data[..n]);
            let value = u32::from_le_bytes(word);
            match addr {
                abi::reg::OUTPUT => flush_output(ctx),
                abi::reg::DONE => finish_request(ctx),
                abi::reg::BG_KICK => ctx.coord.kick(value as usize),
                abi::reg::SLEEP => ctx.coord.sleep(Duration::from_micros(u64::from(value))),
                abi::reg::SHUTDOWN => return Next::PowerOff(value as i32),
                _ => {}
            }
            Next::Continue
        }
        VcpuExit::IoOut(abi::PORT_EXCEPTION, data) => {
            Next::Exception(data.first().copied().unwrap_or(0xff))
        }
        VcpuExit::IoIn(_, data) => {
            data.fill(0xff);
            Next::Continue
        }
        VcpuExit::IoOut(..) => Next::Continue,
        VcpuExit::Intr | VcpuExit::IrqWindowOpen => Next::Continue,
        VcpuExit::Hlt => Next::Halted,
        VcpuExit::Shutdown => Next::TripleFault,
        VcpuExit::FailEntry(reason, cpu) => Next::Failed(format!(
            "VM entry failed (reason {reason:#x}, host cpu {cpu})"
        )),
        VcpuExit::InternalError => Next::Failed("KVM internal error".into()),
        VcpuExit::SystemEvent(kind, _) => match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Next::PowerOff(0),
            other => Next::Failed(format!("guest system event {other}")),
        },
        other => Next::Failed(format!("unexpected VM exit {other:?}")),
    }
}

fn flush_output(ctx: &VmContext) {
    let (stream, len) = agent::pending_output(&ctx.ram);
    let Some(job) = ctx.coord.current() else {
        return;
    };
    if len == 0 || !matches!(job.kind, JobKind::Exec(_)) {
        return;
    }
    ctx.sink
        .output(job.id, stream, len, |buf| agent::read_output(&ctx.ram, buf));
}

fn finish_request(ctx: &VmContext) {
    flush_output(ctx); // a command's last output rides on DONE
    let Some(job) = ctx.coord.finish() else {
        return;
    };
    let (exit_code, ticks) = agent::result(&ctx.ram);
    let event = match job.kind {
        JobKind::Ping => Event::Pong { id: job.id },
        JobKind::Exec(_) => Event::ExecDone {
            id: job.id,
            exit_code,
            duration_us: ticks.saturating_mul(1000) / ctx.tsc_khz.max(1),
            cancelled: exit_code == abi::EXIT_CANCELLED,
            signal: None,
        },
    };
    ctx.sink.send(&event);
}

/// Exits of a Linux guest: port I/O and MMIO go to its devices; a reset
/// (the i8042's, a triple fault, KVM's system event) ends the VM.
fn handle_linux_exit(exit: VcpuExit<'_>, devices: &LinuxDevices) -> Next {
    const RESET: &str = "the guest rebooted (a Linux guest reboots 1 s after a kernel panic)";
    match exit {
        VcpuExit::IoIn(port, data) => devices.bus.port_read(port, data),
        VcpuExit::IoOut(port, data) => {
            devices.bus.port_write(port, data);
            if devices.reset.is_set() {
                return Next::Reset(RESET.into());
            }
        }
        VcpuExit::MmioRead(addr, data) => {
            devices.bus.mmio_read(addr, data);
        }
        VcpuExit::MmioWrite(addr, data) => {
            devices.bus.mmio_write(addr, data);
        }
        VcpuExit::Intr | VcpuExit::IrqWindowOpen | VcpuExit::Hlt => {}
        VcpuExit::Shutdown => return Next::Reset("triple fault (KVM_EXIT_SHUTDOWN)".into()),
        VcpuExit::SystemEvent(kind, _) => match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => return Next::PowerOff(0),
            kvm_bindings::KVM_SYSTEM_EVENT_RESET => return Next::Reset(RESET.into()),
            other => return Next::Failed(format!("guest system event {other}")),
        },
        VcpuExit::FailEntry(reason, cpu) => {
            return Next::Failed(format!(
                "VM entry failed (reason {reason:#x}, host cpu {cpu})"
            ))
        }
        VcpuExit::InternalError => return Next::Failed("KVM internal error".into()),
        other => return Next::Failed(format!("unexpected VM exit {other:?}")),
    }
    Next::Continue
}

/// A crash report: what happened, where, on which vCPU.
fn describe_failure(index: usize, fd: &VcpuFd, ram: &GuestRam, next: Next) -> String {
    let regs = fd.get_regs().ok();
    let rip = regs.map(|r| r.rip).unwrap_or(0);
    match next {
        Next::Exception(vector) => {
            // The stub runs on the ring-0 stack: [error code], rip, cs, ...
            let rsp = regs.map(|r| r.rsp).unwrap_or(0);
            let (error, frame) = if boot::has_error_code(vector) {
                (Some(ram.read_u64(rsp)), rsp + 8)
            } else {
                (None, rsp)
            };
            let fault_rip = ram.read_u64(frame);
            let fault_cs = ram.read_u64(frame + 8);
            let fault_rflags = ram.read_u64(frame + 16);
            let mut text = format!(
                "{} (vector {vector}) at rip={fault_rip:#x} cs={fault_cs:#x} rflags={fault_rflags:#x} on vcpu {index}",
                boot::exception_name(vector)
            );
            if vector == 14 {
                let cr2 = fd.get_sregs().map(|s| s.cr2).unwrap_or(0);
                text.push_str(&format!(", address {cr2:#x}"));
            }
            if let Some(error) = error {
                text.push_str(&format!(", error code {error:#x}"));
            }
            text
        }
        Next::TripleFault => {
            format!("triple fault (KVM_EXIT_SHUTDOWN) on vcpu {index} near rip={rip:#x}")
        }
        Next::Halted => format!("vcpu {index} halted at rip={rip:#x}"),
        Next::Failed(what) => format!("{what} on vcpu {index} at rip={rip:#x}"),
        Next::Reset(detail) => detail,
        Next::Continue | Next::PowerOff(_) => String::new(),
    }
}
