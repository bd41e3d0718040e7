//! File-system primitives the store builds on: sparse-file data ranges,
//! fsync of files and directories, atomic replacement of small files.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};

/// The byte ranges of `file` within `start..end` that hold data, found
/// with `SEEK_DATA`/`SEEK_HOLE`; everything else reads as zeros. File
/// systems without hole support report one data range, which is correct,
/// just not sparse.
pub fn data_ranges(file: &File, start: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut ranges = Vec::new();
    let mut pos = start;
    while pos < end {
        let data = match lseek(file, pos as i64, Whence::SeekData) {
            Ok(off) => off as u64,
            // No data at or after `pos`.
            Err(Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        if data >= end {
            break;
        }
        let hole = match lseek(file, data as i64, Whence::SeekHole) {
            Ok(off) => off as u64,
            Err(Errno::ENXIO) => end,
            Err(e) => return Err(e.into()),
        };
        let stop = hole.min(end);
        ranges.push((data, stop));
        pos = stop;
    }
    Ok(ranges)
}

/// fsyncs a directory, making the entries created, renamed or removed in
/// it durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// fsyncs the file at `path` (data and size).
pub fn sync_file(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// Replaces `path` with `bytes` atomically: writes `path.tmp`, fsyncs it,
/// renames it over `path`, and fsyncs the directory. A crash leaves either
/// the old file or the new one, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Removes every entry of `dir` except `keep`.
pub fn remove_all_but(dir: &Path, keep: &str) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name() == keep {
            continue;
        }
        if entry.file_type()?.is_dir() {
            std::fs::remove_dir_all(entry.path())?;
        } else {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn finds_data_ranges_of_a_sparse_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.set_len(16 << 20).unwrap();
        assert!(data_ranges(&f, 0, 16 << 20).unwrap().is_empty());
        f.write_all_at(&[1u8; 4096], 4 << 20).unwrap();
        f.write_all_at(&[2u8; 8192], 10 << 20).unwrap();
        let ranges = data_ranges(&f, 0, 16 << 20).unwrap();
        // File systems may round data ranges out to their block size.
        assert_eq!(ranges.len(), 2, "{ranges:?}");
        assert!(ranges[0].0 <= 4 << 20 && ranges[0].1 >= (4 << 20) + 4096);
        assert!(ranges[1].0 <= 10 << 20 && ranges[1].1 >= (10 << 20) + 8192);
        // Clipped to the window asked for.
        let clipped = data_ranges(&f, (4 << 20) + 1024, 8 << 20).unwrap();
        assert_eq!(clipped[0].0, (4 << 20) + 1024);
    }

    #[test]
    fn atomic_write_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert!(!dir.path().join("m.tmp").exists());
        std::fs::write(dir.path().join("x"), "").unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        remove_all_but(dir.path(), "m.json").unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
