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
//! a VMM that fails before Ready.

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forkd_api::v1 as pb;
use forkd_control::{encode_json, encode_output, read_request, Event, ExitReason, Request};
use pb::exec_response::Event as Ev;
use pb::sandbox_service_client::SandboxServiceClient;
use pb::snapshot_service_client::SnapshotServiceClient;
use tonic::transport::Channel;
use tonic::Code;

// ---------------------------------------------------------------- fake VMM

type Out = Arc<Mutex<UnixStream>>;
/// The running exec's id and cancel flag.
type Running = Arc<Mutex<Option<(u64, Arc<AtomicBool>)>>>;

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
    let _: u32 = arg("--memory-mib").parse().unwrap();
    let _: u32 = arg("--vcpus").parse().unwrap();
    let id = arg("--id");
    // SAFETY: fd 3 is the control socket the daemon handed us.
    let sock = unsafe { UnixStream::from_raw_fd(fd) };
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
    send(&out, &encode_json(&Event::Ready { boot_us: 1234 }));
    let running: Running = Arc::default();
    loop {
        let req = match read_request(&mut input) {
            Ok(r) => r,
            Err(_) => std::process::exit(0), // EOF: the daemon is gone
        };
        match req {
            Request::Ping { id } => send(&out, &encode_json(&Event::Pong { id })),
            Request::Exec { id, argv } => {
                let cancel = Arc::new(AtomicBool::new(false));
                *running.lock().unwrap() = Some((id, cancel.clone()));
                let out = out.clone();
                std::thread::spawn(move || run_builtin(&out, id, &argv, &cancel));
            }
            Request::Cancel { id } => {
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

fn run_builtin(out: &Out, id: u64, argv: &[String], cancel: &AtomicBool) {
    let start = Instant::now();
    let mut cancelled = false;
    let exit_code = match argv[0].as_str() {
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
        "sleep" => {
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
        }),
    );
}

// ------------------------------------------------------------- the daemon

struct Daemon {
    child: Option<Child>,
    port: u16,
    data: PathBuf,
    log: PathBuf,
    _tmp: tempfile::TempDir,
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
    fn command(extra: &[&str], env: &[(&str, &str)]) -> (Command, u16, tempfile::TempDir) {
        let tmp = tempfile::tempdir().unwrap();
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
        let (mut cmd, port, tmp) = Daemon::command(extra, env);
        let log = tmp.path().join("forkd.log");
        let f = std::fs::File::create(&log).unwrap();
        cmd.stdout(f.try_clone().unwrap()).stderr(f);
        let child = cmd.spawn().unwrap();
        let mut d = Daemon {
            child: Some(child),
            port,
            data: tmp.path().join("data"),
            log,
            _tmp: tmp,
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

    // Execs queue in arrival order.
    let (mut c1, mut c2) = (c.clone(), c.clone());
    let (id1, id2) = (id.clone(), id.clone());
    let t = Instant::now();
    let slow = tokio::spawn(async move {
        let r = exec(&mut c1, &id1, &["sleep", "400"], 0).await;
        (r.exit.unwrap().exit_code, Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let fast = tokio::spawn(async move {
        let r = exec(&mut c2, &id2, &["echo", "x"], 0).await;
        (r.stdout, Instant::now())
    });
    let (slow_code, slow_end) = slow.await.unwrap();
    let (fast_out, fast_end) = fast.await.unwrap();
    assert_eq!((slow_code, fast_out.as_slice()), (0, &b"x\n"[..]));
    assert!(fast_end >= slow_end && t.elapsed() >= Duration::from_millis(400));

    // A client that goes away cancels its command.
    {
        let mut stream = c
            .exec(pb::ExecRequest {
                sandbox_id: id.clone(),
                argv: vec!["sleep".into(), "60000".into()],
                timeout_ms: 0,
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
    assert_eq!(e.code(), Code::Unimplemented);
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
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented);
    let mut snaps = SnapshotServiceClient::new(d.channel().await);
    let e = snaps
        .list_snapshots(pb::ListSnapshotsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented);
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
    let tests: Vec<Test> = vec![
        (
            "lifecycle_and_exec",
            Box::new(|| Box::pin(lifecycle_and_exec())),
        ),
        ("validation", Box::new(|| Box::pin(validation()))),
        (
            "ignored_cancel_fails_the_sandbox",
            Box::new(|| Box::pin(ignored_cancel_fails_the_sandbox())),
        ),
        ("boot_failure", Box::new(|| Box::pin(boot_failure()))),
        ("auth", Box::new(|| Box::pin(auth()))),
        (
            "refuses_to_start",
            Box::new(|| Box::pin(async { refuses_to_start() })),
        ),
        ("data_dir_lock", Box::new(|| Box::pin(data_dir_lock()))),
        (
            "reflection_and_unix_socket",
            Box::new(|| Box::pin(reflection_and_unix_socket())),
        ),
        (
            "graceful_shutdown",
            Box::new(|| Box::pin(graceful_shutdown())),
        ),
        (
            "caller_timeout_during_shutdown_is_bounded",
            Box::new(|| Box::pin(caller_timeout_during_shutdown_is_bounded())),
        ),
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
