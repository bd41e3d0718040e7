//! `forkd-agent`: the guest agent of forkd's Linux guests.
//!
//! It runs as PID 1 (`/init` of the initramfs): it mounts the basic
//! filesystems, loads the modules of `/etc/forkd/modules`, sets the hostname,
//! brings up `lo`, opens the channel to the host (`/dev/hvc0`, raw mode),
//! sends `Ready` and then runs the host's commands, reaping every child. For
//! snapshots it parks the channel on `Quiesce` and, on a forked `Resume`,
//! reseeds the CRNG, steps the clock, takes the child's identity and kills
//! the snapshot's execs (see `resume`). It also moves files in and out
//! for the host, flow-controlled (see `files`). The protocol is in the
//! `forkd-agent-proto` crate; see README.md.
//!
//! Flags: `--init` / `--no-init` (force init duties on or off; default: on
//! when PID 1), `--channel PATH`, `--channel-fd N` (an inherited socket or
//! pipe, for host tests).

mod channel;
mod config;
mod entropy;
mod error;
mod exec;
mod files;
mod identity;
mod init;
mod log;
mod registry;
mod resume;
mod serve;
mod spawn;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use forkd_agent_proto::GuestMsg;
use nix::time::{clock_gettime, ClockId};

use crate::config::{channel_spec, Cmdline, Flags};
use crate::error::AgentError;
use crate::exec::Ctx;
use crate::registry::Registry;

fn main() {
    let started = Instant::now();
    let kernel_us = boottime_us();
    let pid1 = std::process::id() == 1;
    std::panic::set_hook(Box::new(|info| log::local(format!("panic: {info}"))));
    ignore_sigpipe();
    if std::env::var_os("PATH").is_none() {
        // Still single-threaded here.
        std::env::set_var("PATH", spawn::DEFAULT_ENV[0].1);
    }

    let registry = Arc::new(Registry::default());
    let reaper = registry.clone();
    if let Err(e) = thread::Builder::new()
        .name("reaper".into())
        .spawn(move || reap_forever(&reaper))
    {
        log::local(format!("cannot start the reaper thread: {e}"));
    }

    let outcome = catch_unwind(AssertUnwindSafe(|| {
        run(started, kernel_us, pid1, &registry)
    }));
    let code = match outcome {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            log::local(format!("fatal: {e}"));
            1
        }
        Err(_) => 1, // the panic hook logged it
    };
    if pid1 {
        // PID 1 exiting panics the kernel: stay and reap.
        log::local("serving ended; PID 1 keeps reaping");
        reap_forever(&registry);
    }
    std::process::exit(code);
}

/// Sets up, opens the channel, sends Ready and serves until the channel ends.
fn run(
    started: Instant,
    kernel_us: u64,
    pid1: bool,
    registry: &Arc<Registry>,
) -> Result<(), AgentError> {
    let flags = Flags::parse(std::env::args().skip(1))?;
    let init = flags.init.unwrap_or(pid1);
    // The real init logs to the kernel log; a test instance keeps to stderr.
    log::use_kmsg(init);
    let cmdline = if init { init::setup() } else { Cmdline::read() };
    ensure_std_fds();
    if !pid1 {
        become_subreaper();
    }
    let (input, channel) = channel::open(&channel_spec(&flags, &cmdline))?;
    let channel = Arc::new(channel);
    log::attach(channel.clone());
    let ctx = Arc::new(Ctx {
        channel: channel.clone(),
        registry: registry.clone(),
        files: Default::default(),
        init,
    });
    channel.send(&GuestMsg::Ready {
        version: env!("CARGO_PKG_VERSION").to_string(),
        kernel_us,
        init_us: started.elapsed().as_micros() as u64,
    })?;
    match serve::serve(&ctx, input) {
        Ok(()) => log::local("channel closed by the host"),
        Err(e) => log::local(format!("channel failed: {e}")),
    }
    Ok(())
}

fn reap_forever(registry: &Registry) -> ! {
    // Reaping must go on while the channel is parked.
    channel::never_wait_on_this_thread();
    loop {
        // A panic is logged by the hook; reaping must go on.
        let _ = catch_unwind(AssertUnwindSafe(|| registry.reap_forever()));
    }
}

/// CLOCK_BOOTTIME in microseconds (0 if unavailable).
fn boottime_us() -> u64 {
    clock_gettime(ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000)
        .unwrap_or(0)
}

/// Writing to a pipe whose reader is gone must return EPIPE, not kill the agent.
fn ignore_sigpipe() {
    // SAFETY: setting a disposition to SIG_IGN installs no handler code.
    if unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) } == libc::SIG_ERR {
        log::local("cannot ignore SIGPIPE");
    }
}

/// Makes sure fds 0, 1 and 2 are open (PID 1 may start without them), so
/// that new descriptors never take those numbers.
fn ensure_std_fds() {
    for fd in 0..3 {
        // SAFETY: F_GETFD only checks whether `fd` is open.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0 {
            continue;
        }
        // SAFETY: the path is a valid C string; the lowest free fd (this one)
        // is returned and deliberately kept open for the process's lifetime.
        let got = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) };
        if got != fd {
            log::local(format!("cannot fill fd {fd} with /dev/null (got {got})"));
        }
    }
}

/// When not PID 1, orphans of our execs are reparented to us so the reaper
/// collects them, as it would as PID 1.
fn become_subreaper() {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer argument only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        log::local(format!(
            "cannot become a child subreaper: {}",
            std::io::Error::last_os_error()
        ));
    }
}
