//! One upload: a temporary file in the target's directory, written chunk by
//! chunk as the data frames come, fsynced and renamed into place at the end
//! (never a partial file under the final name).

use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};

use forkd_agent_proto::{FileErrorKind, GuestMsg, MAX_DATA};
use nix::errno::Errno;
use nix::fcntl::{open, openat, renameat, renameat2, AtFlags, OFlag, RenameFlags};
use nix::sys::stat::{fchmod, fstatat, Mode, SFlag};
use nix::unistd::{linkat, unlinkat, UnlinkatFlags};
use sha2::{Digest, Sha256};

use crate::channel::Session;
use crate::exec::Ctx;
use crate::files::error::FileError;
use crate::files::hex;
use crate::files::path::split_for_write;
use crate::files::table::{UploadHandle, WriteMsg};
use crate::log;

/// Bytes of the target's name kept in the temporary file's name.
const TMP_NAME_KEEP: usize = 64;

/// Numbers temporary files apart within the agent.
static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// A validated WriteFile request.
pub struct Upload {
    /// Transfer id.
    pub id: u64,
    /// Absolute path of the file.
    pub path: String,
    /// Permission bits (0 already replaced by 0o644).
    pub mode: u32,
    /// Create missing parents.
    pub parents: bool,
    /// Fail if the path exists.
    pub exclusive: bool,
}

/// Runs the upload on the caller's (its own) thread and reports how it
/// ended, unless its session was retired.
pub fn run(ctx: &Ctx, session: Session, req: Upload, handle: UploadHandle) {
    let UploadHandle { guard, rx, written } = handle;
    let id = req.id;
    let msg = match write(ctx, session, &req, &rx, &written) {
        Ok(Some((size, sha256))) => GuestMsg::FileWritten { id, size, sha256 },
        Ok(None) => return,
        Err(e) => GuestMsg::FileFailed {
            id,
            kind: e.kind,
            message: e.message,
        },
    };
    // Free the id before answering, so the host may reuse it after the answer.
    drop((rx, guard));
    ctx.send_in(session, &msg);
}

/// A temporary file, removed on drop unless [`Temp::keep`] is called.
struct Temp<'a> {
    dir: &'a OwnedFd,
    name: String,
    display: String,
    kept: bool,
}

impl Temp<'_> {
    fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Temp<'_> {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        if let Err(e) = unlinkat(self.dir, self.name.as_str(), UnlinkatFlags::NoRemoveDir) {
            log::warn(format!("removing {}: {e}", self.display));
        }
    }
}

/// The upload's steps; `Ok(None)` when retired.
fn write(
    ctx: &Ctx,
    session: Session,
    req: &Upload,
    rx: &Receiver<WriteMsg>,
    written: &AtomicU64,
) -> Result<Option<(u64, String)>, FileError> {
    let (dir_path, name) = split_for_write(&req.path)?;
    if req.parents {
        std::fs::create_dir_all(dir_path).map_err(|e| {
            let mut err = FileError::io(format!("creating directory {dir_path}"), e);
            // std reports a non-directory on the way as "exists".
            if err.kind == FileErrorKind::AlreadyExists {
                err.kind = FileErrorKind::NotADirectory;
            }
            err
        })?;
    }
    let dir = open(
        dir_path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| FileError::io(format!("opening directory {dir_path}"), e))?;
    check_target(&dir, name, &req.path, req.exclusive)?;
    let (temp, mut file) = create_temp(&dir, dir_path, name, req.mode)?;

    let mut sha = Sha256::new();
    let mut size = 0u64;
    let mut credited = 0u64;
    let mut held = None;
    loop {
        let msg = match held.take() {
            Some(m) => m,
            None => rx.recv().unwrap_or(WriteMsg::Retire),
        };
        match msg {
            WriteMsg::Chunk(data) => {
                file.write_all(&data)
                    .map_err(|e| FileError::io(format!("writing {}", temp.display), e))?;
                sha.update(&data);
                size += data.len() as u64;
                written.store(size, Ordering::Release);
                // Credit when a frame's worth is owed or the queue is empty,
                // so a host within the window never stalls.
                match rx.try_recv() {
                    Ok(next) => held = Some(next),
                    Err(TryRecvError::Empty) => {}
                    Err(TryRecvError::Disconnected) => held = Some(WriteMsg::Retire),
                }
                if held.is_none() || size - credited >= MAX_DATA as u64 {
                    credited = size;
                    let msg = GuestMsg::FileCredit {
                        id: req.id,
                        bytes: size,
                    };
                    ctx.send_in(session, &msg);
                }
            }
            WriteMsg::End => break,
            WriteMsg::Abort => {
                return Err(FileError::new(
                    FileErrorKind::Aborted,
                    format!("upload to {} aborted by the host", req.path),
                ))
            }
            WriteMsg::Overrun => {
                return Err(FileError::new(
                    FileErrorKind::Protocol,
                    format!("upload to {} overran the window", req.path),
                ))
            }
            WriteMsg::Retire => return Ok(None),
        }
    }
    file.sync_all()
        .map_err(|e| FileError::io(format!("syncing {}", temp.display), e))?;
    drop(file);
    rename_into_place(&dir, &temp.name, name, &req.path, req.exclusive)?;
    temp.keep();
    // Best effort: make the new name durable on a disk.
    if let Err(e) = File::from(dir).sync_all() {
        log::warn(format!("syncing directory {dir_path}: {e}"));
    }
    Ok(Some((size, hex(&sha.finalize()))))
}

/// Fails early if the target exists and may not (exclusive) or cannot (a
/// directory) be replaced.
fn check_target(dir: &OwnedFd, name: &str, path: &str, exclusive: bool) -> Result<(), FileError> {
    match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(FileError::io(format!("checking {path}"), e)),
        Ok(_) if exclusive => Err(FileError::new(
            FileErrorKind::AlreadyExists,
            format!("{path} already exists"),
        )),
        Ok(st) if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR => {
            Err(FileError::new(
                FileErrorKind::IsADirectory,
                format!("{path} is a directory"),
            ))
        }
        Ok(_) => Ok(()),
    }
}

/// Creates `.NAME.forkd-PID-N.tmp` next to the target, `O_EXCL`, with `mode` exactly.
fn create_temp<'a>(
    dir: &'a OwnedFd,
    dir_path: &str,
    name: &str,
    mode: u32,
) -> Result<(Temp<'a>, File), FileError> {
    let mut keep = name.len().min(TMP_NAME_KEEP);
    while !name.is_char_boundary(keep) {
        keep -= 1;
    }
    loop {
        let seq = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
        let tmp = format!(".{}.forkd-{}-{seq}.tmp", &name[..keep], std::process::id());
        let display = format!("{}/{tmp}", dir_path.trim_end_matches('/'));
        let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_CLOEXEC;
        let perm = Mode::from_bits_truncate(mode & 0o7777);
        match openat(dir, tmp.as_str(), flags, perm) {
            Err(Errno::EEXIST) => continue,
            Err(e) => return Err(FileError::io(format!("creating {display}"), e)),
            Ok(fd) => {
                let temp = Temp {
                    dir,
                    name: tmp,
                    display,
                    kept: false,
                };
                // The umask may have cleared bits: set the mode exactly.
                fchmod(&fd, perm)
                    .map_err(|e| FileError::io(format!("chmod {}", temp.display), e))?;
                return Ok((temp, File::from(fd)));
            }
        }
    }
}

/// Renames the temporary file over the target; with `exclusive` never
/// replaces an existing one (`renameat2(RENAME_NOREPLACE)`, or link +
/// unlink where the filesystem lacks it).
fn rename_into_place(
    dir: &OwnedFd,
    tmp: &str,
    name: &str,
    path: &str,
    exclusive: bool,
) -> Result<(), FileError> {
    let what = format!("renaming into {path}");
    if !exclusive {
        return renameat(dir, tmp, dir, name).map_err(|e| FileError::io(what, e));
    }
    match renameat2(dir, tmp, dir, name, RenameFlags::RENAME_NOREPLACE) {
        Ok(()) => Ok(()),
        Err(Errno::EINVAL | Errno::ENOSYS) => {
            linkat(dir, tmp, dir, name, AtFlags::empty()).map_err(|e| FileError::io(what, e))?;
            if let Err(e) = unlinkat(dir, tmp, UnlinkatFlags::NoRemoveDir) {
                log::warn(format!("removing {tmp} after linking {path}: {e}"));
            }
            Ok(())
        }
        Err(Errno::EEXIST) => Err(FileError::new(
            FileErrorKind::AlreadyExists,
            format!("{path} already exists"),
        )),
        Err(e) => Err(FileError::io(what, e)),
    }
}
