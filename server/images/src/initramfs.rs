//! The initramfs: an uncompressed newc cpio archive of a directory tree.
//!
//! Written here rather than with `find | cpio -o -H newc` so the archive is
//! reproducible and exact: entries in sorted order with parents before
//! children, owners taken from the tree (not the builder's idea of them),
//! hard links stored as independent files (the kernel's unpacker and GNU
//! cpio disagree on which link of a group carries the data), and no
//! dependence on `find`/`cpio` being installed. Uncompressed on purpose:
//! the guest kernel unpacks it on every cold boot, and skipping
//! decompression is worth more there than the bytes saved on disk.

use std::fs::{File, Metadata};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use crate::error::ImageError;

const MAGIC: &[u8] = b"070701";
const TRAILER: &str = "TRAILER!!!";

/// What writing an archive produced.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ArchiveStats {
    /// Entries written (without the trailer).
    pub entries: u64,
    /// Bytes of the archive.
    pub bytes: u64,
}

/// Writes every entry under `tree` (not `tree` itself) into a new newc
/// archive at `out`, and fsyncs it.
pub fn write_tree(tree: &Path, out: &Path) -> Result<ArchiveStats, ImageError> {
    let file = File::create(out).map_err(ImageError::io("create", out))?;
    let mut w = Writer::new(BufWriter::with_capacity(1 << 20, file));
    w.add_dir_contents(tree, "")?;
    let stats = w.finish().map_err(ImageError::io("write", out))?;
    let file = stats
        .1
        .into_inner()
        .map_err(|e| ImageError::io("write", out)(e.into_error()))?;
    file.sync_all().map_err(ImageError::io("fsync", out))?;
    Ok(stats.0)
}

/// A newc archive being written.
struct Writer<W: Write> {
    out: W,
    next_ino: u32,
    stats: ArchiveStats,
}

/// One entry's header fields.
struct Header<'a> {
    name: &'a str,
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u32,
    mtime: u32,
    size: u32,
    rdev_major: u32,
    rdev_minor: u32,
}

impl<W: Write> Writer<W> {
    fn new(out: W) -> Self {
        Self {
            out,
            next_ino: 1,
            stats: ArchiveStats::default(),
        }
    }

    /// Adds the entries of directory `dir`, named `prefix/child`, sorted by
    /// name, each directory before what it holds.
    fn add_dir_contents(&mut self, dir: &Path, prefix: &str) -> Result<(), ImageError> {
        let mut names: Vec<String> = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(ImageError::io("list", dir))? {
            let entry = entry.map_err(ImageError::io("list", dir))?;
            let name = entry.file_name().into_string().map_err(|n| {
                ImageError::io("archive", dir.join(&n))(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "file name is not UTF-8",
                ))
            })?;
            names.push(name);
        }
        names.sort_unstable();
        for name in names {
            let path = dir.join(&name);
            let arc_name = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            let md = std::fs::symlink_metadata(&path).map_err(ImageError::io("stat", &path))?;
            self.add(&path, &arc_name, &md)?;
            if md.is_dir() {
                self.add_dir_contents(&path, &arc_name)?;
            }
        }
        Ok(())
    }

    /// Adds one entry (a directory's contents are added by the caller).
    fn add(&mut self, path: &Path, name: &str, md: &Metadata) -> Result<(), ImageError> {
        let ft = md.file_type();
        let too_big = || {
            ImageError::io("archive", path)(io::Error::new(
                io::ErrorKind::FileTooLarge,
                "newc entries are limited to 4 GiB",
            ))
        };
        let mut header = Header {
            name,
            mode: md.mode(),
            uid: md.uid(),
            gid: md.gid(),
            nlink: 1,
            mtime: u32::try_from(md.mtime().max(0)).unwrap_or(u32::MAX),
            size: 0,
            rdev_major: 0,
            rdev_minor: 0,
        };
        let write = |e| ImageError::io("write the archive entry for", path)(e);
        if ft.is_dir() {
            header.nlink = 2;
            self.header(&header).map_err(write)?;
        } else if ft.is_file() {
            header.size = u32::try_from(md.len()).map_err(|_| too_big())?;
            self.header(&header).map_err(write)?;
            let f = File::open(path).map_err(ImageError::io("open", path))?;
            let copied = io::copy(&mut f.take(md.len()), &mut self.out).map_err(write)?;
            if copied != md.len() {
                return Err(ImageError::io("archive", path)(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the file shrank while being archived",
                )));
            }
            self.pad(copied).map_err(write)?;
        } else if ft.is_symlink() {
            let target = std::fs::read_link(path).map_err(ImageError::io("read the link", path))?;
            let target = target.as_os_str().as_encoded_bytes().to_vec();
            header.size = u32::try_from(target.len()).map_err(|_| too_big())?;
            self.header(&header).map_err(write)?;
            self.out.write_all(&target).map_err(write)?;
            self.pad(target.len() as u64).map_err(write)?;
        } else if ft.is_char_device() || ft.is_block_device() {
            let rdev = md.rdev();
            header.rdev_major = nix::sys::stat::major(rdev) as u32;
            header.rdev_minor = nix::sys::stat::minor(rdev) as u32;
            self.header(&header).map_err(write)?;
        } else if ft.is_fifo() {
            self.header(&header).map_err(write)?;
        } else {
            return Ok(()); // sockets: meaningless in an archive
        }
        Ok(())
    }

    fn header(&mut self, h: &Header<'_>) -> io::Result<()> {
        let ino = self.next_ino;
        self.next_ino += 1;
        let namesize = h.name.len() as u32 + 1;
        let fields = [
            ino,
            h.mode,
            h.uid,
            h.gid,
            h.nlink,
            h.mtime,
            h.size,
            0, // devmajor
            0, // devminor
            h.rdev_major,
            h.rdev_minor,
            namesize,
            0, // check
        ];
        let mut buf = Vec::with_capacity(110 + h.name.len() + 4);
        buf.extend_from_slice(MAGIC);
        for f in fields {
            buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        buf.extend_from_slice(h.name.as_bytes());
        buf.push(0);
        while buf.len() % 4 != 0 {
            buf.push(0);
        }
        self.out.write_all(&buf)?;
        self.stats.bytes += buf.len() as u64;
        if h.name != TRAILER {
            self.stats.entries += 1;
        }
        Ok(())
    }

    /// Pads file data of `len` bytes to a multiple of 4.
    fn pad(&mut self, len: u64) -> io::Result<()> {
        let pad = (4 - (len % 4) as usize) % 4;
        self.out.write_all(&[0u8; 3][..pad])?;
        self.stats.bytes += len + pad as u64;
        Ok(())
    }

    /// Writes the trailer; returns the stats and the writer.
    fn finish(mut self) -> io::Result<(ArchiveStats, W)> {
        self.header(&Header {
            name: TRAILER,
            mode: 0,
            uid: 0,
            gid: 0,
            nlink: 1,
            mtime: 0,
            size: 0,
            rdev_major: 0,
            rdev_minor: 0,
        })?;
        self.out.flush()?;
        Ok((self.stats, self.out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};
    use std::process::{Command, Stdio};

    fn cpio_available() -> bool {
        crate::cmd::find_program("cpio").is_some()
    }

    fn sample_tree() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        std::fs::create_dir_all(r.join("usr/bin")).unwrap();
        std::fs::create_dir_all(r.join("etc/forkd")).unwrap();
        std::fs::write(r.join("init"), b"#!/bin/sh\necho hi\n").unwrap();
        std::fs::set_permissions(r.join("init"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(r.join("etc/forkd/modules"), b"a.ko\nb.ko\n").unwrap();
        std::fs::write(r.join("usr/bin/empty"), b"").unwrap();
        std::fs::write(r.join("usr/bin/five"), b"12345").unwrap();
        symlink("usr/bin", r.join("bin")).unwrap();
        t
    }

    #[test]
    fn cpio_lists_and_extracts_it() {
        if !cpio_available() {
            eprintln!("cpio not installed; skipping");
            return;
        }
        let tree = sample_tree();
        let out = tempfile::tempdir().unwrap();
        let archive = out.path().join("initrd");
        let stats = write_tree(tree.path(), &archive).unwrap();
        assert_eq!(stats.bytes, std::fs::metadata(&archive).unwrap().len());
        assert_eq!(stats.bytes % 4, 0);
        assert_eq!(stats.entries, 9);

        let listing = Command::new("cpio")
            .args(["-t", "--quiet", "-F"])
            .arg(&archive)
            .output()
            .unwrap();
        assert!(listing.status.success(), "{listing:?}");
        let names: Vec<String> = String::from_utf8(listing.stdout)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        assert_eq!(
            names,
            [
                "bin",
                "etc",
                "etc/forkd",
                "etc/forkd/modules",
                "init",
                "usr",
                "usr/bin",
                "usr/bin/empty",
                "usr/bin/five"
            ]
        );

        let dest = out.path().join("x");
        std::fs::create_dir(&dest).unwrap();
        let st = Command::new("cpio")
            .args(["-i", "--quiet", "-d", "--no-absolute-filenames", "-F"])
            .arg(&archive)
            .current_dir(&dest)
            .stdin(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
        assert_eq!(
            std::fs::read(dest.join("init")).unwrap(),
            b"#!/bin/sh\necho hi\n"
        );
        let mode = std::fs::metadata(dest.join("init"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(std::fs::read(dest.join("usr/bin/five")).unwrap(), b"12345");
        assert_eq!(
            std::fs::read(dest.join("etc/forkd/modules")).unwrap(),
            b"a.ko\nb.ko\n"
        );
        assert_eq!(
            std::fs::read_link(dest.join("bin")).unwrap(),
            Path::new("usr/bin")
        );
    }

    #[test]
    fn same_tree_same_bytes() {
        let tree = sample_tree();
        let out = tempfile::tempdir().unwrap();
        let (a, b) = (out.path().join("a"), out.path().join("b"));
        write_tree(tree.path(), &a).unwrap();
        write_tree(tree.path(), &b).unwrap();
        assert_eq!(std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    }

    #[test]
    fn header_layout() {
        let (stats, bytes) = Writer::new(Vec::new()).finish().unwrap();
        assert_eq!(stats.entries, 0);
        // 110-byte header + "TRAILER!!!\0" = 121, padded to 124.
        assert_eq!(bytes.len(), 124);
        assert_eq!(stats.bytes, 124);
        assert!(bytes.starts_with(b"070701"));
        assert_eq!(&bytes[110..121], b"TRAILER!!!\0");
    }
}
