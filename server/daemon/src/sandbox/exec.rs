//! One Exec call: waits for the sandbox's turn (reference guest only: it
//! runs one command at a time; a Linux guest runs several at once), runs
//! the command, streams its output, and enforces `timeout_ms` and client
//! cancellation by sending Cancel to the guest.

use std::sync::Arc;
use std::time::Duration;

use forkd_api::v1::{exec_response, ExecExit, ExecResponse};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::api::error::ApiError;
use crate::sandbox::registry::Sandbox;
use crate::vmm::{ExecCommand, ExecEvent};

/// Time the guest gets to end a command after Cancel.
pub const CANCEL_WAIT: Duration = Duration::from_secs(5);
/// Messages buffered towards the client.
const STREAM_BUFFER: usize = 16;
/// The reason recorded when the guest ignores a Cancel.
pub const CANCEL_IGNORED: &str = "guest did not honor cancel";

/// The response stream of one Exec.
pub type ExecStream = ReceiverStream<Result<ExecResponse, Status>>;

/// Starts the Exec in its own task and returns its response stream. The
/// task ends when the command ends, even if the client went away.
pub fn start(sandbox: Arc<Sandbox>, cmd: ExecCommand, timeout_ms: u32) -> ExecStream {
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    tokio::spawn(async move {
        if let Err(e) = run(&sandbox, cmd, timeout_ms, &tx).await {
            tracing::debug!(sandbox = %sandbox.id(), error = %e, "exec failed");
            let _ = tx.send(Err(e.into())).await;
        }
    });
    ReceiverStream::new(rx)
}

/// Why the daemon cancelled the command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cancel {
    Timeout,
    ClientGone,
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The error of a request to a sandbox whose VMM stopped.
pub fn stopped(sandbox: &Sandbox) -> ApiError {
    ApiError::SandboxStopped {
        id: sandbox.id().to_string(),
        reason: sandbox
            .vmm
            .stop()
            .map(|s| s.reason)
            .unwrap_or_else(|| "VMM connection closed".into()),
    }
}

fn output(stream: u8, data: Vec<u8>) -> ExecResponse {
    let event = if stream == 1 {
        exec_response::Event::Stdout(data)
    } else {
        exec_response::Event::Stderr(data)
    };
    ExecResponse { event: Some(event) }
}

/// The exit message of a command that ended normally or by a signal
/// (then `exit_code` is 128 + the signal, as shells report it).
fn exit_message(exit_code: i32, duration_us: u64, signal: Option<i32>) -> ExecResponse {
    let (exit_code, signal) = match signal {
        Some(sig) if sig > 0 => (128 + sig, sig),
        _ => (exit_code, 0),
    };
    ExecResponse {
        event: Some(exec_response::Event::Exit(ExecExit {
            exit_code,
            duration_us,
            signal,
        })),
    }
}

async fn run(
    sandbox: &Sandbox,
    cmd: ExecCommand,
    timeout_ms: u32,
    out: &mpsc::Sender<Result<ExecResponse, Status>>,
) -> Result<(), ApiError> {
    let vmm = &sandbox.vmm;
    let linux = vmm.is_linux();
    // The reference guest runs one command at a time: wait for our turn,
    // unless the client gives up first. A Linux guest needs no turn.
    let _turn = if linux {
        None
    } else {
        tokio::select! {
            turn = sandbox.exec_turn.lock() => Some(turn),
            _ = out.closed() => return Ok(()),
        }
    };
    sandbox.check_exec()?;
    let (exec_id, mut events) = vmm.start_exec(cmd).map_err(|_| stopped(sandbox))?;
    let mut timer =
        (timeout_ms > 0).then(|| Instant::now() + Duration::from_millis(timeout_ms.into()));
    let mut cancel: Option<Cancel> = None;
    let request_cancel = |why: Cancel, cancel: &mut Option<Cancel>, timer: &mut Option<Instant>| {
        tracing::debug!(sandbox = %sandbox.id(), exec = exec_id, ?why, "cancelling command");
        vmm.cancel(exec_id);
        *cancel = Some(why);
        *timer = Some(Instant::now() + CANCEL_WAIT);
    };
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(ExecEvent::Output { stream, data }) => {
                    if cancel.is_some() {
                        continue;
                    }
                    tokio::select! {
                        sent = out.send(Ok(output(stream, data))) => if sent.is_err() {
                            request_cancel(Cancel::ClientGone, &mut cancel, &mut timer);
                        },
                        _ = sleep_until(timer) => {
                            request_cancel(Cancel::Timeout, &mut cancel, &mut timer);
                        }
                    }
                }
                Some(ExecEvent::Done { exit_code, duration_us, cancelled, signal }) => {
                    tracing::debug!(
                        sandbox = %sandbox.id(), exec = exec_id, exit_code, duration_us, cancelled,
                        ?signal, "command ended"
                    );
                    return match cancel {
                        Some(Cancel::Timeout) if cancelled => Err(ApiError::ExecTimeout(timeout_ms)),
                        Some(Cancel::ClientGone) => Ok(()),
                        _ => {
                            let _ = out.send(Ok(exit_message(exit_code, duration_us, signal))).await;
                            Ok(())
                        }
                    };
                }
                // A Linux guest's agent could not start the command (no such
                // program, bad cwd): the caller's to fix.
                Some(ExecEvent::Refused(message)) if linux => {
                    return Err(ApiError::CommandNotStarted { id: sandbox.id().to_string(), message });
                }
                Some(ExecEvent::Refused(message)) => {
                    return Err(ApiError::Vmm { id: sandbox.id().to_string(), message });
                }
                None => return Err(stopped(sandbox)),
            },
            _ = out.closed(), if cancel.is_none() => {
                request_cancel(Cancel::ClientGone, &mut cancel, &mut timer);
            }
            _ = sleep_until(timer) => {
                if cancel.is_none() {
                    request_cancel(Cancel::Timeout, &mut cancel, &mut timer);
                } else {
                    tracing::warn!(sandbox = %sandbox.id(), exec = exec_id, "guest ignored cancel; failing the sandbox");
                    vmm.fail(CANCEL_IGNORED);
                    return Err(match cancel {
                        Some(Cancel::Timeout) => ApiError::CancelIgnored {
                            id: sandbox.id().to_string(),
                            timeout_ms,
                        },
                        _ => stopped(sandbox),
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit_of(r: ExecResponse) -> ExecExit {
        match r.event {
            Some(exec_response::Event::Exit(e)) => e,
            other => panic!("not an exit: {other:?}"),
        }
    }

    #[test]
    fn signals_follow_the_shell_convention() {
        let e = exit_of(exit_message(3, 10, None));
        assert_eq!((e.exit_code, e.signal, e.duration_us), (3, 0, 10));
        let e = exit_of(exit_message(-1, 10, Some(9)));
        assert_eq!((e.exit_code, e.signal), (137, 9));
        let e = exit_of(exit_message(0, 10, Some(0)));
        assert_eq!((e.exit_code, e.signal), (0, 0));
    }
}
