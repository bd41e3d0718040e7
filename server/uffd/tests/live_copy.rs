//! The engine against a real shmem mapping with a writer running during
//! the copy: the output must be memory exactly as it was when armed.

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use forkd_uffd::{LiveCopy, PAGE_SIZE};

const PAGES: usize = 16 * 1024; // 64 MiB

struct Mapping {
    ptr: *mut u8,
    len: usize,
}
// SAFETY: the mapping is plain shared memory used by the test's threads.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

fn stamp(page: usize, generation: u64) -> u64 {
    (page as u64) << 32 | generation
}

#[test]
fn copy_is_the_armed_instant_while_a_writer_runs() {
    let len = PAGES * PAGE_SIZE;
    let memfd = memfd::MemfdOptions::default().create("uffd-test").unwrap();
    memfd.as_file().set_len(len as u64).unwrap();
    // SAFETY: a fresh shared mapping of the memfd, unmapped at the end.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(memfd.as_file()),
            0,
        )
    };
    assert_ne!(ptr, libc::MAP_FAILED);
    let map = Arc::new(Mapping {
        ptr: ptr as *mut u8,
        len,
    });
    // Generation 1 everywhere but every 7th page, which stays a hole.
    for page in (0..PAGES).filter(|p| p % 7 != 0) {
        // SAFETY: inside the mapping.
        unsafe { *(map.ptr.add(page * PAGE_SIZE) as *mut u64) = stamp(page, 1) };
    }

    let out_path = std::env::temp_dir().join(format!("uffd-copy-{}", std::process::id()));
    let out = std::fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&out_path)
        .unwrap();
    out.set_len(len as u64).unwrap();
    // SAFETY: the mapping outlives the copy; no writer runs until start.
    let armed =
        unsafe { LiveCopy::arm(map.ptr, map.len, out.try_clone().unwrap(), |p| p % 7 != 0) }
            .unwrap();

    // A writer that rewrites pages (holes too) to generation 2 and beyond,
    // from the top down, racing the copier that walks from the bottom up.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (map, stop) = (map.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut generation = 2;
            let mut writes = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for page in (0..PAGES).rev().step_by(3) {
                    // SAFETY: inside the mapping; write faults are served.
                    unsafe {
                        std::ptr::write_volatile(
                            map.ptr.add(page * PAGE_SIZE) as *mut u64,
                            stamp(page, generation),
                        )
                    };
                    writes += 1;
                }
                generation += 1;
            }
            writes
        })
    };
    let running = armed.start();
    let progress = running.wait().unwrap();
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().unwrap();

    assert!(writes > 0);
    assert!(
        progress.faults_served > 0,
        "the writer should have hit protected pages"
    );
    assert_eq!(progress.bytes_copied, progress.bytes_total);
    let mut word = [0u8; 8];
    for page in 0..PAGES {
        out.read_exact_at(&mut word, (page * PAGE_SIZE) as u64)
            .unwrap();
        let want = if page % 7 == 0 { 0 } else { stamp(page, 1) };
        assert_eq!(u64::from_le_bytes(word), want, "page {page}");
    }
    // Protection is gone: writes after the copy do not block.
    // SAFETY: inside the mapping.
    unsafe { *(map.ptr as *mut u64) = 99 };
    // SAFETY: unmapping what we mapped.
    unsafe { libc::munmap(ptr, len) };
    std::fs::remove_file(out_path).unwrap();
    eprintln!(
        "writes during copy: {writes}, faults served: {}",
        progress.faults_served
    );
}
