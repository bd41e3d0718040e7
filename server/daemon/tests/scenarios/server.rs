//! The daemon as a server: token auth, refusing to listen beyond loopback
//! without a token, the data-dir lock, reflection (v1 and v1alpha) and the
//! Unix socket.

use std::process::Command;

use forkd_api::v1 as pb;
use pb::sandbox_service_client::SandboxServiceClient;
use tonic::Code;

use crate::harness::{assert_status, exec, free_port, health, spawn, Daemon};

pub async fn auth() {
    let d = Daemon::start(&[], &[("FORKD_TOKEN", "t0ken")]).await;
    let mut c = d.sandboxes().await;
    assert_status(
        c.list_sandboxes(pb::ListSandboxesRequest::default()).await,
        Code::Unauthenticated,
        &["authorization: Bearer <token>"],
    );
    assert_eq!(health(d.channel().await, "").await, Some(1));
    let mut req = tonic::Request::new(pb::ListSandboxesRequest::default());
    req.metadata_mut()
        .insert("authorization", "Bearer wrong".parse().unwrap());
    assert_status(c.list_sandboxes(req).await, Code::Unauthenticated, &[]);
    let mut req = tonic::Request::new(pb::ListSandboxesRequest::default());
    req.metadata_mut()
        .insert("authorization", "Bearer t0ken".parse().unwrap());
    assert!(c.list_sandboxes(req).await.is_ok());
}

pub async fn refuses_to_start() {
    // Non-loopback without a token.
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_forkd"))
        .args(["serve", "--listen", "0.0.0.0:0", "--data-dir"])
        .arg(tmp.path())
        .arg("--vmm-path")
        .arg(std::env::current_exe().unwrap())
        .env_remove("FORKD_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("without authentication"), "{err}");
}

pub async fn data_dir_lock() {
    let d = Daemon::start(&[], &[]).await;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_forkd"));
    cmd.args(["serve", "--listen", &format!("127.0.0.1:{}", free_port())])
        .arg("--data-dir")
        .arg(&d.data)
        .arg("--vmm-path")
        .arg(std::env::current_exe().unwrap());
    let out = cmd.output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another forkd daemon"), "{err}");
}

pub async fn reflection_and_unix_socket() {
    use tonic_reflection::pb::{v1, v1alpha};
    let sock = tempfile::tempdir().unwrap();
    let path = sock.path().join("forkd.sock");
    let d = Daemon::start(&["--listen-unix", path.to_str().unwrap()], &[]).await;

    let want = [
        "forkd.v1.SandboxService",
        "forkd.v1.SnapshotService",
        "grpc.health.v1.Health",
    ];
    let req = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut client = v1::server_reflection_client::ServerReflectionClient::new(d.channel().await);
    let mut stream = client
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        stream.message().await.unwrap().unwrap().message_response
    else {
        panic!("v1 reflection did not list services");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for w in want {
        assert!(names.iter().any(|n| n == w), "v1 lacks {w}: {names:?}");
    }
    let req = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                "forkd.v1.SandboxService".into(),
            ),
        ),
    };
    let mut client =
        v1alpha::server_reflection_client::ServerReflectionClient::new(d.channel().await);
    let mut stream = client
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap().message_response;
    assert!(
        matches!(
            resp,
            Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(_))
        ),
        "{resp:?}"
    );

    // The same services on the Unix socket.
    let p = path.clone();
    let ch = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let p = p.clone();
            async move {
                let s = tokio::net::UnixStream::connect(p).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await
        .unwrap();
    let mut c = SandboxServiceClient::new(ch.clone());
    let sb = spawn(&mut c, 1).await.remove(0);
    let r = exec(&mut c, &sb.id, &["echo", "unix"], 0).await;
    assert_eq!(r.stdout, b"unix\n");
    let mut tcp = d.sandboxes().await;
    let listed = tcp
        .list_sandboxes(pb::ListSandboxesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .sandboxes;
    assert_eq!(listed.len(), 1, "one registry behind both listeners");
    assert_eq!(health(ch, "").await, Some(1));
}
