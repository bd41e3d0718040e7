//! The VMM's half of the agent channel: reading and writing the mailbox in
//! guest RAM (see `forkd_guest_abi`).

use std::mem::offset_of;

use forkd_guest_abi::{self as abi, Mailbox};

use crate::coordinator::{Job, JobKind};
use crate::memory::GuestRam;

fn field(offset: usize) -> u64 {
    abi::MAILBOX_ADDR + offset as u64
}

/// Encodes argv as the NUL-separated bytes the guest parses; None when it
/// does not fit the request area.
pub fn encode_argv(argv: &[String]) -> Option<Vec<u8>> {
    let mut bytes = Vec::new();
    for arg in argv {
        bytes.extend_from_slice(arg.as_bytes());
        bytes.push(0);
    }
    (bytes.len() as u64 <= abi::REQUEST_MAX).then_some(bytes)
}

/// Whether the guest agent has started (wrote its magic).
pub fn guest_ready(ram: &GuestRam) -> bool {
    ram.read_u64(field(offset_of!(Mailbox, magic))) == abi::MAILBOX_MAGIC
}

/// Writes `job` into the mailbox as request number `seq`.
pub fn begin(ram: &GuestRam, seq: u32, job: &Job) {
    let (op, args): (u32, &[u8]) = match &job.kind {
        JobKind::Ping => (abi::op::PING, &[]),
        JobKind::Exec(args) => (abi::op::EXEC, args),
    };
    // Writes inside RAM we laid out ourselves cannot fail.
    let _ = ram.write(abi::REQUEST_ADDR, args);
    let _ = ram.write_u32(field(offset_of!(Mailbox, request_len)), args.len() as u32);
    let _ = ram.write_u32(field(offset_of!(Mailbox, op)), op);
    let _ = ram.write_u32(field(offset_of!(Mailbox, cancel)), 0);
    let _ = ram.write_u32(field(offset_of!(Mailbox, seq)), seq);
}

/// Asks the running command to stop.
pub fn request_cancel(ram: &GuestRam) {
    let _ = ram.write_u32(field(offset_of!(Mailbox, cancel)), 1);
}

/// The pending output flush: stream and length (clamped to the buffer).
pub fn pending_output(ram: &GuestRam) -> (u8, usize) {
    let stream = ram.read_u32(field(offset_of!(Mailbox, out_stream)));
    let len = ram.read_u32(field(offset_of!(Mailbox, out_len))) as u64;
    (stream as u8, len.min(abi::OUTPUT_SIZE) as usize)
}

/// Copies `into.len()` bytes of the output buffer.
pub fn read_output(ram: &GuestRam, into: &mut [u8]) {
    let _ = ram.read(abi::OUTPUT_ADDR, into);
}

/// The finished request's exit code and duration in TSC ticks.
pub fn result(ram: &GuestRam) -> (i32, u64) {
    (
        ram.read_u32(field(offset_of!(Mailbox, exit_code))) as i32,
        ram.read_u64(field(offset_of!(Mailbox, duration_ticks))),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv_is_nul_separated_and_bounded() {
        assert_eq!(
            encode_argv(&["echo".into(), "hi".into()]).unwrap(),
            b"echo\0hi\0"
        );
        let huge = vec!["x".repeat(abi::REQUEST_MAX as usize)];
        assert!(encode_argv(&huge).is_none());
    }

    #[test]
    fn request_and_result_round_trip_through_ram() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let job = Job {
            id: 9,
            kind: JobKind::Exec(b"echo\0".to_vec()),
        };
        begin(&ram, 5, &job);
        assert_eq!(ram.read_u32(field(offset_of!(Mailbox, seq))), 5);
        assert_eq!(ram.read_u32(field(offset_of!(Mailbox, op))), abi::op::EXEC);
        ram.write_u32(field(offset_of!(Mailbox, exit_code)), (-3i32) as u32)
            .unwrap();
        assert_eq!(result(&ram).0, -3);
    }
}
