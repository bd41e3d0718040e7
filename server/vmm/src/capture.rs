//! Capturing a snapshot of the running VM: stop the vCPUs, save their state
//! and the VM's device state, write memory (FULL or DIFF), start a new dirty
//! epoch, and let the vCPUs run again.

use std::path::Path;
use std::time::{Duration, Instant};

use forkd_control::SnapshotMode;
use forkd_snapshot_format::{MEMORY, PAGES, VMSTATE};

use crate::error::{Result, VmmError};
use crate::snapshot;
use crate::state::{self, VmState, VMSTATE_VERSION};
use crate::vcpu::VmContext;

/// How long stopping the vCPUs or collecting their state may take.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// What a capture wrote.
#[derive(Debug)]
pub struct Captured {
    /// From the stop request until the vCPUs ran again.
    pub pause_us: u64,
    /// Bytes of memory data written.
    pub bytes_written: u64,
    /// Pages of the diff, or dirtied in the epoch (FULL with measure).
    pub dirty_pages: u64,
    /// Bytes of guest RAM.
    pub memory_bytes: u64,
}

/// Captures the VM into `dir` (`vmstate`, `memory`, and `pages` for DIFF).
pub fn capture(
    ctx: &VmContext,
    kick_all: impl Fn(),
    mode: SnapshotMode,
    dir: &Path,
    measure_diff: bool,
) -> Result<Captured> {
    let (written, pause_us) = while_stopped(ctx, kick_all, || {
        write_while_stopped(ctx, mode, dir, measure_diff)
    })?;
    let (bytes_written, dirty_pages) = written?;
    Ok(Captured {
        pause_us,
        bytes_written,
        dirty_pages,
        memory_bytes: ctx.ram.size(),
    })
}

/// Runs `f` with the vCPUs stopped: pauses them, runs `f`, resumes them.
/// Returns `f`'s result and the pause in µs (from the stop request until
/// the vCPUs run again).
pub fn while_stopped<T>(
    ctx: &VmContext,
    kick_all: impl Fn(),
    f: impl FnOnce() -> T,
) -> Result<(T, u64)> {
    let started = Instant::now();
    ctx.coord
        .pause(kick_all, STOP_TIMEOUT)
        .map_err(VmmError::Snapshot)?;
    let result = f();
    ctx.coord.resume();
    Ok((result, started.elapsed().as_micros() as u64))
}

/// The stopped vCPUs' and the VM's device state.
pub fn collect_vmstate(ctx: &VmContext) -> Result<VmState> {
    let vcpus = ctx
        .coord
        .collect_states(STOP_TIMEOUT)
        .map_err(VmmError::Snapshot)?;
    let (clock, irqchips) = state::save_vm(&ctx.vm)?;
    let (pit, linux) = match &ctx.linux {
        Some(devices) => (Some(state::save_pit(&ctx.vm)?), Some(devices.state())),
        None => (None, None),
    };
    Ok(VmState {
        version: VMSTATE_VERSION,
        memory_bytes: ctx.ram.size(),
        tsc_khz: ctx.tsc_khz,
        clock,
        irqchips,
        vcpus,
        pit,
        linux,
    })
}

/// Writes `state` to `dir/vmstate`.
pub fn save_vmstate(state: &VmState, dir: &Path) -> Result<()> {
    let path = dir.join(VMSTATE);
    std::fs::write(&path, state.to_bytes())
        .map_err(|e| VmmError::Snapshot(format!("writing {}: {e}", path.display())))
}

/// Saves the stopped vCPUs' and the VM's device state to `dir/vmstate`.
pub fn write_vmstate(ctx: &VmContext, dir: &Path) -> Result<()> {
    save_vmstate(&collect_vmstate(ctx)?, dir)
}

fn write_while_stopped(
    ctx: &VmContext,
    mode: SnapshotMode,
    dir: &Path,
    measure_diff: bool,
) -> Result<(u64, u64)> {
    write_vmstate(ctx, dir)?;
    let epoch = ctx.dirty.take_epoch(&ctx.vm)?;
    let result = match mode {
        SnapshotMode::Full => {
            let since_start = ctx.dirty.since_start();
            snapshot::write_full(&ctx.ram, &since_start, &dir.join(MEMORY)).map(|bytes| {
                let measured = if measure_diff {
                    snapshot::count(&epoch)
                } else {
                    0
                };
                (bytes, measured)
            })
        }
        SnapshotMode::Diff => {
            snapshot::write_diff(&ctx.ram, &epoch, &dir.join(MEMORY), &dir.join(PAGES))
                .map(|bytes| (bytes, snapshot::count(&epoch)))
        }
        SnapshotMode::Live => Err(VmmError::Snapshot(
            "LIVE snapshots are taken by live::start".into(),
        )),
    };
    if result.is_err() {
        ctx.dirty.return_epoch(&epoch);
    }
    result
}
