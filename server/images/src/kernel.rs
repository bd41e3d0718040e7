//! The guest kernel: Debian's package behind `linux-image-amd64` (resolved
//! and downloaded by [`crate::apt`]), unpacked with `dpkg -x`.

use std::path::Path;

use crate::cmd::{require, run};
use crate::error::ImageError;

/// The metapackage that names the current generic kernel.
pub(crate) const METAPACKAGE: &str = "linux-image-amd64";

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

/// Unpacks `deb` into `dest` (`dpkg -x`).
pub(crate) fn unpack(deb: &Path, dest: &Path) -> Result<(), ImageError> {
    let dpkg = require("dpkg", "install dpkg (Debian)")?;
    let (d, t) = (deb.to_string_lossy(), dest.to_string_lossy());
    run(&dpkg, &["-x", &d, &t], None).map(drop)
}

/// The file name apt gives a package's `.deb` (an epoch's `:` becomes `%3a`).
pub(crate) fn deb_file_name(pkg: &KernelPackage) -> String {
    format!("{}_{}_amd64.deb", pkg.name, pkg.version.replace(':', "%3a"))
}

pub(crate) fn parse_depends(out: &str) -> Option<String> {
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && !p.starts_with('<'))
        .map(str::to_string)
}

pub(crate) fn parse_version(out: &str) -> Option<String> {
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
