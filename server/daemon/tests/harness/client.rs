//! gRPC helpers for the sandbox calls the scenarios make again and again:
//! spawning, getting, and running a command to its end.

use forkd_api::v1 as pb;
use pb::exec_response::Event as Ev;
use pb::sandbox_service_client::SandboxServiceClient;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// `n` reference-guest sandboxes of the daemon's default size.
pub async fn spawn(c: &mut SandboxServiceClient<Channel>, n: u32) -> Vec<pb::Sandbox> {
    c.spawn_sandboxes(pb::SpawnSandboxesRequest {
        n,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .sandboxes
}

/// One reference-guest sandbox of 36 MiB (quick to snapshot and copy).
pub async fn spawn_small(c: &mut SandboxServiceClient<Channel>) -> pb::Sandbox {
    c.spawn_sandboxes(pb::SpawnSandboxesRequest {
        n: 1,
        memory_mib: 36,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .sandboxes
    .remove(0)
}

/// GetSandbox of `id`, which must exist.
pub async fn get(c: &mut SandboxServiceClient<Channel>, id: &str) -> pb::Sandbox {
    c.get_sandbox(pb::GetSandboxRequest { id: id.into() })
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap()
}

/// What an Exec call gave: its output, its exit, or the status it
/// failed with.
pub struct ExecResult {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit: Option<pb::ExecExit>,
    pub status: Option<Status>,
}

impl ExecResult {
    /// The status the call failed with as `Err`, else the result.
    pub fn into_result(self) -> Result<ExecResult, Status> {
        match self.status {
            Some(s) => Err(s),
            None => Ok(self),
        }
    }
}

/// The call's status code (`Ok` when it ended normally).
pub fn code_of(r: &ExecResult) -> Code {
    r.status.as_ref().map(|s| s.code()).unwrap_or(Code::Ok)
}

/// Runs `argv` in sandbox `id` (`timeout_ms` 0: none) to its end.
pub async fn exec(
    c: &mut SandboxServiceClient<Channel>,
    id: &str,
    argv: &[&str],
    timeout_ms: u32,
) -> ExecResult {
    let req = pb::ExecRequest {
        sandbox_id: id.into(),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        timeout_ms,
        ..Default::default()
    };
    exec_full(c, req).await
}

/// Runs `req` (env, cwd and stdin included) to its end.
pub async fn exec_full(c: &mut SandboxServiceClient<Channel>, req: pb::ExecRequest) -> ExecResult {
    let mut r = ExecResult {
        stdout: vec![],
        stderr: vec![],
        exit: None,
        status: None,
    };
    let mut stream = match c.exec(req).await {
        Ok(s) => s.into_inner(),
        Err(s) => {
            r.status = Some(s);
            return r;
        }
    };
    loop {
        match stream.message().await {
            Ok(Some(m)) => match m.event.unwrap() {
                Ev::Stdout(b) => r.stdout.extend(b),
                Ev::Stderr(b) => r.stderr.extend(b),
                Ev::Exit(e) => r.exit = Some(e),
            },
            Ok(None) => return r,
            Err(s) => {
                r.status = Some(s);
                return r;
            }
        }
    }
}
