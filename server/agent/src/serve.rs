//! The dispatcher: reads host frames from the channel and acts on them.

use std::fs::File;
use std::io::BufReader;
use std::sync::Arc;

use forkd_agent_proto::{
    Frame, FrameReader, GuestMsg, HostMsg, ProtoError, STREAM_FILE, STREAM_STDIN,
};

use crate::channel;
use crate::error::AgentError;
use crate::exec::{self, Ctx, Request};
use crate::files;
use crate::log;
use crate::resume::{self, Fork};

/// Serves the host until the channel ends (`Ok`) or breaks (`Err`).
/// While the channel is parked this thread's own frames (pongs, logs) are
/// queued, never waited on: it must go on reading to see `Resume`.
pub fn serve(ctx: &Arc<Ctx>, input: File) -> Result<(), AgentError> {
    channel::never_wait_on_this_thread();
    let mut frames = FrameReader::new(BufReader::with_capacity(256 * 1024, input));
    loop {
        match frames.read() {
            Ok(None) => return Ok(()),
            Ok(Some(frame)) => handle(ctx, frame),
            // The frame was consumed whole: report it and go on.
            Err(
                e @ (ProtoError::BadKind(_)
                | ProtoError::ShortData(_)
                | ProtoError::BadStream(_)
                | ProtoError::DataTooLarge(_)),
            ) => log::warn(format!("skipping bad frame: {e}")),
            Err(e) => return Err(e.into()),
        }
    }
}

fn handle(ctx: &Arc<Ctx>, frame: Frame) {
    match frame {
        Frame::Json(_) => match frame.parse_json::<HostMsg>() {
            Some(Ok(msg)) => handle_msg(ctx, msg),
            Some(Err(e)) => log::warn(format!("skipping bad message: {e}")),
            None => {}
        },
        Frame::Data {
            id,
            stream: STREAM_STDIN,
            data,
        } => {
            // Unknown ids and execs without stdin: dropped. A full queue
            // blocks here, which pushes back on the host.
            if let Some(tx) = ctx.registry.stdin(id) {
                let _ = tx.send(data);
            }
        }
        Frame::Data {
            id,
            stream: STREAM_FILE,
            data,
        } => {
            // Never blocks: the upload window bounds the queue.
            if !ctx.files.data(id, data) {
                log::warn(format!("upload {id} overran its window"));
            }
        }
        Frame::Data { id, stream, .. } => log::warn(format!(
            "ignoring data for exec {id} on output stream {stream}"
        )),
    }
}

fn handle_msg(ctx: &Arc<Ctx>, msg: HostMsg) {
    match msg {
        HostMsg::Exec {
            id,
            argv,
            env,
            cwd,
            stdin,
        } => exec::start(
            ctx,
            Request {
                id,
                argv,
                env,
                cwd,
                stdin,
            },
        ),
        HostMsg::Kill { id, signal } => ctx.registry.kill(id, signal),
        HostMsg::Ping { id } => {
            if let Err(e) = ctx.channel.send(&GuestMsg::Pong { id }) {
                log::local(format!("cannot send pong: {e}"));
            }
        }
        HostMsg::Quiesce { id } => resume::quiesce(ctx, id),
        HostMsg::Resume {
            id,
            forked,
            entropy,
            unix_ns,
            sandbox_id,
        } => {
            let fork = forked.then_some(Fork {
                entropy,
                unix_ns,
                sandbox_id,
            });
            resume::resume(ctx, id, fork)
        }
        msg @ (HostMsg::WriteFile { .. }
        | HostMsg::ReadFile { .. }
        | HostMsg::FileAck { .. }
        | HostMsg::FileAbort { .. }
        | HostMsg::StatFile { .. }
        | HostMsg::ListDir { .. }
        | HostMsg::RemoveFile { .. }) => files::handle(ctx, msg),
    }
}
