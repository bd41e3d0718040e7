//! Raising the open-file limit: every sandbox costs the daemon a control
//! socket, and a big spawn opens many at once.

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// Raises RLIMIT_NOFILE's soft limit to its hard limit; returns the new
/// soft limit.
pub fn raise_nofile() -> nix::Result<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard.max(soft))
}
