//! The reference guest: boots (or restores its memory from the snapshot's
//! sealed memfd on fd 4), says Ready, then answers the daemon's control
//! requests until Shutdown or EOF: Ping, Heartbeat, Exec of a builtin,
//! Snapshot (FULL/DIFF written at once, LIVE copied in the background)
//! and Cancel.

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use forkd_control::{encode_json, read_request, Event, ExitReason, Request, SnapshotMode};

use super::builtins::run_builtin;
use super::live_copy::{self, Copying};
use super::memory::{restore_mem, write_snapshot, FakeMem, Mem};
use super::{send, Out};

/// The running exec's id and cancel flag.
type Running = Arc<Mutex<Option<(u64, Arc<AtomicBool>)>>>;

/// What the request handlers share.
pub struct Guest {
    pub out: Out,
    pub mem: Mem,
    running: Running,
    pub copying: Copying,
    /// `FORKD_FAKE_VMM`.
    pub behaviour: String,
    /// `--copy-rate-mibps` (0: copy at once).
    pub rate_mibps: u64,
}

/// Runs the reference guest on the control socket `sock`; `arg` reads a flag.
pub fn run(sock: UnixStream, args: &[String], arg: &dyn Fn(&str) -> String) -> ! {
    let id = arg("--id");
    let rate_mibps: u64 = args
        .iter()
        .position(|a| a == "--copy-rate-mibps")
        .map(|i| args[i + 1].parse().unwrap())
        .unwrap_or(0);
    let mem: Mem = if args.iter().any(|a| a == "--restore-dir") {
        assert_eq!(
            arg("--memory-fd"),
            "4",
            "the daemon passes the memory as fd 4"
        );
        assert!(!args.iter().any(|a| a == "--memory-mib"));
        Arc::new(Mutex::new(restore_mem(&arg("--restore-dir"), 4)))
    } else {
        let mib: u64 = arg("--memory-mib").parse().unwrap();
        let _: u32 = arg("--vcpus").parse().unwrap();
        Arc::new(Mutex::new(FakeMem {
            size: mib << 20,
            ..Default::default()
        }))
    };
    let out: Out = Arc::new(Mutex::new(sock.try_clone().unwrap()));
    let mut input = sock;
    eprintln!("fake-vmm {id}: starting");
    if std::env::var("FORKD_FAKE_VMM").as_deref() == Ok("boot_fail") {
        eprintln!("fake-vmm {id}: cannot open /dev/kvm");
        send(
            &out,
            &encode_json(&Event::Exited {
                reason: ExitReason::VmmError {
                    detail: "cannot open /dev/kvm".into(),
                },
            }),
        );
        std::process::exit(1);
    }
    send(
        &out,
        &encode_json(&Event::Ready {
            boot_us: 1234,
            guest: None,
        }),
    );
    let guest = Guest {
        out,
        mem,
        running: Arc::default(),
        copying: Arc::default(),
        behaviour: std::env::var("FORKD_FAKE_VMM").unwrap_or_default(),
        rate_mibps,
    };
    let out = &guest.out;
    loop {
        let req = match read_request(&mut input) {
            Ok(r) => r,
            Err(_) => std::process::exit(0), // EOF: the daemon is gone
        };
        match req {
            Request::Ping { id } => send(out, &encode_json(&Event::Pong { id })),
            Request::Heartbeat { id } => send(out, &encode_json(&Event::Alive { id })),
            Request::Exec { id, argv, .. } => {
                let cancel = Arc::new(AtomicBool::new(false));
                *guest.running.lock().unwrap() = Some((id, cancel.clone()));
                let out = out.clone();
                let mem = guest.mem.clone();
                std::thread::spawn(move || run_builtin(&out, id, &argv, &cancel, &mem));
            }
            Request::Snapshot {
                id,
                mode,
                dir,
                measure_diff: _,
            } => guest.snapshot(id, mode, dir),
            Request::Cancel { id } => guest.cancel(id),
            Request::Shutdown { .. } => {
                send(
                    out,
                    &encode_json(&Event::Exited {
                        reason: ExitReason::Shutdown,
                    }),
                );
                std::process::exit(0);
            }
            other => send(
                out,
                &encode_json(&Event::Error {
                    id: other.id(),
                    message: "not supported by the fake".into(),
                }),
            ),
        }
    }
}

impl Guest {
    fn error(&self, id: u64, message: &str) {
        let message = message.into();
        send(&self.out, &encode_json(&Event::Error { id, message }));
    }

    /// Snapshot request `id` into `dir`.
    fn snapshot(&self, id: u64, mode: SnapshotMode, dir: String) {
        if self.behaviour == "snapshot_error" {
            return self.error(id, "cannot write snapshot: disk full");
        }
        if self.copying.lock().unwrap().is_some() {
            return self.error(id, "a live copy is already running");
        }
        if mode == SnapshotMode::Live {
            return live_copy::start(self, id, dir);
        }
        if self.behaviour == "slow_snapshot" {
            std::thread::sleep(Duration::from_secs(3));
        }
        let mut m = self.mem.lock().unwrap();
        let (bytes_written, dirty_pages) = write_snapshot(&mut m, mode, &dir);
        send(
            &self.out,
            &encode_json(&Event::Snapshotted {
                id,
                pause_us: 250,
                bytes_written,
                dirty_pages,
                memory_bytes: m.size,
            }),
        );
    }

    /// Cancels request `id`: a LIVE copy or the running exec.
    fn cancel(&self, id: u64) {
        if let Some((cid, flag)) = &*self.copying.lock().unwrap() {
            if *cid == id {
                flag.store(true, Ordering::SeqCst);
            }
        }
        if let Some((rid, flag)) = &*self.running.lock().unwrap() {
            if *rid == id {
                flag.store(true, Ordering::SeqCst);
            }
        }
    }
}
