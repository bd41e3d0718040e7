//! The table of running execs and the reaper that routes exit statuses.
//!
//! The only `waitpid` caller is [`Registry::reap_forever`], which waits for
//! any child (`-1`), so orphans reparented to the agent are reaped too. A
//! fork happens while the table lock is held ([`Registry::fork_as`]) and the
//! reaper takes the lock before routing a status, so it always finds the pid
//! of an exec that has just been forked.
//!
//! Each exec is named by a [`Ticket`]; host ids map to the tickets of the
//! current execs only. A forked resume retires every current exec
//! ([`Registry::retire_all`]): killed, its id free for reuse, but still
//! reaped and routed to its supervisor by ticket.

use std::collections::HashMap;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::log;

/// A raw `waitpid` status.
pub type WaitStatus = libc::c_int;

/// Names one exec for its whole life, even after a forked resume has
/// retired it and its host id has been reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ticket(u64);

struct Entry {
    /// The host's id for the exec.
    id: u64,
    /// The exec's pid (and process group), once forked.
    pid: Option<libc::pid_t>,
    /// Set when the pid has been reaped; signals are no longer sent then.
    reaped: bool,
    /// A signal that arrived before the fork, sent right after it.
    early_signal: Option<i32>,
    status_tx: Sender<WaitStatus>,
    stdin_tx: Option<SyncSender<Vec<u8>>>,
}

#[derive(Default)]
struct State {
    /// Every exec not yet removed by its supervisor, current or retired.
    entries: HashMap<Ticket, Entry>,
    /// The current execs by host id; retired ones are only in `entries`.
    by_id: HashMap<u64, Ticket>,
    by_pid: HashMap<libc::pid_t, Ticket>,
    /// The next ticket number.
    next: u64,
    /// Counts forks, so the reaper can sleep while there are no children.
    forks: u64,
}

/// The exec table shared by the dispatcher, the exec supervisors and the reaper.
#[derive(Default)]
pub struct Registry {
    state: Mutex<State>,
    forked: Condvar,
}

/// Signals the process group `pid` leads; until the child has called
/// `setsid` that group does not exist yet, so then the child alone.
fn signal_exec(pid: libc::pid_t, signal: i32) -> std::io::Result<()> {
    // SAFETY: kill has no memory effects.
    if unsafe { libc::kill(-pid, signal) } == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::ESRCH) {
        return Err(err);
    }
    // SAFETY: as above; `pid` is our unreaped child, so it names that child.
    if unsafe { libc::kill(pid, signal) } == 0 {
        return Ok(());
    }
    Err(std::io::Error::last_os_error())
}

/// Sends `signal` to an entry's process group if it is running, or
/// remembers it for right after the fork; nothing once reaped (the pid may
/// be reused). Called with the table locked, so the reaper cannot reap the
/// pid and let it be reused before the signal is sent.
fn signal_entry(e: &mut Entry, signal: i32) -> std::io::Result<()> {
    match (e.pid, e.reaped) {
        (None, _) => {
            e.early_signal = Some(signal);
            Ok(())
        }
        (Some(_), true) => Ok(()),
        (Some(pid), false) => signal_exec(pid, signal),
    }
}

/// The id is already in use by a running exec.
#[derive(Debug)]
pub struct DuplicateId;

impl Registry {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reserves `id` before its fork, so stdin frames that follow the Exec
    /// are queued; returns the exec's ticket and the receiver of its exit
    /// status.
    pub fn reserve(
        &self,
        id: u64,
        stdin_tx: Option<SyncSender<Vec<u8>>>,
    ) -> Result<(Ticket, Receiver<WaitStatus>), DuplicateId> {
        let mut st = self.lock();
        if st.by_id.contains_key(&id) {
            return Err(DuplicateId);
        }
        let ticket = Ticket(st.next);
        st.next += 1;
        let (status_tx, status_rx) = mpsc::channel();
        st.entries.insert(
            ticket,
            Entry {
                id,
                pid: None,
                reaped: false,
                early_signal: None,
                status_tx,
                stdin_tx,
            },
        );
        st.by_id.insert(id, ticket);
        Ok((ticket, status_rx))
    }

    /// Runs `fork` (which returns the child's pid in the parent) with the
    /// table locked and records the pid for reserved exec `ticket`.
    pub fn fork_as<E>(
        &self,
        ticket: Ticket,
        fork: impl FnOnce() -> Result<libc::pid_t, E>,
    ) -> Result<libc::pid_t, E> {
        let mut st = self.lock();
        let pid = fork()?;
        st.forks += 1;
        st.by_pid.insert(pid, ticket);
        let mut early = None;
        let mut id = 0;
        if let Some(e) = st.entries.get_mut(&ticket) {
            e.pid = Some(pid);
            early = e.early_signal.take();
            id = e.id;
        }
        let failure = early.and_then(|sig| signal_exec(pid, sig).err().map(|e| (sig, e)));
        drop(st);
        self.forked.notify_all();
        if let Some((sig, e)) = failure {
            log::warn(format!("signal {sig} to exec {id} (pid {pid}): {e}"));
        }
        Ok(pid)
    }

    /// Forgets exec `ticket`; its stdin queue closes and its host id (if
    /// still its own) is free again.
    pub fn remove(&self, ticket: Ticket) {
        let mut st = self.lock();
        if let Some(e) = st.entries.remove(&ticket) {
            if st.by_id.get(&e.id) == Some(&ticket) {
                st.by_id.remove(&e.id);
            }
            if let Some(pid) = e.pid {
                if st.by_pid.get(&pid) == Some(&ticket) {
                    st.by_pid.remove(&pid);
                }
            }
        }
    }

    /// The stdin queue of exec `id`, if it takes stdin.
    pub fn stdin(&self, id: u64) -> Option<SyncSender<Vec<u8>>> {
        let st = self.lock();
        let ticket = st.by_id.get(&id)?;
        st.entries.get(ticket).and_then(|e| e.stdin_tx.clone())
    }

    /// Sends `signal` to the process group of exec `id` if it is still
    /// running (or right after its fork, if it has not forked yet); unknown,
    /// finished or retired ids are ignored.
    pub fn kill(&self, id: u64, signal: i32) {
        let mut st = self.lock();
        let Some(ticket) = st.by_id.get(&id).copied() else {
            return;
        };
        let Some(e) = st.entries.get_mut(&ticket) else {
            return;
        };
        let result = signal_entry(e, signal);
        drop(st);
        if let Err(e) = result {
            log::warn(format!("signal {signal} to exec {id}: {e}"));
        }
    }

    /// Retires every current exec (a forked resume: they belong to the
    /// parent VM's host session): SIGKILLs their process groups (or marks
    /// them to be killed right after their fork), closes their stdin and
    /// frees their ids for reuse. Their supervisors still get their exit
    /// statuses, so they are reaped and cleaned up as usual. Returns how
    /// many were retired.
    pub fn retire_all(&self) -> u32 {
        let mut st = self.lock();
        let tickets: Vec<(u64, Ticket)> = st.by_id.drain().collect();
        let mut failures = Vec::new();
        for (id, ticket) in &tickets {
            if let Some(e) = st.entries.get_mut(ticket) {
                e.stdin_tx = None;
                if let Err(err) = signal_entry(e, libc::SIGKILL) {
                    failures.push((*id, err));
                }
            }
        }
        drop(st);
        for (id, err) in failures {
            log::warn(format!("killing retired exec {id}: {err}"));
        }
        tickets.len() as u32
    }

    fn route(&self, pid: libc::pid_t, status: WaitStatus) {
        let mut st = self.lock();
        let Some(ticket) = st.by_pid.remove(&pid) else {
            return; // an orphan or a finished exec's straggler: just reaped
        };
        if let Some(e) = st.entries.get_mut(&ticket) {
            e.reaped = true;
            let _ = e.status_tx.send(status);
        }
    }

    /// Reaps every child forever, routing exec statuses to their supervisors.
    pub fn reap_forever(&self) -> ! {
        loop {
            let forks_before = self.lock().forks;
            let mut status: WaitStatus = 0;
            // SAFETY: `status` is a valid out-pointer for the duration of the call.
            let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
            if pid > 0 {
                self.route(pid, status);
                continue;
            }
            let err = std::io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => {}
                Some(libc::ECHILD) => {
                    // No children: sleep until the next fork (or a while, to be safe).
                    let st = self.lock();
                    if st.forks == forks_before {
                        let _ = self
                            .forked
                            .wait_timeout(st, Duration::from_secs(1))
                            .unwrap_or_else(|e| e.into_inner());
                    }
                }
                _ => {
                    log::warn(format!("waitpid: {err}"));
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retired_ids_are_reusable() {
        let reg = Registry::default();
        let (t1, _rx1) = reg.reserve(1, None).unwrap();
        assert!(reg.reserve(1, None).is_err());
        assert_eq!(reg.retire_all(), 1);
        let (t2, _rx2) = reg.reserve(1, None).unwrap();
        assert_ne!(t1, t2);
        // Not forked: the kill waits for the fork.
        assert_eq!(reg.lock().entries[&t1].early_signal, Some(libc::SIGKILL));
        // Removing the retired exec leaves the new one's id alone.
        reg.remove(t1);
        assert!(reg.reserve(1, None).is_err());
        reg.remove(t2);
        assert!(reg.reserve(1, None).is_ok());
        assert_eq!(reg.retire_all(), 1);
        assert_eq!(reg.retire_all(), 0);
    }
}
