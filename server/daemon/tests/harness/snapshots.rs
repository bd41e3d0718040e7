//! The fake guest's memory and snapshots through gRPC: `poke`/`peek` a
//! page, branch a sandbox, fork children from a tag, get a snapshot.

use forkd_api::v1 as pb;
use pb::sandbox_service_client::SandboxServiceClient;
use pb::snapshot_service_client::SnapshotServiceClient;
use pb::BranchMode;
use tonic::transport::Channel;

use super::client::exec;

/// Sets page `page` of sandbox `id`'s memory to `byte` (0: a hole).
pub async fn poke(c: &mut SandboxServiceClient<Channel>, id: &str, page: u64, byte: u8) {
    let r = exec(c, id, &["poke", &page.to_string(), &byte.to_string()], 0).await;
    assert_eq!(r.exit.expect("poke ran").exit_code, 0);
}

/// The byte page `page` of sandbox `id`'s memory holds.
pub async fn peek(c: &mut SandboxServiceClient<Channel>, id: &str, page: u64) -> u8 {
    let r = exec(c, id, &["peek", &page.to_string()], 0).await;
    String::from_utf8(r.stdout).unwrap().trim().parse().unwrap()
}

/// BranchSandbox of `id` into `tag` ("": a generated one) in `mode`.
pub async fn branch(
    c: &mut SandboxServiceClient<Channel>,
    id: &str,
    tag: &str,
    mode: BranchMode,
) -> Result<pb::BranchSandboxResponse, tonic::Status> {
    branch_waiting(c, id, tag, mode, None).await
}

/// As [`branch`], with the request's `wait` (LIVE only).
pub async fn branch_waiting(
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

/// `n` children from snapshot `tag`; no failures allowed.
pub async fn fork(
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

/// GetSnapshot of `tag`, which must exist.
pub async fn get_snapshot(s: &mut SnapshotServiceClient<Channel>, tag: &str) -> pb::Snapshot {
    s.get_snapshot(pb::GetSnapshotRequest { tag: tag.into() })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap()
}
