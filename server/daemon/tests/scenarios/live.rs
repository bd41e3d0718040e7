//! LIVE branches: wait=true and wait=false, progress through
//! WatchSnapshot, forks waiting for a WRITING snapshot, a DIFF on a LIVE
//! base, cancels, the source dying mid-copy, copy failures, and a daemon
//! killed or stopped mid-copy.

use std::time::{Duration, Instant};

use forkd_api::v1 as pb;
use pb::sandbox_service_client::SandboxServiceClient;
use pb::snapshot_service_client::SnapshotServiceClient;
use pb::{BranchMode, SnapshotStatus};
use tonic::transport::Channel;
use tonic::Code;

use crate::harness::{
    alive, assert_status, assert_status_eq, branch, branch_waiting, exec, fork, get_snapshot, peek,
    poke, spawn_small, Daemon,
};

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

pub async fn live_branch_flow() {
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
    let e = assert_status(
        fork_waiting(&mut c, "l2", false).await,
        Code::FailedPrecondition,
        &[],
    );
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

pub async fn live_cancel_and_source_death() {
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
    assert_status(
        s.get_snapshot(pb::GetSnapshotRequest { tag: "c1".into() })
            .await,
        Code::NotFound,
        &[],
    );
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
    assert_status_eq(
        waiting.await.unwrap(),
        Code::Aborted,
        "snapshot c2 is FAILED: cancelled: snapshot deleted",
    );
    assert_status(
        fork.await.unwrap(),
        Code::FailedPrecondition,
        &["c2 is FAILED (cancelled: snapshot deleted)"],
    );
    // The sandbox's epoch ended at the pause: no DIFF before a FULL.
    let e = branch(&mut c, &id, "", BranchMode::Diff).await.unwrap_err();
    assert!(e.message().contains("no base snapshot"), "{}", e.message());

    // The source crashes mid-copy.
    let (mut c1, id1) = (c.clone(), id.clone());
    let waiting = tokio::spawn(async move { live(&mut c1, &id1, "k1", None).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = exec(&mut c, &id, &["crash"], 0).await;
    assert_status(r.into_result(), Code::Aborted, &[]);
    let r = waiting.await.unwrap();
    let reason = format!(
        "source sandbox {id} stopped during the live copy: guest crashed: #PF page fault at \
         rip=0x201234 cr2=0x0"
    );
    assert_status_eq(
        r,
        Code::Aborted,
        &format!("snapshot k1 is FAILED: {reason}"),
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

pub async fn live_copy_failures() {
    // The VMM reports a failed copy.
    let d = Daemon::start(
        &["--live-copy-rate-mibps", FAST_COPY],
        &[("FORKD_FAKE_VMM", "copy_error")],
    )
    .await;
    let mut c = d.sandboxes().await;
    let mut s = SnapshotServiceClient::new(d.channel().await);
    let id = spawn_small(&mut c).await.id;
    assert_status_eq(
        live(&mut c, &id, "bad", None).await,
        Code::Internal,
        "snapshot bad is FAILED: the VMM could not copy memory: writing memory: No space left on \
         device",
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

pub async fn live_copy_across_restart_and_shutdown() {
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
