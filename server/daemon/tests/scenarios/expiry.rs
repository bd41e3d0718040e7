//! Sandbox lifetimes: `ttl_seconds`, `--default-ttl`, `--max-ttl`,
//! SetSandboxTtl, an expired sandbox deleted and counted in
//! `forkd_sandboxes_expired_total` on the metrics endpoint.

use std::io::Write;
use std::time::{Duration, Instant};

use forkd_api::v1 as pb;
use tonic::Code;

use crate::harness::{alive, assert_status, free_port, get, spawn, Daemon};

/// `forkd_sandboxes_expired_total` from a `--metrics-listen` endpoint.
fn expired_total(port: u16) -> u64 {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("forkd_sandboxes_expired_total "))
        .unwrap_or_else(|| panic!("no expired counter in {text}"))
        .trim()
        .parse()
        .unwrap()
}

pub async fn expiry_deletes_and_counts() {
    let metrics = free_port();
    let listen = format!("127.0.0.1:{metrics}");
    let mut d = Daemon::start(
        &[
            "--metrics-listen",
            &listen,
            "--max-ttl",
            "30",
            "--default-ttl",
            "20",
        ],
        &[],
    )
    .await;
    let mut c = d.sandboxes().await;
    let spawned = c
        .spawn_sandboxes(pb::SpawnSandboxesRequest {
            n: 2,
            ttl_seconds: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .sandboxes;
    let (doomed, kept) = (&spawned[0], &spawned[1]);
    assert!(doomed.expire_time.is_some() && kept.expire_time.is_some());
    let cleared = c
        .set_sandbox_ttl(pb::SetSandboxTtlRequest {
            sandbox_id: kept.id.clone(),
            ttl_seconds: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap();
    assert_eq!(cleared.expire_time, None);
    // The default applies to a spawn without a ttl; the maximum is enforced.
    let defaulted = spawn(&mut c, 1).await.remove(0);
    assert!(defaulted.expire_time.is_some());
    assert_status(
        c.set_sandbox_ttl(pb::SetSandboxTtlRequest {
            sandbox_id: kept.id.clone(),
            ttl_seconds: 31,
        })
        .await,
        Code::InvalidArgument,
        &["--max-ttl 30"],
    );
    assert_status(
        c.set_sandbox_ttl(pb::SetSandboxTtlRequest {
            sandbox_id: "sb-0000000000".into(),
            ttl_seconds: 5,
        })
        .await,
        Code::NotFound,
        &[],
    );

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = c
            .get_sandbox(pb::GetSandboxRequest {
                id: doomed.id.clone(),
            })
            .await;
        match r {
            Err(e) if e.code() == Code::NotFound => break,
            Err(e) => panic!("{e}"),
            Ok(_) => {}
        }
        assert!(
            Instant::now() < deadline,
            "never expired:\n{}",
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t = Instant::now();
    while alive(doomed.vmm_pid) && t.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !alive(doomed.vmm_pid),
        "VMM of the expired sandbox survived"
    );
    assert!(!d.sandbox_dirs().contains(&doomed.id));
    assert_eq!(expired_total(metrics), 1);
    assert!(d.log_text().contains("sandbox expired"), "{}", d.log_text());
    assert_eq!(
        get(&mut c, &kept.id).await.state,
        pb::SandboxState::Running as i32
    );
    // A pending deadline does not hold up the shutdown.
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait(Duration::from_secs(10)), 0, "{}", d.log_text());
    assert!(!alive(kept.vmm_pid) && !alive(defaulted.vmm_pid));
}
