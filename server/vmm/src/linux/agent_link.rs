//! The VMM's half of a Linux guest's agent channel: turns control requests
//! into `forkd-agent-proto` frames on the virtio console, and the agent's
//! frames into control events and output.

use std::collections::HashSet;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use forkd_agent_proto::{self as proto, Decoder, Frame, GuestMsg, HostMsg};
use forkd_control::{Event, ExitReason, GuestBoot, Request, INPUT_CHUNK};

use crate::devices::virtio::console::ConsoleSender;
use crate::events::EventSink;

/// Signal sent to a cancelled command's process group.
const SIGKILL: i32 = 9;
/// The id of the Resume that makes a restored child a sandbox of its own;
/// its answer is the child's `Ready`.
pub const FORK_RESUME_ID: u64 = u64::MAX;
/// Bytes of host entropy a child's kernel gets before its first command.
pub const FORK_ENTROPY_BYTES: usize = 64;

/// The host side of the channel, used by the control thread.
pub struct AgentLink {
    console: ConsoleSender,
    cancelled: Arc<Mutex<HashSet<u64>>>,
    quiesced: Arc<QuiesceAck>,
}

/// The id of the last `Quiesced` the agent sent.
#[derive(Default)]
struct QuiesceAck {
    last: Mutex<Option<u64>>,
    arrived: Condvar,
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
    /// The agent did not park its channel in time.
    #[error(
        "the guest agent did not quiesce its channel within {secs} s (is the guest overloaded \
         or its agent stuck?); the snapshot was not taken"
    )]
    NotQuiesced {
        /// The limit.
        secs: u64,
    },
    /// The host could not read entropy for a child.
    #[error("reading host entropy for the child: {0}")]
    Entropy(std::io::Error),
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

    /// Parks the agent's channel for a snapshot and waits (up to
    /// `timeout`) until its `Quiesced` arrived: then both directions are at
    /// a frame boundary and the agent writes nothing until [`Self::resume`].
    /// The caller sends nothing else to the agent meanwhile.
    pub fn quiesce(&self, id: u64, timeout: Duration) -> Result<(), LinkError> {
        *lock(&self.quiesced.last) = None;
        self.send(&HostMsg::Quiesce { id })?;
        let deadline = Instant::now() + timeout;
        let mut last = lock(&self.quiesced.last);
        while *last != Some(id) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(LinkError::NotQuiesced {
                    secs: timeout.as_secs(),
                });
            }
            last = self
                .quiesced
                .arrived
                .wait_timeout(last, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    /// Unparks the agent's channel after a snapshot (in the source VM).
    pub fn resume(&self, id: u64) -> Result<(), LinkError> {
        self.send(&HostMsg::Resume {
            id,
            forked: false,
            entropy: Vec::new(),
            unix_ns: 0,
            sandbox_id: None,
        })
    }

    /// Unparks the channel of a child restored from a snapshot, making it
    /// a sandbox of its own first: fresh host entropy, the host's wall
    /// clock, its own id as hostname. Its `Resumed` becomes `Ready`.
    pub fn resume_forked(&self, sandbox_id: &str) -> Result<(), LinkError> {
        let mut entropy = vec![0u8; FORK_ENTROPY_BYTES];
        host_entropy(&mut entropy).map_err(LinkError::Entropy)?;
        let unix_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        self.send(&HostMsg::Resume {
            id: FORK_RESUME_ID,
            forked: true,
            entropy,
            unix_ns,
            sandbox_id: Some(sandbox_id.to_string()),
        })
    }

    /// Relays a file request (upload, download, ack, abort, stat, list,
    /// remove) to the agent. Returns the request back when it is not one.
    pub fn file_request(&self, request: Request) -> Result<Result<(), LinkError>, Request> {
        let msg = match request {
            Request::WriteFile {
                id,
                path,
                mode,
                parents,
                exclusive,
            } => HostMsg::WriteFile {
                id,
                path,
                mode,
                parents,
                exclusive,
            },
            Request::ReadFile {
                id,
                path,
                offset,
                length,
                window,
            } => HostMsg::ReadFile {
                id,
                path,
                offset,
                length,
                window,
            },
            Request::FileAck { id, bytes } => HostMsg::FileAck { id, bytes },
            Request::FileAbort { id } => HostMsg::FileAbort { id },
            Request::StatFile { id, path } => HostMsg::StatFile { id, path },
            Request::ListDir { id, path } => HostMsg::ListDir { id, path },
            Request::RemoveFile {
                id,
                path,
                recursive,
            } => HostMsg::RemoveFile {
                id,
                path,
                recursive,
            },
            other => return Err(other),
        };
        Ok(self.send(&msg))
    }

    /// Forwards bytes of upload `id` (empty: the end of the file). The
    /// daemon keeps an upload within the agent's credit window, so this
    /// never queues more than that window per upload.
    pub fn file_data(&self, id: u64, data: &[u8]) -> Result<(), LinkError> {
        Ok(self
            .console
            .send(&proto::encode_data(id, proto::STREAM_FILE, data)?)?)
    }

    fn send(&self, msg: &HostMsg) -> Result<(), LinkError> {
        Ok(self.console.send(&proto::encode_json(msg)?)?)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Fills `buf` from the kernel's CRNG.
fn host_entropy(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of
        // `buf`, which we own mutably.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        filled += n as usize;
    }
    Ok(())
}

/// The guest side: decodes the agent's bytes and reports to the daemon.
pub struct GuestFrames {
    decoder: Decoder,
    sink: Arc<EventSink>,
    started: Instant,
    cancelled: Arc<Mutex<HashSet<u64>>>,
    quiesced: Arc<QuiesceAck>,
}

/// The host half before the console exists (the console needs the guest
/// half first).
pub struct UnconnectedLink {
    cancelled: Arc<Mutex<HashSet<u64>>>,
    quiesced: Arc<QuiesceAck>,
}

impl UnconnectedLink {
    /// Completes the host half with the console's sender.
    pub fn connect(self, console: ConsoleSender) -> AgentLink {
        AgentLink {
            console,
            cancelled: self.cancelled,
            quiesced: self.quiesced,
        }
    }
}

/// Builds both halves; the guest half reports through `sink`.
pub fn link_parts(sink: Arc<EventSink>, started: Instant) -> (UnconnectedLink, GuestFrames) {
    let cancelled = Arc::new(Mutex::new(HashSet::new()));
    let quiesced = Arc::new(QuiesceAck::default());
    (
        UnconnectedLink {
            cancelled: cancelled.clone(),
            quiesced: quiesced.clone(),
        },
        GuestFrames {
            decoder: Decoder::new(),
            sink,
            started,
            cancelled,
            quiesced,
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
            GuestMsg::Quiesced { id } => {
                *lock(&self.quiesced.last) = Some(id);
                self.quiesced.arrived.notify_all();
            }
            GuestMsg::Resumed { id, killed, errors } if id == FORK_RESUME_ID => {
                if !errors.is_empty() {
                    self.sink.exit(
                        ExitReason::VmmError {
                            detail: format!(
                                "the child could not be made a sandbox of its own: {}",
                                errors.join("; ")
                            ),
                        },
                        4,
                    );
                }
                eprintln!("forkd-vmm: child resumed ({killed} execs of the snapshot killed)");
                self.sink.send(&Event::Ready {
                    boot_us: self.started.elapsed().as_micros() as u64,
                    guest: None,
                });
            }
            GuestMsg::Resumed { errors, .. } => {
                for e in errors {
                    eprintln!("forkd-vmm: agent resume: {e}");
                }
            }
            GuestMsg::Log { message } => eprintln!("forkd-agent: {message}"),
            file => {
                if let Some(event) = file_event(file) {
                    self.sink.send(&event);
                }
            }
        }
    }
}

/// The control event relaying one of the agent's file answers (`None`
/// for messages that are not file answers, handled elsewhere).
fn file_event(msg: GuestMsg) -> Option<Event> {
    Some(match msg {
        GuestMsg::FileCredit { id, bytes } => Event::FileCredit { id, bytes },
        GuestMsg::FileWritten { id, size, sha256 } => Event::FileWritten { id, size, sha256 },
        GuestMsg::FileOpened { id, size } => Event::FileOpened { id, size },
        GuestMsg::FileRead { id, bytes, sha256 } => Event::FileRead { id, bytes, sha256 },
        GuestMsg::FileFailed { id, kind, message } => Event::FileFailed { id, kind, message },
        GuestMsg::FileStat { id, info } => Event::FileStat { id, info },
        GuestMsg::DirListing {
            id,
            entries,
            truncated,
        } => Event::DirListing {
            id,
            entries,
            truncated,
        },
        GuestMsg::FileRemoved { id } => Event::FileRemoved { id },
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::*;
    use crate::devices::virtio::console::Console;
    use crate::devices::virtio::device_writes::DeviceWrites;

    /// Both halves over a console with no guest behind it, reporting into
    /// one end of a socket pair (kept alive by the caller).
    fn link() -> (AgentLink, GuestFrames, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let sink = Arc::new(EventSink::new(ours));
        let (unconnected, frames) = link_parts(sink, Instant::now());
        let (_console, sender) = Console::new(Box::new(|_: &[u8]| {}), DeviceWrites::new(1 << 20));
        (unconnected.connect(sender), frames, theirs)
    }

    #[test]
    fn quiesce_times_out_without_an_answer() {
        let (agent, _frames, _peer) = link();
        let e = agent.quiesce(7, Duration::from_millis(50)).unwrap_err();
        assert!(matches!(e, LinkError::NotQuiesced { .. }), "{e}");
        assert!(e.to_string().contains("did not quiesce"), "{e}");
    }

    #[test]
    fn quiesce_returns_once_its_own_answer_arrives() {
        let (agent, mut frames, _peer) = link();
        let answer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            // An answer to an older request does not count.
            frames.receive(&proto::encode_json(&GuestMsg::Quiesced { id: 6 }).unwrap());
            frames.receive(&proto::encode_json(&GuestMsg::Quiesced { id: 7 }).unwrap());
        });
        agent.quiesce(7, Duration::from_secs(30)).unwrap();
        answer.join().unwrap();
    }

    #[test]
    fn file_answers_become_events_with_their_ids() {
        let answers = [
            GuestMsg::FileCredit { id: 1, bytes: 10 },
            GuestMsg::FileWritten {
                id: 2,
                size: 3,
                sha256: "ab".into(),
            },
            GuestMsg::FileOpened { id: 3, size: 4 },
            GuestMsg::FileRead {
                id: 4,
                bytes: 4,
                sha256: "cd".into(),
            },
            GuestMsg::FileFailed {
                id: 5,
                kind: proto::FileErrorKind::NotFound,
                message: "gone".into(),
            },
            GuestMsg::FileRemoved { id: 6 },
        ];
        for (n, answer) in answers.into_iter().enumerate() {
            let event = file_event(answer).expect("a file answer");
            assert_eq!(event.request_id(), Some(n as u64 + 1));
        }
        assert!(file_event(GuestMsg::Pong { id: 1 }).is_none());
    }

    #[test]
    fn only_file_requests_are_relayed() {
        let (agent, _frames, _peer) = link();
        let req = Request::StatFile {
            id: 1,
            path: "/".into(),
        };
        assert!(matches!(agent.file_request(req), Ok(Ok(()))));
        let ping = Request::Ping { id: 2 };
        assert_eq!(agent.file_request(ping.clone()).unwrap_err(), ping);
    }

    #[test]
    fn host_entropy_differs_between_calls() {
        let (mut a, mut b) = ([0u8; FORK_ENTROPY_BYTES], [0u8; FORK_ENTROPY_BYTES]);
        host_entropy(&mut a).unwrap();
        host_entropy(&mut b).unwrap();
        assert_ne!(a, b);
    }
}
