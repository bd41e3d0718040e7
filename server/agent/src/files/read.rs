//! One download: reads a range of a regular file and sends it in data
//! frames, never more than the host's window beyond its acks.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::Arc;

use forkd_agent_proto::{FileErrorKind, GuestMsg, MAX_DATA, STREAM_FILE};
use sha2::{Digest, Sha256};

use crate::channel::Session;
use crate::exec::Ctx;
use crate::files::error::FileError;
use crate::files::hex;
use crate::files::table::{DownloadCtl, Guard, Stop};

/// A validated ReadFile request.
pub struct Download {
    /// Transfer id.
    pub id: u64,
    /// Absolute path.
    pub path: String,
    /// First byte.
    pub offset: u64,
    /// Bytes at most; 0 = to the end.
    pub length: u64,
    /// Un-acked bytes allowed (> 0).
    pub window: u32,
}

/// Runs the download on the caller's (its own) thread and reports how it
/// ended, unless its session was retired.
pub fn run(ctx: &Ctx, session: Session, req: Download, guard: Guard, ctl: Arc<DownloadCtl>) {
    let id = req.id;
    let msg = match read(ctx, session, &req, &ctl) {
        Ok(Some((bytes, sha256))) => GuestMsg::FileRead { id, bytes, sha256 },
        Ok(None) => return,
        Err(e) => GuestMsg::FileFailed {
            id,
            kind: e.kind,
            message: e.message,
        },
    };
    drop(guard);
    ctx.send_in(session, &msg);
}

/// Opens a regular file for reading (never blocking on a FIFO's open).
fn open_regular(path: &str) -> Result<(File, u64), FileError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| FileError::io(format!("opening {path}"), e))?;
    let meta = file
        .metadata()
        .map_err(|e| FileError::io(format!("stat {path}"), e))?;
    if meta.is_dir() {
        return Err(FileError::new(
            FileErrorKind::IsADirectory,
            format!("{path} is a directory"),
        ));
    }
    if !meta.is_file() {
        return Err(FileError::new(
            FileErrorKind::NotAFile,
            format!("{path} is not a regular file"),
        ));
    }
    Ok((file, meta.len()))
}

/// The download's steps; `Ok(None)` when retired.
fn read(
    ctx: &Ctx,
    session: Session,
    req: &Download,
    ctl: &DownloadCtl,
) -> Result<Option<(u64, String)>, FileError> {
    let (file, size) = open_regular(&req.path)?;
    ctx.send_in(session, &GuestMsg::FileOpened { id: req.id, size });
    let window = u64::from(req.window);
    let limit = if req.length == 0 {
        u64::MAX
    } else {
        req.length
    };
    let mut buf = vec![0u8; MAX_DATA];
    let mut sha = Sha256::new();
    let mut sent = 0u64;
    while sent < limit {
        let room = match ctl.wait_room(sent, window) {
            Ok(room) => room,
            Err(Stop::Retire) => return Ok(None),
            Err(Stop::Abort) => {
                return Err(FileError::new(
                    FileErrorKind::Aborted,
                    format!("download of {} aborted by the host", req.path),
                ))
            }
        };
        let want = room.min(limit - sent).min(MAX_DATA as u64) as usize;
        let n = match file.read_at(&mut buf[..want], req.offset.saturating_add(sent)) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(FileError::io(format!("reading {}", req.path), e)),
        };
        sha.update(&buf[..n]);
        sent += n as u64;
        if let Err(e) = ctx
            .channel
            .send_data_in(session, req.id, STREAM_FILE, &buf[..n])
        {
            return Err(FileError::new(
                FileErrorKind::Io,
                format!("sending {}: {e}", req.path),
            ));
        }
    }
    Ok(Some((sent, hex(&sha.finalize()))))
}
