//! The reference guest's memory: a map of 4 KiB pages, each filled with
//! one byte, restored from a snapshot's sealed memfd and written as a
//! snapshot in the store's real format (sparse `memory`, `pages` bitmap
//! for diffs), so the tests see what the daemon's chain assembly produced.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use forkd_control::SnapshotMode;
use forkd_snapshot_format::{bitmap_bytes, bitmap_set, MEMORY, PAGES, PAGE_SIZE, VMSTATE};

/// The fake guest's page size: the snapshot format's.
pub const PAGE: u64 = PAGE_SIZE;

/// The fake guest's RAM: page -> fill byte (absent = zero), and the pages
/// written since the last snapshot (or boot/restore).
#[derive(Default)]
pub struct FakeMem {
    pub size: u64,
    pub pages: BTreeMap<u64, u8>,
    pub dirty: BTreeSet<u64>,
    /// A LIVE copy is running: writes count as faults served.
    pub copying: bool,
    pub faults: u64,
}
pub type Mem = Arc<Mutex<FakeMem>>;

/// Restores the fake's memory from the snapshot's sealed memfd on fd 4,
/// checking it is sealed and matches `dir/vmstate`.
pub fn restore_mem(dir: &str, fd: i32) -> FakeMem {
    let state = std::fs::read_to_string(format!("{dir}/{VMSTATE}")).expect("vmstate");
    let v: serde_json::Value = serde_json::from_str(&state).unwrap();
    let size = v["memory_bytes"].as_u64().unwrap();
    // SAFETY: fd 4 is the memfd the daemon handed us.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    // SAFETY: F_GET_SEALS on an fd we own.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    let want = libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    assert_eq!(seals & want, want, "memory fd is not sealed");
    assert_eq!(file.metadata().unwrap().len(), size);
    let mut mem = FakeMem {
        size,
        ..Default::default()
    };
    let mut pos = 0i64;
    loop {
        // SAFETY: lseek on an fd we own.
        let data = unsafe { libc::lseek(file.as_raw_fd(), pos, libc::SEEK_DATA) };
        if data < 0 {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(file.as_raw_fd(), data, libc::SEEK_HOLE) };
        let mut page = data as u64 / PAGE;
        while page * PAGE < hole as u64 {
            let mut b = [0u8];
            file.read_exact_at(&mut b, page * PAGE).unwrap();
            if b[0] != 0 {
                mem.pages.insert(page, b[0]);
            }
            page += 1;
        }
        pos = hole;
    }
    mem
}

/// Writes a snapshot of the fake's memory into `dir` as the real VMM does.
pub fn write_snapshot(mem: &mut FakeMem, mode: SnapshotMode, dir: &str) -> (u64, u64) {
    let selected: Vec<u64> = match mode {
        SnapshotMode::Full | SnapshotMode::Live => mem.pages.keys().copied().collect(),
        SnapshotMode::Diff => mem.dirty.iter().copied().collect(),
    };
    let file = std::fs::File::create(format!("{dir}/{MEMORY}")).unwrap();
    file.set_len(mem.size).unwrap();
    let mut bitmap = vec![0u8; bitmap_bytes(mem.size) as usize];
    let mut written = 0;
    for page in &selected {
        if let Some(&b) = mem.pages.get(page) {
            file.write_all_at(&[b; PAGE as usize], page * PAGE).unwrap();
            written += PAGE;
        }
        bitmap_set(&mut bitmap, *page);
    }
    if mode == SnapshotMode::Diff {
        std::fs::write(format!("{dir}/{PAGES}"), &bitmap).unwrap();
    }
    let state = format!("{{\"fake\": true, \"memory_bytes\": {}}}", mem.size);
    std::fs::write(format!("{dir}/{VMSTATE}"), state).unwrap();
    let dirty = mem.dirty.len() as u64;
    mem.dirty.clear();
    (written, dirty)
}
