//! One exec from request to `Exited`: fork via [`crate::spawn`], feed its
//! stdin, forward its stdout and stderr, and report how it ended.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use forkd_agent_proto::{GuestMsg, MAX_DATA, STREAM_STDERR, STREAM_STDOUT};
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::unistd::pipe2;

use crate::channel::{Channel, Session};
use crate::files::table::Transfers;
use crate::log;
use crate::registry::{Registry, Ticket, WaitStatus};
use crate::spawn::{fork_exec, read_exec_error, ChildFds, Prepared};

/// Stdin chunks queued per exec before the dispatcher blocks (at most
/// 64 KiB each).
const STDIN_QUEUE: usize = 64;
/// Reads of up to `MAX_DATA` made after the exec is reaped, so a background
/// process that keeps writing cannot hold the exec open.
const DRAIN_READS: usize = 16;

/// What the agent's threads share.
pub struct Ctx {
    /// Writer to the host.
    pub channel: Arc<Channel>,
    /// Running execs.
    pub registry: Arc<Registry>,
    /// Running file operations.
    pub files: Arc<Transfers>,
    /// Whether the agent does init duties (the real PID 1 of a guest): only
    /// then does a forked resume touch the entropy pool, clock and hostname.
    pub init: bool,
}

impl Ctx {
    /// Sends a message about an exec or file operation of host session
    /// `session`; dropped if that session is over (retired by a forked resume).
    pub fn send_in(&self, session: Session, msg: &GuestMsg) {
        if let Err(e) = self.channel.send_in(Some(session), msg) {
            log::local(format!("cannot send {msg:?}: {e}"));
        }
    }
}

/// A validated Exec request.
pub struct Request {
    /// Exec id.
    pub id: u64,
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub cwd: Option<String>,
    /// Whether stdin frames follow.
    pub stdin: bool,
}

/// Who an exec is: the host's id, the registry's ticket and the host
/// session every frame about it belongs to.
#[derive(Clone, Copy)]
struct Tag {
    id: u64,
    ticket: Ticket,
    session: Session,
}

/// Registers the exec and runs it on its own thread. Stdin frames sent
/// after the request are queued even before the fork.
pub fn start(ctx: &Arc<Ctx>, req: Request) {
    let id = req.id;
    // Only the dispatcher (our caller) starts sessions, so this is the
    // session the request came in.
    let session = ctx.channel.session();
    let (stdin_tx, stdin_rx) = if req.stdin {
        let (tx, rx) = sync_channel(STDIN_QUEUE);
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    let (ticket, status_rx) = match ctx.registry.reserve(id, stdin_tx) {
        Ok(r) => r,
        Err(_) => {
            ctx.send_in(
                session,
                &GuestMsg::Failed {
                    id,
                    message: format!("exec id {id} is already running"),
                },
            );
            return;
        }
    };
    let tag = Tag {
        id,
        ticket,
        session,
    };
    let thread_ctx = ctx.clone();
    let spawned = thread::Builder::new()
        .name(format!("exec-{id}"))
        .spawn(move || run(&thread_ctx, tag, req, stdin_rx, status_rx));
    if let Err(e) = spawned {
        ctx.registry.remove(ticket);
        ctx.send_in(
            session,
            &GuestMsg::Failed {
                id,
                message: format!("cannot start a thread for the exec: {e}"),
            },
        );
    }
}

/// The pipes of one exec: the child's ends and the agent's ends.
struct Pipes {
    child_stdin: OwnedFd,
    agent_stdin: Option<OwnedFd>,
    stdout: (OwnedFd, OwnedFd),
    stderr: (OwnedFd, OwnedFd),
    error: (OwnedFd, OwnedFd),
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(pipe2(OFlag::O_CLOEXEC)?)
}

impl Pipes {
    fn new(stdin: bool) -> io::Result<Pipes> {
        let (child_stdin, agent_stdin) = if stdin {
            let (r, w) = pipe()?;
            (r, Some(w))
        } else {
            let null = File::options()
                .read(true)
                .open("/dev/null")
                .map(OwnedFd::from);
            match null {
                Ok(fd) => (fd, None),
                // No /dev/null: a pipe whose write end is closed reads as EOF too.
                Err(_) => (pipe()?.0, None),
            }
        };
        Ok(Pipes {
            child_stdin,
            agent_stdin,
            stdout: pipe()?,
            stderr: pipe()?,
            error: pipe()?,
        })
    }
}

/// A forked child that has exec'd, and the agent's ends of its pipes.
struct Launched {
    pid: libc::pid_t,
    started: Instant,
    stdin: Option<OwnedFd>,
    stdout: OwnedFd,
    stderr: OwnedFd,
}

/// Forks and execs the request; the error is the `Failed` message.
fn launch(ctx: &Ctx, ticket: Ticket, req: &Request) -> Result<Launched, String> {
    let prepared = Prepared::new(&req.argv, &req.env, req.cwd.as_deref())?;
    let pipes = Pipes::new(req.stdin).map_err(|e| format!("cannot create pipes: {e}"))?;
    let started = Instant::now();
    let fds = ChildFds {
        stdin: &pipes.child_stdin,
        stdout: &pipes.stdout.1,
        stderr: &pipes.stderr.1,
        error: &pipes.error.1,
    };
    let pid = ctx
        .registry
        .fork_as(ticket, || fork_exec(&prepared, &fds))
        .map_err(|e| format!("cannot fork: {e}"))?;
    let Pipes {
        child_stdin,
        agent_stdin,
        stdout,
        stderr,
        error,
    } = pipes;
    // Close the child's ends here so that EOF on our ends means they are gone.
    drop((child_stdin, stdout.1, stderr.1, error.1));
    match read_exec_error(error.0) {
        Ok(None) => {}
        Ok(Some((stage, errno))) => return Err(prepared.describe(stage, errno)),
        Err(e) => log::warn(format!("exec {}: reading the exec error pipe: {e}", req.id)),
    }
    Ok(Launched {
        pid,
        started,
        stdin: agent_stdin,
        stdout: stdout.0,
        stderr: stderr.0,
    })
}

/// Runs one exec: launch, then forward its I/O until it is reaped.
fn run(
    ctx: &Arc<Ctx>,
    tag: Tag,
    req: Request,
    stdin_rx: Option<Receiver<Vec<u8>>>,
    status_rx: Receiver<WaitStatus>,
) {
    let Tag {
        id,
        ticket,
        session,
    } = tag;
    let Launched {
        pid,
        started,
        stdin: agent_stdin,
        stdout,
        stderr,
    } = match launch(ctx, ticket, &req) {
        Ok(l) => l,
        Err(message) => {
            // A child that failed to exec is reaped as an unknown pid.
            ctx.registry.remove(ticket);
            return ctx.send_in(session, &GuestMsg::Failed { id, message });
        }
    };
    ctx.send_in(
        session,
        &GuestMsg::Started {
            id,
            pid: pid as u32,
        },
    );

    let stop = match pipe() {
        Ok((r, w)) => Some((Arc::new(r), w)),
        Err(e) => {
            log::warn(format!(
                "exec {id}: no stop pipe, output read until EOF: {e}"
            ));
            None
        }
    };
    let stop_r = stop.as_ref().map(|(r, _)| r.clone());

    if let (Some(rx), Some(pipe)) = (stdin_rx, agent_stdin) {
        let spawned = thread::Builder::new().name(format!("stdin-{id}")).spawn({
            let stop_r = stop_r.clone();
            move || feed_stdin(rx, File::from(pipe), stop_r.as_deref())
        });
        if let Err(e) = spawned {
            log::warn(format!("exec {id}: no stdin thread: {e}"));
        }
    }

    let pumps: Vec<_> = [(STREAM_STDOUT, stdout), (STREAM_STDERR, stderr)]
        .into_iter()
        .filter_map(|(stream, fd)| {
            let (ctx, stop_r) = (ctx.clone(), stop_r.clone());
            thread::Builder::new()
                .name(format!("out-{id}-{stream}"))
                .spawn(move || pump(&ctx, tag, stream, File::from(fd), stop_r.as_deref()))
                .map_err(|e| log::warn(format!("exec {id}: no output thread: {e}")))
                .ok()
        })
        .collect();

    let status = status_rx.recv();
    let duration_us = started.elapsed().as_micros() as u64;
    // Closing the stop pipe's write end tells the pumps to drain and finish.
    drop(stop);
    for p in pumps {
        let _ = p.join();
    }
    ctx.registry.remove(ticket);
    let (code, signal) = match status {
        Ok(s) if libc::WIFEXITED(s) => (Some(libc::WEXITSTATUS(s)), None),
        Ok(s) if libc::WIFSIGNALED(s) => (None, Some(libc::WTERMSIG(s))),
        Ok(s) => {
            log::warn(format!("exec {id}: unexpected wait status {s:#x}"));
            (None, None)
        }
        Err(_) => {
            log::warn(format!("exec {id}: exit status lost"));
            (None, None)
        }
    };
    ctx.send_in(
        session,
        &GuestMsg::Exited {
            id,
            code,
            signal,
            duration_us,
        },
    );
}

/// Writes queued stdin chunks to the child; an empty chunk closes the pipe.
/// Once the child stops reading (EPIPE), or the exec has ended while the
/// pipe is full, further chunks are dropped.
fn feed_stdin(rx: Receiver<Vec<u8>>, pipe: File, stop: Option<&OwnedFd>) {
    // Non-blocking writes (with poll) only when the end of the exec can
    // interrupt the wait; else a background process holding a full pipe
    // would block this thread forever.
    let stop = stop.filter(|_| fcntl(&pipe, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).is_ok());
    let mut pipe = Some(pipe);
    for chunk in rx {
        if chunk.is_empty() {
            pipe = None;
            continue;
        }
        if let Some(p) = pipe.as_mut() {
            if let Err(e) = write_chunk(p, &chunk, stop) {
                if e.kind() != io::ErrorKind::BrokenPipe {
                    log::warn(format!("writing stdin: {e}"));
                }
                pipe = None;
            }
        }
    }
}

/// Writes all of `data`; on a non-blocking pipe waits for room until `stop`
/// closes (then fails with `BrokenPipe`).
fn write_chunk(p: &mut File, mut data: &[u8], stop: Option<&OwnedFd>) -> io::Result<()> {
    while !data.is_empty() {
        match p.write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let Some(stop) = stop else { return Err(e) };
                if wait_ready(p, PollFlags::POLLOUT, stop)? {
                    return Err(io::Error::new(io::ErrorKind::BrokenPipe, "exec ended"));
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Forwards one output pipe as data frames, each as soon as bytes arrive.
/// Ends at EOF, or when `stop` closes (the exec was reaped): then it reads
/// only what is already in the pipe, so a background process that keeps the
/// pipe open does not hold the exec. Output of a retired exec is read and
/// dropped.
fn pump(ctx: &Ctx, tag: Tag, stream: u8, mut out: File, stop: Option<&OwnedFd>) {
    let Tag { id, session, .. } = tag;
    let mut buf = vec![0u8; MAX_DATA];
    let mut channel_ok = true;
    let mut forward = |data: &[u8]| {
        // On a dead channel keep reading (and dropping), so the child is not
        // blocked on a full pipe; log that once.
        if let Err(e) = ctx.channel.send_data_in(session, id, stream, data) {
            if std::mem::take(&mut channel_ok) {
                log::local(format!("exec {id}: output dropped: {e}"));
            }
        }
    };
    loop {
        if let Some(stop) = stop {
            match wait_ready(&out, PollFlags::POLLIN, stop) {
                Ok(false) => {}
                Ok(true) => return drain(&mut out, &mut buf, &mut forward),
                Err(e) => {
                    log::warn(format!("exec {id}: poll: {e}"));
                    return;
                }
            }
        }
        match out.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => forward(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::warn(format!("exec {id}: reading output: {e}"));
                return;
            }
        }
    }
}

/// Blocks until `fd` is ready for `events` (`false`) or `stop` has closed (`true`).
fn wait_ready(fd: &File, events: PollFlags, stop: &OwnedFd) -> io::Result<bool> {
    loop {
        let mut fds = [
            PollFd::new(fd.as_fd(), events),
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
        let stopped = fds[1].revents().is_some_and(|r| !r.is_empty());
        let readable = fds[0].revents().is_some_and(|r| !r.is_empty());
        if stopped {
            return Ok(true);
        }
        if readable {
            return Ok(false);
        }
    }
}

/// Reads what is in the pipe now, without waiting for more.
fn drain(out: &mut File, buf: &mut [u8], forward: &mut impl FnMut(&[u8])) {
    if let Err(e) = fcntl(&*out, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)) {
        log::warn(format!("cannot make an output pipe non-blocking: {e}"));
        return;
    }
    for _ in 0..DRAIN_READS {
        match out.read(buf) {
            Ok(0) => return,
            Ok(n) => forward(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return, // EAGAIN: empty
        }
    }
}
