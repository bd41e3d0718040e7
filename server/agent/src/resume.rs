//! Quiesce and Resume: parking the channel for a snapshot, and making a
//! child restored from one a sandbox of its own.

use forkd_agent_proto::{encode_json, GuestMsg};
use nix::sys::time::TimeSpec;
use nix::time::{clock_settime, ClockId};

use crate::error::ResumeError;
use crate::exec::Ctx;
use crate::{entropy, identity, log};

/// What a forked resume brings from the host.
pub struct Fork {
    /// Fresh entropy for the kernel's pool (must not be empty).
    pub entropy: Vec<u8>,
    /// The host's wall clock in ns since the epoch; 0 leaves the clock.
    pub unix_ns: u64,
    /// The child's hostname and sandbox id.
    pub sandbox_id: Option<String>,
}

/// Answers `Quiesced{id}` and parks the channel until [`resume`].
pub fn quiesce(ctx: &Ctx, id: u64) {
    let sent = encode_json(&GuestMsg::Quiesced { id })
        .map_err(|e| e.to_string())
        .and_then(|frame| ctx.channel.park_after(&frame).map_err(|e| e.to_string()));
    if let Err(e) = sent {
        log::local(format!("cannot send quiesced: {e}"));
    }
}

/// Answers `Resumed{id, ..}` and unparks the channel (`Resumed` is the
/// first frame after `Quiesced`). A forked resume first starts a new host
/// session, freshens the guest ([`freshen`]) and retires every exec and
/// file transfer of the parent's session.
pub fn resume(ctx: &Ctx, id: u64, fork: Option<Fork>) {
    let (killed, errors) = match fork {
        None => (0, Vec::new()),
        Some(fork) => {
            // First, so nothing about the parent's execs gets out any more.
            ctx.channel.begin_session();
            let errors: Vec<String> = freshen(ctx.init, &fork)
                .iter()
                .map(ToString::to_string)
                .collect();
            let killed = ctx.registry.retire_all();
            let transfers = ctx.files.retire_all();
            if transfers > 0 {
                log::local(format!(
                    "forked resume: {transfers} file transfers abandoned"
                ));
            }
            for e in &errors {
                log::local(format!("forked resume: {e}"));
            }
            (killed, errors)
        }
    };
    let msg = GuestMsg::Resumed { id, killed, errors };
    let sent = encode_json(&msg)
        .map_err(|e| e.to_string())
        .and_then(|frame| ctx.channel.unpark_after(&frame).map_err(|e| e.to_string()));
    if let Err(e) = sent {
        log::local(format!("cannot send resumed: {e}"));
    }
}

/// Mixes in the entropy, steps the wall clock and sets the identity, in
/// that order; only validates when not in init mode (on a test host).
/// Returns the steps that failed; the others are still done.
pub fn freshen(init: bool, fork: &Fork) -> Vec<ResumeError> {
    let mut errors = Vec::new();
    let entropy = if fork.entropy.is_empty() {
        Err(ResumeError::NoEntropy)
    } else if init {
        entropy::add_and_reseed(&fork.entropy)
    } else {
        Ok(())
    };
    errors.extend(entropy.err());
    if fork.unix_ns > 0 && init {
        errors.extend(set_wall_clock(fork.unix_ns).err());
    }
    if let Some(id) = &fork.sandbox_id {
        match identity::validate(id) {
            Err(e) => errors.push(e),
            Ok(()) if init => {
                errors.extend(identity::set_hostname(id).err());
                errors.extend(identity::write_sandbox_id(id).err());
            }
            Ok(()) => {}
        }
    }
    errors
}

/// Steps CLOCK_REALTIME to `unix_ns`; the monotonic clocks are untouched.
fn set_wall_clock(unix_ns: u64) -> Result<(), ResumeError> {
    let secs = (unix_ns / 1_000_000_000) as libc::time_t;
    let nanos = (unix_ns % 1_000_000_000) as libc::c_long;
    clock_settime(ClockId::CLOCK_REALTIME, TimeSpec::new(secs, nanos))
        .map_err(|e| ResumeError::sys("setting the clock", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fork(entropy: &[u8], sandbox_id: Option<&str>) -> Fork {
        Fork {
            entropy: entropy.to_vec(),
            unix_ns: 1,
            sandbox_id: sandbox_id.map(String::from),
        }
    }

    #[test]
    fn validation_outside_init() {
        assert!(freshen(false, &fork(&[1; 32], Some("sb-1"))).is_empty());
        let errors = freshen(false, &fork(&[], Some("a b")));
        assert_eq!(errors.len(), 2);
        assert!(matches!(errors[0], ResumeError::NoEntropy));
        assert!(errors[1].to_string().contains("bad sandbox id"));
    }
}
