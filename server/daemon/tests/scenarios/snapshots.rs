//! FULL and DIFF snapshots on the fake's page map: branches and forks
//! (children see the parent's memory), a depth-3 diff chain with a zeroed
//! page, tag and mode validation, CreateSnapshot with warm-ups, DATA_LOSS
//! on a flipped byte, delete rules, a refused snapshot, and kill -9 during
//! a branch followed by a restart.

use std::os::unix::fs::FileExt;
use std::time::Duration;

use forkd_api::v1 as pb;
use pb::snapshot_service_client::SnapshotServiceClient;
use pb::{BranchMode, SnapshotStatus};
use tonic::Code;

use crate::fake_vmm::PAGE;
use crate::harness::{
    assert_status, assert_status_eq, branch, exec, fork, get_snapshot, peek, poke, spawn_small,
    Daemon,
};

pub async fn branch_fork_and_chains() {
    let d = Daemon::start(&[], &[]).await;
    let mut c = d.sandboxes().await;
    let mut s = SnapshotServiceClient::new(d.channel().await);
    let parent = spawn_small(&mut c).await;
    let pid = parent.id.clone();

    // DIFF needs a base; a cold-booted sandbox has none.
    assert_status_eq(
        branch(&mut c, &pid, "", BranchMode::Diff).await,
        Code::FailedPrecondition,
        &format!("sandbox {pid} has no base snapshot: take a FULL branch first"),
    );
    // Contradictions and bad tags.
    assert_status(
        c.branch_sandbox(pb::BranchSandboxRequest {
            sandbox_id: pid.clone(),
            mode: BranchMode::Full as i32,
            diff: true,
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        &[],
    );
    let r = c
        .branch_sandbox(pb::BranchSandboxRequest {
            sandbox_id: pid.clone(),
            wait: Some(false),
            ..Default::default()
        })
        .await;
    assert_status(r, Code::InvalidArgument, &["LIVE only"]);
    assert_status(
        branch(&mut c, &pid, "../x", BranchMode::Full).await,
        Code::InvalidArgument,
        &[],
    );

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
    assert_status(
        branch(&mut c, &pid, "base", BranchMode::Full).await,
        Code::AlreadyExists,
        &[],
    );

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
    assert_status(
        c.spawn_sandboxes(pb::SpawnSandboxesRequest {
            snapshot_tag: "base".into(),
            n: 1,
            memory_mib: 256,
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        &["memory_mib must be 0 or 36"],
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
    assert_status(
        s.watch_snapshot(pb::WatchSnapshotRequest { tag: "nope".into() })
            .await,
        Code::NotFound,
        &[],
    );

    // Delete rules.
    let del = |tag: &str, cascade: bool, force: bool| pb::DeleteSnapshotRequest {
        tag: tag.into(),
        cascade,
        force,
    };
    assert_status(
        s.delete_snapshot(del("base", false, false)).await,
        Code::FailedPrecondition,
        &["dependent diff snapshots (d1)"],
    );
    assert_status(
        s.delete_snapshot(del("base", true, false)).await,
        Code::FailedPrecondition,
        &["running children"],
    );
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
    assert_status(fork(&mut c, "base", 1).await, Code::NotFound, &[]);
    // Children keep running on their own memory.
    assert_eq!(peek(&mut c, &kids[1].id, 3).await, 7);
    // A DIFF against a deleted base is refused.
    assert_status(
        branch(&mut c, &pid, "", BranchMode::Diff).await,
        Code::FailedPrecondition,
        &["was deleted"],
    );
}

pub async fn create_snapshot_and_data_loss() {
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
    assert_status_eq(
        s.create_snapshot(warm("broken", &["fail"], false)).await,
        Code::FailedPrecondition,
        "warm-up command [\"fail\"] exited with code 3; stderr: warm-up broke; the sandbox was \
         deleted and no snapshot was taken",
    );
    assert_status(
        s.get_snapshot(pb::GetSnapshotRequest {
            tag: "broken".into(),
        })
        .await,
        Code::NotFound,
        &[],
    );
    assert!(!d.data.join("snapshots/broken").exists());
    assert_status(
        s.create_snapshot(warm("warm", &["poke", "1", "1"], false))
            .await,
        Code::AlreadyExists,
        &[],
    );

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
    assert_status(
        fork(&mut c, "flip", 5).await,
        Code::DataLoss,
        &["snapshot flip is corrupt: memory chunk 0"],
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

pub async fn restart_recovers_the_store() {
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
    assert_status(
        fork(&mut c, "torn", 1).await,
        Code::FailedPrecondition,
        &["is FAILED (daemon stopped while writing)"],
    );
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

pub async fn failed_branch_keeps_the_sandbox() {
    let d = Daemon::start(&[], &[("FORKD_FAKE_VMM", "snapshot_error")]).await;
    let mut c = d.sandboxes().await;
    let mut s = SnapshotServiceClient::new(d.channel().await);
    let sb = spawn_small(&mut c).await;
    assert_status(
        branch(&mut c, &sb.id, "x", BranchMode::Full).await,
        Code::Internal,
        &["disk full"],
    );
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
