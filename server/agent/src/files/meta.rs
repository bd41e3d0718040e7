//! Stat, list and remove: one-shot operations answered by one message.

use std::collections::BinaryHeap;
use std::ffi::OsStr;
use std::fs::{self, Metadata};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use forkd_agent_proto::{FileErrorKind, FileInfo, FileKind};

use crate::files::error::FileError;
use crate::files::path::last_component;

/// Most entries in one listing.
pub const LIST_MAX_ENTRIES: usize = 4096;
/// Most bytes of entries (as JSON) in one listing, well under `MAX_FRAME`.
pub const LIST_MAX_BYTES: usize = 512 * 1024;

/// Describes `meta` (from `lstat`) as the wire's [`FileInfo`].
fn info(name: String, meta: &Metadata) -> FileInfo {
    let ft = meta.file_type();
    let kind = if ft.is_symlink() {
        FileKind::Symlink
    } else if ft.is_dir() {
        FileKind::Dir
    } else if ft.is_file() {
        FileKind::File
    } else {
        FileKind::Other
    };
    FileInfo {
        name,
        size: meta.size(),
        mode: meta.mode() & 0o7777,
        kind,
        mtime_ns: meta
            .mtime()
            .saturating_mul(1_000_000_000)
            .saturating_add(meta.mtime_nsec()),
    }
}

/// `lstat` of one path.
pub fn stat(path: &str) -> Result<FileInfo, FileError> {
    let meta = fs::symlink_metadata(path).map_err(|e| FileError::io(format!("stat {path}"), e))?;
    Ok(info(last_component(path).to_string(), &meta))
}

/// The first entries of a directory by name (bytewise), each `lstat`ed,
/// and whether some were left out. Only [`LIST_MAX_ENTRIES`] names are
/// kept in memory however large the directory.
pub fn list(path: &str) -> Result<(Vec<FileInfo>, bool), FileError> {
    let what = || format!("listing {path}");
    let mut smallest: BinaryHeap<Vec<u8>> = BinaryHeap::new();
    let mut truncated = false;
    for entry in fs::read_dir(path).map_err(|e| FileError::io(what(), e))? {
        let entry = entry.map_err(|e| FileError::io(what(), e))?;
        smallest.push(entry.file_name().into_vec());
        if smallest.len() > LIST_MAX_ENTRIES {
            smallest.pop();
            truncated = true;
        }
    }
    let dir = Path::new(path);
    let mut entries = Vec::new();
    let mut bytes = 0;
    for name in smallest.into_sorted_vec() {
        let meta = match fs::symlink_metadata(dir.join(OsStr::from_bytes(&name))) {
            Ok(m) => m,
            // Removed since it was listed.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(FileError::io(what(), e)),
        };
        let fi = info(String::from_utf8_lossy(&name).into_owned(), &meta);
        bytes += serde_json::to_vec(&fi).map_or(LIST_MAX_BYTES, |v| v.len() + 1);
        if bytes > LIST_MAX_BYTES {
            truncated = true;
            break;
        }
        entries.push(fi);
    }
    Ok((entries, truncated))
}

/// Removes a file, symlink or empty directory; with `recursive`, any
/// directory with its contents. `/` is refused.
pub fn remove(path: &str, recursive: bool) -> Result<(), FileError> {
    if path.trim_end_matches('/').is_empty() {
        return Err(FileError::invalid(path, "refusing to remove /"));
    }
    let what = || format!("removing {path}");
    let meta = fs::symlink_metadata(path).map_err(|e| FileError::io(what(), e))?;
    if !meta.is_dir() {
        return fs::remove_file(path).map_err(|e| FileError::io(what(), e));
    }
    if recursive {
        return fs::remove_dir_all(path).map_err(|e| FileError::io(what(), e));
    }
    fs::remove_dir(path).map_err(|e| {
        let mut err = FileError::io(what(), e);
        // Some filesystems say EEXIST for a directory that is not empty.
        if err.kind == FileErrorKind::AlreadyExists {
            err.kind = FileErrorKind::NotEmpty;
        }
        err
    })
}
