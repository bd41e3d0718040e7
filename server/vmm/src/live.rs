//! LIVE snapshots: copy guest RAM while the guest keeps running.
//!
//! 1. Outside the pause, arm: open a dirty-log window
//!    ([`DirtyLog::start_window`]) and write-protect all of RAM with
//!    userfaultfd ([`LiveCopy::arm`], the slow part: it walks every
//!    page-table entry). Writes from then on are let through by the fault
//!    handler, which remembers the pages. After a copy that ended well the
//!    monitor thread arms again at once, in the background, so the next
//!    LIVE branch finds protection armed and skips this step; it only
//!    protects again, still outside the pause, the pages written since.
//! 2. The pause: stop the vCPUs, collect their and the VM's state, end the
//!    dirty epoch, and freeze the copy: every page written since arming
//!    (let through, in KVM's dirty log, or written by the VMM) is protected
//!    again, so memory as it is now is the snapshot. Resume; then write
//!    `dir/vmstate`.
//! 3. In the background: the copier and the fault handler fill
//!    `dir/memory`; a monitor thread reports progress and the end.
//!
//! The pause therefore costs the state dump plus re-protecting the pages
//! written since arming, not a walk over all of RAM.

use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use forkd_control::Event;
use forkd_uffd::{Canceller, Frozen, LiveCopy, RunningCopy};

use crate::capture::{self, Captured};
use crate::error::{Result, VmmError};
use crate::snapshot::{self, Bitmap};
use crate::state::VmState;
use crate::vcpu::VmContext;

/// How often a running copy reports progress.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// Where the VMM's live-copy machinery is.
enum SlotState {
    /// No protection armed, no copy.
    Idle,
    /// Copy `id` is running.
    Copying(u64, Canceller),
    /// A copy ended well and protection is being armed again.
    Rearming,
    /// Protection is armed, ready for the next LIVE branch.
    Armed(LiveCopy),
}

/// The one live copy a VMM may run at a time, and the protection kept armed
/// between copies.
pub struct LiveSlot {
    state: Mutex<SlotState>,
    changed: Condvar,
}

impl Default for LiveSlot {
    fn default() -> Self {
        LiveSlot {
            state: Mutex::new(SlotState::Idle),
            changed: Condvar::new(),
        }
    }
}

impl LiveSlot {
    /// The request id of the copy running now, if any.
    pub fn running(&self) -> Option<u64> {
        match &*self.lock() {
            SlotState::Copying(id, _) => Some(*id),
            _ => None,
        }
    }

    /// Cancels copy `id`; false if it is not the one running.
    pub fn cancel(&self, id: u64) -> bool {
        match &*self.lock() {
            SlotState::Copying(running, canceller) if *running == id => {
                canceller.cancel();
                true
            }
            _ => false,
        }
    }

    /// Waits out a re-arm, then takes the armed protection, if any.
    fn take_armed(&self) -> Option<LiveCopy> {
        let mut state = self.lock();
        while matches!(*state, SlotState::Rearming) {
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        match std::mem::replace(&mut *state, SlotState::Idle) {
            SlotState::Armed(copy) => Some(copy),
            other => {
                *state = other;
                None
            }
        }
    }

    fn set(&self, new: SlotState) {
        *self.lock() = new;
        self.changed.notify_all();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A live snapshot whose vCPUs run again; its copy is under way.
pub struct Started {
    /// What the pause produced (`bytes_written` is 0: memory comes later).
    pub captured: Captured,
    copy: RunningCopy,
    started: Instant,
}

/// Takes a LIVE snapshot of the VM into `dir` (see the module doc); returns
/// once the vCPUs run again. `rate` limits the background copy (bytes of
/// RAM per second, 0: none). Call [`Started::monitor`] next.
pub fn start(
    ctx: &VmContext,
    slot: &LiveSlot,
    kick_all: impl Fn(),
    dir: &Path,
    measure_diff: bool,
    rate: u64,
) -> Result<Started> {
    let memory = snapshot::create(&dir.join(forkd_snapshot_format::MEMORY), ctx.ram.size())?;
    let armed = match slot.take_armed() {
        // Armed when the previous copy ended (the dirty-log window started
        // then too): only what was let through since needs protecting.
        // Everything written since is protected again first, while the
        // guest runs (a new window starts), so the pause re-protects only
        // what is written from here on: for a guest with a hot working set
        // that is a handful of pages instead of the whole set.
        Some(armed) => {
            let written = ctx.dirty.restart_window(&ctx.vm)?;
            armed
                .protect_let_through_and(snapshot::pages(&written).map(|p| p as usize))
                .map_err(|e| VmmError::Snapshot(e.to_string()))?;
            armed
        }
        None => {
            ctx.dirty.start_window(&ctx.vm)?;
            // SAFETY: guest RAM is one shmem or hugetlb mapping of `size`
            // bytes, aligned to its page size, that lives as long as the
            // VmContext, which outlives the copy (the monitor thread and
            // the slot hold the context or are held by it).
            unsafe {
                LiveCopy::arm(
                    ctx.ram.host_address() as *mut u8,
                    ctx.ram.size() as usize,
                    ctx.ram.page_size().bytes() as usize,
                )
            }
            .map_err(|e| VmmError::Snapshot(e.to_string()))?
        }
    };
    // Pages that may hold data, known before the pause; pages that gain
    // data before it are in the dirty log, added at freeze.
    let populated = ctx.dirty.populated(&ctx.ram)?;
    let (frozen, pause_us) =
        capture::while_stopped(ctx, kick_all, || freeze(ctx, armed, memory, populated))?;
    let Freeze {
        frozen,
        vmstate,
        epoch,
    } = frozen?;
    // Written after the resume: the state is in memory already.
    if let Err(e) = capture::save_vmstate(&vmstate, dir) {
        drop(frozen); // cancels the copy and lifts protection
        ctx.dirty.return_epoch(&epoch);
        return Err(e);
    }
    let dirty_pages = if measure_diff {
        snapshot::count(&epoch)
    } else {
        0
    };
    Ok(Started {
        captured: Captured {
            pause_us,
            bytes_written: 0,
            dirty_pages,
            memory_bytes: ctx.ram.size(),
        },
        copy: frozen.start(rate),
        started: Instant::now(),
    })
}

/// What the pause produced.
struct Freeze {
    frozen: Frozen,
    vmstate: VmState,
    /// The dirty epoch that ended at the pause (given back on failure).
    epoch: Bitmap,
}

/// The part inside the pause: state, end of epoch, freeze.
fn freeze(ctx: &VmContext, armed: LiveCopy, memory: File, mut populated: Bitmap) -> Result<Freeze> {
    let vmstate = capture::collect_vmstate(ctx)?;
    let (recent, epoch) = ctx.dirty.take_epoch_window(&ctx.vm)?;
    for (p, w) in populated.iter_mut().zip(ctx.dirty.since_start()) {
        *p |= w;
    }
    match armed.freeze(
        memory,
        &populated,
        snapshot::pages(&recent).map(|p| p as usize),
    ) {
        Ok(frozen) => Ok(Freeze {
            frozen,
            vmstate,
            epoch,
        }),
        Err(e) => {
            ctx.dirty.return_epoch(&epoch);
            Err(VmmError::Snapshot(e.to_string()))
        }
    }
}

impl Started {
    /// Runs the copy to its end on a new thread, registered in `slot` as
    /// request `id` (so it can be cancelled): [`Event::CopyProgress`] about
    /// every 100 ms, then one [`Event::CopyDone`].
    pub fn monitor(self, ctx: Arc<VmContext>, slot: Arc<LiveSlot>, id: u64) {
        slot.set(SlotState::Copying(id, self.copy.canceller()));
        let (thread_ctx, thread_slot) = (ctx.clone(), slot.clone());
        let spawned = std::thread::Builder::new()
            .name("live-monitor".into())
            .spawn(move || {
                let (ctx, slot) = (thread_ctx, thread_slot);
                let Started { copy, started, .. } = self;
                let mut last = Instant::now();
                while !copy.is_finished() {
                    std::thread::sleep(Duration::from_millis(10));
                    if last.elapsed() >= PROGRESS_EVERY && !copy.is_finished() {
                        let p = copy.progress();
                        ctx.sink.send(&Event::CopyProgress {
                            id,
                            bytes_copied: p.bytes_copied,
                            bytes_total: p.bytes_total,
                            faults_served: p.faults_served,
                        });
                        last = Instant::now();
                    }
                }
                let last_progress = copy.progress();
                // Arm again for the next LIVE branch (in the background, so
                // its request does not pay the walk); a branch that comes
                // meanwhile waits for it. The dirty-log window of the next
                // branch starts here, before protection goes on.
                slot.set(SlotState::Rearming);
                let (result, armed) = match ctx.dirty.start_window(&ctx.vm) {
                    Ok(()) => copy.wait_and_rearm(),
                    Err(_) => (copy.wait(), None),
                };
                slot.set(armed.map_or(SlotState::Idle, SlotState::Armed));
                let p = result.as_ref().copied().unwrap_or(last_progress);
                ctx.sink.send(&Event::CopyDone {
                    id,
                    bytes_written: p.bytes_written,
                    bytes_copied: p.bytes_copied,
                    bytes_total: p.bytes_total,
                    faults_served: p.faults_served,
                    copy_us: started.elapsed().as_micros() as u64,
                    error: result.err().map(|e| e.to_string()),
                });
            });
        if let Err(e) = spawned {
            // The closure (and with it the copy) is dropped: cancelled.
            slot.set(SlotState::Idle);
            ctx.sink.send(&Event::CopyDone {
                id,
                bytes_written: 0,
                bytes_copied: 0,
                bytes_total: 0,
                faults_served: 0,
                copy_us: 0,
                error: Some(format!("spawning the copy monitor: {e}")),
            });
        }
    }
}

/// Bytes per second for a limit in MiB/s.
pub fn rate_from_mibps(mibps: u64) -> u64 {
    mibps.saturating_mul(1 << 20)
}
