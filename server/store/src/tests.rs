//! Store tests on synthetic snapshots in a temporary directory: the test
//! plays the VMM, writing `vmstate`, `memory` and `pages` as it would.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::*;
use forkd_snapshot_format::{
    bitmap_bytes, bitmap_set, MANIFEST, MEMORY, ORIGINAL_MANIFEST, PAGES, PAGE_SIZE, VMSTATE,
};

/// 10 MiB: two full 4 MiB chunks and a short last one.
const MIB: u32 = 10;
const PAGE: u64 = PAGE_SIZE;

fn guest() -> GuestConfig {
    GuestConfig {
        memory_mib: MIB,
        vcpus: 2,
        huge_pages: false,
    }
}

fn info(mode: Mode, parent: Option<&str>) -> SnapshotInfo {
    SnapshotInfo {
        mode,
        parent: parent.map(str::to_string),
        source_sandbox: "sb-test".into(),
        guest: guest(),
        image: None,
    }
}

/// Writes the files a VMM would: `pages` lists (page, byte) with byte 0
/// meaning a zero page (a hole; in a diff, a set bit over a hole).
fn write_files(dir: &Path, mode: Mode, pages: &[(u64, u8)]) -> Written {
    let size = guest().memory_bytes();
    let mem = File::create(dir.join(MEMORY)).unwrap();
    mem.set_len(size).unwrap();
    let mut data = 0;
    let mut bitmap = vec![0u8; bitmap_bytes(size) as usize];
    for &(page, byte) in pages {
        if byte != 0 {
            mem.write_all_at(&[byte; PAGE as usize], page * PAGE)
                .unwrap();
            data += PAGE;
        }
        bitmap_set(&mut bitmap, page);
    }
    std::fs::write(dir.join(VMSTATE), format!("vmstate of {}", dir.display())).unwrap();
    if mode == Mode::Diff {
        std::fs::write(dir.join(PAGES), &bitmap).unwrap();
    }
    Written {
        memory_bytes: size,
        data_bytes: data,
        dirty_pages: pages.len() as u64,
        pause_us: 42,
    }
}

fn snapshot(store: &Store, tag: &str, parent: Option<&str>, pages: &[(u64, u8)]) -> Manifest {
    let mode = if parent.is_some() {
        Mode::Diff
    } else {
        Mode::Full
    };
    let pending = store.begin(tag, info(mode, parent)).unwrap();
    let written = write_files(pending.dir(), mode, pages);
    store.commit(pending, written).unwrap()
}

fn open(root: &Path) -> (Store, RecoveryReport) {
    Store::open(root).unwrap()
}

fn page_of(file: &File, page: u64) -> u8 {
    let mut buf = vec![0u8; PAGE as usize];
    file.read_exact_at(&mut buf, page * PAGE).unwrap();
    assert!(
        buf.iter().all(|&b| b == buf[0]),
        "page {page} is not uniform"
    );
    buf[0]
}

fn tags(list: &[Manifest]) -> Vec<&str> {
    list.iter().map(|m| m.tag.as_str()).collect()
}

#[test]
fn commit_get_list() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, report) = open(tmp.path());
    assert_eq!(report, RecoveryReport::default());

    let pending = store.begin("base", info(Mode::Full, None)).unwrap();
    assert!(pending.dir().ends_with(".base.writing"));
    assert_eq!(store.get("base").unwrap().status, Status::Writing);
    let err = store.begin("base", info(Mode::Full, None)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists);
    assert!(err.to_string().contains("WRITING"), "{err}");
    let written = write_files(pending.dir(), Mode::Full, &[(0, 1), (1500, 2)]);
    let m = store.commit(pending, written).unwrap();

    assert_eq!(m.status, Status::Ready);
    assert_eq!(m.memory_bytes, 10 << 20);
    assert_eq!(m.memory_chunks.len(), 3);
    assert_eq!(m.data_bytes, 2 * PAGE);
    assert!(m.disk_bytes >= 2 * PAGE && m.disk_bytes < 1 << 20, "sparse");
    assert_eq!((m.pause_us, m.dirty_pages), (42, 2));
    assert!(m.vmstate_sha256.is_some() && m.pages_sha256.is_none());
    assert_eq!(store.get("base").unwrap(), m);
    assert!(tmp.path().join("base/manifest.json").is_file());
    assert!(!tmp.path().join(".base.writing").exists());
    let on_disk: Manifest =
        serde_json::from_slice(&std::fs::read(tmp.path().join("base/manifest.json")).unwrap())
            .unwrap();
    assert_eq!(on_disk, m);

    let err = store.begin("base", info(Mode::Full, None)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists);
    assert_eq!(
        store
            .begin("../x", info(Mode::Full, None))
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidArgument
    );
    assert_eq!(store.get("nope").unwrap_err().kind(), ErrorKind::NotFound);

    snapshot(&store, "second", None, &[(3, 3)]);
    snapshot(&store, "a-diff", Some("second"), &[(4, 4)]);
    assert_eq!(
        tags(&store.list()),
        ["base", "second", "a-diff"],
        "oldest first"
    );
    assert_eq!(tags(&store.chain("a-diff").unwrap()), ["a-diff", "second"]);
    assert_eq!(store.dependents("second"), ["a-diff"]);
    let d = store.get("a-diff").unwrap();
    assert_eq!(d.parent.as_deref(), Some("second"));
    let parent_bytes = std::fs::read(tmp.path().join("second/manifest.json")).unwrap();
    assert_eq!(d.parent_digest, Some(digest::sha256_hex(&parent_bytes)));
}

#[test]
fn failed_and_abandoned_snapshots_leave_tombstones() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = open(tmp.path());

    let pending = store.begin("bad", info(Mode::Full, None)).unwrap();
    let mut written = write_files(pending.dir(), Mode::Full, &[(1, 1)]);
    written.memory_bytes += 4096;
    let err = store.commit(pending, written).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Internal);
    let m = store.get("bad").unwrap();
    assert_eq!(m.status, Status::Failed);
    assert!(m.failure_reason.unwrap().contains("guest RAM"));
    let files: Vec<_> = std::fs::read_dir(tmp.path().join("bad"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(files, ["manifest.json"], "data removed");

    let pending = store.begin("vmm-error", info(Mode::Full, None)).unwrap();
    store.fail(pending, "VMM could not write memory").unwrap();
    let m = store.get("vmm-error").unwrap();
    assert_eq!(m.status, Status::Failed);
    assert_eq!(
        m.failure_reason.as_deref(),
        Some("VMM could not write memory")
    );

    drop(store.begin("dropped", info(Mode::Full, None)).unwrap());
    let m = store.get("dropped").unwrap();
    assert_eq!(m.failure_reason.as_deref(), Some("abandoned before commit"));

    // A diff needs a READY parent.
    let err = store.begin("d", info(Mode::Diff, Some("bad"))).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    assert!(err.to_string().contains("parent bad is FAILED"), "{err}");
    let err = store
        .begin("d", info(Mode::Diff, Some("gone")))
        .unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");

    // FAILED survives a restart as it is.
    drop(store);
    let (store, report) = open(tmp.path());
    assert_eq!(report.failed, ["bad", "dropped", "vmm-error"]);
    assert_eq!(store.get("bad").unwrap().status, Status::Failed);
}

#[test]
fn recovery_never_lists_incomplete_snapshots_ready() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = open(tmp.path());
    let ready = snapshot(&store, "ready", None, &[(1, 1)]);
    snapshot(&store, "truncated", None, &[(1, 1)]);
    snapshot(&store, "child", Some("truncated"), &[(2, 2)]);
    snapshot(&store, "grandchild", Some("child"), &[(3, 3)]);
    // A crash mid-write: the pending directory is left as it was.
    let pending = store.begin("half", info(Mode::Full, None)).unwrap();
    write_files(pending.dir(), Mode::Full, &[(5, 5)]);
    std::mem::forget(pending);
    // A crash mid-delete, and things that are not snapshots.
    std::fs::create_dir(tmp.path().join(".old.deleting")).unwrap();
    std::fs::create_dir(tmp.path().join("not a tag")).unwrap();
    std::fs::write(tmp.path().join("stray-file"), "").unwrap();
    drop(store);
    OpenOptions::new()
        .write(true)
        .open(tmp.path().join("truncated/memory"))
        .unwrap()
        .set_len(4096)
        .unwrap();

    let original = std::fs::read(tmp.path().join("truncated").join(MANIFEST)).unwrap();
    let (store, report) = open(tmp.path());
    // The diffs are judged on their own files: READY, with a broken chain.
    assert_eq!(report.ready, ["child", "grandchild", "ready"]);
    let reasons: std::collections::HashMap<_, _> = report.marked_failed.iter().cloned().collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert_eq!(reasons["half"], STOPPED_WHILE_WRITING);
    assert!(
        reasons["truncated"].contains("memory is 4096 bytes"),
        "{reasons:?}"
    );
    let broken: std::collections::HashMap<_, _> = report.broken_chains.iter().cloned().collect();
    assert!(
        broken["child"].starts_with("truncated is FAILED (memory is 4096 bytes"),
        "{broken:?}"
    );
    assert!(
        broken["grandchild"].starts_with("truncated is FAILED"),
        "{broken:?}"
    );
    assert_eq!(report.removed, [".old.deleting"]);
    assert_eq!(report.ignored.len(), 2);

    assert_eq!(store.get("ready").unwrap(), ready);
    // Half-written: a tombstone. Committed: FAILED with every file kept,
    // and the manifest it had kept next to them.
    assert_eq!(store.get("half").unwrap().status, Status::Failed);
    assert!(!tmp.path().join("half").join(MEMORY).exists());
    let m = store.get("truncated").unwrap();
    assert_eq!(m.status, Status::Failed);
    for file in [MEMORY, VMSTATE, MANIFEST] {
        assert!(tmp.path().join("truncated").join(file).exists(), "{file}");
    }
    assert_eq!(
        std::fs::read(tmp.path().join("truncated").join(ORIGINAL_MANIFEST)).unwrap(),
        original
    );
    for tag in ["child", "grandchild"] {
        assert_eq!(store.get(tag).unwrap().status, Status::Ready, "{tag}");
        for file in [MEMORY, VMSTATE, PAGES] {
            assert!(tmp.path().join(tag).join(file).exists(), "{tag}/{file}");
        }
        let err = store.load_memory(tag).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
        assert!(
            err.to_string().contains(&format!(
                "snapshot {tag} cannot be spawned from: its chain is broken, truncated is FAILED"
            )),
            "{err}"
        );
        let err = store.check_chain(tag).unwrap_err();
        assert!(matches!(err, StoreError::ChainBroken { .. }), "{err}");
        // Not marked FAILED by the refusal: its own files are fine.
        assert_eq!(store.get(tag).unwrap().status, Status::Ready, "{tag}");
    }
    assert!(!tmp.path().join(".half.writing").exists());
    assert!(!tmp.path().join(".old.deleting").exists());
    store.load_memory("ready").unwrap();

    // Stable: a second recovery changes nothing.
    drop(store);
    let (store, again) = open(tmp.path());
    assert_eq!(again.ready, ["child", "grandchild", "ready"]);
    assert!(again.marked_failed.is_empty());
    assert_eq!(again.failed, ["half", "truncated"]);

    // Only a delete removes the data.
    let gone = store.delete("truncated", true, false, &[]).unwrap();
    assert_eq!(gone, ["grandchild", "child", "truncated"]);
    assert!(!tmp.path().join("truncated").exists());
}

#[test]
fn corruption_found_at_load_fails_the_snapshot_and_keeps_its_files() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = open(tmp.path());
    snapshot(&store, "root", None, &[(0, 1), (1100, 2)]);
    snapshot(&store, "diff", Some("root"), &[(3, 3)]);
    let f = OpenOptions::new()
        .write(true)
        .open(tmp.path().join("root/memory"))
        .unwrap();
    f.write_all_at(&[0x5a], 1100 * PAGE + 17).unwrap();
    drop(f);
    let memory_before = std::fs::read(tmp.path().join("root/memory")).unwrap();

    let err = store.load_memory("diff").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::DataLoss, "{err}");
    let m = store.get("root").unwrap();
    assert_eq!(m.status, Status::Failed);
    let reason = m.failure_reason.unwrap();
    assert!(reason.starts_with("memory chunk 1 (bytes"), "{reason}");
    assert_eq!(
        std::fs::read(tmp.path().join("root/memory")).unwrap(),
        memory_before,
        "the corrupt file is kept as it was"
    );
    assert!(tmp.path().join("root").join(ORIGINAL_MANIFEST).exists());
    // The diff is judged on its own files: READY, but its chain is broken.
    assert_eq!(store.get("diff").unwrap().status, Status::Ready);
    let err = store.load_memory("diff").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    let err = store.load_memory("root").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");

    // Persisted: a restart lists it FAILED with the reason, files still there.
    drop(store);
    let (store, report) = open(tmp.path());
    assert_eq!(report.failed, ["root"]);
    assert_eq!(report.ready, ["diff"]);
    assert_eq!(store.get("root").unwrap().failure_reason.unwrap(), reason);
    assert!(tmp.path().join("root/memory").exists());

    // A vmstate mismatch found by a fork's check fails that snapshot too.
    snapshot(&store, "other", None, &[(1, 1)]);
    std::fs::write(tmp.path().join("other/vmstate"), "changed").unwrap();
    let err = store.verify_vmstate("other").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::DataLoss);
    let m = store.get("other").unwrap();
    assert_eq!(m.status, Status::Failed);
    assert_eq!(
        m.failure_reason.as_deref(),
        Some("vmstate does not match its SHA-256")
    );

    // A missing file is data loss, not an I/O error.
    snapshot(&store, "lost", None, &[(1, 1)]);
    std::fs::remove_file(tmp.path().join("lost/memory")).unwrap();
    let err = store.load_memory("lost").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::DataLoss, "{err}");
    assert!(err.to_string().contains("memory is missing"), "{err}");

    // DeleteSnapshot removes FAILED snapshots and their kept files.
    store.delete("root", true, false, &[]).unwrap();
    store.delete("other", false, false, &[]).unwrap();
    assert!(!tmp.path().join("root").exists());
    assert!(!tmp.path().join("other").exists());
    assert!(!tmp.path().join("diff").exists());
}

#[test]
fn a_depth_3_chain_assembles_to_the_leaf_state() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = open(tmp.path());
    let last = u64::from(MIB) * 256 - 1; // last page, in the short chunk
    snapshot(
        &store,
        "root",
        None,
        &[(0, 1), (1, 2), (1024, 7), (last, 9)],
    );
    snapshot(&store, "d1", Some("root"), &[(1, 3), (2, 4)]);
    snapshot(&store, "d2", Some("d1"), &[(0, 0), (1030, 5)]); // page 0 zeroed
    snapshot(&store, "d3", Some("d2"), &[(2, 6), (last, 0)]);
    assert_eq!(
        tags(&store.chain("d3").unwrap()),
        ["d3", "d2", "d1", "root"]
    );

    let mem = store.load_memory("d3").unwrap();
    assert_eq!(mem.size, 10 << 20);
    assert_eq!(mem.file.metadata().unwrap().len(), 10 << 20);
    let expect = [
        (0, 0),
        (1, 3),
        (2, 6),
        (3, 0),
        (1024, 7),
        (1030, 5),
        (last, 0),
    ];
    for (page, byte) in expect {
        assert_eq!(page_of(&mem.file, page), byte, "page {page}");
    }
    // Sparse: only pages 1, 2, 1024 and 1030 hold data.
    let ranges = fsio::data_ranges(&mem.file, 0, mem.size).unwrap();
    let data: u64 = ranges.iter().map(|(a, b)| b - a).sum();
    assert_eq!(data, 4 * PAGE, "{ranges:?}");

    let mid = store.load_memory("d1").unwrap();
    for (page, byte) in [(0, 1), (1, 3), (2, 4), (1030, 0), (last, 9)] {
        assert_eq!(page_of(&mid.file, page), byte, "page {page}");
    }
    let root = store.load_memory("root").unwrap();
    assert_eq!(page_of(&root.file, 1), 2);
}

#[test]
fn a_flipped_byte_is_data_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = open(tmp.path());
    let flip = |path: &Path, offset: u64| {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let mut b = [0u8];
        f.read_exact_at(&mut b, offset).unwrap();
        f.write_all_at(&[b[0] ^ 0x40], offset).unwrap();
    };
    // Each case on a fresh chain: a corrupt snapshot becomes FAILED.
    let fresh = || {
        let _ = store.delete("root", true, true, &[]);
        snapshot(&store, "root", None, &[(0, 1), (1100, 2)]);
        snapshot(&store, "diff", Some("root"), &[(3, 3)]);
        store.load_memory("diff").unwrap();
    };
    // Chunk 1 of the root, reached through the diff.
    fresh();
    flip(&tmp.path().join("root/memory"), 1100 * PAGE + 17);
    let err = store.load_memory("diff").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::DataLoss);
    let msg = err.to_string();
    assert!(
        msg.contains("snapshot root is corrupt: memory chunk 1"),
        "{msg}"
    );
    assert_eq!(store.get("root").unwrap().status, Status::Failed);

    // A byte in a hole of the diff.
    fresh();
    flip(&tmp.path().join("diff/memory"), 9 << 20);
    let msg = store.load_memory("diff").unwrap_err().to_string();
    assert!(
        msg.contains("snapshot diff is corrupt: memory chunk 2"),
        "{msg}"
    );
    assert_eq!(store.get("diff").unwrap().status, Status::Failed);
    assert_eq!(store.get("root").unwrap().status, Status::Ready);
    // vmstate and pages are covered too.
    fresh();
    flip(&tmp.path().join("diff/vmstate"), 0);
    let err = store.load_memory("diff").unwrap_err();
    assert!(err.to_string().contains("vmstate"), "{err}");
    fresh();
    flip(&tmp.path().join("diff/vmstate"), 0);
    assert_eq!(
        store.verify_vmstate("diff").unwrap_err().kind(),
        ErrorKind::DataLoss
    );
    fresh();
    flip(&tmp.path().join("diff/pages"), 0);
    let err = store.load_memory("diff").unwrap_err();
    assert!(err.to_string().contains("pages"), "{err}");
}

#[test]
fn delete_rules() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = open(tmp.path());
    snapshot(&store, "root", None, &[(0, 1)]);
    snapshot(&store, "a", Some("root"), &[(1, 1)]);
    snapshot(&store, "b", Some("a"), &[(2, 1)]);
    snapshot(&store, "c", Some("root"), &[(3, 1)]);
    let child = |sb: &str, tag: &str| RunningChild {
        sandbox_id: sb.into(),
        tag: tag.into(),
    };

    let err = store.delete("nope", false, false, &[]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    let err = store.delete("root", false, false, &[]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    assert!(
        err.to_string().contains("dependent diff snapshots (a, c)"),
        "{err}"
    );

    // Running children of anything the cascade would delete block it.
    let running = [child("sb-1", "b"), child("sb-2", "elsewhere")];
    let err = store.delete("a", true, false, &running).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    assert!(err.to_string().contains("running children (sb-1)"), "{err}");
    assert_eq!(store.delete("a", true, true, &running).unwrap(), ["b", "a"]);
    assert!(!tmp.path().join("a").exists() && !tmp.path().join("b").exists());
    assert_eq!(store.dependents("root"), ["c"]);

    // force without cascade: only this one; dependents orphaned, FAILED.
    snapshot(&store, "a", Some("root"), &[(1, 1)]);
    snapshot(&store, "b", Some("a"), &[(2, 1)]);
    assert_eq!(store.delete("root", false, true, &[]).unwrap(), ["root"]);
    for (tag, why) in [
        ("a", "parent root was deleted"),
        ("c", "parent root was deleted"),
        ("b", "ancestor root was deleted"),
    ] {
        let m = store.get(tag).unwrap();
        assert_eq!(m.status, Status::Failed, "{tag}");
        assert_eq!(m.failure_reason.as_deref(), Some(why));
        assert!(!tmp.path().join(tag).join(MEMORY).exists());
    }
    assert_eq!(
        store.load_memory("b").unwrap_err().kind(),
        ErrorKind::FailedPrecondition
    );

    // Cascade deletes FAILED orphans too; a snapshot being written cannot
    // be deleted, nor its parent.
    assert_eq!(store.delete("a", true, false, &[]).unwrap(), ["b", "a"]);
    snapshot(&store, "p", None, &[(0, 1)]);
    let pending = store.begin("w", info(Mode::Diff, Some("p"))).unwrap();
    let err = store.delete("w", false, false, &[]).unwrap_err();
    assert!(err.to_string().contains("still writing"), "{err}");
    let err = store.delete("p", true, true, &[]).unwrap_err();
    assert!(
        matches!(err, StoreError::StillWriting { ref tag } if tag == "w"),
        "{err}"
    );
    store.fail(pending, "test").unwrap();
    assert_eq!(store.delete("p", true, false, &[]).unwrap(), ["w", "p"]);
    assert_eq!(tags(&store.list()), ["c"]);
}

#[test]
fn sealed_memory_cannot_change_but_maps_private() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = open(tmp.path());
    snapshot(&store, "root", None, &[(0, 1), (5, 2)]);
    let mem = store.load_memory("root").unwrap();
    let err = mem.file.write_all_at(b"x", 0).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
    assert!(mem.file.set_len(mem.size + 4096).is_err());
    assert!(mem.file.set_len(4096).is_err());

    let len = mem.size as usize;
    // SAFETY: a fresh private mapping of the memfd; it is only touched
    // within its length and unmapped before the test ends.
    unsafe {
        use std::os::fd::AsRawFd;
        let shared = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            mem.file.as_raw_fd(),
            0,
        );
        assert_eq!(shared, libc::MAP_FAILED, "no writable shared mapping");
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE,
            mem.file.as_raw_fd(),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        let bytes = std::slice::from_raw_parts_mut(p as *mut u8, len);
        assert_eq!(bytes[5 * PAGE as usize], 2);
        bytes[5 * PAGE as usize] = 77;
        assert_eq!(bytes[5 * PAGE as usize], 77);
        libc::munmap(p, len);
    }
    assert_eq!(page_of(&mem.file, 5), 2, "the memfd is unchanged");
}

#[test]
fn live_snapshots_recover_failed_unless_committed() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = open(tmp.path());
    // Committed after its copy ended: READY, a chain root like FULL.
    let pending = store.begin("live", info(Mode::Live, None)).unwrap();
    let written = write_files(pending.dir(), Mode::Live, &[(1, 1), (7, 7)]);
    let m = store.commit(pending, written).unwrap();
    assert_eq!(
        (m.mode, m.status, m.parent),
        (Mode::Live, Status::Ready, None)
    );
    snapshot(&store, "diff", Some("live"), &[(7, 9)]);
    // The daemon dies mid-copy: vmstate written, memory partly filled.
    let pending = store.begin("mid-copy", info(Mode::Live, None)).unwrap();
    assert_eq!(store.get("mid-copy").unwrap().status, Status::Writing);
    let size = guest().memory_bytes();
    std::fs::write(pending.dir().join(VMSTATE), "vmstate").unwrap();
    let mem = File::create(pending.dir().join(MEMORY)).unwrap();
    mem.set_len(size).unwrap();
    mem.write_all_at(&[1; PAGE as usize], PAGE).unwrap();
    std::mem::forget(pending);
    // ...or after the copy ended but before the commit: the files look
    // complete, and it still must not come back READY.
    let pending = store.begin("uncommitted", info(Mode::Live, None)).unwrap();
    write_files(pending.dir(), Mode::Live, &[(1, 1)]);
    std::mem::forget(pending);
    drop(store);

    let (store, report) = open(tmp.path());
    assert_eq!(report.ready, ["diff", "live"]);
    for tag in ["mid-copy", "uncommitted"] {
        let m = store.get(tag).unwrap();
        assert_eq!(
            (m.status, m.mode, m.failure_reason.as_deref()),
            (Status::Failed, Mode::Live, Some(STOPPED_WHILE_WRITING)),
            "{tag}"
        );
        assert!(!tmp.path().join(tag).join(MEMORY).exists(), "{tag}");
        let err = store.load_memory(tag).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{tag}");
    }
    let memory = store.load_memory("diff").unwrap();
    assert_eq!(page_of(&memory.file, 1), 1);
    assert_eq!(page_of(&memory.file, 7), 9);
}
