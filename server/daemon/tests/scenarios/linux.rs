//! Linux guests on the fake VMM (daemons with
//! `FORKD_TEST_ASSUME_HYPERVISOR`): spawn from an image, the console,
//! Exec with env/cwd/stdin, overlapping commands, signals, a guest reset,
//! boot failures and the PVM refusal.

use std::time::{Duration, Instant};

use forkd_api::v1 as pb;
use pb::exec_response::Event as Ev;
use pb::sandbox_service_client::SandboxServiceClient;
use tonic::transport::Channel;
use tonic::Code;

use crate::harness::{
    assert_status, assert_status_eq, code_of, exec, exec_full, get, linux_daemon, make_image,
    spawn, spawn_image, Daemon, ASSUME_HV,
};

async fn read_console(
    c: &mut SandboxServiceClient<Channel>,
    id: &str,
    tail_bytes: u32,
) -> Result<pb::ReadConsoleResponse, tonic::Status> {
    c.read_console(pb::ReadConsoleRequest {
        sandbox_id: id.into(),
        tail_bytes,
    })
    .await
    .map(|r| r.into_inner())
}

pub async fn linux_spawn_and_console() {
    let d = linux_daemon("svm").await;
    let mut c = d.sandboxes().await;

    // The image's memory is the default; the guest's boot timing is kept.
    let sb = spawn_image(&mut c, "debian").await;
    assert_eq!(sb.state, pb::SandboxState::Running as i32);
    assert_eq!((sb.image.as_str(), sb.memory_mib), ("debian", 384));
    let boot = sb.guest_boot.expect("guest_boot");
    assert_eq!((boot.kernel_ms, boot.init_ms), (800.0, 45.5));
    let explicit = c
        .spawn_sandboxes(pb::SpawnSandboxesRequest {
            n: 2,
            image: "debian".into(),
            memory_mib: 1024,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .sandboxes;
    assert!(explicit
        .iter()
        .all(|s| s.memory_mib == 1024 && s.image == "debian"));

    // The reference guest is unchanged beside it.
    let reference = spawn(&mut c, 1).await.remove(0);
    assert_eq!((reference.image.as_str(), reference.guest_boot), ("", None));

    // Validation, then the lookup.
    let try_spawn = |req: pb::SpawnSandboxesRequest| {
        let mut c = c.clone();
        async move { c.spawn_sandboxes(req).await }
    };
    let r = try_spawn(pb::SpawnSandboxesRequest {
        n: 1,
        image: "debian".into(),
        snapshot_tag: "base".into(),
        ..Default::default()
    })
    .await;
    assert_status(r, Code::InvalidArgument, &["not both"]);
    let r = try_spawn(pb::SpawnSandboxesRequest {
        n: 1,
        image: "../etc".into(),
        ..Default::default()
    })
    .await;
    assert_status(r, Code::InvalidArgument, &[]);
    let r = try_spawn(pb::SpawnSandboxesRequest {
        n: 1,
        image: "ubuntu".into(),
        ..Default::default()
    })
    .await;
    assert_status_eq(
        r,
        Code::NotFound,
        "image \"ubuntu\" not found in <data-dir>/images; build it with 'forkd image build \
         ubuntu'",
    );

    // The console: what the kernel printed, its command line included.
    let con = read_console(&mut c, &sb.id, 0).await.unwrap();
    let text = String::from_utf8(con.data).unwrap();
    assert!(
        text.contains(&format!("Command line: forkd.hostname={} quiet\n", sb.id)),
        "{text}"
    );
    assert!(!con.truncated);
    let r = exec(&mut c, &sb.id, &["console", "100"], 0).await;
    assert_eq!(r.exit.unwrap().exit_code, 0);
    let con = read_console(&mut c, &sb.id, 32).await.unwrap();
    assert_eq!(con.data.len(), 32);
    assert!(con.data.ends_with(b"console line 99\n"));
    assert!(con.truncated);
    assert_status(
        read_console(&mut c, &sb.id, (1 << 20) + 1).await,
        Code::InvalidArgument,
        &[],
    );
    assert_status(
        read_console(&mut c, &reference.id, 0).await,
        Code::FailedPrecondition,
        &["no serial console"],
    );
    assert_status(
        read_console(&mut c, "sb-nope", 0).await,
        Code::NotFound,
        &[],
    );

    // Deleting removes the console with the sandbox directory.
    let dir = d.data.join("sandboxes").join(&sb.id);
    assert!(dir.join("console.log").is_file());
    c.delete_sandbox(pb::DeleteSandboxRequest { id: sb.id.clone() })
        .await
        .unwrap();
    assert!(!dir.exists());
}

pub async fn linux_exec() {
    let d = linux_daemon("svm").await;
    let mut c = d.sandboxes().await;
    let sb = spawn_image(&mut c, "debian").await;
    let req = |argv: &[&str]| pb::ExecRequest {
        sandbox_id: sb.id.clone(),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };

    // env (sorted by key) and cwd reach the guest.
    let r = exec_full(
        &mut c,
        pb::ExecRequest {
            env: [("B".into(), "2".into()), ("A".into(), "x=1".into())].into(),
            cwd: "/tmp".into(),
            ..req(&["env"])
        },
    )
    .await;
    assert_eq!(code_of(&r), Code::Ok, "{:?}", r.status);
    assert_eq!(r.stdout, b"A=x=1\nB=2\ncwd=/tmp\n");
    let r = exec(&mut c, &sb.id, &["env"], 0).await;
    assert_eq!(r.stdout, b"cwd=/\n");

    // stdin of several input frames comes back whole.
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let r = exec_full(
        &mut c,
        pb::ExecRequest {
            stdin: data.clone(),
            ..req(&["cat"])
        },
    )
    .await;
    assert_eq!(r.exit.map(|e| e.exit_code), Some(0));
    assert!(
        r.stdout == data,
        "stdin came back as {} bytes",
        r.stdout.len()
    );

    // Bad fields are INVALID_ARGUMENT, saying what to fix.
    for (bad, says) in [
        (
            pb::ExecRequest {
                env: [("A=B".into(), "v".into())].into(),
                ..req(&["env"])
            },
            "'='",
        ),
        (
            pb::ExecRequest {
                env: [("".into(), "v".into())].into(),
                ..req(&["env"])
            },
            "must not be empty",
        ),
        (
            pb::ExecRequest {
                cwd: "tmp".into(),
                ..req(&["env"])
            },
            "not absolute",
        ),
        (
            pb::ExecRequest {
                stdin: vec![0; (1 << 20) + 1],
                ..req(&["cat"])
            },
            "1 MiB",
        ),
        (req(&["env", "a\0b"]), "NUL"),
    ] {
        let r = exec_full(&mut c, bad).await;
        assert_status(r.into_result(), Code::InvalidArgument, &[says]);
    }

    // Several commands at once: the first waits for the second.
    let mut waiting = c.exec(req(&["wait-for", "g1"])).await.unwrap().into_inner();
    let first = waiting.message().await.unwrap().unwrap().event.unwrap();
    assert!(
        matches!(&first, Ev::Stdout(b) if b == b"waiting g1\n"),
        "{first:?}"
    );
    let t = Instant::now();
    let r = exec(&mut c, &sb.id, &["release", "g1"], 0).await;
    assert_eq!(r.exit.map(|e| e.exit_code), Some(0));
    match waiting.message().await.unwrap().unwrap().event.unwrap() {
        Ev::Exit(e) => assert_eq!(e.exit_code, 0, "wait-for was not released"),
        other => panic!("expected the exit, got {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(5));

    // A signal: exit code 128 + n.
    let r = exec(&mut c, &sb.id, &["kill", "15"], 0).await;
    let exit = r.exit.unwrap();
    assert_eq!((exit.signal, exit.exit_code), (15, 143));
    let r = exec(&mut c, &sb.id, &["fail"], 0).await;
    let exit = r.exit.unwrap();
    assert_eq!(
        (exit.signal, exit.exit_code, r.stderr.as_slice()),
        (0, 2, &b"oops\n"[..])
    );

    // A program the agent cannot start.
    let r = exec(&mut c, &sb.id, &["nope"], 0).await;
    assert_status(
        r.into_result(),
        Code::FailedPrecondition,
        &["No such file or directory"],
    );

    // timeout_ms: DEADLINE_EXCEEDED, the sandbox stays usable.
    let r = exec(&mut c, &sb.id, &["sleep", "60000"], 100).await;
    assert_status(r.into_result(), Code::DeadlineExceeded, &[]);
    let r = exec(&mut c, &sb.id, &["env"], 0).await;
    assert_eq!(r.stdout, b"cwd=/\n");

    // The reference guest refuses the Linux-only fields.
    let reference = spawn(&mut c, 1).await.remove(0);
    for bad in [
        pb::ExecRequest {
            env: [("A".into(), "1".into())].into(),
            ..Default::default()
        },
        pb::ExecRequest {
            cwd: "/".into(),
            ..Default::default()
        },
        pb::ExecRequest {
            stdin: b"x".to_vec(),
            ..Default::default()
        },
    ] {
        let r = exec_full(
            &mut c,
            pb::ExecRequest {
                sandbox_id: reference.id.clone(),
                argv: vec!["echo".into()],
                ..bad
            },
        )
        .await;
        assert_status_eq(
            r.into_result(),
            Code::FailedPrecondition,
            "the reference guest runs builtins only; env, cwd and stdin need a Linux image",
        );
    }
}

pub async fn linux_guest_reset() {
    let d = linux_daemon("svm").await;
    let mut c = d.sandboxes().await;
    let sb = spawn_image(&mut c, "debian").await;
    let r = exec(&mut c, &sb.id, &["panic"], 0).await;
    assert_status(r.into_result(), Code::Aborted, &[]);
    let s = get(&mut c, &sb.id).await;
    assert_eq!(s.state, pb::SandboxState::Failed as i32);
    assert!(
        s.exit_reason.starts_with(
            "guest reset: the guest kernel reset the machine; Kernel panic - not syncing: \
                 Attempted to kill init! exitcode=0x0000000b; console tail:\n"
        ),
        "{}",
        s.exit_reason
    );
    assert!(
        s.exit_reason.contains("Linux version 6.1.0-fake"),
        "{}",
        s.exit_reason
    );
    assert!(
        s.exit_reason.ends_with("---[ end Kernel panic ]---"),
        "{}",
        s.exit_reason
    );
    // The daemon keeps serving.
    let other = spawn_image(&mut c, "debian").await;
    let r = exec(&mut c, &other.id, &["env"], 0).await;
    assert_eq!(r.stdout, b"cwd=/\n");
}

pub async fn linux_host_checks() {
    let d = linux_daemon("pvm").await;
    let mut c = d.sandboxes().await;
    let t = Instant::now();
    for image in ["debian", "ubuntu"] {
        assert_status_eq(
            c.spawn_sandboxes(pb::SpawnSandboxesRequest {
                n: 1,
                image: image.into(),
                ..Default::default()
            })
            .await,
            Code::FailedPrecondition,
            "Linux guests need hardware virtualization (Intel VMX or AMD SVM); this host's KVM \
             is kvm-pvm (KVM-PVM runs ring-0 guest code ~1000x slower). Run 'forkd doctor' for \
             details.",
        );
    }
    assert!(t.elapsed() < Duration::from_secs(2));
    // Validation comes first.
    assert_status(
        c.spawn_sandboxes(pb::SpawnSandboxesRequest {
            n: 1,
            image: "debian".into(),
            snapshot_tag: "base".into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        &[],
    );
    assert!(d.sandbox_dirs().is_empty());
    // The reference guest is unaffected.
    let sb = spawn(&mut c, 1).await.remove(0);
    assert_eq!(
        exec(&mut c, &sb.id, &["echo", "hi"], 0).await.stdout,
        b"hi\n"
    );
}

pub async fn linux_boot_failures() {
    // A guest that resets while booting: its console is quoted once.
    let tmp = tempfile::tempdir().unwrap();
    make_image(&tmp.path().join("data/images"), "debian", 384);
    let env = [(ASSUME_HV, "svm"), ("FORKD_FAKE_VMM", "linux_boot_panic")];
    let d = Daemon::start_in(tmp, &[], &env).await;
    let mut c = d.sandboxes().await;
    let r = c
        .spawn_sandboxes(pb::SpawnSandboxesRequest {
            n: 1,
            image: "debian".into(),
            ..Default::default()
        })
        .await;
    let e = assert_status(
        r,
        Code::Internal,
        &[
            "guest reset: the guest kernel reset the machine; console tail:\n",
            "VFS: Unable to mount root fs",
        ],
    );
    let m = e.message();
    assert_eq!(m.matches("console tail").count(), 1, "{m}");
    assert!(d.sandbox_dirs().is_empty());
    drop(d);

    // A guest that never answers: --linux-boot-timeout, then the console.
    let tmp = tempfile::tempdir().unwrap();
    make_image(&tmp.path().join("data/images"), "debian", 384);
    let env = [(ASSUME_HV, "svm"), ("FORKD_FAKE_VMM", "linux_boot_hang")];
    let d = Daemon::start_in(tmp, &["--linux-boot-timeout", "1"], &env).await;
    let mut c = d.sandboxes().await;
    let t = Instant::now();
    let r = c
        .spawn_sandboxes(pb::SpawnSandboxesRequest {
            n: 1,
            image: "debian".into(),
            ..Default::default()
        })
        .await;
    assert!(t.elapsed() < Duration::from_secs(10));
    assert_status(
        r,
        Code::DeadlineExceeded,
        &["within 1 s", "waiting for the root device"],
    );
    assert!(d.sandbox_dirs().is_empty());
}
