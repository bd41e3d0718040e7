//! Starting a `forkd-vmm` child: its command line, the control socket and
//! the snapshot memory passed as fds 3 and 4, its log, and the tasks that
//! serve it (writer, reader, reaper, watchdog).

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use tokio::sync::{mpsc, oneshot, watch};

use super::{reader, requests, routes, watchdog, Vmm, VmmPhase};
use crate::api::error::BootError;
use crate::data_dir::VMM_LOG;

/// The fd number the VMM finds its control socket on.
pub const CONTROL_FD: i32 = 3;
/// The fd number a restored VMM finds the snapshot's memory on.
pub const MEMORY_FD: i32 = 4;

/// What to start.
#[derive(Debug)]
pub struct VmmSpec<'a> {
    /// The forkd-vmm binary.
    pub vmm_path: &'a Path,
    /// The sandbox id (passed as `--id`).
    pub id: &'a str,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// The sandbox directory (already created); `vmm.log` goes there.
    pub dir: &'a Path,
    /// Restore from a snapshot instead of booting.
    pub restore: Option<RestoreSpec<'a>>,
    /// Bandwidth limit of LIVE snapshot copies in MiB/s; 0 means none.
    pub copy_rate_mibps: u64,
    /// Declare the VMM failed (and kill it) when it answers no heartbeat
    /// for this long; `None`: no watchdog.
    pub watchdog: Option<Duration>,
    /// Boot a Linux image instead of the reference guest.
    pub linux: Option<LinuxBoot<'a>>,
    /// Back a cold boot's RAM with 2 MiB huge pages (`--huge-pages`); a
    /// restore takes its snapshot memfd's pages.
    pub huge_pages: bool,
}

/// The Linux image a VMM boots.
#[derive(Debug, Clone, Copy)]
pub struct LinuxBoot<'a> {
    /// The kernel (`--kernel`).
    pub kernel: &'a Path,
    /// The initramfs (`--initrd`).
    pub initrd: &'a Path,
    /// The whole kernel command line (`--kernel-args`).
    pub kernel_args: &'a str,
    /// Where the VMM writes the serial console (`--console-log`); the
    /// rotated `console.log.1` sits next to it.
    pub console_log: &'a Path,
}

/// The snapshot a VMM restores.
#[derive(Debug, Clone, Copy)]
pub struct RestoreSpec<'a> {
    /// The snapshot's directory (the VMM reads `vmstate` there).
    pub dir: &'a Path,
    /// The snapshot's sealed memory; the child gets it as [`MEMORY_FD`].
    pub memory: &'a File,
    /// A Linux snapshot's child writes its serial console here.
    pub console_log: Option<&'a Path>,
}

impl Vmm {
    /// Starts the VMM process and its connection tasks. Must run inside
    /// the tokio runtime.
    pub fn spawn(spec: &VmmSpec<'_>) -> Result<Arc<Vmm>, BootError> {
        let log_path = spec.dir.join(VMM_LOG);
        let log = std::fs::File::create(&log_path).map_err(|source| BootError::SandboxDir {
            path: log_path.clone(),
            source,
        })?;
        let launch_err = |source: std::io::Error| BootError::Launch {
            path: spec.vmm_path.to_path_buf(),
            source,
        };
        let log_err = log.try_clone().map_err(launch_err)?;
        // Both ends are close-on-exec; only the child's copy of `theirs`
        // is made inheritable, after the fork.
        let (ours, their_end) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| launch_err(e.into()))?;

        let mut cmd = tokio::process::Command::new(spec.vmm_path);
        cmd.arg("--control-fd").arg(CONTROL_FD.to_string());
        if spec.copy_rate_mibps > 0 {
            // Only when set: 0 is the VMM's own default.
            cmd.arg("--copy-rate-mibps")
                .arg(spec.copy_rate_mibps.to_string());
        }
        match &spec.restore {
            None => {
                cmd.arg("--memory-mib")
                    .arg(spec.memory_mib.to_string())
                    .arg("--vcpus")
                    .arg(spec.vcpus.to_string());
                if spec.huge_pages {
                    cmd.arg("--huge-pages");
                }
                if let Some(linux) = &spec.linux {
                    cmd.arg("--kernel")
                        .arg(linux.kernel)
                        .arg("--initrd")
                        .arg(linux.initrd)
                        .arg("--kernel-args")
                        .arg(linux.kernel_args)
                        .arg("--console-log")
                        .arg(linux.console_log);
                }
            }
            Some(restore) => {
                cmd.arg("--restore-dir")
                    .arg(restore.dir)
                    .arg("--memory-fd")
                    .arg(MEMORY_FD.to_string());
                if let Some(log) = restore.console_log {
                    cmd.arg("--console-log").arg(log);
                }
            }
        }
        cmd.arg("--id")
            .arg(spec.id)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            // Own process group: a terminal's Ctrl-C reaches only the
            // daemon, which then shuts the VMMs down in order.
            .process_group(0)
            // Backstop: a VMM whose handle is lost with the runtime dies.
            .kill_on_drop(true);
        let theirs = above_inherited(their_end.as_fd()).map_err(launch_err)?;
        drop(their_end);
        let memory = spec
            .restore
            .map(|r| above_inherited(r.memory.as_fd()))
            .transpose()
            .map_err(launch_err)?;
        let child_fd = theirs.as_raw_fd();
        let memory_fd = memory.as_ref().map(|m| m.as_raw_fd());
        // SAFETY: the closure runs in the forked child before exec and only
        // calls async-signal-safe functions (dup2, fcntl) on fds that are
        // open in the child (inherited from the parent, where `theirs` and
        // `memory` stay open until after `spawn` returns). Both are above
        // fd 4, so neither dup2 overwrites the other's source.
        unsafe {
            cmd.pre_exec(move || {
                inherit_as(child_fd, CONTROL_FD)?;
                if let Some(fd) = memory_fd {
                    inherit_as(fd, MEMORY_FD)?;
                }
                Ok(())
            });
        }
        // Start-up timing: the VMM's log line counts process start from here.
        cmd.arg("--spawned-at-ns").arg(monotonic_ns().to_string());
        let spawned = cmd.spawn();
        drop(theirs);
        drop(memory);
        let child = spawned.map_err(launch_err)?;
        let console_dir = (spec.linux.is_some()
            || spec.restore.is_some_and(|r| r.console_log.is_some()))
        .then(|| spec.dir.to_path_buf());
        let attach = Attach {
            id: spec.id,
            vmm_path: spec.vmm_path,
            console_dir,
            watchdog: spec.watchdog,
            handshaken: false,
        };
        attach.start(child, ours).map_err(launch_err)
    }
}

/// What a started child becomes a [`Vmm`] with.
pub(super) struct Attach<'a> {
    /// The sandbox id.
    pub id: &'a str,
    /// The forkd-vmm binary, for messages.
    pub vmm_path: &'a Path,
    /// Linux: the sandbox directory holding the console log.
    pub console_dir: Option<std::path::PathBuf>,
    /// The watchdog's bound, if any.
    pub watchdog: Option<Duration>,
    /// Whether the VMM's hello was read and checked already (a standby's).
    pub handshaken: bool,
}

impl Attach<'_> {
    /// Makes the running `child`, connected by `ours`, a [`Vmm`] and
    /// starts its tasks (writer, reader, reaper, watchdog).
    pub(super) fn start(
        self,
        child: tokio::process::Child,
        ours: OwnedFd,
    ) -> std::io::Result<Arc<Vmm>> {
        let pid = child.id().unwrap_or(0);
        let stream = std_to_tokio(ours)?;
        let (rd, wr) = stream.into_split();
        let (writer, writer_rx) = mpsc::unbounded_channel();
        let (kill_tx, kill_rx) = oneshot::channel::<()>();
        let (reaped_tx, reaped) = watch::channel(None);
        let pid_cell = Arc::new(AtomicU32::new(pid));
        let vmm = Arc::new(Vmm {
            id: self.id.to_string(),
            vmm_path: self.vmm_path.to_path_buf(),
            pid: pid_cell.clone(),
            next_id: AtomicU64::new(1),
            writer,
            routes: Mutex::new(routes::Routes::default()),
            phase: watch::Sender::new(VmmPhase::Booting),
            kill: Mutex::new(Some(kill_tx)),
            reaped,
            last_heard: Mutex::new(Instant::now()),
            reader_waiting: AtomicBool::new(false),
            console_dir: self.console_dir,
            guest_boot: OnceLock::new(),
        });

        tokio::spawn(reap(vmm.id.clone(), child, kill_rx, pid_cell, reaped_tx));
        tokio::spawn(requests::write_loop(wr, writer_rx));
        tokio::spawn(reader::read_loop(vmm.clone(), rd, self.handshaken));
        if let Some(bound) = self.watchdog {
            tokio::spawn(watchdog::watchdog(Arc::downgrade(&vmm), bound));
        }
        Ok(vmm)
    }
}

/// The reaper: waits for the child to exit, or kills it when `kill` fires,
/// then sets the pid to 0 and publishes the exit status.
async fn reap(
    id: String,
    mut child: tokio::process::Child,
    kill: oneshot::Receiver<()>,
    pid: Arc<AtomicU32>,
    reaped: watch::Sender<Option<String>>,
) {
    let status = tokio::select! {
        status = child.wait() => status,
        _ = kill => {
            if let Err(e) = child.start_kill() {
                tracing::debug!(sandbox = %id, error = %e, "kill failed (already exited?)");
            }
            child.wait().await
        }
    };
    let text = match status {
        Ok(s) => s.to_string(),
        Err(e) => format!("wait failed: {e}"),
    };
    tracing::debug!(sandbox = %id, pid = pid.load(Ordering::SeqCst), status = %text, "VMM reaped");
    pid.store(0, Ordering::SeqCst);
    let _ = reaped.send(Some(text));
}

/// Makes `fd` the child's fd `target`, inheritable across exec. Runs
/// between fork and exec.
pub(super) fn inherit_as(fd: i32, target: i32) -> std::io::Result<()> {
    // SAFETY: dup2 in the child onto a descriptor number it does not use
    // otherwise; the duplicate does not carry FD_CLOEXEC, and stdio (0-2)
    // is already set up at this point. `fd` is never equal to `target`
    // (see `above_inherited`).
    if unsafe { libc::dup2(fd, target) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A close-on-exec duplicate of `fd` numbered above [`MEMORY_FD`]: the
/// child's stdio setup and its `dup2`s onto 3 and 4 then cannot overwrite
/// it before it is used (possible when the daemon was started with a
/// standard stream closed, or when the fd happens to be 3 or 4).
pub(super) fn above_inherited(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    let raw = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(MEMORY_FD + 1))?;
    // SAFETY: `raw` is a new descriptor returned by F_DUPFD_CLOEXEC and is
    // owned by nothing else.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) })
}

pub(super) fn std_to_tokio(fd: OwnedFd) -> std::io::Result<tokio::net::UnixStream> {
    let stream = std::os::unix::net::UnixStream::from(fd);
    stream.set_nonblocking(true)?;
    tokio::net::UnixStream::from_std(stream)
}

/// `CLOCK_MONOTONIC` now, in ns: the clock `forkd-vmm` times its start-up
/// on (`--spawned-at-ns`).
pub(super) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always
    // exists, so the call cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
