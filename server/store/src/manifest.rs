//! `manifest.json`: what a snapshot is, where it came from, and the digests
//! its files must match.

use std::fmt;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// The manifest format this crate reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes covered by one entry of [`Manifest::memory_chunks`].
pub const CHUNK_SIZE: u64 = 4 << 20;

/// How a snapshot captured guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Every non-zero page of guest RAM.
    Full,
    /// The pages written since the parent snapshot.
    Diff,
    /// Every page, copied while the guest ran (write-protect engine).
    Live,
}

/// Where a snapshot is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Being written; not usable yet.
    Writing,
    /// Complete, durable, and described by its digests.
    Ready,
    /// Never became READY; only the manifest remains.
    Failed,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Writing => "WRITING",
            Status::Ready => "READY",
            Status::Failed => "FAILED",
        })
    }
}

/// The guest a snapshot was taken of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestConfig {
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// RAM is 2 MiB huge pages (hugetlb); absent in manifests of 4 KiB
    /// guests.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub huge_pages: bool,
}

impl GuestConfig {
    /// Guest RAM in bytes.
    pub fn memory_bytes(&self) -> u64 {
        u64::from(self.memory_mib) << 20
    }
}

/// The contents of `<tag>/manifest.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT_VERSION`] when written by this crate.
    pub format_version: u32,
    /// The snapshot's tag (its directory name).
    pub tag: String,
    /// The snapshot this one is a diff against (diffs only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Hex SHA-256 of the parent's `manifest.json` bytes when this diff was
    /// committed (diffs only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_digest: Option<String>,
    /// How memory was captured.
    pub mode: Mode,
    /// Where the snapshot is in its life.
    pub status: Status,
    /// Why it is FAILED.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
    /// Guest RAM in bytes: the size of the `memory` file.
    pub memory_bytes: u64,
    /// Bytes allocated on disk by the `memory` file (it is sparse).
    pub disk_bytes: u64,
    /// Bytes of memory data the VMM wrote (holes not counted).
    pub data_bytes: u64,
    /// Pages in the diff, or dirtied in the epoch for a measured FULL.
    pub dirty_pages: u64,
    /// Bytes per entry of `memory_chunks`.
    pub chunk_size: u64,
    /// Hex SHA-256 of each `chunk_size` piece of `memory` (holes read as
    /// zeros; the last piece may be shorter).
    #[serde(default)]
    pub memory_chunks: Vec<String>,
    /// Hex SHA-256 of `vmstate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmstate_sha256: Option<String>,
    /// Hex SHA-256 of `pages` (diffs only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pages_sha256: Option<String>,
    /// When the snapshot was begun, RFC 3339 UTC with microseconds.
    pub created_at: String,
    /// Id of the sandbox it was taken from.
    pub source_sandbox: String,
    /// The guest's shape.
    pub guest: GuestConfig,
    /// The Linux image the guest booted; absent for the reference guest.
    /// Children restore the same kind of guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// How long the guest's vCPUs were stopped, in microseconds.
    pub pause_us: u64,
}

impl Manifest {
    /// A manifest begun now, with nothing written yet (no sizes, digests or
    /// pause).
    pub fn begun(
        tag: &str,
        parent: Option<String>,
        mode: Mode,
        status: Status,
        source_sandbox: String,
        guest: GuestConfig,
    ) -> Manifest {
        Manifest {
            format_version: FORMAT_VERSION,
            tag: tag.to_string(),
            parent,
            parent_digest: None,
            mode,
            status,
            failure_reason: None,
            memory_bytes: guest.memory_bytes(),
            disk_bytes: 0,
            data_bytes: 0,
            dirty_pages: 0,
            chunk_size: CHUNK_SIZE,
            memory_chunks: Vec::new(),
            vmstate_sha256: None,
            pages_sha256: None,
            created_at: format_time(SystemTime::now()),
            source_sandbox,
            guest,
            image: None,
            pause_us: 0,
        }
    }

    /// `created_at` as a time, if it parses.
    pub fn created(&self) -> Option<SystemTime> {
        humantime::parse_rfc3339(&self.created_at).ok()
    }

    /// Number of chunks a memory file of `memory_bytes` has.
    pub fn chunk_count(&self) -> usize {
        self.memory_bytes.div_ceil(self.chunk_size.max(1)) as usize
    }

    /// Bytes of the `pages` bitmap for this guest.
    pub fn bitmap_bytes(&self) -> u64 {
        forkd_snapshot_format::bitmap_bytes(self.memory_bytes)
    }

    /// Serializes the manifest as written to disk.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("manifests always serialize");
        bytes.push(b'\n');
        bytes
    }
}

/// `t` as RFC 3339 UTC with microseconds (fixed width, so these strings
/// sort in time order).
pub fn format_time(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_omits_absent_fields() {
        let m = Manifest {
            format_version: FORMAT_VERSION,
            tag: "base".into(),
            parent: None,
            parent_digest: None,
            mode: Mode::Full,
            status: Status::Ready,
            failure_reason: None,
            memory_bytes: 64 << 20,
            disk_bytes: 4096,
            data_bytes: 4096,
            dirty_pages: 0,
            chunk_size: CHUNK_SIZE,
            memory_chunks: vec!["00".into(); 16],
            vmstate_sha256: Some("ab".into()),
            pages_sha256: None,
            created_at: format_time(SystemTime::UNIX_EPOCH),
            source_sandbox: "sb-1".into(),
            guest: GuestConfig {
                memory_mib: 64,
                vcpus: 2,
                huge_pages: false,
            },
            image: Some("debian-python".into()),
            pause_us: 10,
        };
        let text = String::from_utf8(m.to_bytes()).unwrap();
        assert!(text.contains("\"mode\": \"full\""), "{text}");
        assert!(text.contains("\"status\": \"ready\""), "{text}");
        assert!(!text.contains("parent"), "{text}");
        assert_eq!(m.created_at, "1970-01-01T00:00:00.000000Z");
        assert_eq!(m.created(), Some(SystemTime::UNIX_EPOCH));
        let back: Manifest = serde_json::from_slice(text.as_bytes()).unwrap();
        assert_eq!(back, m);
        assert_eq!(m.chunk_count(), 16);
        assert_eq!(m.bitmap_bytes(), (64 << 20) / 4096 / 8);
    }
}
