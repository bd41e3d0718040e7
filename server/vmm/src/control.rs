//! The control thread: read requests from the daemon and act on them.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use forkd_control::{read_to_vmm, Event, ExitReason, ProtocolError, Request, SnapshotMode, ToVmm};
use forkd_guest_abi as abi;

use crate::agent;
use crate::capture;
use crate::coordinator::{Cancelled, Job, JobKind};
use crate::kick;
use crate::linux::LinuxDevices;
use crate::live::{self, LiveSlot};
use crate::vcpu::VmContext;

/// How long a Linux guest's agent gets to park its channel for a snapshot.
const QUIESCE_TIMEOUT: Duration = Duration::from_secs(10);
/// Why the reference guest refuses file requests.
const NO_FILES: &str = "the reference guest has no filesystem; files need a Linux sandbox";

/// Reads requests on its own thread: answers heartbeats at once, and hands
/// everything else (and the end: EOF or a bad frame) to the control thread
/// in order.
fn read_requests(
    mut stream: UnixStream,
    ctx: Arc<VmContext>,
    tx: mpsc::Sender<Result<ToVmm, ProtocolError>>,
) {
    loop {
        let request = read_to_vmm(&mut stream);
        if let Ok(ToVmm::Request(Request::Heartbeat { id })) = request {
            ctx.sink.send(&Event::Alive { id });
            continue;
        }
        let end = request.is_err();
        if tx.send(request).is_err() || end {
            return;
        }
    }
}

/// Serves requests until the daemon asks for shutdown or goes away.
pub fn serve(
    stream: UnixStream,
    ctx: Arc<VmContext>,
    vcpu_threads: Vec<libc::pthread_t>,
    copy_rate: u64,
) -> ! {
    let live = Arc::new(LiveSlot::default());
    let (tx, requests) = mpsc::channel();
    let reader_ctx = ctx.clone();
    if let Err(e) = std::thread::Builder::new()
        .name("control-reader".into())
        .spawn(move || read_requests(stream, reader_ctx, tx))
    {
        ctx.sink.exit(
            ExitReason::VmmError {
                detail: format!("cannot start the control reader thread: {e}"),
            },
            4,
        );
    }
    loop {
        let request = match requests.recv() {
            Ok(Ok(ToVmm::Request(r))) => r,
            Ok(Ok(ToVmm::Input { id, data })) => {
                forward_input(&ctx, id, &data);
                continue;
            }
            Ok(Ok(ToVmm::FileData { id, data })) => {
                forward_file_data(&ctx, id, &data);
                continue;
            }
            // The reader thread ends only after sending its error.
            Err(_) => std::process::exit(0),
            Ok(Err(ProtocolError::Io(e))) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                eprintln!("forkd-vmm: daemon closed the control socket; exiting");
                std::process::exit(0);
            }
            Ok(Err(e)) => ctx.sink.exit(
                ExitReason::VmmError {
                    detail: format!("bad control request: {e}"),
                },
                4,
            ),
        };
        let request = match &ctx.linux {
            Some(devices) => match serve_linux(&ctx, devices, request) {
                Some(rest) => rest,
                None => continue,
            },
            None => request,
        };
        match request {
            // Answered by the reader thread; never forwarded.
            Request::Heartbeat { id } => ctx.sink.send(&Event::Alive { id }),
            Request::Ping { id } => ctx.coord.submit(Job {
                id,
                kind: JobKind::Ping,
            }),
            Request::Exec { id, argv, .. } => match agent::encode_argv(&argv) {
                Some(bytes) if !argv.is_empty() => ctx.coord.submit(Job {
                    id,
                    kind: JobKind::Exec(bytes),
                }),
                Some(_) => ctx.sink.send(&Event::Error {
                    id,
                    message: "argv is empty".into(),
                }),
                None => ctx.sink.send(&Event::Error {
                    id,
                    message: format!("argv is longer than {} bytes", abi::REQUEST_MAX),
                }),
            },
            Request::Cancel { id } if live.cancel(id) => {}
            Request::Cancel { id } => match ctx.coord.cancel(id) {
                Cancelled::Running => agent::request_cancel(&ctx.ram),
                Cancelled::Dequeued(job) => ctx.sink.send(&Event::ExecDone {
                    id: job.id,
                    exit_code: abi::EXIT_CANCELLED,
                    duration_us: 0,
                    cancelled: true,
                    signal: None,
                }),
                Cancelled::Unknown => {}
            },
            Request::Shutdown { .. } => ctx.sink.exit(ExitReason::Shutdown, 0),
            Request::WriteFile { id, .. }
            | Request::ReadFile { id, .. }
            | Request::StatFile { id, .. }
            | Request::ListDir { id, .. }
            | Request::RemoveFile { id, .. } => ctx.sink.send(&Event::Error {
                id,
                message: NO_FILES.into(),
            }),
            // Acks and aborts of transfers that cannot exist here.
            Request::FileAck { .. } | Request::FileAbort { .. } => {}
            Request::Snapshot { id, .. } if live.running().is_some() => {
                ctx.sink.send(&Event::Error {
                    id,
                    message: format!(
                        "the live copy of request {} is still running; snapshot again after \
                         its copy_done",
                        live.running().unwrap_or_default()
                    ),
                })
            }
            Request::Snapshot {
                id,
                mode,
                dir,
                measure_diff,
            } => {
                let kick_all = || vcpu_threads.iter().for_each(|t| kick::kick(*t));
                let shot = Shot {
                    id,
                    mode,
                    dir: Path::new(&dir),
                    measure_diff,
                };
                match &ctx.linux {
                    Some(devices) => {
                        snapshot_linux(&ctx, devices, &live, kick_all, shot, copy_rate)
                    }
                    None => snapshot(&ctx, &live, kick_all, shot, copy_rate),
                }
            }
        }
    }
}

/// One Snapshot request.
struct Shot<'a> {
    id: u64,
    mode: SnapshotMode,
    dir: &'a Path,
    measure_diff: bool,
}

/// A Linux guest's snapshot: its agent parks the channel first (so the
/// snapshot holds no half-sent frame, and a child can start a session of
/// its own) and resumes after the vCPUs run again.
fn snapshot_linux(
    ctx: &Arc<VmContext>,
    devices: &LinuxDevices,
    live: &Arc<LiveSlot>,
    kick_all: impl Fn(),
    shot: Shot<'_>,
    copy_rate: u64,
) {
    let id = shot.id;
    match devices.agent.quiesce(id, QUIESCE_TIMEOUT) {
        Ok(()) => snapshot(ctx, live, kick_all, shot, copy_rate),
        Err(e) => ctx.sink.send(&Event::Error {
            id,
            message: e.to_string(),
        }),
    }
    // Also after a failed quiesce: a late Quiesced parks the channel.
    if let Err(e) = devices.agent.resume(id) {
        eprintln!("forkd-vmm: resuming the agent after snapshot {id}: {e}");
    }
}

/// Takes a snapshot and reports it: FULL and DIFF once written, LIVE once
/// the vCPUs run again (its copy reports on its own).
fn snapshot(
    ctx: &Arc<VmContext>,
    live: &Arc<LiveSlot>,
    kick_all: impl Fn(),
    shot: Shot<'_>,
    copy_rate: u64,
) {
    let Shot {
        id,
        mode,
        dir,
        measure_diff,
    } = shot;
    if mode == SnapshotMode::Live {
        match live::start(ctx, live, kick_all, dir, measure_diff, copy_rate) {
            Ok(started) => {
                let c = &started.captured;
                ctx.sink.send(&Event::Snapshotted {
                    id,
                    pause_us: c.pause_us,
                    bytes_written: c.bytes_written,
                    dirty_pages: c.dirty_pages,
                    memory_bytes: c.memory_bytes,
                });
                started.monitor(ctx.clone(), live.clone(), id);
            }
            Err(e) => ctx.sink.send(&Event::Error {
                id,
                message: e.to_string(),
            }),
        }
        return;
    }
    let event = match capture::capture(ctx, kick_all, mode, dir, measure_diff) {
        Ok(c) => Event::Snapshotted {
            id,
            pause_us: c.pause_us,
            bytes_written: c.bytes_written,
            dirty_pages: c.dirty_pages,
            memory_bytes: c.memory_bytes,
        },
        Err(e) => Event::Error {
            id,
            message: e.to_string(),
        },
    };
    ctx.sink.send(&event);
}

/// Stdin bytes for a Linux guest's Exec.
fn forward_input(ctx: &VmContext, id: u64, data: &[u8]) {
    let Some(devices) = &ctx.linux else {
        // The reference guest's builtins take no input; the daemon refuses
        // stdin for them, so this is only a stray frame.
        return;
    };
    if let Err(e) = devices.agent.input(id, data) {
        ctx.sink.send(&Event::Error {
            id,
            message: format!("stdin not delivered: {e}"),
        });
    }
}

/// Upload bytes for a Linux guest's agent.
fn forward_file_data(ctx: &VmContext, id: u64, data: &[u8]) {
    let Some(devices) = &ctx.linux else {
        // File requests were refused, so this is only a stray frame.
        return;
    };
    if let Err(e) = devices.agent.file_data(id, data) {
        ctx.sink.send(&Event::FileFailed {
            id,
            kind: forkd_control::FileErrorKind::Io,
            message: format!("upload data not delivered to the guest agent: {e}"),
        });
    }
}

/// Requests a Linux guest's agent serves; the rest (heartbeats, snapshots,
/// shutdown) are returned for the common path.
fn serve_linux(ctx: &VmContext, devices: &LinuxDevices, request: Request) -> Option<Request> {
    let id = request.id();
    let sent = match request {
        Request::Exec {
            id,
            argv,
            env,
            cwd,
            stdin,
        } => (id, devices.agent.exec(id, argv, env, cwd, stdin)),
        Request::Cancel { id } => (id, devices.agent.cancel(id)),
        Request::Ping { id } => (id, devices.agent.ping(id)),
        other => match devices.agent.file_request(other) {
            Ok(sent) => (id, sent),
            Err(other) => return Some(other),
        },
    };
    if let (id, Err(e)) = sent {
        ctx.sink.send(&Event::Error {
            id,
            message: e.to_string(),
        });
    }
    None
}
