//! The data_dir check: the directory `forkd serve --data-dir` would use
//! exists (or can be created), is writable, and has room.
//!
//! A missing directory is created for the test (with any missing parents)
//! and removed again, so doctor leaves nothing behind. Writability is
//! proven with a probe file (created, written, fsynced, removed). Room is
//! `statvfs`: space and inodes available to unprivileged users, judged by
//! [`judge`] against the thresholds below. The filesystem comes from
//! `/proc/self/mountinfo`, and a running daemon's hold on `forkd.lock` from
//! `/proc/locks` (read only: doctor never takes the lock).

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::report::{human_bytes, Check, Status};
use crate::data_dir::LOCK_FILE;

/// Name of this check.
pub const NAME: &str = "data_dir";

/// Fail below this much free space: a FULL snapshot of a default sandbox
/// (256 MiB of RAM) may need that much, so below it snapshots would fail.
pub const FAIL_BELOW_BYTES: u64 = 256 << 20;
/// Warn below this much free space: room for only a few snapshots.
pub const WARN_BELOW_BYTES: u64 = 2 << 30;
/// Warn when less than this share of the filesystem is free (filesystems
/// slow down and fragment when nearly full).
pub const WARN_BELOW_PERCENT: f64 = 5.0;
/// Fail below this many free inodes (each snapshot takes a few files, each
/// sandbox a directory and a log).
pub const FAIL_BELOW_INODES: u64 = 1_000;
/// Warn below this many free inodes.
pub const WARN_BELOW_INODES: u64 = 10_000;

/// Space figures of a filesystem, from `statvfs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Space {
    /// Bytes available to unprivileged users (`f_bavail * f_frsize`).
    pub avail_bytes: u64,
    /// Size of the filesystem (`f_blocks * f_frsize`).
    pub total_bytes: u64,
    /// Inodes available (`f_favail`).
    pub avail_inodes: u64,
    /// Inodes in all (`f_files`; 0 when the filesystem has no fixed limit).
    pub total_inodes: u64,
}

impl Space {
    /// Free space as a percentage of the filesystem.
    pub fn avail_percent(&self) -> f64 {
        if self.total_bytes == 0 {
            0.0
        } else {
            self.avail_bytes as f64 * 100.0 / self.total_bytes as f64
        }
    }
}

/// Judges `space` against the thresholds; the worst status and the
/// reasons for it (empty when ok).
pub fn judge(space: &Space) -> (Status, Vec<String>) {
    let mut fail = Vec::new();
    let mut warn = Vec::new();
    let free = human_bytes(space.avail_bytes);
    if space.avail_bytes < FAIL_BELOW_BYTES {
        fail.push(format!(
            "only {free} free (below {})",
            human_bytes(FAIL_BELOW_BYTES)
        ));
    } else if space.avail_bytes < WARN_BELOW_BYTES {
        warn.push(format!(
            "only {free} free (below {})",
            human_bytes(WARN_BELOW_BYTES)
        ));
    } else if space.avail_percent() < WARN_BELOW_PERCENT {
        warn.push(format!(
            "only {:.1} % of the filesystem free (below {WARN_BELOW_PERCENT} %)",
            space.avail_percent()
        ));
    }
    if space.total_inodes > 0 {
        if space.avail_inodes < FAIL_BELOW_INODES {
            fail.push(format!(
                "only {} inodes free (below {FAIL_BELOW_INODES})",
                space.avail_inodes
            ));
        } else if space.avail_inodes < WARN_BELOW_INODES {
            warn.push(format!(
                "only {} inodes free (below {WARN_BELOW_INODES})",
                space.avail_inodes
            ));
        }
    }
    if !fail.is_empty() {
        fail.extend(warn);
        (Status::Fail, fail)
    } else if !warn.is_empty() {
        (Status::Warn, warn)
    } else {
        (Status::Ok, Vec::new())
    }
}

/// The filesystem a path lives on, from `/proc/self/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// Filesystem type (`ext4`, `xfs`, `tmpfs`, `overlay`, ...).
    pub fs_type: String,
    /// The mount source (a device, or a name such as `tmpfs`).
    pub source: String,
}

/// Undoes mountinfo's octal escapes (`\040` is a space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        if let (b'\\', Some(d)) = (bytes[i], octal) {
            let v = d.iter().fold(0u32, |v, b| v * 8 + u32::from(b - b'0'));
            out.push(v as u8);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount holding the absolute path `path`: the longest mount point
/// that is a prefix of it (the last one listed wins a tie, as it is mounted
/// on top).
pub fn mount_of(mountinfo: &str, path: &Path) -> Option<Mount> {
    let mut best: Option<Mount> = None;
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let Some(point) = left.split(' ').nth(4) else {
            continue;
        };
        let point = PathBuf::from(unescape(point));
        if !path.starts_with(&point) {
            continue;
        }
        let mut right = right.split(' ');
        let (Some(fs_type), Some(source)) = (right.next(), right.next()) else {
            continue;
        };
        let longer = best
            .as_ref()
            .is_none_or(|b| point.components().count() >= b.mount_point.components().count());
        if longer {
            best = Some(Mount {
                mount_point: point,
                fs_type: fs_type.to_owned(),
                source: unescape(source),
            });
        }
    }
    best
}

/// The pid holding a `flock` on the file with device `(major, minor)` and
/// inode `ino`, from `/proc/locks` text (waiters, `->` lines, are skipped).
pub fn flock_holder(locks: &str, major: u64, minor: u64, ino: u64) -> Option<u32> {
    let want = format!("{major:02x}:{minor:02x}:{ino}");
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // "1: FLOCK ADVISORY WRITE 1234 fd:01:5678 0 EOF"
        if fields.get(1) != Some(&"FLOCK") || fields.get(5) != Some(&want.as_str()) {
            return None;
        }
        fields.get(4)?.parse().ok()
    })
}

/// Why the directory is unusable.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    /// The path, or a parent, exists but is not a directory.
    #[error("{0} exists but is not a directory")]
    NotADirectory(PathBuf),
    /// Creating it failed.
    #[error("cannot create {path}: {source}")]
    Create {
        /// The data directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Writing a probe file failed.
    #[error("{path} is not writable: {source}")]
    NotWritable {
        /// The data directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// `statvfs` failed.
    #[error("statvfs({path}): {source}")]
    Statvfs {
        /// The data directory.
        path: PathBuf,
        /// The errno.
        #[source]
        source: nix::errno::Errno,
    },
}

impl DataDirError {
    fn hint(&self) -> String {
        let io = match self {
            DataDirError::NotADirectory(_) => {
                return "choose another --data-dir (and pass the same one to `forkd serve`)".into()
            }
            DataDirError::Statvfs { .. } => {
                return "check that the filesystem is mounted and healthy".into()
            }
            DataDirError::Create { source, .. } | DataDirError::NotWritable { source, .. } => {
                source
            }
        };
        match io.raw_os_error() {
            Some(libc::EROFS) => {
                "the filesystem is read-only: choose a --data-dir on a writable one".into()
            }
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => {
                "the filesystem is full: free space or choose another --data-dir".into()
            }
            _ => "run forkd as root, or create the directory and give it to the daemon's user \
                  (`mkdir -p DIR && chown USER DIR`), or choose another --data-dir"
                .into(),
        }
    }
}

/// What the probe found.
#[derive(Debug)]
pub struct Probe {
    /// Whether the directory existed before the check.
    pub existed: bool,
    /// Its filesystem figures.
    pub space: Space,
    /// Its filesystem, when mountinfo could be read.
    pub mount: Option<Mount>,
    /// A process holding `forkd.lock` (a running daemon).
    pub lock_holder: Option<u32>,
}

/// Directories `create_dir_all(dir)` would create, deepest first; an error
/// when the nearest existing ancestor is not a directory.
fn missing_dirs(dir: &Path) -> Result<Vec<PathBuf>, DataDirError> {
    let mut missing = Vec::new();
    for a in dir.ancestors() {
        if a.as_os_str().is_empty() {
            break;
        }
        match std::fs::metadata(a) {
            Ok(m) if m.is_dir() => return Ok(missing),
            Ok(_) => return Err(DataDirError::NotADirectory(a.to_path_buf())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => missing.push(a.to_path_buf()),
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                // A component further up is a file; keep going to name it.
                missing.push(a.to_path_buf());
            }
            Err(source) => {
                return Err(DataDirError::Create {
                    path: dir.to_path_buf(),
                    source,
                })
            }
        }
    }
    Ok(missing)
}

fn write_probe(dir: &Path) -> io::Result<()> {
    let probe = dir.join(format!(".forkd-doctor-{}", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&probe)?;
        f.write_all(&[0u8; 4096])?;
        f.sync_all()
    })();
    let removed = std::fs::remove_file(&probe);
    result?;
    match removed {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn measure(dir: &Path) -> Result<Space, DataDirError> {
    let s = nix::sys::statvfs::statvfs(dir).map_err(|source| DataDirError::Statvfs {
        path: dir.to_path_buf(),
        source,
    })?;
    let frsize = s.fragment_size() as u64;
    Ok(Space {
        avail_bytes: s.blocks_available() as u64 * frsize,
        total_bytes: s.blocks() as u64 * frsize,
        avail_inodes: s.files_available() as u64,
        total_inodes: s.files() as u64,
    })
}

fn lock_holder(dir: &Path) -> Option<u32> {
    let meta = std::fs::metadata(dir.join(LOCK_FILE)).ok()?;
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let dev = meta.dev();
    flock_holder(
        &locks,
        libc::major(dev) as u64,
        libc::minor(dev) as u64,
        meta.ino(),
    )
}

/// Checks `dir`, creating it (and removing it again) when missing.
pub fn probe(dir: &Path) -> Result<Probe, DataDirError> {
    let missing = missing_dirs(dir)?;
    let existed = missing.is_empty();
    if !existed {
        std::fs::create_dir_all(dir).map_err(|source| DataDirError::Create {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    let result = (|| {
        write_probe(dir).map_err(|source| DataDirError::NotWritable {
            path: dir.to_path_buf(),
            source,
        })?;
        let space = measure(dir)?;
        let mount = match (
            dir.canonicalize(),
            std::fs::read_to_string("/proc/self/mountinfo"),
        ) {
            (Ok(abs), Ok(info)) => mount_of(&info, &abs),
            _ => None,
        };
        Ok(Probe {
            existed,
            space,
            mount,
            lock_holder: if existed { lock_holder(dir) } else { None },
        })
    })();
    // Deepest first; stops at the first that is not empty (someone else
    // put something there meanwhile).
    for d in &missing {
        if std::fs::remove_dir(d).is_err() {
            break;
        }
    }
    result
}

/// The check.
pub fn check(dir: &Path) -> Check {
    let shown = dir.display().to_string();
    let p = match probe(dir) {
        Ok(p) => p,
        Err(e) => {
            let hint = e.hint();
            return Check::fail(NAME, e.to_string(), hint).with("path", shown);
        }
    };
    let s = &p.space;
    let (status, reasons) = judge(s);
    let state = if p.existed {
        format!("{shown} is writable")
    } else {
        format!("{shown} does not exist yet; it can be created and written (tested, then removed)")
    };
    let fs = p
        .mount
        .as_ref()
        .map(|m| format!("; {} on {}", m.fs_type, m.mount_point.display()))
        .unwrap_or_default();
    let inodes = if s.total_inodes == 0 {
        "no inode limit".to_owned()
    } else {
        format!("{} inodes free", s.avail_inodes)
    };
    let held = p
        .lock_holder
        .map(|pid| format!("; in use by a running forkd (pid {pid} holds {LOCK_FILE})"))
        .unwrap_or_default();
    let space = format!(
        "{} free of {} ({:.1} %), {inodes}",
        human_bytes(s.avail_bytes),
        human_bytes(s.total_bytes),
        s.avail_percent()
    );
    let finding = if reasons.is_empty() {
        format!("{state}{fs}: {space}{held}")
    } else {
        format!("{state}{fs}: {}{held}", reasons.join(", "))
    };
    let hint = "free space (DeleteSnapshot removes unused snapshots) or move --data-dir to a \
                larger filesystem; a FULL snapshot takes up to its sandbox's memory size (256 MiB \
                by default)";
    let c = match status {
        Status::Fail => Check::fail(NAME, finding, hint),
        Status::Warn => Check::warn(NAME, finding, hint),
        _ => Check::ok(NAME, finding),
    };
    c.with("path", shown)
        .with("existed", p.existed)
        .with(
            "fs_type",
            p.mount
                .as_ref()
                .map_or(serde_json::Value::Null, |m| m.fs_type.clone().into()),
        )
        .with(
            "mount_point",
            p.mount.as_ref().map_or(serde_json::Value::Null, |m| {
                m.mount_point.display().to_string().into()
            }),
        )
        .with("avail_bytes", s.avail_bytes)
        .with("total_bytes", s.total_bytes)
        .with("avail_percent", (s.avail_percent() * 10.0).round() / 10.0)
        .with("avail_inodes", s.avail_inodes)
        .with("total_inodes", s.total_inodes)
        .with(
            "lock_holder_pid",
            p.lock_holder.map_or(serde_json::Value::Null, Into::into),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    fn space(avail_bytes: u64, total_bytes: u64, avail_inodes: u64, total_inodes: u64) -> Space {
        Space {
            avail_bytes,
            total_bytes,
            avail_inodes,
            total_inodes,
        }
    }

    #[test]
    fn thresholds() {
        assert_eq!(
            judge(&space(64 * GIB, 252 * GIB, 16_000_000, 16_777_216)).0,
            Status::Ok
        );
        // Absolute space.
        let (st, why) = judge(&space(GIB, 252 * GIB, 1 << 20, 1 << 24));
        assert_eq!(st, Status::Warn);
        assert_eq!(why, ["only 1.0 GiB free (below 2.0 GiB)"]);
        let (st, why) = judge(&space(100 * MIB, 252 * GIB, 1 << 20, 1 << 24));
        assert_eq!(st, Status::Fail);
        assert_eq!(why, ["only 100.0 MiB free (below 256.0 MiB)"]);
        assert_eq!(
            judge(&space(FAIL_BELOW_BYTES, 10 * GIB, 1 << 20, 1 << 24)).0,
            Status::Warn
        );
        assert_eq!(
            judge(&space(WARN_BELOW_BYTES, 10 * GIB, 1 << 20, 1 << 24)).0,
            Status::Ok
        );
        // Share of a big filesystem.
        let (st, why) = judge(&space(40 * GIB, 1000 * GIB, 1 << 20, 1 << 24));
        assert_eq!(st, Status::Warn);
        assert!(why[0].contains("4.0 % of the filesystem"), "{why:?}");
        // Inodes; 0 total means no limit (btrfs).
        assert_eq!(
            judge(&space(64 * GIB, 100 * GIB, 5_000, 1 << 24)).0,
            Status::Warn
        );
        let (st, why) = judge(&space(GIB, 100 * GIB, 10, 1 << 24));
        assert_eq!(st, Status::Fail);
        assert_eq!(
            why.len(),
            2,
            "the inode failure and the space warning: {why:?}"
        );
        assert_eq!(judge(&space(64 * GIB, 100 * GIB, 0, 0)).0, Status::Ok);
    }

    #[test]
    fn mount_lookup() {
        let info = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 22 0:26 / /tmp rw,nosuid shared:5 - tmpfs tmpfs rw
31 22 0:27 / /var/lib/forkd\\040data rw - xfs /dev/vdb rw
32 30 0:28 / /tmp rw - overlay overlay rw
";
        let m = mount_of(info, Path::new("/var/lib/x")).unwrap();
        assert_eq!(
            (m.mount_point.to_str().unwrap(), m.fs_type.as_str()),
            ("/", "ext4")
        );
        let m = mount_of(info, Path::new("/tmp/a/b")).unwrap();
        assert_eq!(m.fs_type, "overlay", "the later mount on /tmp is on top");
        let m = mount_of(info, Path::new("/var/lib/forkd data/snapshots")).unwrap();
        assert_eq!((m.fs_type.as_str(), m.source.as_str()), ("xfs", "/dev/vdb"));
        // A prefix must match whole components.
        let m = mount_of(info, Path::new("/tmpx")).unwrap();
        assert_eq!(m.fs_type, "ext4");
        assert!(mount_of("", Path::new("/")).is_none());
    }

    #[test]
    fn lock_lookup() {
        let locks = "\
1: POSIX  ADVISORY  WRITE 99 00:1a:42 0 EOF
2: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF
2: -> FLOCK  ADVISORY  WRITE 4321 fd:01:5678 0 EOF
";
        assert_eq!(flock_holder(locks, 0xfd, 1, 5678), Some(1234));
        assert_eq!(
            flock_holder(locks, 0, 0x1a, 42),
            None,
            "POSIX locks are not forkd's"
        );
        assert_eq!(flock_holder(locks, 0xfd, 1, 1), None);
    }

    #[test]
    fn missing_dir_is_created_and_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b/c");
        let c = check(&dir);
        assert_eq!(c.details["existed"], false);
        assert_ne!(c.status, Status::Fail, "{c:?}");
        assert!(
            !tmp.path().join("a").exists(),
            "created dirs are removed again"
        );
        assert!(c.finding.contains("does not exist yet"));
    }

    #[test]
    fn existing_dir_is_left_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let c = check(tmp.path());
        assert_eq!(c.details["existed"], true);
        assert!(c.finding.contains("is writable"), "{}", c.finding);
        assert_eq!(
            std::fs::read_dir(tmp.path()).unwrap().count(),
            0,
            "probe file removed"
        );
    }

    #[test]
    fn path_under_a_file_fails() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("file");
        std::fs::write(&file, "x").unwrap();
        let c = check(&file.join("data"));
        assert_eq!(c.status, Status::Fail);
        assert_eq!(
            c.finding,
            format!("{} exists but is not a directory", file.display())
        );
        assert!(c.hint.unwrap().contains("--data-dir"));
        let c = check(&file);
        assert_eq!(c.status, Status::Fail);
    }
}
