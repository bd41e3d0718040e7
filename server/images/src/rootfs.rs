//! The guest userland: a Debian bookworm tree made by mmdebstrap, unpacked
//! and trimmed of what a sandbox never reads.
//!
//! mmdebstrap because it needs neither a chroot set-up nor a mirror
//! argument (it uses the host's apt configuration and keyring), resolves
//! `--include` packages with apt in one pass, and writes a tarball that
//! holds device nodes and ownership exactly.

use std::path::Path;

use crate::cmd::{require, run};
use crate::error::ImageError;

/// The Debian suite of guest userlands (matches the kernel's).
const SUITE: &str = "bookworm";

/// mmdebstrap's hook that makes the merged-/usr symlinks itself. Without it,
/// bookworm's mmdebstrap installs the `usrmerge` package, which pulls in
/// the whole of perl (~45 MB of the initramfs) for a one-time conversion.
const MERGED_USR_HOOK: &str = "/usr/share/mmdebstrap/hooks/merged-usr";

/// Lines of mmdebstrap's standard error shown when it fails.
const MMDEBSTRAP_TAIL: usize = 15;

/// Directories whose contents are removed from the tree (relative to it).
const TRIM_CONTENTS: &[&str] = &[
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    // Message translations only; the C.UTF-8 locale lives in usr/lib/locale.
    "usr/share/locale",
    "var/cache/apt",
    "var/lib/apt/lists",
    "var/log",
];

/// Runs mmdebstrap (essential variant plus `packages`) into `tar`.
pub(crate) fn mmdebstrap(packages: &[String], tar: &Path) -> Result<(), ImageError> {
    let mmdebstrap = require("mmdebstrap", "apt-get install mmdebstrap")?;
    let include = format!("--include={}", packages.join(","));
    let out = tar.to_string_lossy();
    let hook = format!("--hook-dir={MERGED_USR_HOOK}");
    let mut args = vec!["--variant=essential", "--quiet"];
    if Path::new(MERGED_USR_HOOK).is_dir() {
        args.push(&hook);
    }
    if !packages.is_empty() {
        args.push(&include);
    }
    args.extend([SUITE, &out]);
    run(&mmdebstrap, &args, None).map_err(|e| match e {
        ImageError::Command {
            command,
            status,
            stderr,
        } => ImageError::Command {
            command,
            status,
            stderr: mmdebstrap_errors(&stderr),
        },
        e => e,
    })?;
    Ok(())
}

/// What of mmdebstrap's standard error explains a failure: apt's and
/// mmdebstrap's error lines (`E: ...`), then its last lines, without dpkg's
/// progress noise.
fn mmdebstrap_errors(stderr: &str) -> String {
    let useful: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.contains("(Reading database"))
        .collect();
    let mut shown: Vec<&str> = useful
        .iter()
        .copied()
        .filter(|l| l.starts_with("E:"))
        .collect();
    let tail = &useful[useful.len().saturating_sub(MMDEBSTRAP_TAIL)..];
    shown.extend(tail.iter().filter(|l| !l.starts_with("E:")));
    shown.join("\n")
}

/// Unpacks `tar` into the existing directory `tree`, keeping numeric owners,
/// modes and device nodes.
pub(crate) fn unpack(tar: &Path, tree: &Path) -> Result<(), ImageError> {
    let tar_bin = require("tar", "apt-get install tar")?;
    let (t, d) = (tar.to_string_lossy(), tree.to_string_lossy());
    run(
        &tar_bin,
        &[
            "-x",
            "-f",
            &t,
            "-C",
            &d,
            "--numeric-owner",
            "--same-permissions",
        ],
        None,
    )
    .map(drop)
}

/// Removes documentation, translations, apt caches and logs from `tree`;
/// returns the bytes freed.
pub(crate) fn trim(tree: &Path) -> Result<u64, ImageError> {
    let mut freed = 0;
    for rel in TRIM_CONTENTS {
        let dir = tree.join(rel);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(ImageError::io("list", dir)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(ImageError::io("list", &dir))?;
            let path = entry.path();
            freed += disk_usage(&path);
            let ft = entry.file_type().map_err(ImageError::io("stat", &path))?;
            if ft.is_dir() {
                // Keep the directory itself (apt and dpkg expect some), empty.
                std::fs::remove_dir_all(&path).map_err(ImageError::io("remove", &path))?;
                if matches!(*rel, "var/cache/apt" | "var/lib/apt/lists" | "var/log") {
                    std::fs::create_dir(&path).map_err(ImageError::io("create", &path))?;
                }
            } else {
                std::fs::remove_file(&path).map_err(ImageError::io("remove", &path))?;
            }
        }
    }
    Ok(freed)
}

/// Apparent size of `path` and everything under it (symlinks not followed).
fn disk_usage(path: &Path) -> u64 {
    let Ok(md) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if !md.is_dir() {
        return md.len();
    }
    std::fs::read_dir(path)
        .map(|rd| rd.flatten().map(|e| disk_usage(&e.path())).sum())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mmdebstrap_errors_first() {
        let err = "I: x\nE: Unable to locate package nope\n(Reading database ... 5%\nlast\nE: mmdebstrap failed\n";
        assert_eq!(
            mmdebstrap_errors(err),
            "E: Unable to locate package nope\nE: mmdebstrap failed\nI: x\nlast"
        );
    }

    #[test]
    fn trim_empties_listed_dirs_only() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        for d in [
            "usr/share/doc/x",
            "var/log/apt",
            "var/lib/apt/lists/partial",
            "usr/bin",
        ] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::write(root.join("usr/share/doc/x/README"), b"12345").unwrap();
        std::fs::write(root.join("var/log/dpkg.log"), b"123").unwrap();
        std::fs::write(root.join("usr/bin/python3"), b"keep").unwrap();
        assert_eq!(trim(root).unwrap(), 8);
        assert!(root.join("usr/share/doc").is_dir());
        assert!(!root.join("usr/share/doc/x").exists());
        assert!(
            root.join("var/log/apt").is_dir(),
            "empty dirs of var/log stay"
        );
        assert!(!root.join("var/log/dpkg.log").exists());
        assert!(root.join("var/lib/apt/lists/partial").is_dir());
        assert!(root.join("usr/bin/python3").is_file());
    }
}
