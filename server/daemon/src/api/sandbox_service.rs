//! `forkd.v1.SandboxService`: validates each request and hands it to the
//! lifecycle lifecycle, the registry or an Exec task.

use std::sync::Arc;

use forkd_api::v1 as pb;
use pb::sandbox_service_server::SandboxService;
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

use crate::api::error::{code_name, ApiError, BootError};
use crate::api::snapshot_view::describe;
use crate::api::validate;
use crate::sandbox::console;
use crate::sandbox::exec::{self, ExecStream};
use crate::sandbox::files::{self, download::ReadStream};
use crate::sandbox::image_lookup::{self, Images};
use crate::sandbox::lifecycle::{BootPlan, Lifecycle, SpawnOutcome};
use crate::sandbox::linux_host::LinuxHost;
use crate::snapshot::branch::{self, BranchOutcome, BranchPlan, Started};
use crate::snapshot::fork;
use crate::snapshot::mode::resolve_mode;
use crate::snapshot::store::Snapshots;
use crate::vmm::ExecCommand;

/// What a reference-guest sandbox answers to Linux-only Exec fields.
pub const BUILTINS_ONLY: &str =
    "the reference guest runs builtins only; env, cwd and stdin need a Linux image";

/// Where Linux guests come from and whether this host can run them.
#[derive(Debug, Clone)]
pub struct LinuxGuests {
    /// The images directory.
    pub images: Images,
    /// The host's hypervisor, decided at startup.
    pub host: LinuxHost,
}

impl LinuxGuests {
    /// Resolves a Linux boot into `plan`: the host must run Linux guests,
    /// then the image must exist; its `memory_mib` is the default when
    /// `memory_mib` is 0, and the memory must be at least what the image
    /// boots in.
    pub fn plan(&self, plan: &mut BootPlan, name: &str, memory_mib: u32) -> Result<(), ApiError> {
        self.host.check()?;
        let image = self.images.get(name)?;
        if memory_mib == 0 {
            plan.memory_mib = validate::memory_mib(image.memory_mib).map_err(|e| {
                ApiError::Image(image_lookup::ImageError::Invalid {
                    name: name.to_string(),
                    reason: format!("its manifest's {e}"),
                })
            })?;
        }
        let min = image.min_memory_mib();
        if plan.memory_mib < min {
            let default = if image.memory_mib >= min {
                format!(" (or 0 for the image's default, {} MiB)", image.memory_mib)
            } else {
                String::new()
            };
            return Err(ApiError::InvalidArgument(format!(
                "memory_mib={} is too small for image {name:?}: its {} MiB initramfs is unpacked \
                 into RAM, which needs at least {min} MiB; ask for memory_mib >= {min}{default}",
                plan.memory_mib,
                image.initrd_bytes.div_ceil(1 << 20),
            )));
        }
        plan.image = Some(image);
        Ok(())
    }
}

/// The SandboxService implementation.
#[derive(Debug, Clone)]
pub struct Sandboxes {
    lifecycle: Arc<Lifecycle>,
    snapshots: Arc<Snapshots>,
    linux: Arc<LinuxGuests>,
}

impl Sandboxes {
    /// A service over `lifecycle`, the snapshot store and the Linux images.
    pub fn new(
        lifecycle: Arc<Lifecycle>,
        snapshots: Arc<Snapshots>,
        linux: Arc<LinuxGuests>,
    ) -> Sandboxes {
        Sandboxes {
            lifecycle,
            snapshots,
            linux,
        }
    }

    /// Validates a SpawnSandboxes request into a plan; a fork also resolves
    /// (and on first use loads) its snapshot.
    async fn plan(&self, req: &pb::SpawnSandboxesRequest) -> Result<BootPlan, ApiError> {
        let mut plan = boot_plan(req)?;
        plan.ttl = self
            .lifecycle
            .expiry()
            .policy()
            .for_spawn(req.ttl_seconds)?;
        if !req.image.is_empty() {
            self.linux.plan(&mut plan, &req.image, req.memory_mib)?;
        }
        if !req.snapshot_tag.is_empty() {
            // A Linux snapshot's children are Linux guests: a host that
            // cannot run them says so before anything is loaded.
            let linux_snapshot = self
                .snapshots
                .store()
                .get(&req.snapshot_tag)
                .is_ok_and(|m| m.image.is_some());
            if linux_snapshot {
                self.linux.host.check()?;
            }
            let source = fork::prepare(
                &self.snapshots,
                &req.snapshot_tag,
                req.memory_mib,
                req.vcpus,
                req.huge_pages,
                req.wait_for_snapshot,
            )
            .await?;
            plan.memory_mib = source.memory_mib;
            plan.vcpus = source.vcpus;
            plan.huge_pages = source.huge_pages;
            plan.restore = Some(source.restore);
        }
        Ok(plan)
    }
}

/// Validates the store-independent part of a SpawnSandboxes request. For
/// a cold boot this is the whole plan; for a fork, `memory_mib` and `vcpus`
/// are checked against the snapshot later.
pub fn boot_plan(req: &pb::SpawnSandboxesRequest) -> Result<BootPlan, ApiError> {
    let n = validate::spawn_count(req.n)?;
    validate::labels(&req.labels)?;
    if !req.image.is_empty() {
        if !req.snapshot_tag.is_empty() {
            return Err(ApiError::InvalidArgument(
                "set image or snapshot_tag, not both: children of a snapshot run the image it \
                 was taken of"
                    .into(),
            ));
        }
        image_lookup::check_name(&req.image)?;
    }
    let (memory_mib, vcpus) = if req.snapshot_tag.is_empty() {
        let memory_mib = validate::memory_mib(req.memory_mib)?;
        if req.huge_pages {
            validate::huge_pages(memory_mib, &req.image)?;
        }
        (memory_mib, validate::vcpus(req.vcpus)?)
    } else {
        validate::snapshot_tag(&req.snapshot_tag)?;
        (req.memory_mib, req.vcpus)
    };
    Ok(BootPlan {
        n,
        memory_mib,
        vcpus,
        labels: req.labels.clone(),
        live_fork: req.live_fork == Some(true),
        restore: None,
        image: None,
        ttl: None,
        huge_pages: req.huge_pages,
    })
}

fn into_response(outcome: &SpawnOutcome) -> Result<pb::SpawnSandboxesResponse, ApiError> {
    if let (true, Some((_, first))) = (outcome.started.is_empty(), outcome.failures.first()) {
        return Err(ApiError::NoneStarted {
            code: first.code(),
            message: first.to_string(),
        });
    }
    Ok(pb::SpawnSandboxesResponse {
        sandboxes: outcome.started.iter().map(|s| s.to_proto()).collect(),
        failures: outcome
            .failures
            .iter()
            .map(|(index, e)| pb::SpawnFailure {
                index: *index as u32,
                code: code_name(e.code()).to_string(),
                message: crate::api::public::status_message(&e.to_string()),
            })
            .collect(),
        elapsed_ms: outcome.elapsed.as_secs_f64() * 1000.0,
    })
}

#[tonic::async_trait]
impl SandboxService for Sandboxes {
    async fn spawn_sandboxes(
        &self,
        request: Request<pb::SpawnSandboxesRequest>,
    ) -> Result<Response<pb::SpawnSandboxesResponse>, Status> {
        let requested = std::time::Instant::now();
        let plan = self.plan(request.get_ref()).await?;
        tracing::info!(
            n = plan.n,
            image = plan.image.as_ref().map(|i| i.name.as_str()),
            memory_mib = plan.memory_mib,
            vcpus = plan.vcpus,
            snapshot = plan.restore.as_ref().map(|r| r.tag.as_str()),
            ttl_secs = plan.ttl.map(|t| t.as_secs()),
            "spawning sandboxes"
        );
        // The boots run in their own task: if the caller goes away, the
        // sandboxes that started are deleted again instead of leaking.
        let (tx, rx) = oneshot::channel();
        let lifecycle = self.lifecycle.clone();
        let snapshot_tag = plan.restore.as_ref().map(|r| r.tag.clone());
        let snapshots = self.snapshots.clone();
        tokio::spawn(async move {
            let mut outcome = lifecycle.spawn(plan, requested).await;
            if let (Ok(outcome), Some(tag)) = (&mut outcome, snapshot_tag) {
                // A force delete of the snapshot can race the boots: their
                // VMMs then fail to read it. Say so instead of what the VMM
                // saw.
                if !outcome.failures.is_empty() && snapshots.store().get(&tag).is_err() {
                    for (_, e) in &mut outcome.failures {
                        *e = BootError::SnapshotDeleted { tag: tag.clone() };
                    }
                }
            }
            if let Err(Ok(abandoned)) = tx.send(outcome) {
                for sandbox in &abandoned.started {
                    tracing::info!(sandbox = %sandbox.id(), "caller went away; deleting");
                    let _ = lifecycle.delete(sandbox.id()).await;
                }
            }
        });
        let outcome = rx
            .await
            .map_err(|_| ApiError::Internal("spawn task ended without a result".into()))??;
        Ok(Response::new(into_response(&outcome)?))
    }

    async fn get_sandbox(
        &self,
        request: Request<pb::GetSandboxRequest>,
    ) -> Result<Response<pb::GetSandboxResponse>, Status> {
        let id = validate::sandbox_id("id", &request.get_ref().id)?;
        let sandbox = self.lifecycle.registry().get(id)?;
        Ok(Response::new(pb::GetSandboxResponse {
            sandbox: Some(sandbox.to_proto()),
        }))
    }

    async fn list_sandboxes(
        &self,
        request: Request<pb::ListSandboxesRequest>,
    ) -> Result<Response<pb::ListSandboxesResponse>, Status> {
        let selector = &request.get_ref().label_selector;
        let sandboxes = self
            .lifecycle
            .registry()
            .list(selector)
            .iter()
            .map(|s| s.to_proto())
            .collect();
        Ok(Response::new(pb::ListSandboxesResponse { sandboxes }))
    }

    async fn delete_sandbox(
        &self,
        request: Request<pb::DeleteSandboxRequest>,
    ) -> Result<Response<pb::DeleteSandboxResponse>, Status> {
        let id = validate::sandbox_id("id", &request.get_ref().id)?.to_string();
        // Run to completion even if the caller goes away.
        let lifecycle = self.lifecycle.clone();
        let sandbox = tokio::spawn(async move { lifecycle.delete(&id).await })
            .await
            .map_err(|e| ApiError::Internal(format!("delete task failed: {e}")))??;
        Ok(Response::new(pb::DeleteSandboxResponse {
            sandbox: Some(sandbox),
        }))
    }

    type ExecStream = ExecStream;

    async fn exec(
        &self,
        request: Request<pb::ExecRequest>,
    ) -> Result<Response<ExecStream>, Status> {
        let req = request.into_inner();
        let id = validate::sandbox_id("sandbox_id", &req.sandbox_id)?;
        validate::argv(&req.argv)?;
        let env = validate::exec_env(&req.env)?;
        let cwd = validate::exec_cwd(&req.cwd)?;
        validate::exec_stdin(&req.stdin)?;
        let sandbox = self.lifecycle.registry().get(id)?;
        let linux_only = !env.is_empty() || cwd.is_some() || !req.stdin.is_empty();
        if linux_only && !sandbox.vmm.is_linux() {
            return Err(ApiError::FailedPrecondition(BUILTINS_ONLY.into()).into());
        }
        sandbox.check_exec()?;
        let cmd = ExecCommand {
            argv: req.argv,
            env,
            cwd,
            stdin: req.stdin,
        };
        Ok(Response::new(exec::start(sandbox, cmd, req.timeout_ms)))
    }

    async fn branch_sandbox(
        &self,
        request: Request<pb::BranchSandboxRequest>,
    ) -> Result<Response<pb::BranchSandboxResponse>, Status> {
        let req = request.into_inner();
        let id = validate::sandbox_id("sandbox_id", &req.sandbox_id)?;
        let (mode, wait) = resolve_mode(req.mode, req.diff, req.wait)?;
        let tag = (!req.tag.is_empty()).then_some(req.tag);
        if let Some(tag) = &tag {
            validate::snapshot_tag(tag)?;
        }
        let sandbox = self.lifecycle.registry().get(id)?;
        let plan = BranchPlan {
            tag,
            mode,
            measure_diff: req.measure_diff,
        };
        // Its own task: the snapshot always ends READY or FAILED, even if
        // the caller goes away. With wait=false the reply leaves as soon as
        // the vCPUs run again, and the copy goes on in that task.
        let snapshots = self.snapshots.clone();
        let (resumed_tx, resumed_rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            match branch::start(&snapshots, &sandbox, plan).await? {
                Started::Done(outcome) => Ok(outcome),
                Started::Live { outcome, copy } => {
                    if !wait {
                        let _ = resumed_tx.send(outcome);
                    }
                    copy.finish().await
                }
            }
        });
        let joined = |r: Result<Result<BranchOutcome, ApiError>, tokio::task::JoinError>| {
            r.map_err(|e| ApiError::Internal(format!("branch task failed: {e}")))?
        };
        let outcome = match resumed_rx.await {
            Ok(resumed) => resumed,
            // Waiting, or the branch failed before the vCPUs resumed.
            Err(_) => joined(task.await)?,
        };
        let snapshot = describe(
            self.snapshots.store(),
            &outcome.manifest,
            &self.lifecycle.registry().snapshot_children(),
        );
        Ok(Response::new(pb::BranchSandboxResponse {
            snapshot: Some(snapshot),
            pause_ms: outcome.pause_us as f64 / 1000.0,
            bytes_written: outcome.bytes_written,
            dirty_pages: outcome.dirty_pages,
            faults_served: outcome.faults_served,
        }))
    }

    async fn set_sandbox_ttl(
        &self,
        request: Request<pb::SetSandboxTtlRequest>,
    ) -> Result<Response<pb::SetSandboxTtlResponse>, Status> {
        let req = request.get_ref();
        let id = validate::sandbox_id("sandbox_id", &req.sandbox_id)?;
        let expiry = self.lifecycle.expiry();
        let ttl = expiry
            .policy()
            .check(req.ttl_seconds)
            .map_err(ApiError::from)?;
        let sandbox = self.lifecycle.registry().get(id)?;
        expiry.set(&sandbox, ttl)?;
        Ok(Response::new(pb::SetSandboxTtlResponse {
            sandbox: Some(sandbox.to_proto()),
        }))
    }

    async fn read_console(
        &self,
        request: Request<pb::ReadConsoleRequest>,
    ) -> Result<Response<pb::ReadConsoleResponse>, Status> {
        let req = request.get_ref();
        let id = validate::sandbox_id("sandbox_id", &req.sandbox_id)?;
        let max = validate::tail_bytes(req.tail_bytes)?;
        let sandbox = self.lifecycle.registry().get(id)?;
        if !sandbox.vmm.is_linux() {
            return Err(ApiError::FailedPrecondition(format!(
                "sandbox {id} runs the reference guest, which has no serial console; \
                 ReadConsole needs a sandbox spawned with an image"
            ))
            .into());
        }
        let dir = self.lifecycle.sandbox_dir(id);
        let tail = tokio::task::spawn_blocking(move || console::read_tail(&dir, max))
            .await
            .map_err(|e| ApiError::Internal(format!("console read task failed: {e}")))?
            .map_err(|e| ApiError::Internal(format!("cannot read the console log: {e}")))?;
        Ok(Response::new(pb::ReadConsoleResponse {
            data: tail.data,
            truncated: tail.truncated,
        }))
    }

    async fn write_file(
        &self,
        request: Request<tonic::Streaming<pb::WriteFileRequest>>,
    ) -> Result<Response<pb::WriteFileResponse>, Status> {
        let reset = request
            .extensions()
            .get::<files::reset::BodyReset>()
            .cloned()
            .unwrap_or_default();
        let mut body = request.into_inner();
        let (id, target) = files::upload::header(&mut body).await?;
        let sandbox = self.lifecycle.registry().get(&id)?;
        files::check(&sandbox)?;
        Ok(Response::new(
            files::upload::write(sandbox, target, body, reset).await?,
        ))
    }

    type ReadFileStream = ReadStream;

    async fn read_file(
        &self,
        request: Request<pb::ReadFileRequest>,
    ) -> Result<Response<ReadStream>, Status> {
        let req = request.into_inner();
        let id = validate::sandbox_id("sandbox_id", &req.sandbox_id)?;
        let path = validate::guest_path("path", &req.path)?;
        let sandbox = self.lifecycle.registry().get(id)?;
        files::check(&sandbox)?;
        let range = files::download::Range {
            path,
            offset: req.offset,
            length: req.length,
        };
        Ok(Response::new(files::download::start(sandbox, range)))
    }

    async fn stat_file(
        &self,
        request: Request<pb::StatFileRequest>,
    ) -> Result<Response<pb::StatFileResponse>, Status> {
        let req = request.into_inner();
        let id = validate::sandbox_id("sandbox_id", &req.sandbox_id)?;
        let path = validate::guest_path("path", &req.path)?;
        let sandbox = self.lifecycle.registry().get(id)?;
        files::check(&sandbox)?;
        let info = files::meta::stat(&sandbox, path).await?;
        Ok(Response::new(pb::StatFileResponse { info: Some(info) }))
    }

    async fn list_dir(
        &self,
        request: Request<pb::ListDirRequest>,
    ) -> Result<Response<pb::ListDirResponse>, Status> {
        let req = request.into_inner();
        let id = validate::sandbox_id("sandbox_id", &req.sandbox_id)?;
        let path = validate::guest_path("path", &req.path)?;
        let sandbox = self.lifecycle.registry().get(id)?;
        files::check(&sandbox)?;
        Ok(Response::new(files::meta::list(&sandbox, path).await?))
    }

    async fn remove_file(
        &self,
        request: Request<pb::RemoveFileRequest>,
    ) -> Result<Response<pb::RemoveFileResponse>, Status> {
        let req = request.into_inner();
        let id = validate::sandbox_id("sandbox_id", &req.sandbox_id)?;
        let path = validate::guest_path("path", &req.path)?;
        if path.trim_end_matches('/').is_empty() {
            return Err(ApiError::InvalidArgument(
                "path is the root directory '/', which cannot be removed".into(),
            )
            .into());
        }
        let sandbox = self.lifecycle.registry().get(id)?;
        files::check(&sandbox)?;
        files::meta::remove(&sandbox, path, req.recursive).await?;
        Ok(Response::new(pb::RemoveFileResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn req(n: u32) -> pb::SpawnSandboxesRequest {
        pb::SpawnSandboxesRequest {
            n,
            ..Default::default()
        }
    }

    #[test]
    fn plan_defaults() {
        let plan = boot_plan(&req(3)).unwrap();
        assert_eq!((plan.n, plan.memory_mib, plan.vcpus), (3, 256, 2));
        assert!(!plan.live_fork);
        let plan = boot_plan(&pb::SpawnSandboxesRequest {
            live_fork: Some(true),
            ..req(1)
        })
        .unwrap();
        assert!(plan.live_fork);
    }

    #[test]
    fn plan_rejects() {
        let err = boot_plan(&req(0)).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(err.to_string(), "n must be between 1 and 1000, got 0");

        let bad_tag = pb::SpawnSandboxesRequest {
            snapshot_tag: "-bad".into(),
            ..req(1)
        };
        assert_eq!(
            boot_plan(&bad_tag).unwrap_err().code(),
            Code::InvalidArgument
        );

        // A fork's shape is checked against the snapshot, not here.
        let fork = boot_plan(&pb::SpawnSandboxesRequest {
            snapshot_tag: "base".into(),
            memory_mib: 1,
            vcpus: 99,
            ..req(1)
        })
        .unwrap();
        assert_eq!((fork.memory_mib, fork.vcpus), (1, 99));
    }

    #[test]
    fn plan_image_rules() {
        let both = pb::SpawnSandboxesRequest {
            image: "debian".into(),
            snapshot_tag: "base".into(),
            ..req(1)
        };
        let e = boot_plan(&both).unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.to_string().contains("not both"), "{e}");
        let bad = pb::SpawnSandboxesRequest {
            image: "../etc".into(),
            ..req(1)
        };
        assert_eq!(boot_plan(&bad).unwrap_err().code(), Code::InvalidArgument);
        let ok = pb::SpawnSandboxesRequest {
            image: "debian-python".into(),
            ..req(1)
        };
        assert!(boot_plan(&ok).unwrap().image.is_none(), "resolved later");
    }
}
