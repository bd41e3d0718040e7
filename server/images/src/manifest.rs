//! `manifest.json`: what an image holds. Written last by a build; its
//! presence marks a complete image.

use std::path::Path;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::digest::sha256_bytes;
use crate::error::ImageError;

/// The manifest format this crate writes and reads.
pub const FORMAT: u32 = 1;

/// File name of the manifest inside an image directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// Guest RAM, in MiB, of sandboxes of an image unless it says otherwise.
pub const DEFAULT_MEMORY_MIB: u64 = 512;

/// The manifest of an image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest format, [`FORMAT`].
    pub format: u32,
    /// The image's name (same as its directory).
    pub name: String,
    /// The kernel.
    pub kernel: KernelFile,
    /// The initramfs: an uncompressed newc cpio of the whole userland.
    pub initrd: ImageFile,
    /// Extra kernel command-line words the image wants (may be empty).
    pub kernel_args: String,
    /// Default guest RAM of sandboxes of this image, in MiB.
    pub memory_mib: u64,
    /// The Debian packages asked for (beyond the essential set).
    pub packages: Vec<String>,
    /// Kernel modules the agent loads, in load order, relative to `/`.
    pub modules: Vec<String>,
    /// SHA-256 of the agent installed as `/init`.
    pub agent_sha256: String,
    /// SHA-256 of the build inputs (see [`input_digest`]).
    pub input_digest: String,
    /// When the image was built (RFC 3339, UTC).
    pub created: String,
}

/// A file of the image with its digest and size.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageFile {
    /// Path relative to the image directory.
    pub path: String,
    /// SHA-256, hex.
    pub sha256: String,
    /// Size in bytes.
    pub bytes: u64,
}

/// The kernel file and the Debian package it came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelFile {
    /// Path relative to the image directory.
    pub path: String,
    /// SHA-256, hex.
    pub sha256: String,
    /// Size in bytes.
    pub bytes: u64,
    /// Kernel release (`uname -r`), e.g. `6.1.0-57-amd64`.
    pub release: String,
    /// The Debian package, e.g. `linux-image-6.1.0-57-amd64`.
    pub package: String,
    /// The package's version, e.g. `6.1.192-3`.
    pub version: String,
}

/// What decides an image's content; equal inputs give an equal digest.
#[derive(Clone, Debug)]
pub struct BuildInputs<'a> {
    /// Packages asked for (order does not matter).
    pub packages: &'a [String],
    /// Kernel package name.
    pub kernel_package: &'a str,
    /// Kernel package version.
    pub kernel_version: &'a str,
    /// SHA-256 of the agent.
    pub agent_sha256: &'a str,
    /// Extra kernel command-line words.
    pub kernel_args: &'a str,
    /// Default guest RAM, MiB.
    pub memory_mib: u64,
}

/// SHA-256 over the manifest format and the build inputs, encoded as the
/// compact JSON array `[format, [packages sorted, deduplicated],
/// kernel_package, kernel_version, agent_sha256, kernel_args, memory_mib]`.
pub fn input_digest(inputs: &BuildInputs<'_>) -> String {
    let mut packages: Vec<&str> = inputs.packages.iter().map(String::as_str).collect();
    packages.sort_unstable();
    packages.dedup();
    let doc = serde_json::json!([
        FORMAT,
        packages,
        inputs.kernel_package,
        inputs.kernel_version,
        inputs.agent_sha256,
        inputs.kernel_args,
        inputs.memory_mib,
    ]);
    sha256_bytes(doc.to_string().as_bytes())
}

/// Now, as RFC 3339 in UTC with whole seconds.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

impl Manifest {
    /// Reads and checks the manifest of image `name` in `dir`.
    pub fn read(name: &str, dir: &Path) -> Result<Manifest, ImageError> {
        let path = dir.join(MANIFEST_FILE);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ImageError::Invalid {
                    name: name.to_string(),
                    reason: format!("{} is missing", path.display()),
                })
            }
            Err(e) => return Err(ImageError::io("read", path)(e)),
        };
        let invalid = |reason: String| ImageError::Invalid {
            name: name.to_string(),
            reason,
        };
        let m: Manifest = serde_json::from_slice(&text)
            .map_err(|e| invalid(format!("{}: {e}", path.display())))?;
        if m.format != FORMAT {
            return Err(invalid(format!(
                "{}: format {} (this forkd reads format {FORMAT})",
                path.display(),
                m.format
            )));
        }
        for p in [&m.kernel.path, &m.initrd.path] {
            if p.is_empty() || p.contains('/') || p.starts_with('.') {
                return Err(invalid(format!("{}: bad file path {p:?}", path.display())));
            }
        }
        Ok(m)
    }

    /// The manifest as pretty JSON with a final newline.
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("a manifest always serializes");
        s.push('\n');
        s
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample(name: &str) -> Manifest {
        Manifest {
            format: FORMAT,
            name: name.to_string(),
            kernel: KernelFile {
                path: "vmlinuz".into(),
                sha256: "aa".into(),
                bytes: 3,
                release: "6.1.0-57-amd64".into(),
                package: "linux-image-6.1.0-57-amd64".into(),
                version: "6.1.192-3".into(),
            },
            initrd: ImageFile {
                path: "initrd".into(),
                sha256: "bb".into(),
                bytes: 4,
            },
            kernel_args: String::new(),
            memory_mib: DEFAULT_MEMORY_MIB,
            packages: vec!["python3".into(), "procps".into()],
            modules: vec!["lib/modules/6.1.0-57-amd64/kernel/drivers/virtio/virtio.ko".into()],
            agent_sha256: "cc".into(),
            input_digest: "dd".into(),
            created: "2026-12-03T18:00:00Z".into(),
        }
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let m = sample("x");
        std::fs::write(dir.path().join(MANIFEST_FILE), m.to_json()).unwrap();
        assert_eq!(Manifest::read("x", dir.path()).unwrap(), m);
    }

    #[test]
    fn exact_field_names() {
        let v: serde_json::Value = serde_json::from_str(&sample("x").to_json()).unwrap();
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "agent_sha256",
                "created",
                "format",
                "initrd",
                "input_digest",
                "kernel",
                "kernel_args",
                "memory_mib",
                "modules",
                "name",
                "packages"
            ]
        );
        let mut k: Vec<&str> = v["kernel"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        k.sort_unstable();
        assert_eq!(
            k,
            ["bytes", "package", "path", "release", "sha256", "version"]
        );
    }

    #[test]
    fn wrong_format_or_garbage_is_invalid() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = sample("x");
        m.format = 2;
        std::fs::write(dir.path().join(MANIFEST_FILE), m.to_json()).unwrap();
        assert!(matches!(
            Manifest::read("x", dir.path()),
            Err(ImageError::Invalid { .. })
        ));
        std::fs::write(dir.path().join(MANIFEST_FILE), "{").unwrap();
        assert!(matches!(
            Manifest::read("x", dir.path()),
            Err(ImageError::Invalid { .. })
        ));
        std::fs::remove_file(dir.path().join(MANIFEST_FILE)).unwrap();
        assert!(matches!(
            Manifest::read("x", dir.path()),
            Err(ImageError::Invalid { .. })
        ));
    }

    #[test]
    fn input_digest_is_stable() {
        let pk = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let a = pk(&["python3", "procps"]);
        let b = pk(&["procps", "python3", "procps"]);
        let inputs = |p| BuildInputs {
            packages: p,
            kernel_package: "linux-image-6.1.0-57-amd64",
            kernel_version: "6.1.192-3",
            agent_sha256: "cc",
            kernel_args: "",
            memory_mib: 512,
        };
        let d = input_digest(&inputs(&a));
        assert_eq!(
            d,
            input_digest(&inputs(&b)),
            "order and duplicates do not matter"
        );
        // Pinned: a change of the encoding must be deliberate (it rebuilds every image).
        assert_eq!(
            d,
            "6f0ac0abc238f8a200a6cce1ab288d2560c90a68dd88f360d4a2530bca7a80ad"
        );
        let mut other = inputs(&a);
        other.memory_mib = 1024;
        assert_ne!(d, input_digest(&other));
        let mut other = inputs(&a);
        other.kernel_version = "6.1.192-4";
        assert_ne!(d, input_digest(&other));
        assert_ne!(d, input_digest(&inputs(&pk(&["python3"]))));
    }
}
