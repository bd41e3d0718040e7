//! The byte stream to the host: opening it, and the shared whole-frame writer.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsFd, FromRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use forkd_agent_proto::{encode_data, encode_json, GuestMsg};
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};

use crate::config::ChannelSpec;
use crate::error::AgentError;

/// How long to wait for the channel device to appear.
const APPEAR_TIMEOUT: Duration = Duration::from_secs(30);
/// How often to look for it.
const APPEAR_POLL: Duration = Duration::from_millis(10);

/// The writing half of the channel, shared by all threads; every frame is
/// written whole under the lock. A blocked write blocks its caller: that is
/// the back-pressure on exec output when the host does not read.
pub struct Channel {
    out: Mutex<File>,
}

impl Channel {
    /// Writes one encoded frame.
    pub fn send_frame(&self, frame: &[u8]) -> io::Result<()> {
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        out.write_all(frame)?;
        out.flush()
    }

    /// Sends a JSON message.
    pub fn send(&self, msg: &GuestMsg) -> Result<(), AgentError> {
        let frame = encode_json(msg)?;
        self.send_frame(&frame)
            .map_err(|e| AgentError::io("writing to the channel", e))
    }

    /// Sends a chunk of exec output (at most `MAX_DATA` bytes).
    pub fn send_data(&self, id: u64, stream: u8, data: &[u8]) -> Result<(), AgentError> {
        let frame = encode_data(id, stream, data)?;
        self.send_frame(&frame)
            .map_err(|e| AgentError::io("writing to the channel", e))
    }
}

/// Opens the channel; returns its reading half and the shared writer.
pub fn open(spec: &ChannelSpec) -> Result<(File, Channel), AgentError> {
    let file = match spec {
        ChannelSpec::Fd(fd) => adopt_fd(*fd)?,
        ChannelSpec::Path(path) => open_device(path)?,
    };
    let writer = file
        .try_clone()
        .map_err(|e| AgentError::io("duplicating the channel fd", e))?;
    Ok((
        file,
        Channel {
            out: Mutex::new(writer),
        },
    ))
}

fn adopt_fd(fd: i32) -> Result<File, AgentError> {
    let what = || format!("channel fd {fd}");
    // SAFETY: F_GETFD only checks that `fd` is an open descriptor; it touches no memory.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(AgentError::io(what(), io::Error::last_os_error()));
    }
    // SAFETY: the fd is open (checked above) and was handed to this process
    // for its exclusive use by --channel-fd; nothing else in the agent owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    fcntl(&file, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .map_err(|e| AgentError::io(format!("{}: setting FD_CLOEXEC", what()), e))?;
    Ok(file)
}

fn open_device(path: &str) -> Result<File, AgentError> {
    let start = Instant::now();
    while !Path::new(path).exists() {
        if start.elapsed() >= APPEAR_TIMEOUT {
            return Err(AgentError::ChannelTimeout {
                path: path.to_string(),
                secs: APPEAR_TIMEOUT.as_secs(),
            });
        }
        std::thread::sleep(APPEAR_POLL);
    }
    // std opens with O_CLOEXEC already.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(path)
        .map_err(|e| AgentError::io(format!("opening channel {path}"), e))?;
    make_raw_if_tty(&file).map_err(|e| AgentError::io(format!("raw mode on {path}"), e))?;
    Ok(file)
}

/// Puts a tty in raw mode (no echo, no line discipline, no output
/// processing); leaves other files alone.
fn make_raw_if_tty(file: &File) -> io::Result<()> {
    // SAFETY: isatty only inspects the open fd.
    if unsafe { libc::isatty(std::os::fd::AsRawFd::as_raw_fd(file)) } != 1 {
        return Ok(());
    }
    let mut t = tcgetattr(file.as_fd())?;
    cfmakeraw(&mut t);
    tcsetattr(file.as_fd(), SetArg::TCSANOW, &t)?;
    Ok(())
}
