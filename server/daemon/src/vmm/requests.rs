//! The request side of a VMM's connection: request ids, the writer task
//! that sends frames in order, calls answered by one event, and execs.

use forkd_control::{encode_input, encode_json, Event, Request, INPUT_CHUNK};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{mpsc, oneshot};

use super::routes::Sink;
use super::{Stop, Vmm};
use crate::sync::lock;

/// Output chunks buffered per exec before the reader waits for the caller.
const EXEC_CHANNEL: usize = 16;

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

impl Vmm {
    /// A new request id.
    pub(super) fn next_id(&self) -> u64 {
        self.next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// Queues `req` for the writer.
    pub(super) fn send(&self, req: &Request) {
        // A send error means the writer is gone; the reader reports why.
        let _ = self.writer.send(encode_json(req));
    }

    /// Opens `request`'s route to `sink`, then sends it; fails with the
    /// VMM's stop once it has stopped.
    pub(super) fn open_and_send(&self, request: &Request, sink: Sink) -> Result<(), Stop> {
        lock(&self.routes)
            .open(request, sink)
            .map_err(|_| self.stop_or_unknown())?;
        self.send(request);
        Ok(())
    }

    /// Sends a request answered by one event and waits for that event.
    pub(super) async fn call(
        &self,
        make: impl FnOnce(u64) -> Request,
    ) -> Result<Event, RequestError> {
        let (tx, rx) = oneshot::channel();
        self.open_and_send(&make(self.next_id()), Sink::One(tx))
            .map_err(RequestError::Stopped)?;
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

    /// Starts a command; its output and end arrive on the returned channel.
    /// The channel closes without `Done` if the VMM stops.
    /// A Linux command's stdin follows the request as input frames, ended
    /// by an empty one.
    pub fn start_exec(&self, cmd: ExecCommand) -> Result<(u64, mpsc::Receiver<ExecEvent>), Stop> {
        let id = self.next_id();
        let (tx, rx) = mpsc::channel(EXEC_CHANNEL);
        let has_stdin = !cmd.stdin.is_empty();
        let request = Request::Exec {
            id,
            argv: cmd.argv,
            env: cmd.env,
            cwd: cmd.cwd,
            stdin: has_stdin,
        };
        self.open_and_send(&request, Sink::Exec(tx))?;
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
}

/// The writer: sends encoded frames in order until the channel closes or
/// the socket fails.
pub(super) async fn write_loop(
    mut wr: OwnedWriteHalf,
    mut frames: mpsc::UnboundedReceiver<Vec<u8>>,
) {
    while let Some(frame) = frames.recv().await {
        if let Err(e) = wr.write_all(&frame).await {
            tracing::debug!(error = %e, "control socket write failed");
            break;
        }
    }
}
