//! A Linux sandbox's serial console log: the tail ReadConsole returns, and
//! the few lines quoted in a failed sandbox's exit reason.
//!
//! The VMM writes the console to `console.log` in the sandbox directory
//! and, when it reaches 512 KiB, renames it to `console.log.1` (replacing
//! the older one) and starts a new `console.log`. The log is
//! `console.log.1` followed by `console.log`; only its end is ever read,
//! so memory stays bounded whatever the files hold.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// The current console log, in the sandbox directory.
pub const CONSOLE_LOG: &str = "console.log";
/// The previous console log, kept after a rotation.
pub const CONSOLE_LOG_OLD: &str = "console.log.1";
/// ReadConsole's `tail_bytes` when the request says 0.
pub const DEFAULT_TAIL_BYTES: u32 = 64 << 10;
/// Largest ReadConsole `tail_bytes`.
pub const MAX_TAIL_BYTES: u32 = 1 << 20;
/// Most bytes of the console quoted in an exit reason.
pub const EXIT_TAIL_BYTES: usize = 2 << 10;
/// Most lines of the console quoted in an exit reason.
pub const EXIT_TAIL_LINES: usize = 20;

/// The end of a console log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Tail {
    /// The last bytes.
    pub data: Vec<u8>,
    /// Whether the kept log holds older bytes than `data`.
    pub truncated: bool,
}

/// Reads at most `max` bytes from the end of the console log in `dir`
/// (`console.log.1` then `console.log`; missing files are empty).
pub fn read_tail(dir: &Path, max: usize) -> std::io::Result<Tail> {
    let new = tail_of(&dir.join(CONSOLE_LOG), max)?;
    let mut truncated = new.truncated;
    let mut data = new.data;
    if data.len() < max {
        let old = tail_of(&dir.join(CONSOLE_LOG_OLD), max - data.len())?;
        truncated = old.truncated;
        if !old.data.is_empty() {
            let mut joined = old.data;
            joined.extend_from_slice(&data);
            data = joined;
        }
    } else if dir.join(CONSOLE_LOG_OLD).exists() {
        truncated = true;
    }
    Ok(Tail { data, truncated })
}

/// The last `max` bytes of one file; a missing file is empty.
fn tail_of(path: &Path, max: usize) -> std::io::Result<Tail> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Tail::default()),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let start = len.saturating_sub(max as u64);
    file.seek(SeekFrom::Start(start))?;
    let mut data = Vec::with_capacity((len - start) as usize);
    // `take`: the VMM may still be appending.
    file.take(max as u64).read_to_end(&mut data)?;
    Ok(Tail {
        data,
        truncated: start > 0,
    })
}

/// The text appended to a failed Linux sandbox's exit reason:
/// `"; console tail:\n"` and the last [`EXIT_TAIL_LINES`] lines (at most
/// [`EXIT_TAIL_BYTES`]) of its console, as lossy UTF-8; empty when there is
/// no console output.
pub fn exit_suffix(dir: &Path) -> String {
    match read_tail(dir, PANIC_SEARCH_BYTES) {
        Ok(tail) => format_exit_suffix(&tail.data),
        Err(e) => {
            tracing::debug!(dir = %dir.display(), error = %e, "cannot read the console log");
            String::new()
        }
    }
}

fn format_exit_suffix(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    // Carriage returns and other control bytes (but newlines and tabs)
    // would garble a log line or a terminal.
    let clean: String = text
        .chars()
        .map(|c| match c {
            '\n' | '\t' => c,
            c if c.is_control() => ' ',
            c => c,
        })
        .collect();
    let lines: Vec<&str> = clean
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        return String::new();
    }
    // A panic's own line comes before its backtrace, which fills the tail:
    // name it first.
    let panic = lines
        .iter()
        .rev()
        .find_map(|l| l.find(PANIC_MARK).map(|at| &l[at..]))
        .map(|p| format!("; {p}"))
        .unwrap_or_default();
    let mut from = lines.len().saturating_sub(EXIT_TAIL_LINES);
    while from + 1 < lines.len()
        && lines[from..].iter().map(|l| l.len() + 1).sum::<usize>() > EXIT_TAIL_BYTES
    {
        from += 1;
    }
    format!("{panic}; console tail:\n{}", lines[from..].join("\n"))
}

/// How Linux starts a panic message.
const PANIC_MARK: &str = "Kernel panic - not syncing";
/// How much of the console is searched for a panic message.
const PANIC_SEARCH_BYTES: usize = 16 << 10;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_spans_both_files() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(read_tail(tmp.path(), 10).unwrap(), Tail::default());
        std::fs::write(tmp.path().join(CONSOLE_LOG_OLD), b"0123456789").unwrap();
        std::fs::write(tmp.path().join(CONSOLE_LOG), b"abcdef").unwrap();
        let t = read_tail(tmp.path(), 8).unwrap();
        assert_eq!((t.data.as_slice(), t.truncated), (&b"89abcdef"[..], true));
        let t = read_tail(tmp.path(), 100).unwrap();
        assert_eq!(
            (t.data.as_slice(), t.truncated),
            (&b"0123456789abcdef"[..], false)
        );
        let t = read_tail(tmp.path(), 6).unwrap();
        assert_eq!((t.data.as_slice(), t.truncated), (&b"abcdef"[..], true));
        let t = read_tail(tmp.path(), 3).unwrap();
        assert_eq!((t.data.as_slice(), t.truncated), (&b"def"[..], true));
    }

    #[test]
    fn exit_suffix_is_short_and_clean() {
        assert_eq!(format_exit_suffix(b"\n \n"), "");
        let log: Vec<u8> = (0..100)
            .flat_map(|i| format!("[{i}] line\r\n").into_bytes())
            .chain(b"Kernel panic - not syncing: \xff\n".iter().copied())
            .collect();
        let s = format_exit_suffix(&log);
        assert!(
            s.starts_with("; Kernel panic - not syncing: \u{fffd}; console tail:\n[81] line\n"),
            "{s}"
        );
        assert!(s.ends_with("Kernel panic - not syncing: \u{fffd}"), "{s}");
        assert_eq!(s.lines().count(), 1 + EXIT_TAIL_LINES);
        let quiet: Vec<u8> = (0..30)
            .flat_map(|i| format!("[{i}] ok\n").into_bytes())
            .collect();
        assert!(format_exit_suffix(&quiet).starts_with("; console tail:\n[10] ok\n"));
    }
}
