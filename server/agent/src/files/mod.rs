//! File operations for the host: uploads ([`write`]), downloads ([`read`]),
//! and stat, list and remove ([`meta`]), each on a thread of its own so the
//! dispatcher never blocks on the filesystem; [`table`] routes their frames
//! and bounds how many run at once.
//!
//! Threads send with the host session of their request: after a forked
//! resume their frames are dropped and the table tells them to stop
//! ([`table::Transfers::retire_all`]), so an upload's temporary file is
//! removed and nothing more is said about them.

mod error;
mod meta;
mod path;
mod read;
pub mod table;
mod write;

use std::sync::Arc;
use std::thread;

use forkd_agent_proto::{FileErrorKind, GuestMsg, HostMsg};

use crate::exec::Ctx;
use crate::log;
pub use error::FileError;
use table::{Guard, StartError};

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

/// Answers request `id` with a failure (from the dispatcher: current session).
fn fail(ctx: &Ctx, id: u64, err: FileError) {
    let msg = GuestMsg::FileFailed {
        id,
        kind: err.kind,
        message: err.message,
    };
    if let Err(e) = ctx.channel.send(&msg) {
        log::local(format!("cannot send {msg:?}: {e}"));
    }
}

fn start_error(e: StartError) -> FileError {
    let kind = match e {
        StartError::Busy => FileErrorKind::Busy,
        StartError::Duplicate(_) => FileErrorKind::Protocol,
    };
    FileError::new(kind, e.to_string())
}

/// Runs `job` on a thread named `name` that holds `guard`; a failure to
/// start it is answered on `id`.
fn spawn(
    ctx: &Arc<Ctx>,
    id: u64,
    name: String,
    guard: Guard,
    job: impl FnOnce(&Ctx, Guard) + Send + 'static,
) {
    let thread_ctx = ctx.clone();
    let spawned = thread::Builder::new()
        .name(name)
        .spawn(move || job(&thread_ctx, guard));
    if let Err(e) = spawned {
        fail(
            ctx,
            id,
            FileError::new(FileErrorKind::Io, format!("cannot start a thread: {e}")),
        );
    }
}

/// Handles the file messages of the host (others are ignored).
pub fn handle(ctx: &Arc<Ctx>, msg: HostMsg) {
    // Only the dispatcher (our caller) starts sessions.
    let session = ctx.channel.session();
    match msg {
        HostMsg::WriteFile {
            id,
            path,
            mode,
            parents,
            exclusive,
        } => {
            if let Err(e) = path::split_for_write(&path) {
                return fail(ctx, id, e);
            }
            let handle = match ctx.files.start_upload(id) {
                Ok(h) => h,
                Err(e) => return fail(ctx, id, start_error(e)),
            };
            let req = write::Upload {
                id,
                path,
                mode: if mode == 0 { 0o644 } else { mode & 0o7777 },
                parents,
                exclusive,
            };
            let thread_ctx = ctx.clone();
            let spawned = thread::Builder::new()
                .name(format!("upload-{id}"))
                .spawn(move || write::run(&thread_ctx, session, req, handle));
            if let Err(e) = spawned {
                let msg = format!("cannot start a thread: {e}");
                fail(ctx, id, FileError::new(FileErrorKind::Io, msg));
            }
        }
        HostMsg::ReadFile {
            id,
            path,
            offset,
            length,
            window,
        } => {
            if let Err(e) = path::check(&path) {
                return fail(ctx, id, e);
            }
            if window == 0 {
                let msg = "a download's window must be > 0";
                return fail(ctx, id, FileError::new(FileErrorKind::Protocol, msg));
            }
            let (guard, ctl) = match ctx.files.start_download(id) {
                Ok(g) => g,
                Err(e) => return fail(ctx, id, start_error(e)),
            };
            let req = read::Download {
                id,
                path,
                offset,
                length,
                window,
            };
            spawn(
                ctx,
                id,
                format!("download-{id}"),
                guard,
                move |ctx, guard| read::run(ctx, session, req, guard, ctl),
            );
        }
        HostMsg::FileAck { id, bytes } => ctx.files.ack(id, bytes),
        HostMsg::FileAbort { id } => ctx.files.abort(id),
        HostMsg::StatFile { id, path } => one_shot(ctx, id, path, move |path| {
            meta::stat(path).map(|info| GuestMsg::FileStat { id, info })
        }),
        HostMsg::ListDir { id, path } => one_shot(ctx, id, path, move |path| {
            meta::list(path).map(|(entries, truncated)| GuestMsg::DirListing {
                id,
                entries,
                truncated,
            })
        }),
        HostMsg::RemoveFile {
            id,
            path,
            recursive,
        } => one_shot(ctx, id, path, move |path| {
            meta::remove(path, recursive).map(|()| GuestMsg::FileRemoved { id })
        }),
        other => log::warn(format!("not a file message: {other:?}")),
    }
}

/// Runs a stat, list or remove on its own thread and sends its answer.
fn one_shot(
    ctx: &Arc<Ctx>,
    id: u64,
    path: String,
    op: impl FnOnce(&str) -> Result<GuestMsg, FileError> + Send + 'static,
) {
    if let Err(e) = path::check(&path) {
        return fail(ctx, id, e);
    }
    let guard = match ctx.files.start_meta() {
        Ok(g) => g,
        Err(e) => return fail(ctx, id, start_error(e)),
    };
    let session = ctx.channel.session();
    spawn(
        ctx,
        id,
        format!("file-op-{id}"),
        guard,
        move |ctx, guard| {
            let msg = op(&path).unwrap_or_else(|e| GuestMsg::FileFailed {
                id,
                kind: e.kind,
                message: e.message,
            });
            drop(guard);
            ctx.send_in(session, &msg);
        },
    );
}

#[cfg(test)]
mod tests {
    #[test]
    fn hex() {
        assert_eq!(super::hex(&[0, 0xab, 0x10]), "00ab10");
    }
}
