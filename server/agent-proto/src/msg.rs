//! The JSON messages carried in [`crate::KIND_JSON`] frames.

use serde::{Deserialize, Serialize};

use crate::file::{FileErrorKind, FileInfo};

/// A message from the host (VMM) to the guest agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HostMsg {
    /// Run a command. `stdin: false` gives it /dev/null; `true` means stdin
    /// data frames for `id` follow, ended by an empty one.
    Exec {
        /// Host-chosen id, unique among running execs.
        id: u64,
        /// Program and arguments; `argv[0]` is looked up in `PATH` unless it has a `/`.
        argv: Vec<String>,
        /// Variables added to (or replacing) the agent's defaults.
        env: Vec<(String, String)>,
        /// Working directory; `/` when absent.
        cwd: Option<String>,
        /// Whether stdin data frames follow.
        stdin: bool,
    },
    /// Send `signal` to the whole process group of exec `id`.
    Kill {
        /// The exec to signal.
        id: u64,
        /// Signal number.
        signal: i32,
    },
    /// Liveness check; answered by [`GuestMsg::Pong`].
    Ping {
        /// Echoed back.
        id: u64,
    },
    /// Park the channel for a snapshot: the agent answers
    /// [`GuestMsg::Quiesced`] and then writes nothing more until
    /// [`HostMsg::Resume`], so both directions are at a frame boundary.
    Quiesce {
        /// Echoed back.
        id: u64,
    },
    /// Unpark the channel. In a child restored from a snapshot
    /// (`forked`), first make it a sandbox of its own: mix `entropy` into
    /// the kernel's pool and reseed its CRNG, step the wall clock to
    /// `unix_ns`, set the hostname and sandbox id, and kill every exec that
    /// was running at the snapshot (nothing more is reported about them).
    /// Answered by [`GuestMsg::Resumed`].
    Resume {
        /// Echoed back.
        id: u64,
        /// Whether this guest is a child restored from a snapshot.
        forked: bool,
        /// Fresh host entropy (forked only; empty otherwise).
        #[serde(default)]
        entropy: Vec<u8>,
        /// The host's wall clock, ns since the Unix epoch (0: leave it).
        #[serde(default)]
        unix_ns: u64,
        /// The child's hostname and sandbox id (forked only).
        #[serde(default)]
        sandbox_id: Option<String>,
    },
    /// Upload a file: [`crate::STREAM_FILE`] data frames for `id` follow,
    /// ended by an empty one. The agent writes them to a new temporary file
    /// (`.NAME.forkd-*.tmp`, created `O_EXCL` with `mode`) in the target's
    /// directory as they come, then fsyncs it and renames it over `path`
    /// (with `exclusive`, `renameat2(RENAME_NOREPLACE)` or link + unlink),
    /// so `path` never holds a partial file. It credits consumed bytes with
    /// [`GuestMsg::FileCredit`]; the host keeps at most
    /// [`crate::FILE_WRITE_WINDOW`] bytes un-credited. Ends with
    /// [`GuestMsg::FileWritten`] or [`GuestMsg::FileFailed`] (then the
    /// temporary file is gone and later data frames for `id` are dropped).
    WriteFile {
        /// Transfer id, unique among the running transfers (uploads and downloads).
        id: u64,
        /// Absolute path of the file to create or replace.
        path: String,
        /// Permission bits of the new file (`& 0o7777`, umask not applied); 0 means 0o644.
        #[serde(default)]
        mode: u32,
        /// Create missing parent directories (mode 0o755).
        #[serde(default)]
        parents: bool,
        /// Fail with `already_exists` if `path` exists (as anything,
        /// dangling symlinks included) instead of replacing it.
        #[serde(default)]
        exclusive: bool,
    },
    /// Download (part of) a file: answered by [`GuestMsg::FileOpened`], then
    /// [`crate::STREAM_FILE`] data frames for `id`, then [`GuestMsg::FileRead`];
    /// or [`GuestMsg::FileFailed`]. Symlinks are followed. Bytes are read
    /// until `length` or end of file (so files whose size is not known in
    /// advance, like `/proc` ones, read whole); an offset past the end gives
    /// zero bytes.
    ReadFile {
        /// Transfer id, unique among the running transfers.
        id: u64,
        /// Absolute path of a regular file.
        path: String,
        /// First byte to send.
        #[serde(default)]
        offset: u64,
        /// How many bytes at most; 0 means to the end of the file.
        #[serde(default)]
        length: u64,
        /// Bytes the agent may send beyond the host's [`HostMsg::FileAck`]
        /// total (must be > 0; at least [`crate::MAX_DATA`] for full frames).
        window: u32,
    },
    /// Acknowledges a download's bytes: `bytes` is the **cumulative** count
    /// of data bytes of transfer `id` the host has consumed (not an
    /// increment). Lower values than an earlier ack are ignored.
    FileAck {
        /// Transfer id.
        id: u64,
        /// Total bytes consumed so far.
        bytes: u64,
    },
    /// Stops a running upload or download (the host's client went away):
    /// answered by [`GuestMsg::FileFailed`] with kind `aborted` unless the
    /// transfer already ended (then nothing more). An upload's temporary
    /// file is removed.
    FileAbort {
        /// Transfer id.
        id: u64,
    },
    /// Describe one path (`lstat`): [`GuestMsg::FileStat`] or [`GuestMsg::FileFailed`].
    StatFile {
        /// Echoed back.
        id: u64,
        /// Absolute path.
        path: String,
    },
    /// List a directory (following a symlink to it): [`GuestMsg::DirListing`]
    /// or [`GuestMsg::FileFailed`].
    ListDir {
        /// Echoed back.
        id: u64,
        /// Absolute path of a directory.
        path: String,
    },
    /// Remove a file, symlink (not its target) or empty directory; with
    /// `recursive`, a directory and everything in it. Answered by
    /// [`GuestMsg::FileRemoved`] or [`GuestMsg::FileFailed`] (`not_empty`
    /// for a non-empty directory without `recursive`).
    RemoveFile {
        /// Echoed back.
        id: u64,
        /// Absolute path; `/` is refused.
        path: String,
        /// Remove a directory's contents too.
        #[serde(default)]
        recursive: bool,
    },
}

/// A message from the guest agent to the host (VMM).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum GuestMsg {
    /// The agent takes execs now. Sent once.
    Ready {
        /// Agent version.
        version: String,
        /// CLOCK_BOOTTIME when the agent started: the kernel's share of boot.
        kernel_us: u64,
        /// How long the agent's own setup took (mounts, modules, channel).
        init_us: u64,
    },
    /// The exec's program is running as `pid` (also its process group).
    Started {
        /// Exec id.
        id: u64,
        /// Process id in the guest.
        pid: u32,
    },
    /// The exec's process ended; follows all of its output frames.
    Exited {
        /// Exec id.
        id: u64,
        /// Exit code on a normal exit.
        code: Option<i32>,
        /// Signal number when killed by a signal.
        signal: Option<i32>,
        /// Time from start to exit.
        duration_us: u64,
    },
    /// The exec could not be started; no `Exited` follows.
    Failed {
        /// Exec id.
        id: u64,
        /// What failed and why.
        message: String,
    },
    /// Answer to [`HostMsg::Ping`].
    Pong {
        /// The ping's id.
        id: u64,
    },
    /// Answer to [`HostMsg::Quiesce`]; the last frame before the agent
    /// parks its channel.
    Quiesced {
        /// The request's id.
        id: u64,
    },
    /// Answer to [`HostMsg::Resume`]: the channel is live again.
    Resumed {
        /// The request's id.
        id: u64,
        /// Execs of the snapshot killed in a forked child.
        killed: u32,
        /// Steps of a forked resume that failed (entropy, clock, hostname);
        /// empty when all held. The host treats any as a failed child.
        #[serde(default)]
        errors: Vec<String>,
    },
    /// Upload `id` has consumed (written to its temporary file) `bytes`
    /// bytes in total (**cumulative**). Sent after a chunk is written when
    /// at least [`crate::MAX_DATA`] bytes are un-credited or no more data is
    /// queued, so a host within [`crate::FILE_WRITE_WINDOW`] never stalls.
    FileCredit {
        /// Transfer id.
        id: u64,
        /// Total bytes written so far.
        bytes: u64,
    },
    /// Upload `id` is complete: the file is under its final name.
    FileWritten {
        /// Transfer id.
        id: u64,
        /// Bytes written.
        size: u64,
        /// SHA-256 of the bytes written, lowercase hex.
        sha256: String,
    },
    /// Download `id` is open; its data frames follow.
    FileOpened {
        /// Transfer id.
        id: u64,
        /// The file's size (`st_size`) when opened; the bytes sent may
        /// differ (offset/length, a file that changes, `/proc` files).
        size: u64,
    },
    /// Download `id` is complete; follows all of its data frames.
    FileRead {
        /// Transfer id.
        id: u64,
        /// Bytes sent.
        bytes: u64,
        /// SHA-256 of the bytes sent, lowercase hex.
        sha256: String,
    },
    /// A file operation (any of them; `id` is its request's) failed. Ends a
    /// transfer: nothing more is sent for it.
    FileFailed {
        /// The request's id.
        id: u64,
        /// Why, for the daemon's status code.
        kind: FileErrorKind,
        /// What failed, e.g. `creating /a/.b.forkd-1-2.tmp: No space left on device (os error 28)`.
        message: String,
    },
    /// Answer to [`HostMsg::StatFile`].
    FileStat {
        /// The request's id.
        id: u64,
        /// The path's `lstat`.
        info: FileInfo,
    },
    /// Answer to [`HostMsg::ListDir`]: entries sorted by name (bytewise),
    /// without `.` and `..`, each as `lstat` sees it.
    DirListing {
        /// The request's id.
        id: u64,
        /// The first entries by name.
        entries: Vec<FileInfo>,
        /// Whether entries were left out (more than 4096, or the message
        /// would have exceeded 512 KiB).
        truncated: bool,
    },
    /// Answer to [`HostMsg::RemoveFile`]: the path is gone.
    FileRemoved {
        /// The request's id.
        id: u64,
    },
    /// Agent diagnostics.
    Log {
        /// The diagnostic text.
        message: String,
    },
}
