//! The VMM's half of a Linux guest's agent channel: turns control requests
//! into `forkd-agent-proto` frames on the virtio console, and the agent's
//! frames into control events and output.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use forkd_agent_proto::{self as proto, Decoder, Frame, GuestMsg, HostMsg};
use forkd_control::{Event, ExitReason, GuestBoot, INPUT_CHUNK};

use crate::devices::virtio::console::ConsoleSender;
use crate::events::EventSink;

/// Signal sent to a cancelled command's process group.
const SIGKILL: i32 = 9;

/// The host side of the channel, used by the control thread.
pub struct AgentLink {
    console: ConsoleSender,
    cancelled: Arc<Mutex<HashSet<u64>>>,
}

/// Why a message could not go to the agent.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The message does not encode (too large).
    #[error("{0}")]
    Encode(#[from] proto::ProtoError),
    /// The guest is not reading its channel.
    #[error("{0}")]
    Full(#[from] crate::devices::virtio::console::ChannelFull),
}

impl AgentLink {
    /// Sends an Exec to the agent.
    pub fn exec(
        &self,
        id: u64,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        cwd: Option<String>,
        stdin: bool,
    ) -> Result<(), LinkError> {
        self.send(&HostMsg::Exec {
            id,
            argv,
            env,
            cwd,
            stdin,
        })
    }

    /// Forwards stdin bytes of Exec `id` (empty: end of input).
    pub fn input(&self, id: u64, data: &[u8]) -> Result<(), LinkError> {
        if data.is_empty() {
            return Ok(self
                .console
                .send(&proto::encode_data(id, proto::STREAM_STDIN, &[])?)?);
        }
        for chunk in data.chunks(proto::MAX_DATA.min(INPUT_CHUNK)) {
            self.console
                .send(&proto::encode_data(id, proto::STREAM_STDIN, chunk)?)?;
        }
        Ok(())
    }

    /// Kills Exec `id`'s process group; it then ends as cancelled.
    pub fn cancel(&self, id: u64) -> Result<(), LinkError> {
        self.cancelled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id);
        self.send(&HostMsg::Kill {
            id,
            signal: SIGKILL,
        })
    }

    /// Asks the agent for a Pong.
    pub fn ping(&self, id: u64) -> Result<(), LinkError> {
        self.send(&HostMsg::Ping { id })
    }

    fn send(&self, msg: &HostMsg) -> Result<(), LinkError> {
        Ok(self.console.send(&proto::encode_json(msg)?)?)
    }
}

/// The guest side: decodes the agent's bytes and reports to the daemon.
pub struct GuestFrames {
    decoder: Decoder,
    sink: Arc<EventSink>,
    started: Instant,
    cancelled: Arc<Mutex<HashSet<u64>>>,
}

/// The host half before the console exists (the console needs the guest
/// half first).
pub struct UnconnectedLink {
    cancelled: Arc<Mutex<HashSet<u64>>>,
}

impl UnconnectedLink {
    /// Completes the host half with the console's sender.
    pub fn connect(self, console: ConsoleSender) -> AgentLink {
        AgentLink {
            console,
            cancelled: self.cancelled,
        }
    }
}

/// Builds both halves; the guest half reports through `sink`.
pub fn link_parts(sink: Arc<EventSink>, started: Instant) -> (UnconnectedLink, GuestFrames) {
    let cancelled = Arc::new(Mutex::new(HashSet::new()));
    (
        UnconnectedLink {
            cancelled: cancelled.clone(),
        },
        GuestFrames {
            decoder: Decoder::new(),
            sink,
            started,
            cancelled,
        },
    )
}

impl GuestFrames {
    /// Handles bytes the guest wrote to its channel.
    pub fn receive(&mut self, bytes: &[u8]) {
        self.decoder.push(bytes);
        while let Some(frame) = self.decoder.next() {
            match frame {
                Ok(frame) => self.handle(frame),
                Err(e) => self.sink.exit(
                    ExitReason::VmmError {
                        detail: format!("the guest agent's channel is corrupt: {e}"),
                    },
                    4,
                ),
            }
        }
    }

    fn handle(&mut self, frame: Frame) {
        let msg = match frame {
            Frame::Data { id, stream, data } => {
                if !data.is_empty() {
                    self.sink
                        .output(id, stream, data.len(), |buf| buf.copy_from_slice(&data));
                }
                return;
            }
            frame => match frame.parse_json::<GuestMsg>() {
                Some(Ok(msg)) => msg,
                Some(Err(e)) => {
                    eprintln!("forkd-vmm: unreadable agent message: {e}");
                    return;
                }
                None => return,
            },
        };
        match msg {
            GuestMsg::Ready {
                version,
                kernel_us,
                init_us,
            } => {
                eprintln!(
                    "forkd-vmm: agent {version} ready (kernel {kernel_us} us, init {init_us} us)"
                );
                self.sink.send(&Event::Ready {
                    boot_us: self.started.elapsed().as_micros() as u64,
                    guest: Some(GuestBoot { kernel_us, init_us }),
                });
            }
            GuestMsg::Started { .. } => {}
            GuestMsg::Exited {
                id,
                code,
                signal,
                duration_us,
            } => {
                let cancelled = self
                    .cancelled
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                let exit_code = match (code, signal) {
                    (_, Some(sig)) => 128 + sig,
                    (Some(code), None) => code,
                    (None, None) => -1,
                };
                self.sink.send(&Event::ExecDone {
                    id,
                    exit_code,
                    duration_us,
                    cancelled,
                    signal,
                });
            }
            GuestMsg::Failed { id, message } => {
                self.cancelled
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                self.sink.send(&Event::Error { id, message });
            }
            GuestMsg::Pong { id } => self.sink.send(&Event::Pong { id }),
            GuestMsg::Log { message } => eprintln!("forkd-agent: {message}"),
        }
    }
}
