//! A real `forkd` daemon for one scenario: started on a free loopback port
//! with a temporary data directory and this executable as its VMM, its
//! output in `forkd.log` there; killed when dropped.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use forkd_api::v1::sandbox_service_client::SandboxServiceClient;
use tonic::transport::Channel;

/// A running `forkd serve` (its child process) and its directories.
pub struct Daemon {
    child: Option<Child>,
    port: u16,
    /// `--data-dir`.
    pub data: PathBuf,
    log: PathBuf,
    /// Holds `data` and the log; taken to start a new daemon on them.
    pub tmp: Option<tempfile::TempDir>,
}

static PORTS: AtomicU64 = AtomicU64::new(0);

/// A loopback TCP port nobody listens on (at the moment of asking).
pub fn free_port() -> u16 {
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

    /// `forkd serve` with `extra` flags and `env`, once it is healthy.
    pub async fn start(extra: &[&str], env: &[(&str, &str)]) -> Daemon {
        Daemon::start_in(tempfile::tempdir().unwrap(), extra, env).await
    }

    /// SIGKILLs the daemon and starts a new one on the same data directory.
    pub async fn restart(mut self, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
        self.signal(libc::SIGKILL);
        self.wait(Duration::from_secs(5));
        let tmp = self.tmp.take().unwrap();
        Daemon::start_in(tmp, extra, env).await
    }

    /// As [`Daemon::start`], with its data directory in `tmp`.
    pub async fn start_in(tmp: tempfile::TempDir, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
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

    /// What the daemon has logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn try_channel(&self) -> Result<Channel, tonic::transport::Error> {
        Channel::from_shared(format!("http://127.0.0.1:{}", self.port))
            .unwrap()
            .connect_timeout(Duration::from_millis(500))
            .connect()
            .await
    }

    /// A gRPC channel to the daemon's TCP listener.
    pub async fn channel(&self) -> Channel {
        self.try_channel().await.unwrap()
    }

    /// A SandboxService client on a new channel.
    pub async fn sandboxes(&self) -> SandboxServiceClient<Channel> {
        SandboxServiceClient::new(self.channel().await)
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends signal `sig` to the daemon.
    pub fn signal(&self, sig: i32) {
        let pid = self.pid() as i32;
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    }

    /// Waits for the daemon to exit and returns its exit code.
    pub fn wait(&mut self, timeout: Duration) -> i32 {
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

    /// The names in `<data-dir>/sandboxes`, sorted.
    pub fn sandbox_dirs(&self) -> Vec<String> {
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

/// grpc.health.v1 Check of `service` ("" for the server): its status, or
/// `None` if the call failed.
pub async fn health(ch: Channel, service: &str) -> Option<i32> {
    let mut c = tonic_health::pb::health_client::HealthClient::new(ch);
    c.check(tonic_health::pb::HealthCheckRequest {
        service: service.into(),
    })
    .await
    .ok()
    .map(|r| r.into_inner().status)
}

/// Whether process `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    // A reaped process has no /proc entry; a zombie would show state Z.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.contains(") Z "),
        Err(_) => false,
    }
}
