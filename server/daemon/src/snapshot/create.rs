//! CreateSnapshot: boot a sandbox, run the warm-up commands in it, take a
//! FULL snapshot, and delete the sandbox unless asked to keep it.

use std::collections::HashMap;
use std::sync::Arc;

use forkd_api::v1 as pb;
use forkd_store::{Manifest, Mode, StoreError};
use pb::exec_response::Event as ExecEvent;
use tokio_stream::StreamExt;

use crate::api::error::{ApiError, WARMUP_SANDBOX_DELETED};
use crate::api::sandbox_service::LinuxGuests;
use crate::api::validate;
use crate::sandbox::exec;
use crate::sandbox::lifecycle::{BootPlan, Lifecycle};
use crate::sandbox::registry::Sandbox;
use crate::snapshot::branch::{self, BranchPlan};
use crate::snapshot::store::Snapshots;
use crate::vmm::ExecCommand;

/// Time limit of a warm-up command whose `timeout_ms` is 0.
pub const DEFAULT_WARMUP_TIMEOUT_MS: u32 = 60_000;
/// Most bytes of a failed warm-up's stderr quoted in the error.
const STDERR_TAIL: usize = 400;

/// A validated CreateSnapshot request.
#[derive(Debug, Clone)]
pub struct CreatePlan {
    /// The tag; `None` means a generated one.
    pub tag: Option<String>,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// vCPUs.
    pub vcpus: u32,
    /// (argv, timeout_ms) of each warm-up command, in order.
    pub warmup: Vec<(Vec<String>, u32)>,
    /// Keep the sandbox after the snapshot.
    pub keep_running: bool,
    /// Boot this Linux image (a checked name, resolved at create time).
    pub image: Option<String>,
    /// The request's `memory_mib` (0: the image's default for a Linux
    /// image).
    pub requested_memory_mib: u32,
}

/// Validates a CreateSnapshot request.
pub fn create_plan(req: &pb::CreateSnapshotRequest) -> Result<CreatePlan, ApiError> {
    let tag = (!req.tag.is_empty()).then(|| req.tag.clone());
    if let Some(tag) = &tag {
        validate::snapshot_tag(tag)?;
    }
    let warmup = req
        .warmup
        .iter()
        .map(|w| {
            validate::argv(&w.argv)?;
            let timeout = match w.timeout_ms {
                0 => DEFAULT_WARMUP_TIMEOUT_MS,
                t => t,
            };
            Ok((w.argv.clone(), timeout))
        })
        .collect::<Result<_, ApiError>>()?;
    let image = (!req.image.is_empty()).then(|| req.image.clone());
    if let Some(name) = &image {
        crate::sandbox::image_lookup::check_name(name)?;
    }
    Ok(CreatePlan {
        tag,
        memory_mib: validate::memory_mib(req.memory_mib)?,
        vcpus: validate::vcpus(req.vcpus)?,
        warmup,
        keep_running: req.keep_running,
        image,
        requested_memory_mib: req.memory_mib,
    })
}

/// Runs CreateSnapshot. Returns the snapshot and, with `keep_running`, the
/// sandbox id. On failure the sandbox is deleted; a failed warm-up leaves
/// nothing in the store. Run it in its own task so it always cleans up.
pub async fn create_snapshot(
    lifecycle: &Arc<Lifecycle>,
    snapshots: &Arc<Snapshots>,
    linux: &LinuxGuests,
    plan: CreatePlan,
) -> Result<(Manifest, Option<String>), ApiError> {
    if let Some(tag) = &plan.tag {
        // Fail before booting anything.
        if let Ok(m) = snapshots.store().get(tag) {
            return Err(StoreError::AlreadyExists {
                tag: tag.clone(),
                status: m.status,
            }
            .into());
        }
    }
    let mut boot = BootPlan {
        n: 1,
        memory_mib: plan.memory_mib,
        vcpus: plan.vcpus,
        labels: HashMap::new(),
        live_fork: false,
        restore: None,
        image: None,
        // Deleted by this call: never expires on its own.
        ttl: None,
        huge_pages: false,
    };
    if let Some(name) = &plan.image {
        linux.plan(&mut boot, name, plan.requested_memory_mib)?;
    }
    let outcome = lifecycle.spawn(boot, std::time::Instant::now()).await?;
    let Some(sandbox) = outcome.started.into_iter().next() else {
        let (_, first) = outcome
            .failures
            .into_iter()
            .next()
            .ok_or_else(|| ApiError::Internal("spawn returned nothing".into()))?;
        return Err(ApiError::NoneStarted {
            code: first.code(),
            message: first.to_string(),
        });
    };
    let id = sandbox.id().to_string();
    tracing::info!(sandbox = %id, commands = plan.warmup.len(), "warming up for a snapshot");
    let mut result = warm_and_branch(snapshots, &sandbox, &plan).await;
    if result.is_err() || !plan.keep_running {
        if let Err(e) = lifecycle.delete(&id).await {
            tracing::warn!(sandbox = %id, error = %e, "could not delete the warm-up sandbox");
            // Say what really became of it.
            if let Err(
                ApiError::WarmupExit { cleanup, .. } | ApiError::WarmupFailed { cleanup, .. },
            ) = &mut result
            {
                *cleanup = format!("sandbox {id} could not be deleted ({e})");
            }
        }
    }
    let manifest = result?;
    Ok((manifest, plan.keep_running.then_some(id)))
}

async fn warm_and_branch(
    snapshots: &Arc<Snapshots>,
    sandbox: &Arc<Sandbox>,
    plan: &CreatePlan,
) -> Result<Manifest, ApiError> {
    for (argv, timeout_ms) in &plan.warmup {
        run_warmup(sandbox, argv, *timeout_ms).await?;
    }
    let outcome = branch::branch(
        snapshots,
        sandbox,
        BranchPlan {
            tag: plan.tag.clone(),
            mode: Mode::Full,
            measure_diff: false,
        },
    )
    .await?;
    Ok(outcome.manifest)
}

/// Runs one warm-up command to its end: OK only for exit code 0.
async fn run_warmup(
    sandbox: &Arc<Sandbox>,
    argv: &[String],
    timeout_ms: u32,
) -> Result<(), ApiError> {
    let cmd = ExecCommand {
        argv: argv.to_vec(),
        ..ExecCommand::default()
    };
    let mut stream = exec::start(sandbox.clone(), cmd, timeout_ms);
    let mut stderr: Vec<u8> = Vec::new();
    while let Some(item) = stream.next().await {
        match item.map(|r| r.event) {
            Ok(Some(ExecEvent::Stderr(bytes))) => {
                stderr.extend_from_slice(&bytes);
                let excess = stderr.len().saturating_sub(STDERR_TAIL);
                stderr.drain(..excess);
            }
            Ok(Some(ExecEvent::Exit(exit))) if exit.exit_code == 0 => return Ok(()),
            Ok(Some(ExecEvent::Exit(exit))) => {
                return Err(ApiError::WarmupExit {
                    argv: argv.to_vec(),
                    exit_code: exit.exit_code,
                    stderr: stderr_suffix(&stderr),
                    cleanup: WARMUP_SANDBOX_DELETED.into(),
                })
            }
            Ok(_) => {}
            Err(status) => {
                return Err(ApiError::WarmupFailed {
                    argv: argv.to_vec(),
                    code: status.code(),
                    message: warmup_failure(&status, timeout_ms),
                    cleanup: WARMUP_SANDBOX_DELETED.into(),
                })
            }
        }
    }
    Err(ApiError::WarmupFailed {
        argv: argv.to_vec(),
        code: tonic::Code::Internal,
        message: "the command ended without an exit status".into(),
        cleanup: WARMUP_SANDBOX_DELETED.into(),
    })
}

/// What happened to a warm-up command that ended with `status`, in the
/// warm-up's terms: an Exec timeout says the sandbox stays usable, but a
/// failed warm-up's sandbox is deleted, so that is not repeated.
fn warmup_failure(status: &tonic::Status, timeout_ms: u32) -> String {
    match status.code() {
        tonic::Code::DeadlineExceeded if status.message().contains("did not stop") => format!(
            "it did not finish within timeout_ms={timeout_ms} and the guest ignored the cancel"
        ),
        tonic::Code::DeadlineExceeded => {
            format!("it did not finish within timeout_ms={timeout_ms} and was stopped")
        }
        _ => status.message().to_string(),
    }
}

/// "; stderr: <tail>" or empty.
fn stderr_suffix(tail: &[u8]) -> String {
    let text = String::from_utf8_lossy(tail);
    let text = text.trim();
    if text.is_empty() {
        String::new()
    } else {
        format!("; stderr: {}", text.replace('\n', " | "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn plans_validate_and_default() {
        let req = pb::CreateSnapshotRequest {
            tag: "base".into(),
            warmup: vec![pb::WarmupCommand {
                argv: vec!["fill".into(), "16".into(), "1".into()],
                timeout_ms: 0,
            }],
            ..Default::default()
        };
        let plan = create_plan(&req).unwrap();
        assert_eq!(plan.tag.as_deref(), Some("base"));
        assert_eq!((plan.memory_mib, plan.vcpus), (256, 2));
        assert_eq!(plan.warmup[0].1, DEFAULT_WARMUP_TIMEOUT_MS);
        assert!(create_plan(&pb::CreateSnapshotRequest::default())
            .unwrap()
            .tag
            .is_none());
        for bad in [
            pb::CreateSnapshotRequest {
                tag: "../x".into(),
                ..Default::default()
            },
            pb::CreateSnapshotRequest {
                warmup: vec![pb::WarmupCommand::default()],
                ..Default::default()
            },
            pb::CreateSnapshotRequest {
                vcpus: 99,
                ..Default::default()
            },
        ] {
            assert_eq!(create_plan(&bad).unwrap_err().code(), Code::InvalidArgument);
        }
    }

    #[test]
    fn stderr_is_quoted_on_one_line() {
        assert_eq!(stderr_suffix(b""), "");
        assert_eq!(stderr_suffix(b"a\nb\n"), "; stderr: a | b");
    }
}
