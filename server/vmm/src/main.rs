//! `forkd-vmm`: runs one sandbox's microVM for the forkd daemon.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::thread::JoinHandleExt;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use forkd_control::{Event, ExitReason};
use forkd_vmm::coordinator::Coordinator;
use forkd_vmm::events::EventSink;
use forkd_vmm::linux::{self, boot::LinuxBoot};
use forkd_vmm::memory::PageSize;
use forkd_vmm::snapshot::DirtyLog;
use forkd_vmm::standby::StandbyVm;
use forkd_vmm::startup::{self, Startup};
use forkd_vmm::state::{self, VmState};
use forkd_vmm::vcpu::{self, VmContext};
use forkd_vmm::vm::{Vm, VmConfig};
use forkd_vmm::{control, kick, live, loader};

/// Runs one KVM microVM, controlled by the forkd daemon over a socket.
#[derive(Parser, Debug)]
#[command(name = "forkd-vmm", version)]
struct Args {
    /// Inherited Unix stream socket to the daemon.
    #[arg(long)]
    control_fd: i32,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 256)]
    memory_mib: u32,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 2)]
    vcpus: u8,
    /// Sandbox id, for logs; a Linux child restored from a snapshot takes
    /// it as its hostname.
    #[arg(long, default_value = "-")]
    id: String,
    /// Guest ELF to run instead of the built-in reference guest.
    #[arg(long, conflicts_with = "restore_dir")]
    guest: Option<std::path::PathBuf>,
    /// Restore the VM saved in this snapshot directory (its `vmstate`)
    /// instead of booting; needs --memory-fd.
    #[arg(long, requires = "memory_fd")]
    restore_dir: Option<std::path::PathBuf>,
    /// Inherited memfd holding the snapshot's memory (mapped copy-on-write).
    #[arg(long, requires = "restore_dir")]
    memory_fd: Option<i32>,
    /// Boot this Linux kernel (a bzImage) instead of the reference guest;
    /// needs --initrd.
    #[arg(long, requires = "initrd", conflicts_with_all = ["guest", "restore_dir"])]
    kernel: Option<std::path::PathBuf>,
    /// The Linux guest's initramfs.
    #[arg(long, requires = "kernel")]
    initrd: Option<std::path::PathBuf>,
    /// Build the VM (of --memory-mib and --vcpus) without a guest, send
    /// `Standby`, and wait for the daemon's claim: the snapshot to restore,
    /// its memfd passed over the control socket (a pooled child).
    #[arg(long, conflicts_with_all = ["guest", "restore_dir", "kernel"])]
    standby: bool,
    /// Back the cold-booted reference guest's RAM with 2 MiB huge pages
    /// (a hugetlb memfd from the host's pool); --memory-mib must be even.
    #[arg(long, conflicts_with_all = ["restore_dir", "standby", "kernel"])]
    huge_pages: bool,
    /// Words appended to the Linux guest's kernel command line.
    #[arg(long, default_value = "", requires = "kernel")]
    kernel_args: String,
    /// Where a Linux guest's serial console goes (rotated to PATH.1 at
    /// 512 KiB), booted or restored.
    #[arg(long)]
    console_log: Option<std::path::PathBuf>,
    /// Limit the background copy of LIVE snapshots to this many MiB of
    /// guest RAM per second (0: no limit).
    #[arg(long, default_value_t = 0)]
    copy_rate_mibps: u64,
    /// The daemon's `CLOCK_MONOTONIC` instant (ns) of the spawn call, so
    /// the start-up line in the log includes process start.
    #[arg(long)]
    spawned_at_ns: Option<u64>,
}

fn main() {
    let started = Instant::now();
    let main_ns = startup::monotonic_ns();
    let mut args = Args::parse();
    // SAFETY: the daemon passes this descriptor to us alone; we take
    // ownership of it here, once.
    let stream = unsafe { UnixStream::from_raw_fd(args.control_fd) };
    let writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => {
            eprintln!(
                "forkd-vmm[{}]: control fd {} unusable: {e}",
                args.id, args.control_fd
            );
            std::process::exit(2);
        }
    };
    let sink = Arc::new(EventSink::new(writer));
    // The handshake: the first frame, before anything can fail.
    sink.send(&Event::hello(env!("CARGO_PKG_VERSION")));
    let fail = |detail: String| -> ! { sink.exit(ExitReason::VmmError { detail }, 1) };

    let config = VmConfig {
        memory_mib: args.memory_mib,
        vcpus: args.vcpus,
        page_size: if args.huge_pages {
            PageSize::Huge
        } else {
            PageSize::Base
        },
    };
    // A standby VMM builds its VM now and becomes a restored child when
    // claimed; its start-up line counts from the claim.
    let (standby, timing) = if args.standby {
        let (vm, claim, memory) = await_claim(&config, &stream, &sink);
        args.id = claim.id;
        args.restore_dir = Some(claim.restore_dir);
        args.console_log = claim.console_log;
        let timing = Startup::claimed(claim.claimed_at_ns, startup::monotonic_ns());
        (Some((vm, memory)), timing)
    } else {
        (None, Startup::begin(args.spawned_at_ns, main_ns))
    };
    let timing = Arc::new(timing);
    sink.set_startup(timing.clone(), args.id.clone());
    let mark = |phase| timing.mark(phase);

    let linux_boot = match (&args.kernel, &args.initrd) {
        (Some(kernel), Some(initrd)) => Some(LinuxBoot {
            kernel,
            initrd,
            extra_args: &args.kernel_args,
        }),
        _ => None,
    };
    // A restored Linux guest's devices continue from the snapshot's state.
    let mut restored_linux = None;
    let vm = match (&args.restore_dir, args.memory_fd) {
        _ if linux_boot.is_some() => {
            linux::create_vm(&config, linux_boot.as_ref().expect("checked"))
        }
        (Some(dir), _) if standby.is_some() => {
            let (vm, memory) = standby.expect("checked");
            let mut state = read_vmstate(dir).unwrap_or_else(|e| fail(e));
            restored_linux = state.linux.take();
            mark("vmstate");
            vm.restore(&state, memory, mark)
        }
        (Some(dir), Some(memory_fd)) => {
            let mut state = read_vmstate(dir).unwrap_or_else(|e| fail(e));
            restored_linux = state.linux.take();
            // SAFETY: the daemon passes this descriptor to us alone; we take
            // ownership of it here, once.
            let memory = unsafe { File::from_raw_fd(memory_fd) };
            mark("vmstate");
            Vm::restore(&state, memory, mark)
        }
        _ => {
            let image = match &args.guest {
                Some(path) => std::fs::read(path).unwrap_or_else(|e| {
                    fail(format!("reading guest image {}: {e}", path.display()))
                }),
                None => loader::REFERENCE_GUEST.to_vec(),
            };
            Vm::create(&config, &image)
        }
    }
    .unwrap_or_else(|e| fail(e.to_string()));
    if args.restore_dir.is_none() {
        mark("vm_built");
    }
    if let Err(e) = kick::install() {
        fail(e.to_string());
    }
    let msr_indices = state::msr_indices(&vm.kvm).unwrap_or_else(|e| fail(e.to_string()));
    mark("msrs");
    let Vm {
        kvm: _kvm,
        fd: vm_fd,
        ram,
        vcpus,
        tsc_khz,
    } = vm;
    let vcpu_count = vcpus.len();
    let ram_size = ram.size();
    let dirty = DirtyLog::new(ram_size);
    if args.restore_dir.is_none() {
        // A fresh memfd is mostly holes: finding its data is quick now and
        // spares LIVE branches the walk (a restored VM's sealed memfd is
        // walked on its first LIVE branch instead, not at every fork).
        dirty
            .populated(&ram)
            .unwrap_or_else(|e| fail(e.to_string()));
    }
    let linux_devices = if linux_boot.is_some() || restored_linux.is_some() {
        let devices = linux::create_devices(
            &vm_fd,
            &ram,
            args.console_log.as_deref(),
            sink.clone(),
            started,
            restored_linux.as_ref(),
        )
        .unwrap_or_else(|e| fail(e.to_string()));
        dirty.track_device_writes(devices.device_writes.clone());
        Some(devices)
    } else {
        None
    };
    mark("devices");
    let ctx = Arc::new(VmContext {
        ram,
        coord: Coordinator::new(vcpu_count),
        sink,
        started,
        tsc_khz,
        vm: vm_fd,
        msr_indices,
        dirty,
        linux: linux_devices,
    });
    let mut threads = Vec::with_capacity(vcpu_count);
    for (index, fd) in vcpus.into_iter().enumerate() {
        let ctx = ctx.clone();
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .stack_size(256 << 10)
            .spawn(move || vcpu::run(index, fd, ctx))
            .unwrap_or_else(|e| {
                eprintln!("forkd-vmm[{}]: spawning vcpu thread: {e}", args.id);
                std::process::exit(2)
            });
        threads.push(handle.as_pthread_t());
    }
    mark("threads");
    if let (Some(devices), Some(_)) = (&ctx.linux, &restored_linux) {
        // A child of a Linux snapshot: its agent waits, channel parked, for
        // this; its answer is the child's Ready.
        if let Err(e) = devices.agent.resume_forked(&args.id) {
            ctx.sink.exit(
                ExitReason::VmmError {
                    detail: format!("starting the child's agent session: {e}"),
                },
                1,
            );
        }
    }
    let copy_rate = live::rate_from_mibps(args.copy_rate_mibps);
    control::serve(stream, ctx, threads, copy_rate)
}

/// Builds the standby VM, says so, and waits for the daemon's claim. A
/// daemon that drops its pool closes the socket: the VMM exits quietly.
fn await_claim(
    config: &VmConfig,
    stream: &UnixStream,
    sink: &EventSink,
) -> (StandbyVm, forkd_control::Claim, File) {
    let vm = StandbyVm::prepare(config).unwrap_or_else(|e| {
        sink.exit(
            ExitReason::VmmError {
                detail: e.to_string(),
            },
            1,
        )
    });
    sink.send(&Event::Standby);
    match forkd_control::recv_claim(stream) {
        Ok((claim, memory)) => (vm, claim, File::from(memory)),
        Err(forkd_control::ProtocolError::Io(e))
            if e.kind() == std::io::ErrorKind::UnexpectedEof =>
        {
            std::process::exit(0)
        }
        Err(e) => sink.exit(
            ExitReason::VmmError {
                detail: format!("reading the claim: {e}"),
            },
            1,
        ),
    }
}

/// Reads and parses a snapshot's `vmstate`.
fn read_vmstate(dir: &std::path::Path) -> Result<VmState, String> {
    let path = dir.join(forkd_snapshot_format::VMSTATE);
    let bytes = std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    VmState::from_bytes(&bytes).map_err(|e| e.to_string())
}
