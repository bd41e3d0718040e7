//! Agent diagnostics: to /dev/kmsg (PID 1) or stderr, and as `Log` messages
//! over the channel once it is open (earlier ones are sent when it opens).

use std::fmt::Display;
use std::fs::OpenOptions;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use forkd_agent_proto::GuestMsg;

use crate::channel::Channel;

static TO_KMSG: AtomicBool = AtomicBool::new(false);
static CHANNEL: OnceLock<Arc<Channel>> = OnceLock::new();
static PENDING: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Sends local logs to /dev/kmsg instead of stderr (for PID 1).
pub fn use_kmsg(on: bool) {
    TO_KMSG.store(on, Ordering::Relaxed);
}

/// Logs locally only (never over the channel): for channel failures themselves.
pub fn local(msg: impl Display) {
    let line = format!("forkd-agent: {msg}\n");
    if TO_KMSG.load(Ordering::Relaxed) {
        if let Ok(mut kmsg) = OpenOptions::new().write(true).open("/dev/kmsg") {
            if kmsg.write_all(line.as_bytes()).is_ok() {
                return;
            }
        }
    }
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// Logs locally and reports to the host as a `Log` message.
pub fn warn(msg: impl Display) {
    let msg = msg.to_string();
    local(&msg);
    match CHANNEL.get() {
        Some(chan) => send(chan, msg),
        None => PENDING.lock().unwrap_or_else(|e| e.into_inner()).push(msg),
    }
}

/// Starts sending logs over `chan`, first those logged before it opened.
pub fn attach(chan: Arc<Channel>) {
    let _ = CHANNEL.set(chan.clone());
    let pending = std::mem::take(&mut *PENDING.lock().unwrap_or_else(|e| e.into_inner()));
    for msg in pending {
        send(&chan, msg);
    }
}

fn send(chan: &Channel, message: String) {
    if let Err(e) = chan.send(&GuestMsg::Log { message }) {
        local(format!("cannot send log message: {e}"));
    }
}
