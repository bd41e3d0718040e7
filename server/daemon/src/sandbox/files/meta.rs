//! StatFile, ListDir and RemoveFile: one request, one answer.

use forkd_api::v1 as pb;
use forkd_control::{Event, FileInfo, FileKind, Request};

use super::{event_error, request_error};
use crate::api::error::ApiError;
use crate::sandbox::registry::Sandbox;

/// Describes `path` (`lstat`).
pub async fn stat(sandbox: &Sandbox, path: String) -> Result<pb::FileInfo, ApiError> {
    match call(sandbox, |id| Request::StatFile { id, path }).await? {
        Event::FileStat { info, .. } => Ok(file_info(info)),
        other => Err(event_error(sandbox, other, "StatFile")),
    }
}

/// Lists the directory `path`.
pub async fn list(sandbox: &Sandbox, path: String) -> Result<pb::ListDirResponse, ApiError> {
    match call(sandbox, |id| Request::ListDir { id, path }).await? {
        Event::DirListing {
            entries, truncated, ..
        } => Ok(pb::ListDirResponse {
            entries: entries.into_iter().map(file_info).collect(),
            truncated,
        }),
        other => Err(event_error(sandbox, other, "ListDir")),
    }
}

/// Removes `path` (and, with `recursive`, everything under it).
pub async fn remove(sandbox: &Sandbox, path: String, recursive: bool) -> Result<(), ApiError> {
    match call(sandbox, |id| Request::RemoveFile {
        id,
        path,
        recursive,
    })
    .await?
    {
        Event::FileRemoved { .. } => Ok(()),
        other => Err(event_error(sandbox, other, "RemoveFile")),
    }
}

async fn call(sandbox: &Sandbox, make: impl FnOnce(u64) -> Request) -> Result<Event, ApiError> {
    sandbox
        .vmm
        .file_call(make)
        .await
        .map_err(|e| request_error(sandbox, e))
}

/// The API view of one file.
pub fn file_info(info: FileInfo) -> pb::FileInfo {
    let file_type = match info.kind {
        FileKind::File => pb::FileType::File,
        FileKind::Dir => pb::FileType::Directory,
        FileKind::Symlink => pb::FileType::Symlink,
        FileKind::Other => pb::FileType::Other,
    };
    pb::FileInfo {
        name: info.name,
        size: info.size,
        mode: info.mode,
        r#type: file_type as i32,
        modify_time: Some(prost_types::Timestamp {
            seconds: info.mtime_ns.div_euclid(1_000_000_000),
            nanos: info.mtime_ns.rem_euclid(1_000_000_000) as i32,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_before_the_epoch_keep_positive_nanos() {
        let info = FileInfo {
            name: "x".into(),
            size: 1,
            mode: 0o644,
            kind: FileKind::Symlink,
            mtime_ns: -1,
        };
        let pb = file_info(info);
        let t = pb.modify_time.unwrap();
        assert_eq!((t.seconds, t.nanos), (-1, 999_999_999));
        assert_eq!(pb.r#type, pb::FileType::Symlink as i32);
    }
}
