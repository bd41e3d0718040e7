//! One standby VMM: a `forkd-vmm --standby` process that built its VM
//! (KVM VM, vCPUs, a memory slot over reserved address space) before any
//! sandbox asked for it, and waits for a claim. [`Standby::start`] starts
//! it and waits for its `Standby` event; [`Standby::claim`] hands it one
//! snapshot (the memfd travels over the control socket, see
//! `forkd_control::standby`) and makes it that sandbox's [`Vmm`]. A
//! standby serves at most one sandbox: `claim` consumes it.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use forkd_control::{check_hello, Claim, Event, KIND_JSON};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

use super::reader::read_raw;
use super::spawn::{above_inherited, inherit_as, monotonic_ns, std_to_tokio, Attach, CONTROL_FD};
use super::Vmm;
use crate::data_dir::VMM_LOG;

/// How long a standby VMM may take to build its VM.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(30);

/// The VM shape a standby is built for: a snapshot's guest RAM and vCPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shape {
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// vCPUs.
    pub vcpus: u32,
}

/// Why a standby VMM could not be started or claimed.
#[derive(Debug, thiserror::Error)]
pub enum StandbyError {
    /// Creating its socket, log or process failed.
    #[error("starting a standby VMM: {0}")]
    Launch(#[source] std::io::Error),
    /// It exited or said something else before `Standby`.
    #[error("the standby VMM did not get ready: {0}")]
    NotReady(String),
    /// It did not get ready within [`PREPARE_TIMEOUT`].
    #[error("the standby VMM did not get ready within {} s", PREPARE_TIMEOUT.as_secs())]
    Timeout,
    /// Moving its log into the sandbox directory failed.
    #[error("moving the standby's log to {}: {source}", .path.display())]
    Log {
        /// The sandbox's log path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Sending the claim failed (the standby died while waiting).
    #[error("sending the claim to the standby VMM: {0}")]
    Claim(#[from] forkd_control::ProtocolError),
}

/// A prepared, unclaimed VMM process. Dropping it kills the process.
#[derive(Debug)]
pub struct Standby {
    child: tokio::process::Child,
    stream: UnixStream,
    log: PathBuf,
}

/// What a claim makes of a standby.
#[derive(Debug)]
pub struct ClaimSpec<'a> {
    /// The sandbox id.
    pub id: &'a str,
    /// The sandbox directory (already created); the standby's log moves
    /// there as `vmm.log`.
    pub dir: &'a Path,
    /// The snapshot's directory (the VMM reads `vmstate` there).
    pub restore_dir: &'a Path,
    /// The snapshot's sealed memory.
    pub memory: &'a File,
    /// The watchdog's bound, if any.
    pub watchdog: Option<Duration>,
}

impl Standby {
    /// Starts `vmm_path --standby` for `shape`, logging to `log`, and
    /// waits until it has built its VM.
    pub async fn start(
        vmm_path: &Path,
        shape: Shape,
        log: PathBuf,
        copy_rate_mibps: u64,
    ) -> Result<Standby, StandbyError> {
        let out = File::create(&log).map_err(StandbyError::Launch)?;
        let err = out.try_clone().map_err(StandbyError::Launch)?;
        let (ours, their_end) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| StandbyError::Launch(e.into()))?;
        let mut cmd = tokio::process::Command::new(vmm_path);
        cmd.arg("--control-fd")
            .arg(CONTROL_FD.to_string())
            .arg("--standby")
            .arg("--memory-mib")
            .arg(shape.memory_mib.to_string())
            .arg("--vcpus")
            .arg(shape.vcpus.to_string())
            .arg("--id")
            .arg("standby");
        if copy_rate_mibps > 0 {
            cmd.arg("--copy-rate-mibps")
                .arg(copy_rate_mibps.to_string());
        }
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .kill_on_drop(true);
        let theirs = above_inherited(their_end.as_fd()).map_err(StandbyError::Launch)?;
        drop(their_end);
        let child_fd = theirs.as_raw_fd();
        // SAFETY: the closure runs in the forked child before exec and only
        // calls dup2 (async-signal-safe) on an fd open in the child; it is
        // above fd 4, so the dup2 cannot overwrite it first.
        unsafe {
            cmd.pre_exec(move || inherit_as(child_fd, CONTROL_FD));
        }
        let spawned = cmd.spawn();
        drop(theirs);
        let child = spawned.map_err(StandbyError::Launch)?;
        let stream = tokio::time::timeout(PREPARE_TIMEOUT, await_standby(ours))
            .await
            .map_err(|_| StandbyError::Timeout)??;
        Ok(Standby { child, stream, log })
    }

    /// Stops the standby (SIGKILL, reaped by the runtime) and removes its
    /// log.
    pub fn discard(self) {
        let _ = std::fs::remove_file(&self.log);
    }

    /// Whether the process is still running (not exited while waiting).
    pub fn is_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Host pid of the standby process.
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Makes this standby sandbox `spec.id`'s VMM, restoring the snapshot
    /// at `spec.restore_dir`. The VMM answers with `Ready` like a spawned
    /// child; on error the standby is gone (killed), and the caller can
    /// spawn a fresh VMM instead.
    pub fn claim(self, vmm_path: &Path, spec: &ClaimSpec<'_>) -> Result<Arc<Vmm>, StandbyError> {
        let log = spec.dir.join(VMM_LOG);
        std::fs::rename(&self.log, &log).map_err(|source| StandbyError::Log {
            path: log.clone(),
            source,
        })?;
        let claim = Claim {
            id: spec.id.to_string(),
            restore_dir: spec.restore_dir.to_path_buf(),
            console_log: None,
            claimed_at_ns: Some(monotonic_ns()),
        };
        forkd_control::send_claim(&self.stream, &claim, spec.memory.as_fd())?;
        let attach = Attach {
            id: spec.id,
            vmm_path,
            console_dir: None,
            watchdog: spec.watchdog,
            handshaken: true,
        };
        attach
            .start(self.child, OwnedFd::from(self.stream))
            .map_err(StandbyError::Launch)
    }
}

/// Reads the standby's hello (checked) and its `Standby` event; returns
/// the socket, blocking again, for the claim.
async fn await_standby(ours: OwnedFd) -> Result<UnixStream, StandbyError> {
    let mut stream = std_to_tokio(ours).map_err(StandbyError::Launch)?;
    let (kind, body) = read_frame(&mut stream).await?;
    check_hello(kind, &body).map_err(|e| StandbyError::NotReady(e.to_string()))?;
    let (kind, body) = read_frame(&mut stream).await?;
    let event: Option<Event> = (kind == KIND_JSON)
        .then(|| serde_json::from_slice(&body).ok())
        .flatten();
    match event {
        Some(Event::Standby) => {}
        Some(Event::Exited { reason }) => return Err(StandbyError::NotReady(reason.to_string())),
        other => {
            return Err(StandbyError::NotReady(format!(
                "expected its Standby event, got {other:?}"
            )))
        }
    }
    let stream = stream.into_std().map_err(StandbyError::Launch)?;
    stream
        .set_nonblocking(false)
        .map_err(StandbyError::Launch)?;
    Ok(stream)
}

/// The standby's next frame; EOF or a bad frame is "not ready".
async fn read_frame(stream: &mut tokio::net::UnixStream) -> Result<(u8, Vec<u8>), StandbyError> {
    match read_raw(stream).await {
        Ok(Some(frame)) => Ok(frame),
        Ok(None) => Err(StandbyError::NotReady(
            "it closed its control socket".into(),
        )),
        Err(e) => Err(StandbyError::NotReady(e.to_string())),
    }
}
