//! The guest kernel: Debian's package behind `linux-image-amd64`, resolved
//! with apt, downloaded into a cache and unpacked with `dpkg -x`.

use std::path::{Path, PathBuf};

use crate::cmd::{require, run};
use crate::error::ImageError;

/// The metapackage that names the current generic kernel.
const METAPACKAGE: &str = "linux-image-amd64";

/// A resolved kernel package.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelPackage {
    /// e.g. `linux-image-6.1.0-57-amd64`.
    pub name: String,
    /// e.g. `6.1.192-3`.
    pub version: String,
}

impl KernelPackage {
    /// The kernel release, e.g. `6.1.0-57-amd64`.
    pub fn release(&self) -> &str {
        self.name.strip_prefix("linux-image-").unwrap_or(&self.name)
    }
}

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
        let spec = format!("{}={}", pkg.name, pkg.version);
        if let Err(e) = run(&self.apt_get, &["download", "-q", &spec], Some(cache)) {
            if !self.refresh()? {
                return Err(e);
            }
            run(&self.apt_get, &["download", "-q", &spec], Some(cache))?;
        }
        if !deb.is_file() {
            return Err(ImageError::Kernel(format!(
                "apt-get download {spec} did not leave {}",
                deb.display()
            )));
        }
        Ok(deb)
    }
}

/// Unpacks `deb` into `dest` (`dpkg -x`).
pub(crate) fn unpack(deb: &Path, dest: &Path) -> Result<(), ImageError> {
    let dpkg = require("dpkg", "install dpkg (Debian)")?;
    let (d, t) = (deb.to_string_lossy(), dest.to_string_lossy());
    run(&dpkg, &["-x", &d, &t], None).map(drop)
}

/// The file name apt gives a package's `.deb` (an epoch's `:` becomes `%3a`).
fn deb_file_name(pkg: &KernelPackage) -> String {
    format!("{}_{}_amd64.deb", pkg.name, pkg.version.replace(':', "%3a"))
}

fn parse_depends(out: &str) -> Option<String> {
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && !p.starts_with('<'))
        .map(str::to_string)
}

fn parse_version(out: &str) -> Option<String> {
    out.lines()
        .find_map(|l| l.strip_prefix("Version:"))
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_apt_output() {
        let deps = "linux-image-amd64\n  Depends: linux-image-6.1.0-57-amd64\n";
        assert_eq!(parse_depends(deps).unwrap(), "linux-image-6.1.0-57-amd64");
        assert_eq!(parse_depends("linux-image-amd64\n"), None);
        let show = "Package: x\nVersion: 6.1.192-3\nArchitecture: amd64\n";
        assert_eq!(parse_version(show).unwrap(), "6.1.192-3");
        let k = KernelPackage {
            name: "linux-image-6.1.0-57-amd64".into(),
            version: "1:6.1-3".into(),
        };
        assert_eq!(k.release(), "6.1.0-57-amd64");
        assert_eq!(
            deb_file_name(&k),
            "linux-image-6.1.0-57-amd64_1%3a6.1-3_amd64.deb"
        );
    }
}
