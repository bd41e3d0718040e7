//! The engine against a real shmem mapping with a writer running during
//! the copy: the output must be memory exactly as it was when frozen.

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
fn copy_is_the_frozen_instant_while_a_writer_runs() {
    let memfd = memfd::MemfdOptions::default().create("uffd-test").unwrap();
    copy_while_a_writer_runs(memfd.as_file(), PAGE_SIZE);
}

/// The same on a hugetlb memfd: protection, faults and the copy work in
/// 2 MiB units, the output is still exact to the 4 KiB page (holes too).
#[test]
fn copy_on_huge_pages_is_the_frozen_instant_while_a_writer_runs() {
    const HUGE: usize = 2 << 20;
    let _pool = HugePool::at_least(PAGES * PAGE_SIZE / HUGE);
    let memfd = memfd::MemfdOptions::default()
        .hugetlb(Some(memfd::HugetlbSize::Huge2MB))
        .create("uffd-test-huge")
        .unwrap();
    copy_while_a_writer_runs(memfd.as_file(), HUGE);
}

/// Makes sure the host's 2 MiB pool has `pages` free (raising
/// `vm.nr_hugepages`, which needs root) and puts the old size back when
/// dropped.
struct HugePool {
    restore: Option<u64>,
}

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

impl HugePool {
    fn at_least(pages: usize) -> HugePool {
        let free = meminfo("HugePages_Free:");
        if free >= pages as u64 {
            return HugePool { restore: None };
        }
        let total: u64 = std::fs::read_to_string(NR_HUGEPAGES)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let want = total + pages as u64 - free;
        std::fs::write(NR_HUGEPAGES, want.to_string()).unwrap_or_else(|e| {
            panic!("this test needs {pages} free 2 MiB huge pages: writing {NR_HUGEPAGES}: {e}")
        });
        assert!(
            meminfo("HugePages_Free:") >= pages as u64,
            "the kernel could not grow the huge page pool to {want} (memory too fragmented?)"
        );
        HugePool {
            restore: Some(total),
        }
    }
}

impl Drop for HugePool {
    fn drop(&mut self) {
        if let Some(total) = self.restore {
            let _ = std::fs::write(NR_HUGEPAGES, total.to_string());
        }
    }
}

fn meminfo(key: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn copy_while_a_writer_runs(file: &std::fs::File, page_size: usize) {
    let len = PAGES * PAGE_SIZE;
    file.set_len(len as u64).unwrap();
    // SAFETY: a fresh shared mapping of the memfd, unmapped at the end.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(file),
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

    let out_path =
        std::env::temp_dir().join(format!("uffd-copy-{}-{page_size}", std::process::id()));
    let out = std::fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&out_path)
        .unwrap();
    out.set_len(len as u64).unwrap();

    // A writer that rewrites pages (holes too) to generation 2 and beyond,
    // from the top down, racing first the arming and then the copier that
    // walks from the bottom up. It parks while `hold` is set.
    let stop = Arc::new(AtomicBool::new(false));
    let hold = Arc::new(AtomicBool::new(false));
    let parked = Arc::new(AtomicBool::new(false));
    let writer = {
        let (map, stop, hold, parked) = (map.clone(), stop.clone(), hold.clone(), parked.clone());
        std::thread::spawn(move || {
            let mut generation = 2;
            let mut writes = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for page in (0..PAGES).rev().step_by(3) {
                    while hold.load(Ordering::Acquire) {
                        parked.store(true, Ordering::Release);
                        std::hint::spin_loop();
                    }
                    parked.store(false, Ordering::Release);
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
    std::thread::sleep(std::time::Duration::from_millis(20));

    // Arm while the writer runs; then stop it, note the instant, freeze.
    // Three copies in a row: the later ones reuse the protection re-armed
    // after the previous copy (the last one also re-protects its
    // let-through pages before the instant, as a VMM does when many are).
    // SAFETY: the mapping outlives the copy.
    let mut armed = Some(unsafe { LiveCopy::arm(map.ptr, map.len, page_size) }.unwrap());
    let (mut let_through, mut faults) = (0, 0);
    for round in 0..3 {
        let copy = armed.take().expect("armed for this round");
        std::thread::sleep(std::time::Duration::from_millis(20));
        if round == 2 {
            copy.protect_let_through().unwrap();
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        hold.store(true, Ordering::Release);
        while !parked.load(Ordering::Acquire) {
            std::hint::spin_loop();
        }
        let_through += copy.progress().faults_before_freeze;
        let mut instant = vec![0u64; PAGES];
        for (page, word) in instant.iter_mut().enumerate() {
            // SAFETY: inside the mapping; reads do not fault.
            *word = unsafe { std::ptr::read_volatile(map.ptr.add(page * PAGE_SIZE) as *const u64) };
        }
        let mut needs_copy = vec![0u64; PAGES.div_ceil(64)];
        for (page, word) in instant.iter().enumerate() {
            if *word != 0 {
                needs_copy[page / 64] |= 1 << (page % 64);
            }
        }
        out.set_len(0).unwrap();
        out.set_len(len as u64).unwrap();
        let frozen = copy
            .freeze(out.try_clone().unwrap(), &needs_copy, std::iter::empty())
            .unwrap();
        parked.store(false, Ordering::Release);
        hold.store(false, Ordering::Release);
        let running = frozen.start(0);
        let progress = if round < 2 {
            let (result, next) = running.wait_and_rearm();
            armed = Some(next.expect("re-armed after a good copy"));
            result.unwrap()
        } else {
            running.wait().unwrap()
        };
        faults += progress.faults_served;
        assert_eq!(progress.bytes_copied, progress.bytes_total);
        let mut word = [0u8; 8];
        for (page, want) in instant.iter().enumerate() {
            out.read_exact_at(&mut word, (page * PAGE_SIZE) as u64)
                .unwrap();
            assert_eq!(
                u64::from_le_bytes(word),
                *want,
                "round {round}, page {page}"
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().unwrap();
    assert!(writes > 0);
    assert!(let_through > 0, "writes during arming are let through");
    assert!(faults > 0, "the writer should have hit protected pages");
    // Protection is gone: writes after the copy do not block.
    // SAFETY: inside the mapping.
    unsafe { *(map.ptr as *mut u64) = 99 };
    // SAFETY: unmapping what we mapped.
    unsafe { libc::munmap(ptr, len) };
    std::fs::remove_file(out_path).unwrap();
    eprintln!("writes: {writes}, let through while armed: {let_through}, faults served: {faults}");
}
