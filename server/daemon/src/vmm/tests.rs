//! Tests of a VMM's stop reasons and of the handshake, the latter against
//! shell scripts that play a VMM sending given first frames.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use forkd_control::{encode_json, Event, ExitReason, PROTOCOL_VERSION};

use super::*;
use crate::api::error::BootError;

#[test]
fn exit_reasons_map_to_states() {
    let crash = Stop::from_exit(&ExitReason::GuestCrash {
        detail: "#PF at rip=0x1".into(),
    });
    assert!(crash.failed);
    assert_eq!(crash.reason, "guest crashed: #PF at rip=0x1");
    assert!(Stop::from_exit(&ExitReason::VmmError { detail: "x".into() }).failed);
    assert!(!Stop::from_exit(&ExitReason::GuestExit { status: 0 }).failed);
    assert!(!Stop::from_exit(&ExitReason::Shutdown).failed);
    let reset = Stop::from_exit(&ExitReason::GuestReset {
        detail: "kernel panic".into(),
    });
    assert!(reset.failed);
    assert_eq!(reset.reason, "guest reset: kernel panic");
}

/// Starts a fake VMM in `dir` that sends `events` as its first frames and
/// then waits to be killed.
fn spawn_fake(dir: &Path, events: &[Event]) -> Arc<Vmm> {
    let frames: Vec<u8> = events.iter().flat_map(encode_json).collect();
    std::fs::write(dir.join("frames"), frames).unwrap();
    let script = dir.join("fake-forkd-vmm");
    std::fs::write(
        &script,
        "#!/bin/sh\ncat \"$(dirname \"$0\")/frames\" >&3\nexec sleep 60\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let spec = VmmSpec {
        vmm_path: &script,
        id: "sb-test",
        memory_mib: 64,
        vcpus: 1,
        dir,
        restore: None,
        copy_rate_mibps: 0,
        watchdog: None,
        linux: None,
        huge_pages: false,
    };
    // Another test's fork may hold the script open for writing a moment
    // (ETXTBSY); that passes.
    for _ in 0..50 {
        match Vmm::spawn(&spec) {
            Err(BootError::Launch { source, .. })
                if source.raw_os_error() == Some(libc::ETXTBSY) =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other.unwrap(),
        }
    }
    panic!("the fake VMM stayed busy");
}

fn ready() -> Event {
    Event::Ready {
        boot_us: 1,
        guest: None,
    }
}

async fn boot(events: &[Event]) -> Result<(), Stop> {
    let dir = tempfile::tempdir().unwrap();
    let vmm = spawn_fake(dir.path(), events);
    let booted = tokio::time::timeout(Duration::from_secs(10), vmm.wait_ready())
        .await
        .expect("the handshake did not end");
    vmm.shutdown(Duration::from_millis(100)).await;
    assert!(vmm.is_reaped());
    if let Err(stop) = &booted {
        assert!(
            !stop.reason.contains(&dir.path().display().to_string()),
            "no server paths in a reason: {}",
            stop.reason
        );
    }
    booted
}

#[tokio::test]
async fn a_vmm_of_this_protocol_boots() {
    boot(&[Event::hello("test"), ready()]).await.unwrap();
}

#[tokio::test]
async fn a_vmm_of_another_protocol_is_refused() {
    let other = Event::Hello {
        protocol: PROTOCOL_VERSION + 1,
        vmm_version: "9.9.9".into(),
    };
    let stop = boot(&[other, ready()]).await.unwrap_err();
    assert!(stop.failed);
    let forkd = env!("CARGO_PKG_VERSION");
    for part in [
        format!("VMM binary fake-forkd-vmm does not match this forkd {forkd}"),
        format!(
            "control protocol {} (forkd-vmm 9.9.9), this side speaks protocol {PROTOCOL_VERSION}",
            PROTOCOL_VERSION + 1
        ),
        format!("rebuild or reinstall fake-forkd-vmm to match forkd {forkd}"),
    ] {
        assert!(
            stop.reason.contains(&part),
            "{part:?} not in {:?}",
            stop.reason
        );
    }
}

#[tokio::test]
async fn a_vmm_without_a_hello_is_refused() {
    let stop = boot(&[ready()]).await.unwrap_err();
    assert!(
        stop.reason
            .contains("first control frame is a \"ready\" event")
            && stop.reason.contains("predates control protocol versions"),
        "{}",
        stop.reason
    );
}
