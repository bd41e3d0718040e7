//! Finds a Linux image built by `forkd image build NAME` in the images
//! directory and reads the few `manifest.json` fields a boot needs.
//!
//! Deliberately small and self-contained: it stands in for
//! `forkd_images::ImageStore::get` and can be swapped for it without
//! touching its callers ([`Images::get`] returns the same facts).

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The manifest's file name inside an image directory.
pub const MANIFEST: &str = "manifest.json";
/// The manifest format this daemon reads.
pub const FORMAT: u32 = 1;
/// Longest image name accepted.
pub const MAX_NAME_BYTES: usize = 64;

/// Why an image cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The name cannot be an image directory's name.
    #[error(
        "image name {shown} is invalid: names are 1-{MAX_NAME_BYTES} characters of letters, \
         digits, '.', '_' or '-', not starting with '.'"
    )]
    BadName {
        /// The name, quoted (or its length when long).
        shown: String,
    },
    /// No image of this name was built.
    #[error("image {name:?} not found in {}; build it with 'forkd image build {name}'", .dir.display())]
    NotFound {
        /// The image name.
        name: String,
        /// The images directory.
        dir: PathBuf,
    },
    /// The image exists but cannot be booted.
    #[error("image {name:?} is unusable: {reason}; rebuild it with 'forkd image build {name}'")]
    Invalid {
        /// The image name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// What a boot needs from an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    /// The image name.
    pub name: String,
    /// The kernel (bzImage) to boot.
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
    /// Guest RAM the image asks for when the request says 0, MiB.
    pub memory_mib: u32,
    /// Extra kernel command line from the image (may be empty).
    pub kernel_args: String,
}

#[derive(Deserialize)]
struct Manifest {
    format: u32,
    kernel: FileEntry,
    initrd: FileEntry,
    #[serde(default)]
    kernel_args: String,
    memory_mib: u32,
}

#[derive(Deserialize)]
struct FileEntry {
    path: String,
}

/// The images directory.
#[derive(Clone, Debug)]
pub struct Images {
    dir: PathBuf,
}

impl Images {
    /// Images kept in `dir` (one subdirectory per image).
    pub fn new(dir: PathBuf) -> Images {
        Images { dir }
    }

    /// Looks `name` up: its manifest must parse and name files that exist.
    pub fn get(&self, name: &str) -> Result<Image, ImageError> {
        check_name(name)?;
        let root = self.dir.join(name);
        let invalid = |reason: String| ImageError::Invalid {
            name: name.to_string(),
            reason,
        };
        let text = match std::fs::read(root.join(MANIFEST)) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ImageError::NotFound {
                    name: name.to_string(),
                    dir: self.dir.clone(),
                })
            }
            Err(e) => return Err(invalid(format!("cannot read {MANIFEST}: {e}"))),
        };
        let m: Manifest = serde_json::from_slice(&text)
            .map_err(|e| invalid(format!("{MANIFEST} does not parse: {e}")))?;
        if m.format != FORMAT {
            return Err(invalid(format!(
                "{MANIFEST} has format {}, this daemon reads format {FORMAT}",
                m.format
            )));
        }
        let file = |what: &str, entry: &FileEntry| -> Result<PathBuf, ImageError> {
            let rel = Path::new(&entry.path);
            let plain = rel
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
            if entry.path.is_empty() || !plain {
                return Err(invalid(format!(
                    "{what} path {:?} is not a plain relative path",
                    entry.path
                )));
            }
            let path = root.join(rel);
            match std::fs::metadata(&path) {
                Ok(meta) if meta.is_file() => Ok(path),
                Ok(_) => Err(invalid(format!("{what} {:?} is not a file", entry.path))),
                Err(e) => Err(invalid(format!("{what} {:?}: {e}", entry.path))),
            }
        };
        Ok(Image {
            name: name.to_string(),
            kernel: file("kernel", &m.kernel)?,
            initrd: file("initrd", &m.initrd)?,
            memory_mib: m.memory_mib,
            kernel_args: m.kernel_args,
        })
    }
}

/// Checks that `name` can be an image directory's name (no path tricks).
pub fn check_name(name: &str) -> Result<(), ImageError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ImageError::BadName {
            shown: crate::public::quoted(name),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image_dir(manifest: &str) -> (tempfile::TempDir, Images) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("debian");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join(MANIFEST), manifest).unwrap();
        std::fs::write(dir.join("vmlinuz"), b"k").unwrap();
        std::fs::write(dir.join("initrd"), b"i").unwrap();
        let images = Images::new(tmp.path().to_path_buf());
        (tmp, images)
    }

    const GOOD: &str = r#"{"format": 1, "name": "debian",
        "kernel": {"path": "vmlinuz", "sha256": "00", "bytes": 1, "release": "6.1.0"},
        "initrd": {"path": "initrd", "sha256": "00", "bytes": 1},
        "kernel_args": "quiet", "memory_mib": 512, "packages": ["python3"],
        "created": "2026-12-03T18:00:00Z"}"#;

    #[test]
    fn reads_what_a_boot_needs() {
        let (tmp, images) = image_dir(GOOD);
        let image = images.get("debian").unwrap();
        assert_eq!(image.kernel, tmp.path().join("debian/vmlinuz"));
        assert_eq!(image.initrd, tmp.path().join("debian/initrd"));
        assert_eq!(
            (image.memory_mib, image.kernel_args.as_str()),
            (512, "quiet")
        );
    }

    #[test]
    fn unknown_image_is_not_found() {
        let (_tmp, images) = image_dir(GOOD);
        let e = images.get("other").unwrap_err();
        assert!(matches!(e, ImageError::NotFound { .. }), "{e}");
        assert!(e.to_string().contains("forkd image build other"), "{e}");
    }

    #[test]
    fn broken_images_are_invalid() {
        for (manifest, says) in [
            ("{", "does not parse"),
            (&GOOD.replace("\"format\": 1", "\"format\": 2"), "format 2"),
            (
                &GOOD.replace("\"vmlinuz\"", "\"../vmlinuz\""),
                "plain relative",
            ),
            (
                &GOOD.replace("\"initrd\", \"sha", "\"gone\", \"sha"),
                "\"gone\"",
            ),
        ] {
            let (_tmp, images) = image_dir(manifest);
            let e = images.get("debian").unwrap_err();
            assert!(matches!(e, ImageError::Invalid { .. }), "{e}");
            assert!(e.to_string().contains(says), "{e}");
        }
    }

    #[test]
    fn names_cannot_escape() {
        for bad in ["", "..", ".hidden", "a/b", "a b", &"x".repeat(65)] {
            assert!(
                matches!(check_name(bad), Err(ImageError::BadName { .. })),
                "{bad}"
            );
        }
        check_name("debian-python_3.11").unwrap();
    }
}
