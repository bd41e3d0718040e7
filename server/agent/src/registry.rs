//! The table of running execs and the reaper that routes exit statuses.
//!
//! The only `waitpid` caller is [`Registry::reap_forever`], which waits for
//! any child (`-1`), so orphans reparented to the agent are reaped too. A
//! fork happens while the table lock is held ([`Registry::fork_as`]) and the
//! reaper takes the lock before routing a status, so it always finds the pid
//! of an exec that has just been forked.

use std::collections::HashMap;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::log;

/// A raw `waitpid` status.
pub type WaitStatus = libc::c_int;

struct Entry {
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
    by_id: HashMap<u64, Entry>,
    by_pid: HashMap<libc::pid_t, u64>,
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

/// The id is already in use by a running exec.
#[derive(Debug)]
pub struct DuplicateId;

impl Registry {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reserves `id` before its fork, so stdin frames that follow the Exec
    /// are queued; returns the receiver of its exit status.
    pub fn reserve(
        &self,
        id: u64,
        stdin_tx: Option<SyncSender<Vec<u8>>>,
    ) -> Result<Receiver<WaitStatus>, DuplicateId> {
        let mut st = self.lock();
        if st.by_id.contains_key(&id) {
            return Err(DuplicateId);
        }
        let (status_tx, status_rx) = mpsc::channel();
        st.by_id.insert(
            id,
            Entry {
                pid: None,
                reaped: false,
                early_signal: None,
                status_tx,
                stdin_tx,
            },
        );
        Ok(status_rx)
    }

    /// Runs `fork` (which returns the child's pid in the parent) with the
    /// table locked and records the pid for reserved exec `id`.
    pub fn fork_as<E>(
        &self,
        id: u64,
        fork: impl FnOnce() -> Result<libc::pid_t, E>,
    ) -> Result<libc::pid_t, E> {
        let mut st = self.lock();
        let pid = fork()?;
        st.forks += 1;
        st.by_pid.insert(pid, id);
        let mut early = None;
        if let Some(e) = st.by_id.get_mut(&id) {
            e.pid = Some(pid);
            early = e.early_signal.take();
        }
        let failure = early.and_then(|sig| signal_exec(pid, sig).err().map(|e| (sig, e)));
        drop(st);
        self.forked.notify_all();
        if let Some((sig, e)) = failure {
            log::warn(format!("signal {sig} to exec {id} (pid {pid}): {e}"));
        }
        Ok(pid)
    }

    /// Forgets exec `id`; its stdin queue closes.
    pub fn remove(&self, id: u64) {
        let mut st = self.lock();
        if let Some(e) = st.by_id.remove(&id) {
            if let Some(pid) = e.pid {
                if st.by_pid.get(&pid) == Some(&id) {
                    st.by_pid.remove(&pid);
                }
            }
        }
    }

    /// The stdin queue of exec `id`, if it takes stdin.
    pub fn stdin(&self, id: u64) -> Option<SyncSender<Vec<u8>>> {
        self.lock().by_id.get(&id).and_then(|e| e.stdin_tx.clone())
    }

    /// Sends `signal` to the process group of exec `id` if it is still
    /// running (or right after its fork, if it has not forked yet); unknown or
    /// finished ids are ignored.
    pub fn kill(&self, id: u64, signal: i32) {
        let mut st = self.lock();
        let Some(e) = st.by_id.get_mut(&id) else {
            return;
        };
        let result = match (e.pid, e.reaped) {
            (None, _) => {
                e.early_signal = Some(signal);
                Ok(())
            }
            (Some(_), true) => Ok(()),
            // The lock is held, so the reaper cannot reap `pid` and let it be
            // reused before the signal is sent.
            (Some(pid), false) => signal_exec(pid, signal),
        };
        drop(st);
        if let Err(e) = result {
            log::warn(format!("signal {signal} to exec {id}: {e}"));
        }
    }

    fn route(&self, pid: libc::pid_t, status: WaitStatus) {
        let mut st = self.lock();
        let Some(id) = st.by_pid.remove(&pid) else {
            return; // an orphan or a finished exec's straggler: just reaped
        };
        if let Some(e) = st.by_id.get_mut(&id) {
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
