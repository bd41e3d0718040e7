//! Typed store errors. Each carries the tag (and path or chunk) it is
//! about, and says through [`StoreError::kind`] which class of failure it
//! is, so a caller can map it to a status code in one place.

use std::path::PathBuf;

use crate::manifest::Status;

/// The class of a [`StoreError`]; maps one-to-one onto gRPC status codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The caller passed something malformed (a bad tag).
    InvalidArgument,
    /// A host resource ran out (the huge page pool).
    ResourceExhausted,
    /// No snapshot has this tag.
    NotFound,
    /// The tag is taken.
    AlreadyExists,
    /// The snapshot exists but its state forbids the operation.
    FailedPrecondition,
    /// Stored data does not match its digests.
    DataLoss,
    /// The store or the files handed to it failed in a way the caller
    /// cannot fix.
    Internal,
}

/// What went wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A tag that does not match the allowed form.
    #[error(
        "snapshot tag {} is invalid: tags are 1-64 characters of letters, digits, '.', '_' or \
         '-', starting with a letter or digit",
        tag_text(.tag)
    )]
    InvalidTag {
        /// The rejected tag.
        tag: String,
    },
    /// The host's pool of 2 MiB huge pages cannot hold a huge-page
    /// snapshot's memory.
    #[error(
        "loading snapshot {tag} (2 MiB huge pages): the host's huge page pool is exhausted \
         ({source}); raise it with `sysctl vm.nr_hugepages=<pages>` (as root), or delete \
         huge-page sandboxes"
    )]
    NoHugePages {
        /// The tag.
        tag: String,
        /// The error from fallocate.
        #[source]
        source: std::io::Error,
    },
    /// No snapshot has this tag.
    #[error("snapshot {tag} not found")]
    NotFound {
        /// The tag.
        tag: String,
    },
    /// The tag is taken.
    #[error("snapshot {tag} already exists ({status}); delete it with DeleteSnapshot or choose another tag")]
    AlreadyExists {
        /// The tag.
        tag: String,
        /// Status of the existing snapshot.
        status: Status,
    },
    /// The snapshot cannot be used (spawned from, or be a parent) because it
    /// is not READY.
    #[error("snapshot {tag} is {status}{}; only READY snapshots can be used", reason_suffix(.reason))]
    NotReady {
        /// The tag.
        tag: String,
        /// Its status.
        status: Status,
        /// Why it failed, if it did.
        reason: Option<String>,
    },
    /// A diff's parent is missing or unusable.
    #[error("snapshot {tag} cannot be used: its parent {parent} {why}")]
    ParentUnusable {
        /// The diff.
        tag: String,
        /// The parent it names.
        parent: String,
        /// What is wrong with the parent.
        why: String,
    },
    /// A READY diff whose chain is broken: an ancestor is missing, not
    /// READY, or not the snapshot the diff was taken against. The diff's
    /// own files are kept; nothing can be spawned from it.
    #[error(
        "snapshot {tag} cannot be spawned from: its chain is broken, {ancestor} {why}; {tag}'s \
         own files are kept, but it needs every snapshot below it; delete it with DeleteSnapshot"
    )]
    ChainBroken {
        /// The diff asked for.
        tag: String,
        /// The first ancestor that is unusable.
        ancestor: String,
        /// What is wrong with it, e.g. "is FAILED (memory is 4096 bytes, ...)".
        why: String,
    },
    /// Deleting would orphan dependent diffs.
    #[error(
        "snapshot {tag} has dependent diff snapshots ({}); pass cascade to delete them too, or \
         force to delete only this one and leave them FAILED",
        .dependents.join(", ")
    )]
    HasDependents {
        /// The tag.
        tag: String,
        /// Its direct dependents.
        dependents: Vec<String>,
    },
    /// Deleting would remove the snapshot of running sandboxes.
    #[error(
        "snapshot {tag} has running children ({}); delete those sandboxes first, or pass force",
        .children.join(", ")
    )]
    HasRunningChildren {
        /// The tag.
        tag: String,
        /// Sandboxes forked from it (or from a snapshot being deleted with
        /// it).
        children: Vec<String>,
    },
    /// The snapshot (or one that depends on it) is still being written.
    #[error("snapshot {tag} is still writing; retry once it is READY or FAILED")]
    StillWriting {
        /// The snapshot being written.
        tag: String,
    },
    /// Stored data does not match the manifest's digests.
    #[error("snapshot {tag} is corrupt: {file} {detail}; delete it and take it again")]
    DataLoss {
        /// The snapshot whose file is bad.
        tag: String,
        /// The file (`memory`, `vmstate`, `pages`, `manifest.json`).
        file: &'static str,
        /// What does not match, e.g. "chunk 3 (bytes 12582912..16777216) does
        /// not match its SHA-256".
        detail: String,
    },
    /// The files handed to [`crate::Store::commit`] are not a valid snapshot.
    #[error("snapshot {tag} was not written correctly: {detail}")]
    BadFiles {
        /// The tag.
        tag: String,
        /// What is wrong.
        detail: String,
    },
    /// A file system operation failed.
    #[error("snapshot store: {op} {}: {source}", .path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// A rejected tag for a message: quoted when short, else only its length
/// (a client's megabyte-long tag is not echoed back).
fn tag_text(tag: &str) -> String {
    if tag.len() <= 2 * crate::MAX_TAG_LEN {
        format!("{tag:?}")
    } else {
        format!("of {} bytes", tag.len())
    }
}

fn reason_suffix(reason: &Option<String>) -> String {
    match reason {
        Some(r) if !r.is_empty() => format!(" ({r})"),
        _ => String::new(),
    }
}

impl StoreError {
    /// The class of the error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            StoreError::InvalidTag { .. } => ErrorKind::InvalidArgument,
            StoreError::NotFound { .. } => ErrorKind::NotFound,
            StoreError::NoHugePages { .. } => ErrorKind::ResourceExhausted,
            StoreError::AlreadyExists { .. } => ErrorKind::AlreadyExists,
            StoreError::NotReady { .. }
            | StoreError::ParentUnusable { .. }
            | StoreError::ChainBroken { .. }
            | StoreError::HasDependents { .. }
            | StoreError::HasRunningChildren { .. }
            | StoreError::StillWriting { .. } => ErrorKind::FailedPrecondition,
            StoreError::DataLoss { .. } => ErrorKind::DataLoss,
            StoreError::BadFiles { .. } | StoreError::Io { .. } => ErrorKind::Internal,
        }
    }

    /// An I/O error on `path` while doing `op`.
    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> StoreError {
        let path = path.into();
        move |source| StoreError::Io { op, path, source }
    }
}

/// Result of store operations.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;
