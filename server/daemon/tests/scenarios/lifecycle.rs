//! Sandbox lifecycle on the reference guest: spawn/list/get/delete,
//! Exec streaming, timeouts, queueing, a client going away, a guest
//! crash, an ignored cancel, a VMM failing to boot, and the validation
//! codes.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use forkd_api::v1 as pb;
use pb::exec_response::Event as Ev;
use pb::snapshot_service_client::SnapshotServiceClient;
use pb::BranchMode;
use tonic::Code;

use crate::harness::{
    alive, assert_status, assert_status_eq, code_of, exec, health, spawn, Daemon,
};

pub async fn lifecycle_and_exec() {
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
    assert_status_eq(
        r.into_result(),
        Code::DeadlineExceeded,
        "command exceeded timeout_ms=100 and was stopped; the sandbox is still usable",
    );
    assert!(t.elapsed() < Duration::from_secs(3));
    assert_eq!(exec(&mut c, &id, &["echo", "ok"], 0).await.stdout, b"ok\n");

    // Execs queue in arrival order: once the first has said it runs, a
    // second one waits for it to end.
    let mut c2 = c.clone();
    let id2 = id.clone();
    let t = Instant::now();
    let mut slow = c
        .exec(pb::ExecRequest {
            sandbox_id: id.clone(),
            argv: vec!["hold".into(), "400".into()],
            timeout_ms: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = slow.message().await.unwrap().unwrap().event.unwrap();
    assert!(
        matches!(&first, Ev::Stdout(b) if b == b"held\n"),
        "{first:?}"
    );
    let fast = tokio::spawn(async move {
        let r = exec(&mut c2, &id2, &["echo", "x"], 0).await;
        (r.stdout, Instant::now())
    });
    let slow_code = match slow.message().await.unwrap().unwrap().event.unwrap() {
        Ev::Exit(e) => e.exit_code,
        other => panic!("expected the hold's exit, got {other:?}"),
    };
    let (fast_out, fast_end) = fast.await.unwrap();
    assert_eq!((slow_code, fast_out.as_slice()), (0, &b"x\n"[..]));
    // The echo ended after the 400 ms hold, which began after `t`.
    assert!(fast_end.duration_since(t) >= Duration::from_millis(400));

    // A client that goes away cancels its command.
    {
        let mut stream = c
            .exec(pb::ExecRequest {
                sandbox_id: id.clone(),
                argv: vec!["sleep".into(), "60000".into()],
                timeout_ms: 0,
                ..Default::default()
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
    assert_status_eq(
        r.into_result(),
        Code::Aborted,
        &format!(
            "sandbox {} stopped: guest crashed: #PF page fault at rip=0x201234 cr2=0x0",
            victim.id
        ),
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
    assert_status(
        r.into_result(),
        Code::FailedPrecondition,
        &["DeleteSandbox"],
    );
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
    let r = c
        .get_sandbox(pb::GetSandboxRequest {
            id: target.id.clone(),
        })
        .await;
    assert_status_eq(
        r,
        Code::NotFound,
        &format!("sandbox {} not found", target.id),
    );
    let r = c
        .delete_sandbox(pb::DeleteSandboxRequest {
            id: target.id.clone(),
        })
        .await;
    assert_status(r, Code::NotFound, &[]);
}

pub async fn validation() {
    let d = Daemon::start(&["--max-sandboxes", "2"], &[]).await;
    let mut c = d.sandboxes().await;
    let try_spawn = |req: pb::SpawnSandboxesRequest| {
        let mut c = c.clone();
        async move { c.spawn_sandboxes(req).await }
    };
    let base = || pb::SpawnSandboxesRequest {
        n: 1,
        ..Default::default()
    };
    let r = try_spawn(pb::SpawnSandboxesRequest { n: 0, ..base() }).await;
    assert_status_eq(
        r,
        Code::InvalidArgument,
        "n must be between 1 and 1000, got 0",
    );
    let r = try_spawn(pb::SpawnSandboxesRequest {
        memory_mib: 1,
        ..base()
    })
    .await;
    assert_status(r, Code::InvalidArgument, &[]);
    let r = try_spawn(pb::SpawnSandboxesRequest { vcpus: 9, ..base() }).await;
    assert_status(r, Code::InvalidArgument, &[]);
    let r = try_spawn(pb::SpawnSandboxesRequest {
        labels: [("Bad".to_string(), "v".to_string())].into(),
        ..base()
    })
    .await;
    assert_status(r, Code::InvalidArgument, &["\"Bad\""]);
    let r = try_spawn(pb::SpawnSandboxesRequest {
        snapshot_tag: "base".into(),
        ..base()
    })
    .await;
    assert_status_eq(r, Code::NotFound, "snapshot base not found");
    let r = try_spawn(pb::SpawnSandboxesRequest { n: 3, ..base() }).await;
    assert_status(r, Code::ResourceExhausted, &[]);

    let r = c.get_sandbox(pb::GetSandboxRequest { id: "".into() }).await;
    assert_status(r, Code::InvalidArgument, &[]);
    let r = exec(&mut c, "sb-nope", &["echo"], 0).await;
    assert_status(r.into_result(), Code::NotFound, &[]);
    let sb = spawn(&mut c, 1).await.remove(0);
    let r = exec(&mut c, &sb.id, &[], 0).await;
    assert_status(r.into_result(), Code::InvalidArgument, &[]);
    let big = "x".repeat(70_000);
    let r = exec(&mut c, &sb.id, &["echo", &big], 0).await;
    assert_status(r.into_result(), Code::InvalidArgument, &[]);
    let r = c
        .branch_sandbox(pb::BranchSandboxRequest {
            sandbox_id: sb.id.clone(),
            mode: BranchMode::Live as i32,
            diff: true,
            ..Default::default()
        })
        .await;
    assert_status(r, Code::InvalidArgument, &[]);
    let mut snaps = SnapshotServiceClient::new(d.channel().await);
    assert!(snaps
        .list_snapshots(pb::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .snapshots
        .is_empty());
}

pub async fn ignored_cancel_fails_the_sandbox() {
    let d = Daemon::start(&[], &[]).await;
    let mut c = d.sandboxes().await;
    let sb = spawn(&mut c, 1).await.remove(0);
    let r = exec(&mut c, &sb.id, &["stubborn"], 50).await;
    assert_status(
        r.into_result(),
        Code::DeadlineExceeded,
        &["did not honor cancel"],
    );
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

pub async fn boot_failure() {
    let d = Daemon::start(&[], &[("FORKD_FAKE_VMM", "boot_fail")]).await;
    let mut c = d.sandboxes().await;
    let r = c
        .spawn_sandboxes(pb::SpawnSandboxesRequest {
            n: 2,
            ..Default::default()
        })
        .await;
    assert_status(
        r,
        Code::Internal,
        &["VMM failed: cannot open /dev/kvm", "vmm.log: fake-vmm"],
    );
    assert!(d.sandbox_dirs().is_empty());
    assert!(c
        .list_sandboxes(pb::ListSandboxesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .sandboxes
        .is_empty());
}
