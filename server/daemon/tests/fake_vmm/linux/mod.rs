//! The fake `forkd-vmm` booting a "Linux image" (started with `--kernel`):
//! it checks the Linux flags, writes a console log, reports guest boot
//! timing in `Ready`, and runs fake programs the way the real agent runs
//! commands: several at once, with env, cwd and stdin (input frames),
//! signals, and `Event::Error` for a program that cannot start.
//!
//! Programs (argv[0]):
//! - `env`: prints each variable as `K=V` in the order received, then
//!   `cwd=DIR` (`/` when none was given);
//! - `cat`: copies stdin to stdout (nothing without stdin);
//! - `wait-for NAME`: prints `waiting NAME`, then blocks until `release
//!   NAME` runs (exit 0) or 10 s pass (exit 1);
//! - `release NAME`: wakes `wait-for NAME`;
//! - `sleep MS`: sleeps; a Cancel kills it (SIGKILL: `signal: Some(9)`);
//! - `kill SIG`: ends "killed" by signal SIG (exit code sent as -1: the
//!   daemon must compute 128 + SIG itself);
//! - `fail`: prints `oops` on stderr, exit 2;
//! - `console N`: appends N numbered lines to the console log;
//! - `panic`: writes a kernel panic to the console and exits with
//!   `GuestReset`;
//! - anything else: `Event::Error` "cannot run ...: No such file or
//!   directory".
//!
//! File requests and upload data go to an in-memory filesystem: see
//! `files.rs`.

mod files;

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use forkd_control::{
    encode_json, encode_output, read_to_vmm, Event, ExitReason, GuestBoot, Request, ToVmm,
};

use super::{send, Out};

fn append(path: &str, text: &str) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

/// Names released by `release`, waited for by `wait-for`.
#[derive(Default)]
struct Gates {
    open: Mutex<HashSet<String>>,
    changed: Condvar,
}

/// One Exec in flight.
struct Job {
    out: Out,
    id: u64,
    argv: Vec<String>,
    env: Vec<(String, String)>,
    cwd: Option<String>,
    stdin: Option<mpsc::Receiver<Vec<u8>>>,
    cancel: Arc<AtomicBool>,
    gates: Arc<Gates>,
    console: String,
}

/// How a fake program ended.
enum End {
    Exit(i32),
    Signal(i32),
    Refused(String),
}

impl Job {
    fn stdout(&self, data: &[u8]) {
        send(&self.out, &encode_output(self.id, 1, data));
    }

    fn run(mut self) {
        let start = Instant::now();
        let end = self.program();
        let (exit_code, signal) = match end {
            End::Exit(code) => (code, None),
            End::Signal(sig) => (-1, Some(sig)),
            End::Refused(message) => {
                let id = self.id;
                send(&self.out, &encode_json(&Event::Error { id, message }));
                return;
            }
        };
        send(
            &self.out,
            &encode_json(&Event::ExecDone {
                id: self.id,
                exit_code,
                duration_us: start.elapsed().as_micros() as u64,
                cancelled: self.cancel.load(Ordering::SeqCst),
                signal,
            }),
        );
    }

    fn program(&mut self) -> End {
        let arg = |i: usize| self.argv.get(i).cloned().unwrap_or_default();
        match self.argv[0].as_str() {
            "env" => {
                let mut text = String::new();
                for (k, v) in &self.env {
                    text.push_str(&format!("{k}={v}\n"));
                }
                text.push_str(&format!("cwd={}\n", self.cwd.as_deref().unwrap_or("/")));
                self.stdout(text.as_bytes());
                End::Exit(0)
            }
            "cat" => {
                if let Some(rx) = self.stdin.take() {
                    // An empty chunk is EOF; the router then drops the sender.
                    while let Ok(chunk) = rx.recv() {
                        if chunk.is_empty() {
                            break;
                        }
                        self.stdout(&chunk);
                    }
                }
                End::Exit(0)
            }
            "wait-for" => {
                let name = arg(1);
                self.stdout(format!("waiting {name}\n").as_bytes());
                let deadline = Instant::now() + Duration::from_secs(10);
                let mut open = self.gates.open.lock().unwrap();
                while !open.contains(&name) {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return End::Exit(1);
                    }
                    open = self.gates.changed.wait_timeout(open, left).unwrap().0;
                }
                End::Exit(0)
            }
            "release" => {
                self.gates.open.lock().unwrap().insert(arg(1));
                self.gates.changed.notify_all();
                End::Exit(0)
            }
            "sleep" => {
                let ms: u64 = arg(1).parse().unwrap();
                let start = Instant::now();
                while start.elapsed() < Duration::from_millis(ms) {
                    if self.cancel.load(Ordering::SeqCst) {
                        return End::Signal(9);
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                End::Exit(0)
            }
            "kill" => End::Signal(arg(1).parse().unwrap()),
            "fail" => {
                send(&self.out, &encode_output(self.id, 2, b"oops\n"));
                End::Exit(2)
            }
            "console" => {
                let n: usize = arg(1).parse().unwrap();
                let text: String = (0..n).map(|i| format!("console line {i}\n")).collect();
                append(&self.console, &text);
                End::Exit(0)
            }
            "panic" => {
                append(
                    &self.console,
                    "[    1.234567] Kernel panic - not syncing: Attempted to kill init! \
                     exitcode=0x0000000b\n[    1.234999] ---[ end Kernel panic ]---\n",
                );
                send(
                    &self.out,
                    &encode_json(&Event::Exited {
                        reason: ExitReason::GuestReset {
                            detail: "the guest kernel reset the machine".into(),
                        },
                    }),
                );
                std::process::exit(0);
            }
            other => End::Refused(format!("cannot run {other:?}: No such file or directory")),
        }
    }
}

/// Runs the fake Linux VMM on control socket `sock`; `arg` reads a flag.
pub fn run(sock: UnixStream, arg: &dyn Fn(&str) -> String) -> ! {
    let id = arg("--id");
    let kernel = arg("--kernel");
    let initrd = arg("--initrd");
    let kernel_args = arg("--kernel-args");
    let console = arg("--console-log");
    assert!(std::fs::metadata(&kernel).unwrap().is_file(), "{kernel}");
    assert!(std::fs::metadata(&initrd).unwrap().is_file(), "{initrd}");
    assert!(
        kernel_args.starts_with(&format!("forkd.hostname={id}")),
        "{kernel_args}"
    );
    assert!(console.ends_with(&format!("{id}/console.log")), "{console}");
    append(
        &console,
        &format!(
            "[    0.000000] Linux version 6.1.0-fake\n[    0.000001] Command line: {kernel_args}\n\
             [    0.000002] kernel {kernel} initrd {initrd}\n"
        ),
    );
    eprintln!("fake-vmm {id}: booting a Linux image");
    // `FORKD_FAKE_VMM`: `linux_boot_panic` resets before Ready,
    // `linux_boot_hang` never gets there.
    match std::env::var("FORKD_FAKE_VMM").as_deref() {
        Ok("linux_boot_panic") => {
            append(
                &console,
                "[    0.5] VFS: Unable to mount root fs\n[    0.6] Kernel panic\n",
            );
            let out: Out = Arc::new(Mutex::new(sock));
            send(
                &out,
                &encode_json(&Event::Exited {
                    reason: ExitReason::GuestReset {
                        detail: "the guest kernel reset the machine".into(),
                    },
                }),
            );
            std::process::exit(0);
        }
        Ok("linux_boot_hang") => {
            append(&console, "[    0.7] waiting for the root device\n");
            loop {
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        _ => {}
    }

    let out: Out = Arc::new(Mutex::new(sock.try_clone().unwrap()));
    let mut input = sock;
    send(
        &out,
        &encode_json(&Event::Ready {
            boot_us: 900_000,
            guest: Some(GuestBoot {
                kernel_us: 800_000,
                init_us: 45_500,
            }),
        }),
    );
    let gates = Arc::new(Gates::default());
    let mut stdins: HashMap<u64, mpsc::Sender<Vec<u8>>> = HashMap::new();
    let cancels: Arc<Mutex<HashMap<u64, Arc<AtomicBool>>>> = Arc::default();
    let files = files::Files::new(out.clone());
    loop {
        let msg = match read_to_vmm(&mut input) {
            Ok(m) => m,
            Err(_) => std::process::exit(0), // EOF: the daemon is gone
        };
        let req = match msg {
            ToVmm::Input { id, data } => {
                let eof = data.is_empty();
                if let Some(tx) = stdins.get(&id) {
                    let _ = tx.send(data);
                }
                if eof {
                    stdins.remove(&id);
                }
                continue;
            }
            ToVmm::FileData { id, data } => {
                files.data(id, data);
                continue;
            }
            ToVmm::Request(req) => match files.request(req) {
                Some(req) => req,
                None => continue,
            },
        };
        match req {
            Request::Ping { id } => send(&out, &encode_json(&Event::Pong { id })),
            Request::Heartbeat { id } => send(&out, &encode_json(&Event::Alive { id })),
            Request::Exec {
                id,
                argv,
                env,
                cwd,
                stdin,
            } => {
                let rx = stdin.then(|| {
                    let (tx, rx) = mpsc::channel();
                    stdins.insert(id, tx);
                    rx
                });
                let cancel = Arc::new(AtomicBool::new(false));
                cancels.lock().unwrap().insert(id, cancel.clone());
                let job = Job {
                    out: out.clone(),
                    id,
                    argv,
                    env,
                    cwd,
                    stdin: rx,
                    cancel,
                    gates: gates.clone(),
                    console: console.clone(),
                };
                let cancels = cancels.clone();
                std::thread::spawn(move || {
                    job.run();
                    cancels.lock().unwrap().remove(&id);
                });
            }
            Request::Cancel { id } => {
                if let Some(flag) = cancels.lock().unwrap().get(&id) {
                    flag.store(true, Ordering::SeqCst);
                }
            }
            Request::Shutdown { .. } => {
                send(
                    &out,
                    &encode_json(&Event::Exited {
                        reason: ExitReason::Shutdown,
                    }),
                );
                std::process::exit(0);
            }
            other => send(
                &out,
                &encode_json(&Event::Error {
                    id: other.id(),
                    message: "not supported by the fake Linux VMM".into(),
                }),
            ),
        }
    }
}
