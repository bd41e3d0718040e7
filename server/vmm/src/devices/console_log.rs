//! The guest's serial console captured to a file with a size cap: when
//! `console.log` reaches the cap it becomes `console.log.1` (replacing the
//! previous one) and a new `console.log` starts, so at most twice the cap
//! is ever on disk. The last few KiB are also kept in memory for crash
//! reports.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Default size at which the log rotates.
pub const DEFAULT_CAP: u64 = 512 << 10;
/// Bytes of the most recent output kept in memory.
pub const TAIL_BYTES: usize = 4096;

/// A capped, rotating console log.
pub struct ConsoleLog {
    path: PathBuf,
    file: Option<File>,
    written: u64,
    cap: u64,
    tail: VecDeque<u8>,
}

impl ConsoleLog {
    /// Creates (truncates) `path`; `None` keeps only the in-memory tail.
    pub fn create(path: Option<&Path>, cap: u64) -> io::Result<Self> {
        let file = path.map(open_new).transpose()?;
        Ok(ConsoleLog {
            path: path.map(Path::to_path_buf).unwrap_or_default(),
            file,
            written: 0,
            cap: cap.max(4096),
            tail: VecDeque::with_capacity(TAIL_BYTES),
        })
    }

    /// The last bytes written (at most [`TAIL_BYTES`]), lossily as text.
    pub fn tail(&self) -> String {
        let (a, b) = self.tail.as_slices();
        let mut bytes = a.to_vec();
        bytes.extend_from_slice(b);
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn rotate(&mut self) -> io::Result<()> {
        let mut old = self.path.clone().into_os_string();
        old.push(".1");
        std::fs::rename(&self.path, &old)?;
        self.file = Some(open_new(&self.path)?);
        self.written = 0;
        Ok(())
    }
}

fn open_new(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

impl Write for ConsoleLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &b in buf {
            if self.tail.len() == TAIL_BYTES {
                self.tail.pop_front();
            }
            self.tail.push_back(b);
        }
        if self.file.is_some() && self.written + buf.len() as u64 > self.cap {
            // A full disk or a removed directory must not stop the guest:
            // keep going with the in-memory tail only.
            if self.rotate().is_err() {
                self.file = None;
            }
        }
        if let Some(file) = self.file.as_mut() {
            if file.write_all(buf).is_err() {
                self.file = None;
            }
            self.written += buf.len() as u64;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_at_the_cap_and_keeps_a_tail() {
        let dir = std::env::temp_dir().join(format!("forkd-console-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("console.log");
        let mut log = ConsoleLog::create(Some(&path), 4096).unwrap();
        for i in 0..3000 {
            writeln!(log, "line {i}").unwrap();
        }
        let current = std::fs::metadata(&path).unwrap().len();
        let old = std::fs::metadata(dir.join("console.log.1")).unwrap().len();
        assert!(current <= 4096 && old <= 4096, "{current} {old}");
        assert!(log.tail().ends_with("line 2999\n"));
        assert!(log.tail().len() <= TAIL_BYTES);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
