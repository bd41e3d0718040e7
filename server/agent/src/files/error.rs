//! The typed error of file operations, mapped from errno to the wire's
//! [`FileErrorKind`].

use std::fmt::Display;
use std::io;

use forkd_agent_proto::FileErrorKind;

/// Why a file operation failed: the kind the host maps to a status code,
/// and a message naming the step and the path.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct FileError {
    /// For the host's status code.
    pub kind: FileErrorKind,
    /// What failed and why.
    pub message: String,
}

impl FileError {
    /// An error of `kind`.
    pub fn new(kind: FileErrorKind, message: impl Into<String>) -> FileError {
        FileError {
            kind,
            message: message.into(),
        }
    }

    /// A failed system call while `what` (e.g. `opening /a`); the kind comes from errno.
    pub fn io(what: impl Display, err: impl Into<io::Error>) -> FileError {
        let err = err.into();
        FileError {
            kind: kind_of(&err),
            message: format!("{what}: {err}"),
        }
    }

    /// A path that breaks the path rules.
    pub fn invalid(path: &str, why: &str) -> FileError {
        FileError::new(
            FileErrorKind::InvalidPath,
            format!("bad path {path:?}: {why}"),
        )
    }
}

/// The wire kind of an I/O error, by errno.
pub fn kind_of(err: &io::Error) -> FileErrorKind {
    match err.raw_os_error() {
        Some(libc::ENOENT) => FileErrorKind::NotFound,
        Some(libc::EEXIST) => FileErrorKind::AlreadyExists,
        Some(libc::ENOTDIR) => FileErrorKind::NotADirectory,
        Some(libc::EISDIR) => FileErrorKind::IsADirectory,
        Some(libc::ENOTEMPTY) => FileErrorKind::NotEmpty,
        Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => FileErrorKind::NoSpace,
        Some(libc::EACCES | libc::EPERM | libc::EROFS) => FileErrorKind::PermissionDenied,
        Some(libc::ENAMETOOLONG | libc::ELOOP) => FileErrorKind::InvalidPath,
        _ => FileErrorKind::Io,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_kinds() {
        let k = |e| kind_of(&io::Error::from_raw_os_error(e));
        assert_eq!(k(libc::ENOSPC), FileErrorKind::NoSpace);
        assert_eq!(k(libc::ENOTDIR), FileErrorKind::NotADirectory);
        assert_eq!(k(libc::EIO), FileErrorKind::Io);
        let e = FileError::io("opening /x", nix::errno::Errno::ENOENT);
        assert_eq!(e.kind, FileErrorKind::NotFound);
        assert!(e.message.starts_with("opening /x: "), "{e}");
    }
}
