//! The VMM's side of the control socket's outgoing direction: events and
//! output frames to the daemon (the first is the `Hello` that `main` sends),
//! and the single final `Exited`.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, OnceLock};

use forkd_control::{encode_json, output_header, Event, ExitReason};

use crate::startup::Startup;

/// Sends frames to the daemon; shared by the control and vCPU threads.
pub struct EventSink {
    stream: Mutex<UnixStream>,
    /// Start-up timing, reported when `Ready` is sent, and the VMM's id.
    startup: OnceLock<(Arc<Startup>, String)>,
}

impl EventSink {
    /// Wraps the write side of the control socket.
    pub fn new(stream: UnixStream) -> Self {
        EventSink {
            stream: Mutex::new(stream),
            startup: OnceLock::new(),
        }
    }

    /// Writes `startup`'s line to the log (as VMM `id`) when the guest's
    /// `Ready` is sent, whichever thread sends it. Set once; later calls
    /// are ignored.
    pub fn set_startup(&self, startup: Arc<Startup>, id: String) {
        let _ = self.startup.set((startup, id));
    }

    fn write(&self, frame: &[u8]) {
        let mut stream = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = stream.write_all(frame) {
            // Nobody is listening: the daemon is gone, so is our purpose.
            eprintln!("forkd-vmm: control socket closed ({e}); exiting");
            std::process::exit(0);
        }
    }

    /// Sends one event.
    pub fn send(&self, event: &Event) {
        if let (Event::Ready { .. }, Some((startup, id))) = (event, self.startup.get()) {
            startup.report(id, "ready");
        }
        self.write(&encode_json(event));
    }

    /// Sends an output frame whose data `fill` writes into place.
    pub fn output(&self, id: u64, stream: u8, len: usize, fill: impl FnOnce(&mut [u8])) {
        let header = output_header(id, stream, len);
        let mut frame = vec![0u8; header.len() + len];
        frame[..header.len()].copy_from_slice(&header);
        fill(&mut frame[header.len()..]);
        self.write(&frame);
    }

    /// Sends the final `Exited` event and ends the process with `code`.
    /// Concurrent callers after the first never return.
    pub fn exit(&self, reason: ExitReason, code: i32) -> ! {
        let mut stream = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        eprintln!("forkd-vmm: exiting: {reason}");
        let _ = stream.write_all(&encode_json(&Event::Exited { reason }));
        let _ = stream.flush();
        std::process::exit(code)
    }
}
