//! What clients may see: status messages and failure reasons carry no
//! server paths, never echo an over-long request field, and are capped in
//! length (a long `grpc-message` makes grpcio clients fail with
//! RESOURCE_EXHAUSTED instead of the real status). Also recognises a full
//! file system, so it can be answered RESOURCE_EXHAUSTED.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Longest status message sent, in bytes; longer ones are cut.
pub const MAX_MESSAGE_BYTES: usize = 1024;
/// Longest `Sandbox.exit_reason` sent (a Linux guest's carries the end
/// of its console), in bytes.
pub const MAX_EXIT_REASON_BYTES: usize = 4096;
/// Longest request value quoted back in a message, in bytes.
pub const MAX_QUOTED_BYTES: usize = 128;
/// What replaces the data directory's path in client-facing text.
pub const DATA_DIR_PLACEHOLDER: &str = "<data-dir>";

/// The data directory, as configured and as resolved, once the daemon
/// knows it.
static DATA_DIR: OnceLock<Vec<String>> = OnceLock::new();

/// Records the data directory (both spellings: as given and canonical), so
/// messages can be stripped of it. Only the first call counts.
pub fn set_data_dir(given: &Path, canonical: &Path) {
    let mut spellings: Vec<String> = [given, canonical]
        .iter()
        .filter(|p| p.is_absolute() && p.as_os_str().len() > 1)
        .map(|p| p.display().to_string())
        .collect();
    // Longest first, so a path inside another is replaced whole.
    spellings.sort_by_key(|s| std::cmp::Reverse(s.len()));
    spellings.dedup();
    let _ = DATA_DIR.set(spellings);
}

/// The data directory as recorded by [`set_data_dir`], if it was.
pub fn data_dir() -> Option<PathBuf> {
    DATA_DIR.get()?.last().map(PathBuf::from)
}

/// `value` in quotes, or, when longer than [`MAX_QUOTED_BYTES`], only its
/// length: "(1048576 bytes long)".
pub fn quoted(value: &str) -> String {
    if value.len() <= MAX_QUOTED_BYTES {
        format!("{value:?}")
    } else {
        format!("({} bytes long)", value.len())
    }
}

/// `text` without the data directory's path (replaced by `<data-dir>`).
pub fn redact(text: &str) -> String {
    let mut out = text.to_string();
    for dir in DATA_DIR.get().into_iter().flatten() {
        out = out.replace(dir.as_str(), DATA_DIR_PLACEHOLDER);
    }
    out
}

/// `text` cut to at most `max` bytes at a character boundary, saying so.
pub fn cap(text: String, max: usize) -> String {
    const MARK: &str = " ... (truncated)";
    if text.len() <= max {
        return text;
    }
    let mut end = max.saturating_sub(MARK.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{MARK}", &text[..end])
}

/// The status message for `text`: redacted and capped.
pub fn status_message(text: &str) -> String {
    cap(redact(text), MAX_MESSAGE_BYTES)
}

/// Whether an I/O error means the file system is full (ENOSPC) or the
/// user's quota is (EDQUOT).
pub fn is_no_space(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// Whether an error text from the VMM reports ENOSPC or EDQUOT. The VMM
/// sends errors as text; Rust's `io::Error` prints the errno as
/// "(os error N)", which is what is looked for.
pub fn text_is_no_space(text: &str) -> bool {
    [libc::ENOSPC, libc::EDQUOT]
        .iter()
        .any(|errno| text.contains(&format!("(os error {errno})")))
}

/// The file system holding `dir`, for a "file system is full" message:
/// its type and how much is free, e.g. "tmpfs of 64.0 MiB, 0 B free"; no
/// paths.
pub fn describe_fs(dir: &Path) -> String {
    let fs_type = std::fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|info| crate::doctor::disk::mount_of(&info, dir))
        .map(|m| m.fs_type)
        .unwrap_or_else(|| "file system".into());
    // The statvfs counts are `fsblkcnt_t`/`c_ulong`: u64 here, not on
    // every target.
    #[allow(clippy::unnecessary_cast)]
    match nix::sys::statvfs::statvfs(dir) {
        Ok(s) => {
            let frsize = s.fragment_size() as u64;
            format!(
                "{fs_type} of {}, {} free",
                bytes(s.blocks() as u64 * frsize),
                bytes(s.blocks_available() as u64 * frsize)
            )
        }
        Err(_) => fs_type,
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_values_are_named_by_length() {
        assert_eq!(quoted("base"), "\"base\"");
        let long = "x".repeat(1 << 20);
        assert_eq!(quoted(&long), "(1048576 bytes long)");
    }

    #[test]
    fn messages_are_capped_at_a_char_boundary() {
        assert_eq!(cap("short".into(), 10), "short");
        let text = "é".repeat(2000);
        let out = cap(text, MAX_MESSAGE_BYTES);
        assert!(out.len() <= MAX_MESSAGE_BYTES, "{}", out.len());
        assert!(out.ends_with(" ... (truncated)"));
    }

    #[test]
    fn no_space_is_recognised() {
        assert!(is_no_space(&std::io::Error::from_raw_os_error(
            libc::ENOSPC
        )));
        assert!(is_no_space(&std::io::Error::from_raw_os_error(
            libc::EDQUOT
        )));
        assert!(!is_no_space(&std::io::Error::from_raw_os_error(libc::EIO)));
        let vmm = format!(
            "writing memory: {}",
            std::io::Error::from_raw_os_error(libc::ENOSPC)
        );
        assert!(text_is_no_space(&vmm), "{vmm}");
        assert!(!text_is_no_space(
            "writing memory: Input/output error (os error 5)"
        ));
    }

    #[test]
    fn the_data_dir_is_redacted() {
        set_data_dir(Path::new("/srv/forkd"), Path::new("/mnt/disk/forkd"));
        assert_eq!(
            status_message("reading /srv/forkd/snapshots/x/vmstate and /mnt/disk/forkd/y"),
            "reading <data-dir>/snapshots/x/vmstate and <data-dir>/y"
        );
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(64 << 20), "64.0 MiB");
    }
}
