//! One `forkd-vmm` child process and its control connection.
//!
//! [`Vmm::spawn`] creates a socket pair, starts the child with one end as
//! fd 3 (`--control-fd 3`) and its output in the sandbox's `vmm.log`, and
//! starts three tasks. A child restored from a snapshot also gets the
//! snapshot's sealed memfd as fd 4 (`--memory-fd 4`) and the snapshot's
//! directory (`--restore-dir`). A Linux guest's VMM gets the image's
//! kernel and initramfs, its kernel command line and the path of the
//! serial console log instead (see [`LinuxBoot`]).
//!
//! - the *writer* sends encoded request frames in order;
//! - the *reader* decodes the VMM's frames and routes them: events to the
//!   request waiting for that id (one answer, or a stream of them for a
//!   LIVE snapshot), output and `ExecDone` to the running exec's channel;
//!   on `Exited` (or EOF) it records why the VMM stopped and drops every
//!   waiter, so they learn the reason from [`Vmm::stop`];
//! - the *reaper* waits for the child to exit (or kills it on request),
//!   so no zombie remains, and sets the pid to 0.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use forkd_control::{
    decode_from_vmm, encode_input, encode_json, parse_header, Event, ExitReason, FromVmm,
    GuestBoot, Request, SnapshotMode, HEADER_LEN, INPUT_CHUNK,
};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot, watch};

pub use files::FileEvent;

use crate::api::error::BootError;
use crate::data_dir::VMM_LOG;
use crate::sync::lock;

mod files;

/// The fd number the VMM finds its control socket on.
pub const CONTROL_FD: i32 = 3;
/// The fd number a restored VMM finds the snapshot's memory on.
pub const MEMORY_FD: i32 = 4;
/// How long a VMM gets to exit by itself after its last frame or EOF
/// before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(5);
/// Bound on waiting for a killed VMM to be reaped.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// Output chunks buffered per exec before the reader waits for the caller.
const EXEC_CHANNEL: usize = 16;
/// How often the watchdog sends a heartbeat (at most; more often for a
/// watchdog bound under 4 s).
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

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

/// A command to run in the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecCommand {
    /// The command and its arguments.
    pub argv: Vec<String>,
    /// Linux: environment variables, sorted by key.
    pub env: Vec<(String, String)>,
    /// Linux: working directory; `None` means `/`.
    pub cwd: Option<String>,
    /// Linux: bytes piped to the command's stdin; empty means /dev/null.
    pub stdin: Vec<u8>,
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

/// What the VMM reported for a snapshot it wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Snapshotted {
    /// How long the vCPUs were stopped.
    pub pause_us: u64,
    /// Bytes of memory data written.
    pub bytes_written: u64,
    /// Pages in the diff, or dirtied in the epoch.
    pub dirty_pages: u64,
    /// Bytes of guest RAM.
    pub memory_bytes: u64,
}

/// How far a LIVE snapshot's background copy has come.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CopyProgress {
    /// Bytes of RAM handled so far (copied, or found zero).
    pub bytes_copied: u64,
    /// Bytes of RAM that hold data and must be handled.
    pub bytes_total: u64,
    /// Guest writes served by copying a page before it changed.
    pub faults_served: u64,
}

impl CopyProgress {
    /// Whole percent copied (0 while the total is unknown).
    pub fn percent(&self) -> u64 {
        match self.bytes_total {
            0 => 0,
            total => (self.bytes_copied.min(total) * 100) / total,
        }
    }
}

/// What a LIVE snapshot's copy reports after `Snapshotted`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CopyEvent {
    /// The copy is under way.
    Progress(CopyProgress),
    /// The copy ended; `dir/memory` is complete when `error` is `None`.
    Done {
        /// The final figures.
        progress: CopyProgress,
        /// Bytes of memory data written (holes not counted).
        bytes_written: u64,
        /// How long the copy ran.
        copy_us: u64,
        /// Why it failed (or `cancelled`).
        error: Option<String>,
    },
}

/// A LIVE snapshot whose vCPUs run again while memory is copied.
#[derive(Debug)]
pub struct LiveSnapshot {
    /// The Snapshot request's id (the id a Cancel of the copy names).
    pub request_id: u64,
    /// What the VMM reported when the vCPUs resumed.
    pub snapshotted: Snapshotted,
    /// The copy's progress and end.
    pub events: CopyEvents,
}

/// The events of one LIVE copy. Ends (`None`) without [`CopyEvent::Done`]
/// if the VMM stops.
#[derive(Debug)]
pub struct CopyEvents(mpsc::UnboundedReceiver<Event>);

impl CopyEvents {
    /// The next event; `None` once the VMM has stopped (see [`Vmm::stop`]).
    pub async fn next(&mut self) -> Option<CopyEvent> {
        loop {
            match self.0.recv().await? {
                Event::CopyProgress {
                    bytes_copied,
                    bytes_total,
                    faults_served,
                    ..
                } => {
                    return Some(CopyEvent::Progress(CopyProgress {
                        bytes_copied,
                        bytes_total,
                        faults_served,
                    }))
                }
                Event::CopyDone {
                    bytes_written,
                    bytes_copied,
                    bytes_total,
                    faults_served,
                    copy_us,
                    error,
                    ..
                } => {
                    return Some(CopyEvent::Done {
                        progress: CopyProgress {
                            bytes_copied,
                            bytes_total,
                            faults_served,
                        },
                        bytes_written,
                        copy_us,
                        error,
                    })
                }
                Event::Error { message, .. } => {
                    return Some(CopyEvent::Done {
                        progress: CopyProgress::default(),
                        bytes_written: 0,
                        copy_us: 0,
                        error: Some(message),
                    })
                }
                other => tracing::debug!(?other, "unexpected event during a live copy"),
            }
        }
    }
}

/// Why a VMM stopped, as the sandbox reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stop {
    /// Human-readable reason (the `exit_reason` of the sandbox).
    pub reason: String,
    /// True for a crash or failure (state FAILED), false for an orderly
    /// exit (state EXITED).
    pub failed: bool,
}

impl Stop {
    /// The stop the VMM reported in its `Exited` frame.
    pub fn from_exit(reason: &ExitReason) -> Stop {
        let failed = matches!(
            reason,
            ExitReason::GuestCrash { .. }
                | ExitReason::VmmError { .. }
                | ExitReason::GuestReset { .. }
        );
        Stop {
            reason: reason.to_string(),
            failed,
        }
    }

    /// A failure detected by the daemon.
    pub fn failure(reason: impl Into<String>) -> Stop {
        Stop {
            reason: reason.into(),
            failed: true,
        }
    }
}

/// Where the VMM is in its life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lifecycle {
    /// Started; no `Ready` yet.
    Booting,
    /// The guest said `Ready`.
    Ready,
    /// The VMM stopped (or is stopping); no request can be sent any more.
    Stopped(Stop),
}

/// What an exec's channel carries.
#[derive(Debug)]
pub enum ExecEvent {
    /// A chunk of output; `stream` 1 is stdout, 2 stderr.
    Output {
        /// The stream.
        stream: u8,
        /// The bytes.
        data: Vec<u8>,
    },
    /// The command ended.
    Done {
        /// Its exit code.
        exit_code: i32,
        /// Time it ran in the guest.
        duration_us: u64,
        /// Whether it ended because of a Cancel.
        cancelled: bool,
        /// Linux: the signal that ended it.
        signal: Option<i32>,
    },
    /// The VMM could not run it.
    Refused(String),
}

/// Why a request got no answer.
#[derive(Debug)]
pub enum RequestError {
    /// The VMM stopped.
    Stopped(Stop),
    /// The VMM answered with `Event::Error`.
    Refused(String),
}

#[derive(Default)]
struct Routes {
    closed: bool,
    /// Requests answered by one event.
    pending: HashMap<u64, oneshot::Sender<Event>>,
    execs: HashMap<u64, mpsc::Sender<ExecEvent>>,
    /// Requests answered by several events (LIVE snapshots), until
    /// `CopyDone` or `Error`.
    streams: HashMap<u64, mpsc::UnboundedSender<Event>>,
    /// File uploads and downloads, until their last event. Unbounded, yet
    /// bounded by the transfer's window: the VMM sends a download's bytes
    /// only as far as the daemon acknowledged them, and an upload's events
    /// are a few small credits.
    files: HashMap<u64, mpsc::UnboundedSender<FileEvent>>,
}

/// A running (or stopped) VMM and its control connection.
pub struct Vmm {
    id: String,
    pid: Arc<AtomicU32>,
    next_id: AtomicU64,
    writer: mpsc::UnboundedSender<Vec<u8>>,
    routes: Mutex<Routes>,
    lifecycle: watch::Sender<Lifecycle>,
    kill: Mutex<Option<oneshot::Sender<()>>>,
    reaped: watch::Receiver<Option<String>>,
    /// When the reader last got a frame from the VMM.
    last_heard: Mutex<Instant>,
    /// True while the reader waits for a slow exec caller instead of
    /// reading (the VMM cannot be heard then, through no fault of its own).
    reader_waiting: AtomicBool,
    /// Linux: the sandbox directory holding the console log, quoted in a
    /// failed stop's reason.
    console_dir: Option<PathBuf>,
    /// Linux: the guest's boot timing from `Ready`.
    guest_boot: OnceLock<GuestBoot>,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("id", &self.id)
            .field("pid", &self.pid())
            .field("lifecycle", &*self.lifecycle.borrow())
            .finish()
    }
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
        let spawned = cmd.spawn();
        drop(theirs);
        drop(memory);
        let mut child = spawned.map_err(launch_err)?;
        let pid = child.id().unwrap_or(0);

        let stream = std_to_tokio(ours).map_err(launch_err)?;
        let (rd, wr) = stream.into_split();
        let (writer, writer_rx) = mpsc::unbounded_channel();
        let (kill_tx, kill_rx) = oneshot::channel::<()>();
        let (reaped_tx, reaped) = watch::channel(None);
        let pid_cell = Arc::new(AtomicU32::new(pid));
        let vmm = Arc::new(Vmm {
            id: spec.id.to_string(),
            pid: pid_cell.clone(),
            next_id: AtomicU64::new(1),
            writer,
            routes: Mutex::new(Routes::default()),
            lifecycle: watch::Sender::new(Lifecycle::Booting),
            kill: Mutex::new(Some(kill_tx)),
            reaped,
            last_heard: Mutex::new(Instant::now()),
            reader_waiting: AtomicBool::new(false),
            console_dir: (spec.linux.is_some()
                || spec.restore.is_some_and(|r| r.console_log.is_some()))
            .then(|| spec.dir.to_path_buf()),
            guest_boot: OnceLock::new(),
        });

        let id = vmm.id.clone();
        tokio::spawn(async move {
            let status = tokio::select! {
                status = child.wait() => status,
                _ = kill_rx => {
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
            tracing::debug!(sandbox = %id, pid, status = %text, "VMM reaped");
            pid_cell.store(0, Ordering::SeqCst);
            let _ = reaped_tx.send(Some(text));
        });
        tokio::spawn(write_loop(wr, writer_rx));
        tokio::spawn(read_loop(vmm.clone(), rd));
        if let Some(bound) = spec.watchdog {
            tokio::spawn(watchdog(Arc::downgrade(&vmm), bound));
        }
        Ok(vmm)
    }

    /// Whether the VMM boots (or booted) a Linux image.
    pub fn is_linux(&self) -> bool {
        self.console_dir.is_some()
    }

    /// A Linux guest's boot timing, once it said `Ready`.
    pub fn guest_boot(&self) -> Option<GuestBoot> {
        self.guest_boot.get().copied()
    }

    /// Host pid of the VMM, 0 once it has been reaped.
    pub fn pid(&self) -> u32 {
        self.pid.load(Ordering::SeqCst)
    }

    /// Where the VMM is in its life.
    pub fn lifecycle(&self) -> Lifecycle {
        self.lifecycle.borrow().clone()
    }

    /// Why the VMM stopped, if it did.
    pub fn stop(&self) -> Option<Stop> {
        match &*self.lifecycle.borrow() {
            Lifecycle::Stopped(stop) => Some(stop.clone()),
            _ => None,
        }
    }

    fn stop_or_unknown(&self) -> Stop {
        self.stop()
            .unwrap_or_else(|| Stop::failure("VMM control connection closed"))
    }

    /// Waits for the guest's `Ready`; returns the VMM's stop if it stopped
    /// first.
    pub async fn wait_ready(&self) -> Result<(), Stop> {
        let mut rx = self.lifecycle.subscribe();
        let state = rx
            .wait_for(|l| *l != Lifecycle::Booting)
            .await
            .map(|l| l.clone())
            .unwrap_or(Lifecycle::Stopped(Stop::failure("VMM connection lost")));
        match state {
            Lifecycle::Stopped(stop) => Err(stop),
            _ => Ok(()),
        }
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn send(&self, req: &Request) {
        // A send error means the writer is gone; the reader reports why.
        let _ = self.writer.send(encode_json(req));
    }

    /// Sends a request answered by one event and waits for that event.
    async fn call(&self, make: impl FnOnce(u64) -> Request) -> Result<Event, RequestError> {
        let id = self.next_id();
        let (tx, rx) = oneshot::channel();
        {
            let mut routes = lock(&self.routes);
            if routes.closed {
                return Err(RequestError::Stopped(self.stop_or_unknown()));
            }
            routes.pending.insert(id, tx);
        }
        self.send(&make(id));
        match rx.await {
            Ok(Event::Error { message, .. }) => Err(RequestError::Refused(message)),
            Ok(event) => Ok(event),
            Err(_) => Err(RequestError::Stopped(self.stop_or_unknown())),
        }
    }

    /// Round trip through the guest.
    pub async fn ping(&self) -> Result<(), RequestError> {
        match self.call(|id| Request::Ping { id }).await? {
            Event::Pong { .. } => Ok(()),
            other => Err(RequestError::Refused(format!(
                "unexpected answer to ping: {other:?}"
            ))),
        }
    }

    /// Asks the VMM to write a snapshot into `dir` and waits until it has.
    pub async fn snapshot(
        &self,
        mode: SnapshotMode,
        dir: &Path,
        measure_diff: bool,
    ) -> Result<Snapshotted, RequestError> {
        let dir = dir.to_string_lossy().into_owned();
        let event = self
            .call(|id| Request::Snapshot {
                id,
                mode,
                dir,
                measure_diff,
            })
            .await?;
        match event {
            Event::Snapshotted {
                pause_us,
                bytes_written,
                dirty_pages,
                memory_bytes,
                ..
            } => Ok(Snapshotted {
                pause_us,
                bytes_written,
                dirty_pages,
                memory_bytes,
            }),
            other => Err(RequestError::Refused(format!(
                "unexpected answer to snapshot: {other:?}"
            ))),
        }
    }

    /// Asks the VMM for a LIVE snapshot into `dir` and waits until the
    /// vCPUs run again (`Snapshotted`); the copy's progress and end then
    /// arrive on the returned [`CopyEvents`]. Cancel the copy with
    /// [`Vmm::cancel`] and the returned `request_id`.
    pub async fn live_snapshot(
        &self,
        dir: &Path,
        measure_diff: bool,
    ) -> Result<LiveSnapshot, RequestError> {
        let id = self.next_id();
        let (tx, mut rx) = mpsc::unbounded_channel();
        {
            let mut routes = lock(&self.routes);
            if routes.closed {
                return Err(RequestError::Stopped(self.stop_or_unknown()));
            }
            routes.streams.insert(id, tx);
        }
        self.send(&Request::Snapshot {
            id,
            mode: SnapshotMode::Live,
            dir: dir.to_string_lossy().into_owned(),
            measure_diff,
        });
        match rx.recv().await {
            Some(Event::Snapshotted {
                pause_us,
                bytes_written,
                dirty_pages,
                memory_bytes,
                ..
            }) => Ok(LiveSnapshot {
                request_id: id,
                snapshotted: Snapshotted {
                    pause_us,
                    bytes_written,
                    dirty_pages,
                    memory_bytes,
                },
                events: CopyEvents(rx),
            }),
            Some(Event::Error { message, .. }) => Err(RequestError::Refused(message)),
            Some(other) => {
                lock(&self.routes).streams.remove(&id);
                Err(RequestError::Refused(format!(
                    "unexpected answer to a live snapshot: {other:?}"
                )))
            }
            None => Err(RequestError::Stopped(self.stop_or_unknown())),
        }
    }

    /// Starts a command; its output and end arrive on the returned channel.
    /// The channel closes without `Done` if the VMM stops.
    /// A Linux command's stdin follows the request as input frames, ended
    /// by an empty one.
    pub fn start_exec(&self, cmd: ExecCommand) -> Result<(u64, mpsc::Receiver<ExecEvent>), Stop> {
        let id = self.next_id();
        let (tx, rx) = mpsc::channel(EXEC_CHANNEL);
        {
            let mut routes = lock(&self.routes);
            if routes.closed {
                return Err(self.stop_or_unknown());
            }
            routes.execs.insert(id, tx);
        }
        let has_stdin = !cmd.stdin.is_empty();
        self.send(&Request::Exec {
            id,
            argv: cmd.argv,
            env: cmd.env,
            cwd: cmd.cwd,
            stdin: has_stdin,
        });
        if has_stdin {
            for chunk in cmd.stdin.chunks(INPUT_CHUNK) {
                let _ = self.writer.send(encode_input(id, chunk));
            }
            let _ = self.writer.send(encode_input(id, &[]));
        }
        Ok((id, rx))
    }

    /// Asks the running command, or the LIVE copy, with request id `id` to
    /// stop.
    pub fn cancel(&self, id: u64) {
        self.send(&Request::Cancel { id });
    }

    /// Marks the VMM FAILED with `reason` (unless it already stopped) and
    /// kills it.
    pub fn fail(&self, reason: &str) {
        self.set_stop(Stop::failure(reason));
        self.kill();
    }

    /// Records the stop unless one is recorded already (the first reason
    /// wins).
    fn set_stop(&self, stop: Stop) {
        self.lifecycle.send_if_modified(|l| {
            if matches!(l, Lifecycle::Stopped(_)) {
                false
            } else {
                *l = Lifecycle::Stopped(stop);
                true
            }
        });
    }

    /// Sends SIGKILL to the VMM (once; later calls do nothing).
    pub fn kill(&self) {
        if let Some(tx) = lock(&self.kill).take() {
            let _ = tx.send(());
        }
    }

    /// Whether [`Vmm::kill`] was called.
    fn kill_requested(&self) -> bool {
        lock(&self.kill).is_none()
    }

    /// Whether the VMM process has been reaped.
    pub fn is_reaped(&self) -> bool {
        self.reaped.borrow().is_some()
    }

    /// Waits until the VMM process has been reaped; returns its exit status
    /// text.
    pub async fn wait_reaped(&self) -> String {
        let mut rx = self.reaped.clone();
        let status = match rx.wait_for(Option::is_some).await {
            Ok(s) => s.clone().unwrap_or_default(),
            Err(_) => "unknown".into(),
        };
        status
    }

    /// Stops the VMM: asks it to shut down, gives it `grace`, then kills
    /// it, and returns once it has been reaped (or [`KILL_WAIT`] passed).
    pub async fn shutdown(&self, grace: Duration) {
        if self.is_reaped() {
            return;
        }
        if self.stop().is_none() {
            let id = self.next_id();
            self.send(&Request::Shutdown { id });
        }
        if tokio::time::timeout(grace, self.wait_reaped())
            .await
            .is_err()
        {
            tracing::warn!(sandbox = %self.id, "VMM did not exit after Shutdown; killing it");
            // Typically a VMM blocked writing output that an Exec client
            // does not read. The daemon asked for the stop: not a failure.
            self.set_stop(Stop {
                reason: format!(
                    "stopped by the daemon (killed: no exit within {} ms of the shutdown request)",
                    grace.as_millis()
                ),
                failed: false,
            });
            self.kill();
            if tokio::time::timeout(KILL_WAIT, self.wait_reaped())
                .await
                .is_err()
            {
                tracing::error!(sandbox = %self.id, pid = self.pid(), "VMM not reaped after SIGKILL");
            }
        }
    }

    /// Routes one decoded frame. Returns the stop when it was `Exited`.
    async fn dispatch(&self, msg: FromVmm) -> Option<Stop> {
        match msg {
            FromVmm::Output(out) if out.stream == forkd_control::STREAM_FILE => {
                let tx = lock(&self.routes).files.get(&out.id).cloned();
                match tx {
                    Some(tx) => {
                        let _ = tx.send(FileEvent::Data(out.data));
                    }
                    None => {
                        tracing::debug!(sandbox = %self.id, transfer = out.id, "file data for no transfer")
                    }
                }
            }
            FromVmm::Output(out) => {
                let tx = lock(&self.routes).execs.get(&out.id).cloned();
                match tx {
                    Some(tx) => {
                        let event = ExecEvent::Output {
                            stream: out.stream,
                            data: out.data,
                        };
                        self.send_to_exec(&tx, event).await;
                    }
                    None => {
                        tracing::debug!(sandbox = %self.id, exec = out.id, "output for no exec")
                    }
                }
            }
            FromVmm::Event(Event::Ready { boot_us, guest }) => {
                tracing::debug!(sandbox = %self.id, boot_us, ?guest, "VMM ready");
                if let Some(guest) = guest {
                    let _ = self.guest_boot.set(guest);
                }
                self.lifecycle.send_if_modified(|l| {
                    let booting = *l == Lifecycle::Booting;
                    if booting {
                        *l = Lifecycle::Ready;
                    }
                    booting
                });
            }
            FromVmm::Event(Event::ExecDone {
                id,
                exit_code,
                duration_us,
                cancelled,
                signal,
            }) => {
                let tx = lock(&self.routes).execs.remove(&id);
                if let Some(tx) = tx {
                    let event = ExecEvent::Done {
                        exit_code,
                        duration_us,
                        cancelled,
                        signal,
                    };
                    self.send_to_exec(&tx, event).await;
                }
            }
            FromVmm::Event(Event::Exited { reason }) => return Some(Stop::from_exit(&reason)),
            FromVmm::Event(event) => {
                let id = event.request_id();
                if let Some(event) = self.route_file_event(id, event) {
                    return self.route_event(id, event).await;
                }
            }
        }
        None
    }

    /// Routes an event other than the ones `dispatch` handles itself: to
    /// a LIVE snapshot's stream, a one-answer request, or (an `Error`) a
    /// running exec.
    async fn route_event(&self, id: Option<u64>, event: Event) -> Option<Stop> {
        let stream = id.and_then(|id| {
            let mut routes = lock(&self.routes);
            let last = matches!(event, Event::CopyDone { .. } | Event::Error { .. });
            if last {
                routes.streams.remove(&id)
            } else {
                routes.streams.get(&id).cloned()
            }
        });
        if let Some(stream) = stream {
            let _ = stream.send(event);
            return None;
        }
        let (waiter, exec) = {
            let mut routes = lock(&self.routes);
            let waiter = id.and_then(|id| routes.pending.remove(&id));
            let exec = match (&waiter, &event, id) {
                (None, Event::Error { .. }, Some(id)) => routes.execs.remove(&id),
                _ => None,
            };
            (waiter, exec)
        };
        match (waiter, exec, event) {
            (Some(waiter), _, event) => {
                let _ = waiter.send(event);
            }
            (None, Some(exec), Event::Error { message, .. }) => {
                self.send_to_exec(&exec, ExecEvent::Refused(message)).await;
            }
            (None, _, event) => {
                tracing::debug!(sandbox = %self.id, ?event, "event for no request")
            }
        }
        None
    }

    /// Closes the routes (no new requests) and returns the waiters so the
    /// caller can drop them after publishing the stop.
    /// Hands an event to an exec's caller; while its channel is full the
    /// VMM is not read, so the watchdog does not count that time.
    async fn send_to_exec(&self, tx: &mpsc::Sender<ExecEvent>, event: ExecEvent) {
        let event = match tx.try_send(event) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Closed(_)) => return,
            Err(mpsc::error::TrySendError::Full(event)) => event,
        };
        self.reader_waiting.store(true, Ordering::SeqCst);
        let _ = tx.send(event).await;
        *lock(&self.last_heard) = Instant::now();
        self.reader_waiting.store(false, Ordering::SeqCst);
    }

    /// A Linux guest's failed stop, with the end of its console appended
    /// (what the kernel said before it died); other stops unchanged.
    fn with_console(&self, mut stop: Stop) -> Stop {
        if let (true, Some(dir)) = (stop.failed, &self.console_dir) {
            stop.reason
                .push_str(&crate::sandbox::console::exit_suffix(dir));
        }
        stop
    }

    /// Records that the VMM sent a frame.
    fn heard(&self) {
        *lock(&self.last_heard) = Instant::now();
    }

    /// How long since the VMM was last heard; zero while the reader is not
    /// reading (waiting for a slow exec caller).
    fn silent_for(&self) -> Duration {
        let mut last = lock(&self.last_heard);
        if self.reader_waiting.load(Ordering::SeqCst) {
            *last = Instant::now();
        }
        last.elapsed()
    }

    fn close_routes(&self) -> Routes {
        let mut routes = lock(&self.routes);
        routes.closed = true;
        Routes {
            closed: true,
            pending: std::mem::take(&mut routes.pending),
            execs: std::mem::take(&mut routes.execs),
            streams: std::mem::take(&mut routes.streams),
            files: std::mem::take(&mut routes.files),
        }
    }
}

/// Makes `fd` the child's fd `target`, inheritable across exec. Runs
/// between fork and exec.
fn inherit_as(fd: i32, target: i32) -> std::io::Result<()> {
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
fn above_inherited(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    let raw = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(MEMORY_FD + 1))?;
    // SAFETY: `raw` is a new descriptor returned by F_DUPFD_CLOEXEC and is
    // owned by nothing else.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) })
}

fn std_to_tokio(fd: OwnedFd) -> std::io::Result<tokio::net::UnixStream> {
    let stream = std::os::unix::net::UnixStream::from(fd);
    stream.set_nonblocking(true)?;
    tokio::net::UnixStream::from_std(stream)
}

async fn write_loop(mut wr: OwnedWriteHalf, mut frames: mpsc::UnboundedReceiver<Vec<u8>>) {
    while let Some(frame) = frames.recv().await {
        if let Err(e) = wr.write_all(&frame).await {
            tracing::debug!(error = %e, "control socket write failed");
            break;
        }
    }
}

/// Reads frames until `Exited`, EOF or a protocol error; then records the
/// stop, fails every waiter, and makes sure the process is reaped.
/// The watchdog of one VMM: once it is ready, a heartbeat every second (or
/// a quarter of `bound`); when nothing at all was heard from the VMM for
/// `bound`, it is declared failed and killed. The heartbeat is answered by
/// the VMM's request reader, so long snapshot writes and Execs do not
/// count as silence; a stopped (SIGSTOP) or wedged process does.
async fn watchdog(vmm: std::sync::Weak<Vmm>, bound: Duration) {
    let every = HEARTBEAT_EVERY
        .min(bound / 4)
        .max(Duration::from_millis(10));
    let ready = match vmm.upgrade() {
        Some(v) => v.wait_ready().await.is_ok(),
        None => false,
    };
    if !ready {
        return;
    }
    if let Some(v) = vmm.upgrade() {
        v.heard();
    }
    loop {
        tokio::time::sleep(every).await;
        let Some(vmm) = vmm.upgrade() else { return };
        if vmm.stop().is_some() {
            return;
        }
        let silent = vmm.silent_for();
        if silent >= bound {
            let reason = format!(
                "VMM stopped answering: no heartbeat answered for {:.1} s (bound {} s, \
                 --vmm-watchdog); it was killed",
                silent.as_secs_f64(),
                bound.as_secs_f64()
            );
            tracing::error!(sandbox = %vmm.id, pid = vmm.pid(), %reason, "watchdog");
            vmm.fail(&reason);
            return;
        }
        let id = vmm.next_id();
        vmm.send(&Request::Heartbeat { id });
    }
}

async fn read_loop(vmm: Arc<Vmm>, rd: OwnedReadHalf) {
    let mut rd = BufReader::with_capacity(64 * 1024, rd);
    let stop = loop {
        match read_one(&mut rd).await {
            Ok(Some(msg)) => {
                vmm.heard();
                if let Some(stop) = vmm.dispatch(msg).await {
                    break Some(stop);
                }
            }
            Ok(None) => break None,
            // A VMM the daemon killed can die in the middle of a frame: that
            // is the kill's doing, not a protocol error, and its stop reason
            // is recorded already.
            Err(e) if vmm.kill_requested() => {
                tracing::debug!(sandbox = %vmm.id, error = %e, "control stream cut by the kill");
                break Some(vmm.stop_or_unknown());
            }
            Err(e) => {
                tracing::warn!(sandbox = %vmm.id, error = %e, "bad control frame; killing the VMM");
                vmm.kill();
                break Some(Stop::failure(format!("VMM sent a bad control frame: {e}")));
            }
        }
    };
    let waiters = vmm.close_routes();
    let stop = stop.map(|s| vmm.with_console(s));
    match stop {
        Some(stop) => {
            vmm.set_stop(stop);
            drop(waiters);
            if tokio::time::timeout(EXIT_GRACE, vmm.wait_reaped())
                .await
                .is_err()
            {
                tracing::warn!(sandbox = %vmm.id, "VMM still running after its last frame; killing it");
                vmm.kill();
            }
        }
        None => {
            // EOF without `Exited`: the VMM died or closed the socket. Reap
            // it first so the reason can carry its exit status.
            let status = match tokio::time::timeout(EXIT_GRACE, vmm.wait_reaped()).await {
                Ok(status) => status,
                Err(_) => {
                    vmm.kill();
                    vmm.wait_reaped().await
                }
            };
            vmm.set_stop(vmm.with_console(Stop::failure(format!(
                "VMM exited without reporting why ({status})"
            ))));
            drop(waiters);
        }
    }
    let stop = vmm.stop_or_unknown();
    let status = vmm.wait_reaped().await;
    if stop.failed {
        tracing::warn!(sandbox = %vmm.id, reason = %stop.reason, %status, "sandbox stopped");
    } else {
        tracing::info!(sandbox = %vmm.id, reason = %stop.reason, %status, "sandbox stopped");
    }
}

async fn read_one(
    rd: &mut BufReader<OwnedReadHalf>,
) -> Result<Option<FromVmm>, forkd_control::ProtocolError> {
    let mut header = [0u8; HEADER_LEN];
    match rd.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let (len, kind) = parse_header(header)?;
    let mut body = vec![0u8; len];
    rd.read_exact(&mut body).await?;
    decode_from_vmm(kind, body).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_reasons_map_to_states() {
        let crash = Stop::from_exit(&ExitReason::GuestCrash {
            detail: "#PF at rip=0x1".into(),
        });
        assert!(crash.failed);
        assert_eq!(crash.reason, "guest crashed: #PF at rip=0x1");
        assert!(Stop::from_exit(&ExitReason::VmmError { detail: "x".into() }).failed);
        assert!(!Stop::from_exit(&ExitReason::GuestExit { status: 0 }).failed);
        assert!(!Stop::from_exit(&ExitReason::Shutdown).failed);
        let reset = Stop::from_exit(&ExitReason::GuestReset {
            detail: "kernel panic".into(),
        });
        assert!(reset.failed);
        assert_eq!(reset.reason, "guest reset: kernel panic");
    }

    #[test]
    fn copy_percent() {
        let p = |bytes_copied, bytes_total| CopyProgress {
            bytes_copied,
            bytes_total,
            faults_served: 0,
        };
        assert_eq!(p(0, 0).percent(), 0);
        assert_eq!(p(1, 3).percent(), 33);
        assert_eq!(p(3, 3).percent(), 100);
        assert_eq!(p(9, 3).percent(), 100);
    }
}
