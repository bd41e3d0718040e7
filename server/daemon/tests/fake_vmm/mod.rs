//! The fake `forkd-vmm`: this test executable started with `--control-fd`
//! (the daemon runs it via `--vmm-path`) speaks the control protocol on
//! fd 3 instead of running a VM.
//!
//! Its behaviour comes from `FORKD_FAKE_VMM` in its environment (inherited
//! from the daemon): empty for a healthy guest, `boot_fail` for a VMM that
//! fails before Ready, `slow_snapshot` for one that takes 3 s to write a
//! snapshot, `snapshot_error` for one that refuses to, `copy_error` for
//! one whose LIVE copies fail halfway, and `copy_ignores_cancel` for one
//! that does not stop a LIVE copy when cancelled.
//!
//! Without `--kernel` it is the reference guest ([`reference`]): builtin
//! programs ([`builtins`]) on a page map as memory ([`memory`]), snapshots
//! in the store's real format, LIVE copies ([`live_copy`]). With
//! `--kernel` it boots a "Linux image" instead ([`linux`]), with an
//! in-memory filesystem for the file RPCs.

mod builtins;
mod linux;
mod live_copy;
mod memory;
mod reference;

use std::io::Write;
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use forkd_control::{encode_json, Event};

pub use memory::PAGE;

/// The control socket's write half, shared by the threads that answer.
type Out = Arc<Mutex<UnixStream>>;

/// Writes one frame to the daemon (ignoring a daemon that is gone).
fn send(out: &Out, frame: &[u8]) {
    let _ = out.lock().unwrap().write_all(frame);
}

/// Runs the fake VMM with the command line `args` the daemon gave it.
pub fn run(args: &[String]) -> ! {
    let arg = |name: &str| {
        let i = args.iter().position(|a| a == name).expect("missing flag");
        args[i + 1].clone()
    };
    let fd: i32 = arg("--control-fd").parse().unwrap();
    assert_eq!(fd, 3, "the daemon passes fd 3");
    // SAFETY: fd 3 is the control socket the daemon handed us.
    let sock = unsafe { UnixStream::from_raw_fd(fd) };
    // The handshake: every VMM's first frame.
    (&sock)
        .write_all(&encode_json(&Event::hello("fake")))
        .unwrap();
    if args.iter().any(|a| a == "--kernel") {
        linux::run(sock, &arg);
    }
    reference::run(sock, args, &arg)
}
