//! The memfd check: what forkd does with memfds works here.
//!
//! - `memfd_create` with `MFD_ALLOW_SEALING` (guest RAM is always a memfd,
//!   and the daemon assembles each snapshot's memory into one);
//! - the seals the daemon puts on snapshot memory (shrink, grow, write,
//!   seal) are in place and enforced: a write and a resize are refused;
//! - the sealed memfd maps `MAP_PRIVATE` read-write and a write to that
//!   mapping stays private (how a forked child maps its snapshot).

use std::io;
use std::os::unix::fs::FileExt;

use memfd::{FileSeal, MemfdOptions};

use super::mapping::Mapping;
use super::report::Check;

/// Name of this check.
pub const NAME: &str = "memfd";

const LEN: usize = 4 * 4096;
const PATTERN: u8 = 0x5a;

/// Why the probe failed.
#[derive(Debug, thiserror::Error)]
pub enum MemfdProbeError {
    /// A step failed.
    #[error("{what}: {source}")]
    Step {
        /// The step.
        what: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A seal is missing or not enforced.
    #[error("{0}")]
    NotSealed(&'static str),
    /// A private mapping's write reached the memfd, or did not stick.
    #[error("{0}")]
    CopyOnWrite(&'static str),
}

/// The `io::Error` inside a `memfd::Error` (whose own text has no errno).
pub fn memfd_io(e: memfd::Error) -> io::Error {
    match e {
        memfd::Error::Create(e) | memfd::Error::AddSeals(e) | memfd::Error::GetSeals(e) => e,
    }
}

fn step(what: &'static str) -> impl FnOnce(io::Error) -> MemfdProbeError {
    move |source| MemfdProbeError::Step { what, source }
}

/// Creates, fills, seals and maps a small memfd like the daemon and a
/// forked VMM do, and checks every seal holds.
pub fn probe() -> Result<(), MemfdProbeError> {
    let memfd = MemfdOptions::default()
        .close_on_exec(true)
        .allow_sealing(true)
        .create("forkd-doctor-memfd")
        .map_err(|e| step("memfd_create(MFD_ALLOW_SEALING)")(memfd_io(e)))?;
    let file = memfd.as_file();
    file.set_len(LEN as u64).map_err(step("sizing the memfd"))?;
    file.write_all_at(&[PATTERN; 4096], 0)
        .map_err(step("writing the memfd"))?;
    let seals = [
        FileSeal::SealShrink,
        FileSeal::SealGrow,
        FileSeal::SealWrite,
        FileSeal::SealSeal,
    ];
    memfd
        .add_seals(&seals)
        .map_err(|e| step("adding seals (F_ADD_SEALS)")(memfd_io(e)))?;
    let present = memfd
        .seals()
        .map_err(|e| step("reading seals (F_GET_SEALS)")(memfd_io(e)))?;
    if !seals.iter().all(|s| present.contains(s)) {
        return Err(MemfdProbeError::NotSealed(
            "F_GET_SEALS does not list every seal that was added",
        ));
    }
    if file.write_all_at(&[1], 0).is_ok() {
        return Err(MemfdProbeError::NotSealed(
            "a write to a memfd sealed with F_SEAL_WRITE succeeded",
        ));
    }
    if file.set_len(2 * LEN as u64).is_ok() || file.set_len(0).is_ok() {
        return Err(MemfdProbeError::NotSealed(
            "a sealed memfd could be resized",
        ));
    }
    let child =
        Mapping::new(file, LEN, false).map_err(step("mmap MAP_PRIVATE of the sealed memfd"))?;
    if child.read(0) != PATTERN {
        return Err(MemfdProbeError::CopyOnWrite(
            "a private mapping does not show the memfd's content",
        ));
    }
    child.write(0, 7);
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, 0)
        .map_err(step("reading the memfd back"))?;
    if child.read(0) != 7 || byte[0] != PATTERN {
        return Err(MemfdProbeError::CopyOnWrite(
            "a write to a MAP_PRIVATE mapping was not kept private",
        ));
    }
    Ok(())
}

/// The check.
pub fn check() -> Check {
    match probe() {
        Ok(()) => Check::ok(
            NAME,
            "memfd_create with sealing works; shrink/grow/write/seal seals are enforced, and a \
             MAP_PRIVATE mapping of the sealed memfd is copy-on-write",
        ),
        Err(e) => Check::fail(
            NAME,
            e.to_string(),
            "guest RAM and snapshot memory are memfds: forkd needs Linux 3.17+ with memfd \
             sealing (and, in a container, a seccomp profile that allows memfd_create and \
             fcntl F_ADD_SEALS)",
        ),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn probe_passes_on_linux() {
        super::probe().unwrap();
    }
}
