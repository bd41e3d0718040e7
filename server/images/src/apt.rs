//! Talking to the host's apt: resolving and downloading the kernel
//! package, checking package names. The package lists are refreshed
//! (`apt-get update`) at most once per build, when something is not found.

use std::path::{Path, PathBuf};

use crate::cmd::{require, run};
use crate::error::ImageError;
use crate::kernel::{deb_file_name, parse_depends, parse_version, KernelPackage, METAPACKAGE};

/// Talks to apt; refreshes the package lists at most once per build.
pub(crate) struct Apt {
    apt_cache: PathBuf,
    apt_get: PathBuf,
    refreshed: bool,
}

impl Apt {
    pub(crate) fn new() -> Result<Self, ImageError> {
        const HINT: &str = "images are built on Debian (or a derivative) with apt";
        Ok(Self {
            apt_cache: require("apt-cache", HINT)?,
            apt_get: require("apt-get", HINT)?,
            refreshed: false,
        })
    }

    /// `apt-get update`, once.
    fn refresh(&mut self) -> Result<bool, ImageError> {
        if self.refreshed {
            return Ok(false);
        }
        self.refreshed = true;
        run(&self.apt_get, &["update", "-q"], None)?;
        Ok(true)
    }

    /// The package behind the metapackage and its candidate version.
    pub(crate) fn resolve(&mut self) -> Result<KernelPackage, ImageError> {
        loop {
            match self.try_resolve() {
                Ok(k) => return Ok(k),
                Err(e) => {
                    if !self.refresh()? {
                        return Err(e);
                    }
                }
            }
        }
    }

    fn try_resolve(&self) -> Result<KernelPackage, ImageError> {
        let deps = run(&self.apt_cache, &["depends", METAPACKAGE], None)?;
        let name = parse_depends(&deps).ok_or_else(|| {
            ImageError::Kernel(format!(
                "`apt-cache depends {METAPACKAGE}` names no linux-image package:\n{deps}"
            ))
        })?;
        let show = run(&self.apt_cache, &["show", "--no-all-versions", &name], None)?;
        let version = parse_version(&show).ok_or_else(|| {
            ImageError::Kernel(format!("`apt-cache show {name}` gives no Version"))
        })?;
        Ok(KernelPackage { name, version })
    }

    /// The names of `packages` apt knows nothing about (neither real nor
    /// virtual), after refreshing the lists once if there are any.
    pub(crate) fn unknown_packages(
        &mut self,
        packages: &[String],
    ) -> Result<Vec<String>, ImageError> {
        loop {
            let mut unknown = Vec::new();
            for p in packages {
                // `apt-cache policy` prints nothing for a name it does not know.
                if run(&self.apt_cache, &["policy", p], None)?
                    .trim()
                    .is_empty()
                {
                    unknown.push(p.clone());
                }
            }
            if unknown.is_empty() || !self.refresh()? {
                return Ok(unknown);
            }
        }
    }

    /// The `.deb` of `pkg` in `cache` (downloaded unless already there).
    pub(crate) fn download(
        &mut self,
        pkg: &KernelPackage,
        cache: &Path,
    ) -> Result<PathBuf, ImageError> {
        std::fs::create_dir_all(cache).map_err(ImageError::io("create", cache))?;
        let deb = cache.join(deb_file_name(pkg));
        if deb.is_file() {
            return Ok(deb);
        }
        // Downloaded into a fresh directory and renamed into the cache, so
        // an interrupted download never passes for a complete .deb.
        let partial = tempfile::Builder::new()
            .prefix(".partial-")
            .tempdir_in(cache)
            .map_err(ImageError::io("create a directory in", cache))?;
        let spec = format!("{}={}", pkg.name, pkg.version);
        let args = ["download", "-q", spec.as_str()];
        if let Err(e) = run(&self.apt_get, &args, Some(partial.path())) {
            if !self.refresh()? {
                return Err(e);
            }
            run(&self.apt_get, &args, Some(partial.path()))?;
        }
        let got = partial.path().join(deb_file_name(pkg));
        if !got.is_file() {
            return Err(ImageError::Kernel(format!(
                "apt-get download {spec} did not leave {}",
                got.display()
            )));
        }
        std::fs::rename(&got, &deb).map_err(ImageError::io("rename", &got))?;
        prune_other_debs(cache, &deb);
        Ok(deb)
    }
}

/// Removes the `.deb`s of `cache` other than `keep` (older kernels); best
/// effort: a leftover only costs disk.
fn prune_other_debs(cache: &Path, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(cache) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let stale_partial = e.file_name().to_string_lossy().starts_with(".partial-");
        if stale_partial {
            let _ = std::fs::remove_dir_all(path);
        } else if path != keep && path.extension().is_some_and(|x| x == "deb") {
            let _ = std::fs::remove_file(path);
        }
    }
}
