//! A stand-in for the `forkd` daemon, for checking the benchmark driver
//! without KVM: `fake_forkd serve --listen ADDR --data-dir DIR`.
//!
//! Each "sandbox" is a `sleep` process started through a symlink named
//! `forkd-vmm`, so it has a real pid and memory figures; Exec implements
//! `echo`, `emit BYTES`, `sleep MS`, `fill`, `checksum`, `dirty` and `stat`
//! (constant or clock-driven output) in the daemon itself. Snapshots are
//! records only (no files): enough for CreateSnapshot, BranchSandbox
//! FULL/DIFF/LIVE (LIVE snapshots are READY at once), spawning from a tag
//! and Get/List/Delete/WatchSnapshot. Its figures say nothing about forkd:
//! never record them.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forkd_api::v1 as pb;
use forkd_api::v1::sandbox_service_server::{SandboxService, SandboxServiceServer};
use forkd_api::v1::snapshot_service_server::{SnapshotService, SnapshotServiceServer};
use forkd_api::v1::{
    exec_response, BranchMode, BranchSandboxRequest, BranchSandboxResponse, CreateSnapshotRequest,
    CreateSnapshotResponse, DeleteSandboxRequest, DeleteSandboxResponse, DeleteSnapshotRequest,
    DeleteSnapshotResponse, ExecExit, ExecRequest, ExecResponse, GetSandboxRequest,
    GetSandboxResponse, GetSnapshotRequest, GetSnapshotResponse, ListSandboxesRequest,
    ListSandboxesResponse, ListSnapshotsRequest, ListSnapshotsResponse, ReadConsoleRequest,
    ReadConsoleResponse, Sandbox, SandboxState, SetSandboxTtlRequest, SetSandboxTtlResponse,
    Snapshot, SnapshotStatus, SpawnSandboxesRequest, SpawnSandboxesResponse, WatchSnapshotRequest,
    WatchSnapshotResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// When the fake started (the clock of its `stat` writer).
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

struct Entry {
    sandbox: Sandbox,
    child: Child,
}

struct Fake {
    vmm: PathBuf,
    next: Mutex<u64>,
    sandboxes: Mutex<Vec<Entry>>,
    snapshots: Mutex<Vec<Snapshot>>,
    /// Sandbox id -> the tag a DIFF of it would be against.
    bases: Mutex<HashMap<String, String>>,
}

impl Fake {
    fn snapshot(&self, tag: &str) -> Result<Snapshot, Status> {
        self.snapshots
            .lock()
            .unwrap()
            .iter()
            .find(|s| s.tag == tag)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("no snapshot {tag}")))
    }

    /// Records a READY snapshot of a sandbox; `parent` makes it a diff.
    fn record(&self, tag: &str, sandbox: &Sandbox, parent: Option<Snapshot>) -> Snapshot {
        let mut chain = vec![tag.to_string()];
        if let Some(p) = &parent {
            chain.extend(p.chain.iter().cloned());
        }
        let snap = Snapshot {
            tag: tag.to_string(),
            status: SnapshotStatus::Ready as i32,
            mode: if parent.is_some() {
                BranchMode::Diff
            } else {
                BranchMode::Full
            } as i32,
            parent_tag: parent.map(|p| p.tag).unwrap_or_default(),
            source_sandbox_id: sandbox.id.clone(),
            memory_mib: sandbox.memory_mib,
            vcpus: sandbox.vcpus,
            huge_pages: sandbox.huge_pages,
            chain,
            ..Default::default()
        };
        self.snapshots.lock().unwrap().push(snap.clone());
        self.bases
            .lock()
            .unwrap()
            .insert(sandbox.id.clone(), tag.to_string());
        snap
    }

    fn kill_all(&self) {
        for mut e in self.sandboxes.lock().unwrap().drain(..) {
            let _ = e.child.kill();
            let _ = e.child.wait();
        }
    }
}

/// This stand-in's answer to every file request.
fn no_files() -> Status {
    Status::failed_precondition("this stand-in daemon runs no guest with files")
}

#[tonic::async_trait]
impl SandboxService for Fake {
    async fn spawn_sandboxes(
        &self,
        req: Request<SpawnSandboxesRequest>,
    ) -> Result<Response<SpawnSandboxesResponse>, Status> {
        let start = Instant::now();
        let req = req.into_inner();
        if !(1..=1000).contains(&req.n) {
            return Err(Status::invalid_argument("n must be 1..1000"));
        }
        let (mut memory_mib, mut huge_pages) = (req.memory_mib, req.huge_pages);
        if !req.snapshot_tag.is_empty() {
            let snap = self.snapshot(&req.snapshot_tag)?;
            (memory_mib, huge_pages) = (snap.memory_mib, snap.huge_pages);
        }
        let mut out = Vec::new();
        for _ in 0..req.n {
            let child = Command::new(&self.vmm)
                .arg("3600")
                .stdin(Stdio::null())
                .spawn()
                .map_err(|e| Status::internal(format!("spawn: {e}")))?;
            tokio::time::sleep(Duration::from_millis(2)).await;
            let id = {
                let mut next = self.next.lock().unwrap();
                *next += 1;
                format!("sb-fake{:05}", *next)
            };
            let sandbox = Sandbox {
                id,
                state: SandboxState::Running as i32,
                memory_mib: if memory_mib == 0 { 256 } else { memory_mib },
                snapshot_tag: req.snapshot_tag.clone(),
                vcpus: if req.vcpus == 0 { 2 } else { req.vcpus },
                labels: req.labels.clone(),
                vmm_pid: child.id(),
                live_fork: req.live_fork.unwrap_or(false),
                boot_ms: start.elapsed().as_secs_f64() * 1e3,
                huge_pages,
                ..Default::default()
            };
            if !req.snapshot_tag.is_empty() {
                self.bases
                    .lock()
                    .unwrap()
                    .insert(sandbox.id.clone(), req.snapshot_tag.clone());
            }
            out.push(sandbox.clone());
            self.sandboxes
                .lock()
                .unwrap()
                .push(Entry { sandbox, child });
        }
        Ok(Response::new(SpawnSandboxesResponse {
            sandboxes: out,
            failures: Vec::new(),
            elapsed_ms: start.elapsed().as_secs_f64() * 1e3,
        }))
    }

    async fn read_console(
        &self,
        _req: Request<ReadConsoleRequest>,
    ) -> Result<Response<ReadConsoleResponse>, Status> {
        Err(Status::failed_precondition(
            "this stand-in daemon runs no guest with a serial console",
        ))
    }

    async fn write_file(
        &self,
        _req: Request<tonic::Streaming<pb::WriteFileRequest>>,
    ) -> Result<Response<pb::WriteFileResponse>, Status> {
        Err(no_files())
    }

    type ReadFileStream = ReceiverStream<Result<pb::ReadFileResponse, Status>>;

    async fn read_file(
        &self,
        _req: Request<pb::ReadFileRequest>,
    ) -> Result<Response<Self::ReadFileStream>, Status> {
        Err(no_files())
    }

    async fn stat_file(
        &self,
        _req: Request<pb::StatFileRequest>,
    ) -> Result<Response<pb::StatFileResponse>, Status> {
        Err(no_files())
    }

    async fn list_dir(
        &self,
        _req: Request<pb::ListDirRequest>,
    ) -> Result<Response<pb::ListDirResponse>, Status> {
        Err(no_files())
    }

    async fn remove_file(
        &self,
        _req: Request<pb::RemoveFileRequest>,
    ) -> Result<Response<pb::RemoveFileResponse>, Status> {
        Err(no_files())
    }

    async fn set_sandbox_ttl(
        &self,
        _req: Request<SetSandboxTtlRequest>,
    ) -> Result<Response<SetSandboxTtlResponse>, Status> {
        Err(Status::unimplemented(
            "this stand-in daemon keeps no sandbox lifetimes",
        ))
    }

    async fn get_sandbox(
        &self,
        req: Request<GetSandboxRequest>,
    ) -> Result<Response<GetSandboxResponse>, Status> {
        let id = req.into_inner().id;
        let list = self.sandboxes.lock().unwrap();
        let e = list
            .iter()
            .find(|e| e.sandbox.id == id)
            .ok_or_else(|| Status::not_found(id))?;
        Ok(Response::new(GetSandboxResponse {
            sandbox: Some(e.sandbox.clone()),
        }))
    }

    async fn list_sandboxes(
        &self,
        req: Request<ListSandboxesRequest>,
    ) -> Result<Response<ListSandboxesResponse>, Status> {
        let sel = req.into_inner().label_selector;
        let list = self.sandboxes.lock().unwrap();
        let sandboxes = list
            .iter()
            .filter(|e| sel.iter().all(|(k, v)| e.sandbox.labels.get(k) == Some(v)))
            .map(|e| e.sandbox.clone())
            .collect();
        Ok(Response::new(ListSandboxesResponse { sandboxes }))
    }

    async fn delete_sandbox(
        &self,
        req: Request<DeleteSandboxRequest>,
    ) -> Result<Response<DeleteSandboxResponse>, Status> {
        let id = req.into_inner().id;
        let mut e = {
            let mut list = self.sandboxes.lock().unwrap();
            let pos = list
                .iter()
                .position(|e| e.sandbox.id == id)
                .ok_or_else(|| Status::not_found(id))?;
            list.remove(pos)
        };
        let _ = e.child.kill();
        let _ = e.child.wait();
        Ok(Response::new(DeleteSandboxResponse {
            sandbox: Some(e.sandbox),
        }))
    }

    type ExecStream = ReceiverStream<Result<ExecResponse, Status>>;

    async fn exec(&self, req: Request<ExecRequest>) -> Result<Response<Self::ExecStream>, Status> {
        let req = req.into_inner();
        let known = self
            .sandboxes
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.sandbox.id == req.sandbox_id);
        if !known {
            return Err(Status::not_found(req.sandbox_id));
        }
        let argv = req.argv;
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let start = Instant::now();
            let send = |data: Vec<u8>| ExecResponse {
                event: Some(exec_response::Event::Stdout(data)),
            };
            let arg = |i: usize| argv.get(i).and_then(|a| a.parse::<u64>().ok()).unwrap_or(0);
            match argv.first().map(String::as_str) {
                Some("echo") => {
                    let line = format!("{}\n", argv[1..].join(" "));
                    let _ = tx.send(Ok(send(line.into_bytes()))).await;
                }
                Some("emit") => {
                    let mut left = arg(1) as usize;
                    while left > 0 {
                        let n = left.min(64 << 10);
                        if tx.send(Ok(send(vec![b'x'; n]))).await.is_err() {
                            return;
                        }
                        left -= n;
                    }
                }
                Some("sleep") => tokio::time::sleep(Duration::from_millis(arg(1))).await,
                Some("fill") => {
                    let line = format!("filled {} MiB with seed {}\n", arg(1), arg(2));
                    let _ = tx.send(Ok(send(line.into_bytes()))).await;
                }
                Some("checksum") => {
                    let _ = tx.send(Ok(send(b"0123456789abcdef\n".to_vec()))).await;
                }
                Some("dirty") => {
                    let line = format!(
                        "writer started: pages={} rate={}/s on vcpu 1\n",
                        arg(1),
                        arg(2)
                    );
                    let _ = tx.send(Ok(send(line.into_bytes()))).await;
                }
                Some("stat") => {
                    // A writer that stamps one page per microsecond of uptime.
                    let seq = epoch().elapsed().as_micros();
                    let line = format!("vcpus=2\nwriter=running pages=4096 rate=0 seq={seq}\n");
                    let _ = tx.send(Ok(send(line.into_bytes()))).await;
                }
                _ => {
                    let _ = tx
                        .send(Err(Status::invalid_argument("unknown builtin")))
                        .await;
                    return;
                }
            }
            let exit = ExecResponse {
                event: Some(exec_response::Event::Exit(ExecExit {
                    exit_code: 0,
                    duration_us: start.elapsed().as_micros() as u64,
                    signal: 0,
                })),
            };
            let _ = tx.send(Ok(exit)).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn branch_sandbox(
        &self,
        req: Request<BranchSandboxRequest>,
    ) -> Result<Response<BranchSandboxResponse>, Status> {
        let req = req.into_inner();
        let sandbox = self
            .sandboxes
            .lock()
            .unwrap()
            .iter()
            .find(|e| e.sandbox.id == req.sandbox_id)
            .map(|e| e.sandbox.clone())
            .ok_or_else(|| Status::not_found(req.sandbox_id.clone()))?;
        let diff = req.mode == BranchMode::Diff as i32
            || (req.mode == BranchMode::Unspecified as i32 && req.diff);
        let live = req.mode == BranchMode::Live as i32;
        if self.snapshot(&req.tag).is_ok() {
            return Err(Status::already_exists(req.tag));
        }
        let parent = if diff {
            let base = self.bases.lock().unwrap().get(&sandbox.id).cloned();
            let base = base.ok_or_else(|| Status::failed_precondition("no base snapshot"))?;
            Some(self.snapshot(&base)?)
        } else {
            None
        };
        let pause = if live {
            1
        } else if diff {
            2
        } else {
            10
        };
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let mut snap = self.record(&req.tag, &sandbox, parent);
        if live {
            // Recorded READY at once; a wait=false reply still says WRITING.
            snap.mode = BranchMode::Live as i32;
            if let Some(s) = self
                .snapshots
                .lock()
                .unwrap()
                .iter_mut()
                .find(|s| s.tag == req.tag)
            {
                s.mode = snap.mode;
            }
            if req.wait == Some(false) {
                snap.status = SnapshotStatus::Writing as i32;
            }
        }
        Ok(Response::new(BranchSandboxResponse {
            snapshot: Some(snap),
            pause_ms: pause as f64,
            bytes_written: u64::from(sandbox.memory_mib) << 19,
            dirty_pages: if diff { 4096 } else { 0 },
            faults_served: 0,
        }))
    }
}

#[tonic::async_trait]
impl SnapshotService for Fake {
    async fn create_snapshot(
        &self,
        req: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        let req = req.into_inner();
        if self.snapshot(&req.tag).is_ok() {
            return Err(Status::already_exists(req.tag));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let sandbox = Sandbox {
            id: "sb-fakewarm".to_string(),
            memory_mib: if req.memory_mib == 0 {
                256
            } else {
                req.memory_mib
            },
            vcpus: 2,
            ..Default::default()
        };
        let snap = self.record(&req.tag, &sandbox, None);
        Ok(Response::new(CreateSnapshotResponse {
            snapshot: Some(snap),
            sandbox_id: String::new(),
        }))
    }

    async fn get_snapshot(
        &self,
        req: Request<GetSnapshotRequest>,
    ) -> Result<Response<GetSnapshotResponse>, Status> {
        Ok(Response::new(GetSnapshotResponse {
            snapshot: Some(self.snapshot(&req.into_inner().tag)?),
        }))
    }

    async fn list_snapshots(
        &self,
        _req: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        Ok(Response::new(ListSnapshotsResponse {
            snapshots: self.snapshots.lock().unwrap().clone(),
        }))
    }

    async fn delete_snapshot(
        &self,
        req: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        let req = req.into_inner();
        self.snapshot(&req.tag)?;
        let mut list = self.snapshots.lock().unwrap();
        let dependents: Vec<String> = list
            .iter()
            .filter(|s| s.chain.iter().skip(1).any(|t| *t == req.tag))
            .map(|s| s.tag.clone())
            .collect();
        if !dependents.is_empty() && !req.cascade && !req.force {
            return Err(Status::failed_precondition(format!(
                "dependents: {}",
                dependents.join(", ")
            )));
        }
        let mut deleted = dependents;
        deleted.push(req.tag.clone());
        list.retain(|s| !deleted.contains(&s.tag));
        Ok(Response::new(DeleteSnapshotResponse {
            deleted_tags: deleted,
        }))
    }

    type WatchSnapshotStream = ReceiverStream<Result<WatchSnapshotResponse, Status>>;

    async fn watch_snapshot(
        &self,
        req: Request<WatchSnapshotRequest>,
    ) -> Result<Response<Self::WatchSnapshotStream>, Status> {
        // Every fake snapshot is READY: its status, and the end.
        let snap = self.snapshot(&req.into_inner().tag)?;
        let (tx, rx) = mpsc::channel(1);
        let _ = tx
            .send(Ok(WatchSnapshotResponse {
                tag: snap.tag,
                status: snap.status,
                ..Default::default()
            }))
            .await;
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
            .ok_or_else(|| format!("usage: fake_forkd serve --listen ADDR --data-dir DIR ({name})"))
    };
    if args.get(1).map(String::as_str) != Some("serve") {
        return Err("usage: fake_forkd serve --listen ADDR --data-dir DIR".into());
    }
    let listen = flag("--listen")?.parse()?;
    let data_dir = PathBuf::from(flag("--data-dir")?);
    // A `sleep` whose process name reads forkd-vmm.
    let vmm = data_dir.join("forkd-vmm");
    std::os::unix::fs::symlink("/bin/sleep", &vmm)?;

    let fake = Arc::new(Fake {
        vmm,
        next: Mutex::new(0),
        sandboxes: Mutex::new(Vec::new()),
        snapshots: Mutex::new(Vec::new()),
        bases: Mutex::new(HashMap::new()),
    });
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<SandboxServiceServer<Fake>>().await;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    eprintln!("fake forkd listening on {listen}");
    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(SandboxServiceServer::from_arc(fake.clone()))
        .add_service(SnapshotServiceServer::from_arc(fake.clone()))
        .serve_with_shutdown(listen, async move {
            term.recv().await;
        })
        .await?;
    fake.kill_all();
    Ok(())
}
