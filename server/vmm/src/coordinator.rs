//! Coordination between the control thread and the vCPU threads: the run
//! mode (running / paused), the queue of agent requests, background-vCPU
//! kicks and guest sleeps. One mutex and one condvar guard it all; every
//! blocking wait of a vCPU thread also ends when a pause begins, so a pause
//! never waits on a guest that is idle in the VMM.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::state::VcpuState;

/// What the agent is asked to do.
#[derive(Clone, Debug)]
pub enum JobKind {
    /// Answer at once.
    Ping,
    /// Run a builtin; argv as NUL-separated bytes.
    Exec(Vec<u8>),
}

/// One request for the guest agent.
#[derive(Clone, Debug)]
pub struct Job {
    /// The daemon's request id.
    pub id: u64,
    /// What to do.
    pub kind: JobKind,
}

/// Outcome of a cancel request.
#[derive(Debug)]
pub enum Cancelled {
    /// The job is running in the guest: set the mailbox's cancel word.
    Running,
    /// The job had not started; it is removed and never runs.
    Dequeued(Job),
    /// No such job (already finished).
    Unknown,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Running,
    Paused,
}

struct State {
    mode: Mode,
    parked: usize,
    queue: VecDeque<Job>,
    current: Option<Job>,
    next_seq: u32,
    kicks: Vec<bool>,
    /// Set while the control thread collects vCPU states.
    save_requested: bool,
    saved: Vec<Option<Result<VcpuState, String>>>,
}

/// Shared state of one VM's threads.
pub struct Coordinator {
    state: Mutex<State>,
    cv: Condvar,
    vcpus: usize,
}

impl Coordinator {
    /// A coordinator for `vcpus` vCPU threads, in running mode.
    pub fn new(vcpus: usize) -> Self {
        Coordinator {
            state: Mutex::new(State {
                mode: Mode::Running,
                parked: 0,
                queue: VecDeque::new(),
                current: None,
                next_seq: 0,
                kicks: vec![false; vcpus],
                save_requested: false,
                saved: (0..vcpus).map(|_| None).collect(),
            }),
            cv: Condvar::new(),
            vcpus,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking thread takes the process down anyway; keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a job for the agent.
    pub fn submit(&self, job: Job) {
        self.lock().queue.push_back(job);
        self.cv.notify_all();
    }

    /// vCPU 0: blocks until a job is available (returns it with its
    /// sequence number, now the current job) or a pause begins (None).
    pub fn wait_for_job(&self) -> Option<(u32, Job)> {
        let mut st = self.lock();
        loop {
            if st.mode != Mode::Running {
                return None;
            }
            if let Some(job) = st.queue.pop_front() {
                st.next_seq = st.next_seq.wrapping_add(1).max(1);
                st.current = Some(job.clone());
                return Some((st.next_seq, job));
            }
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The job the guest is running, if any.
    pub fn current(&self) -> Option<Job> {
        self.lock().current.clone()
    }

    /// vCPU 0: the guest finished the current job.
    pub fn finish(&self) -> Option<Job> {
        self.lock().current.take()
    }

    /// Cancels job `id`, queued or running.
    pub fn cancel(&self, id: u64) -> Cancelled {
        let mut st = self.lock();
        if st.current.as_ref().is_some_and(|j| j.id == id) {
            return Cancelled::Running;
        }
        match st.queue.iter().position(|j| j.id == id) {
            Some(pos) => Cancelled::Dequeued(st.queue.remove(pos).expect("position is valid")),
            None => Cancelled::Unknown,
        }
    }

    /// Wakes background vCPU `index` (its next wait returns at once).
    pub fn kick(&self, index: usize) {
        let mut st = self.lock();
        if let Some(k) = st.kicks.get_mut(index) {
            *k = true;
        }
        drop(st);
        self.cv.notify_all();
    }

    /// Background vCPU `index`: blocks until kicked (true) or a pause
    /// begins (false).
    pub fn wait_for_kick(&self, index: usize) -> bool {
        let mut st = self.lock();
        loop {
            if st.kicks.get(index).copied().unwrap_or(false) {
                st.kicks[index] = false;
                return true;
            }
            if st.mode != Mode::Running {
                return false;
            }
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// A guest sleep: blocks up to `duration`, less if a pause begins.
    pub fn sleep(&self, duration: Duration) {
        let deadline = Instant::now() + duration;
        let mut st = self.lock();
        while st.mode == Mode::Running {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            st = self
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Whether vCPU threads should park now.
    pub fn pause_requested(&self) -> bool {
        self.lock().mode == Mode::Paused
    }

    /// vCPU thread `index`: parks until the VM runs again; while parked,
    /// saves its state with `save` whenever the control thread asks.
    pub fn park(&self, index: usize, mut save: impl FnMut() -> Result<VcpuState, String>) {
        let mut st = self.lock();
        st.parked += 1;
        self.cv.notify_all();
        loop {
            if st.save_requested && st.saved[index].is_none() {
                drop(st);
                let state = save();
                st = self.lock();
                st.saved[index] = Some(state);
                self.cv.notify_all();
                continue;
            }
            if st.mode != Mode::Paused {
                break;
            }
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.parked -= 1;
    }

    /// Control thread, while paused: every vCPU's saved state, in index
    /// order.
    pub fn collect_states(&self, timeout: Duration) -> Result<Vec<VcpuState>, String> {
        let started = Instant::now();
        let mut st = self.lock();
        if st.mode != Mode::Paused {
            return Err("vCPU state can only be saved while paused".into());
        }
        st.save_requested = true;
        st.saved.iter_mut().for_each(|s| *s = None);
        self.cv.notify_all();
        while st.saved.iter().any(Option::is_none) {
            let left = timeout.saturating_sub(started.elapsed());
            if left.is_zero() {
                st.save_requested = false;
                return Err(format!("vCPUs did not save their state within {timeout:?}"));
            }
            st = self
                .cv
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        st.save_requested = false;
        st.saved
            .iter_mut()
            .map(|s| s.take().expect("every state is present"))
            .collect()
    }

    /// Stops every vCPU: asks them to park, calls `kick` to interrupt
    /// KVM_RUN, and waits until all are parked or `timeout` passes.
    pub fn pause(&self, kick: impl Fn(), timeout: Duration) -> Result<(), String> {
        let started = Instant::now();
        let mut st = self.lock();
        if st.mode == Mode::Paused {
            return Err("the VM is already paused".into());
        }
        st.mode = Mode::Paused;
        self.cv.notify_all();
        drop(st);
        kick();
        let mut st = self.lock();
        while st.parked < self.vcpus {
            let left = timeout.saturating_sub(started.elapsed());
            if left.is_zero() {
                let parked = st.parked;
                st.mode = Mode::Running;
                self.cv.notify_all();
                return Err(format!(
                    "only {parked} of {} vCPUs stopped within {timeout:?}",
                    self.vcpus
                ));
            }
            st = self
                .cv
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    /// Runs the vCPUs again (after [`Coordinator::pause`]).
    pub fn resume(&self) {
        self.lock().mode = Mode::Running;
        self.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn job(id: u64) -> Job {
        Job {
            id,
            kind: JobKind::Ping,
        }
    }

    #[test]
    fn jobs_run_in_order_with_increasing_sequence() {
        let c = Coordinator::new(1);
        c.submit(job(1));
        c.submit(job(2));
        let (s1, j1) = c.wait_for_job().unwrap();
        assert_eq!(j1.id, 1);
        assert_eq!(c.finish().unwrap().id, 1);
        let (s2, j2) = c.wait_for_job().unwrap();
        assert_eq!((j2.id, s2), (2, s1 + 1));
    }

    #[test]
    fn cancel_distinguishes_running_and_queued() {
        let c = Coordinator::new(1);
        c.submit(job(1));
        c.submit(job(2));
        c.wait_for_job().unwrap();
        assert!(matches!(c.cancel(1), Cancelled::Running));
        assert!(matches!(c.cancel(2), Cancelled::Dequeued(j) if j.id == 2));
        assert!(matches!(c.cancel(3), Cancelled::Unknown));
    }

    #[test]
    fn pause_wakes_waiters_and_waits_for_parking() {
        let c = Arc::new(Coordinator::new(2));
        let mut threads = Vec::new();
        for i in 0..2 {
            let c = c.clone();
            threads.push(std::thread::spawn(move || {
                // Like a vCPU: wait, and park when woken by a pause.
                loop {
                    let woke = if i == 0 {
                        c.wait_for_job().is_some()
                    } else {
                        c.wait_for_kick(i)
                    };
                    if !woke && c.pause_requested() {
                        c.park(i, || Err("no state in this test".into()));
                        return;
                    }
                }
            }));
        }
        c.pause(|| {}, Duration::from_secs(5)).unwrap();
        c.resume();
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn kick_before_wait_is_not_lost() {
        let c = Coordinator::new(2);
        c.kick(1);
        assert!(c.wait_for_kick(1));
    }
}
