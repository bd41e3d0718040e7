//! The image store: one directory per image under a root, each holding
//! `manifest.json`, `vmlinuz` and `initrd`. Entries whose names start with
//! `.` (scratch dirs of builds, the lock, the download cache) are never
//! images.

use std::path::{Path, PathBuf};

use crate::error::ImageError;
use crate::manifest::Manifest;
use crate::name::validate_name;

/// Prefix of directories images are set aside in before removal.
pub(crate) const OLD_PREFIX: &str = ".old-";

/// A directory of images.
#[derive(Clone, Debug)]
pub struct ImageStore {
    root: PathBuf,
}

/// A complete image of the store.
#[derive(Clone, Debug)]
pub struct Image {
    /// Its name.
    pub name: String,
    /// Its directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
}

impl Image {
    /// The kernel to boot.
    pub fn kernel_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.kernel.path)
    }

    /// The initramfs (uncompressed newc cpio).
    pub fn initrd_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.initrd.path)
    }
}

impl ImageStore {
    /// A store rooted at `root` (not created until a build needs it).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory image `name` lives in (whether it exists or not).
    pub(crate) fn dir_of(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Image `name`, with its manifest read and its files' sizes checked
    /// (digests are not verified here: that reads the whole initrd).
    pub fn get(&self, name: &str) -> Result<Image, ImageError> {
        validate_name(name)?;
        let dir = self.dir_of(name);
        match std::fs::symlink_metadata(&dir) {
            Ok(md) if md.is_dir() => {}
            Ok(_) => {
                return Err(ImageError::Invalid {
                    name: name.to_string(),
                    reason: format!("{} is not a directory", dir.display()),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ImageError::NotFound {
                    name: name.to_string(),
                })
            }
            Err(e) => return Err(ImageError::io("stat", dir)(e)),
        }
        let manifest = Manifest::read(name, &dir)?;
        if manifest.name != name {
            return Err(ImageError::Invalid {
                name: name.to_string(),
                reason: format!("its manifest names it {:?}", manifest.name),
            });
        }
        let image = Image {
            name: name.to_string(),
            dir,
            manifest,
        };
        check_size(name, &image.kernel_path(), image.manifest.kernel.bytes)?;
        check_size(name, &image.initrd_path(), image.manifest.initrd.bytes)?;
        Ok(image)
    }

    /// Every image of the store, sorted by name. A missing root is an empty
    /// store; entries that are not valid images are skipped.
    pub fn list(&self) -> Result<Vec<Image>, ImageError> {
        let entries = match std::fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(ImageError::io("list", &self.root)(e)),
        };
        let mut images = Vec::new();
        for entry in entries {
            let entry = entry.map_err(ImageError::io("list", &self.root))?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if validate_name(&name).is_err() {
                continue; // dot entries and strays
            }
            if let Ok(image) = self.get(&name) {
                images.push(image);
            }
        }
        images.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(images)
    }

    /// Removes image `name`: renamed aside first (so it vanishes at once,
    /// never half-removed under its name), then deleted.
    pub fn remove(&self, name: &str) -> Result<(), ImageError> {
        validate_name(name)?;
        let dir = self.dir_of(name);
        if std::fs::symlink_metadata(&dir).is_err() {
            return Err(ImageError::NotFound {
                name: name.to_string(),
            });
        }
        let aside = self.set_aside(name, &dir)?;
        std::fs::remove_dir_all(&aside).map_err(ImageError::io("remove", &aside))
    }

    /// Renames `dir` to a fresh `.old-NAME-<random>` in the root; returns
    /// the new path.
    pub(crate) fn set_aside(&self, name: &str, dir: &Path) -> Result<PathBuf, ImageError> {
        let slot = tempfile::Builder::new()
            .prefix(&format!("{OLD_PREFIX}{name}-"))
            .tempdir_in(&self.root)
            .map_err(ImageError::io("create a directory in", &self.root))?
            .keep();
        // rename(2) onto an empty directory replaces it.
        std::fs::rename(dir, &slot).map_err(ImageError::io("rename", dir))?;
        Ok(slot)
    }
}

fn check_size(name: &str, path: &Path, want: u64) -> Result<(), ImageError> {
    let got = std::fs::metadata(path)
        .map_err(|e| ImageError::Invalid {
            name: name.to_string(),
            reason: format!("{}: {e}", path.display()),
        })?
        .len();
    if got != want {
        return Err(ImageError::Invalid {
            name: name.to_string(),
            reason: format!(
                "{} is {got} bytes, its manifest says {want}",
                path.display()
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::manifest::{tests::sample, MANIFEST_FILE};

    /// Writes a complete fake image `name` into `store`.
    pub(crate) fn fake_image(store: &ImageStore, name: &str) {
        let dir = store.dir_of(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("vmlinuz"), b"abc").unwrap();
        std::fs::write(dir.join("initrd"), b"abcd").unwrap();
        std::fs::write(dir.join(MANIFEST_FILE), sample(name).to_json()).unwrap();
    }

    #[test]
    fn get_list_remove() {
        let root = tempfile::tempdir().unwrap();
        let store = ImageStore::new(root.path());
        assert!(store.list().unwrap().is_empty());
        fake_image(&store, "b");
        fake_image(&store, "a");
        // Dot dirs are never images, even with a manifest in them.
        fake_image(&store, "a");
        std::fs::rename(store.dir_of("a"), root.path().join(".building-a-x")).unwrap();
        fake_image(&store, "a");
        std::fs::create_dir(root.path().join(".old-b-y")).unwrap();
        std::fs::write(root.path().join(".lock"), b"").unwrap();
        let names: Vec<String> = store.list().unwrap().into_iter().map(|i| i.name).collect();
        assert_eq!(names, ["a", "b"]);

        let a = store.get("a").unwrap();
        assert_eq!(a.kernel_path(), root.path().join("a/vmlinuz"));
        assert_eq!(a.initrd_path(), root.path().join("a/initrd"));
        assert!(matches!(
            store.get(".building-a-x"),
            Err(ImageError::InvalidName { .. })
        ));

        store.remove("a").unwrap();
        assert!(matches!(store.get("a"), Err(ImageError::NotFound { .. })));
        assert!(matches!(
            store.remove("a"),
            Err(ImageError::NotFound { .. })
        ));
        let names: Vec<String> = store.list().unwrap().into_iter().map(|i| i.name).collect();
        assert_eq!(names, ["b"]);
        assert!(!std::fs::read_dir(root.path()).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(".old-a-")));
    }

    #[test]
    fn get_missing_is_not_found() {
        let root = tempfile::tempdir().unwrap();
        let store = ImageStore::new(root.path().join("nope"));
        assert!(matches!(
            store.get("debian-python"),
            Err(ImageError::NotFound { .. })
        ));
        assert!(store.list().unwrap().is_empty());
    }

    #[test]
    fn wrong_size_or_manifest_is_invalid() {
        let root = tempfile::tempdir().unwrap();
        let store = ImageStore::new(root.path());
        fake_image(&store, "a");
        std::fs::write(store.dir_of("a").join("initrd"), b"abcde").unwrap();
        assert!(matches!(store.get("a"), Err(ImageError::Invalid { .. })));
        fake_image(&store, "b");
        std::fs::remove_file(store.dir_of("b").join(MANIFEST_FILE)).unwrap();
        assert!(matches!(store.get("b"), Err(ImageError::Invalid { .. })));
        assert!(store.list().unwrap().is_empty());
    }
}
