//! Typed errors of the daemon and the one place where they become gRPC
//! statuses.

use std::path::PathBuf;

use forkd_store::{ErrorKind, StoreError};
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
        "warm-up command {argv:?} exited with code {exit_code}{stderr}; the sandbox was deleted \
         and no snapshot was taken"
    )]
    WarmupExit {
        /// The command.
        argv: Vec<String>,
        /// Its exit code.
        exit_code: i32,
        /// "; stderr: ..." with the end of its stderr, or empty.
        stderr: String,
    },
    /// A CreateSnapshot warm-up command could not run to its end.
    #[error("warm-up command {argv:?} failed: {message}; the sandbox was deleted and no snapshot was taken")]
    WarmupFailed {
        /// The command.
        argv: Vec<String>,
        /// The code of the failure (e.g. DEADLINE_EXCEEDED).
        code: Code,
        /// What went wrong.
        message: String,
    },
    /// The daemon failed in a way the caller cannot fix.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// The gRPC status code for this error.
    pub fn code(&self) -> Code {
        match self {
            ApiError::InvalidArgument(_) => Code::InvalidArgument,
            ApiError::SandboxNotFound(_) => Code::NotFound,
            ApiError::TooManySandboxes { .. } | ApiError::OverCommit { .. } => {
                Code::ResourceExhausted
            }
            ApiError::FailedPrecondition(_) => Code::FailedPrecondition,
            ApiError::SnapshotWriting { .. } => Code::FailedPrecondition,
            ApiError::LiveFailed { failure, .. } => failure.code(),
            ApiError::ShuttingDown => Code::Unavailable,
            ApiError::ExecTimeout(_) | ApiError::CancelIgnored { .. } => Code::DeadlineExceeded,
            ApiError::SandboxStopped { .. } => Code::Aborted,
            ApiError::NoneStarted { code, .. } | ApiError::WarmupFailed { code, .. } => *code,
            ApiError::WarmupExit { .. } => Code::FailedPrecondition,
            ApiError::Store(e) => store_code(e.kind()),
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
            LiveFailure::Copy(_) => Code::Internal,
        }
    }
}

/// The status code of a class of store errors.
pub fn store_code(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
        ErrorKind::DataLoss => Code::DataLoss,
        ErrorKind::Internal => Code::Internal,
    }
}

impl From<ApiError> for Status {
    fn from(err: ApiError) -> Status {
        Status::new(err.code(), err.to_string())
    }
}

/// Why one sandbox of a SpawnSandboxes call did not start.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The sandbox directory could not be created.
    #[error("cannot create sandbox directory {path}: {source}")]
    SandboxDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The VMM process could not be started.
    #[error("cannot start VMM {path}: {source}")]
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
}

impl BootError {
    /// The gRPC status code for this error.
    pub fn code(&self) -> Code {
        match self {
            BootError::Timeout { .. } => Code::DeadlineExceeded,
            BootError::ShuttingDown => Code::Unavailable,
            BootError::SandboxDir { .. } | BootError::Launch { .. } | BootError::Exited { .. } => {
                Code::Internal
            }
        }
    }
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
    fn code_names_are_canonical() {
        assert_eq!(code_name(Code::ResourceExhausted), "RESOURCE_EXHAUSTED");
        assert_eq!(code_name(Code::DeadlineExceeded), "DEADLINE_EXCEEDED");
        assert_eq!(code_name(Code::Internal), "INTERNAL");
        assert_eq!(code_name(Code::Unauthenticated), "UNAUTHENTICATED");
    }
}
