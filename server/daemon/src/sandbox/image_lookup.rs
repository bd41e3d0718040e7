//! Finds a Linux image built by `forkd image build NAME` (the
//! `forkd-images` store) and keeps the facts a boot needs, with errors in
//! the daemon's words (what to do next, paths as the daemon shows them).

use std::path::PathBuf;

use forkd_images::ImageStore;

/// Longest image name accepted (see [`forkd_images::validate_name`]).
pub const MAX_NAME_BYTES: usize = 63;

/// Why an image cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The name cannot be an image directory's name.
    #[error(
        "image name {shown} is invalid: names are 1-{MAX_NAME_BYTES} characters of lowercase \
         letters, digits, '.', '_' or '-', starting with a letter or digit"
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
    /// Size of the initramfs (an uncompressed cpio), bytes.
    pub initrd_bytes: u64,
}

/// What the guest kernel keeps for itself before it unpacks the
/// initramfs, with room to spare, MiB (measured: ~57 MiB for Debian's 6.1
/// kernel at 384 MiB).
const KERNEL_RESERVE_MIB: u64 = 128;

impl Image {
    /// The least guest RAM this image boots in, MiB. The kernel unpacks the
    /// initramfs into its `rootfs` tmpfs, which it sizes to half of the
    /// memory it counts at that time, that is without itself and without
    /// the initramfs still held in RAM; the unpacked tree must fit in that
    /// half: `3 x initramfs + reserve`, rounded up to 16 MiB. Below it the
    /// guest panics with "Initramfs unpacking failed: write error".
    pub fn min_memory_mib(&self) -> u32 {
        let initrd_mib = self.initrd_bytes.div_ceil(1 << 20);
        let mib = (3 * initrd_mib + KERNEL_RESERVE_MIB).next_multiple_of(16);
        u32::try_from(mib).unwrap_or(u32::MAX)
    }
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

    /// Looks `name` up: its manifest must parse and name files of the
    /// recorded sizes.
    pub fn get(&self, name: &str) -> Result<Image, ImageError> {
        check_name(name)?;
        let image = ImageStore::new(&self.dir).get(name).map_err(|e| match e {
            forkd_images::ImageError::NotFound { .. } => ImageError::NotFound {
                name: name.to_string(),
                dir: self.dir.clone(),
            },
            forkd_images::ImageError::Invalid { reason, .. } => ImageError::Invalid {
                name: name.to_string(),
                reason,
            },
            other => ImageError::Invalid {
                name: name.to_string(),
                reason: other.to_string(),
            },
        })?;
        Ok(Image {
            name: name.to_string(),
            kernel: image.kernel_path(),
            initrd: image.initrd_path(),
            memory_mib: u32::try_from(image.manifest.memory_mib).unwrap_or(u32::MAX),
            initrd_bytes: image.manifest.initrd.bytes,
            kernel_args: image.manifest.kernel_args,
        })
    }
}

/// Checks that `name` can be an image directory's name (no path tricks).
pub fn check_name(name: &str) -> Result<(), ImageError> {
    if forkd_images::validate_name(name).is_ok() {
        Ok(())
    } else {
        Err(ImageError::BadName {
            shown: crate::api::public::quoted(name),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_memory_is_three_initramfs_plus_the_kernel_reserve() {
        let image = |initrd_bytes| Image {
            name: "debian".into(),
            kernel: PathBuf::new(),
            initrd: PathBuf::new(),
            memory_mib: 512,
            kernel_args: String::new(),
            initrd_bytes,
        };
        // debian-python: 103.1 MiB -> 104 x 3 + 128 = 440 -> 448.
        assert_eq!(image(108_110_336).min_memory_mib(), 448);
        assert_eq!(image(0).min_memory_mib(), 128);
        assert_eq!(image(u64::MAX).min_memory_mib(), u32::MAX);
    }

    fn image_dir(manifest: &str) -> (tempfile::TempDir, Images) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("debian");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("manifest.json"), manifest).unwrap();
        std::fs::write(dir.join("vmlinuz"), b"k").unwrap();
        std::fs::write(dir.join("initrd"), b"i").unwrap();
        let images = Images::new(tmp.path().to_path_buf());
        (tmp, images)
    }

    const GOOD: &str = r#"{"format": 1, "name": "debian",
        "kernel": {"path": "vmlinuz", "sha256": "00", "bytes": 1, "release": "6.1.0",
                   "package": "linux-image-6.1.0", "version": "1"},
        "initrd": {"path": "initrd", "sha256": "00", "bytes": 1},
        "kernel_args": "quiet", "memory_mib": 512, "packages": ["python3"],
        "modules": [], "agent_sha256": "00", "input_digest": "00",
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
            ("{", "manifest.json"),
            (&GOOD.replace("\"format\": 1", "\"format\": 2"), "format 2"),
            (
                &GOOD.replace("\"vmlinuz\"", "\"../vmlinuz\""),
                "bad file path",
            ),
            (
                &GOOD.replace("\"initrd\", \"sha", "\"gone\", \"sha"),
                "gone: No such file",
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
