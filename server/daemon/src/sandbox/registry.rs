//! The sandbox registry: every sandbox the daemon owns, from the moment
//! its VMM is started until it is deleted.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use forkd_api::v1 as pb;
use forkd_store::RunningChild;
use pb::SandboxState;

use crate::api::error::ApiError;
use crate::api::validate::labels_match;
use crate::sandbox::expiry::Deadline;
use crate::sync::lock;
use crate::vmm::{Vmm, VmmPhase};

/// Fields of a sandbox fixed at spawn time.
#[derive(Debug)]
pub struct SandboxSpec {
    /// The id.
    pub id: String,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Labels.
    pub labels: HashMap<String, String>,
    /// When the spawn was requested.
    pub create_time: SystemTime,
    /// Whether the caller asked for a live-forkable sandbox.
    pub live_fork: bool,
    /// The snapshot it was forked from; `None` for a cold boot.
    pub snapshot_tag: Option<String>,
    /// The Linux image it booted; `None` for the reference guest.
    pub image: Option<String>,
    /// RAM is 2 MiB huge pages.
    pub huge_pages: bool,
}

/// One sandbox.
#[derive(Debug)]
pub struct Sandbox {
    /// Spawn-time fields.
    pub spec: SandboxSpec,
    /// (spawn call, index in the call): lists oldest first, and a call's
    /// sandboxes in request order.
    seq: (u64, usize),
    /// Its VMM.
    pub vmm: Arc<Vmm>,
    boot_ms: OnceLock<f64>,
    /// Serializes Execs: the guest runs one command at a time, and tokio's
    /// mutex hands turns out in arrival order.
    pub exec_turn: tokio::sync::Mutex<()>,
    /// Serializes branches of this sandbox. A LIVE branch holds it until
    /// its background copy ends, so later branches queue behind the copy.
    pub branch_turn: Arc<tokio::sync::Mutex<()>>,
    /// The snapshot a DIFF branch is taken against: the one it was forked
    /// from, then the latest snapshot taken of it.
    base: Mutex<Option<String>>,
    /// True while the VMM is writing a snapshot (the vCPUs are stopped).
    snapshotting: AtomicBool,
    /// Set once DeleteSandbox (or the expiry reaper) took it: calls still
    /// queued for its turns say it was deleted. Set while holding
    /// `deadline`, so a lifetime is never changed after its delete began.
    deleted: AtomicBool,
    /// When it expires; `None`: never.
    deadline: Mutex<Option<Deadline>>,
}

impl Sandbox {
    /// The id.
    pub fn id(&self) -> &str {
        &self.spec.id
    }

    /// Records that the guest answered its first ping `boot_ms` after the
    /// spawn request; the sandbox is RUNNING from now on.
    pub fn mark_running(&self, boot_ms: f64) {
        let _ = self.boot_ms.set(boot_ms);
    }

    /// The base snapshot for DIFF branches, if any.
    pub fn base(&self) -> Option<String> {
        lock(&self.base).clone()
    }

    /// Sets (or clears) the base snapshot.
    pub fn set_base(&self, tag: Option<String>) {
        *lock(&self.base) = tag;
    }

    /// When the sandbox expires, if ever.
    pub fn deadline(&self) -> Option<Deadline> {
        *lock(&self.deadline)
    }

    /// Replaces its deadline. FAILED_PRECONDITION once it is being deleted,
    /// and, with `alive_only`, once its VMM stopped.
    pub fn replace_deadline(
        &self,
        deadline: Option<Deadline>,
        alive_only: bool,
    ) -> Result<(), ApiError> {
        let mut current = lock(&self.deadline);
        let id = self.id();
        if self.deleted.load(Ordering::SeqCst) {
            return Err(ApiError::FailedPrecondition(format!(
                "sandbox {id} is being deleted; its lifetime cannot change"
            )));
        }
        if alive_only && !self.is_alive() {
            return Err(ApiError::FailedPrecondition(format!(
                "sandbox {id} is {} ({}); its lifetime cannot change: delete it with DeleteSandbox",
                self.state()
                    .as_str_name()
                    .trim_start_matches("SANDBOX_STATE_"),
                self.vmm.stop().map(|s| s.reason).unwrap_or_default()
            )));
        }
        *current = deadline;
        Ok(())
    }

    /// Marks the VMM as writing a snapshot (state PAUSED) or done.
    pub fn set_snapshotting(&self, on: bool) {
        self.snapshotting.store(on, Ordering::SeqCst);
    }

    /// The current state.
    pub fn state(&self) -> SandboxState {
        match self.vmm.phase() {
            VmmPhase::Stopped(stop) if stop.failed => SandboxState::Failed,
            VmmPhase::Stopped(_) => SandboxState::Exited,
            _ if self.boot_ms.get().is_none() => SandboxState::Starting,
            _ if self.snapshotting.load(Ordering::SeqCst) => SandboxState::Paused,
            _ => SandboxState::Running,
        }
    }

    /// Whether the VMM is starting or running (not stopped).
    pub fn is_alive(&self) -> bool {
        !matches!(self.vmm.phase(), VmmPhase::Stopped(_))
    }

    /// Whether an Exec may run now; otherwise FAILED_PRECONDITION saying
    /// what to do.
    pub fn check_exec(&self) -> Result<(), ApiError> {
        let id = self.id();
        if self.deleted.load(Ordering::SeqCst) {
            return Err(ApiError::SandboxDeleted(id.to_string()));
        }
        match (self.state(), self.vmm.stop()) {
            // Paused by a branch: the command waits for its turn.
            (SandboxState::Running | SandboxState::Paused, _) => Ok(()),
            (SandboxState::Starting, _) => Err(ApiError::FailedPrecondition(format!(
                "sandbox {id} is still starting; retry once it is RUNNING"
            ))),
            (state, stop) => Err(ApiError::FailedPrecondition(format!(
                "sandbox {id} is {} ({}); delete it with DeleteSandbox and spawn a new one",
                state.as_str_name().trim_start_matches("SANDBOX_STATE_"),
                stop.map(|s| s.reason).unwrap_or_default()
            ))),
        }
    }

    /// The API view of the sandbox.
    pub fn to_proto(&self) -> pb::Sandbox {
        pb::Sandbox {
            id: self.spec.id.clone(),
            state: self.state() as i32,
            snapshot_tag: self.spec.snapshot_tag.clone().unwrap_or_default(),
            memory_mib: self.spec.memory_mib,
            vcpus: self.spec.vcpus,
            labels: self.spec.labels.clone(),
            create_time: Some(self.spec.create_time.into()),
            exit_reason: crate::api::public::cap(
                crate::api::public::redact(&self.vmm.stop().map(|s| s.reason).unwrap_or_default()),
                crate::api::public::MAX_EXIT_REASON_BYTES,
            ),
            vmm_pid: self.vmm.pid(),
            live_fork: self.spec.live_fork,
            boot_ms: self.boot_ms.get().copied().unwrap_or(0.0),
            image: self.spec.image.clone().unwrap_or_default(),
            huge_pages: self.spec.huge_pages,
            guest_boot: self.vmm.guest_boot().map(|g| pb::GuestBoot {
                kernel_ms: g.kernel_us as f64 / 1000.0,
                init_ms: g.init_us as f64 / 1000.0,
            }),
            expire_time: self.deadline().map(|d| d.wall.into()),
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<String, Arc<Sandbox>>,
    reserved: usize,
    /// Guest memory of the reserved slots, MiB.
    reserved_mib: u64,
    closed: bool,
    next_call: u64,
}

impl Inner {
    /// Guest memory committed: sandboxes whose VMM runs (or starts), plus
    /// reserved slots, MiB.
    fn committed_mib(&self) -> u64 {
        let alive: u64 = self
            .map
            .values()
            .filter(|s| s.is_alive())
            .map(|s| u64::from(s.spec.memory_mib))
            .sum();
        alive + self.reserved_mib
    }
}

/// All sandboxes, with a cap on how many may exist and on the guest memory
/// they commit.
#[derive(Debug)]
pub struct Registry {
    inner: Mutex<Inner>,
    max: usize,
    memory_limit_mib: u64,
}

impl Registry {
    /// An empty registry holding at most `max` sandboxes whose guest memory
    /// adds up to at most `memory_limit_mib`.
    pub fn new(max: usize, memory_limit_mib: u64) -> Arc<Registry> {
        Arc::new(Registry {
            inner: Mutex::default(),
            max,
            memory_limit_mib,
        })
    }

    /// Guest memory committed by running and starting sandboxes, MiB.
    pub fn committed_mib(&self) -> u64 {
        self.lock().committed_mib()
    }

    /// The guest memory limit, MiB.
    pub fn memory_limit_mib(&self) -> u64 {
        self.memory_limit_mib
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    /// Reserves room for `n` sandboxes of `memory_mib` each
    /// (RESOURCE_EXHAUSTED if that would go over the sandbox cap or the
    /// guest memory limit, UNAVAILABLE once shutting down).
    pub fn reserve(self: &Arc<Self>, n: usize, memory_mib: u32) -> Result<Reservation, ApiError> {
        let mut inner = self.lock();
        if inner.closed {
            return Err(ApiError::ShuttingDown);
        }
        let current = inner.map.len() + inner.reserved;
        if current + n > self.max {
            return Err(ApiError::TooManySandboxes {
                requested: n,
                current,
                max: self.max,
            });
        }
        let asked_mib = n as u64 * u64::from(memory_mib);
        let committed_mib = inner.committed_mib();
        if committed_mib + asked_mib > self.memory_limit_mib {
            return Err(ApiError::OverCommit {
                n,
                memory_mib,
                asked_mib,
                committed_mib,
                limit_mib: self.memory_limit_mib,
            });
        }
        inner.reserved += n;
        inner.reserved_mib += asked_mib;
        let call = inner.next_call;
        inner.next_call += 1;
        Ok(Reservation {
            registry: self.clone(),
            remaining: n,
            memory_mib: u64::from(memory_mib),
            call,
        })
    }

    /// Whether a sandbox with this id exists.
    pub fn contains(&self, id: &str) -> bool {
        self.lock().map.contains_key(id)
    }

    /// The sandbox with this id, or NOT_FOUND.
    pub fn get(&self, id: &str) -> Result<Arc<Sandbox>, ApiError> {
        self.lock()
            .map
            .get(id)
            .cloned()
            .ok_or_else(|| ApiError::SandboxNotFound(id.to_string()))
    }

    /// Sandboxes whose labels match every pair of `selector`, oldest first.
    pub fn list(&self, selector: &HashMap<String, String>) -> Vec<Arc<Sandbox>> {
        let mut out: Vec<Arc<Sandbox>> = self
            .lock()
            .map
            .values()
            .filter(|s| labels_match(&s.spec.labels, selector))
            .cloned()
            .collect();
        out.sort_by_key(|s| s.seq);
        out
    }

    /// Sandboxes forked from a snapshot that are starting or running, with
    /// their snapshot, sorted by id.
    pub fn snapshot_children(&self) -> Vec<RunningChild> {
        let mut out: Vec<RunningChild> = self
            .lock()
            .map
            .values()
            .filter(|s| s.is_alive())
            .filter_map(|s| {
                Some(RunningChild {
                    sandbox_id: s.spec.id.clone(),
                    tag: s.spec.snapshot_tag.clone()?,
                })
            })
            .collect();
        out.sort_by(|a, b| a.sandbox_id.cmp(&b.sandbox_id));
        out
    }

    /// Removes a sandbox for deletion: NOT_FOUND if absent,
    /// FAILED_PRECONDITION while it is still starting.
    pub fn take_for_delete(&self, id: &str) -> Result<Arc<Sandbox>, ApiError> {
        let mut inner = self.lock();
        let sandbox = inner
            .map
            .get(id)
            .ok_or_else(|| ApiError::SandboxNotFound(id.to_string()))?;
        if sandbox.state() == SandboxState::Starting {
            return Err(ApiError::FailedPrecondition(format!(
                "sandbox {id} is still starting; retry once it is RUNNING"
            )));
        }
        let sandbox = inner.map.remove(id).expect("present");
        {
            let _deadline = lock(&sandbox.deadline);
            sandbox.deleted.store(true, Ordering::SeqCst);
        }
        Ok(sandbox)
    }

    /// Removes a sandbox for deletion on expiry: only if its deadline is
    /// at or before `now` (it may have been extended, cleared or deleted
    /// since the reaper queued it). Returns it with that deadline.
    pub fn take_expired(
        &self,
        id: &str,
        now: tokio::time::Instant,
    ) -> Option<(Arc<Sandbox>, Deadline)> {
        let mut inner = self.lock();
        let sandbox = inner.map.get(id)?.clone();
        let deadline_guard = lock(&sandbox.deadline);
        let deadline = (*deadline_guard).filter(|d| d.at <= now)?;
        inner.map.remove(id);
        sandbox.deleted.store(true, Ordering::SeqCst);
        drop(deadline_guard);
        Some((sandbox, deadline))
    }

    /// Removes a sandbox whatever its state; returns it if it was there.
    pub fn remove(&self, id: &str) -> Option<Arc<Sandbox>> {
        self.lock().map.remove(id)
    }

    /// Refuses all further sandboxes and returns the ones there are, oldest
    /// first.
    pub fn close(&self) -> Vec<Arc<Sandbox>> {
        let mut inner = self.lock();
        inner.closed = true;
        let mut all: Vec<Arc<Sandbox>> = inner.map.drain().map(|(_, s)| s).collect();
        all.sort_by_key(|s| s.seq);
        all
    }

    /// Whether [`Registry::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Number of sandboxes.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }
}

/// Room for sandboxes about to be started; unused room is given back on
/// drop.
#[derive(Debug)]
pub struct Reservation {
    registry: Arc<Registry>,
    remaining: usize,
    /// Guest memory of each slot, MiB.
    memory_mib: u64,
    call: u64,
}

impl Reservation {
    /// Adds a sandbox whose VMM was just started, using one reserved slot;
    /// `index` is its position in the spawn request. Fails with UNAVAILABLE
    /// once the registry is closed (the caller then stops the VMM).
    pub fn insert(
        &mut self,
        index: usize,
        spec: SandboxSpec,
        vmm: Arc<Vmm>,
    ) -> Result<Arc<Sandbox>, ApiError> {
        assert!(self.remaining > 0, "insert beyond the reservation");
        let mut inner = self.registry.lock();
        self.remaining -= 1;
        inner.reserved -= 1;
        inner.reserved_mib -= self.memory_mib;
        if inner.closed {
            return Err(ApiError::ShuttingDown);
        }
        if inner.map.contains_key(&spec.id) {
            return Err(ApiError::Internal(format!(
                "sandbox id {} was generated twice",
                spec.id
            )));
        }
        let base = spec.snapshot_tag.clone();
        let sandbox = Arc::new(Sandbox {
            spec,
            seq: (self.call, index),
            vmm,
            boot_ms: OnceLock::new(),
            exec_turn: tokio::sync::Mutex::new(()),
            branch_turn: Arc::new(tokio::sync::Mutex::new(())),
            base: Mutex::new(base),
            snapshotting: AtomicBool::new(false),
            deleted: AtomicBool::new(false),
            deadline: Mutex::new(None),
        });
        inner.map.insert(sandbox.id().to_string(), sandbox.clone());
        Ok(sandbox)
    }

    /// Gives back one slot without using it.
    pub fn release_one(&mut self) {
        if self.remaining > 0 {
            self.remaining -= 1;
            let mut inner = self.registry.lock();
            inner.reserved -= 1;
            inner.reserved_mib -= self.memory_mib;
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.remaining > 0 {
            let mut inner = self.registry.lock();
            inner.reserved -= self.remaining;
            inner.reserved_mib -= self.remaining as u64 * self.memory_mib;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_respect_the_cap() {
        let reg = Registry::new(3, u64::MAX / 2);
        let a = reg.reserve(2, 256).unwrap();
        let err = reg.reserve(2, 256).unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        let mut b = reg.reserve(1, 256).unwrap();
        b.release_one();
        drop(a);
        let _c = reg.reserve(3, 256).unwrap();
        assert!(reg.reserve(1, 256).is_err());
    }

    #[test]
    fn reservations_respect_the_memory_limit() {
        let reg = Registry::new(100, 1024);
        let a = reg.reserve(3, 256).unwrap();
        assert_eq!(reg.committed_mib(), 768);
        let err = reg.reserve(2, 256).unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        let msg = err.to_string();
        for part in ["512 MiB", "768 MiB", "1024 MiB", "--max-guest-memory-mib"] {
            assert!(msg.contains(part), "{part:?} not in {msg:?}");
        }
        let mut b = reg.reserve(1, 256).unwrap();
        b.release_one();
        assert_eq!(reg.committed_mib(), 768);
        drop(b);
        drop(a);
        assert_eq!(reg.committed_mib(), 0);
        let _c = reg.reserve(4, 256).unwrap();
    }

    #[test]
    fn closed_registry_refuses() {
        let reg = Registry::new(3, 1024);
        assert!(reg.close().is_empty());
        assert_eq!(
            reg.reserve(1, 256).unwrap_err().code(),
            tonic::Code::Unavailable
        );
        assert_eq!(reg.len(), 0);
        let err = reg.get("sb-nope").unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);
        assert_eq!(err.to_string(), "sandbox sb-nope not found");
    }
}
