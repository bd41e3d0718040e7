//! Types of the file-transfer messages: what a file is, and why a file
//! operation failed.

use serde::{Deserialize, Serialize};

/// What kind of file a directory entry or path is (never followed: `lstat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link (not followed).
    Symlink,
    /// A device, FIFO or socket.
    Other,
}

/// One file as `lstat(2)` sees it: a symlink is described, not followed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    /// The last component of the path (for [`crate::HostMsg::StatFile`] of
    /// `/`, `/` itself). A name that is not UTF-8 is converted lossily
    /// (U+FFFD), so it may not name the file back.
    pub name: String,
    /// Size in bytes (`st_size`; a symlink's is its target's length).
    pub size: u64,
    /// Permission bits, `st_mode & 0o7777` (setuid, setgid, sticky, rwx).
    pub mode: u32,
    /// What kind of file it is.
    pub kind: FileKind,
    /// Last modification, ns since the Unix epoch (negative before it).
    pub mtime_ns: i64,
}

/// Why a file operation failed ([`crate::GuestMsg::FileFailed`]). The
/// daemon maps these to its status codes (noted per variant).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileErrorKind {
    /// The path, or a directory on it, does not exist (`ENOENT`). NOT_FOUND.
    NotFound,
    /// An exclusive write found the path taken (`EEXIST`). ALREADY_EXISTS.
    AlreadyExists,
    /// A component of the path is not a directory, or `ListDir` of a
    /// non-directory (`ENOTDIR`). FAILED_PRECONDITION.
    NotADirectory,
    /// The path is a directory where a file is needed (`EISDIR`). FAILED_PRECONDITION.
    IsADirectory,
    /// A non-recursive remove of a directory that is not empty (`ENOTEMPTY`).
    /// FAILED_PRECONDITION.
    NotEmpty,
    /// `ReadFile` of a device, FIFO or socket. FAILED_PRECONDITION.
    NotAFile,
    /// The guest's filesystem is full (`ENOSPC`, `EDQUOT`, `EFBIG`). RESOURCE_EXHAUSTED.
    NoSpace,
    /// Permissions or a read-only filesystem (`EACCES`, `EPERM`, `EROFS`). PERMISSION_DENIED.
    PermissionDenied,
    /// The path breaks the path rules (empty, relative, NUL byte, no file
    /// name for a write, `/` for a remove) or is unusable (`ENAMETOOLONG`,
    /// `ELOOP`). INVALID_ARGUMENT.
    InvalidPath,
    /// Too many file operations are running in the agent; retry later. UNAVAILABLE.
    Busy,
    /// The host sent [`crate::HostMsg::FileAbort`]. CANCELLED.
    Aborted,
    /// The host broke the protocol (duplicate transfer id, upload window
    /// overrun, zero read window). INTERNAL.
    Protocol,
    /// Any other I/O failure; the message says which. INTERNAL.
    Io,
}
