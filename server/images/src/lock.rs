//! The store's build lock (`flock` on `ROOT/.lock`) and the clean-up of
//! scratch directories that killed builds left behind.

use std::fs::{File, OpenOptions};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::error::ImageError;
use crate::store::OLD_PREFIX;

/// Name of the lock file in the store's root.
const LOCK_FILE: &str = ".lock";

/// Prefix of a build's scratch directory in the store's root.
pub(crate) const BUILDING_PREFIX: &str = ".building-";

/// Held while a build runs; released on drop (or when the process dies).
pub(crate) struct BuildLock {
    _lock: Flock<File>,
}

impl BuildLock {
    /// Takes the lock of `root`, waiting for another build to finish;
    /// `waiting` is called once if it has to wait.
    pub(crate) fn take(root: &Path, waiting: &dyn Fn()) -> Result<Self, ImageError> {
        let path = root.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(ImageError::io("open", &path))?;
        let lock_err = |source| ImageError::Lock {
            path: path.clone(),
            source,
        };
        let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((file, Errno::EWOULDBLOCK)) => {
                waiting();
                Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| lock_err(e))?
            }
            Err((_, e)) => return Err(lock_err(e)),
        };
        Ok(Self { _lock: lock })
    }
}

/// Removes every `.building-*` and `.old-*` directory of `root`. Called with
/// the lock held, so none of them belongs to a running build. Returns how
/// many were removed.
pub(crate) fn remove_stale(root: &Path) -> Result<usize, ImageError> {
    let mut removed = 0;
    for entry in std::fs::read_dir(root).map_err(ImageError::io("list", root))? {
        let entry = entry.map_err(ImageError::io("list", root))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(BUILDING_PREFIX) || name.starts_with(OLD_PREFIX) {
            let path = entry.path();
            std::fs::remove_dir_all(&path).map_err(ImageError::io("remove", &path))?;
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_scratch_dirs_go_images_stay() {
        let t = tempfile::tempdir().unwrap();
        for d in [".building-a-1/x", ".old-a-2", "a", ".cache/debs"] {
            std::fs::create_dir_all(t.path().join(d)).unwrap();
        }
        let _lock = BuildLock::take(t.path(), &|| panic!("nobody else holds it")).unwrap();
        assert_eq!(remove_stale(t.path()).unwrap(), 2);
        let mut left: Vec<String> = std::fs::read_dir(t.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, [".cache", ".lock", "a"]);
    }

    #[test]
    fn lock_is_exclusive() {
        let t = tempfile::tempdir().unwrap();
        let held = BuildLock::take(t.path(), &|| panic!("free")).unwrap();
        let f = File::open(t.path().join(LOCK_FILE)).unwrap();
        assert!(Flock::lock(f, FlockArg::LockExclusiveNonblock).is_err());
        drop(held);
        let f = File::open(t.path().join(LOCK_FILE)).unwrap();
        assert!(Flock::lock(f, FlockArg::LockExclusiveNonblock).is_ok());
    }
}
