//! What every benchmark shares: the daemon connection, spawn/delete/exec
//! helpers, and a list of anomalies worth reporting.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use forkd_api::v1::sandbox_service_client::SandboxServiceClient;
use forkd_api::v1::snapshot_service_client::SnapshotServiceClient;
use forkd_api::v1::{
    exec_response, BranchMode, BranchSandboxRequest, BranchSandboxResponse, CreateSnapshotRequest,
    DeleteSandboxRequest, DeleteSnapshotRequest, ExecRequest, GetSnapshotRequest,
    ListSandboxesRequest, ListSnapshotsRequest, Sandbox, Snapshot, SpawnSandboxesRequest,
    SpawnSandboxesResponse, WarmupCommand,
};
use tonic::transport::Channel;
use tonic::Request;

use crate::procfs;

/// Label key put on every sandbox the benchmarks spawn, so that leftovers
/// can be found and removed even when an RPC failed half-way.
pub const LABEL_KEY: &str = "forkd-bench";

/// gRPC's customary default for the largest message a client accepts.
pub const DEFAULT_GRPC_MAX_MESSAGE: usize = 4 << 20;

/// The sandbox service client with generous limits (the throughput
/// benchmark reports chunk sizes instead of failing on them).
pub type Client = SandboxServiceClient<Channel>;

/// Shape of the sandboxes the benchmarks spawn.
#[derive(Clone, Copy, Debug)]
pub struct GuestShape {
    /// Guest RAM in MiB; 0 lets the daemon choose (256).
    pub memory_mib: u32,
    /// vCPUs; 0 lets the daemon choose (2).
    pub vcpus: u32,
    /// Guest RAM in 2 MiB huge pages (cold boots only; children take their
    /// snapshot's page size).
    pub huge_pages: bool,
}

/// Shared state of one benchmark run.
pub struct Ctx {
    /// One persistent HTTP/2 connection to the daemon.
    pub channel: Channel,
    /// The daemon's pid (for its memory figures).
    pub daemon_pid: u32,
    /// Guest shape for every spawn.
    pub shape: GuestShape,
    /// Deadline of one SpawnSandboxes call.
    pub spawn_timeout: Duration,
    /// A directory on the daemon's data filesystem the benchmarks may write
    /// scratch files to.
    pub scratch: PathBuf,
    /// How the benchmark's daemon was started (for benchmarks that start
    /// a second one).
    pub daemon_cmd: DaemonCmd,
    observations: Mutex<Vec<String>>,
    vmm_pids: Mutex<Vec<u32>>,
}

/// A `forkd serve` command line.
#[derive(Clone, Debug, Default)]
pub struct DaemonCmd {
    /// The forkd binary.
    pub forkd: PathBuf,
    /// Extra arguments after `serve`.
    pub args: Vec<String>,
    /// Bound on its start-up.
    pub timeout: Duration,
}

/// What one Exec returned.
#[derive(Clone, Debug, Default)]
pub struct ExecOutcome {
    /// Stdout bytes received.
    pub stdout_bytes: u64,
    /// Stdout, when captured.
    pub stdout: Vec<u8>,
    /// Stderr (always captured).
    pub stderr: Vec<u8>,
    /// The exit code.
    pub exit_code: i32,
    /// Guest-side duration reported by the daemon.
    pub duration_us: u64,
    /// Stream messages carrying output.
    pub chunks: u64,
    /// Largest output chunk, bytes.
    pub max_chunk: usize,
}

impl Ctx {
    /// A context over `channel`.
    pub fn new(
        channel: Channel,
        daemon_pid: u32,
        shape: GuestShape,
        spawn_timeout: Duration,
        scratch: PathBuf,
    ) -> Ctx {
        Ctx {
            channel,
            daemon_pid,
            shape,
            spawn_timeout,
            scratch,
            daemon_cmd: DaemonCmd::default(),
            observations: Mutex::new(Vec::new()),
            vmm_pids: Mutex::new(Vec::new()),
        }
    }

    /// Records how the daemon was started.
    pub fn with_daemon_cmd(mut self, cmd: DaemonCmd) -> Ctx {
        self.daemon_cmd = cmd;
        self
    }

    /// A client on the shared connection.
    pub fn client(&self) -> Client {
        SandboxServiceClient::new(self.channel.clone())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    /// Records something that looked wrong in the daemon or VMM.
    pub fn observe(&self, what: impl Into<String>) {
        let what = what.into();
        eprintln!("  ! {what}");
        let mut obs = self.observations.lock().unwrap();
        if !obs.contains(&what) {
            obs.push(what);
        }
    }

    /// Everything recorded with [`Ctx::observe`].
    pub fn observations(&self) -> Vec<String> {
        self.observations.lock().unwrap().clone()
    }

    /// Every VMM pid seen in a spawn response.
    pub fn vmm_pids(&self) -> Vec<u32> {
        self.vmm_pids.lock().unwrap().clone()
    }

    /// A snapshot service client on the shared connection.
    pub fn snapshots(&self) -> SnapshotServiceClient<Channel> {
        SnapshotServiceClient::new(self.channel.clone())
    }

    /// SpawnSandboxes(n) labelled with `bench`, timed on the client.
    /// Partial failures are recorded as observations; an empty result is an
    /// error.
    pub async fn spawn(&self, bench: &str, n: u32) -> Result<(SpawnSandboxesResponse, Duration)> {
        self.spawn_with(bench, n, "", self.shape).await
    }

    /// SpawnSandboxes(n) of children of snapshot `tag` (the snapshot fixes
    /// the guest's shape).
    pub async fn spawn_from(
        &self,
        bench: &str,
        tag: &str,
        n: u32,
    ) -> Result<(SpawnSandboxesResponse, Duration)> {
        let shape = GuestShape {
            memory_mib: 0,
            vcpus: 0,
            huge_pages: false,
        };
        self.spawn_with(bench, n, tag, shape).await
    }

    /// SpawnSandboxes: cold boots of `shape` when `tag` is empty, else
    /// children of that snapshot.
    pub async fn spawn_with(
        &self,
        bench: &str,
        n: u32,
        tag: &str,
        shape: GuestShape,
    ) -> Result<(SpawnSandboxesResponse, Duration)> {
        let mut req = Request::new(SpawnSandboxesRequest {
            snapshot_tag: tag.to_string(),
            n,
            live_fork: None,
            memory_mib: shape.memory_mib,
            vcpus: shape.vcpus,
            labels: HashMap::from([(LABEL_KEY.to_string(), bench.to_string())]),
            wait_for_snapshot: false,
            huge_pages: shape.huge_pages,
            ..Default::default()
        });
        req.set_timeout(self.spawn_timeout);
        let start = Instant::now();
        let what = if tag.is_empty() {
            format!("SpawnSandboxes(n={n})")
        } else {
            format!("SpawnSandboxes(n={n}, snapshot_tag={tag})")
        };
        let resp = self
            .client()
            .spawn_sandboxes(req)
            .await
            .with_context(|| what.clone())?
            .into_inner();
        let wall = start.elapsed();
        if !resp.failures.is_empty() {
            let first = &resp.failures[0];
            self.observe(format!(
                "{bench}: SpawnSandboxes(n={n}) started {} and failed {} (first: #{} {} {})",
                resp.sandboxes.len(),
                resp.failures.len(),
                first.index,
                first.code,
                first.message
            ));
        }
        if resp.sandboxes.is_empty() {
            bail!("SpawnSandboxes(n={n}) returned no sandbox and no error");
        }
        if resp.sandboxes.len() + resp.failures.len() != n as usize {
            self.observe(format!(
                "{bench}: SpawnSandboxes(n={n}) returned {} sandboxes + {} failures",
                resp.sandboxes.len(),
                resp.failures.len()
            ));
        }
        let mut pids = self.vmm_pids.lock().unwrap();
        for sb in &resp.sandboxes {
            if sb.vmm_pid == 0 {
                self.observe(format!(
                    "{bench}: sandbox {} came back with vmm_pid 0",
                    sb.id
                ));
            } else {
                pids.push(sb.vmm_pid);
            }
            if sb.boot_ms <= 0.0 {
                self.observe(format!(
                    "{bench}: sandbox {} has boot_ms {}",
                    sb.id, sb.boot_ms
                ));
            }
        }
        Ok((resp, wall))
    }

    /// CreateSnapshot: boots a sandbox of `memory_mib`, runs `warmup`,
    /// snapshots it and deletes the sandbox. Returns the snapshot and the
    /// client-side wall time.
    pub async fn create_snapshot(
        &self,
        tag: &str,
        memory_mib: u32,
        warmup: &[&[&str]],
    ) -> Result<(Snapshot, Duration)> {
        let mut req = Request::new(CreateSnapshotRequest {
            tag: tag.to_string(),
            memory_mib,
            vcpus: 0,
            warmup: warmup
                .iter()
                .map(|argv| WarmupCommand {
                    argv: argv.iter().map(|a| a.to_string()).collect(),
                    timeout_ms: 0,
                })
                .collect(),
            keep_running: false,
            image: String::new(),
        });
        req.set_timeout(Duration::from_secs(600));
        let start = Instant::now();
        let resp = self
            .snapshots()
            .create_snapshot(req)
            .await
            .with_context(|| format!("CreateSnapshot({tag})"))?
            .into_inner();
        let wall = start.elapsed();
        let snap = resp
            .snapshot
            .with_context(|| format!("CreateSnapshot({tag}) returned no snapshot"))?;
        Ok((snap, wall))
    }

    /// BranchSandbox of `sandbox_id` into `tag` with `mode`, timed on the
    /// client.
    pub async fn branch(
        &self,
        sandbox_id: &str,
        tag: &str,
        mode: BranchMode,
    ) -> Result<(BranchSandboxResponse, Duration)> {
        self.branch_wait(sandbox_id, tag, mode, None).await
    }

    /// BranchSandbox with an explicit `wait` (meaningful for LIVE only;
    /// `None` leaves it unset, which means true), timed on the client.
    pub async fn branch_wait(
        &self,
        sandbox_id: &str,
        tag: &str,
        mode: BranchMode,
        wait: Option<bool>,
    ) -> Result<(BranchSandboxResponse, Duration)> {
        let mut req = Request::new(BranchSandboxRequest {
            sandbox_id: sandbox_id.to_string(),
            tag: tag.to_string(),
            mode: mode as i32,
            wait,
            diff: false,
            measure_diff: false,
        });
        req.set_timeout(Duration::from_secs(600));
        let start = Instant::now();
        let resp = self
            .client()
            .branch_sandbox(req)
            .await
            .with_context(|| {
                format!("BranchSandbox({sandbox_id}, {tag}, {mode:?}, wait={wait:?})")
            })?
            .into_inner();
        Ok((resp, start.elapsed()))
    }

    /// GetSnapshot(tag).
    pub async fn get_snapshot(&self, tag: &str) -> Result<Snapshot> {
        let mut req = Request::new(GetSnapshotRequest {
            tag: tag.to_string(),
        });
        req.set_timeout(Duration::from_secs(60));
        self.snapshots()
            .get_snapshot(req)
            .await
            .with_context(|| format!("GetSnapshot({tag})"))?
            .into_inner()
            .snapshot
            .with_context(|| format!("GetSnapshot({tag}) returned no snapshot"))
    }

    /// DeleteSnapshot(tag); returns the deleted tags.
    pub async fn delete_snapshot(
        &self,
        tag: &str,
        cascade: bool,
        force: bool,
    ) -> Result<Vec<String>> {
        let mut req = Request::new(DeleteSnapshotRequest {
            tag: tag.to_string(),
            cascade,
            force,
        });
        req.set_timeout(Duration::from_secs(120));
        let resp = self
            .snapshots()
            .delete_snapshot(req)
            .await
            .with_context(|| format!("DeleteSnapshot({tag})"))?
            .into_inner();
        Ok(resp.deleted_tags)
    }

    /// Deletes (cascade, force) every snapshot whose tag starts with
    /// `{bench}-`. A daemon without snapshot support has nothing to delete.
    pub async fn cleanup_snapshots(&self, bench: &str) -> Result<()> {
        let resp = match self
            .snapshots()
            .list_snapshots(ListSnapshotsRequest { status: 0 })
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == tonic::Code::Unimplemented => return Ok(()),
            Err(s) => return Err(s).context("ListSnapshots"),
        };
        let prefix = format!("{bench}-");
        let mut left: Vec<Snapshot> = resp
            .snapshots
            .into_iter()
            .filter(|s| s.tag.starts_with(&prefix))
            .collect();
        // Roots last, so that every delete finds its dependents gone (the
        // cascade would take them anyway).
        left.sort_by_key(|s| std::cmp::Reverse(s.chain.len()));
        for snap in left {
            match self.delete_snapshot(&snap.tag, true, true).await {
                Ok(_) => {}
                Err(e) => {
                    let gone = e
                        .downcast_ref::<tonic::Status>()
                        .is_some_and(|s| s.code() == tonic::Code::NotFound);
                    if !gone {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    /// DeleteSandbox(id), timed.
    pub async fn delete(&self, id: &str) -> Result<Duration> {
        let mut req = Request::new(DeleteSandboxRequest { id: id.to_string() });
        req.set_timeout(Duration::from_secs(60));
        let start = Instant::now();
        self.client()
            .delete_sandbox(req)
            .await
            .with_context(|| format!("DeleteSandbox({id})"))?;
        Ok(start.elapsed())
    }

    /// Deletes all of `ids` concurrently; returns the wall time.
    pub async fn delete_many(&self, ids: &[String]) -> Result<Duration> {
        let start = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for id in ids {
            let mut client = self.client();
            let id = id.clone();
            set.spawn(async move {
                let mut req = Request::new(DeleteSandboxRequest { id: id.clone() });
                req.set_timeout(Duration::from_secs(120));
                client
                    .delete_sandbox(req)
                    .await
                    .with_context(|| format!("DeleteSandbox({id})"))
                    .map(|_| ())
            });
        }
        let mut first_err = None;
        while let Some(res) = set.join_next().await {
            if let Err(e) = res.context("delete task panicked").and_then(|r| r) {
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(start.elapsed()),
        }
    }

    /// The sandboxes carrying this benchmark's label.
    pub async fn list_labelled(&self, bench: &str) -> Result<Vec<Sandbox>> {
        let resp = self
            .client()
            .list_sandboxes(ListSandboxesRequest {
                label_selector: HashMap::from([(LABEL_KEY.to_string(), bench.to_string())]),
            })
            .await
            .context("ListSandboxes")?;
        Ok(resp.into_inner().sandboxes)
    }

    /// Ids of every listed sandbox carrying the benchmark label at all.
    pub async fn list_labelled_any(&self) -> Result<Vec<String>> {
        let resp = self
            .client()
            .list_sandboxes(ListSandboxesRequest::default())
            .await
            .context("ListSandboxes")?;
        Ok(resp
            .into_inner()
            .sandboxes
            .into_iter()
            .filter(|s| s.labels.contains_key(LABEL_KEY))
            .map(|s| s.id)
            .collect())
    }

    /// Deletes whatever this benchmark left behind (after an error, say):
    /// its sandboxes, then its snapshots.
    pub async fn cleanup(&self, bench: &str) -> Result<()> {
        self.cleanup_sandboxes(bench).await?;
        self.cleanup_snapshots(bench).await
    }

    /// Deletes every sandbox carrying this benchmark's label.
    pub async fn cleanup_sandboxes(&self, bench: &str) -> Result<()> {
        let left = self.list_labelled(bench).await?;
        if !left.is_empty() {
            let ids: Vec<String> = left.into_iter().map(|s| s.id).collect();
            self.delete_many(&ids).await?;
        }
        Ok(())
    }

    /// Runs `argv` in the sandbox and drains the stream.
    pub async fn exec(
        &self,
        client: &mut Client,
        sandbox_id: &str,
        argv: &[&str],
        capture_stdout: bool,
    ) -> Result<ExecOutcome> {
        exec_on(client, sandbox_id, argv, capture_stdout).await
    }

    /// Runs `argv` in every sandbox of `ids`, `concurrency` at a time, each
    /// on its own client of the shared connection; fails on the first error
    /// or non-zero exit. Returns the outcomes in the order of `ids`.
    pub async fn exec_all(
        &self,
        ids: &[String],
        argv: &[&str],
        concurrency: usize,
    ) -> Result<Vec<ExecOutcome>> {
        let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
        let argv: Vec<String> = argv.iter().map(|a| a.to_string()).collect();
        let mut set = tokio::task::JoinSet::new();
        for (i, id) in ids.iter().enumerate() {
            let sem = sem.clone();
            let mut client = self.client();
            let (id, argv) = (id.clone(), argv.clone());
            set.spawn(async move {
                let _permit = sem.acquire_owned().await.expect("semaphore closed");
                let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
                let out = exec_on(&mut client, &id, &refs, true).await;
                (i, out)
            });
        }
        let mut outs: Vec<Option<ExecOutcome>> = vec![None; ids.len()];
        while let Some(res) = set.join_next().await {
            let (i, out) = res.context("exec task panicked")?;
            outs[i] = Some(out.with_context(|| format!("in sandbox {}", ids[i]))?);
        }
        Ok(outs
            .into_iter()
            .map(|o| o.expect("every task reported"))
            .collect())
    }

    /// Waits up to `grace` for each deleted VMM to disappear; records the
    /// ones still there (alive or zombie).
    pub async fn check_vmms_gone(&self, when: &str, pids: &[u32], grace: Duration) {
        let deadline = Instant::now() + grace;
        let mut left: Vec<u32> = pids.to_vec();
        loop {
            left.retain(|&pid| procfs::process_alive(pid, "forkd-vmm"));
            if left.is_empty() || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !left.is_empty() {
            let zombies = left
                .iter()
                .filter(|&&p| procfs::process_state(p) == Some('Z'))
                .count();
            self.observe(format!(
                "{when}: {} forkd-vmm process(es) still present {:.1} s later \
                 ({zombies} zombie), e.g. pid {}",
                left.len(),
                grace.as_secs_f64(),
                left[0]
            ));
        }
    }
}

/// Runs `argv` in the sandbox and drains the stream; fails unless it exits 0.
pub async fn exec_on(
    client: &mut Client,
    sandbox_id: &str,
    argv: &[&str],
    capture_stdout: bool,
) -> Result<ExecOutcome> {
    let mut req = Request::new(ExecRequest {
        sandbox_id: sandbox_id.to_string(),
        argv: argv.iter().map(|a| a.to_string()).collect(),
        timeout_ms: 0,
        ..Default::default()
    });
    req.set_timeout(Duration::from_secs(60));
    let mut stream = client
        .exec(req)
        .await
        .with_context(|| format!("Exec {argv:?}"))?
        .into_inner();
    let mut out = ExecOutcome::default();
    loop {
        let msg = stream
            .message()
            .await
            .with_context(|| format!("Exec {argv:?}: reading the stream"))?;
        let Some(msg) = msg else {
            bail!("Exec {argv:?}: stream ended without an exit message");
        };
        match msg.event {
            Some(exec_response::Event::Stdout(data)) => {
                out.chunks += 1;
                out.max_chunk = out.max_chunk.max(data.len());
                out.stdout_bytes += data.len() as u64;
                if capture_stdout {
                    out.stdout.extend_from_slice(&data);
                }
            }
            Some(exec_response::Event::Stderr(data)) => {
                out.chunks += 1;
                out.max_chunk = out.max_chunk.max(data.len());
                out.stderr.extend_from_slice(&data);
            }
            Some(exec_response::Event::Exit(exit)) => {
                out.exit_code = exit.exit_code;
                out.duration_us = exit.duration_us;
                break;
            }
            None => bail!("Exec {argv:?}: message without an event"),
        }
    }
    // The exit must be the last message.
    if let Some(extra) = stream
        .message()
        .await
        .with_context(|| format!("Exec {argv:?}: after the exit message"))?
    {
        bail!("Exec {argv:?}: message after the exit: {extra:?}");
    }
    if out.exit_code != 0 {
        bail!(
            "Exec {argv:?} exited {} (stderr: {:?})",
            out.exit_code,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}
