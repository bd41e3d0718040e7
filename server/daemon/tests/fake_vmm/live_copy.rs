//! LIVE snapshots: the fake answers `Snapshotted` at once (memory as it is
//! at that moment is what the snapshot holds), then copies in 100 ms steps
//! of `--copy-rate-mibps` / 10 MiB (all at once without the flag), sending
//! `CopyProgress` after each step and `CopyDone` at the end. A `poke`
//! during the copy counts as a fault served. `FORKD_FAKE_VMM=copy_error`
//! fails the copy halfway; `copy_ignores_cancel` never stops it.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forkd_control::{encode_json, Event};

use super::memory::{Mem, PAGE};
use super::reference::Guest;
use super::{send, Out};

/// The running LIVE copy's request id and cancel flag.
pub type Copying = Arc<Mutex<Option<(u64, Arc<AtomicBool>)>>>;

/// Starts LIVE snapshot request `id` into `dir`: an empty `memory` file
/// and `Snapshotted` now, the copy on a thread of its own.
pub fn start(guest: &Guest, id: u64, dir: String) {
    let mut m = guest.mem.lock().unwrap();
    let state = format!("{{\"fake\": true, \"memory_bytes\": {}}}", m.size);
    std::fs::write(format!("{dir}/vmstate"), state).unwrap();
    let file = std::fs::File::create(format!("{dir}/memory")).unwrap();
    file.set_len(m.size).unwrap();
    let dirty_pages = m.dirty.len() as u64;
    m.dirty.clear();
    m.copying = true;
    m.faults = 0;
    let cancel = Arc::new(AtomicBool::new(false));
    *guest.copying.lock().unwrap() = Some((id, cancel.clone()));
    send(
        &guest.out,
        &encode_json(&Event::Snapshotted {
            id,
            pause_us: 250,
            bytes_written: 0,
            dirty_pages,
            memory_bytes: m.size,
        }),
    );
    let job = LiveCopyJob {
        out: guest.out.clone(),
        id,
        dir,
        image: m.pages.clone(),
        size: m.size,
        rate_mibps: guest.rate_mibps,
        cancel,
        mem: guest.mem.clone(),
        copying: guest.copying.clone(),
        behaviour: guest.behaviour.clone(),
    };
    std::thread::spawn(move || job.run());
}

/// A LIVE copy the fake runs in the background.
struct LiveCopyJob {
    out: Out,
    id: u64,
    dir: String,
    /// Memory as it was when the vCPUs "resumed".
    image: BTreeMap<u64, u8>,
    size: u64,
    rate_mibps: u64,
    cancel: Arc<AtomicBool>,
    mem: Mem,
    copying: Copying,
    behaviour: String,
}

impl LiveCopyJob {
    fn run(self) {
        let start = Instant::now();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(format!("{}/memory", self.dir))
            .unwrap();
        let step = match self.rate_mibps {
            0 => self.size,
            r => ((r << 20) / 10).max(PAGE),
        };
        let (mut copied, mut written) = (0u64, 0u64);
        let error = loop {
            if self.cancel.load(Ordering::SeqCst) {
                if self.behaviour == "copy_ignores_cancel" {
                    // Stuck: neither progress nor an end.
                    loop {
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
                break Some("cancelled".to_string());
            }
            let next = (copied + step).min(self.size);
            for (&page, &b) in self.image.range(copied / PAGE..next.div_ceil(PAGE)) {
                file.write_all_at(&[b; PAGE as usize], page * PAGE).unwrap();
                written += PAGE;
            }
            copied = next;
            if self.behaviour == "copy_error" && copied * 2 >= self.size {
                break Some("writing memory: No space left on device".to_string());
            }
            if copied >= self.size {
                break None;
            }
            let faults_served = self.mem.lock().unwrap().faults;
            send(
                &self.out,
                &encode_json(&Event::CopyProgress {
                    id: self.id,
                    bytes_copied: copied,
                    bytes_total: self.size,
                    faults_served,
                }),
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let faults_served = {
            let mut m = self.mem.lock().unwrap();
            m.copying = false;
            m.faults
        };
        *self.copying.lock().unwrap() = None;
        send(
            &self.out,
            &encode_json(&Event::CopyDone {
                id: self.id,
                bytes_written: written,
                bytes_copied: copied,
                bytes_total: self.size,
                faults_served,
                copy_us: start.elapsed().as_micros() as u64,
                error,
            }),
        );
    }
}
