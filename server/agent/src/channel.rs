//! The byte stream to the host: opening it, and the shared whole-frame
//! writer, which can be parked for a snapshot and knows the host session.

use std::cell::Cell;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsFd, FromRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use forkd_agent_proto::{encode_data, encode_json, GuestMsg};
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::termios::{cfmakeraw, tcdrain, tcgetattr, tcsetattr, SetArg};

use crate::config::ChannelSpec;
use crate::error::AgentError;
use crate::log;

/// How long to wait for the channel device to appear.
const APPEAR_TIMEOUT: Duration = Duration::from_secs(30);
/// How often to look for it.
const APPEAR_POLL: Duration = Duration::from_millis(10);

/// Queued frames of never-waiting threads beyond this many are dropped.
const DEFERRED_MAX: usize = 1024;

thread_local! {
    /// Set on threads that must never wait for the channel to be unparked.
    static NEVER_WAIT: Cell<bool> = const { Cell::new(false) };
}

/// Marks the calling thread as one that must never wait for a parked
/// channel: the dispatcher (it must keep reading to see `Resume`) and the
/// reaper. Its frames are queued while the channel is parked and written
/// right after `Resumed`.
pub fn never_wait_on_this_thread() {
    NEVER_WAIT.with(|f| f.set(true));
}

/// The host session frames belong to; a forked resume starts a new one and
/// frames of older sessions are dropped instead of written.
pub type Session = u64;

struct State {
    file: File,
    /// Between `Quiesced` and `Resumed`: nothing may be written.
    parked: bool,
    /// Frames of never-waiting threads sent while parked, with their session.
    deferred: Vec<(Session, Vec<u8>)>,
}

impl State {
    fn write(&mut self, frame: &[u8]) -> io::Result<()> {
        self.file.write_all(frame)?;
        self.file.flush()
    }
}

/// The writing half of the channel, shared by all threads; every frame is
/// written whole under the lock. A blocked write blocks its caller: that is
/// the back-pressure on exec output when the host does not read.
///
/// The channel can be parked ([`Channel::park_after`]) for a snapshot: then
/// senders wait (or, on never-waiting threads, queue) until
/// [`Channel::unpark_after`].
pub struct Channel {
    state: Mutex<State>,
    unparked: Condvar,
    /// The current host session; changed only with `state` locked, read
    /// without it by [`Channel::session`] (so the dispatcher never waits for
    /// a writer just to learn it).
    session: AtomicU64,
    /// Whether the channel is a tty (then parking drains its output).
    tty: bool,
}

impl Channel {
    fn new(file: File) -> Channel {
        Channel {
            tty: is_tty(&file),
            state: Mutex::new(State {
                file,
                parked: false,
                deferred: Vec::new(),
            }),
            unparked: Condvar::new(),
            session: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes one encoded frame of `session` (`None`: of whichever session
    /// is current). While parked the caller waits (never-waiting threads
    /// queue the frame instead); a frame of a past session is dropped.
    fn send_frame_in(&self, session: Option<Session>, frame: &[u8]) -> io::Result<()> {
        let mut st = self.lock();
        if st.parked && NEVER_WAIT.with(Cell::get) {
            let session = session.unwrap_or(self.session.load(Ordering::Acquire));
            if st.deferred.len() < DEFERRED_MAX {
                st.deferred.push((session, frame.to_vec()));
            } else {
                drop(st);
                log::local("channel parked: frame dropped (queue full)");
            }
            return Ok(());
        }
        while st.parked {
            st = self.unparked.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        if session.is_some_and(|s| s != self.session.load(Ordering::Acquire)) {
            return Ok(());
        }
        st.write(frame)
    }

    /// Sends a JSON message.
    pub fn send(&self, msg: &GuestMsg) -> Result<(), AgentError> {
        self.send_in(None, msg)
    }

    /// Sends a JSON message of `session` (dropped if that session is over).
    pub fn send_in(&self, session: Option<Session>, msg: &GuestMsg) -> Result<(), AgentError> {
        let frame = encode_json(msg)?;
        self.send_frame_in(session, &frame)
            .map_err(|e| AgentError::io("writing to the channel", e))
    }

    /// Sends a chunk of exec output (at most `MAX_DATA` bytes) of `session`.
    pub fn send_data_in(
        &self,
        session: Session,
        id: u64,
        stream: u8,
        data: &[u8],
    ) -> Result<(), AgentError> {
        let frame = encode_data(id, stream, data)?;
        self.send_frame_in(Some(session), &frame)
            .map_err(|e| AgentError::io("writing to the channel", e))
    }

    /// The current host session.
    pub fn session(&self) -> Session {
        self.session.load(Ordering::Acquire)
    }

    /// Starts a new host session: frames of earlier ones, queued or yet to
    /// be sent, are dropped from now on.
    pub fn begin_session(&self) {
        let mut st = self.lock();
        let current = self.session.fetch_add(1, Ordering::AcqRel) + 1;
        st.deferred.retain(|(s, _)| *s == current);
    }

    /// Writes `frame` (the `Quiesced` answer) and parks the channel under
    /// the same lock, so no other frame follows it until unparked. Writes
    /// even when already parked. On a tty, waits (best effort) until the
    /// bytes have left the guest.
    pub fn park_after(&self, frame: &[u8]) -> io::Result<()> {
        let mut st = self.lock();
        let written = st.write(frame);
        st.parked = true;
        if self.tty && written.is_ok() {
            if let Err(e) = tcdrain(st.file.as_fd()) {
                log::local(format!("tcdrain on the channel: {e}"));
            }
        }
        written
    }

    /// Writes `frame` (the `Resumed` answer), then the frames queued while
    /// parked (of the current session only), and unparks, all under one
    /// lock: `frame` is the first frame after `Quiesced`. Unparks even if a
    /// write fails; works when not parked too.
    pub fn unpark_after(&self, frame: &[u8]) -> io::Result<()> {
        let mut st = self.lock();
        let mut result = st.write(frame);
        let current = self.session.load(Ordering::Acquire);
        for (session, queued) in std::mem::take(&mut st.deferred) {
            if session == current && result.is_ok() {
                result = st.write(&queued);
            }
        }
        st.parked = false;
        drop(st);
        self.unparked.notify_all();
        result
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
    Ok((file, Channel::new(writer)))
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
    if !is_tty(file) {
        return Ok(());
    }
    let mut t = tcgetattr(file.as_fd())?;
    cfmakeraw(&mut t);
    tcsetattr(file.as_fd(), SetArg::TCSANOW, &t)?;
    Ok(())
}

fn is_tty(file: &File) -> bool {
    // SAFETY: isatty only inspects the open fd.
    unsafe { libc::isatty(std::os::fd::AsRawFd::as_raw_fd(file)) == 1 }
}
