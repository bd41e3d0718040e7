//! End-to-end tests of the `forkd` binary against a fake VMM.
//!
//! This test executable has its own `main` (`harness = false`) and plays
//! two roles: started with `--control-fd`, it is a fake `forkd-vmm` that
//! speaks the control protocol (the daemon runs it via `--vmm-path`);
//! started otherwise, it runs the tests, each against a real daemon process
//! talking gRPC over TCP.
//!
//! The fake's behaviour comes from `FORKD_FAKE_VMM` in its environment
//! (inherited from the daemon): empty for a healthy guest, `boot_fail` for
//! a VMM that fails before Ready, `slow_snapshot` for one that takes 3 s to
//! write a snapshot, `snapshot_error` for one that refuses to,
//! `copy_error` for one whose LIVE copies fail halfway, and
//! `copy_ignores_cancel` for one that does not stop a LIVE copy when
//! cancelled.
//!
//! Started with `--kernel`, the fake boots a "Linux image" instead: see
//! `fake_linux/mod.rs` for what it does and the programs it runs, and
//! `fake_linux/files.rs` for its in-memory filesystem, which the file RPC
//! tests in `linux_files/mod.rs` use. The daemons of the Linux tests run
//! with `FORKD_TEST_ASSUME_HYPERVISOR` so they pass (or, with `pvm`, fail)
//! the host check whatever this machine's KVM is.
//!
//! LIVE snapshots: the fake answers `Snapshotted` at once (memory as it is
//! at that moment is what the snapshot holds), then copies in 100 ms steps
//! of `--copy-rate-mibps` / 10 MiB (all at once without the flag), sending
//! `CopyProgress` after each step and `CopyDone` at the end. A `poke`
//! during the copy counts as a fault served.
//!
//! The fake guest's memory is a map of 4 KiB pages, each filled with one
//! byte (`poke PAGE BYTE`, `peek PAGE`). Snapshots are written in the
//! store's real format (sparse `memory`, `pages` bitmap for diffs), and a
//! restored fake reads its memory from the sealed memfd on fd 4, so the
//! tests see what the daemon's chain assembly produced.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forkd_api::v1 as pb;
use forkd_control::{
    encode_json, encode_output, read_request, Event, ExitReason, Request, SnapshotMode,
};
use pb::exec_response::Event as Ev;
use pb::sandbox_service_client::SandboxServiceClient;
use pb::snapshot_service_client::SnapshotServiceClient;
use pb::{BranchMode, SnapshotStatus};
use tonic::transport::Channel;
use tonic::Code;

mod fake_linux;
mod linux_files;

use linux_files::{
    linux_files_cut_off, linux_files_download_memory, linux_files_errors,
    linux_files_upload_and_meta,
};

// ---------------------------------------------------------------- fake VMM

type Out = Arc<Mutex<UnixStream>>;
const PAGE: u64 = 4096;

/// The fake guest's RAM: page -> fill byte (absent = zero), and the pages
/// written since the last snapshot (or boot/restore).
#[derive(Default)]
struct FakeMem {
    size: u64,
    pages: BTreeMap<u64, u8>,
    dirty: BTreeSet<u64>,
    /// A LIVE copy is running: writes count as faults served.
    copying: bool,
    faults: u64,
}
type Mem = Arc<Mutex<FakeMem>>;

/// Restores the fake's memory from the snapshot's sealed memfd on fd 4,
/// checking it is sealed and matches `dir/vmstate`.
fn restore_mem(dir: &str, fd: i32) -> FakeMem {
    let state = std::fs::read_to_string(format!("{dir}/vmstate")).expect("vmstate");
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
fn write_snapshot(mem: &mut FakeMem, mode: SnapshotMode, dir: &str) -> (u64, u64) {
    let selected: Vec<u64> = match mode {
        SnapshotMode::Full | SnapshotMode::Live => mem.pages.keys().copied().collect(),
        SnapshotMode::Diff => mem.dirty.iter().copied().collect(),
    };
    let file = std::fs::File::create(format!("{dir}/memory")).unwrap();
    file.set_len(mem.size).unwrap();
    let mut bitmap = vec![0u8; (mem.size / PAGE).div_ceil(8) as usize];
    let mut written = 0;
    for page in &selected {
        if let Some(&b) = mem.pages.get(page) {
            file.write_all_at(&[b; PAGE as usize], page * PAGE).unwrap();
            written += PAGE;
        }
        bitmap[(page / 8) as usize] |= 1 << (page % 8);
    }
    if mode == SnapshotMode::Diff {
        std::fs::write(format!("{dir}/pages"), &bitmap).unwrap();
    }
    let state = format!("{{\"fake\": true, \"memory_bytes\": {}}}", mem.size);
    std::fs::write(format!("{dir}/vmstate"), state).unwrap();
    let dirty = mem.dirty.len() as u64;
    mem.dirty.clear();
    (written, dirty)
}
/// The running exec's id and cancel flag.
type Running = Arc<Mutex<Option<(u64, Arc<AtomicBool>)>>>;
/// The running LIVE copy's request id and cancel flag.
type Copying = Arc<Mutex<Option<(u64, Arc<AtomicBool>)>>>;

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

fn send(out: &Out, frame: &[u8]) {
    let _ = out.lock().unwrap().write_all(frame);
}

fn fake_vmm(args: &[String]) -> ! {
    let arg = |name: &str| {
        let i = args.iter().position(|a| a == name).expect("missing flag");
        args[i + 1].clone()
    };
    let fd: i32 = arg("--control-fd").parse().unwrap();
    assert_eq!(fd, 3, "the daemon passes fd 3");
    // SAFETY: fd 3 is the control socket the daemon handed us.
    let sock = unsafe { UnixStream::from_raw_fd(fd) };
    // The handshake: every VMM's first frame.
    (&sock)
        .write_all(&encode_json(&Event::hello("fake")))
        .unwrap();
    if args.iter().any(|a| a == "--kernel") {
        fake_linux::run(sock, &arg);
    }
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
    let running: Running = Arc::default();
    let copying: Copying = Arc::default();
    let behaviour = std::env::var("FORKD_FAKE_VMM").unwrap_or_default();
    loop {
        let req = match read_request(&mut input) {
            Ok(r) => r,
            Err(_) => std::process::exit(0), // EOF: the daemon is gone
        };
        match req {
            Request::Ping { id } => send(&out, &encode_json(&Event::Pong { id })),
            Request::Heartbeat { id } => send(&out, &encode_json(&Event::Alive { id })),
            Request::Exec { id, argv, .. } => {
                let cancel = Arc::new(AtomicBool::new(false));
                *running.lock().unwrap() = Some((id, cancel.clone()));
                let out = out.clone();
                let mem = mem.clone();
                std::thread::spawn(move || run_builtin(&out, id, &argv, &cancel, &mem));
            }
            Request::Snapshot {
                id,
                mode,
                dir,
                measure_diff: _,
            } => {
                if behaviour == "snapshot_error" {
                    send(
                        &out,
                        &encode_json(&Event::Error {
                            id,
                            message: "cannot write snapshot: disk full".into(),
                        }),
                    );
                    continue;
                }
                if copying.lock().unwrap().is_some() {
                    send(
                        &out,
                        &encode_json(&Event::Error {
                            id,
                            message: "a live copy is already running".into(),
                        }),
                    );
                    continue;
                }
                if mode == SnapshotMode::Live {
                    let mut m = mem.lock().unwrap();
                    let state = format!("{{\"fake\": true, \"memory_bytes\": {}}}", m.size);
                    std::fs::write(format!("{dir}/vmstate"), state).unwrap();
                    let file = std::fs::File::create(format!("{dir}/memory")).unwrap();
                    file.set_len(m.size).unwrap();
                    let dirty_pages = m.dirty.len() as u64;
                    m.dirty.clear();
                    m.copying = true;
                    m.faults = 0;
                    let cancel = Arc::new(AtomicBool::new(false));
                    *copying.lock().unwrap() = Some((id, cancel.clone()));
                    send(
                        &out,
                        &encode_json(&Event::Snapshotted {
                            id,
                            pause_us: 250,
                            bytes_written: 0,
                            dirty_pages,
                            memory_bytes: m.size,
                        }),
                    );
                    let job = LiveCopyJob {
                        out: out.clone(),
                        id,
                        dir,
                        image: m.pages.clone(),
                        size: m.size,
                        rate_mibps,
                        cancel,
                        mem: mem.clone(),
                        copying: copying.clone(),
                        behaviour: behaviour.clone(),
                    };
                    std::thread::spawn(move || job.run());
                    continue;
                }
                if behaviour == "slow_snapshot" {
                    std::thread::sleep(Duration::from_secs(3));
                }
                let mut m = mem.lock().unwrap();
                let (bytes_written, dirty_pages) = write_snapshot(&mut m, mode, &dir);
                send(
                    &out,
                    &encode_json(&Event::Snapshotted {
                        id,
                        pause_us: 250,
                        bytes_written,
                        dirty_pages,
                        memory_bytes: m.size,
                    }),
                );
            }
            Request::Cancel { id } => {
                if let Some((cid, flag)) = &*copying.lock().unwrap() {
                    if *cid == id {
                        flag.store(true, Ordering::SeqCst);
                    }
                }
                if let Some((rid, flag)) = &*running.lock().unwrap() {
                    if *rid == id {
                        flag.store(true, Ordering::SeqCst);
                    }
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
                    message: "not supported by the fake".into(),
                }),
            ),
        }
    }
}

fn run_builtin(out: &Out, id: u64, argv: &[String], cancel: &AtomicBool, mem: &Mem) {
    let start = Instant::now();
    let mut cancelled = false;
    let exit_code = match argv[0].as_str() {
        "poke" => {
            let page: u64 = argv[1].parse().unwrap();
            let byte: u8 = argv[2].parse().unwrap();
            let mut m = mem.lock().unwrap();
            if byte == 0 {
                m.pages.remove(&page);
            } else {
                m.pages.insert(page, byte);
            }
            m.dirty.insert(page);
            if m.copying {
                m.faults += 1;
            }
            0
        }
        "peek" => {
            let page: u64 = argv[1].parse().unwrap();
            let b = mem.lock().unwrap().pages.get(&page).copied().unwrap_or(0);
            send(out, &encode_output(id, 1, format!("{b}\n").as_bytes()));
            0
        }
        "fail" => {
            send(out, &encode_output(id, 2, b"warm-up broke\n"));
            3
        }
        "echo" => {
            send(
                out,
                &encode_output(id, 1, format!("{}\n", argv[1..].join(" ")).as_bytes()),
            );
            0
        }
        "warn" => {
            send(out, &encode_output(id, 2, b"careful\n"));
            0
        }
        "exit" => argv[1].parse().unwrap(),
        "emit" => {
            let mut left: usize = argv[1].parse().unwrap();
            while left > 0 {
                let n = left.min(64 * 1024);
                send(out, &encode_output(id, 1, &vec![b'x'; n]));
                left -= n;
            }
            0
        }
        // `hold` is `sleep` that says when it has started.
        "sleep" | "hold" => {
            if argv[0] == "hold" {
                send(out, &encode_output(id, 1, b"held\n"));
            }
            let ms: u64 = argv[1].parse().unwrap();
            while start.elapsed() < Duration::from_millis(ms) {
                if cancel.load(Ordering::SeqCst) {
                    cancelled = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            if cancelled {
                -125
            } else {
                0
            }
        }
        "stubborn" => loop {
            std::thread::sleep(Duration::from_secs(1));
        },
        "crash" => {
            send(
                out,
                &encode_json(&Event::Exited {
                    reason: ExitReason::GuestCrash {
                        detail: "#PF page fault at rip=0x201234 cr2=0x0".into(),
                    },
                }),
            );
            std::process::exit(0);
        }
        _ => {
            send(out, &encode_output(id, 2, b"unknown builtin\n"));
            127
        }
    };
    send(
        out,
        &encode_json(&Event::ExecDone {
            id,
            exit_code,
            duration_us: start.elapsed().as_micros() as u64,
            cancelled,
            signal: None,
        }),
    );
}

// ------------------------------------------------------------- the daemon

struct Daemon {
    child: Option<Child>,
    port: u16,
    data: PathBuf,
    log: PathBuf,
    tmp: Option<tempfile::TempDir>,
}

static PORTS: AtomicU64 = AtomicU64::new(0);

fn free_port() -> u16 {
    PORTS.fetch_add(1, Ordering::SeqCst);
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Daemon {
    fn command(
        extra: &[&str],
        env: &[(&str, &str)],
        tmp: tempfile::TempDir,
    ) -> (Command, u16, tempfile::TempDir) {
        let port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_forkd"));
        cmd.arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(tmp.path().join("data"))
            .arg("--vmm-path")
            .arg(std::env::current_exe().unwrap())
            .args(extra)
            .env_remove("FORKD_TOKEN")
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        (cmd, port, tmp)
    }

    async fn start(extra: &[&str], env: &[(&str, &str)]) -> Daemon {
        Daemon::start_in(tempfile::tempdir().unwrap(), extra, env).await
    }

    /// SIGKILLs the daemon and starts a new one on the same data directory.
    async fn restart(mut self, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
        self.signal(libc::SIGKILL);
        self.wait(Duration::from_secs(5));
        let tmp = self.tmp.take().unwrap();
        Daemon::start_in(tmp, extra, env).await
    }

    async fn start_in(tmp: tempfile::TempDir, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
        let (mut cmd, port, tmp) = Daemon::command(extra, env, tmp);
        let log = tmp.path().join("forkd.log");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        cmd.stdout(f.try_clone().unwrap()).stderr(f);
        let child = cmd.spawn().unwrap();
        let mut d = Daemon {
            child: Some(child),
            port,
            data: tmp.path().join("data"),
            log,
            tmp: Some(tmp),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(ch) = d.try_channel().await {
                if health(ch, "").await == Some(1) {
                    break;
                }
            }
            if let Some(st) = d.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("daemon exited {st}:\n{}", d.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "daemon not healthy:\n{}",
                d.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        d
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn try_channel(&self) -> Result<Channel, tonic::transport::Error> {
        Channel::from_shared(format!("http://127.0.0.1:{}", self.port))
            .unwrap()
            .connect_timeout(Duration::from_millis(500))
            .connect()
            .await
    }

    async fn channel(&self) -> Channel {
        self.try_channel().await.unwrap()
    }

    async fn sandboxes(&self) -> SandboxServiceClient<Channel> {
        SandboxServiceClient::new(self.channel().await)
    }

    fn signal(&self, sig: i32) {
        let pid = self.child.as_ref().unwrap().id() as i32;
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    }

    /// Waits for the daemon to exit and returns its exit code.
    fn wait(&mut self, timeout: Duration) -> i32 {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                self.child = None;
                return st.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "daemon did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn sandbox_dirs(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.data.join("sandboxes"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn health(ch: Channel, service: &str) -> Option<i32> {
    let mut c = tonic_health::pb::health_client::HealthClient::new(ch);
    c.check(tonic_health::pb::HealthCheckRequest {
        service: service.into(),
    })
    .await
    .ok()
    .map(|r| r.into_inner().status)
}

fn alive(pid: u32) -> bool {
    // A reaped process has no /proc entry; a zombie would show state Z.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.contains(") Z "),
        Err(_) => false,
    }
}

async fn spawn(c: &mut SandboxServiceClient<Channel>, n: u32) -> Vec<pb::Sandbox> {
    c.spawn_sandboxes(pb::SpawnSandboxesRequest {
        n,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .sandboxes
}

struct ExecResult {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    exit: Option<pb::ExecExit>,
    status: Option<tonic::Status>,
}

async fn exec(
    c: &mut SandboxServiceClient<Channel>,
    id: &str,
    argv: &[&str],
    timeout_ms: u32,
) -> ExecResult {
    let mut r = ExecResult {
        stdout: vec![],
        stderr: vec![],
        exit: None,
        status: None,
    };
    let req = pb::ExecRequest {
        sandbox_id: id.into(),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        timeout_ms,
        ..Default::default()
    };
    let mut stream = match c.exec(req).await {
        Ok(s) => s.into_inner(),
        Err(s) => {
            r.status = Some(s);
            return r;
        }
    };
    loop {
        match stream.message().await {
            Ok(Some(m)) => match m.event.unwrap() {
                Ev::Stdout(b) => r.stdout.extend(b),
                Ev::Stderr(b) => r.stderr.extend(b),
                Ev::Exit(e) => r.exit = Some(e),
            },
            Ok(None) => return r,
            Err(s) => {
                r.status = Some(s);
                return r;
            }
        }
    }
}

fn code_of(r: &ExecResult) -> Code {
    r.status.as_ref().map(|s| s.code()).unwrap_or(Code::Ok)
}

// ---------------------------------------------------------------- tests

async fn lifecycle_and_exec() {
    let d = Daemon::start(&[], &[]).await;
    for name in ["", "forkd.v1.SandboxService", "forkd.v1.SnapshotService"] {
        assert_eq!(health(d.channel().await, name).await, Some(1), "{name}");
    }
    let mut c = d.sandboxes().await;

    let labels: HashMap<String, String> = [("team".to_string(), "a".to_string())].into();
    let resp = c
        .spawn_sandboxes(pb::SpawnSandboxesRequest {
            n: 3,
            labels: labels.clone(),
            live_fork: Some(true),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.sandboxes.len(), 3);
    assert!(resp.failures.is_empty());
    assert!(resp.elapsed_ms > 0.0);
    for s in &resp.sandboxes {
        assert!(s.id.starts_with("sb-") && s.id.len() == 13, "{}", s.id);
        assert_eq!(s.state, pb::SandboxState::Running as i32);
        assert_eq!((s.memory_mib, s.vcpus), (256, 2));
        assert!(s.live_fork && s.boot_ms > 0.0 && s.vmm_pid > 0);
        assert!(alive(s.vmm_pid));
        assert_eq!(s.labels, labels);
        assert!(d
            .data
            .join("sandboxes")
            .join(&s.id)
            .join("vmm.log")
            .is_file());
    }
    let other = spawn(&mut c, 1).await;
    let all = c
        .list_sandboxes(pb::ListSandboxesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .sandboxes;
    let ids: Vec<&str> = all.iter().map(|s| s.id.as_str()).collect();
    let mut expect: Vec<&str> = resp.sandboxes.iter().map(|s| s.id.as_str()).collect();
    expect.push(&other[0].id);
    assert_eq!(ids, expect, "oldest first");
    let team = c
        .list_sandboxes(pb::ListSandboxesRequest {
            label_selector: labels.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .sandboxes;
    assert_eq!(team.len(), 3);

    let id = resp.sandboxes[0].id.clone();
    let r = exec(&mut c, &id, &["echo", "hello", "world"], 0).await;
    assert_eq!(code_of(&r), Code::Ok);
    assert_eq!(r.stdout, b"hello world\n");
    assert_eq!(r.exit.unwrap().exit_code, 0);
    let r = exec(&mut c, &id, &["warn"], 0).await;
    assert_eq!(r.stderr, b"careful\n");
    let r = exec(&mut c, &id, &["exit", "3"], 0).await;
    assert_eq!(r.exit.unwrap().exit_code, 3);
    let r = exec(&mut c, &id, &["emit", "300000"], 0).await;
    assert_eq!(r.stdout.len(), 300000);

    // Timeout: cancelled, DEADLINE_EXCEEDED, sandbox still usable.
    let t = Instant::now();
    let r = exec(&mut c, &id, &["sleep", "10000"], 100).await;
    assert_eq!(code_of(&r), Code::DeadlineExceeded);
    assert_eq!(
        r.status.unwrap().message(),
        "command exceeded timeout_ms=100 and was stopped; the sandbox is still usable"
    );
    assert!(t.elapsed() < Duration::from_secs(3));
    assert_eq!(exec(&mut c, &id, &["echo", "ok"], 0).await.stdout, b"ok\n");

    // Execs queue in arrival order: once the first has said it runs, a
    // second one waits for it to end.
    let mut c2 = c.clone();
    let id2 = id.clone();
    let t = Instant::now();
    let mut slow = c
        .exec(pb::ExecRequest {
            sandbox_id: id.clone(),
            argv: vec!["hold".into(), "400".into()],
            timeout_ms: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = slow.message().await.unwrap().unwrap().event.unwrap();
    assert!(
        matches!(&first, Ev::Stdout(b) if b == b"held\n"),
        "{first:?}"
    );
    let fast = tokio::spawn(async move {
        let r = exec(&mut c2, &id2, &["echo", "x"], 0).await;
        (r.stdout, Instant::now())
    });
    let slow_code = match slow.message().await.unwrap().unwrap().event.unwrap() {
        Ev::Exit(e) => e.exit_code,
        other => panic!("expected the hold's exit, got {other:?}"),
    };
    let (fast_out, fast_end) = fast.await.unwrap();
    assert_eq!((slow_code, fast_out.as_slice()), (0, &b"x\n"[..]));
    // The echo ended after the 400 ms hold, which began after `t`.
    assert!(fast_end.duration_since(t) >= Duration::from_millis(400));

    // A client that goes away cancels its command.
    {
        let mut stream = c
            .exec(pb::ExecRequest {
                sandbox_id: id.clone(),
                argv: vec!["sleep".into(), "60000".into()],
                timeout_ms: 0,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let _ = tokio::time::timeout(Duration::from_millis(200), stream.message()).await;
    }
    let t = Instant::now();
    assert_eq!(
        exec(&mut c, &id, &["echo", "free"], 0).await.stdout,
        b"free\n"
    );
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());

    // Crash: in-flight exec ABORTED, sandbox FAILED, no process left.
    let victim = resp.sandboxes[1].clone();
    let r = exec(&mut c, &victim.id, &["crash"], 0).await;
    assert_eq!(code_of(&r), Code::Aborted);
    let msg = r.status.unwrap().message().to_string();
    assert_eq!(
        msg,
        format!(
            "sandbox {} stopped: guest crashed: #PF page fault at rip=0x201234 cr2=0x0",
            victim.id
        )
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let got = loop {
        let s = c
            .get_sandbox(pb::GetSandboxRequest {
                id: victim.id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .sandbox
            .unwrap();
        if s.vmm_pid == 0 || Instant::now() > deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(got.state, pb::SandboxState::Failed as i32);
    assert_eq!(got.vmm_pid, 0);
    assert_eq!(
        got.exit_reason,
        "guest crashed: #PF page fault at rip=0x201234 cr2=0x0"
    );
    assert!(!alive(victim.vmm_pid));
    let r = exec(&mut c, &victim.id, &["echo"], 0).await;
    assert_eq!(code_of(&r), Code::FailedPrecondition);
    assert!(r.status.unwrap().message().contains("DeleteSandbox"));
    let gone = c
        .delete_sandbox(pb::DeleteSandboxRequest {
            id: victim.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap();
    assert_eq!(gone.state, pb::SandboxState::Failed as i32);

    // Delete: process and directory gone, then NOT_FOUND.
    let target = resp.sandboxes[2].clone();
    let gone = c
        .delete_sandbox(pb::DeleteSandboxRequest {
            id: target.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap();
    assert_eq!(gone.id, target.id);
    assert_eq!(gone.state, pb::SandboxState::Running as i32);
    assert!(!alive(target.vmm_pid));
    assert!(!d.data.join("sandboxes").join(&target.id).exists());
    let err = c
        .get_sandbox(pb::GetSandboxRequest {
            id: target.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.message(), format!("sandbox {} not found", target.id));
    let err = c
        .delete_sandbox(pb::DeleteSandboxRequest {
            id: target.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

async fn validation() {
    let d = Daemon::start(&["--max-sandboxes", "2"], &[]).await;
    let mut c = d.sandboxes().await;
    let spawn_err = |req: pb::SpawnSandboxesRequest| {
        let mut c = c.clone();
        async move { c.spawn_sandboxes(req).await.unwrap_err() }
    };
    let base = || pb::SpawnSandboxesRequest {
        n: 1,
        ..Default::default()
    };
    let e = spawn_err(pb::SpawnSandboxesRequest { n: 0, ..base() }).await;
    assert_eq!(
        (e.code(), e.message()),
        (Code::InvalidArgument, "n must be between 1 and 1000, got 0")
    );
    let e = spawn_err(pb::SpawnSandboxesRequest {
        memory_mib: 1,
        ..base()
    })
    .await;
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = spawn_err(pb::SpawnSandboxesRequest { vcpus: 9, ..base() }).await;
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = spawn_err(pb::SpawnSandboxesRequest {
        labels: [("Bad".to_string(), "v".to_string())].into(),
        ..base()
    })
    .await;
    assert!(e.code() == Code::InvalidArgument && e.message().contains("\"Bad\""));
    let e = spawn_err(pb::SpawnSandboxesRequest {
        snapshot_tag: "base".into(),
        ..base()
    })
    .await;
    assert_eq!(
        (e.code(), e.message()),
        (Code::NotFound, "snapshot base not found")
    );
    let e = spawn_err(pb::SpawnSandboxesRequest { n: 3, ..base() }).await;
    assert_eq!(e.code(), Code::ResourceExhausted);

    let e = c
        .get_sandbox(pb::GetSandboxRequest { id: "".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let r = exec(&mut c, "sb-nope", &["echo"], 0).await;
    assert_eq!(code_of(&r), Code::NotFound);
    let sb = spawn(&mut c, 1).await.remove(0);
    let r = exec(&mut c, &sb.id, &[], 0).await;
    assert_eq!(code_of(&r), Code::InvalidArgument);
    let big = "x".repeat(70_000);
    let r = exec(&mut c, &sb.id, &["echo", &big], 0).await;
    assert_eq!(code_of(&r), Code::InvalidArgument);
    let e = c
        .branch_sandbox(pb::BranchSandboxRequest {
            sandbox_id: sb.id.clone(),
            mode: BranchMode::Live as i32,
            diff: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let mut snaps = SnapshotServiceClient::new(d.channel().await);
    assert!(snaps
        .list_snapshots(pb::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .snapshots
        .is_empty());
}

// ------------------------------------------------------------- snapshots

async fn poke(c: &mut SandboxServiceClient<Channel>, id: &str, page: u64, byte: u8) {
    let r = exec(c, id, &["poke", &page.to_string(), &byte.to_string()], 0).await;
    assert_eq!(r.exit.expect("poke ran").exit_code, 0);
}

async fn peek(c: &mut SandboxServiceClient<Channel>, id: &str, page: u64) -> u8 {
    let r = exec(c, id, &["peek", &page.to_string()], 0).await;
    String::from_utf8(r.stdout).unwrap().trim().parse().unwrap()
}

async fn branch(
    c: &mut SandboxServiceClient<Channel>,
    id: &str,
    tag: &str,
    mode: BranchMode,
) -> Result<pb::BranchSandboxResponse, tonic::Status> {
    branch_waiting(c, id, tag, mode, None).await
}

async fn branch_waiting(
    c: &mut SandboxServiceClient<Channel>,
    id: &str,
    tag: &str,
    mode: BranchMode,
    wait: Option<bool>,
) -> Result<pb::BranchSandboxResponse, tonic::Status> {
    c.branch_sandbox(pb::BranchSandboxRequest {
        sandbox_id: id.into(),
        tag: tag.into(),
        mode: mode as i32,
        wait,
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner())
}

async fn fork(
    c: &mut SandboxServiceClient<Channel>,
    tag: &str,
    n: u32,
) -> Result<Vec<pb::Sandbox>, tonic::Status> {
    c.spawn_sandboxes(pb::SpawnSandboxesRequest {
        snapshot_tag: tag.into(),
        n,
        ..Default::default()
    })
    .await
    .map(|r| {
        let r = r.into_inner();
        assert!(r.failures.is_empty(), "{:?}", r.failures);
        r.sandboxes
    })
}

async fn get_snapshot(s: &mut SnapshotServiceClient<Channel>, tag: &str) -> pb::Snapshot {
    s.get_snapshot(pb::GetSnapshotRequest { tag: tag.into() })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap()
}

async fn spawn_small(c: &mut SandboxServiceClient<Channel>) -> pb::Sandbox {
    c.spawn_sandboxes(pb::SpawnSandboxesRequest {
        n: 1,
        memory_mib: 36,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .sandboxes
    .remove(0)
}

async fn branch_fork_and_chains() {
    let d = Daemon::start(&[], &[]).await;
    let mut c = d.sandboxes().await;
    let mut s = SnapshotServiceClient::new(d.channel().await);
    let parent = spawn_small(&mut c).await;
    let pid = parent.id.clone();

    // DIFF needs a base; a cold-booted sandbox has none.
    let e = branch(&mut c, &pid, "", BranchMode::Diff)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(
        e.message(),
        format!("sandbox {pid} has no base snapshot: take a FULL branch first")
    );
    // Contradictions and bad tags.
    let e = c
        .branch_sandbox(pb::BranchSandboxRequest {
            sandbox_id: pid.clone(),
            mode: BranchMode::Full as i32,
            diff: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c
        .branch_sandbox(pb::BranchSandboxRequest {
            sandbox_id: pid.clone(),
            wait: Some(false),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(e.code() == Code::InvalidArgument && e.message().contains("LIVE only"));
    let e = branch(&mut c, &pid, "../x", BranchMode::Full)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // FULL: the fork sees the parent's memory.
    poke(&mut c, &pid, 3, 7).await;
    let r = branch(&mut c, &pid, "base", BranchMode::Full)
        .await
        .unwrap();
    let snap = r.snapshot.unwrap();
    assert_eq!(snap.status, SnapshotStatus::Ready as i32);
    assert_eq!(snap.mode, BranchMode::Full as i32);
    assert_eq!((snap.memory_mib, snap.vcpus), (36, 2));
    assert_eq!(snap.source_sandbox_id, pid);
    assert_eq!(snap.chain, ["base"]);
    assert_eq!((r.bytes_written, r.pause_ms), (4096, 0.25));
    assert!(d.data.join("snapshots/base/manifest.json").is_file());
    let e = branch(&mut c, &pid, "base", BranchMode::Full)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);

    let kids = fork(&mut c, "base", 3).await.unwrap();
    for k in &kids {
        assert_eq!(k.snapshot_tag, "base");
        assert_eq!((k.memory_mib, k.vcpus), (36, 2));
        assert_eq!(peek(&mut c, &k.id, 3).await, 7);
    }
    // A child's writes are its own.
    poke(&mut c, &kids[0].id, 3, 9).await;
    assert_eq!(peek(&mut c, &kids[1].id, 3).await, 7);
    assert_eq!(peek(&mut c, &pid, 3).await, 7);
    let base = get_snapshot(&mut s, "base").await;
    let mut kid_ids: Vec<String> = kids.iter().map(|k| k.id.clone()).collect();
    kid_ids.sort();
    assert_eq!(base.children, kid_ids);
    assert_eq!(base.memory_bytes, 4096);

    // DIFF (legacy flag) against the parent's base, then a page zeroed.
    poke(&mut c, &pid, 4, 5).await;
    let r = c
        .branch_sandbox(pb::BranchSandboxRequest {
            sandbox_id: pid.clone(),
            tag: "d1".into(),
            diff: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let d1 = r.snapshot.unwrap();
    assert_eq!(
        (d1.mode, d1.parent_tag.as_str()),
        (BranchMode::Diff as i32, "base")
    );
    assert_eq!(r.dirty_pages, 1);
    poke(&mut c, &pid, 3, 0).await;
    let r = branch(&mut c, &pid, "d2", BranchMode::Diff).await.unwrap();
    assert_eq!(r.snapshot.unwrap().chain, ["d2", "d1", "base"]);
    assert_eq!(r.bytes_written, 0, "the zeroed page is a hole");
    // A child of d2 branches DIFF against d2: depth 3.
    let k2 = fork(&mut c, "d2", 1).await.unwrap().remove(0);
    assert_eq!(
        (peek(&mut c, &k2.id, 3).await, peek(&mut c, &k2.id, 4).await),
        (0, 5)
    );
    poke(&mut c, &k2.id, 6, 1).await;
    let r = branch(&mut c, &k2.id, "d3", BranchMode::Diff)
        .await
        .unwrap();
    assert_eq!(r.snapshot.unwrap().chain, ["d3", "d2", "d1", "base"]);
    let k3 = fork(&mut c, "d3", 1).await.unwrap().remove(0);
    for (page, want) in [(3, 0), (4, 5), (6, 1)] {
        assert_eq!(peek(&mut c, &k3.id, page).await, want, "page {page}");
    }
    // The sandbox's base moved on: a DIFF of k2 is now against d3.
    let r = branch(&mut c, &k2.id, "", BranchMode::Diff).await.unwrap();
    let gen = r.snapshot.unwrap();
    assert!(gen.tag.starts_with("snap-"), "{}", gen.tag);
    assert_eq!(gen.parent_tag, "d3");
    assert_eq!(r.dirty_pages, 0);

    // Spawn checks.
    let e = c
        .spawn_sandboxes(pb::SpawnSandboxesRequest {
            snapshot_tag: "base".into(),
            n: 1,
            memory_mib: 256,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("memory_mib must be 0 or 36"),
        "{}",
        e.message()
    );

    // Get / List / Watch.
    let base = get_snapshot(&mut s, "base").await;
    assert_eq!(base.dependents, ["d1"]);
    let all = s
        .list_snapshots(pb::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .snapshots;
    let tags: Vec<&str> = all.iter().map(|m| m.tag.as_str()).collect();
    assert_eq!(tags, ["base", "d1", "d2", "d3", gen.tag.as_str()]);
    let failed = s
        .list_snapshots(pb::ListSnapshotsRequest {
            status: SnapshotStatus::Failed as i32,
        })
        .await
        .unwrap()
        .into_inner()
        .snapshots;
    assert!(failed.is_empty());
    let mut w = s
        .watch_snapshot(pb::WatchSnapshotRequest { tag: "d1".into() })
        .await
        .unwrap()
        .into_inner();
    let m = w.message().await.unwrap().unwrap();
    assert_eq!(
        (m.status, m.bytes_copied),
        (SnapshotStatus::Ready as i32, 4096)
    );
    assert!(
        w.message().await.unwrap().is_none(),
        "one message, then the end"
    );
    let e = s
        .watch_snapshot(pb::WatchSnapshotRequest { tag: "nope".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // Delete rules.
    let del = |tag: &str, cascade: bool, force: bool| pb::DeleteSnapshotRequest {
        tag: tag.into(),
        cascade,
        force,
    };
    let e = s
        .delete_snapshot(del("base", false, false))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("dependent diff snapshots (d1)"),
        "{}",
        e.message()
    );
    let e = s
        .delete_snapshot(del("base", true, false))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("running children"), "{}", e.message());
    let deleted = s
        .delete_snapshot(del(&gen.tag, false, false))
        .await
        .unwrap()
        .into_inner()
        .deleted_tags;
    assert_eq!(deleted, std::slice::from_ref(&gen.tag));
    let deleted = s
        .delete_snapshot(del("base", true, true))
        .await
        .unwrap()
        .into_inner()
        .deleted_tags;
    assert_eq!(deleted, ["d3", "d2", "d1", "base"]);
    assert!(!d.data.join("snapshots/base").exists());
    let e = fork(&mut c, "base", 1).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // Children keep running on their own memory.
    assert_eq!(peek(&mut c, &kids[1].id, 3).await, 7);
    // A DIFF against a deleted base is refused.
    let e = branch(&mut c, &pid, "", BranchMode::Diff)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("was deleted"), "{}", e.message());
}

async fn create_snapshot_and_data_loss() {
    let d = Daemon::start(&[], &[]).await;
    let mut c = d.sandboxes().await;
    let mut s = SnapshotServiceClient::new(d.channel().await);
    let warm = |tag: &str, argv: &[&str], keep: bool| pb::CreateSnapshotRequest {
        tag: tag.into(),
        memory_mib: 36,
        warmup: vec![pb::WarmupCommand {
            argv: argv.iter().map(|a| a.to_string()).collect(),
            timeout_ms: 0,
        }],
        keep_running: keep,
        ..Default::default()
    };
    let r = s
        .create_snapshot(warm("warm", &["poke", "2", "8"], false))
        .await
        .unwrap()
        .into_inner();
    let snap = r.snapshot.unwrap();
    assert_eq!(
        (snap.tag.as_str(), snap.status),
        ("warm", SnapshotStatus::Ready as i32)
    );
    assert!(r.sandbox_id.is_empty());
    let listed = c
        .list_sandboxes(pb::ListSandboxesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .sandboxes;
    assert!(listed.is_empty(), "the warm-up sandbox was deleted");
    let kid = fork(&mut c, "warm", 1).await.unwrap().remove(0);
    assert_eq!(peek(&mut c, &kid.id, 2).await, 8);

    let r = s
        .create_snapshot(warm("kept", &["poke", "2", "4"], true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(peek(&mut c, &r.sandbox_id, 2).await, 4);

    // A failing warm-up: FAILED_PRECONDITION, nothing left behind.
    let e = s
        .create_snapshot(warm("broken", &["fail"], false))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(
        e.message(),
        "warm-up command [\"fail\"] exited with code 3; stderr: warm-up broke; the sandbox was \
         deleted and no snapshot was taken"
    );
    let e = s
        .get_snapshot(pb::GetSnapshotRequest {
            tag: "broken".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(!d.data.join("snapshots/broken").exists());
    let e = s
        .create_snapshot(warm("warm", &["poke", "1", "1"], false))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);

    // One flipped byte: DATA_LOSS, and no child starts.
    s.create_snapshot(warm("flip", &["poke", "2", "8"], false))
        .await
        .unwrap();
    let mem = d.data.join("snapshots/flip/memory");
    let f = std::fs::OpenOptions::new().write(true).open(&mem).unwrap();
    f.write_all_at(&[9], 2 * PAGE + 100).unwrap();
    let before = c
        .list_sandboxes(pb::ListSandboxesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .sandboxes
        .len();
    let e = fork(&mut c, "flip", 5).await.unwrap_err();
    assert_eq!(e.code(), Code::DataLoss);
    assert!(
        e.message()
            .contains("snapshot flip is corrupt: memory chunk 0"),
        "{}",
        e.message()
    );
    let after = c
        .list_sandboxes(pb::ListSandboxesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .sandboxes
        .len();
    assert_eq!(before, after);
}

async fn restart_recovers_the_store() {
    let d = Daemon::start(&[], &[("FORKD_FAKE_VMM", "slow_snapshot")]).await;
    let mut c = d.sandboxes().await;
    let sb = spawn_small(&mut c).await;
    poke(&mut c, &sb.id, 1, 1).await;
    branch(&mut c, &sb.id, "kept", BranchMode::Full)
        .await
        .unwrap();
    // kill -9 in the middle of a FULL branch.
    let (mut c1, id) = (c.clone(), sb.id.clone());
    let pending = tokio::spawn(async move { branch(&mut c1, &id, "torn", BranchMode::Full).await });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(d.data.join("snapshots/.torn.writing").is_dir());
    let d = d.restart(&[], &[]).await;
    assert!(pending.await.unwrap().is_err());
    let log = d.log_text();
    assert!(log.contains("marked FAILED at recovery"), "{log}");

    let mut c = d.sandboxes().await;
    let mut s = SnapshotServiceClient::new(d.channel().await);
    let torn = get_snapshot(&mut s, "torn").await;
    assert_eq!(torn.status, SnapshotStatus::Failed as i32);
    assert_eq!(torn.failure_reason, "daemon stopped while writing");
    assert!(!d.data.join("snapshots/torn/memory").exists());
    let e = fork(&mut c, "torn", 1).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e
        .message()
        .contains("is FAILED (daemon stopped while writing)"));
    let ready = s
        .list_snapshots(pb::ListSnapshotsRequest {
            status: SnapshotStatus::Ready as i32,
        })
        .await
        .unwrap()
        .into_inner()
        .snapshots;
    assert_eq!(ready.len(), 1);
    assert_eq!(ready[0].tag, "kept");
    let kid = fork(&mut c, "kept", 2).await.unwrap().remove(0);
    assert_eq!(peek(&mut c, &kid.id, 1).await, 1);
}

async fn failed_branch_keeps_the_sandbox() {
    let d = Daemon::start(&[], &[("FORKD_FAKE_VMM", "snapshot_error")]).await;
    let mut c = d.sandboxes().await;
    let mut s = SnapshotServiceClient::new(d.channel().await);
    let sb = spawn_small(&mut c).await;
    let e = branch(&mut c, &sb.id, "x", BranchMode::Full)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Internal);
    assert!(e.message().contains("disk full"), "{}", e.message());
    let snap = get_snapshot(&mut s, "x").await;
    assert_eq!(snap.status, SnapshotStatus::Failed as i32);
    assert!(snap.failure_reason.contains("disk full"));
    assert_eq!(
        exec(&mut c, &sb.id, &["echo", "alive"], 0).await.stdout,
        b"alive\n"
    );
    let e = s
        .delete_snapshot(pb::DeleteSnapshotRequest {
            tag: "x".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(e.unwrap().into_inner().deleted_tags, ["x"]);
}

async fn ignored_cancel_fails_the_sandbox() {
    let d = Daemon::start(&[], &[]).await;
    let mut c = d.sandboxes().await;
    let sb = spawn(&mut c, 1).await.remove(0);
    let r = exec(&mut c, &sb.id, &["stubborn"], 50).await;
    assert_eq!(code_of(&r), Code::DeadlineExceeded);
    assert!(r.status.unwrap().message().contains("did not honor cancel"));
    let s = c
        .get_sandbox(pb::GetSandboxRequest { id: sb.id.clone() })
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap();
    assert_eq!(s.state, pb::SandboxState::Failed as i32);
    assert_eq!(s.exit_reason, "guest did not honor cancel");
}

// ------------------------------------------------------- Linux guests

const ASSUME_HV: &str = "FORKD_TEST_ASSUME_HYPERVISOR";

/// A fake image `name` (manifest plus dummy kernel and initrd) in
/// `images`.
fn make_image(images: &std::path::Path, name: &str, memory_mib: u32) {
    let dir = images.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("vmlinuz"), b"not really a kernel").unwrap();
    std::fs::write(dir.join("initrd"), b"not really an initramfs").unwrap();
    let manifest = serde_json::json!({
        "format": 1, "name": name,
        "kernel": {"path": "vmlinuz", "sha256": "00", "bytes": 19,
                   "release": "6.1.0-fake", "package": "linux-image-fake", "version": "1"},
        "initrd": {"path": "initrd", "sha256": "00", "bytes": 23},
        "kernel_args": "quiet", "memory_mib": memory_mib,
        "packages": ["python3"], "modules": [], "agent_sha256": "00",
        "input_digest": "00", "created": "2026-12-03T18:00:00Z"
    });
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
}

/// A daemon whose default images dir (`<data-dir>/images`) holds image
/// `debian` (384 MiB), on a host taken to be `hypervisor`.
async fn linux_daemon(hypervisor: &str) -> Daemon {
    let tmp = tempfile::tempdir().unwrap();
    make_image(&tmp.path().join("data/images"), "debian", 384);
    Daemon::start_in(tmp, &[], &[(ASSUME_HV, hypervisor)]).await
}

async fn spawn_image(c: &mut SandboxServiceClient<Channel>, image: &str) -> pb::Sandbox {
    c.spawn_sandboxes(pb::SpawnSandboxesRequest {
        n: 1,
        image: image.into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .sandboxes
    .remove(0)
}

async fn get(c: &mut SandboxServiceClient<Channel>, id: &str) -> pb::Sandbox {
    c.get_sandbox(pb::GetSandboxRequest { id: id.into() })
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap()
}

/// Runs a Linux Exec with env, cwd and stdin.
async fn exec_full(c: &mut SandboxServiceClient<Channel>, req: pb::ExecRequest) -> ExecResult {
    let mut r = ExecResult {
        stdout: vec![],
        stderr: vec![],
        exit: None,
        status: None,
    };
    let mut stream = match c.exec(req).await {
        Ok(s) => s.into_inner(),
        Err(s) => {
            r.status = Some(s);
            return r;
        }
    };
    loop {
        match stream.message().await {
            Ok(Some(m)) => match m.event.unwrap() {
                Ev::Stdout(b) => r.stdout.extend(b),
                Ev::Stderr(b) => r.stderr.extend(b),
                Ev::Exit(e) => r.exit = Some(e),
            },
            Ok(None) => return r,
            Err(s) => {
                r.status = Some(s);
                return r;
            }
        }
    }
}

async fn read_console(
    c: &mut SandboxServiceClient<Channel>,
    id: &str,
    tail_bytes: u32,
) -> Result<pb::ReadConsoleResponse, tonic::Status> {
    c.read_console(pb::ReadConsoleRequest {
        sandbox_id: id.into(),
        tail_bytes,
    })
    .await
    .map(|r| r.into_inner())
}

async fn linux_spawn_and_console() {
    let d = linux_daemon("svm").await;
    let mut c = d.sandboxes().await;

    // The image's memory is the default; the guest's boot timing is kept.
    let sb = spawn_image(&mut c, "debian").await;
    assert_eq!(sb.state, pb::SandboxState::Running as i32);
    assert_eq!((sb.image.as_str(), sb.memory_mib), ("debian", 384));
    let boot = sb.guest_boot.expect("guest_boot");
    assert_eq!((boot.kernel_ms, boot.init_ms), (800.0, 45.5));
    let explicit = c
        .spawn_sandboxes(pb::SpawnSandboxesRequest {
            n: 2,
            image: "debian".into(),
            memory_mib: 1024,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .sandboxes;
    assert!(explicit
        .iter()
        .all(|s| s.memory_mib == 1024 && s.image == "debian"));

    // The reference guest is unchanged beside it.
    let reference = spawn(&mut c, 1).await.remove(0);
    assert_eq!((reference.image.as_str(), reference.guest_boot), ("", None));

    // Validation, then the lookup.
    let spawn_err = |req: pb::SpawnSandboxesRequest| {
        let mut c = c.clone();
        async move { c.spawn_sandboxes(req).await.unwrap_err() }
    };
    let e = spawn_err(pb::SpawnSandboxesRequest {
        n: 1,
        image: "debian".into(),
        snapshot_tag: "base".into(),
        ..Default::default()
    })
    .await;
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("not both"), "{}", e.message());
    let e = spawn_err(pb::SpawnSandboxesRequest {
        n: 1,
        image: "../etc".into(),
        ..Default::default()
    })
    .await;
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = spawn_err(pb::SpawnSandboxesRequest {
        n: 1,
        image: "ubuntu".into(),
        ..Default::default()
    })
    .await;
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert_eq!(
        e.message(),
        "image \"ubuntu\" not found in <data-dir>/images; build it with 'forkd image build \
         ubuntu'"
    );

    // The console: what the kernel printed, its command line included.
    let con = read_console(&mut c, &sb.id, 0).await.unwrap();
    let text = String::from_utf8(con.data).unwrap();
    assert!(
        text.contains(&format!("Command line: forkd.hostname={} quiet\n", sb.id)),
        "{text}"
    );
    assert!(!con.truncated);
    let r = exec(&mut c, &sb.id, &["console", "100"], 0).await;
    assert_eq!(r.exit.unwrap().exit_code, 0);
    let con = read_console(&mut c, &sb.id, 32).await.unwrap();
    assert_eq!(con.data.len(), 32);
    assert!(con.data.ends_with(b"console line 99\n"));
    assert!(con.truncated);
    let e = read_console(&mut c, &sb.id, (1 << 20) + 1)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = read_console(&mut c, &reference.id, 0).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("no serial console"), "{}", e.message());
    let e = read_console(&mut c, "sb-nope", 0).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    // Deleting removes the console with the sandbox directory.
    let dir = d.data.join("sandboxes").join(&sb.id);
    assert!(dir.join("console.log").is_file());
    c.delete_sandbox(pb::DeleteSandboxRequest { id: sb.id.clone() })
        .await
        .unwrap();
    assert!(!dir.exists());
}

async fn linux_exec() {
    let d = linux_daemon("svm").await;
    let mut c = d.sandboxes().await;
    let sb = spawn_image(&mut c, "debian").await;
    let req = |argv: &[&str]| pb::ExecRequest {
        sandbox_id: sb.id.clone(),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };

    // env (sorted by key) and cwd reach the guest.
    let r = exec_full(
        &mut c,
        pb::ExecRequest {
            env: [("B".into(), "2".into()), ("A".into(), "x=1".into())].into(),
            cwd: "/tmp".into(),
            ..req(&["env"])
        },
    )
    .await;
    assert_eq!(code_of(&r), Code::Ok, "{:?}", r.status);
    assert_eq!(r.stdout, b"A=x=1\nB=2\ncwd=/tmp\n");
    let r = exec(&mut c, &sb.id, &["env"], 0).await;
    assert_eq!(r.stdout, b"cwd=/\n");

    // stdin of several input frames comes back whole.
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let r = exec_full(
        &mut c,
        pb::ExecRequest {
            stdin: data.clone(),
            ..req(&["cat"])
        },
    )
    .await;
    assert_eq!(r.exit.map(|e| e.exit_code), Some(0));
    assert!(
        r.stdout == data,
        "stdin came back as {} bytes",
        r.stdout.len()
    );

    // Bad fields are INVALID_ARGUMENT, saying what to fix.
    for (bad, says) in [
        (
            pb::ExecRequest {
                env: [("A=B".into(), "v".into())].into(),
                ..req(&["env"])
            },
            "'='",
        ),
        (
            pb::ExecRequest {
                env: [("".into(), "v".into())].into(),
                ..req(&["env"])
            },
            "must not be empty",
        ),
        (
            pb::ExecRequest {
                cwd: "tmp".into(),
                ..req(&["env"])
            },
            "not absolute",
        ),
        (
            pb::ExecRequest {
                stdin: vec![0; (1 << 20) + 1],
                ..req(&["cat"])
            },
            "1 MiB",
        ),
        (req(&["env", "a\0b"]), "NUL"),
    ] {
        let r = exec_full(&mut c, bad).await;
        let s = r.status.expect("an error");
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
        assert!(s.message().contains(says), "{}", s.message());
    }

    // Several commands at once: the first waits for the second.
    let mut waiting = c.exec(req(&["wait-for", "g1"])).await.unwrap().into_inner();
    let first = waiting.message().await.unwrap().unwrap().event.unwrap();
    assert!(
        matches!(&first, Ev::Stdout(b) if b == b"waiting g1\n"),
        "{first:?}"
    );
    let t = Instant::now();
    let r = exec(&mut c, &sb.id, &["release", "g1"], 0).await;
    assert_eq!(r.exit.map(|e| e.exit_code), Some(0));
    match waiting.message().await.unwrap().unwrap().event.unwrap() {
        Ev::Exit(e) => assert_eq!(e.exit_code, 0, "wait-for was not released"),
        other => panic!("expected the exit, got {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(5));

    // A signal: exit code 128 + n.
    let r = exec(&mut c, &sb.id, &["kill", "15"], 0).await;
    let exit = r.exit.unwrap();
    assert_eq!((exit.signal, exit.exit_code), (15, 143));
    let r = exec(&mut c, &sb.id, &["fail"], 0).await;
    let exit = r.exit.unwrap();
    assert_eq!(
        (exit.signal, exit.exit_code, r.stderr.as_slice()),
        (0, 2, &b"oops\n"[..])
    );

    // A program the agent cannot start.
    let r = exec(&mut c, &sb.id, &["nope"], 0).await;
    let s = r.status.unwrap();
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    assert!(
        s.message().contains("No such file or directory"),
        "{}",
        s.message()
    );

    // timeout_ms: DEADLINE_EXCEEDED, the sandbox stays usable.
    let r = exec(&mut c, &sb.id, &["sleep", "60000"], 100).await;
    assert_eq!(code_of(&r), Code::DeadlineExceeded, "{:?}", r.status);
    let r = exec(&mut c, &sb.id, &["env"], 0).await;
    assert_eq!(r.stdout, b"cwd=/\n");

    // The reference guest refuses the Linux-only fields.
    let reference = spawn(&mut c, 1).await.remove(0);
    for bad in [
        pb::ExecRequest {
            env: [("A".into(), "1".into())].into(),
            ..Default::default()
        },
        pb::ExecRequest {
            cwd: "/".into(),
            ..Default::default()
        },
        pb::ExecRequest {
            stdin: b"x".to_vec(),
            ..Default::default()
        },
    ] {
        let r = exec_full(
            &mut c,
            pb::ExecRequest {
                sandbox_id: reference.id.clone(),
                argv: vec!["echo".into()],
                ..bad
            },
        )
        .await;
        let s = r.status.expect("an error");
        assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
        assert_eq!(
            s.message(),
            "the reference guest runs builtins only; env, cwd and stdin need a Linux image"
        );
    }
}

async fn linux_guest_reset() {
    let d = linux_daemon("svm").await;
    let mut c = d.sandboxes().await;
    let sb = spawn_image(&mut c, "debian").await;
    let r = exec(&mut c, &sb.id, &["panic"], 0).await;
    assert_eq!(code_of(&r), Code::Aborted, "{:?}", r.status);
    let s = get(&mut c, &sb.id).await;
    assert_eq!(s.state, pb::SandboxState::Failed as i32);
    assert!(
        s.exit_reason.starts_with(
            "guest reset: the guest kernel reset the machine; Kernel panic - not syncing: \
                 Attempted to kill init! exitcode=0x0000000b; console tail:\n"
        ),
        "{}",
        s.exit_reason
    );
    assert!(
        s.exit_reason.contains("Linux version 6.1.0-fake"),
        "{}",
        s.exit_reason
    );
    assert!(
        s.exit_reason.ends_with("---[ end Kernel panic ]---"),
        "{}",
        s.exit_reason
    );
    // The daemon keeps serving.
    let other = spawn_image(&mut c, "debian").await;
    let r = exec(&mut c, &other.id, &["env"], 0).await;
    assert_eq!(r.stdout, b"cwd=/\n");
}

async fn linux_host_checks() {
    let d = linux_daemon("pvm").await;
    let mut c = d.sandboxes().await;
    let t = Instant::now();
    for image in ["debian", "ubuntu"] {
        let e = c
            .spawn_sandboxes(pb::SpawnSandboxesRequest {
                n: 1,
                image: image.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert_eq!(
            e.message(),
            "Linux guests need hardware virtualization (Intel VMX or AMD SVM); this host's KVM \
             is kvm-pvm (KVM-PVM runs ring-0 guest code ~1000x slower). Run 'forkd doctor' for \
             details."
        );
    }
    assert!(t.elapsed() < Duration::from_secs(2));
    // Validation comes first.
    let e = c
        .spawn_sandboxes(pb::SpawnSandboxesRequest {
            n: 1,
            image: "debian".into(),
            snapshot_tag: "base".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(d.sandbox_dirs().is_empty());
    // The reference guest is unaffected.
    let sb = spawn(&mut c, 1).await.remove(0);
    assert_eq!(
        exec(&mut c, &sb.id, &["echo", "hi"], 0).await.stdout,
        b"hi\n"
    );
}

async fn linux_boot_failures() {
    // A guest that resets while booting: its console is quoted once.
    let tmp = tempfile::tempdir().unwrap();
    make_image(&tmp.path().join("data/images"), "debian", 384);
    let env = [(ASSUME_HV, "svm"), ("FORKD_FAKE_VMM", "linux_boot_panic")];
    let d = Daemon::start_in(tmp, &[], &env).await;
    let mut c = d.sandboxes().await;
    let e = c
        .spawn_sandboxes(pb::SpawnSandboxesRequest {
            n: 1,
            image: "debian".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Internal, "{e:?}");
    let m = e.message();
    assert!(
        m.contains("guest reset: the guest kernel reset the machine; console tail:\n"),
        "{m}"
    );
    assert!(m.contains("VFS: Unable to mount root fs"), "{m}");
    assert_eq!(m.matches("console tail").count(), 1, "{m}");
    assert!(d.sandbox_dirs().is_empty());
    drop(d);

    // A guest that never answers: --linux-boot-timeout, then the console.
    let tmp = tempfile::tempdir().unwrap();
    make_image(&tmp.path().join("data/images"), "debian", 384);
    let env = [(ASSUME_HV, "svm"), ("FORKD_FAKE_VMM", "linux_boot_hang")];
    let d = Daemon::start_in(tmp, &["--linux-boot-timeout", "1"], &env).await;
    let mut c = d.sandboxes().await;
    let t = Instant::now();
    let e = c
        .spawn_sandboxes(pb::SpawnSandboxesRequest {
            n: 1,
            image: "debian".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(10));
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    let m = e.message();
    assert!(m.contains("within 1 s"), "{m}");
    assert!(m.contains("waiting for the root device"), "{m}");
    assert!(d.sandbox_dirs().is_empty());
}

async fn boot_failure() {
    let d = Daemon::start(&[], &[("FORKD_FAKE_VMM", "boot_fail")]).await;
    let mut c = d.sandboxes().await;
    let e = c
        .spawn_sandboxes(pb::SpawnSandboxesRequest {
            n: 2,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Internal);
    assert!(
        e.message().contains("VMM failed: cannot open /dev/kvm"),
        "{}",
        e.message()
    );
    assert!(e.message().contains("vmm.log: fake-vmm"), "{}", e.message());
    assert!(d.sandbox_dirs().is_empty());
    assert!(c
        .list_sandboxes(pb::ListSandboxesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .sandboxes
        .is_empty());
}

async fn auth() {
    let d = Daemon::start(&[], &[("FORKD_TOKEN", "t0ken")]).await;
    let mut c = d.sandboxes().await;
    let e = c
        .list_sandboxes(pb::ListSandboxesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("authorization: Bearer <token>"));
    assert_eq!(health(d.channel().await, "").await, Some(1));
    let mut req = tonic::Request::new(pb::ListSandboxesRequest::default());
    req.metadata_mut()
        .insert("authorization", "Bearer wrong".parse().unwrap());
    assert_eq!(
        c.list_sandboxes(req).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let mut req = tonic::Request::new(pb::ListSandboxesRequest::default());
    req.metadata_mut()
        .insert("authorization", "Bearer t0ken".parse().unwrap());
    assert!(c.list_sandboxes(req).await.is_ok());
}

async fn refuses_to_start_async() {
    refuses_to_start()
}

fn refuses_to_start() {
    // Non-loopback without a token.
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_forkd"))
        .args(["serve", "--listen", "0.0.0.0:0", "--data-dir"])
        .arg(tmp.path())
        .arg("--vmm-path")
        .arg(std::env::current_exe().unwrap())
        .env_remove("FORKD_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("without authentication"), "{err}");
}

async fn data_dir_lock() {
    let d = Daemon::start(&[], &[]).await;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_forkd"));
    cmd.args(["serve", "--listen", &format!("127.0.0.1:{}", free_port())])
        .arg("--data-dir")
        .arg(&d.data)
        .arg("--vmm-path")
        .arg(std::env::current_exe().unwrap());
    let out = cmd.output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another forkd daemon"), "{err}");
}

async fn reflection_and_unix_socket() {
    use tonic_reflection::pb::{v1, v1alpha};
    let sock = tempfile::tempdir().unwrap();
    let path = sock.path().join("forkd.sock");
    let d = Daemon::start(&["--listen-unix", path.to_str().unwrap()], &[]).await;

    let want = [
        "forkd.v1.SandboxService",
        "forkd.v1.SnapshotService",
        "grpc.health.v1.Health",
    ];
    let req = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut client = v1::server_reflection_client::ServerReflectionClient::new(d.channel().await);
    let mut stream = client
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        stream.message().await.unwrap().unwrap().message_response
    else {
        panic!("v1 reflection did not list services");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for w in want {
        assert!(names.iter().any(|n| n == w), "v1 lacks {w}: {names:?}");
    }
    let req = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                "forkd.v1.SandboxService".into(),
            ),
        ),
    };
    let mut client =
        v1alpha::server_reflection_client::ServerReflectionClient::new(d.channel().await);
    let mut stream = client
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap().message_response;
    assert!(
        matches!(
            resp,
            Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(_))
        ),
        "{resp:?}"
    );

    // The same services on the Unix socket.
    let p = path.clone();
    let ch = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let p = p.clone();
            async move {
                let s = tokio::net::UnixStream::connect(p).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await
        .unwrap();
    let mut c = SandboxServiceClient::new(ch.clone());
    let sb = spawn(&mut c, 1).await.remove(0);
    let r = exec(&mut c, &sb.id, &["echo", "unix"], 0).await;
    assert_eq!(r.stdout, b"unix\n");
    let mut tcp = d.sandboxes().await;
    let listed = tcp
        .list_sandboxes(pb::ListSandboxesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .sandboxes;
    assert_eq!(listed.len(), 1, "one registry behind both listeners");
    assert_eq!(health(ch, "").await, Some(1));
}

async fn graceful_shutdown() {
    let mut d = Daemon::start(&["--drain-grace", "1"], &[]).await;
    let mut watch = tonic_health::pb::health_client::HealthClient::new(d.channel().await)
        .watch(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(watch.message().await.unwrap().unwrap().status, 1);
    let mut c = d.sandboxes().await;
    let sbs = spawn(&mut c, 3).await;
    let pids: Vec<u32> = sbs.iter().map(|s| s.vmm_pid).collect();
    let id = sbs[0].id.clone();
    let mut c1 = c.clone();
    let running = tokio::spawn(async move { exec(&mut c1, &id, &["sleep", "1500"], 0).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    d.signal(libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Draining: health says NOT_SERVING, new calls are refused.
    assert_eq!(health(d.channel().await, "").await, Some(2));
    let e = c
        .list_sandboxes(pb::ListSandboxesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert_eq!(
        e.message(),
        "forkd is shutting down; retry on another instance"
    );
    // The in-flight exec finishes normally.
    let r = running.await.unwrap();
    assert_eq!(code_of(&r), Code::Ok, "{:?}", r.status);
    assert_eq!(r.exit.unwrap().exit_code, 0);
    // The health Watch saw NOT_SERVING, then ended: it does not hold the
    // shutdown up.
    assert_eq!(watch.message().await.unwrap().unwrap().status, 2);
    let end = watch.message().await.unwrap_err();
    assert_eq!(end.code(), Code::Unavailable);
    assert_eq!(d.wait(Duration::from_secs(5)), 0, "{}", d.log_text());
    for pid in pids {
        assert!(!alive(pid), "VMM {pid} survived");
    }
    assert!(d.sandbox_dirs().is_empty());
}

async fn caller_timeout_during_shutdown_is_bounded() {
    // An exec longer than --shutdown-timeout is abandoned, and its VMM still
    // goes away.
    let mut d = Daemon::start(&["--shutdown-timeout", "1"], &[]).await;
    let mut c = d.sandboxes().await;
    let sb = spawn(&mut c, 1).await.remove(0);
    let id = sb.id.clone();
    let mut c1 = c.clone();
    let running = tokio::spawn(async move { exec(&mut c1, &id, &["stubborn"], 0).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    d.signal(libc::SIGINT);
    assert_eq!(d.wait(Duration::from_secs(20)), 0, "{}", d.log_text());
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    assert!(!alive(sb.vmm_pid));
    assert!(d.sandbox_dirs().is_empty());
    let r = running.await.unwrap();
    assert_ne!(code_of(&r), Code::Ok);
}

// ------------------------------------------------------------ LIVE branches

/// 36 MiB guests copy in about 1 s at 36 MiB/s, 3 s at 12 MiB/s.
const FAST_COPY: &str = "36";
const SLOW_COPY: &str = "12";

async fn live(
    c: &mut SandboxServiceClient<Channel>,
    id: &str,
    tag: &str,
    wait: Option<bool>,
) -> Result<pb::BranchSandboxResponse, tonic::Status> {
    branch_waiting(c, id, tag, BranchMode::Live, wait).await
}

/// Every WatchSnapshot message until the stream ends (bounded at 20 s).
async fn watch_all(
    s: &mut SnapshotServiceClient<Channel>,
    tag: &str,
) -> Vec<pb::WatchSnapshotResponse> {
    let mut stream = s
        .watch_snapshot(pb::WatchSnapshotRequest { tag: tag.into() })
        .await
        .unwrap()
        .into_inner();
    let mut all = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.message()).await {
            Ok(Ok(Some(m))) => all.push(m),
            Ok(Ok(None)) => return all,
            Ok(Err(e)) => panic!("watch {tag} failed: {e:?} after {all:?}"),
            Err(_) => panic!("watch {tag} did not end: {all:?}"),
        }
    }
}

fn final_of(msgs: &[pb::WatchSnapshotResponse]) -> (SnapshotStatus, String) {
    let last = msgs.last().expect("at least one message");
    (
        SnapshotStatus::try_from(last.status).unwrap(),
        last.failure_reason.clone(),
    )
}

async fn fork_waiting(
    c: &mut SandboxServiceClient<Channel>,
    tag: &str,
    wait_for_snapshot: bool,
) -> Result<Vec<pb::Sandbox>, tonic::Status> {
    c.spawn_sandboxes(pb::SpawnSandboxesRequest {
        snapshot_tag: tag.into(),
        n: 1,
        wait_for_snapshot,
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner().sandboxes)
}

async fn live_branch_flow() {
    let d = Daemon::start(&["--live-copy-rate-mibps", FAST_COPY], &[]).await;
    let mut c = d.sandboxes().await;
    let mut s = SnapshotServiceClient::new(d.channel().await);
    let id = spawn_small(&mut c).await.id;
    poke(&mut c, &id, 3, 7).await;

    // wait=true (the default): READY; commands run during the copy, and a
    // FULL branch queues behind it.
    let t = Instant::now();
    let (mut c1, id1) = (c.clone(), id.clone());
    let l1 = tokio::spawn(async move { live(&mut c1, &id1, "l1", None).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let e = Instant::now();
    poke(&mut c, &id, 3, 8).await;
    assert!(
        e.elapsed() < Duration::from_millis(300),
        "exec waited for the copy: {:?}",
        e.elapsed()
    );
    let f = Instant::now();
    let f1 = branch(&mut c, &id, "f1", BranchMode::Full).await.unwrap();
    assert!(
        f.elapsed() >= Duration::from_millis(300),
        "the FULL branch did not queue behind the copy: {:?}",
        f.elapsed()
    );
    assert_eq!(
        get_snapshot(&mut s, "l1").await.status,
        SnapshotStatus::Ready as i32,
        "l1 was READY before the queued branch ran"
    );
    let r = l1.await.unwrap().unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(800),
        "{:?}",
        t.elapsed()
    );
    let snap = r.snapshot.unwrap();
    assert_eq!(
        (snap.status, snap.mode),
        (SnapshotStatus::Ready as i32, BranchMode::Live as i32)
    );
    assert_eq!(snap.chain, ["l1"]);
    assert_eq!((r.pause_ms, r.bytes_written), (0.25, 4096));
    assert_eq!(r.faults_served, 1, "the poke during the copy");
    assert_eq!(f1.snapshot.unwrap().status, SnapshotStatus::Ready as i32);
    let k = fork(&mut c, "l1", 1).await.unwrap().remove(0);
    assert_eq!(peek(&mut c, &k.id, 3).await, 7, "memory as at the pause");
    let k = fork(&mut c, "f1", 1).await.unwrap().remove(0);
    assert_eq!(peek(&mut c, &k.id, 3).await, 8);

    // wait=false: WRITING at once; Get/List show it; forks need
    // wait_for_snapshot; Watch streams progress, then READY.
    poke(&mut c, &id, 3, 9).await;
    let t = Instant::now();
    let r = live(&mut c, &id, "l2", Some(false)).await.unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    let snap = r.snapshot.unwrap();
    assert_eq!(
        (snap.status, snap.mode),
        (SnapshotStatus::Writing as i32, BranchMode::Live as i32)
    );
    assert_eq!((r.pause_ms, r.faults_served), (0.25, 0));
    poke(&mut c, &id, 3, 10).await;
    assert_eq!(
        get_snapshot(&mut s, "l2").await.status,
        SnapshotStatus::Writing as i32
    );
    let writing = s
        .list_snapshots(pb::ListSnapshotsRequest {
            status: SnapshotStatus::Writing as i32,
        })
        .await
        .unwrap()
        .into_inner()
        .snapshots;
    assert_eq!(writing.len(), 1);
    assert_eq!(writing[0].tag, "l2");
    let e = fork_waiting(&mut c, "l2", false).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        // "(NN% copied)" appears once the first progress report is in.
        e.message().starts_with("snapshot l2 is still WRITING")
            && e.message().contains("set wait_for_snapshot=true"),
        "{}",
        e.message()
    );
    let mut c2 = c.clone();
    let waiting = tokio::spawn(async move { fork_waiting(&mut c2, "l2", true).await });
    let msgs = watch_all(&mut s, "l2").await;
    assert_eq!(msgs[0].status, SnapshotStatus::Writing as i32);
    let (status, _) = final_of(&msgs);
    assert_eq!(status, SnapshotStatus::Ready);
    let progress: Vec<u64> = msgs[..msgs.len() - 1]
        .iter()
        .map(|m| {
            assert_eq!(m.status, SnapshotStatus::Writing as i32);
            m.bytes_copied
        })
        .collect();
    assert!(progress.len() >= 3, "{msgs:?}");
    assert!(
        progress.windows(2).all(|w| w[0] < w[1]),
        "only changes are sent: {progress:?}"
    );
    let last = msgs.last().unwrap();
    assert_eq!((last.bytes_copied, last.bytes_total), (36 << 20, 36 << 20));
    assert_eq!(last.faults_served, 1);
    let kid = waiting.await.unwrap().unwrap().remove(0);
    assert_eq!(peek(&mut c, &kid.id, 3).await, 9, "memory as at the pause");
    // A late watcher: READY at once, then the end.
    let msgs = watch_all(&mut s, "l2").await;
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].status, SnapshotStatus::Ready as i32);

    // The base moved to l2 at the pause: a DIFF holds what changed since.
    poke(&mut c, &id, 5, 1).await;
    let r = branch(&mut c, &id, "d1", BranchMode::Diff).await.unwrap();
    let d1 = r.snapshot.unwrap();
    assert_eq!(d1.chain, ["d1", "l2"]);
    assert_eq!(r.dirty_pages, 2);
    let k = fork(&mut c, "d1", 1).await.unwrap().remove(0);
    assert_eq!(
        (peek(&mut c, &k.id, 3).await, peek(&mut c, &k.id, 5).await),
        (10, 1)
    );

    // A second LIVE branch queues behind the first copy.
    live(&mut c, &id, "l3", Some(false)).await.unwrap();
    let r = live(&mut c, &id, "l4", Some(false)).await.unwrap();
    assert_eq!(r.snapshot.unwrap().status, SnapshotStatus::Writing as i32);
    assert_eq!(
        get_snapshot(&mut s, "l3").await.status,
        SnapshotStatus::Ready as i32
    );
    assert_eq!(
        final_of(&watch_all(&mut s, "l4").await).0,
        SnapshotStatus::Ready
    );
}

async fn live_cancel_and_source_death() {
    let d = Daemon::start(&["--live-copy-rate-mibps", SLOW_COPY], &[]).await;
    let mut c = d.sandboxes().await;
    let mut s = SnapshotServiceClient::new(d.channel().await);
    let id = spawn_small(&mut c).await.id;
    let del = |tag: &str| pb::DeleteSnapshotRequest {
        tag: tag.into(),
        ..Default::default()
    };

    // DeleteSnapshot of a WRITING LIVE snapshot cancels its copy.
    live(&mut c, &id, "c1", Some(false)).await.unwrap();
    let mut s1 = s.clone();
    let watcher = tokio::spawn(async move { watch_all(&mut s1, "c1").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    let deleted = s.delete_snapshot(del("c1")).await.unwrap().into_inner();
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(deleted.deleted_tags, ["c1"]);
    let e = s
        .get_snapshot(pb::GetSnapshotRequest { tag: "c1".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(!d.data.join("snapshots/c1").exists());
    assert!(!d.data.join("snapshots/.c1.writing").exists());
    let msgs = watcher.await.unwrap();
    assert_eq!(
        final_of(&msgs),
        (
            SnapshotStatus::Failed,
            "cancelled: snapshot deleted".to_string()
        )
    );
    assert_eq!(exec(&mut c, &id, &["echo", "up"], 0).await.stdout, b"up\n");

    // A caller waiting for READY gets ABORTED; a fork waiting for it gets
    // FAILED_PRECONDITION with the reason.
    let (mut c1, id1) = (c.clone(), id.clone());
    let waiting = tokio::spawn(async move { live(&mut c1, &id1, "c2", None).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut c2 = c.clone();
    let fork = tokio::spawn(async move { fork_waiting(&mut c2, "c2", true).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.delete_snapshot(del("c2")).await.unwrap();
    let e = waiting.await.unwrap().unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (
            Code::Aborted,
            "snapshot c2 is FAILED: cancelled: snapshot deleted"
        )
    );
    let e = fork.await.unwrap().unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message()
            .contains("c2 is FAILED (cancelled: snapshot deleted)"),
        "{}",
        e.message()
    );
    // The sandbox's epoch ended at the pause: no DIFF before a FULL.
    let e = branch(&mut c, &id, "", BranchMode::Diff).await.unwrap_err();
    assert!(e.message().contains("no base snapshot"), "{}", e.message());

    // The source crashes mid-copy.
    let (mut c1, id1) = (c.clone(), id.clone());
    let waiting = tokio::spawn(async move { live(&mut c1, &id1, "k1", None).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = exec(&mut c, &id, &["crash"], 0).await;
    assert_eq!(code_of(&r), Code::Aborted);
    let e = waiting.await.unwrap().unwrap_err();
    let reason = format!(
        "source sandbox {id} stopped during the live copy: guest crashed: #PF page fault at \
         rip=0x201234 cr2=0x0"
    );
    assert_eq!(
        (e.code(), e.message()),
        (
            Code::Aborted,
            format!("snapshot k1 is FAILED: {reason}").as_str()
        )
    );
    let k1 = get_snapshot(&mut s, "k1").await;
    assert_eq!(
        (k1.status, k1.failure_reason.as_str()),
        (SnapshotStatus::Failed as i32, reason.as_str())
    );

    // The source's VMM is SIGKILLed mid-copy.
    let sb = spawn_small(&mut c).await;
    live(&mut c, &sb.id, "k2", Some(false)).await.unwrap();
    // SAFETY: kill(2) on the fake VMM's pid.
    assert_eq!(unsafe { libc::kill(sb.vmm_pid as i32, libc::SIGKILL) }, 0);
    let (status, reason) = final_of(&watch_all(&mut s, "k2").await);
    assert_eq!(status, SnapshotStatus::Failed);
    assert!(
        reason.starts_with(&format!(
            "source sandbox {} stopped during the live copy: VMM exited without reporting why",
            sb.id
        )),
        "{reason}"
    );

    // DeleteSandbox mid-copy.
    let sb = spawn_small(&mut c).await;
    live(&mut c, &sb.id, "k3", Some(false)).await.unwrap();
    c.delete_sandbox(pb::DeleteSandboxRequest { id: sb.id.clone() })
        .await
        .unwrap();
    let (status, reason) = final_of(&watch_all(&mut s, "k3").await);
    assert_eq!(
        (status, reason),
        (
            SnapshotStatus::Failed,
            format!(
                "source sandbox {} stopped during the live copy: shut down on request",
                sb.id
            )
        )
    );
    assert!(!d.data.join("snapshots/k3/memory").exists());
}

async fn live_copy_failures() {
    // The VMM reports a failed copy.
    let d = Daemon::start(
        &["--live-copy-rate-mibps", FAST_COPY],
        &[("FORKD_FAKE_VMM", "copy_error")],
    )
    .await;
    let mut c = d.sandboxes().await;
    let mut s = SnapshotServiceClient::new(d.channel().await);
    let id = spawn_small(&mut c).await.id;
    let e = live(&mut c, &id, "bad", None).await.unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (
            Code::Internal,
            "snapshot bad is FAILED: the VMM could not copy memory: writing memory: No space left \
             on device"
        )
    );
    let bad = get_snapshot(&mut s, "bad").await;
    assert_eq!(bad.status, SnapshotStatus::Failed as i32);
    assert!(!d.data.join("snapshots/bad/memory").exists());
    assert_eq!(exec(&mut c, &id, &["echo", "up"], 0).await.stdout, b"up\n");
    drop(d);

    // A VMM that ignores the cancel is failed and killed; the delete goes
    // through.
    let d = Daemon::start(
        &["--live-copy-rate-mibps", SLOW_COPY],
        &[("FORKD_FAKE_VMM", "copy_ignores_cancel")],
    )
    .await;
    let mut c = d.sandboxes().await;
    let mut s = SnapshotServiceClient::new(d.channel().await);
    let sb = spawn_small(&mut c).await;
    live(&mut c, &sb.id, "stuck", Some(false)).await.unwrap();
    let deleted = s
        .delete_snapshot(pb::DeleteSnapshotRequest {
            tag: "stuck".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.deleted_tags, ["stuck"]);
    let got = c
        .get_sandbox(pb::GetSandboxRequest { id: sb.id.clone() })
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap();
    assert_eq!(got.state, pb::SandboxState::Failed as i32);
    assert_eq!(
        got.exit_reason,
        "VMM did not stop the live copy of snapshot stuck when cancelled"
    );
    assert!(!alive(sb.vmm_pid));
}

async fn live_copy_across_restart_and_shutdown() {
    // kill -9 of the daemon mid-copy: FAILED after the restart, never READY.
    let d = Daemon::start(&["--live-copy-rate-mibps", SLOW_COPY], &[]).await;
    let mut c = d.sandboxes().await;
    let sb = spawn_small(&mut c).await;
    live(&mut c, &sb.id, "torn", Some(false)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(d.data.join("snapshots/.torn.writing").is_dir());
    let d = d.restart(&[], &[]).await;
    let mut s = SnapshotServiceClient::new(d.channel().await);
    let torn = get_snapshot(&mut s, "torn").await;
    assert_eq!(
        (torn.status, torn.failure_reason.as_str(), torn.mode),
        (
            SnapshotStatus::Failed as i32,
            "daemon stopped while writing",
            BranchMode::Live as i32
        )
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(sb.vmm_pid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!alive(sb.vmm_pid), "the orphaned VMM exits");
    drop(d);

    // SIGTERM: a copy that ends within --shutdown-timeout is kept READY.
    let mut d = Daemon::start(&["--live-copy-rate-mibps", FAST_COPY], &[]).await;
    let mut c = d.sandboxes().await;
    let sb = spawn_small(&mut c).await;
    poke(&mut c, &sb.id, 2, 6).await;
    live(&mut c, &sb.id, "kept", Some(false)).await.unwrap();
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait(Duration::from_secs(10)), 0, "{}", d.log_text());
    let d = Daemon::start_in(d.tmp.take().unwrap(), &[], &[]).await;
    let mut c = d.sandboxes().await;
    let mut s = SnapshotServiceClient::new(d.channel().await);
    assert_eq!(
        get_snapshot(&mut s, "kept").await.status,
        SnapshotStatus::Ready as i32
    );
    let kid = fork(&mut c, "kept", 1).await.unwrap().remove(0);
    assert_eq!(peek(&mut c, &kid.id, 2).await, 6);
    drop(d);

    // ...and one that would outlast it is cancelled: FAILED.
    let mut d = Daemon::start(
        &[
            "--live-copy-rate-mibps",
            SLOW_COPY,
            "--shutdown-timeout",
            "1",
        ],
        &[],
    )
    .await;
    let mut c = d.sandboxes().await;
    let sb = spawn_small(&mut c).await;
    live(&mut c, &sb.id, "cut", Some(false)).await.unwrap();
    let t = Instant::now();
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait(Duration::from_secs(10)), 0, "{}", d.log_text());
    assert!(
        t.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t.elapsed()
    );
    assert!(!alive(sb.vmm_pid));
    let d = Daemon::start_in(d.tmp.take().unwrap(), &[], &[]).await;
    let mut s = SnapshotServiceClient::new(d.channel().await);
    let cut = get_snapshot(&mut s, "cut").await;
    assert_eq!(
        (cut.status, cut.failure_reason.as_str()),
        (SnapshotStatus::Failed as i32, "cancelled: forkd shut down")
    );
}

/// `forkd_sandboxes_expired_total` from a `--metrics-listen` endpoint.
fn expired_total(port: u16) -> u64 {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("forkd_sandboxes_expired_total "))
        .unwrap_or_else(|| panic!("no expired counter in {text}"))
        .trim()
        .parse()
        .unwrap()
}

async fn expiry_deletes_and_counts() {
    let metrics = free_port();
    let listen = format!("127.0.0.1:{metrics}");
    let mut d = Daemon::start(
        &[
            "--metrics-listen",
            &listen,
            "--max-ttl",
            "30",
            "--default-ttl",
            "20",
        ],
        &[],
    )
    .await;
    let mut c = d.sandboxes().await;
    let spawned = c
        .spawn_sandboxes(pb::SpawnSandboxesRequest {
            n: 2,
            ttl_seconds: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .sandboxes;
    let (doomed, kept) = (&spawned[0], &spawned[1]);
    assert!(doomed.expire_time.is_some() && kept.expire_time.is_some());
    let cleared = c
        .set_sandbox_ttl(pb::SetSandboxTtlRequest {
            sandbox_id: kept.id.clone(),
            ttl_seconds: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap();
    assert_eq!(cleared.expire_time, None);
    // The default applies to a spawn without a ttl; the maximum is enforced.
    let defaulted = spawn(&mut c, 1).await.remove(0);
    assert!(defaulted.expire_time.is_some());
    let e = c
        .set_sandbox_ttl(pb::SetSandboxTtlRequest {
            sandbox_id: kept.id.clone(),
            ttl_seconds: 31,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("--max-ttl 30"), "{}", e.message());
    let e = c
        .set_sandbox_ttl(pb::SetSandboxTtlRequest {
            sandbox_id: "sb-0000000000".into(),
            ttl_seconds: 5,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = c
            .get_sandbox(pb::GetSandboxRequest {
                id: doomed.id.clone(),
            })
            .await;
        match r {
            Err(e) if e.code() == Code::NotFound => break,
            Err(e) => panic!("{e}"),
            Ok(_) => {}
        }
        assert!(
            Instant::now() < deadline,
            "never expired:\n{}",
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t = Instant::now();
    while alive(doomed.vmm_pid) && t.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !alive(doomed.vmm_pid),
        "VMM of the expired sandbox survived"
    );
    assert!(!d.sandbox_dirs().contains(&doomed.id));
    assert_eq!(expired_total(metrics), 1);
    assert!(d.log_text().contains("sandbox expired"), "{}", d.log_text());
    assert_eq!(
        get(&mut c, &kept.id).await.state,
        pb::SandboxState::Running as i32
    );
    // A pending deadline does not hold up the shutdown.
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait(Duration::from_secs(10)), 0, "{}", d.log_text());
    assert!(!alive(kept.vmm_pid) && !alive(defaulted.vmm_pid));
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--control-fd") {
        fake_vmm(&args);
    }
    let filter = args.get(1).filter(|a| !a.starts_with('-')).cloned();
    let rt = tokio::runtime::Runtime::new().unwrap();
    type Test = (
        &'static str,
        Box<dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>>,
    );
    /// `(name, test)` for each async test fn named.
    macro_rules! tests {
        ($($name:ident),* $(,)?) => {
            vec![$((
                stringify!($name).trim_end_matches("_async"),
                Box::new(|| {
                    Box::pin($name()) as std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>
                }) as Box<dyn Fn() -> _>,
            )),*]
        };
    }
    let tests: Vec<Test> = tests![
        lifecycle_and_exec,
        validation,
        branch_fork_and_chains,
        create_snapshot_and_data_loss,
        restart_recovers_the_store,
        failed_branch_keeps_the_sandbox,
        ignored_cancel_fails_the_sandbox,
        boot_failure,
        auth,
        refuses_to_start_async,
        data_dir_lock,
        reflection_and_unix_socket,
        graceful_shutdown,
        caller_timeout_during_shutdown_is_bounded,
        live_branch_flow,
        live_cancel_and_source_death,
        live_copy_failures,
        live_copy_across_restart_and_shutdown,
        linux_spawn_and_console,
        linux_exec,
        linux_guest_reset,
        linux_host_checks,
        linux_boot_failures,
        linux_files_upload_and_meta,
        linux_files_download_memory,
        linux_files_cut_off,
        linux_files_errors,
        expiry_deletes_and_counts,
    ];
    let mut failed = 0;
    for (name, test) in &tests {
        if filter.as_deref().is_some_and(|f| !name.contains(f)) {
            continue;
        }
        let t = Instant::now();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rt.block_on(test())));
        match result {
            Ok(()) => println!("test {name} ... ok ({:.1} s)", t.elapsed().as_secs_f64()),
            Err(_) => {
                println!("test {name} ... FAILED");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        println!("{failed} test(s) failed");
        std::process::exit(1);
    }
}
