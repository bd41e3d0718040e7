//! The data directory: its layout, the lock that keeps a second daemon
//! out, and the clean-up of what a crashed daemon left behind.
//!
//! ```text
//! <data-dir>/forkd.lock            flock held while the daemon runs
//! <data-dir>/sandboxes/<id>/       one per live sandbox
//! <data-dir>/sandboxes/<id>/vmm.log  the VMM's stdout and stderr
//! <data-dir>/snapshots/            the snapshot store (see forkd-store)
//! <data-dir>/pool/<n>.log          a standby VMM's log until it is claimed
//!                                  (then it moves to its sandbox's vmm.log)
//! ```

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::api::error::StartupError;

/// Name of the lock file.
pub const LOCK_FILE: &str = "forkd.lock";
/// Subdirectory holding one directory per sandbox.
pub const SANDBOXES: &str = "sandboxes";
/// Subdirectory holding the snapshot store.
pub const SNAPSHOTS: &str = "snapshots";
/// Subdirectory holding the logs of unclaimed standby VMMs.
pub const POOL: &str = "pool";
/// A sandbox's VMM log, inside its directory.
pub const VMM_LOG: &str = "vmm.log";

/// An opened, locked data directory. The lock is released on drop.
#[derive(Debug)]
pub struct DataDir {
    root: PathBuf,
    _lock: Flock<File>,
}

fn io_err<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(io::Error) -> StartupError + 'a {
    move |source| StartupError::DataDir {
        path: path.to_path_buf(),
        what,
        source,
    }
}

impl DataDir {
    /// Checks, creating nothing, that `root` can be the data directory:
    /// it and its nearest existing ancestor must be directories.
    pub fn check(root: &Path) -> Result<(), StartupError> {
        let not_a_dir = |path: &Path| StartupError::NotADirectory {
            data_dir: root.to_path_buf(),
            path: path.to_path_buf(),
        };
        let mut path = root;
        loop {
            match std::fs::metadata(path) {
                Ok(meta) if meta.is_dir() => return Ok(()),
                Ok(_) => return Err(not_a_dir(path)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                // ENOTDIR: a component further up is a file.
                Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {}
                Err(e) => return Err(io_err(path, "cannot inspect it")(e)),
            }
            match path.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => path = parent,
                _ => return Ok(()),
            }
        }
    }

    /// Creates the layout under `root`, takes the lock, and removes
    /// sandbox directories left by an earlier daemon.
    pub fn open(root: &Path) -> Result<DataDir, StartupError> {
        Self::check(root)?;
        std::fs::create_dir_all(root).map_err(io_err(root, "cannot create it"))?;
        let root = root
            .canonicalize()
            .map_err(io_err(root, "cannot resolve it"))?;
        let lock_path = root.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path, "cannot open the lock file"))?;
        let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((_, Errno::EWOULDBLOCK)) => return Err(StartupError::DataDirLocked(root)),
            Err((_, errno)) => {
                return Err(StartupError::DataDir {
                    path: lock_path,
                    what: "cannot lock it",
                    source: errno.into(),
                })
            }
        };
        let dir = DataDir { root, _lock: lock };
        // Owner only, also for a directory made by an older daemon or under
        // another umask: snapshots hold guest memory.
        use std::os::unix::fs::PermissionsExt;
        let private = || std::fs::Permissions::from_mode(0o700);
        std::fs::set_permissions(&dir.root, private())
            .map_err(io_err(&dir.root, "cannot make it private (chmod 0700)"))?;
        for sub in [SANDBOXES, SNAPSHOTS, POOL] {
            let path = dir.root.join(sub);
            std::fs::create_dir_all(&path).map_err(io_err(&path, "cannot create it"))?;
            std::fs::set_permissions(&path, private())
                .map_err(io_err(&path, "cannot make it private (chmod 0700)"))?;
        }
        let stale = dir
            .remove_all_sandboxes()
            .map_err(io_err(&dir.sandboxes(), "cannot remove stale sandboxes"))?;
        // An earlier daemon's standby logs: their processes died with it.
        for entry in std::fs::read_dir(dir.pool()).map_err(io_err(&dir.pool(), "cannot read it"))? {
            let path = entry.map_err(io_err(&dir.pool(), "cannot read it"))?.path();
            std::fs::remove_file(&path).map_err(io_err(&path, "cannot remove it"))?;
        }
        if stale > 0 {
            tracing::warn!(
                count = stale,
                "removed sandbox directories left by an earlier daemon"
            );
        }
        Ok(dir)
    }

    /// The data directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/sandboxes`.
    pub fn sandboxes(&self) -> PathBuf {
        self.root.join(SANDBOXES)
    }

    /// `<root>/snapshots`: the snapshot store.
    pub fn snapshots(&self) -> PathBuf {
        self.root.join(SNAPSHOTS)
    }

    /// `<root>/pool`: standby VMMs' logs.
    pub fn pool(&self) -> PathBuf {
        self.root.join(POOL)
    }

    /// `<root>/sandboxes/<id>`.
    pub fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.sandboxes().join(id)
    }

    /// Removes every entry of `<root>/sandboxes`; returns how many there
    /// were.
    pub fn remove_all_sandboxes(&self) -> io::Result<usize> {
        let mut count = 0;
        for entry in std::fs::read_dir(self.sandboxes())? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                std::fs::remove_dir_all(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
            count += 1;
        }
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_lock_and_stale_cleanup() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("data");
        std::fs::create_dir_all(root.join("sandboxes/sb-old")).unwrap();
        std::fs::write(root.join("sandboxes/sb-old/vmm.log"), "x").unwrap();

        let dir = DataDir::open(&root).unwrap();
        assert!(root.join("snapshots").is_dir());
        assert!(root.join("forkd.lock").is_file());
        assert_eq!(std::fs::read_dir(dir.sandboxes()).unwrap().count(), 0);
        assert_eq!(dir.sandbox_dir("sb-1"), dir.root().join("sandboxes/sb-1"));

        let err = DataDir::open(&root).unwrap_err();
        assert!(matches!(err, StartupError::DataDirLocked(_)), "{err}");
        assert!(err.to_string().contains("another forkd daemon"));

        drop(dir);
        DataDir::open(&root).unwrap();
    }
}
