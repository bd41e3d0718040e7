//! One `forkd-vmm` child process and its control connection.
//!
//! [`Vmm::spawn`] (`spawn.rs`) creates a socket pair, starts the child with
//! one end as fd 3 (`--control-fd 3`) and its output in the sandbox's
//! `vmm.log`, and starts the tasks below. A child restored from a snapshot
//! also gets the snapshot's sealed memfd as fd 4 (`--memory-fd 4`) and the
//! snapshot's directory (`--restore-dir`). A Linux guest's VMM gets the
//! image's kernel and initramfs, its kernel command line and the path of
//! the serial console log instead (see [`LinuxBoot`]).
//!
//! - the *writer* (`requests.rs`) sends encoded request frames in order;
//! - the *reader* (`reader.rs`) first checks the VMM's hello (its control
//!   protocol version must be this daemon's), then decodes the VMM's
//!   frames and routes them by request id (`routes.rs`), each request's
//!   route living as long as its `forkd_control::Reply` says: one answer, an
//!   exec's output and end, a LIVE snapshot's copy events, a file
//!   transfer's events and bytes (`files.rs`); on `Exited` (or EOF) it
//!   records why the VMM stopped and drops every route, so the waiters
//!   learn the reason from [`Vmm::stop`];
//! - the *reaper* (`spawn.rs`) waits for the child to exit (or kills it on
//!   request), so no zombie remains, and sets the pid to 0;
//! - the *watchdog* (`watchdog.rs`), when asked for, sends heartbeats and
//!   kills a VMM that stops answering.
//!
//! The requests themselves are in `requests.rs` (ping, exec, cancel) and
//! `snapshot.rs` (FULL/DIFF and LIVE snapshots).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use forkd_control::{ExitReason, GuestBoot, Request};
use tokio::sync::{mpsc, oneshot, watch};

use crate::sync::lock;

pub use files::FileEvent;
pub use pool::VmmPool;
pub use requests::{ExecCommand, ExecEvent, RequestError};
pub use snapshot::{CopyEvent, CopyProgress, LiveSnapshot, Snapshotted};
pub use spawn::{LinuxBoot, RestoreSpec, VmmSpec};
pub use standby::{ClaimSpec, Shape};

mod files;
mod pool;
mod reader;
mod requests;
mod routes;
mod snapshot;
mod spawn;
mod standby;
mod watchdog;

#[cfg(test)]
mod tests;

/// Bound on waiting for a killed VMM to be reaped.
const KILL_WAIT: Duration = Duration::from_secs(10);

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
pub enum VmmPhase {
    /// Started; no `Ready` yet.
    Booting,
    /// The guest said `Ready`.
    Ready,
    /// The VMM stopped (or is stopping); no request can be sent any more.
    Stopped(Stop),
}

/// A running (or stopped) VMM and its control connection.
pub struct Vmm {
    id: String,
    /// The forkd-vmm binary, for messages about it.
    vmm_path: PathBuf,
    pid: Arc<AtomicU32>,
    next_id: AtomicU64,
    writer: mpsc::UnboundedSender<Vec<u8>>,
    routes: Mutex<routes::Routes>,
    phase: watch::Sender<VmmPhase>,
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
            .field("phase", &*self.phase.borrow())
            .finish()
    }
}

impl Vmm {
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
    pub fn phase(&self) -> VmmPhase {
        self.phase.borrow().clone()
    }

    /// Why the VMM stopped, if it did.
    pub fn stop(&self) -> Option<Stop> {
        match &*self.phase.borrow() {
            VmmPhase::Stopped(stop) => Some(stop.clone()),
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
        let mut rx = self.phase.subscribe();
        let state = rx
            .wait_for(|l| *l != VmmPhase::Booting)
            .await
            .map(|l| l.clone())
            .unwrap_or(VmmPhase::Stopped(Stop::failure("VMM connection lost")));
        match state {
            VmmPhase::Stopped(stop) => Err(stop),
            _ => Ok(()),
        }
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
        self.phase.send_if_modified(|l| {
            if matches!(l, VmmPhase::Stopped(_)) {
                false
            } else {
                *l = VmmPhase::Stopped(stop);
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

    /// A Linux guest's failed stop, with the end of its console appended
    /// (what the kernel said before it died); other stops unchanged.
    fn with_console(&self, mut stop: Stop) -> Stop {
        if let (true, Some(dir)) = (stop.failed, &self.console_dir) {
            stop.reason
                .push_str(&crate::sandbox::console::exit_suffix(dir));
        }
        stop
    }
}
