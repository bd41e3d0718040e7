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

/// The current soft RLIMIT_NOFILE.
pub fn nofile() -> nix::Result<u64> {
    Ok(getrlimit(Resource::RLIMIT_NOFILE)?.0)
}

/// Connections each of `listeners` may hold so that together they use at
/// most half of `nofile`; the other half stays for the daemon's own work
/// (VMM control sockets, logs, snapshot files and memfds).
pub fn connection_budget(nofile: u64, listeners: usize) -> usize {
    let half = nofile / 2;
    usize::try_from(half / listeners.max(1) as u64)
        .unwrap_or(usize::MAX)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_keeps_half_in_reserve() {
        assert_eq!(connection_budget(20000, 2), 5000);
        assert_eq!(connection_budget(20000, 1), 10000);
        assert_eq!(connection_budget(1, 2), 1);
    }
}
