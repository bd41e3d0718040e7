//! PID 1 duties: filesystems, kernel modules, hostname and sandbox id,
//! loopback.
//!
//! Every step logs its failure and goes on: a half-set-up guest that can
//! still run commands is more useful than a kernel panic.

use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{symlink, DirBuilderExt};

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};

use crate::config::{Cmdline, DEFAULT_HOSTNAME};
use crate::{identity, log};

/// The list of modules to load, one path (relative to `/`) per line.
pub const MODULES_LIST: &str = "/etc/forkd/modules";

/// `finit_module` flag: the file is compressed; the kernel decompresses it
/// (Linux 5.17+; not in the libc crate).
const MODULE_INIT_COMPRESSED_FILE: libc::c_uint = 4;

struct Mount {
    fstype: &'static str,
    target: &'static str,
    flags: MsFlags,
    data: &'static str,
}

const fn m(
    fstype: &'static str,
    target: &'static str,
    flags: MsFlags,
    data: &'static str,
) -> Mount {
    Mount {
        fstype,
        target,
        flags,
        data,
    }
}

const NOSUID_NODEV: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV);
const NOSUID_NODEV_NOEXEC: MsFlags = NOSUID_NODEV.union(MsFlags::MS_NOEXEC);

/// In mount order: /dev before /dev/pts and /dev/shm.
const MOUNTS: &[Mount] = &[
    m("proc", "/proc", NOSUID_NODEV_NOEXEC, ""),
    m("sysfs", "/sys", NOSUID_NODEV_NOEXEC, ""),
    m("devtmpfs", "/dev", MsFlags::MS_NOSUID, "mode=0755"),
    m(
        "devpts",
        "/dev/pts",
        MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        "mode=620,ptmxmode=666",
    ),
    m("tmpfs", "/dev/shm", NOSUID_NODEV, "mode=1777"),
    m("tmpfs", "/tmp", NOSUID_NODEV, "mode=1777"),
    m("tmpfs", "/run", NOSUID_NODEV, "mode=0755"),
];

/// Runs all init duties; `cmdline` is read after /proc is mounted.
pub fn setup() -> Cmdline {
    for mnt in MOUNTS {
        if let Err(e) = mount_one(mnt) {
            log::warn(format!("mount {} on {}: {e}", mnt.fstype, mnt.target));
        }
    }
    dev_links();
    if let Err(e) = grow_root() {
        log::warn(format!("resizing the root filesystem: {e}"));
    }
    let cmdline = Cmdline::read();
    load_modules();
    let hostname = cmdline.hostname.as_deref().unwrap_or(DEFAULT_HOSTNAME);
    if let Err(e) = nix::unistd::sethostname(hostname) {
        log::warn(format!("sethostname {hostname:?}: {e}"));
    }
    if let Err(e) = identity::write_sandbox_id(hostname) {
        log::warn(e);
    }
    if let Err(e) = loopback_up() {
        log::warn(format!("bringing up lo: {e}"));
    }
    cmdline
}

fn mount_one(mnt: &Mount) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(mnt.target)?;
    let data = (!mnt.data.is_empty()).then_some(mnt.data);
    match mount(
        Some(mnt.fstype),
        mnt.target,
        Some(mnt.fstype),
        mnt.flags,
        data,
    ) {
        Ok(()) | Err(Errno::EBUSY) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The room the root filesystem (the kernel's tmpfs `rootfs`, holding the
/// unpacked image) gets: what the image already uses plus half of the RAM,
/// as a default tmpfs gets. The kernel sizes `rootfs` from the memory it
/// sees early in boot, which leaves a large image almost no room.
pub fn root_limits(
    used_blocks: u64,
    used_inodes: u64,
    block_size: u64,
    ram_bytes: u64,
) -> (u64, u64) {
    let half_ram = ram_bytes / 2;
    let size = used_blocks
        .saturating_mul(block_size)
        .saturating_add(half_ram);
    let inodes = used_inodes.saturating_add(half_ram / 4096);
    (size, inodes)
}

/// Remounts `/` with the limits of [`root_limits`] when it is a tmpfs (an
/// agent started as init elsewhere, as in the tests, leaves it alone).
fn grow_root() -> io::Result<()> {
    if nix::sys::statfs::statfs("/")?.filesystem_type() != nix::sys::statfs::TMPFS_MAGIC {
        return Ok(());
    }
    let fs = nix::sys::statvfs::statvfs("/")?;
    let block = fs.fragment_size().max(1);
    let used_blocks = fs.blocks().saturating_sub(fs.blocks_free());
    let used_inodes = fs.files().saturating_sub(fs.files_free());
    let info = nix::sys::sysinfo::sysinfo()?;
    let (size, inodes) = root_limits(used_blocks, used_inodes, block, info.ram_total());
    let data = format!("size={size},nr_inodes={inodes}");
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT,
        Some(data.as_str()),
    )?;
    Ok(())
}

/// The /dev/fd and /dev/std* links devtmpfs does not create.
fn dev_links() {
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        match symlink(target, link) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => log::warn(format!("symlink {link}: {e}")),
        }
    }
}

/// The module paths of a modules list: blank lines and `#` comments skipped.
pub fn parse_modules(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| format!("/{}", l.trim_start_matches('/')))
        .collect()
}

fn load_modules() {
    let text = match fs::read_to_string(MODULES_LIST) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return,
        Err(e) => return log::warn(format!("reading {MODULES_LIST}: {e}")),
    };
    for path in parse_modules(&text) {
        if let Err(e) = load_module(&path) {
            log::warn(format!("loading module {path}: {e}"));
        }
    }
}

fn load_module(path: &str) -> io::Result<()> {
    let file = File::open(path)?;
    // Compressed modules are decompressed by the kernel when asked to.
    let compressed = [".xz", ".zst", ".gz"].iter().any(|s| path.ends_with(s));
    let flags = if compressed {
        MODULE_INIT_COMPRESSED_FILE
    } else {
        0
    };
    let params = CString::default();
    // SAFETY: the fd is open for the duration of the call and `params` is a
    // valid NUL-terminated string; finit_module reads only those.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            params.as_ptr(),
            flags,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EEXIST) => Ok(()),
        _ => Err(err),
    }
}

/// Sets IFF_UP on `lo` with SIOCGIFFLAGS/SIOCSIFFLAGS.
fn loopback_up() -> io::Result<()> {
    // SAFETY: socket has no memory effects; the fd is owned by OwnedFd below.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh fd owned by no one else.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: `req` is a valid ifreq that outlives the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: as above.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_gets_the_image_plus_half_the_ram() {
        // 103 MiB of image in 4 KiB blocks, 4,000 files, 336 MiB of RAM.
        let (size, inodes) = root_limits(103 * 256, 4000, 4096, 336 << 20);
        assert_eq!(size, (103 + 168) << 20);
        assert_eq!(inodes, 4000 + (168 << 20) / 4096);
        // Nothing overflows on absurd inputs.
        assert_eq!(root_limits(u64::MAX, u64::MAX, 4096, u64::MAX).0, u64::MAX);
    }

    #[test]
    fn modules_list() {
        let text = "# load order\n\nlib/modules/a.ko\n  /lib/modules/b.ko.xz  \n#x\n";
        assert_eq!(
            parse_modules(text),
            vec!["/lib/modules/a.ko", "/lib/modules/b.ko.xz"]
        );
    }
}
