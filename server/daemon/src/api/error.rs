//! Typed errors of the daemon and the one place where they become gRPC
//! statuses.

use std::path::PathBuf;

use forkd_control::FileErrorKind;
use forkd_store::{ErrorKind, StoreError};

use crate::sandbox::image_lookup::ImageError;
use tonic::{Code, Status};

/// An error answered to a gRPC caller. Every variant knows its status code
/// (see [`ApiError::code`]); its `Display` text is the status message.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A request field is out of range or malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// No sandbox has this id.
    #[error("sandbox {0} not found")]
    SandboxNotFound(String),
    /// Spawning would go over `--max-sandboxes`.
    #[error(
        "spawning {requested} more sandboxes would exceed --max-sandboxes={max} \
         ({current} exist or are starting); delete some or raise the limit"
    )]
    TooManySandboxes {
        /// Sandboxes asked for.
        requested: usize,
        /// Sandboxes that exist or are being started.
        current: usize,
        /// The configured limit.
        max: usize,
    },
    /// Spawning would commit more guest memory than
    /// `--max-guest-memory-mib`.
    #[error(
        "spawning {n} sandboxes of {memory_mib} MiB asks for {asked_mib} MiB of guest memory; \
         with {committed_mib} MiB already committed to running and starting sandboxes that \
         would exceed the limit of {limit_mib} MiB (--max-guest-memory-mib, by default the \
         host's MemTotal); delete sandboxes, ask for less memory_mib, or raise the limit"
    )]
    OverCommit {
        /// Sandboxes asked for.
        n: usize,
        /// Guest RAM of each, MiB.
        memory_mib: u32,
        /// `n * memory_mib`.
        asked_mib: u64,
        /// Guest memory of sandboxes running, starting or reserved, MiB.
        committed_mib: u64,
        /// The configured limit, MiB.
        limit_mib: u64,
    },
    /// A `huge_pages` spawn needs more 2 MiB huge pages than the host's
    /// pool has free.
    #[error(
        "{}huge_pages needs {needed} free 2 MiB huge pages; the host has {available} available \
         of {total} (HugePages_Free minus HugePages_Rsvd in /proc/meminfo); raise the pool with \
         `sysctl vm.nr_hugepages=<pages>` (as root), spawn fewer or smaller sandboxes, or leave \
         huge_pages false",
        if detail.is_empty() { String::new() } else { format!("{detail}: ") }
    )]
    HugePages {
        /// Pages the spawn needs.
        needed: u64,
        /// Pages free and not reserved.
        available: u64,
        /// Pages in the pool.
        total: u64,
        /// What else went wrong, if anything (empty: the pool is too small).
        detail: String,
    },
    /// The sandbox is not in a state that allows the operation.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A fork from a snapshot that is still being written, without
    /// `wait_for_snapshot`.
    #[error(
        "snapshot {tag} is still WRITING{}; set wait_for_snapshot=true to wait for it, or follow \
         WatchSnapshot until it is READY",
        percent_suffix(.copied_percent)
    )]
    SnapshotWriting {
        /// The snapshot.
        tag: String,
        /// How much of a LIVE copy is done, once the VMM has reported.
        copied_percent: Option<u64>,
    },
    /// A LIVE branch ended with its snapshot FAILED.
    #[error("snapshot {tag} is FAILED: {failure}")]
    LiveFailed {
        /// The snapshot.
        tag: String,
        /// Why (also the snapshot's `failure_reason`).
        failure: LiveFailure,
    },
    /// The daemon is draining and takes no new work.
    #[error("forkd is shutting down; retry on another instance")]
    ShuttingDown,
    /// An Exec ran into its `timeout_ms` and was stopped.
    #[error("command exceeded timeout_ms={0} and was stopped; the sandbox is still usable")]
    ExecTimeout(u32),
    /// An Exec ran into its `timeout_ms`, and the guest ignored the cancel.
    #[error(
        "command exceeded timeout_ms={timeout_ms} and did not stop when cancelled; sandbox {id} \
         is now FAILED (guest did not honor cancel); delete it with DeleteSandbox"
    )]
    CancelIgnored {
        /// The sandbox id.
        id: String,
        /// The Exec's timeout.
        timeout_ms: u32,
    },
    /// The sandbox was deleted while a call was queued for it.
    #[error("sandbox {0} was deleted (DeleteSandbox) while this call waited for its turn; spawn a new one")]
    SandboxDeleted(String),
    /// The sandbox stopped while a request was running in it.
    #[error("sandbox {id} stopped: {reason}")]
    SandboxStopped {
        /// The sandbox id.
        id: String,
        /// Why it stopped.
        reason: String,
    },
    /// No sandbox of a spawn call started; carries the first failure.
    #[error("no sandbox started: {message}")]
    NoneStarted {
        /// The first failure's code.
        code: Code,
        /// The first failure's message.
        message: String,
    },
    /// The VMM refused or failed a request.
    #[error("VMM of sandbox {id} could not carry out the request: {message}")]
    Vmm {
        /// The sandbox id.
        id: String,
        /// What the VMM said.
        message: String,
    },
    /// The snapshot store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A CreateSnapshot warm-up command exited non-zero.
    #[error(
        "warm-up command {} exited with code {exit_code}{stderr}; {cleanup} and no snapshot was \
         taken",
        argv_text(.argv)
    )]
    WarmupExit {
        /// The command.
        argv: Vec<String>,
        /// Its exit code.
        exit_code: i32,
        /// "; stderr: ..." with the end of its stderr, or empty.
        stderr: String,
        /// What became of the warm-up sandbox ("the sandbox was deleted").
        cleanup: String,
    },
    /// A CreateSnapshot warm-up command could not run to its end.
    #[error(
        "warm-up command {} failed: {message}; {cleanup} and no snapshot was taken",
        argv_text(.argv)
    )]
    WarmupFailed {
        /// The command.
        argv: Vec<String>,
        /// The code of the failure (e.g. DEADLINE_EXCEEDED).
        code: Code,
        /// What went wrong, e.g. "it did not finish within timeout_ms=100
        /// and was stopped".
        message: String,
        /// What became of the warm-up sandbox ("the sandbox was deleted").
        cleanup: String,
    },
    /// A file system under the data directory is full (ENOSPC or EDQUOT).
    #[error(
        "no space left on the file system holding forkd's {area} ({fs}); free space there (e.g. \
         delete snapshots you no longer need) and retry: {what}"
    )]
    NoSpace {
        /// The failure as it was reported (what could not be written).
        what: String,
        /// Which part of the data directory: "snapshot store",
        /// "sandbox directories".
        area: &'static str,
        /// The file system, e.g. "tmpfs of 64.0 MiB, 0 B free".
        fs: String,
    },
    /// A Linux image cannot be used (bad name, not built, broken).
    #[error(transparent)]
    Image(#[from] crate::sandbox::image_lookup::ImageError),
    /// This host cannot boot Linux guests.
    #[error(transparent)]
    LinuxHost(#[from] crate::sandbox::linux_host::LinuxHostError),
    /// A Linux guest's agent could not start the command.
    #[error("command could not be started in sandbox {id}: {message}")]
    CommandNotStarted {
        /// The sandbox id.
        id: String,
        /// What the guest said, e.g. `cannot run "x": No such file or
        /// directory`.
        message: String,
    },
    /// The guest agent could not carry out a file operation.
    #[error("{message}{}", file_hint(*kind))]
    File {
        /// Why, as the agent classified it.
        kind: FileErrorKind,
        /// What failed, naming the step and the path.
        message: String,
    },
    /// The client gave up on a call mid-way (e.g. its upload stream broke).
    #[error("{0}")]
    Cancelled(String),
    /// A file request needs a Linux sandbox.
    #[error(
        "sandbox {0} runs the reference guest, which has no filesystem; files need a Linux \
         sandbox (spawn one with `image`)"
    )]
    NoFiles(String),
    /// The daemon failed in a way the caller cannot fix.
    #[error("internal error: {0}")]
    Internal(String),
}

/// What a caller can do about a file error, after the agent's message.
fn file_hint(kind: FileErrorKind) -> &'static str {
    match kind {
        FileErrorKind::NoSpace => {
            " (the guest's filesystem is full: its root is a tmpfs of about half the sandbox's \
             RAM; remove files or spawn with more memory_mib; nothing was left under the \
             file's name)"
        }
        FileErrorKind::NotADirectory => " (a component of the path is not a directory)",
        FileErrorKind::IsADirectory => " (the path is a directory)",
        FileErrorKind::NotEmpty => " (the directory is not empty; set recursive to remove it)",
        FileErrorKind::NotAFile => " (not a regular file)",
        FileErrorKind::Busy => " (too many file transfers are running in this sandbox; retry)",
        _ => "",
    }
}

/// The status code of a file error the agent reported.
pub fn file_code(kind: FileErrorKind) -> Code {
    match kind {
        FileErrorKind::NotFound => Code::NotFound,
        FileErrorKind::AlreadyExists => Code::AlreadyExists,
        FileErrorKind::NotADirectory
        | FileErrorKind::IsADirectory
        | FileErrorKind::NotEmpty
        | FileErrorKind::NotAFile => Code::FailedPrecondition,
        FileErrorKind::NoSpace => Code::ResourceExhausted,
        FileErrorKind::PermissionDenied => Code::PermissionDenied,
        FileErrorKind::InvalidPath => Code::InvalidArgument,
        FileErrorKind::Busy => Code::Unavailable,
        FileErrorKind::Aborted => Code::Cancelled,
        FileErrorKind::Protocol | FileErrorKind::Io => Code::Internal,
    }
}

impl ApiError {
    /// The gRPC status code for this error.
    pub fn code(&self) -> Code {
        match self {
            ApiError::InvalidArgument(_) => Code::InvalidArgument,
            ApiError::SandboxNotFound(_) => Code::NotFound,
            ApiError::TooManySandboxes { .. }
            | ApiError::NoSpace { .. }
            | ApiError::OverCommit { .. }
            | ApiError::HugePages { .. } => Code::ResourceExhausted,
            ApiError::FailedPrecondition(_) => Code::FailedPrecondition,
            ApiError::SnapshotWriting { .. } => Code::FailedPrecondition,
            ApiError::LiveFailed { failure, .. } => failure.code(),
            ApiError::ShuttingDown => Code::Unavailable,
            ApiError::ExecTimeout(_) | ApiError::CancelIgnored { .. } => Code::DeadlineExceeded,
            ApiError::SandboxStopped { .. } | ApiError::SandboxDeleted(_) => Code::Aborted,
            ApiError::NoneStarted { code, .. } | ApiError::WarmupFailed { code, .. } => *code,
            ApiError::WarmupExit { .. } => Code::FailedPrecondition,
            ApiError::Store(e) => store_code(e.kind()),
            ApiError::Image(e) => match e {
                ImageError::BadName { .. } => Code::InvalidArgument,
                ImageError::NotFound { .. } => Code::NotFound,
                ImageError::Invalid { .. } => Code::FailedPrecondition,
            },
            ApiError::LinuxHost(_) | ApiError::CommandNotStarted { .. } => Code::FailedPrecondition,
            ApiError::File { kind, .. } => file_code(*kind),
            ApiError::NoFiles(_) => Code::FailedPrecondition,
            ApiError::Cancelled(_) => Code::Cancelled,
            ApiError::Vmm { .. } | ApiError::Internal(_) => Code::Internal,
        }
    }
}

fn percent_suffix(percent: &Option<u64>) -> String {
    match percent {
        Some(p) => format!(" ({p}% copied)"),
        None => String::new(),
    }
}

/// Why a LIVE copy was cancelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CancelReason {
    /// DeleteSnapshot named the snapshot.
    Deleted,
    /// The daemon is shutting down.
    ShuttingDown,
}

impl std::fmt::Display for CancelReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CancelReason::Deleted => "snapshot deleted",
            CancelReason::ShuttingDown => "forkd shut down",
        })
    }
}

/// Why a LIVE branch's snapshot ended FAILED. The `Display` text is the
/// snapshot's `failure_reason`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LiveFailure {
    /// The source's VMM stopped (crash, kill, DeleteSandbox) mid-copy.
    #[error("source sandbox {sandbox} stopped during the live copy: {reason}")]
    SourceStopped {
        /// The source sandbox.
        sandbox: String,
        /// Why its VMM stopped.
        reason: String,
    },
    /// The copy was cancelled.
    #[error("cancelled: {0}")]
    Cancelled(CancelReason),
    /// The VMM reported that the copy failed.
    #[error("the VMM could not copy memory: {0}")]
    Copy(String),
}

impl LiveFailure {
    /// The status code a waiting caller gets.
    pub fn code(&self) -> Code {
        match self {
            LiveFailure::SourceStopped { .. } | LiveFailure::Cancelled(CancelReason::Deleted) => {
                Code::Aborted
            }
            LiveFailure::Cancelled(CancelReason::ShuttingDown) => Code::Unavailable,
            LiveFailure::Copy(e) if crate::api::public::text_is_no_space(e) => {
                Code::ResourceExhausted
            }
            LiveFailure::Copy(_) => Code::Internal,
        }
    }
}

/// The status code of a class of store errors.
pub fn store_code(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::ResourceExhausted => Code::ResourceExhausted,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
        ErrorKind::DataLoss => Code::DataLoss,
        ErrorKind::Internal => Code::Internal,
    }
}

impl From<ApiError> for Status {
    /// The status a client gets: the error's code, and its text without
    /// server paths and capped in length (see [`crate::api::public`]). Internal
    /// errors are logged here in full (paths included).
    fn from(err: ApiError) -> Status {
        let code = err.code();
        let text = err.to_string();
        if matches!(
            code,
            Code::Internal | Code::DataLoss | Code::ResourceExhausted
        ) {
            tracing::warn!(code = code_name(code), error = %text, "call failed");
        }
        Status::new(code, crate::api::public::status_message(&text))
    }
}

impl ApiError {
    /// `self`, turned into [`ApiError::NoSpace`] if it is a VMM or store
    /// error caused by a full file system (`area`, at `dir`).
    pub fn or_no_space(self, area: &'static str, dir: &std::path::Path) -> ApiError {
        let full = match &self {
            ApiError::Vmm { message, .. } => crate::api::public::text_is_no_space(message),
            ApiError::Store(StoreError::Io { source, .. }) => {
                crate::api::public::is_no_space(source)
            }
            _ => false,
        };
        if !full {
            return self;
        }
        ApiError::NoSpace {
            what: self.to_string(),
            area,
            fs: crate::api::public::describe_fs(dir),
        }
    }
}

/// Why one sandbox of a SpawnSandboxes call did not start.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The sandbox directory could not be created.
    #[error("cannot create sandbox directory {}: {source}{}", .path.display(), no_space_note(.source))]
    SandboxDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The VMM process could not be started (its path is logged, not
    /// sent: the message names the binary only).
    #[error("cannot start VMM {}: {source}", file_name(.path))]
    Launch {
        /// The VMM binary.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The VMM stopped before the guest answered its first ping.
    #[error("sandbox did not boot: {reason}{log}")]
    Exited {
        /// Why the VMM stopped.
        reason: String,
        /// The tail of the VMM's log, prefixed with "; ", or empty.
        log: String,
    },
    /// The guest did not answer in time.
    #[error("sandbox did not answer a ping within {secs} s; it was stopped{log}")]
    Timeout {
        /// The boot timeout.
        secs: u64,
        /// The tail of the VMM's log, prefixed with "; ", or empty.
        log: String,
    },
    /// The daemon began shutting down during the boot.
    #[error("forkd is shutting down; retry on another instance")]
    ShuttingDown,
    /// The snapshot being forked was deleted (DeleteSnapshot with force)
    /// while the sandbox was starting from it.
    #[error("snapshot {tag} was deleted while this sandbox was starting from it")]
    SnapshotDeleted {
        /// The snapshot.
        tag: String,
    },
}

impl BootError {
    /// The gRPC status code for this error.
    pub fn code(&self) -> Code {
        match self {
            BootError::Timeout { .. } => Code::DeadlineExceeded,
            BootError::ShuttingDown => Code::Unavailable,
            BootError::SnapshotDeleted { .. } => Code::Aborted,
            BootError::SandboxDir { source, .. } if crate::api::public::is_no_space(source) => {
                Code::ResourceExhausted
            }
            BootError::SandboxDir { .. } | BootError::Launch { .. } | BootError::Exited { .. } => {
                Code::Internal
            }
        }
    }
}

/// An argv for a message: in full when short, else its first argument and
/// its size.
fn argv_text(argv: &[String]) -> String {
    let text = format!("{argv:?}");
    if text.len() <= crate::api::public::MAX_QUOTED_BYTES {
        return text;
    }
    let first = argv
        .first()
        .map(|a| crate::api::public::quoted(a))
        .unwrap_or_default();
    let bytes: usize = argv.iter().map(String::len).sum();
    format!("[{first}, ...] ({} arguments, {bytes} bytes)", argv.len())
}

/// What a CreateSnapshot failure says became of its sandbox, by default.
pub const WARMUP_SANDBOX_DELETED: &str = "the sandbox was deleted";

/// "; the file system holding forkd's data directory is full (...)" for
/// ENOSPC/EDQUOT, else empty.
fn no_space_note(e: &std::io::Error) -> String {
    if !crate::api::public::is_no_space(e) {
        return String::new();
    }
    let fs = crate::api::public::data_dir()
        .map(|d| format!(" ({})", crate::api::public::describe_fs(&d)))
        .unwrap_or_default();
    format!(
        "; the file system holding forkd's data directory is full{fs}: free space there and retry"
    )
}

/// The last component of `path` (a binary's name), for messages.
fn file_name(path: &std::path::Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "(unnamed)".into())
}

/// Canonical upper-case name of a status code, as in `SpawnFailure.code`.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// An error that stops the daemon from starting or from running on.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The command line or environment is inconsistent.
    #[error("{0}")]
    Config(String),
    /// The data directory could not be prepared.
    #[error("data directory {path}: {what}: {source}")]
    DataDir {
        /// The path involved.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The data directory, or a directory above it, is a file.
    #[error(
        "data directory {}: {} is not a directory; pass a directory (or a path to create) as \
         --data-dir",
        .data_dir.display(),
        .path.display()
    )]
    NotADirectory {
        /// The `--data-dir` given.
        data_dir: PathBuf,
        /// The path that is not a directory (it or an ancestor).
        path: PathBuf,
    },
    /// The snapshot store could not be opened or recovered.
    #[error("{0}")]
    Store(String),
    /// Another daemon holds the data directory's lock.
    #[error(
        "another forkd daemon is using data directory {0} (it holds the lock on {0}/forkd.lock); \
         stop it or pass a different --data-dir"
    )]
    DataDirLocked(PathBuf),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address or socket path.
        addr: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A server failed while running.
    #[error("gRPC server on {addr} failed: {message}")]
    Serve {
        /// The address or socket path.
        addr: String,
        /// What failed.
        message: String,
    },
    /// The signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_carry_code_and_message() {
        let cases: Vec<(ApiError, Code, &str)> = vec![
            (
                ApiError::InvalidArgument("n must be between 1 and 1000, got 0".into()),
                Code::InvalidArgument,
                "n must be between 1 and 1000, got 0",
            ),
            (
                ApiError::SandboxNotFound("sb-x".into()),
                Code::NotFound,
                "sandbox sb-x not found",
            ),
            (
                ApiError::ShuttingDown,
                Code::Unavailable,
                "forkd is shutting down; retry on another instance",
            ),
            (
                ApiError::ExecTimeout(50),
                Code::DeadlineExceeded,
                "command exceeded timeout_ms=50 and was stopped; the sandbox is still usable",
            ),
            (
                ApiError::SandboxStopped {
                    id: "sb-1".into(),
                    reason: "guest crashed: #UD".into(),
                },
                Code::Aborted,
                "sandbox sb-1 stopped: guest crashed: #UD",
            ),
            (
                ApiError::NoneStarted {
                    code: BootError::Timeout {
                        secs: 30,
                        log: String::new(),
                    }
                    .code(),
                    message: "sandbox did not answer a ping within 30 s; it was stopped".into(),
                },
                Code::DeadlineExceeded,
                "no sandbox started: sandbox did not answer a ping within 30 s; it was stopped",
            ),
        ];
        for (err, code, msg) in cases {
            let status = Status::from(err);
            assert_eq!(status.code(), code);
            assert_eq!(status.message(), msg);
        }
    }

    #[test]
    fn store_errors_map_to_codes() {
        use forkd_store::Status as S;
        let cases: Vec<(StoreError, Code)> = vec![
            (
                StoreError::InvalidTag { tag: "-x".into() },
                Code::InvalidArgument,
            ),
            (StoreError::NotFound { tag: "t".into() }, Code::NotFound),
            (
                StoreError::AlreadyExists {
                    tag: "t".into(),
                    status: S::Ready,
                },
                Code::AlreadyExists,
            ),
            (
                StoreError::HasDependents {
                    tag: "t".into(),
                    dependents: vec!["d".into()],
                },
                Code::FailedPrecondition,
            ),
            (
                StoreError::NotReady {
                    tag: "t".into(),
                    status: S::Failed,
                    reason: Some("daemon stopped while writing".into()),
                },
                Code::FailedPrecondition,
            ),
            (
                StoreError::DataLoss {
                    tag: "t".into(),
                    file: "memory",
                    detail: "chunk 3 does not match its SHA-256".into(),
                },
                Code::DataLoss,
            ),
            (
                StoreError::BadFiles {
                    tag: "t".into(),
                    detail: "x".into(),
                },
                Code::Internal,
            ),
        ];
        for (err, code) in cases {
            let text = err.to_string();
            let status = Status::from(ApiError::from(err));
            assert_eq!(status.code(), code, "{text}");
            assert_eq!(status.message(), text);
        }
        let s = Status::from(ApiError::WarmupExit {
            argv: vec!["exit".into(), "3".into()],
            exit_code: 3,
            stderr: "; stderr: boom".into(),
            cleanup: WARMUP_SANDBOX_DELETED.into(),
        });
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert_eq!(
            s.message(),
            "warm-up command [\"exit\", \"3\"] exited with code 3; stderr: boom; the sandbox was \
             deleted and no snapshot was taken"
        );
    }

    #[test]
    fn live_failures_carry_their_code_and_reason() {
        let cases = [
            (
                LiveFailure::SourceStopped {
                    sandbox: "sb-1".into(),
                    reason: "guest crashed: #UD".into(),
                },
                Code::Aborted,
                "snapshot l is FAILED: source sandbox sb-1 stopped during the live copy: guest \
                 crashed: #UD",
            ),
            (
                LiveFailure::Cancelled(CancelReason::Deleted),
                Code::Aborted,
                "snapshot l is FAILED: cancelled: snapshot deleted",
            ),
            (
                LiveFailure::Cancelled(CancelReason::ShuttingDown),
                Code::Unavailable,
                "snapshot l is FAILED: cancelled: forkd shut down",
            ),
            (
                LiveFailure::Copy("disk full".into()),
                Code::Internal,
                "snapshot l is FAILED: the VMM could not copy memory: disk full",
            ),
        ];
        for (failure, code, msg) in cases {
            let status = Status::from(ApiError::LiveFailed {
                tag: "l".into(),
                failure,
            });
            assert_eq!((status.code(), status.message()), (code, msg));
        }
        let status = Status::from(ApiError::SnapshotWriting {
            tag: "l".into(),
            copied_percent: Some(42),
        });
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(
            status.message(),
            "snapshot l is still WRITING (42% copied); set wait_for_snapshot=true to wait for it, \
             or follow WatchSnapshot until it is READY"
        );
        let status = Status::from(ApiError::SnapshotWriting {
            tag: "f".into(),
            copied_percent: None,
        });
        assert!(status
            .message()
            .starts_with("snapshot f is still WRITING; set"));
    }

    #[test]
    fn too_many_is_resource_exhausted() {
        let status = Status::from(ApiError::TooManySandboxes {
            requested: 5,
            current: 2,
            max: 4,
        });
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(status.message().contains("--max-sandboxes=4"));
    }

    #[test]
    fn full_file_systems_are_resource_exhausted() {
        let enospc = || std::io::Error::from_raw_os_error(libc::ENOSPC);
        let dir = std::env::temp_dir();
        let vmm = ApiError::Vmm {
            id: "sb-1".into(),
            message: format!("writing the snapshot: writing memory: {}", enospc()),
        }
        .or_no_space("snapshot store", &dir);
        assert_eq!(vmm.code(), Code::ResourceExhausted);
        assert!(vmm
            .to_string()
            .starts_with("no space left on the file system holding forkd's snapshot store ("));
        let store = ApiError::from(StoreError::Io {
            op: "fsyncing",
            path: "/x".into(),
            source: std::io::Error::from_raw_os_error(libc::EDQUOT),
        })
        .or_no_space("snapshot store", &dir);
        assert_eq!(store.code(), Code::ResourceExhausted);
        // Other errors are left alone.
        let other = ApiError::Vmm {
            id: "sb-1".into(),
            message: "Input/output error (os error 5)".into(),
        }
        .or_no_space("snapshot store", &dir);
        assert_eq!(other.code(), Code::Internal);
        let boot = BootError::SandboxDir {
            path: "/x/sandboxes/sb-1".into(),
            source: enospc(),
        };
        assert_eq!(boot.code(), Code::ResourceExhausted);
        assert!(
            boot.to_string().contains("data directory is full"),
            "{boot}"
        );
        assert_eq!(
            LiveFailure::Copy(format!("writing memory: {}", enospc())).code(),
            Code::ResourceExhausted
        );
    }

    #[test]
    fn long_messages_are_capped() {
        let status = Status::from(ApiError::InvalidArgument("x".repeat(1 << 20)));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().len() <= crate::api::public::MAX_MESSAGE_BYTES);
        let status = Status::from(ApiError::SandboxDeleted("sb-1".into()));
        assert_eq!(status.code(), Code::Aborted);
        assert!(status.message().contains("was deleted"));
        let argv = vec!["echo".to_string(), "y".repeat(50_000)];
        let s = Status::from(ApiError::WarmupExit {
            argv,
            exit_code: 1,
            stderr: String::new(),
            cleanup: WARMUP_SANDBOX_DELETED.into(),
        });
        assert!(
            s.message()
                .starts_with("warm-up command [\"echo\", ...] (2 arguments, 50004 bytes) exited"),
            "{}",
            s.message()
        );
    }

    #[test]
    fn code_names_are_canonical() {
        assert_eq!(code_name(Code::ResourceExhausted), "RESOURCE_EXHAUSTED");
        assert_eq!(code_name(Code::DeadlineExceeded), "DEADLINE_EXCEEDED");
        assert_eq!(code_name(Code::Internal), "INTERNAL");
        assert_eq!(code_name(Code::Unauthenticated), "UNAUTHENTICATED");
    }
}
