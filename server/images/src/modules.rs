//! Picking kernel modules and their dependencies in load order, with kmod's
//! `depmod` and `modprobe --show-depends` run against an unpacked kernel.

use std::path::{Path, PathBuf};

use crate::cmd::{require, run};
use crate::error::ImageError;

/// Modules every image's agent loads: the virtio-mmio transport, the
/// console it talks to the host over, and the entropy device.
pub const GUEST_MODULES: &[&str] = &["virtio_mmio", "virtio_console", "virtio_rng"];

/// The `.ko` files of `wanted` and their dependencies, in load order, each
/// once, as paths relative to `kroot` (the unpacked kernel package).
/// Built-in modules are skipped.
pub(crate) fn resolve(
    kroot: &Path,
    release: &str,
    wanted: &[&str],
) -> Result<Vec<PathBuf>, ImageError> {
    const HINT: &str = "apt-get install kmod";
    let depmod = require("depmod", HINT)?;
    let modprobe = require("modprobe", HINT)?;
    let root = kroot.to_string_lossy();
    run(&depmod, &["-b", &root, release], None)?;
    let mut order: Vec<PathBuf> = Vec::new();
    for m in wanted {
        let out = run(
            &modprobe,
            &["-d", &root, "-S", release, "--show-depends", m],
            None,
        )?;
        for path in parse_show_depends(&out) {
            let rel = Path::new(path)
                .strip_prefix(kroot)
                .map_err(|_| {
                    ImageError::Kernel(format!(
                        "modprobe names {path}, outside {}",
                        kroot.display()
                    ))
                })?
                .to_path_buf();
            if !order.contains(&rel) {
                order.push(rel);
            }
        }
    }
    Ok(order)
}

/// The module paths of `insmod PATH [options]` lines; `builtin NAME` lines
/// (compiled into the kernel) are skipped.
fn parse_show_depends(out: &str) -> impl Iterator<Item = &str> {
    out.lines().filter_map(|l| {
        let mut words = l.split_whitespace();
        match (words.next(), words.next()) {
            (Some("insmod"), Some(path)) => Some(path),
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_show_depends() {
        let out = "builtin virtio\ninsmod /k/lib/modules/r/kernel/a.ko \ninsmod /k/lib/modules/r/kernel/b.ko opt=1\n";
        let got: Vec<&str> = parse_show_depends(out).collect();
        assert_eq!(
            got,
            [
                "/k/lib/modules/r/kernel/a.ko",
                "/k/lib/modules/r/kernel/b.ko"
            ]
        );
    }
}
