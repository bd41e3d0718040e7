//! Starts a private `forkd` daemon for the benchmarks and stops it again.
//!
//! The daemon listens on a free loopback port and keeps its state in a
//! temporary directory; its stdout and stderr go to `forkd.log` beside that
//! data directory, and the tail of the log is shown when it fails to start.

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// A running daemon owned by the benchmark. Dropping it kills the daemon.
pub struct Daemon {
    child: Option<Child>,
    addr: SocketAddr,
    pid: u32,
    log: PathBuf,
    // Removed on drop; holds the data directory and the log.
    dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts `forkd serve` (plus `extra_args`) and waits until
    /// grpc.health.v1 reports SERVING for the whole server (service ""), or
    /// fails after `timeout`.
    pub async fn start(forkd: &Path, extra_args: &[String], timeout: Duration) -> Result<Daemon> {
        let forkd = forkd.canonicalize().with_context(|| {
            format!(
                "forkd binary {} not found (build it with \
                     `cargo build --release -p forkd -p forkd-vmm`)",
                forkd.display()
            )
        })?;
        let dir = tempfile::Builder::new()
            .prefix("forkd-bench-")
            .tempdir()
            .context("creating a temporary directory for the daemon")?;
        let data_dir = dir.path().join("data");
        std::fs::create_dir(&data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        let log = dir.path().join("forkd.log");
        let log_file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let addr = free_loopback_port()?;

        let child = Command::new(&forkd)
            .arg("serve")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(&data_dir)
            .args(extra_args)
            // The benchmark's daemon is private and on loopback: no token.
            .env_remove("FORKD_TOKEN")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().context("duplicating the log fd")?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {}", forkd.display()))?;
        let pid = child.id();
        let mut daemon = Daemon {
            child: Some(child),
            addr,
            pid,
            log,
            dir,
        };
        if let Err(e) = daemon.wait_serving(timeout).await {
            // Keep the log for a post-mortem.
            daemon.keep_files();
            bail!(
                "forkd did not become healthy: {e:#}\n{}",
                daemon.log_tail(30)
            );
        }
        Ok(daemon)
    }

    async fn wait_serving(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last_err: String;
        loop {
            if let Some(status) = self.try_wait()? {
                bail!("forkd exited during start-up with {status}");
            }
            match self.health_once().await {
                Ok(ServingStatus::Serving) => return Ok(()),
                Ok(other) => last_err = format!("health status {other:?}"),
                Err(e) => last_err = format!("{e:#}"),
            }
            if Instant::now() >= deadline {
                bail!(
                    "not SERVING after {:.1} s (last: {last_err})",
                    timeout.as_secs_f64()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn health_once(&self) -> Result<ServingStatus> {
        let channel = Endpoint::from_shared(self.url())?
            .connect_timeout(Duration::from_millis(500))
            .timeout(Duration::from_secs(2))
            .connect()
            .await?;
        let resp = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await?;
        Ok(ServingStatus::try_from(resp.into_inner().status).unwrap_or(ServingStatus::Unknown))
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The directory holding the data directory and the log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Leaves the data directory and the log on disk when the daemon is
    /// dropped.
    pub fn keep_files(&mut self) {
        self.dir.disable_cleanup(true);
    }

    /// One new HTTP/2 connection to the daemon.
    pub async fn connect(&self) -> Result<Channel> {
        Endpoint::from_shared(self.url())?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("connecting to forkd at {}", self.addr))
    }

    /// Fails when the daemon has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.try_wait()? {
            bail!("forkd exited with {status}\n{}", self.log_tail(30));
        }
        Ok(())
    }

    fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(child) => child.try_wait().context("waiting on forkd"),
            None => Ok(None),
        }
    }

    /// The last `lines` lines of the daemon's log, indented.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let tail = &all[all.len().saturating_sub(lines)..];
        if tail.is_empty() {
            return format!("(log {} is empty)", self.log.display());
        }
        let mut s = format!("last lines of {}:\n", self.log.display());
        for l in tail {
            s.push_str("  | ");
            s.push_str(l);
            s.push('\n');
        }
        s
    }

    /// Sends SIGTERM and waits up to `grace` for the daemon to exit, then
    /// SIGKILLs it. Returns how it ended and how long that took.
    pub async fn stop(&mut self, grace: Duration) -> Result<Shutdown> {
        let Some(mut child) = self.child.take() else {
            bail!("daemon already stopped");
        };
        if let Some(status) = child.try_wait()? {
            return Ok(Shutdown {
                status,
                elapsed: Duration::ZERO,
                killed: false,
                was_dead: true,
            });
        }
        let start = Instant::now();
        signal(self.pid, libc::SIGTERM).context("sending SIGTERM to forkd")?;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(Shutdown {
                    status,
                    elapsed: start.elapsed(),
                    killed: false,
                    was_dead: false,
                });
            }
            if start.elapsed() >= grace {
                let _ = child.kill();
                let status = child.wait()?;
                return Ok(Shutdown {
                    status,
                    elapsed: start.elapsed(),
                    killed: true,
                    was_dead: false,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// How the daemon ended.
#[derive(Debug)]
pub struct Shutdown {
    /// Its exit status.
    pub status: ExitStatus,
    /// From SIGTERM until it was reaped.
    pub elapsed: Duration,
    /// Whether it ignored SIGTERM for the whole grace period.
    pub killed: bool,
    /// Whether it had already exited before SIGTERM.
    pub was_dead: bool,
}

/// Sends `sig` to `pid`.
pub fn signal(pid: u32, sig: libc::c_int) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(std::io::Error::other)?;
    // SAFETY: kill(2) has no memory-safety preconditions.
    if unsafe { libc::kill(pid, sig) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A loopback address whose port was free a moment ago.
fn free_loopback_port() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
    Ok(listener.local_addr()?)
}
