//! The reader: checks the VMM's hello, then reads its frames and routes
//! them to the requests they answer, until `Exited`, EOF or a bad frame;
//! then records why the VMM stopped and makes sure it is reaped.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use forkd_control::{
    check_hello, decode_from_vmm, parse_header, Event, FromVmm, Output, ProtocolError, HEADER_LEN,
    PROTOCOL_VERSION, STREAM_FILE,
};
use tokio::io::{AsyncReadExt, BufReader};
use tokio::net::unix::OwnedReadHalf;
use tokio::sync::mpsc;

use super::routes::Sink;
use super::{ExecEvent, FileEvent, Stop, Vmm, VmmPhase};
use crate::sync::lock;

/// How long a VMM gets to exit by itself after its last frame or EOF
/// before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(5);

/// The daemon's version, named in a protocol mismatch.
const FORKD_VERSION: &str = env!("CARGO_PKG_VERSION");

type Reader = BufReader<OwnedReadHalf>;

/// Reads frames until `Exited`, EOF or a protocol error; then records the
/// stop, drops every route (waking its waiter), and makes sure the
/// process is reaped.
/// `handshaken`: the hello was read and checked already (a standby VMM's,
/// by the pool).
pub(super) async fn read_loop(vmm: Arc<Vmm>, rd: OwnedReadHalf, handshaken: bool) {
    let mut rd = BufReader::with_capacity(64 * 1024, rd);
    let handshake = match handshaken {
        true => Ok(true),
        false => vmm.handshake(&mut rd).await,
    };
    let stop = match handshake {
        Ok(true) => vmm.read_frames(&mut rd).await,
        Ok(false) => None,
        Err(stop) => Some(stop),
    };
    let routes = lock(&vmm.routes).close();
    let stop = stop.map(|s| vmm.with_console(s));
    match stop {
        Some(stop) => {
            vmm.set_stop(stop);
            drop(routes);
            if tokio::time::timeout(EXIT_GRACE, vmm.wait_reaped())
                .await
                .is_err()
            {
                tracing::warn!(sandbox = %vmm.id, "VMM still running after its last frame; killing it");
                vmm.kill();
            }
        }
        None => {
            // EOF without `Exited`: the VMM died or closed the socket. Reap
            // it first so the reason can carry its exit status.
            let status = match tokio::time::timeout(EXIT_GRACE, vmm.wait_reaped()).await {
                Ok(status) => status,
                Err(_) => {
                    vmm.kill();
                    vmm.wait_reaped().await
                }
            };
            vmm.set_stop(vmm.with_console(Stop::failure(format!(
                "VMM exited without reporting why ({status})"
            ))));
            drop(routes);
        }
    }
    let stop = vmm.stop_or_unknown();
    let status = vmm.wait_reaped().await;
    if stop.failed {
        tracing::warn!(sandbox = %vmm.id, reason = %stop.reason, %status, "sandbox stopped");
    } else {
        tracing::info!(sandbox = %vmm.id, reason = %stop.reason, %status, "sandbox stopped");
    }
}

/// One frame: its kind and body; `None` at EOF before a frame.
pub(super) async fn read_raw(
    rd: &mut (impl tokio::io::AsyncRead + Unpin),
) -> Result<Option<(u8, Vec<u8>)>, ProtocolError> {
    let mut header = [0u8; HEADER_LEN];
    match rd.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let (len, kind) = parse_header(header)?;
    let mut body = vec![0u8; len];
    rd.read_exact(&mut body).await?;
    Ok(Some((kind, body)))
}

impl Vmm {
    /// Reads the VMM's first frame, which must be a hello of this
    /// daemon's protocol version. `Ok(false)` at EOF; `Err` with the stop
    /// when the VMM is refused (it is killed then).
    async fn handshake(&self, rd: &mut Reader) -> Result<bool, Stop> {
        let (kind, body) = match read_raw(rd).await {
            Ok(Some(frame)) => frame,
            Ok(None) => return Ok(false),
            Err(e) => return Err(self.bad_frame(e)),
        };
        self.heard();
        match check_hello(kind, &body) {
            Ok(hello) => {
                tracing::debug!(sandbox = %self.id, vmm_version = %hello.vmm_version, "VMM hello");
                Ok(true)
            }
            Err(e) => {
                let name = self
                    .vmm_path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "forkd-vmm".into());
                // The path goes to the log only: clients see no server paths.
                tracing::error!(
                    sandbox = %self.id,
                    vmm = %self.vmm_path.display(),
                    protocol = PROTOCOL_VERSION,
                    error = %e,
                    "refusing a VMM of another control protocol version"
                );
                self.kill();
                Err(Stop::failure(format!(
                    "VMM binary {name} does not match this forkd {FORKD_VERSION}: {e}; \
                     rebuild or reinstall {name} to match forkd {FORKD_VERSION} (the daemon's \
                     log names the binary's path)"
                )))
            }
        }
    }

    /// Reads and routes frames after the hello. Returns the stop of an
    /// `Exited` or a bad frame; `None` at EOF.
    async fn read_frames(&self, rd: &mut Reader) -> Option<Stop> {
        loop {
            let frame = match read_raw(rd).await {
                Ok(Some((kind, body))) => decode_from_vmm(kind, body),
                Ok(None) => return None,
                Err(e) => Err(e),
            };
            match frame {
                Ok(msg) => {
                    self.heard();
                    if let Some(stop) = self.dispatch(msg).await {
                        return Some(stop);
                    }
                }
                Err(e) => return Some(self.bad_frame(e)),
            }
        }
    }

    /// The stop for a frame that cannot be read. A VMM the daemon killed
    /// can die in the middle of a frame: that is the kill's doing, not a
    /// protocol error, and its stop reason is recorded already. Otherwise
    /// the VMM is killed.
    fn bad_frame(&self, e: ProtocolError) -> Stop {
        if self.kill_requested() {
            tracing::debug!(sandbox = %self.id, error = %e, "control stream cut by the kill");
            return self.stop_or_unknown();
        }
        tracing::warn!(sandbox = %self.id, error = %e, "bad control frame; killing the VMM");
        self.kill();
        Stop::failure(format!("VMM sent a bad control frame: {e}"))
    }

    /// Routes one decoded frame. Returns the stop when it was `Exited`.
    async fn dispatch(&self, msg: FromVmm) -> Option<Stop> {
        match msg {
            FromVmm::Output(out) => self.route_output(out).await,
            FromVmm::Event(Event::Ready { boot_us, guest }) => {
                tracing::debug!(sandbox = %self.id, boot_us, ?guest, "VMM ready");
                if let Some(guest) = guest {
                    let _ = self.guest_boot.set(guest);
                }
                self.phase.send_if_modified(|l| {
                    let booting = *l == VmmPhase::Booting;
                    if booting {
                        *l = VmmPhase::Ready;
                    }
                    booting
                });
            }
            FromVmm::Event(Event::Exited { reason }) => return Some(Stop::from_exit(&reason)),
            FromVmm::Event(event) => match event.request_id() {
                Some(id) => self.route_event(id, event).await,
                None => tracing::debug!(sandbox = %self.id, ?event, "unexpected event"),
            },
        }
        None
    }

    /// Hands an output frame to its exec (stdout, stderr) or download
    /// (the file stream).
    async fn route_output(&self, out: Output) {
        let sink = lock(&self.routes).for_output(out.id);
        match sink {
            Some(Sink::File(tx)) if out.stream == STREAM_FILE => {
                let _ = tx.send(FileEvent::Data(out.data));
            }
            Some(Sink::Exec(tx)) if out.stream != STREAM_FILE => {
                let event = ExecEvent::Output {
                    stream: out.stream,
                    data: out.data,
                };
                self.send_to_exec(&tx, event).await;
            }
            _ => tracing::debug!(
                sandbox = %self.id,
                request = out.id,
                stream = out.stream,
                "output for no exec or transfer"
            ),
        }
    }

    /// Hands an event to the request `id` it answers; the request's route
    /// closes with its last event (see `routes.rs`).
    async fn route_event(&self, id: u64, event: Event) {
        let sink = lock(&self.routes).for_event(id, &event);
        match (sink, event) {
            (Some(Sink::One(tx)), event) => {
                let _ = tx.send(event);
            }
            (Some(Sink::Copy(tx)), event) => {
                let _ = tx.send(event);
            }
            (Some(Sink::File(tx)), event) => {
                let _ = tx.send(FileEvent::Event(event));
            }
            (
                Some(Sink::Exec(tx)),
                Event::ExecDone {
                    exit_code,
                    duration_us,
                    cancelled,
                    signal,
                    ..
                },
            ) => {
                let event = ExecEvent::Done {
                    exit_code,
                    duration_us,
                    cancelled,
                    signal,
                };
                self.send_to_exec(&tx, event).await;
            }
            (Some(Sink::Exec(tx)), Event::Error { message, .. }) => {
                self.send_to_exec(&tx, ExecEvent::Refused(message)).await;
            }
            (_, event) => {
                tracing::debug!(sandbox = %self.id, ?event, "event for no request")
            }
        }
    }

    /// Hands an event to an exec's caller; while its channel is full the
    /// VMM is not read, so the watchdog does not count that time.
    async fn send_to_exec(&self, tx: &mpsc::Sender<ExecEvent>, event: ExecEvent) {
        let event = match tx.try_send(event) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Closed(_)) => return,
            Err(mpsc::error::TrySendError::Full(event)) => event,
        };
        self.reader_waiting.store(true, Ordering::SeqCst);
        let _ = tx.send(event).await;
        *lock(&self.last_heard) = Instant::now();
        self.reader_waiting.store(false, Ordering::SeqCst);
    }
}
