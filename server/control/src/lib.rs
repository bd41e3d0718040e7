//! The control protocol between the `forkd` daemon and one `forkd-vmm`.
//!
//! The daemon creates a Unix stream socket pair and hands one end to the VMM
//! process as `--control-fd`. Both directions carry frames:
//!
//! ```text
//! u32 LE length of (kind + body) | u8 kind | body
//! ```
//!
//! Kind [`KIND_JSON`] carries a [`Request`] (daemon to VMM) or an [`Event`]
//! (VMM to daemon) as JSON: small, rare and easy to read in a log. Kind
//! [`KIND_OUTPUT`] carries command output as raw bytes, so the bulk path
//! never goes through JSON: `u64 LE exec id | u8 stream | data`. Kind
//! [`KIND_INPUT`] (daemon to VMM) carries a command's standard input the same
//! way: `u64 LE exec id | data`, at most [`INPUT_CHUNK`] bytes of data per
//! frame, ended by a frame with no data (EOF).
//!
//! Requests carry an `id`; the VMM answers each with events carrying the
//! same id. Which events those are, and which one is the last, is the
//! request's [`Reply`] ([`Request::reply`]): the daemon routes by it.
//! [`Event::Exited`] is unsolicited and is always the VMM's last frame.
//!
//! # Versions
//!
//! The VMM's first frame is always [`Event::Hello`], carrying the
//! [`PROTOCOL_VERSION`] it was built with; the daemon checks it with
//! [`check_hello`] and refuses a VMM that speaks another version (or none:
//! one that predates versioning). A new field marked `#[serde(default)]`
//! needs no new version, since older JSON still parses; any other change
//! does (a request or event added or removed, a meaning changed).
//! Version 2 added the standby VMM's [`Event::Standby`] and its claim
//! ([`standby`]).
//!
//! # Guests
//!
//! The reference guest runs builtins, one [`Request::Exec`] at a time: the
//! VMM queues the others. A Linux guest (the VMM started with `--kernel`)
//! runs real programs through its agent and does not queue: several Execs
//! run at once. There [`Request::Cancel`] kills the command's whole process
//! group with SIGKILL, and the command then ends with [`Event::ExecDone`]
//! carrying `cancelled: true` and `signal: Some(9)`. A command the agent
//! cannot start (`cannot run "x": No such file or directory`) is answered
//! by [`Event::Error`] with the Exec's id instead of `ExecDone`.
//!
//! # Files (Linux guests)
//!
//! [`Request::WriteFile`], [`Request::ReadFile`], [`Request::StatFile`],
//! [`Request::ListDir`] and [`Request::RemoveFile`] are relayed to the
//! guest agent one to one (see `forkd-agent-proto`), and so are their
//! answers ([`Event::FileCredit`] .. [`Event::FileRemoved`]). An upload's
//! bytes follow its request as [`KIND_FILE_DATA`] frames (`u64 LE id |
//! data`, at most [`FILE_CHUNK`] bytes, ended by an empty one); a download's
//! bytes come back as [`KIND_OUTPUT`] frames with stream [`STREAM_FILE`].
//! Neither side buffers a transfer: the daemon keeps an upload within
//! [`FILE_WRITE_WINDOW`] bytes of the agent's cumulative
//! [`Event::FileCredit`], and acknowledges a download's bytes with
//! [`Request::FileAck`] as its client takes them, so at most the `window`
//! it asked for is in flight. The reference guest has no files: the VMM
//! answers these requests with [`Event::Error`].
//!
//! New fields are `#[serde(default)]`, so messages of an older build of
//! the same protocol version still parse.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

pub use forkd_agent_proto::{FileErrorKind, FileInfo, FileKind, FILE_WRITE_WINDOW};
pub use handshake::{check_hello, HandshakeError, Hello, PROTOCOL_VERSION};
pub use reply::Reply;
pub use standby::{recv_claim, send_claim, Claim};

mod handshake;
mod reply;
pub mod standby;

/// Frame kind of a JSON [`Request`] or [`Event`].
pub const KIND_JSON: u8 = 1;
/// Frame kind of an [`Output`] chunk.
pub const KIND_OUTPUT: u8 = 2;
/// Frame kind of a chunk of an Exec's standard input (daemon to VMM).
pub const KIND_INPUT: u8 = 3;
/// Most data bytes one input frame carries.
pub const INPUT_CHUNK: usize = 64 << 10;
/// Frame kind of a chunk of a file upload (daemon to VMM): `u64 LE id | data`.
pub const KIND_FILE_DATA: u8 = 4;
/// Most data bytes one file-data frame carries (one agent data frame).
pub const FILE_CHUNK: usize = forkd_agent_proto::MAX_DATA;
/// The [`Output`] stream of a download's bytes.
pub const STREAM_FILE: u8 = forkd_agent_proto::STREAM_FILE;
/// Bytes before a frame's body: length and kind.
pub const HEADER_LEN: usize = 5;
/// Largest frame body accepted (guards against a corrupt length).
pub const MAX_FRAME: usize = 16 << 20;

/// Errors reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The socket failed or closed.
    #[error("control socket I/O: {0}")]
    Io(#[from] io::Error),
    /// A frame's length is zero or above [`MAX_FRAME`].
    #[error("control frame of {0} bytes is out of range")]
    BadLength(usize),
    /// A frame kind this version does not know.
    #[error("unknown control frame kind {0}")]
    BadKind(u8),
    /// An output frame too short to hold its header.
    #[error("truncated output frame")]
    TruncatedOutput,
    /// An input frame too short to hold its exec id.
    #[error("truncated input frame")]
    TruncatedInput,
    /// A file-data frame too short to hold its transfer id, or too long.
    #[error("file data frame of {0} bytes is out of range")]
    BadFileData(usize),
    /// A JSON body that does not parse as the expected message.
    #[error("malformed control message: {0}")]
    Json(#[from] serde_json::Error),
    /// A standby's claim arrived without the snapshot's memfd.
    #[error("the claim carries no memory fd (SCM_RIGHTS)")]
    MissingFd,
}

/// A request from the daemon to the VMM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// Round trip through the guest's agent; answered by [`Event::Pong`].
    Ping {
        /// Correlation id; the answering events carry it.
        id: u64,
    },
    /// Liveness check of the VMM process, answered at once by
    /// [`Event::Alive`] from the thread that reads requests, whatever the
    /// control thread and the guest are busy with (a snapshot write, an
    /// Exec). The daemon's watchdog sends one every second.
    Heartbeat {
        /// Correlation id; the answering events carry it.
        id: u64,
    },
    /// Run a command; answered by [`Output`] frames, then [`Event::ExecDone`]
    /// (or [`Event::Error`] when it cannot start). The reference guest runs
    /// a builtin and takes none of the Linux-only fields.
    Exec {
        /// Correlation id: the command's output frames and answer carry it,
        /// and [`Request::Cancel`] and input frames name the command by it.
        id: u64,
        /// The command and its arguments; the reference guest takes a
        /// builtin's name and arguments.
        argv: Vec<String>,
        /// Linux: variables added to the guest's environment, in order.
        #[serde(default)]
        env: Vec<(String, String)>,
        /// Linux: the working directory; `None` means `/`.
        #[serde(default)]
        cwd: Option<String>,
        /// Linux: `true` when the command's stdin follows as input frames
        /// ([`encode_input`]) ended by an empty one; `false` means
        /// `/dev/null`.
        #[serde(default)]
        stdin: bool,
    },
    /// Ask the running Exec `id` to stop; it then ends with `cancelled`.
    /// If `id` is a LIVE snapshot whose memory is still being copied, the
    /// copy stops and ends with [`Event::CopyDone`] carrying an error.
    Cancel {
        /// The id of the Exec (or LIVE Snapshot) to stop.
        id: u64,
    },
    /// Stop the guest and exit; answered by [`Event::Exited`].
    Shutdown {
        /// Correlation id (the answer, [`Event::Exited`], carries none).
        id: u64,
    },
    /// Capture the VM into `dir` (which must exist and be empty); answered
    /// by [`Event::Snapshotted`]. The VMM pauses the vCPUs, writes
    /// `dir/vmstate` and `dir/memory` (a sparse file the size of guest RAM;
    /// holes are zero pages), and for [`SnapshotMode::Diff`] also
    /// `dir/pages` (a bitmap, bit `i` of byte `i / 8`, LSB first, set for
    /// every page the diff holds; a set bit over a hole means a zero page).
    /// Then it starts a new dirty-tracking epoch and resumes. The files are
    /// written but not fsynced: the daemon fsyncs when it commits.
    ///
    /// With [`SnapshotMode::Live`], `Snapshotted` comes as soon as the vCPUs
    /// run again, with `dir/vmstate` written and `dir/memory` still being
    /// filled in the background by a userfaultfd write-protect copy; then
    /// [`Event::CopyProgress`] about every 100 ms and finally one
    /// [`Event::CopyDone`] with the same id. `dir/memory` is complete (and
    /// holds guest RAM exactly as it was at the pause) only after a
    /// `CopyDone` without error. One live copy runs at a time: another
    /// Snapshot request during it is answered with [`Event::Error`].
    Snapshot {
        /// Correlation id; the answering events carry it.
        id: u64,
        /// Which pages go into `dir/memory`, and whether the vCPUs run while
        /// it is written.
        mode: SnapshotMode,
        /// Existing empty directory that receives the files (a host path).
        dir: String,
        /// With `Full`, also count the pages dirtied in the epoch.
        measure_diff: bool,
    },
    /// Linux: upload a file to `path`; its bytes follow as
    /// [`KIND_FILE_DATA`] frames ended by an empty one. Answered by
    /// [`Event::FileCredit`]s, then [`Event::FileWritten`] or
    /// [`Event::FileFailed`].
    WriteFile {
        /// Transfer id: the file-data frames, credits and the answer carry it.
        id: u64,
        /// Absolute path in the guest.
        path: String,
        /// Permission bits; 0 means 0o644.
        mode: u32,
        /// Create missing parent directories.
        parents: bool,
        /// Fail if `path` exists instead of replacing it.
        exclusive: bool,
    },
    /// Linux: download `length` bytes (0: to the end) of `path` from
    /// `offset`. Answered by [`Event::FileOpened`], output frames with
    /// stream [`STREAM_FILE`], then [`Event::FileRead`]; or
    /// [`Event::FileFailed`]. At most `window` bytes beyond the last
    /// [`Request::FileAck`] are sent.
    ReadFile {
        /// Transfer id: the output frames, acks and answers carry it.
        id: u64,
        /// Absolute path in the guest.
        path: String,
        /// First byte to send.
        offset: u64,
        /// Most bytes to send; 0 means up to the end of the file.
        length: u64,
        /// Most bytes in flight beyond the daemon's last ack.
        window: u32,
    },
    /// Linux: the daemon has taken `bytes` bytes (cumulative) of download `id`.
    FileAck {
        /// The download's transfer id.
        id: u64,
        /// Bytes taken since the download began (not since the last ack).
        bytes: u64,
    },
    /// Linux: stop upload or download `id` (its client went away); it ends
    /// with [`Event::FileFailed`] of kind `aborted` unless already ended.
    FileAbort {
        /// The transfer to stop.
        id: u64,
    },
    /// Linux: describe `path` (`lstat`): [`Event::FileStat`] or [`Event::FileFailed`].
    StatFile {
        /// Correlation id; the answering events carry it.
        id: u64,
        /// Absolute path in the guest; a symlink is described, not followed.
        path: String,
    },
    /// Linux: list a directory: [`Event::DirListing`] or [`Event::FileFailed`].
    ListDir {
        /// Correlation id; the answering events carry it.
        id: u64,
        /// Absolute path of the directory in the guest.
        path: String,
    },
    /// Linux: remove a path: [`Event::FileRemoved`] or [`Event::FileFailed`].
    RemoveFile {
        /// Correlation id; the answering events carry it.
        id: u64,
        /// Absolute path in the guest.
        path: String,
        /// Remove a directory with its contents (else only files, symlinks
        /// and empty directories).
        recursive: bool,
    },
}

/// How a snapshot captures guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotMode {
    /// Every non-zero page of guest RAM.
    Full,
    /// Only the pages written since the last snapshot (or, in a VM restored
    /// from a snapshot, since the restore): KVM's dirty log plus the pages
    /// the VMM itself wrote (the agent mailbox).
    Diff,
    /// Like `Full`, but the vCPUs run while memory is copied: the pause
    /// covers only the vCPU/device state and write-protecting the pages
    /// written since protection was armed (see [`Request::Snapshot`]).
    Live,
}

impl Request {
    /// The request's correlation id.
    pub fn id(&self) -> u64 {
        match self {
            Request::Ping { id }
            | Request::Heartbeat { id }
            | Request::Exec { id, .. }
            | Request::Cancel { id }
            | Request::Shutdown { id }
            | Request::Snapshot { id, .. }
            | Request::WriteFile { id, .. }
            | Request::ReadFile { id, .. }
            | Request::FileAck { id, .. }
            | Request::FileAbort { id }
            | Request::StatFile { id, .. }
            | Request::ListDir { id, .. }
            | Request::RemoveFile { id, .. } => *id,
        }
    }
}

/// Why a VMM stopped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ExitReason {
    /// The daemon asked for it.
    Shutdown,
    /// The guest powered off with this status.
    GuestExit {
        /// What the reference guest wrote to its shutdown register; 0 for a
        /// Linux guest's power-off.
        status: i32,
    },
    /// The guest crashed (unhandled exception, triple fault).
    GuestCrash {
        /// The exception (or triple fault, halt) and where: vCPU, rip.
        detail: String,
    },
    /// KVM or the VMM failed.
    VmmError {
        /// The VMM's error message.
        detail: String,
    },
    /// A Linux guest rebooted or panicked (the kernel reset the machine).
    GuestReset {
        /// How the reset came (a reboot, or a triple fault).
        detail: String,
    },
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::Shutdown => write!(f, "shut down on request"),
            ExitReason::GuestExit { status } => write!(f, "guest powered off with status {status}"),
            ExitReason::GuestCrash { detail } => write!(f, "guest crashed: {detail}"),
            ExitReason::VmmError { detail } => write!(f, "VMM failed: {detail}"),
            ExitReason::GuestReset { detail } => write!(f, "guest reset: {detail}"),
        }
    }
}

/// An event from the VMM to the daemon.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// The VMM's first frame, sent once at start, before the VM is built.
    /// Its `type` and `protocol` never change, so any daemon can read them
    /// (see [`check_hello`]).
    Hello {
        /// The [`PROTOCOL_VERSION`] the VMM speaks.
        protocol: u32,
        /// The VMM's own version (its crate version), for messages.
        #[serde(default)]
        vmm_version: String,
    },
    /// A `--standby` VMM built its VM and waits for its [`Claim`] (see
    /// [`standby`](crate::standby)); sent once, right after the hello.
    Standby,
    /// The guest is up and waiting for requests. Sent once, unsolicited.
    Ready {
        /// Microseconds from the VMM's start until the guest was ready.
        boot_us: u64,
        /// A Linux guest's own boot timing; `None` for the reference guest.
        #[serde(default)]
        guest: Option<GuestBoot>,
    },
    /// Answer to [`Request::Ping`].
    Pong {
        /// The Ping's id.
        id: u64,
    },
    /// Answer to [`Request::Heartbeat`].
    Alive {
        /// The Heartbeat's id.
        id: u64,
    },
    /// Exec `id` ended.
    ExecDone {
        /// The Exec's id.
        id: u64,
        /// The command's exit status (`128 + signal` when killed).
        exit_code: i32,
        /// Microseconds from the start of the command until it ended.
        duration_us: u64,
        /// Whether [`Request::Cancel`] stopped it.
        cancelled: bool,
        /// Linux: the signal that ended the command (`exit_code` is then
        /// `128 + signal`); `None` when it exited, and always for the
        /// reference guest.
        #[serde(default)]
        signal: Option<i32>,
    },
    /// Request `id` could not be carried out.
    Error {
        /// The failed request's id.
        id: u64,
        /// Why, for the daemon's error status and logs.
        message: String,
    },
    /// Answer to [`Request::Snapshot`]: the files are written.
    Snapshotted {
        /// The Snapshot's id.
        id: u64,
        /// How long the vCPUs were stopped, measured in the VMM from the
        /// stop request until they ran again.
        pause_us: u64,
        /// Bytes of memory data written (holes not counted).
        bytes_written: u64,
        /// Pages in the diff (Diff), or dirtied in the epoch (Full with
        /// `measure_diff`); 0 otherwise.
        dirty_pages: u64,
        /// Bytes of guest RAM (the size of `dir/memory`).
        memory_bytes: u64,
    },
    /// A LIVE snapshot's background copy is under way.
    CopyProgress {
        /// The LIVE Snapshot's id.
        id: u64,
        /// Bytes of RAM handled so far (copied, or found zero).
        bytes_copied: u64,
        /// Bytes of RAM that hold data and must be handled.
        bytes_total: u64,
        /// Guest (or VMM) writes that hit a page not yet copied and were
        /// served by copying that page first.
        faults_served: u64,
    },
    /// A LIVE snapshot's background copy ended: `dir/memory` is complete
    /// when `error` is `None`.
    CopyDone {
        /// The LIVE Snapshot's id.
        id: u64,
        /// Bytes of memory data written to `dir/memory` (holes not counted).
        bytes_written: u64,
        /// Bytes of RAM handled (as in `CopyProgress`).
        bytes_copied: u64,
        /// Bytes of RAM that had to be handled.
        bytes_total: u64,
        /// Write faults served during the copy.
        faults_served: u64,
        /// How long the copy ran, from resume to the end.
        copy_us: u64,
        /// Why the copy failed (or `cancelled`); `None` on success.
        error: Option<String>,
    },
    /// The VMM is exiting; always its last frame.
    Exited {
        /// Why the VMM stopped.
        reason: ExitReason,
    },
    /// Upload `id`'s agent has written `bytes` bytes in total (cumulative).
    FileCredit {
        /// The upload's transfer id.
        id: u64,
        /// Bytes written since the upload began; the daemon may send up to
        /// [`FILE_WRITE_WINDOW`] beyond it.
        bytes: u64,
    },
    /// Upload `id` is complete: the file is under its final name.
    FileWritten {
        /// The upload's transfer id.
        id: u64,
        /// Size of the file as written.
        size: u64,
        /// Lowercase hex.
        sha256: String,
    },
    /// Download `id` is open; its data follows. `size` is the file's size
    /// when opened.
    FileOpened {
        /// The download's transfer id.
        id: u64,
        /// The file's size when opened, whatever `offset` and `length` ask for.
        size: u64,
    },
    /// Download `id` is complete; follows all of its data.
    FileRead {
        /// The download's transfer id.
        id: u64,
        /// Bytes sent in all.
        bytes: u64,
        /// Lowercase hex.
        sha256: String,
    },
    /// File request `id` failed; ends a transfer.
    FileFailed {
        /// The file request's id.
        id: u64,
        /// What went wrong, as the daemon maps it to a gRPC status.
        kind: FileErrorKind,
        /// The agent's (or the VMM's) description.
        message: String,
    },
    /// Answer to [`Request::StatFile`].
    FileStat {
        /// The StatFile's id.
        id: u64,
        /// What `lstat` said.
        info: FileInfo,
    },
    /// Answer to [`Request::ListDir`].
    DirListing {
        /// The ListDir's id.
        id: u64,
        /// The first entries by name (bytewise), each `lstat`ed; no `.` or `..`.
        entries: Vec<FileInfo>,
        /// Whether entries were left out (the agent's count or size limit).
        truncated: bool,
    },
    /// Answer to [`Request::RemoveFile`].
    FileRemoved {
        /// The RemoveFile's id.
        id: u64,
    },
}

impl Event {
    /// The VMM's first frame: [`Event::Hello`] with this crate's
    /// [`PROTOCOL_VERSION`] and the VMM's version.
    pub fn hello(vmm_version: impl Into<String>) -> Event {
        Event::Hello {
            protocol: PROTOCOL_VERSION,
            vmm_version: vmm_version.into(),
        }
    }

    /// The id of the request the event answers (`None` for `Hello`,
    /// `Ready` and `Exited`, which answer none).
    pub fn request_id(&self) -> Option<u64> {
        match self {
            Event::Pong { id }
            | Event::Alive { id }
            | Event::Error { id, .. }
            | Event::ExecDone { id, .. }
            | Event::Snapshotted { id, .. }
            | Event::CopyProgress { id, .. }
            | Event::CopyDone { id, .. }
            | Event::FileCredit { id, .. }
            | Event::FileWritten { id, .. }
            | Event::FileOpened { id, .. }
            | Event::FileRead { id, .. }
            | Event::FileFailed { id, .. }
            | Event::FileStat { id, .. }
            | Event::DirListing { id, .. }
            | Event::FileRemoved { id } => Some(*id),
            Event::Hello { .. } | Event::Standby | Event::Ready { .. } | Event::Exited { .. } => {
                None
            }
        }
    }
}

/// Where a Linux guest's boot time went, measured by its agent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestBoot {
    /// Microseconds from the kernel's start until the agent started.
    pub kernel_us: u64,
    /// Microseconds the agent spent setting up before it was ready.
    pub init_us: u64,
}

/// A chunk of command output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Output {
    /// The Exec request's id.
    pub id: u64,
    /// 1 for stdout, 2 for stderr.
    pub stream: u8,
    /// The bytes.
    pub data: Vec<u8>,
}

/// Anything the VMM sends.
#[derive(Clone, Debug, PartialEq)]
pub enum FromVmm {
    /// A JSON event.
    Event(Event),
    /// Raw output.
    Output(Output),
}

/// Anything the daemon sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToVmm {
    /// A JSON request.
    Request(Request),
    /// A chunk of Exec `id`'s standard input; empty data is EOF.
    Input {
        /// The Exec's id.
        id: u64,
        /// At most [`INPUT_CHUNK`] bytes.
        data: Vec<u8>,
    },
    /// A chunk of upload `id`'s bytes; empty data ends the file.
    FileData {
        /// The upload's transfer id.
        id: u64,
        /// At most [`FILE_CHUNK`] bytes.
        data: Vec<u8>,
    },
}

/// Encodes a JSON frame.
pub fn encode_json<T: Serialize>(msg: &T) -> Vec<u8> {
    let body = serde_json::to_vec(msg).expect("control messages always serialize");
    frame(KIND_JSON, &[&body])
}

/// Encodes an output frame.
pub fn encode_output(id: u64, stream: u8, data: &[u8]) -> Vec<u8> {
    frame(KIND_OUTPUT, &[&id.to_le_bytes(), &[stream], data])
}

/// Encodes one input frame of Exec `id`: at most [`INPUT_CHUNK`] bytes of
/// `data`, or EOF when `data` is empty. Split longer input with
/// `data.chunks(INPUT_CHUNK)`.
pub fn encode_input(id: u64, data: &[u8]) -> Vec<u8> {
    debug_assert!(data.len() <= INPUT_CHUNK, "input chunk too large");
    frame(KIND_INPUT, &[&id.to_le_bytes(), data])
}

/// Encodes one file-data frame of upload `id`: at most [`FILE_CHUNK`]
/// bytes of `data`, or the end of the file when `data` is empty.
pub fn encode_file_data(id: u64, data: &[u8]) -> Vec<u8> {
    debug_assert!(data.len() <= FILE_CHUNK, "file chunk too large");
    frame(KIND_FILE_DATA, &[&id.to_le_bytes(), data])
}

/// Bytes of an output frame before its data.
pub const OUTPUT_HEADER_LEN: usize = HEADER_LEN + 9;

/// The header of an output frame carrying `len` bytes, for writers that
/// place the data themselves (no intermediate copy).
pub fn output_header(id: u64, stream: u8, len: usize) -> [u8; OUTPUT_HEADER_LEN] {
    let mut h = [0u8; OUTPUT_HEADER_LEN];
    h[..4].copy_from_slice(&((len + 10) as u32).to_le_bytes());
    h[4] = KIND_OUTPUT;
    h[5..13].copy_from_slice(&id.to_le_bytes());
    h[13] = stream;
    h
}

fn frame(kind: u8, parts: &[&[u8]]) -> Vec<u8> {
    let body_len: usize = parts.iter().map(|p| p.len()).sum();
    let mut out = Vec::with_capacity(HEADER_LEN + body_len);
    out.extend_from_slice(&((body_len + 1) as u32).to_le_bytes());
    out.push(kind);
    for part in parts {
        out.extend_from_slice(part);
    }
    out
}

/// Parses a frame header: returns the body length (without the kind byte)
/// and the kind.
pub fn parse_header(header: [u8; HEADER_LEN]) -> Result<(usize, u8), ProtocolError> {
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if len == 0 || len > MAX_FRAME {
        return Err(ProtocolError::BadLength(len));
    }
    Ok((len - 1, header[4]))
}

/// Decodes a frame body sent by the VMM.
pub fn decode_from_vmm(kind: u8, body: Vec<u8>) -> Result<FromVmm, ProtocolError> {
    match kind {
        KIND_JSON => Ok(FromVmm::Event(serde_json::from_slice(&body)?)),
        KIND_OUTPUT => {
            if body.len() < 9 {
                return Err(ProtocolError::TruncatedOutput);
            }
            let id = u64::from_le_bytes(body[..8].try_into().expect("8 bytes"));
            let stream = body[8];
            Ok(FromVmm::Output(Output {
                id,
                stream,
                data: body[9..].to_vec(),
            }))
        }
        other => Err(ProtocolError::BadKind(other)),
    }
}

/// Reads one frame (blocking): its kind and body.
pub fn read_frame(r: &mut impl Read) -> Result<(u8, Vec<u8>), ProtocolError> {
    let mut header = [0u8; HEADER_LEN];
    r.read_exact(&mut header)?;
    let (len, kind) = parse_header(header)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok((kind, body))
}

/// Reads one frame the daemon sent (blocking): a request or an input chunk.
pub fn read_to_vmm(r: &mut impl Read) -> Result<ToVmm, ProtocolError> {
    let (kind, body) = read_frame(r)?;
    match kind {
        KIND_JSON => Ok(ToVmm::Request(serde_json::from_slice(&body)?)),
        KIND_INPUT => {
            if body.len() < 8 {
                return Err(ProtocolError::TruncatedInput);
            }
            let id = u64::from_le_bytes(body[..8].try_into().expect("8 bytes"));
            Ok(ToVmm::Input {
                id,
                data: body[8..].to_vec(),
            })
        }
        KIND_FILE_DATA => {
            if body.len() < 8 || body.len() > 8 + FILE_CHUNK {
                return Err(ProtocolError::BadFileData(body.len()));
            }
            let id = u64::from_le_bytes(body[..8].try_into().expect("8 bytes"));
            Ok(ToVmm::FileData {
                id,
                data: body[8..].to_vec(),
            })
        }
        other => Err(ProtocolError::BadKind(other)),
    }
}

/// Reads one [`Request`] (blocking); any other frame kind is an error.
pub fn read_request(r: &mut impl Read) -> Result<Request, ProtocolError> {
    let (kind, body) = read_frame(r)?;
    if kind != KIND_JSON {
        return Err(ProtocolError::BadKind(kind));
    }
    Ok(serde_json::from_slice(&body)?)
}

/// Writes an already encoded frame (blocking).
pub fn write_frame(w: &mut impl Write, frame: &[u8]) -> Result<(), ProtocolError> {
    w.write_all(frame)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips() {
        let req = Request::Exec {
            id: 7,
            argv: vec!["echo".into(), "hi".into()],
            env: vec![],
            cwd: None,
            stdin: false,
        };
        let bytes = encode_json(&req);
        let got = read_request(&mut &bytes[..]).unwrap();
        assert_eq!(got, req);
        assert_eq!(got.id(), 7);
    }

    #[test]
    fn output_round_trips() {
        let bytes = encode_output(42, 2, b"oops\n");
        let (kind, body) = read_frame(&mut &bytes[..]).unwrap();
        let got = decode_from_vmm(kind, body).unwrap();
        assert_eq!(
            got,
            FromVmm::Output(Output {
                id: 42,
                stream: 2,
                data: b"oops\n".to_vec()
            })
        );
    }

    #[test]
    fn output_header_matches_encode_output() {
        let full = encode_output(3, 1, b"abc");
        assert_eq!(&full[..OUTPUT_HEADER_LEN], &output_header(3, 1, 3));
    }

    #[test]
    fn event_round_trips() {
        let ev = Event::Exited {
            reason: ExitReason::GuestCrash {
                detail: "#UD at rip=0x1".into(),
            },
        };
        let bytes = encode_json(&ev);
        let (kind, body) = read_frame(&mut &bytes[..]).unwrap();
        assert_eq!(decode_from_vmm(kind, body).unwrap(), FromVmm::Event(ev));
    }

    #[test]
    fn linux_exec_round_trips() {
        let req = Request::Exec {
            id: 9,
            argv: vec!["sh".into(), "-c".into(), "cat".into()],
            env: vec![("A".into(), "1".into()), ("B".into(), "x=y".into())],
            cwd: Some("/tmp".into()),
            stdin: true,
        };
        let bytes = encode_json(&req);
        assert_eq!(read_to_vmm(&mut &bytes[..]).unwrap(), ToVmm::Request(req));
    }

    #[test]
    fn old_exec_json_gets_defaults() {
        let old = br#"{"type":"exec","id":3,"argv":["echo"]}"#;
        let req: Request = serde_json::from_slice(old).unwrap();
        assert_eq!(
            req,
            Request::Exec {
                id: 3,
                argv: vec!["echo".into()],
                env: vec![],
                cwd: None,
                stdin: false,
            }
        );
    }

    #[test]
    fn old_events_get_defaults() {
        let ready: Event = serde_json::from_slice(br#"{"type":"ready","boot_us":5}"#).unwrap();
        assert_eq!(
            ready,
            Event::Ready {
                boot_us: 5,
                guest: None
            }
        );
        let done: Event = serde_json::from_slice(
            br#"{"type":"exec_done","id":1,"exit_code":0,"duration_us":2,"cancelled":false}"#,
        )
        .unwrap();
        assert!(matches!(done, Event::ExecDone { signal: None, .. }));
    }

    #[test]
    fn new_events_round_trip() {
        for ev in [
            Event::Ready {
                boot_us: 1,
                guest: Some(GuestBoot {
                    kernel_us: 900_000,
                    init_us: 40_000,
                }),
            },
            Event::ExecDone {
                id: 4,
                exit_code: 137,
                duration_us: 10,
                cancelled: true,
                signal: Some(9),
            },
            Event::Exited {
                reason: ExitReason::GuestReset {
                    detail: "kernel panic".into(),
                },
            },
        ] {
            let bytes = encode_json(&ev);
            let (kind, body) = read_frame(&mut &bytes[..]).unwrap();
            assert_eq!(decode_from_vmm(kind, body).unwrap(), FromVmm::Event(ev));
        }
    }

    #[test]
    fn guest_reset_displays() {
        let reason = ExitReason::GuestReset {
            detail: "triple fault".into(),
        };
        assert_eq!(reason.to_string(), "guest reset: triple fault");
    }

    #[test]
    fn input_round_trips() {
        let mut stream = encode_input(5, b"hello");
        stream.extend(encode_input(5, &[]));
        stream.extend(encode_json(&Request::Ping { id: 6 }));
        let mut r = &stream[..];
        assert_eq!(
            read_to_vmm(&mut r).unwrap(),
            ToVmm::Input {
                id: 5,
                data: b"hello".to_vec()
            }
        );
        assert_eq!(
            read_to_vmm(&mut r).unwrap(),
            ToVmm::Input {
                id: 5,
                data: vec![]
            }
        );
        assert_eq!(
            read_to_vmm(&mut r).unwrap(),
            ToVmm::Request(Request::Ping { id: 6 })
        );
    }

    #[test]
    fn file_data_round_trips_and_is_bounded() {
        let data = vec![9u8; FILE_CHUNK];
        let mut stream = encode_file_data(4, &data);
        stream.extend(encode_file_data(4, &[]));
        let mut r = &stream[..];
        assert_eq!(
            read_to_vmm(&mut r).unwrap(),
            ToVmm::FileData { id: 4, data }
        );
        assert_eq!(
            read_to_vmm(&mut r).unwrap(),
            ToVmm::FileData {
                id: 4,
                data: vec![]
            }
        );
        let too_long = frame(KIND_FILE_DATA, &[&[0; 8], &vec![0; FILE_CHUNK + 1]]);
        assert!(matches!(
            read_to_vmm(&mut &too_long[..]),
            Err(ProtocolError::BadFileData(_))
        ));
        let too_short = frame(KIND_FILE_DATA, &[&[0; 7]]);
        assert!(matches!(
            read_to_vmm(&mut &too_short[..]),
            Err(ProtocolError::BadFileData(7))
        ));
    }

    #[test]
    fn file_messages_round_trip() {
        let req = Request::ReadFile {
            id: 3,
            path: "/etc/hostname".into(),
            offset: 1,
            length: 0,
            window: 256 << 10,
        };
        let bytes = encode_json(&req);
        assert_eq!(read_to_vmm(&mut &bytes[..]).unwrap(), ToVmm::Request(req));
        let ev = Event::FileFailed {
            id: 3,
            kind: FileErrorKind::NoSpace,
            message: "full".into(),
        };
        assert_eq!(ev.request_id(), Some(3));
        let bytes = encode_json(&ev);
        let (kind, body) = read_frame(&mut &bytes[..]).unwrap();
        assert_eq!(decode_from_vmm(kind, body).unwrap(), FromVmm::Event(ev));
    }

    #[test]
    fn full_input_chunk_fits_a_frame() {
        let data = vec![7u8; INPUT_CHUNK];
        let bytes = encode_input(1, &data);
        match read_to_vmm(&mut &bytes[..]).unwrap() {
            ToVmm::Input { id: 1, data: got } => assert_eq!(got, data),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn read_request_rejects_input() {
        let bytes = encode_input(1, b"x");
        assert!(matches!(
            read_request(&mut &bytes[..]),
            Err(ProtocolError::BadKind(KIND_INPUT))
        ));
    }

    #[test]
    fn rejects_bad_input_frames() {
        let bytes = frame(KIND_INPUT, &[&[1, 2, 3]]);
        assert!(matches!(
            read_to_vmm(&mut &bytes[..]),
            Err(ProtocolError::TruncatedInput)
        ));
        let bytes = frame(KIND_OUTPUT, &[&[0; 9]]);
        assert!(matches!(
            read_to_vmm(&mut &bytes[..]),
            Err(ProtocolError::BadKind(KIND_OUTPUT))
        ));
    }

    #[test]
    fn rejects_bad_frames() {
        assert!(matches!(
            parse_header([0, 0, 0, 0, 1]),
            Err(ProtocolError::BadLength(0))
        ));
        assert!(matches!(
            parse_header([0xff, 0xff, 0xff, 0x7f, 1]),
            Err(ProtocolError::BadLength(_))
        ));
        assert!(matches!(
            decode_from_vmm(9, vec![1]),
            Err(ProtocolError::BadKind(9))
        ));
        assert!(matches!(
            decode_from_vmm(KIND_OUTPUT, vec![1, 2]),
            Err(ProtocolError::TruncatedOutput)
        ));
    }
}
