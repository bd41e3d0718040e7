//! Shutdown: SIGTERM drains (health NOT_SERVING, new calls UNAVAILABLE,
//! in-flight Execs finish, VMMs and sandbox directories gone), and
//! `--shutdown-timeout` bounds an Exec that would not end.

use std::time::{Duration, Instant};

use forkd_api::v1 as pb;
use tonic::Code;

use crate::harness::{
    alive, assert_status, assert_status_eq, code_of, exec, health, spawn, Daemon,
};

pub async fn graceful_shutdown() {
    let mut d = Daemon::start(&["--drain-grace", "1"], &[]).await;
    let mut watch = tonic_health::pb::health_client::HealthClient::new(d.channel().await)
        .watch(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(watch.message().await.unwrap().unwrap().status, 1);
    let mut c = d.sandboxes().await;
    let sbs = spawn(&mut c, 3).await;
    let pids: Vec<u32> = sbs.iter().map(|s| s.vmm_pid).collect();
    let id = sbs[0].id.clone();
    let mut c1 = c.clone();
    let running = tokio::spawn(async move { exec(&mut c1, &id, &["sleep", "1500"], 0).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    d.signal(libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Draining: health says NOT_SERVING, new calls are refused.
    assert_eq!(health(d.channel().await, "").await, Some(2));
    assert_status_eq(
        c.list_sandboxes(pb::ListSandboxesRequest::default()).await,
        Code::Unavailable,
        "forkd is shutting down; retry on another instance",
    );
    // The in-flight exec finishes normally.
    let r = running.await.unwrap();
    assert_eq!(code_of(&r), Code::Ok, "{:?}", r.status);
    assert_eq!(r.exit.unwrap().exit_code, 0);
    // The health Watch saw NOT_SERVING, then ended: it does not hold the
    // shutdown up.
    assert_eq!(watch.message().await.unwrap().unwrap().status, 2);
    assert_status(watch.message().await, Code::Unavailable, &[]);
    assert_eq!(d.wait(Duration::from_secs(5)), 0, "{}", d.log_text());
    for pid in pids {
        assert!(!alive(pid), "VMM {pid} survived");
    }
    assert!(d.sandbox_dirs().is_empty());
}

pub async fn caller_timeout_during_shutdown_is_bounded() {
    // An exec longer than --shutdown-timeout is abandoned, and its VMM still
    // goes away.
    let mut d = Daemon::start(&["--shutdown-timeout", "1"], &[]).await;
    let mut c = d.sandboxes().await;
    let sb = spawn(&mut c, 1).await.remove(0);
    let id = sb.id.clone();
    let mut c1 = c.clone();
    let running = tokio::spawn(async move { exec(&mut c1, &id, &["stubborn"], 0).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    d.signal(libc::SIGINT);
    assert_eq!(d.wait(Duration::from_secs(20)), 0, "{}", d.log_text());
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    assert!(!alive(sb.vmm_pid));
    assert!(d.sandbox_dirs().is_empty());
    let r = running.await.unwrap();
    assert_ne!(code_of(&r), Code::Ok);
}
